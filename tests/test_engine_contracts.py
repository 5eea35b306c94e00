"""Engine round trips that must really load (issue 16): each test encodes one engine's contract
as docs/engines/contracts.md states it (the engine's own loader re-implemented where it is small)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from eplb.cli import app
from eplb.formats import read_placement
from eplb.stats.trace import Trace
from eplb.synthetic import zipf_counts

runner = CliRunner()


def ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def fails(args: list[str], match: str) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code != 0, res.output
    text = f"{res.output}\n{res.exception}"
    import re

    assert re.search(match, text), text
    return text


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SYNTHETIC (Zipf) trace: 12 steps x 3 MoE layers (model ids 1, 3, 5) x 16 experts, top-2."""
    counts = zipf_counts(12, 3, 16, tokens_per_step=64, top_k=2, skew=1.2, seed=7)
    tr = Trace(counts, layer_ids=(1, 3, 5), top_k=2, model="synthetic", source="synthetic: zipf_counts seed 7")
    path = tmp_path_factory.mktemp("trace") / "trace.safetensors"
    tr.save(path)
    return path


# ------------------------------------------------------------------ 1. TensorRT-LLM's loader
def _pydantic_config() -> type:
    """TensorRT-LLM's current ``MoeLoadBalancerConfig``: pydantic, extra fields forbidden, ep_* private."""
    from pydantic import BaseModel, ConfigDict, PrivateAttr

    class MoeLoadBalancerConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num_slots: int | None = None
        initial_global_assignments: dict[int, list[int]] | None = None
        layer_updates_per_iter: int = 0
        _ep_rank: int | None = PrivateAttr(default=None)
        _ep_size: int | None = PrivateAttr(default=None)

    return MoeLoadBalancerConfig


@dataclasses.dataclass
class _DataclassConfig:
    """TensorRT-LLM's older ``MoeLoadBalancerConfig``: a dataclass whose ep_rank / ep_size are not init fields."""

    num_slots: int | None = None
    initial_global_assignments: dict[int, list[int]] | None = None
    layer_updates_per_iter: int = 0
    ep_rank: int | None = dataclasses.field(default=None, init=False)
    ep_size: int | None = dataclasses.field(default=None, init=False)


def _trtllm_load(cls: type, path: Path) -> Any:
    """What TensorRT-LLM does with ``moe_config.load_balancer: <path>``."""
    with open(path) as f:
        return cls(**yaml.safe_load(f))


@pytest.mark.parametrize("cls", [_pydantic_config(), _DataclassConfig], ids=["pydantic", "dataclass"])
def test_trtllm_loads_the_default_yaml(tmp_path: Path, trace_file: Path, cls: type) -> None:
    out = tmp_path / "moe_load_balancer.yaml"
    ok(["plan", str(trace_file), "--ep-size", "4", "--num-slots", "20", "-o", str(out)])
    cfg = _trtllm_load(cls, out)
    pl = read_placement(out)  # eplb still knows the EP size
    assert pl.num_ranks == 4 and cfg.num_slots == 20 and cfg.layer_updates_per_iter == 0
    assert cfg.initial_global_assignments == {lid: pl.phy2log[i].tolist() for i, lid in enumerate(pl.layer_ids)}
    assert sorted(cfg.initial_global_assignments) == [1, 3, 5]
    # the seed's form: flow-style lists, exactly the three keys
    text = out.read_text()
    assert "  1: [" in text and set(yaml.safe_load(text)) == {"num_slots", "initial_global_assignments",
                                                               "layer_updates_per_iter"}
    # ep_size only on request; such a file is rejected by both loader forms, and eplb reads it too
    out2 = tmp_path / "projection.yaml"
    ok(["plan", str(trace_file), "--ep-size", "4", "--num-slots", "20", "-o", str(out2), "--trtllm-ep-size"])
    assert yaml.safe_load(out2.read_text())["ep_size"] == 4
    with pytest.raises((TypeError, ValueError)):
        _trtllm_load(cls, out2)
    assert read_placement(out2) == pl
    # convert writes the serving form by default too
    out3 = tmp_path / "converted.yaml"
    ok(["convert", str(out2), str(out3)])
    _trtllm_load(cls, out3)
    assert read_placement(out3) == pl


