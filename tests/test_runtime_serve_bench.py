"""``eplb serve-bench``: single rank through the CLI, two gloo ranks through serve_bench(), bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from eplb.cli import app
from eplb.runtime.serve_bench import serve_bench
from eplb.runtime.testing import run_distributed

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_single_rank_with_synthetic_trace_and_policy(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["serve-bench", "--model", "tiny-olmoe", "--steps", "3", "--warmup", "1",
                                   "--batch", "4", "--trace", "synthetic:zipf", "--policy", "deepseek",
                                   "--num-slots", "10", "--strategy", "round-robin", "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "tokens/s" in res.output and "SYNTHETIC" in res.output
    d = json.loads(out.read_text())
    assert d["num_slots"] == 10 and d["ep_size"] == 1 and len(d["step_ms"]) == 3
    # 3 timed steps x 4 tokens x top-2 x 2 MoE layers
    assert d["rank_pairs"] == [3 * 4 * 2 * 2]


def test_cli_bad_arguments():
    r = CliRunner().invoke(app, ["serve-bench", "--model", "tiny-mixtral", "--ep-size", "2", "--steps", "1"])
    assert r.exit_code != 0 and "does not match the world size 1" in str(r.exception)
    r = CliRunner().invoke(app, ["serve-bench", "--model", "tiny-mixtral", "--policy", "deepseek", "--steps", "1"])
    assert r.exit_code != 0 and "needs a trace" in str(r.exception)
    # the real Llama-4 trace has 128 experts; the tiny model 8
    r = CliRunner().invoke(app, ["serve-bench", "--model", "tiny-mixtral", "--trace",
                                 "llama4_maverick_mmlu_decode", "--steps", "1"])
    assert r.exit_code != 0 and "128 experts" in str(r.exception)


def _two_rank_worker(rank: int, world: int) -> dict:
    counts = np.zeros((4, 2, 8), dtype=np.int64)
    counts[:, :, 0] = 60  # expert 0 is hot (a real-looking skew)
    counts[:, :, 1:] = 10
    out = {}
    for strategy in ("local-first", "balanced"):
        from eplb.policies import plan

        pl = plan(counts, 10, world, policy="deepseek", layer_ids=[1, 2])
        res = serve_bench("tiny-deepseek-v2", ep_size=world, placement=pl, trace=counts, strategy=strategy,
                          steps=4, warmup=1, batch=6)
        out[strategy] = res.to_dict()
    return out


def test_serve_bench_two_ranks_trace_routing():
    res = run_distributed(_two_rank_worker, 2, timeout_s=80)
    assert res[0]["balanced"]["rank_pairs"] == res[1]["balanced"]["rank_pairs"]
    for strategy in ("local-first", "balanced"):
        d = res[0][strategy]
        assert sum(d["rank_pairs"]) == 4 * 6 * 2 * 2 * 2  # steps x batch x ranks x top-2 x MoE layers
    # the balanced split evens out the ranks exactly here
    assert res[0]["balanced"]["imbalance"] <= res[0]["local-first"]["imbalance"]
