"""TensorRT-LLM helpers and the documented record -> plan -> serve flow (docs/engines/trtllm.md), without TensorRT-LLM.

The "recording" is the shipped REAL Llama-4-Maverick decode trace written in TensorRT-LLM's dump
layout (meta_info.json + rank{R}.safetensors) by eplb's writer; everything after that runs the
documented commands on it.
"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from eplb.cli import app
from eplb.datasets import load_builtin
from eplb.formats import read_placement
from eplb.integrations import trtllm
from eplb.stats.importers import write_trtllm


def test_statistic_env():
    env = trtllm.statistic_env("./expert_statistic", "100-200")
    assert env == {"EXPERT_STATISTIC_PATH": "./expert_statistic", "EXPERT_STATISTIC_ITER_RANGE": "100-200"}
    with pytest.raises(ValueError, match="iter_range"):
        trtllm.statistic_env("x", "200-100")
    with pytest.raises(ValueError, match="iter_range"):
        trtllm.statistic_env("x", "abc")


def test_llm_api_options_without_balancer():
    opts = trtllm.llm_api_options(max_batch_size=256, ep_size=36)
    assert opts == {"enable_attention_dp": True, "cuda_graph_config": {},
                    "moe_config": {"backend": "WideEP", "max_num_tokens": 9216}}
    assert trtllm.suggested_max_num_tokens(256, 36) == 9216
    with pytest.raises(ValueError, match="max_num_tokens"):
        trtllm.llm_api_options(max_num_tokens=0)


def test_documented_flow(tmp_path):
    trace = load_builtin("llama4_maverick_mmlu_decode")
    stat = tmp_path / "expert_statistic"
    write_trtllm(trace, stat, ep_size=8)  # what EXPERT_STATISTIC_PATH holds after a run on 8 ranks
    back = trtllm.read_statistics(stat)
    assert back.counts.shape == trace.counts.shape and back.ep_size == 8 and back.layer_ids == trace.layer_ids
    run = CliRunner()
    res = run.invoke(app, ["report", str(stat), "-q"])
    assert res.exit_code == 0, res.output
    assert "average" in res.stdout
    lb = tmp_path / "moe_load_balancer.yaml"
    res = run.invoke(app, ["plan", str(stat), "--ep-size", "16", "--num-slots", "144", "--output", str(lb)])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(lb.read_text())
    assert doc["num_slots"] == 144 and set(doc["initial_global_assignments"]) == set(trace.layer_ids)
    opts_path = trtllm.write_llm_api_options(tmp_path / "extra_llm_api_options_eplb.yaml", lb, max_batch_size=256,
                                             ep_size=16)
    opts = yaml.safe_load(opts_path.read_text())
    assert opts["moe_config"] == {"backend": "WideEP", "max_num_tokens": 4096, "load_balancer": str(lb)}
    with pytest.raises(ValueError, match="ep_size"):
        trtllm.llm_api_options(lb, ep_size=32)
    # verification run: the projection of the new placement on the recorded loads
    res = run.invoke(app, ["report", str(stat), "-q", "--placement", str(lb)])
    assert res.exit_code == 0, res.output
    p = read_placement(lb)
    assert p.num_ranks == 16 and p.num_slots == 144