# ------------------------------------------------------------------ 2. vLLM: never raise on a layout vLLM accepts
@pytest.mark.parametrize("planner", ["eplb-hierarchical", "deepseek-hierarchical"])
def test_vllm_hierarchical_falls_back_to_global(planner: str) -> None:
    """vLLM's default policy uses the hierarchical algorithm only when num_groups % num_nodes == 0."""
    from eplb.integrations.vllm import make_policy
    from eplb.policies.deepseek import rebalance_experts_hierarchical

    w = np.random.default_rng(0).integers(0, 100, size=(3, 16)).astype(np.int64)
    cls = make_policy(planner)
    for groups in (1, 3):  # 1 group on 2 nodes; 3 groups (not dividing 16) -> 1
        out = np.asarray(cls.rebalance_experts(w, 24, groups, 2, 4, None))
        assert out.shape == (3, 24) and out.dtype == np.int64
        assert all(set(out[i].tolist()) == set(range(16)) for i in range(3))
    if planner == "deepseek-hierarchical":  # the global fallback is DeepSeek's global algorithm exactly
        ref, _, _ = rebalance_experts_hierarchical(w.astype(np.float32), 24, 1, 1, 4)
        assert np.array_equal(np.asarray(cls.rebalance_experts(w, 24, 1, 2, 4, None)), ref)


