"""Simulator replay of per-step replication and the CLI options (--dynamic-slots, --transfer-budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eplb import Placement
from eplb.dispatch.replication import plan_replication, static_holdings
from eplb.metrics import imbalance_ratio
from eplb.sim.cost import default_cost_model
from eplb.sim.replication import copy_ms, replay_replicated, replication_caps


def _setup():
    rng = np.random.default_rng(0)
    pl = Placement(np.stack([rng.permutation(8), rng.permutation(8)]), num_experts=8, num_ranks=4)
    counts = rng.integers(0, 20, (6, 2, 8))
    counts[:, :, 0] += 60  # a hot expert
    return pl, counts


def test_replay_matches_planner_and_prices_copies() -> None:
    pl, counts = _setup()
    cm = default_cost_model()
    one = copy_ms(cm)
    assert one == pytest.approx(cm.expert_bytes / (cm.p2p_gbps * 1e6))
    assert replication_caps(cm, 2, 4, None) == (2, 8)
    assert replication_caps(cm, 2, 4, 1.5 * one) == (1, 1)
    r = replay_replicated(counts, pl, dynamic_slots=2, transfer_budget_ms=2.5 * one, hide_ms=0.0, cost=cm)
    ref = plan_replication(counts, static_holdings(pl), 2, max_recv=2, max_send=2)
    assert np.allclose(r.imbalance, imbalance_ratio(ref.rank_loads))
    rep = r.meta["replication"]
    assert rep["max_recv"] == 2 and rep["max_send"] == 2
    assert rep["copies_per_layer_mean"] == pytest.approx(ref.copies.mean())
    # hide window 0: every copy is exposed and added to the step
    used = (ref.dyn_expert >= 0).sum(-1)
    sent = (ref.dyn_source[..., None] == np.arange(4)).sum((-3, -2))
    exposed = (np.maximum(used, sent).max(-1) * one).sum(-1)
    assert np.allclose(r.migration_ms, exposed) and exposed.sum() > 0
    assert rep["exposed_layers"] == int((np.maximum(used, sent).max(-1) > 0).sum())
    assert np.all(r.step_ms >= r.compute_ms + r.comm_ms + r.migration_ms - 1e-9)
    assert int(r.bytes_moved.sum()) == int(ref.copies.sum()) * cm.expert_bytes
    # a window as long as the budget hides them all; D = 0 moves nothing
    hid = replay_replicated(counts, pl, dynamic_slots=2, transfer_budget_ms=2.5 * one, cost=cm)
    assert hid.meta["replication"]["exposed_layers"] == 0 and hid.migration_ms.sum() == 0
    d0 = replay_replicated(counts, pl, dynamic_slots=0, cost=cm)
    assert d0.bytes_moved.sum() == 0 and d0.imbalance.mean() > r.imbalance.mean()
    la = replay_replicated(counts, pl, dynamic_slots=2, cost=cm, lookahead=True)
    assert la.imbalance.shape == r.imbalance.shape
    with pytest.raises(ValueError, match="transfer-budget"):
        replay_replicated(counts, pl, dynamic_slots=1, transfer_budget_ms=-1.0)
    with pytest.raises(ValueError, match="dynamic-slots"):
        replay_replicated(counts, pl, dynamic_slots=-1)


def _run(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from eplb.cli import main; sys.argv = ['eplb'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_simulate_and_evaluate_dynamic_slots(tmp_path) -> None:
    out = tmp_path / "sim"
    r = _run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--num-slots", "136",
             "--policy", "deepseek", "--plan-range", "0-64", "--sim-range", "64-80", "--dynamic-slots", "1,2",
             "--transfer-budget", "3.0", "--out", str(out), "--no-progress", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "deepseek+D1" in r.stdout and "could not hide" in r.stdout
    d = json.loads((out / "simulation.json").read_text())
    assert list(d["summary"]) == ["deepseek", "deepseek+D1", "deepseek+D2"]
    assert d["summary"]["deepseek+D2"]["imbalance_mean"] < d["summary"]["deepseek"]["imbalance_mean"]
    js = tmp_path / "ev.json"
    r = _run("evaluate", "builtin:llama4_maverick_mmlu_decode", "--held-out", "0-64:64-80", "--ep-size", "8",
             "--num-slots", "136", "--policy", "deepseek", "--dynamic-slots", "2", "--transfer-budget", "3.0",
             "--no-per-layer", "--no-dispatch", "--json", str(js))
    assert r.returncode == 0, r.stderr
    assert "Per-step replication" in r.stdout
    ev = json.loads(js.read_text())["evaluations"]
    rep = [e["replication"] for e in ev if "replication" in e]
    # Llama-4 Maverick experts (5120 x 8192 bf16, 252 MB) take about 1.3 ms each: 2 copies fit in 3 ms
    assert rep and rep[0][0]["dynamic_slots"] == 2 and rep[0][0]["max_recv"] == 2 and rep[0][0]["max_send"] == 2
    assert rep[0][0]["imbalance"] < ev[1]["imbalance"]
    bad = _run("evaluate", "builtin:llama4_maverick_mmlu_decode", "--held-out", "0-64:64-80", "--ep-size", "8",
               "--num-slots", "136", "--dynamic-slots", "x")
    assert bad.returncode != 0 and "dynamic-slots" in (bad.stderr + bad.stdout)
    bad = _run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--transfer-budget", "1.0")
    assert bad.returncode != 0 and "dynamic-slots" in (bad.stderr + bad.stdout)
