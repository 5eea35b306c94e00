"""Cost model of the simulator: formulas on hand-computed cases, JSON round trip, bad input."""

import json

import numpy as np
import pytest

from eplb.sim.cost import CostModel, CostModelError, default_cost_model, load_cost_model, reference_cost_model


def roofline(**kw):
    base = dict(device="test", date="2026-01-01", source="unit test", hidden_size=1000, moe_intermediate_size=500,
                dtype_bytes=2, compute_kind="roofline", roofline_ms_per_token=0.01, a2a_latency_ms=0.05,
                intra_node_gbps=1.0, inter_node_gbps=0.5, p2p_gbps=2.0)
    base.update(kw)
    return CostModel(**base)


def test_reference_model_reproduces_gpu_md_numbers():
    m = reference_cost_model()
    assert "reference/gpu.md" in m.source and "H200" in m.device and m.date == "2026-11-24"
    # table rows of gpu.md: 8 experts x 32/256/1024/4096 tokens with torch._grouped_mm
    assert np.allclose(m.compute_ms([256, 2048, 8192, 32768], 8), [0.307, 0.356, 1.100, 4.559])
    # one bf16 DeepSeek-V3 expert (3 x 7168 x 2048 x 2 B = 88 MB) at 190 GB/s: 0.463 ms
    assert m.expert_bytes == 3 * 7168 * 2048 * 2
    assert abs(float(m.migration_ms(1)) - 0.463) < 0.002
    # all_to_all fit within 10% of the three measured points (2 ranks)
    meas = np.array([0.086, 0.109, 0.270])
    pred = m.a2a_ms([256, 2048, 8192], 2)
    assert np.all(np.abs(pred / meas - 1) < 0.11)


def test_compute_table_interpolation_clamp_extrapolation():
    m = CostModel(device="d", date="x", source="s", compute_slots_per_rank=(4, 8), compute_tokens=(100.0, 200.0, 400.0),
                  compute_time_ms=((1.0, 2.0, 3.0), (2.0, 3.0, 7.0)))
    assert m.compute_ms(150, 4) == pytest.approx(1.5)
    assert m.compute_ms(10, 4) == pytest.approx(1.0)  # clamped below the first point
    assert m.compute_ms(600, 4) == pytest.approx(4.0)  # last slope 1/200 per token
    assert m.compute_ms(300, 8) == pytest.approx(5.0)
    # between rows: linear in slots per rank at equal tokens
    assert m.compute_ms(200, 6) == pytest.approx(0.5 * 2.0 + 0.5 * 3.0)
    # outside rows: spr experts at the same tokens per expert: t(16, n) = 2 * t_8(n / 2)
    assert m.compute_ms(800, 16) == pytest.approx(2 * 7.0)
    assert m.compute_ms(100, 2) == pytest.approx(0.5 * 2.0)  # t(2, 100) = 0.5 * t_4(200)
    assert m.compute_is_monotone(4)
    # a measured dip (noise) is flattened: time never decreases with tokens
    d = CostModel(device="d", date="x", source="s", compute_slots_per_rank=(4,), compute_tokens=(100.0, 200.0, 400.0),
                  compute_time_ms=((1.0, 3.0, 2.0),))
    assert d.compute_ms([150, 300, 400, 600], 4) == pytest.approx([2.0, 3.0, 3.0, 3.0])
    assert d.compute_is_monotone(4)


def test_roofline_and_comm_hand_computed():
    m = roofline(roofline_fixed_ms=0.1, roofline_ms_per_slot=0.05)
    # fixed + max(0.05 * 4, 0.01 * n)
    assert m.compute_ms([0, 10, 20, 50], 4) == pytest.approx([0.3, 0.3, 0.3, 0.6])
    # 4 ranks on 2 nodes: the busiest rank gets 100 pairs: 1/4 from its node peer, 2/4 from the other node
    # intra: 25 pairs x 2000 B / 1 GB/s = 0.05 ms; inter: 50 x 2000 B / 0.5 GB/s = 0.2 ms -> 0.05 + 0.2
    assert float(m.a2a_ms(100, 4, 2)) == pytest.approx(0.25)
    assert float(m.a2a_ms(100, 4, 1)) == pytest.approx(0.05 + 75 * 2000 / 1e6)
    assert float(m.a2a_ms(100, 1, 1)) == 0.0
    # migration: 2 experts of 3 x 1000 x 500 x 2 B = 3 MB at 2 GB/s = 3 ms
    assert float(m.migration_ms(2)) == pytest.approx(3.0)
    assert float(m.migration_ms(0)) == 0.0