def test_vllm_policy_never_raises_on_an_accepted_layout(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import eplb.integrations._core as core
    import eplb.integrations.vllm as v
    from eplb.policies.deepseek import rebalance_experts_hierarchical

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("planner bug")

    monkeypatch.setattr(core, "_plan", boom)
    w = np.random.default_rng(1).integers(0, 100, size=(2, 8)).astype(np.int64)
    with caplog.at_level("WARNING", logger="eplb.integrations"):
        out = np.asarray(v.make_policy("eplb").rebalance_experts(w, 12, 1, 1, 4, None))
    ref, _, _ = rebalance_experts_hierarchical(w.astype(np.float32), 12, 1, 1, 4)
    assert np.array_equal(out, ref) and "DeepSeek's global algorithm" in caplog.text
    monkeypatch.undo()
    from eplb.integrations._core import EngineLayoutError

    with pytest.raises(EngineLayoutError):  # a layout vLLM rejects as well: still an error
        v.make_policy("eplb").rebalance_experts(w, 10, 1, 1, 4, None)


def test_vllm_policy_class_pickles_by_reference() -> None:
    import os
    import pickle
    import subprocess
    import sys

    from eplb.integrations.vllm import make_policy

    cases = (("eplb", 0.0), ("deepseek-hierarchical", 0.05), ("eplb-robust", None))
    classes = tuple(make_policy(planner, gain) for planner, gain in cases)
    data = pickle.dumps(classes)
    assert pickle.loads(data) == classes
    # a fresh process (vLLM's workers) resolves the classes by name
    code = "import pickle,sys; print(*[f'{c.planner},{c.min_gain}' for c in pickle.loads(sys.stdin.buffer.read())])"
    res = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert res.stdout.decode().split() == [f"{p},{g}" for p, g in cases]


# ------------------------------------------------------------------ 8. model layer ids
def test_layer_ids_for_traces_in_plan_and_convert(tmp_path: Path) -> None:
    """A plain .npy of DeepSeek-V2-Lite's 26 MoE layers: the YAML must be keyed by model layers 1..26."""
    counts = zipf_counts(4, 26, 64, tokens_per_step=128, top_k=6, skew=1.1, seed=3)  # SYNTHETIC
    npy = tmp_path / "loads.npy"
    np.save(npy, counts)
    out = tmp_path / "lb.yaml"
    ok(["plan", str(npy), "--ep-size", "8", "--num-slots", "72", "--layer-ids", "1-26", "-o", str(out)])
    assert sorted(yaml.safe_load(out.read_text())["initial_global_assignments"]) == list(range(1, 27))
    conv = tmp_path / "loads.safetensors"
    ok(["convert", str(npy), str(conv), "--layer-ids", "1-26"])
    tr = Trace.load(conv)
    assert tr.layer_ids == tuple(range(1, 27)) and np.array_equal(tr.counts, counts)
    # ids of a trace that records them select layers; unknown ones are an error naming both
    sel = tmp_path / "sel.safetensors"
    ok(["convert", str(conv), str(sel), "--layer-ids", "3,5"])
    assert Trace.load(sel).layer_ids == (3, 5)
    assert np.array_equal(Trace.load(sel).counts, counts[:, [2, 4]])
    fails(["plan", str(conv), "--ep-size", "8", "--layer-ids", "0-25", "-o", str(tmp_path / "x.yaml")],
          r"layer-ids: the trace has 26 MoE layers with ids \[1, 2, \.\.\., 26\]; 26 ids given and \[0\]")


# ------------------------------------------------------------------ 10. smaller contracts
@pytest.mark.parametrize("cmd", [["plan", "-o", "x.yaml"], ["evaluate", "--held-out", "0-6:6-12"], ["report"],
                                 ["simulate", "--num-slots", "20"], ["capacity"]])
def test_ep_size_zero_is_an_error(tmp_path: Path, trace_file: Path, cmd: list[str]) -> None:
    args = [cmd[0], str(trace_file), *cmd[1:], "--ep-size", "0"]
    fails(args, r"--ep-size.*greater than or equal to 1")


@pytest.mark.parametrize("policy, valid", [("eplb", "max_replicas"), ("deepseek", "none"),
                                           ("eplb-robust", "max_steps"), ("eplb-dispatch", "alphas")])
def test_mistyped_policy_option_lists_the_valid_ones(trace_file: Path, tmp_path: Path, policy: str, valid: str) -> None:
    text = fails(["plan", str(trace_file), "--ep-size", "4", "--num-slots", "20", "--policy", policy,
                  "-O", "max_replica=4", "-o", str(tmp_path / "x.yaml")],
                 rf"max_replica: policy '{policy}' has no option 'max_replica'; its options: .*{valid}")
    assert "Traceback" not in text and not (tmp_path / "x.yaml").exists()


def test_one_overwrite_rule_for_maps_and_traces(trace_file: Path, tmp_path: Path) -> None:
    yml, tr_out = tmp_path / "lb.yaml", tmp_path / "t.npz"
    plan = ["plan", str(trace_file), "--ep-size", "4", "--num-slots", "20", "-o", str(yml)]
    ok(plan)
    first = yml.read_bytes()
    for args, out in ((plan + ["--policy", "deepseek"], yml), (["convert", str(yml), str(yml)], yml),
                      (["convert", str(trace_file), str(tr_out)], None)):
        if out is None:
            ok(args)
            out = tr_out
        before = out.read_bytes()
        fails(args, rf"output: .*{out.name} already exists \(pass --force to replace it\)")
        assert out.read_bytes() == before
    assert yml.read_bytes() == first
    ok(plan + ["--policy", "deepseek", "--force"])
    assert yml.read_bytes() != first


def test_vllm_ascend_load_array_needs_its_expert_map(tmp_path: Path) -> None:
    """vllm-ascend's moe_load counts tokens per physical slot: without the map they cannot be read."""
    from eplb import plan
    from eplb.formats import write_placement
    from eplb.stats.io import read_trace, write_trace

    counts = zipf_counts(3, 2, 8, tokens_per_step=64, top_k=2, skew=1.3, seed=5)  # SYNTHETIC
    tr = Trace(counts)
    # the summed-load plan (duplicate-free here); on these 3 steps the per-step default keeps one colocated
    # duplicate in layer 0, where every duplicate-free placement is worse than DeepSeek's per step
    pl = plan(counts, 12, 4, policy="eplb", max_replicas=4, window="sum")
    assert pl.colocated_duplicates().sum() == 0
    write_trace(tr, tmp_path / "moe_load.npy", "vllm-ascend", placement=pl)
    write_placement(pl, tmp_path / "expert_map.json", "vllm-ascend")
    with pytest.raises(ValueError, match=r"moe_load\.npy: a vllm-ascend moe_load array counts tokens per physical slot"):
        read_trace(tmp_path / "moe_load.npy", "vllm-ascend")
    fails(["report", str(tmp_path / "moe_load.npy"), "--format", "vllm-ascend", "--ep-size", "4"],
          r"pass the expert map it was recorded with \(--expert-map")
    back = read_trace(tmp_path / "moe_load.npy", "vllm-ascend", expert_map=tmp_path / "expert_map.json")
    assert np.array_equal(back.counts, counts)


def test_out_of_range_expert_blamed_on_its_model_layer(tmp_path: Path) -> None:
    """A vllm-ascend map numbers MoE layers 0..L-1; read for a trace of model layers 1, 3 the bad
    id in its second row is in model layer 3."""
    import json

    dev = lambda d, ex: {"device_id": d, "device_expert": ex}  # noqa: E731
    m = {"moe_layer_count": 2, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [dev(0, [0, 1]), dev(1, [2, 3])]},
        {"layer_id": 1, "device_count": 2, "device_list": [dev(0, [0, 1]), dev(1, [2, 7])]}]}
    (tmp_path / "m.json").write_text(json.dumps(m))
    tr = Trace(zipf_counts(4, 2, 4, tokens_per_step=16, top_k=1, skew=1.0, seed=1), layer_ids=(1, 3))  # SYNTHETIC
    tr.save(tmp_path / "t.safetensors")
    fails(["evaluate", str(tmp_path / "t.safetensors"), "--placement", str(tmp_path / "m.json")],
          r"m\.json: .*layer 3: slot 3 holds expert 7")


