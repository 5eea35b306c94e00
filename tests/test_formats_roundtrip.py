"""eplb.formats: round trips through every map format and each file checked field by field against its schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement
from eplb.formats import FORMATS, detect_map_format, read_placement, write_placement
from eplb.formats.sglang import encode as sglang_encode

# every format with the file names it is written as
CASES = [("trtllm", "m.yaml"), ("trtllm", "m.yml"), ("vllm-ascend", "m.json"), ("sglang", "m.json"), ("sglang", "m.pt"),
         ("vllm", "m.pt"), ("vllm", "m.json"), ("native", "m.json")]


def random_placement(rng: np.random.Generator, L: int, E: int, R: int, spr: int, *, colocate: bool = True,
                     layer_ids: tuple[int, ...] = ()) -> Placement:
    """Every expert at least once, the rest random; ``colocate=False``: no expert twice on one rank (needs spr <= E)."""
    S = R * spr
    rows = []
    for _ in range(L):
        if colocate:
            row = np.concatenate([rng.permutation(E), rng.integers(0, E, S - E)])
            rng.shuffle(row)
        else:
            ranks: list[list[int]] = [[] for _ in range(R)]
            for j, e in enumerate(rng.permutation(E).tolist()):  # deal every expert once
                ranks[j % R].append(e)
            for r in ranks:  # fill with experts not yet on this rank
                r.extend(rng.choice(np.setdiff1d(np.arange(E), r), spr - len(r), replace=False).tolist())
                rng.shuffle(r)
            row = np.asarray([e for r in ranks for e in r])
        rows.append(row)
    return Placement(np.stack(rows), E, R, layer_ids=layer_ids)


@st.composite
def placements(draw: st.DrawFn, colocate: bool = True) -> Placement:
    R = draw(st.integers(1, 4))
    E = draw(st.integers(2, 9))
    spr_min = -(-E // R)
    spr = draw(st.integers(spr_min, spr_min + 2))
    if not colocate:
        spr = min(spr, E)  # at most one slot per expert per rank
        if spr * R < E:
            spr = spr_min
    L = draw(st.integers(1, 4))
    ids = tuple(sorted(draw(st.sets(st.integers(0, 60), min_size=L, max_size=L))))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_placement(np.random.default_rng(seed), L, E, R, spr, colocate=colocate, layer_ids=ids)


def _read_back(path: Path, fmt: str, pl: Placement) -> Placement:
    """Read with what the format does not record (model layer ids of positional formats, EP size of sglang)."""
    return read_placement(path, fmt, num_experts=pl.num_experts, ep_size=pl.num_ranks, layer_ids=pl.layer_ids)


@settings(max_examples=25, deadline=None)
@given(pl=placements(colocate=False))
def test_round_trip_every_format(tmp_path_factory: pytest.TempPathFactory, pl: Placement) -> None:
    d = tmp_path_factory.mktemp("rt")
    for fmt, name in CASES:
        path = d / f"{fmt}-{name}"
        assert write_placement(pl, path, fmt) == fmt
        assert detect_map_format(path) == fmt
        back = _read_back(path, fmt, pl)
        assert back == pl, fmt  # same phy2log, sizes, layer ids
        assert back.meta["source_format"] == fmt


@settings(max_examples=25, deadline=None)
@given(pl=placements(colocate=True))
def test_round_trip_with_colocated_replicas(tmp_path_factory: pytest.TempPathFactory, pl: Placement) -> None:
    """All formats but vllm-ascend (which holds one slot per expert per device) keep co-located replicas."""
    d = tmp_path_factory.mktemp("rtc")
    for fmt, name in CASES:
        if fmt == "vllm-ascend":
            continue
        path = d / f"{fmt}-{name}"
        write_placement(pl, path, fmt)
        assert _read_back(path, fmt, pl) == pl


def test_inference_without_hints(tmp_path: Path) -> None:
    """What each format records on its own: sizes, layer ids and provenance."""
    pl = random_placement(np.random.default_rng(0), 3, 6, 2, 4, colocate=False, layer_ids=(3, 5, 9)).with_meta(
        policy="test", trace_digest="abc")
    for fmt, name in CASES:
        path = tmp_path / f"{fmt}-{name}"
        write_placement(pl, path, fmt)
        if fmt == "sglang":
            back = read_placement(path, ep_size=2)
            assert back.layer_ids == tuple(range(10))  # one row per model layer 0..9
            assert back.select_layers([3, 5, 9]).phy2log.tolist() == pl.phy2log.tolist()
            continue
        back = read_placement(path)
        assert back.num_experts == 6 and back.num_ranks == 2 and np.array_equal(back.phy2log, pl.phy2log)
        if fmt == "vllm-ascend":
            assert back.layer_ids == (0, 1, 2) and back.meta["layer_ids_positional"] is True
        else:
            assert back.layer_ids == (3, 5, 9) and back.meta["layer_ids_positional"] is False
        if fmt == "native":
            assert back.meta["policy"] == "test" and back.meta["trace_digest"] == "abc"


def test_num_experts_inferred_as_max_id_plus_one(tmp_path: Path) -> None:
    pl = Placement([[0, 1, 2, 3, 3, 3]], 4, 2)
    write_placement(pl, tmp_path / "a.yaml")
    assert read_placement(tmp_path / "a.yaml").num_experts == 4
    # a larger expert count makes the missing experts an error naming the first one
    with pytest.raises(ValueError, match=r"a\.yaml: layer 0: expert 4 has no slot"):
        read_placement(tmp_path / "a.yaml", num_experts=6)


# --------------------------------------------------------------------------- schemas, field by field
@pytest.fixture
def pl() -> Placement:
    # 2 layers (model ids 1, 3), 6 experts, 3 ranks x 3 slots; no co-located replicas
    return Placement([[0, 1, 2, 3, 4, 0, 5, 1, 2], [5, 4, 3, 2, 1, 0, 0, 3, 4]], 6, 3, layer_ids=(1, 3))


def test_trtllm_schema(tmp_path: Path, pl: Placement) -> None:
    path = tmp_path / "moe_load_balancer.yaml"
    write_placement(pl, path, layer_updates_per_iter=2)
    text = path.read_text()
    # TensorRT-LLM's save_eplb_config: sorted keys, block-style mapping, flow-style lists on one line;
    # exactly the keys its MoeLoadBalancerConfig accepts (the EP size only in a comment, for eplb)
    assert text == (
        "# ep_size: 3 (eplb; TensorRT-LLM reads only the keys below)\n"
        "initial_global_assignments:\n"
        "  1: [0, 1, 2, 3, 4, 0, 5, 1, 2]\n"
        "  3: [5, 4, 3, 2, 1, 0, 0, 3, 4]\n"
        "layer_updates_per_iter: 2\n"
        "num_slots: 9\n"
    )
    cfg = yaml.safe_load(text)
    assert set(cfg) == {"initial_global_assignments", "layer_updates_per_iter", "num_slots"}
    assert cfg["num_slots"] == 9 and cfg["layer_updates_per_iter"] == 2
    assert cfg["initial_global_assignments"] == {1: pl.phy2log[0].tolist(), 3: pl.phy2log[1].tolist()}
    assert read_placement(path) == pl  # eplb reads the EP size back from the comment
    # on request (the report's --projection_eplb_config_path needs it) the key itself
    write_placement(pl, path, layer_updates_per_iter=2, with_ep_size=True)
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {"ep_size", "initial_global_assignments", "layer_updates_per_iter", "num_slots"}
    # rank r holds slots [r*S/ep, (r+1)*S/ep): TensorRT-LLM's report projection reshapes (ep_size, -1)
    rows = np.asarray(cfg["initial_global_assignments"][1]).reshape(cfg["ep_size"], -1)
    assert rows.tolist() == pl.rank_experts()[0].tolist()
    assert read_placement(path) == pl
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "ep_size"}))  # a hand-written file
    assert read_placement(path, ep_size=3) == pl
    # a long map stays one line per layer (width=inf)
    big = Placement(np.tile(np.arange(300) % 256, (1, 1)), 256, 4)
    write_placement(big, tmp_path / "big.yaml")
    lines = (tmp_path / "big.yaml").read_text().splitlines()
    assert re.fullmatch(r"  0: \[0, 1, .*, 43\]", lines[2])


def test_trtllm_reads_extra_llm_api_options(tmp_path: Path, pl: Placement) -> None:
    write_placement(pl, tmp_path / "lb.yaml")
    (tmp_path / "opts.yaml").write_text("enable_attention_dp: true\nmoe_config:\n  backend: WideEP\n  load_balancer: lb.yaml\n")
    assert read_placement(tmp_path / "opts.yaml") == pl
    inline = {"moe_config": {"load_balancer": yaml.safe_load((tmp_path / "lb.yaml").read_text())}}
    (tmp_path / "opts2.yaml").write_text(yaml.safe_dump(inline))
    with pytest.raises(ValueError, match="does not record the EP size"):  # the inline copy lost the comment
        read_placement(tmp_path / "opts2.yaml")
    assert read_placement(tmp_path / "opts2.yaml", ep_size=pl.num_ranks) == pl


def test_vllm_ascend_schema(tmp_path: Path, pl: Placement) -> None:
    path = tmp_path / "expert_map.json"
    write_placement(pl, path, "vllm-ascend")
    obj = json.loads(path.read_text())
    assert path.read_text() == json.dumps(obj, indent=4)  # written like expert_map_record_path (indent=4)
    assert list(obj) == ["moe_layer_count", "layer_list"] and obj["moe_layer_count"] == 2
    for i, layer in enumerate(obj["layer_list"]):
        assert list(layer) == ["layer_id", "device_count", "device_list"]
        assert layer["layer_id"] == i and layer["device_count"] == 3  # 0-based MoE layer index
        for d, dev in enumerate(layer["device_list"]):
            assert list(dev) == ["device_id", "device_expert"] and dev["device_id"] == d
            assert dev["device_expert"] == pl.phy2log[i, 3 * d: 3 * d + 3].tolist()
    # the redundant count vllm-ascend derives: len(device_expert) * device_count - num_experts
    assert len(obj["layer_list"][0]["device_list"][0]["device_expert"]) * 3 - 6 == pl.num_redundant


def test_sglang_schema(tmp_path: Path, pl: Placement) -> None:
    write_placement(pl, tmp_path / "a.json", "sglang")
    obj = json.loads((tmp_path / "a.json").read_text())
    assert list(obj) == ["physical_to_logical_map"]  # SGLang passes the dict as **kwargs to init_by_mapping
    m = np.asarray(obj["physical_to_logical_map"])
    assert m.shape == (4, 9)  # rows are model layers 0..3 (num_hidden_layers), dense rows trivial
    assert m[1].tolist() == pl.phy2log[0].tolist() and m[3].tolist() == pl.phy2log[1].tolist()
    assert m[0].tolist() == m[2].tolist() == (np.arange(9) % 6).tolist()  # SGLang's init_trivial row
    write_placement(pl, tmp_path / "a.pt", "sglang")
    d = torch.load(tmp_path / "a.pt", weights_only=True)
    assert list(d) == ["physical_to_logical_map"] and d["physical_to_logical_map"].dtype == torch.int64
    assert d["physical_to_logical_map"].tolist() == m.tolist()
    # trailing dense layers: num_layers pads further
    assert np.asarray(json.loads(sglang_encode(pl, num_layers=6))["physical_to_logical_map"]).shape == (6, 9)
    with pytest.raises(ValueError, match="num_layers=3 but the placement has layer 3"):
        sglang_encode(pl, num_layers=3)


def test_sglang_logical_count_is_planned_on_read(tmp_path: Path) -> None:
    counts = np.array([[[10, 1, 1, 1], [1, 1, 1, 10]], [[12, 1, 1, 1], [1, 2, 1, 9]]])  # [steps, layers, experts]
    torch.save({"logical_count": torch.tensor(counts), "rank": 0}, tmp_path / "dump.pt")
    assert detect_map_format(tmp_path / "dump.pt") == "sglang"
    with pytest.raises(ValueError, match="planning needs the EP size"):
        read_placement(tmp_path / "dump.pt")
    got = read_placement(tmp_path / "dump.pt", ep_size=2, num_slots=6, policy="deepseek")
    from eplb import plan

    want = plan(counts, 6, 2, policy="deepseek")
    assert np.array_equal(got.phy2log, want.phy2log) and got.logcnt[0, 0] >= 2 and got.logcnt[1, 3] >= 2


def test_vllm_schema(tmp_path: Path, pl: Placement) -> None:
    write_placement(pl, tmp_path / "v.pt", "vllm")
    d = torch.load(tmp_path / "v.pt", weights_only=True)
    assert set(d) == {"physical_to_logical_map", "logical_to_physical_map", "logical_replica_count",
                      "num_logical_experts", "ep_size", "layer_ids"}
    assert d["physical_to_logical_map"].tolist() == pl.phy2log.tolist()
    assert d["logical_replica_count"].tolist() == pl.logcnt.tolist()
    l2p = d["logical_to_physical_map"]
    assert tuple(l2p.shape) == (2, 6, 9 - 6 + 1)  # vLLM: [layers, logical, num_redundant + 1], -1 padded
    for i in range(2):
        for e in range(6):
            slots = sorted(s for s in l2p[i, e].tolist() if s >= 0)
            assert slots == [s for s in range(9) if pl.phy2log[i, s] == e]
    assert d["num_logical_experts"] == 6 and d["ep_size"] == 3 and d["layer_ids"] == [1, 3]
    # a bare tensor (torch.save(eplb_state.physical_to_logical_map)) reads too
    torch.save(torch.tensor(pl.phy2log.tolist()), tmp_path / "bare.pt")
    assert detect_map_format(tmp_path / "bare.pt") == "vllm"
    assert np.array_equal(read_placement(tmp_path / "bare.pt", ep_size=3).phy2log, pl.phy2log)


def test_native_schema(tmp_path: Path, pl: Placement) -> None:
    write_placement(pl.with_meta(policy="p", lower_bound=1.5), tmp_path / "n.json", "native")
    obj = json.loads((tmp_path / "n.json").read_text())
    assert obj["format"] == "eplb.placement" and obj["version"] == 1
    assert (obj["num_experts"], obj["num_ranks"], obj["num_nodes"], obj["num_slots"]) == (6, 3, 1, 9)
    assert obj["layer_ids"] == [1, 3] and obj["phy2log"] == pl.phy2log.tolist()
    assert obj["meta"]["policy"] == "p" and obj["meta"]["lower_bound"] == 1.5
    assert obj["meta"]["placement_digest"] == pl.digest()


def test_registry_lists_every_format() -> None:
    assert set(FORMATS) == {"trtllm", "vllm-ascend", "sglang", "vllm", "native"}
    assert {k for k, v in FORMATS.items() if not v.records_ep_size} == {"sglang"}
