"""`eplb convert` on traces: vllm-ascend per-slot load arrays through an expert map, iter-range slicing."""

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from eplb import Trace
from eplb.cli import app


def test_convert_vllm_ascend_load_array_with_expert_map(tmp_path: Path) -> None:
    emap = {"moe_layer_count": 1, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [0, 1, 2]},
                                                           {"device_id": 1, "device_expert": [3, 4, 0]}]}]}
    (tmp_path / "map.json").write_text(json.dumps(emap))
    np.save(tmp_path / "moe_load.npy", np.array([[[5, 1, 2], [3, 4, 6]]]))  # [L, D, slots per device]
    out = tmp_path / "trace.safetensors"
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "moe_load.npy"), str(out), "--from", "vllm-ascend",
                                 "--expert-map", str(tmp_path / "map.json")])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(Trace.load(out).counts, [[[11, 1, 2, 3, 4]]])  # expert 0 = 5 + 6 (two slots)


def test_convert_trace_iter_range(tmp_path: Path) -> None:
    out = tmp_path / "part.npz"
    r = CliRunner().invoke(app, ["convert", "builtin:llama4_maverick_mmlu_decode", str(out), "--iter-range", "10-20"])
    assert r.exit_code == 0, r.output
    from eplb.datasets import load_builtin
    from eplb.stats.io import read_trace

    np.testing.assert_array_equal(read_trace(out).counts, load_builtin("llama4_maverick_mmlu_decode").counts[10:20])


def test_convert_iter_range_refused_for_maps(tmp_path: Path) -> None:
    src = tmp_path / "m.json"
    src.write_text(json.dumps({"format": "eplb.placement", "num_experts": 2, "num_ranks": 1, "phy2log": [[0, 1]]}))
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.yaml"), "--iter-range", "0-4"])
    assert r.exit_code != 0 and "iter-range: only used when converting traces" in str(r.exception)