# ------------------------------------------------------------------ 4. raw SGLang dumps
GOLDEN = Path(__file__).parent / "golden"


def _esft_passes() -> np.ndarray:
    """REAL routing: DeepSeek-V2-Lite-architecture ESFT-vanilla-lite on the ESFT 'law' samples (one sample =
    one pass), [33 passes, 26 MoE layers = model layers 1..26, 64 experts], top-6 (tests/golden/README.md)."""
    return np.load(GOLDEN / "esft_dsv2lite_law_passes.npz")["counts"].astype(np.int64)


def _sglang_dump(path: Path, passes: np.ndarray, *, buffer: int = 1000, start: int = 0) -> None:
    """SGLang's stat dump of DeepSeek-V2-Lite: [buffer passes, 27 model layers, 64], layer 0 dense (zero),
    unused ring-buffer passes zero, the passes written from row ``start`` on (wrapping)."""
    import torch

    T, L, E = passes.shape
    lc = np.zeros((buffer, L + 1, E), dtype=np.int32)
    rows = (start + np.arange(T)) % buffer
    lc[rows, 1:] = passes
    torch.save({"rank": 0, "logical_count": torch.from_numpy(lc), "average_utilization_rate_over_window": None},
               str(path))


def _flat(obj: Any, key: str = "") -> dict[str, Any]:
    """Nested JSON -> {path: leaf} (numbers compared with approx)."""
    if isinstance(obj, dict):
        return {k2: v for k, x in obj.items() for k2, v in _flat(x, f"{key}.{k}").items()}
    if isinstance(obj, list):
        return {k2: v for i, x in enumerate(obj) for k2, v in _flat(x, f"{key}[{i}]").items()}
    return {key: obj}