def test_json_round_trip_and_partial_files(tmp_path):
    m = roofline(notes={"x": "y"})
    p = tmp_path / "cm.json"
    m.save(p)
    assert load_cost_model(p) == m
    t = reference_cost_model()
    assert load_cost_model(t.to_dict()) == t
    # a compute-only file (runtime benchmark style, tokens per slot) completed from a base model
    d = {"device": "1x H100", "date": "2026-12-01", "source": "bench/runtime_compute.py",
         "compute": {"kind": "table", "slots_per_rank": [2, 4], "tokens_per_slot": [10, 20],
                     "time_ms": [[1.0, 2.0], [3.0, 4.0]]}}
    m2 = load_cost_model(d, base=t)
    assert m2.device == "1x H100" and m2.intra_node_gbps == t.intra_node_gbps
    assert m2.compute_ms(40, 2) == pytest.approx(2.0)  # 20 tokens/slot x 2 slots
    assert m2.compute_ms(80, 4) == pytest.approx(4.0)
    assert m2.compute_ms(30, 2) == pytest.approx(1.5)


def test_default_is_the_newest_measured_file_completed_from_the_reference():
    from eplb.sim.cost import _measured_files

    m = default_cost_model()
    assert m.device and m.date and m.source
    files = _measured_files()
    if not files:
        assert m == reference_cost_model()
        return
    raw = [json.loads(f.read_text()) for f in files]
    assert m.date == max(r["date"] for r in raw) and m.source in [r["source"] for r in raw]
    ref = reference_cost_model()
    newest = next(r for r in raw if r["source"] == m.source)
    if "all_to_all" not in newest:  # compute-only measurement: the all-to-all comes from reference/gpu.md
        assert m.a2a_latency_ms == ref.a2a_latency_ms and "reference/gpu.md" in m.notes["all_to_all"]


@pytest.mark.parametrize("patch, match", [
    ({"device": None}, "missing field 'device'"),
    ({"compute": {"kind": "magic"}}, "'table' or 'roofline'"),
    ({"compute": {"kind": "table", "slots_per_rank": [8], "tokens_per_rank": [1, 2], "time_ms": [[1, 2, 3]]}},
     "time_ms"),
    ({"compute": {"kind": "table", "slots_per_rank": [8], "tokens_per_rank": [2, 1], "time_ms": [[1, 2]]}},
     "ascending"),
    ({"all_to_all": {"intra_node_gbps": -1}}, "intra_node_gbps"),
    ({"migration": {"exposed": 2}}, "migration_exposed"),
    ({"shape": {"hidden_size": 0}}, "hidden_size"),
    ({"format": "other"}, "format"),
])
def test_bad_cost_models(patch, match):
    d = reference_cost_model().to_dict()
    for k, v in patch.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(CostModelError, match=match):
        load_cost_model(d)


def test_bad_files(tmp_path):
    with pytest.raises(CostModelError, match="no such cost-model file"):
        load_cost_model(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CostModelError, match="bad.json: not valid JSON"):
        load_cost_model(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(CostModelError, match="expected a JSON object"):
        load_cost_model(bad)


def test_fp8_block_weights_halve_the_expert_bytes_and_migration_time():
    from eplb.sim.cost import CostModel, CostModelError, load_cost_model

    bf16 = CostModel(device="d", date="2026-12-02", source="test", compute_kind="roofline", roofline_ms_per_token=0.01,
                     p2p_gbps=100.0)
    fp8 = bf16.with_(weight_format="fp8-block")
    assert bf16.expert_bytes == 88_080_384
    # DeepSeek-V3: 44,040,192 FP8 weight bytes + float32 scales of w13 [32, 56] and w2 [56, 16] blocks
    assert fp8.expert_bytes == 3 * 7168 * 2048 + 4 * (32 * 56 + 56 * 16) == 44_050_944
    assert fp8.token_bytes == bf16.token_bytes  # activations stay in dtype_bytes
    assert fp8.migration_ms(3) == pytest.approx(3 * 44_050_944 / 100e6)
    back = load_cost_model(fp8.to_dict())
    assert back.weight_format == "fp8-block" and back.expert_bytes == fp8.expert_bytes
    with pytest.raises(CostModelError, match="field 'weight_format' must be one of \\['dense', 'fp8-block'\\], got 'int4'"):
        load_cost_model({**fp8.to_dict(), "shape": {"weight_format": "int4"}})