def test_raw_sglang_dump_reads_as_its_moe_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eplb.stats.io import read_trace
    from eplb.stats.report import load_table

    passes = _esft_passes()
    monkeypatch.chdir(tmp_path)
    tmp_path = Path(".")
    dump, clean = tmp_path / "dump.pt", tmp_path / "t.safetensors"
    _sglang_dump(dump, passes)
    Trace(passes, layer_ids=tuple(range(1, 27))).save(clean)  # SGLang's dump records no top-k either
    tr = read_trace(dump)
    assert tr.layer_ids == tuple(range(1, 27)) and np.array_equal(tr.counts, passes)
    assert tr.meta["dropped_empty_passes"] == 1000 - 33 and tr.meta["dropped_dense_layers"] == [0]
    ref = load_table(read_trace(clean), 8)
    got = load_table(tr, 8)
    assert got.layer_ids == ref.layer_ids and np.allclose(got.imbalance, ref.imbalance)
    assert got.average[2] > 0.1  # the real imbalance, not diluted by 967 empty passes
    # every command sees the same MoE layers: report, plan (YAML keys 1..26), evaluate
    rep_dump = ok(["report", str(dump), "--ep-size", "8"]).replace("dump.pt", "T")
    rep_clean = ok(["report", str(clean), "--ep-size", "8"]).replace("t.safetensors", "T")
    assert rep_dump == rep_clean
    out = tmp_path / "lb.yaml"
    ok(["plan", str(dump), "--ep-size", "8", "--num-slots", "72", "-o", str(out)])
    assert sorted(yaml.safe_load(out.read_text())["initial_global_assignments"]) == list(range(1, 27))
    import json

    ok(["evaluate", str(dump), "--placement", str(out), "--json", "a.json"])
    ok(["evaluate", str(clean), "--placement", str(out), "--json", "b.json"])
    ev_dump, ev_clean = (json.loads(Path(f).read_text())["evaluations"] for f in ("a.json", "b.json"))
    assert _flat(ev_dump) == pytest.approx(_flat(ev_clean), rel=1e-12)
    conv = tmp_path / "conv.safetensors"
    ok(["convert", str(dump), str(conv)])
    assert Trace.load(conv).layer_ids == tuple(range(1, 27))


def test_wrapped_sglang_buffer_warns_and_all_zero_is_an_error(tmp_path: Path) -> None:
    from eplb.stats.io import read_trace

    passes = _esft_passes()
    full = np.concatenate([passes] * 31)[:1000]  # a filled 1000-pass buffer
    _sglang_dump(tmp_path / "full.pt", full, start=500)
    with pytest.warns(UserWarning, match="may have wrapped"):
        tr = read_trace(tmp_path / "full.pt")
    assert tr.meta["sglang_buffer_wrapped"] is True and tr.num_steps == 1000
    _sglang_dump(tmp_path / "zero.pt", passes[:0])
    with pytest.raises(ValueError, match="logical_count is all zero: no tokens were routed"):
        read_trace(tmp_path / "zero.pt")


def test_all_zero_window_warns(tmp_path: Path) -> None:
    from eplb.offline import evaluate_placement

    c = zipf_counts(8, 2, 8, tokens_per_step=32, top_k=2, skew=1.0, seed=2)  # SYNTHETIC
    c[4:] = 0  # an idle held-out window
    tr = Trace(c, source="idle")
    with pytest.warns(UserWarning, match="idle: the window .* holds no routed tokens"):
        evaluate_placement(tr.slice("4-8"), None, 4)


# ------------------------------------------------------------------ 9. eplb record on real DeepSeek configs
#: the public config.json values of deepseek-ai/DeepSeek-V2-Lite and deepseek-ai/DeepSeek-V3 (no weights)
DEEPSEEK_V2_LITE = {'attention_bias': False, 'attention_dropout': 0.0, 'aux_loss_alpha': 0.001, 'bos_token_id': 100000, 'eos_token_id': 100001, 'first_k_dense_replace': 1, 'hidden_act': 'silu', 'hidden_size': 2048, 'initializer_range': 0.02, 'intermediate_size': 10944, 'kv_lora_rank': 512, 'max_position_embeddings': 163840, 'model_type': 'deepseek_v2', 'moe_intermediate_size': 1408, 'moe_layer_freq': 1, 'n_group': 1, 'n_routed_experts': 64, 'n_shared_experts': 2, 'norm_topk_prob': False, 'num_attention_heads': 16, 'num_experts_per_tok': 6, 'num_hidden_layers': 27, 'num_key_value_heads': 16, 'pretraining_tp': 1, 'q_lora_rank': None, 'qk_nope_head_dim': 128, 'qk_rope_head_dim': 64, 'rms_norm_eps': 1e-06, 'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 0.707, 'mscale_all_dim': 0.707, 'original_max_position_embeddings': 4096, 'type': 'yarn'}, 'rope_theta': 10000, 'routed_scaling_factor': 1.0, 'scoring_func': 'softmax', 'seq_aux': True, 'tie_word_embeddings': False, 'topk_group': 1, 'topk_method': 'greedy', 'use_cache': True, 'v_head_dim': 128, 'vocab_size': 102400}
DEEPSEEK_V3 = {'attention_bias': False, 'attention_dropout': 0.0, 'bos_token_id': 0, 'eos_token_id': 1, 'ep_size': 1, 'first_k_dense_replace': 3, 'hidden_act': 'silu', 'hidden_size': 7168, 'initializer_range': 0.02, 'intermediate_size': 18432, 'kv_lora_rank': 512, 'max_position_embeddings': 163840, 'model_type': 'deepseek_v3', 'moe_intermediate_size': 2048, 'moe_layer_freq': 1, 'n_group': 8, 'n_routed_experts': 256, 'n_shared_experts': 1, 'norm_topk_prob': True, 'num_attention_heads': 128, 'num_experts_per_tok': 8, 'num_hidden_layers': 61, 'num_key_value_heads': 128, 'num_nextn_predict_layers': 1, 'q_lora_rank': 1536, 'qk_nope_head_dim': 128, 'qk_rope_head_dim': 64, 'quantization_config': {'activation_scheme': 'dynamic', 'fmt': 'e4m3', 'quant_method': 'fp8', 'weight_block_size': [128, 128]}, 'rms_norm_eps': 1e-06, 'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0, 'original_max_position_embeddings': 4096, 'type': 'yarn'}, 'rope_theta': 10000, 'routed_scaling_factor': 2.5, 'scoring_func': 'sigmoid', 'tie_word_embeddings': False, 'topk_group': 4, 'topk_method': 'noaux_tc', 'use_cache': True, 'v_head_dim': 128, 'vocab_size': 129280}


@pytest.mark.parametrize("name, cfg, moe_layers", [
    ("DeepSeek-V2-Lite", DEEPSEEK_V2_LITE, list(range(1, 27))),
    # every value of the real file but the depth (5 layers instead of 61: 2 MoE layers of 256 experts) for CI time
    ("DeepSeek-V3", {**DEEPSEEK_V3, "num_hidden_layers": 5}, [3, 4]),
])
def test_record_on_real_deepseek_configs(tmp_path: Path, name: str, cfg: dict[str, Any], moe_layers: list[int]) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "prompts.txt").write_text("the quick brown fox\njumps over the lazy dog\n")
    out = tmp_path / "t.safetensors"
    ok(["record", "--model", str(tmp_path / "config.json"), "--dataset", str(tmp_path / "prompts.txt"), "-o", str(out),
        "-q", "--max-tokens", "8"])
    tr = Trace.load(out)
    assert list(tr.layer_ids) == moe_layers and tr.num_experts == cfg["n_routed_experts"]
    # every token of every MoE layer is routed to top-k experts: equal per-layer totals, a multiple of k
    per_layer = tr.counts.sum(-1)
    assert np.all(per_layer == per_layer[:, :1]) and np.all(per_layer % cfg["num_experts_per_tok"] == 0)


def test_validate_says_an_sglang_dump_is_no_map(tmp_path: Path) -> None:
    _sglang_dump(tmp_path / "dump.pt", _esft_passes())
    text = fails(["validate", str(tmp_path / "dump.pt"), "--ep-size", "8"],
                 r"dump\.pt: holds load counts \(SGLang 'logical_count': an expert-distribution dump / trace\), "
                 r"not a placement map")
    assert "OK" not in text


def test_simulator_takes_the_expert_size_from_the_trace_or_options(tmp_path: Path) -> None:
    from eplb.sim.cost import expert_shape

    assert expert_shape("deepseek-ai/DeepSeek-V2-Lite") == ({"hidden_size": 2048, "moe_intermediate_size": 1408},
                                                            "the public config of deepseek-ai/DeepSeek-V2-Lite")
    assert expert_shape("Qwen/Qwen3-30B-A3B", {"hidden_size": 64})[0] == {"hidden_size": 64,
                                                                          "moe_intermediate_size": 768}
    assert expert_shape("x", {}, dtype_bytes=1)[0] == {"dtype_bytes": 1}
    assert expert_shape("unknown-model") == ({}, "")
    tr = Trace(_esft_passes()[:8], layer_ids=tuple(range(1, 27)), top_k=6, model="deepseek-ai/DeepSeek-V2-Lite")
    tr.save(tmp_path / "t.safetensors")
    base = ["simulate", str(tmp_path / "t.safetensors"), "--ep-size", "8", "--num-slots", "72", "--no-progress",
            "--policy", "deepseek"]
    assert "expert size: hidden 2048 x intermediate 1408 x 2 byte(s) (the public config" in " ".join(ok(base).split())
    text = " ".join(ok([*base, "--hidden-size", "4096", "--dtype-bytes", "1"]).split())
    assert "expert size: hidden 4096 x intermediate 1408 x 1 byte(s) (options, the public config" in text


# ------------------------------------------------------------------ 5. vllm-ascend options per version
def test_vllm_ascend_serving_options_per_version(trace_file: Path, tmp_path: Path) -> None:
    import json
    import re

    from eplb.runtime.manager import BalancerConfig

    out = tmp_path / "expert_map.json"
    text = ok(["plan", str(trace_file), "--ep-size", "4", "--num-slots", "20", "-O", "max_replicas=4",
               "-o", str(out), "--format", "vllm-ascend"])
    lines = dict(re.findall(r"serve with vllm-ascend (<= v0\.13|>= v0\.18): --additional-config '(.*)'", text))
    old, new = json.loads(lines["<= v0.13"]), json.loads(lines[">= v0.18"])
    assert old == {"expert_map_path": str(out.resolve()), "init_redundancy_expert": 4}
    # v0.18 on reads only additional_config["eplb_config"]: nothing at the top level
    assert new == {"eplb_config": {"expert_map_path": str(out.resolve()), "num_redundant_experts": 4}}
    # the slot count the file holds matches the redundant count (else v0.18 fails: capacity mismatch)
    m = json.loads(out.read_text())
    per_dev = {len(d["device_expert"]) for ly in m["layer_list"] for d in ly["device_list"]}
    assert per_dev == {5} and 4 * 5 - 16 == new["eplb_config"]["num_redundant_experts"]
    # eplb's online balancer reads both forms
    for cfg in (old, new):
        c = BalancerConfig.from_dict(cfg)
        assert c.expert_map_path == str(out.resolve()) and c.num_redundant_experts == 4


# ------------------------------------------------------------------ 3. group-limited routing
def _nodes_per_group(phy2log: np.ndarray, num_groups: int, num_nodes: int, num_experts: int) -> np.ndarray:
    """[L, G] number of nodes holding some replica of some expert of each group."""
    L, S = phy2log.shape
    node = np.arange(S) // (S // num_nodes)
    gs = num_experts // num_groups
    out = np.zeros((L, num_groups), dtype=np.int64)
    for layer in range(L):
        for g in range(num_groups):
            out[layer, g] = len(set(node[(phy2log[layer] // gs) == g].tolist()))
    return out


def test_group_limited_default_keeps_groups_on_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 groups on 4 nodes (DeepSeek-V3-like grouping, SYNTHETIC Zipf loads): vLLM's default keeps each group on
    one node; so must eplb's default, in the CLI and in the vLLM plug-in; --policy eplb spreads them."""
    from eplb.integrations.vllm import make_policy

    c = zipf_counts(6, 3, 64, tokens_per_step=512, top_k=8, skew=1.2, seed=4)
    tr = Trace(c, layer_ids=(3, 4, 5), top_k=8)
    tr.save(tmp_path / "t.safetensors")
    args = ["plan", str(tmp_path / "t.safetensors"), "--ep-size", "16", "--num-slots", "80", "--num-nodes", "4",
            "--num-groups", "8", "--format", "native"]
    ok([*args, "-o", str(tmp_path / "a.json")])
    a = read_placement(tmp_path / "a.json")
    assert a.meta["policy"] == "eplb-hierarchical"
    assert np.all(_nodes_per_group(a.phy2log, 8, 4, 64) == 1)
    ok([*args, "-o", str(tmp_path / "b.json"), "--policy", "eplb"])  # the explicit trade-off: better token balance
    b = read_placement(tmp_path / "b.json")
    assert _nodes_per_group(b.phy2log, 8, 4, 64).mean() > 1
    # the vLLM plug-in: same rule (EPLB_VLLM_GROUP_LIMITED=0 spreads)
    cls = make_policy("eplb")
    v = np.asarray(cls.rebalance_experts(c.sum(0), 80, 8, 4, 16, None))
    assert np.all(_nodes_per_group(v, 8, 4, 64) == 1)
    monkeypatch.setenv("EPLB_VLLM_GROUP_LIMITED", "0")
    v0 = np.asarray(cls.rebalance_experts(c.sum(0), 80, 8, 4, 16, None))
    assert _nodes_per_group(v0, 8, 4, 64).mean() > 1
    # evaluate shows ranks and nodes per token (expected from counts here: the trace has no top-k ids)
    text = ok(["evaluate", str(tmp_path / "t.safetensors"), "--placement", str(tmp_path / "a.json")])
    assert re.search(r"map a\.json: [\d.]+ ranks and [\d.]+ nodes per token \(expected from counts", text)
    rep = ok(["report", str(tmp_path / "t.safetensors"), "--placement", str(tmp_path / "a.json")])
    assert re.search(r"\(a\.json\): [\d.]+ ranks and [\d.]+ nodes per token \(expected from counts", rep)


def test_fanout_per_token_exact_with_topk_ids() -> None:
    from eplb import Placement
    from eplb.metrics import fanout_per_token

    # 4 experts, 2 ranks on 2 nodes, experts 0 and 2 on both ranks
    pl = Placement([[0, 1, 2, 0, 3, 2]], 4, 2, 2)
    ids = np.array([[[0, 1]], [[1, 2]], [[3, 2]]])  # [N=3, L=1, k=2]
    fan = fanout_per_token(pl, topk_ids=ids)
    # token 0: expert 1 on rank 0, expert 0 on rank 0 or 1 (1/2): 1.5 ranks; token 1: experts 1 (r0), 2 (r0 or r1): 1.5
    # token 2: expert 3 on rank 1, expert 2 on r0 or r1: 1.5
    assert fan["method"] == "topk_ids" and fan["ranks"].tolist() == [1.5] and fan["nodes"].tolist() == [1.5]
