"""``eplb simulate`` and ``eplb capacity`` end to end (builtin real trace, files, errors)."""

import json
import subprocess
import sys

import numpy as np

from eplb.stats.trace import Trace


def run(*args):
    import os

    code = "import sys; from eplb.cli import main; sys.argv = ['eplb'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_simulate_builtin_with_online_and_outputs(tmp_path):
    out = tmp_path / "sim"
    r = run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--num-slots", "136",
            "--policy", "none,deepseek", "--online", "every=16,wait=8,window=32,layer_updates_per_iter=4",
            "--plan-range", "0-64", "--sim-range", "64-128", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "deepseek+online" in r.stdout and "imbalance mean" in r.stdout and "cost model:" in r.stdout
    assert "deepseek: auto dispatch: balanced on 0/" in r.stdout  # decode-sized steps: nothing to gain
    d = json.loads((out / "simulation.json").read_text())
    assert list(d["summary"]) == ["none", "none+online", "deepseek", "deepseek+online"]
    assert d["meta"]["steps"] == 64 and d["meta"]["plan_steps"] == [0, 63] and not d["meta"]["in_sample"]
    assert d["summary"]["deepseek"]["imbalance_mean"] < d["summary"]["none"]["imbalance_mean"]
    for f in ("timeseries.png", "layers.png", "summary.md", "final_placement_deepseek_online.json"):
        assert (out / f).is_file()


def test_simulate_trace_file_placement_and_cost_model(tmp_path):
    rng = np.random.default_rng(0)
    tr = Trace(rng.integers(0, 50, size=(12, 2, 8)), source="synthetic: test")
    tf = tmp_path / "t.safetensors"
    tr.save(tf)
    import eplb

    pl = eplb.plan(tr.counts, 8, 4, policy="deepseek")
    pf = tmp_path / "mine.json"
    pf.write_text(json.dumps(pl.to_dict()))
    from eplb.sim.cost import reference_cost_model

    cm = reference_cost_model().with_(device="my box", other_ms_per_layer=1.0)
    cf = tmp_path / "cm.json"
    cm.save(cf)
    r = run("simulate", str(tf), "--ep-size", "4", "--num-slots", "8", "--placement", str(pf), "--policy", "none",
            "--cost-model", str(cf), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "mine" in r.stdout and "my box" in r.stdout


def test_simulate_trtllm_online_config(tmp_path):
    import yaml

    import eplb
    from eplb.datasets import load_builtin

    tr = load_builtin("llama4_maverick_mmlu_decode")
    pl = eplb.plan(tr.counts[:64], 136, 8, policy="deepseek", layer_ids=tr.layer_ids)
    y = tmp_path / "lb.yaml"
    y.write_text(yaml.safe_dump({"num_slots": 136, "layer_updates_per_iter": 2, "initial_global_assignments":
                                 {int(lid): pl.phy2log[i].tolist() for i, lid in enumerate(tr.layer_ids)}}))
    out = tmp_path / "o"
    r = run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--online-config", str(y),
            "--online", "every=16,wait=8", "--policy", "deepseek", "--online-only", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads((out / "simulation.json").read_text())
    assert list(d["summary"]) == ["online:deepseek"]
    s = d["summary"]["online:deepseek"]
    assert s["num_slots"] == 136 and s["plans"] >= 1
    assert d["meta"]["online"]["layer_updates_per_iter"] == 2 and d["meta"]["online"]["num_iterations_eplb_update"] == 16
    # the run starts from the YAML's assignments: its first steps equal a static replay of them
    from eplb.sim import replay_static

    st = replay_static(tr, pl)
    assert np.allclose(d["series"]["online:deepseek"]["imbalance"][:10], st.imbalance.mean(axis=1)[:10], atol=1e-6)


def test_capacity_cli(tmp_path):
    r = run("capacity", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--target-imbalance", "0.3",
            "--policies", "deepseek", "--max-slots-per-rank", "20", "--json", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["slots_per_rank"] == list(range(16, 21))
    best = d["best"]["deepseek"]
    assert best is not None and best["imbalance"] <= 0.3
    assert (tmp_path / "capacity.png").is_file()


def test_cli_errors_exit_2(tmp_path):
    r = run("simulate", "builtin:nope", "--ep-size", "2")
    assert r.returncode == 2 and "unknown built-in trace" in r.stderr
    r = run("simulate", str(tmp_path / "missing.safetensors"), "--ep-size", "2")
    assert r.returncode == 2 and "missing.safetensors" in r.stderr
    r = run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "3", "--num-slots", "130")
    assert r.returncode == 2 and "num-slots: 130 slots cannot be split evenly over ep-size 3" in r.stderr
    bad = tmp_path / "cm.json"
    bad.write_text("{}")
    r = run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--cost-model", str(bad))
    assert r.returncode == 2 and "missing field 'device'" in r.stderr
    r = run("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--online", "threshold")
    assert r.returncode == 2 and "key=value" in r.stderr
    r = run("capacity", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--held-out", "1.5")
    assert r.returncode == 2 and "held-out" in r.stderr


def test_sim_validate_rebuilds_runtime_ep_configurations(tmp_path):
    """bench/sim_validate.py on the runtime benchmark's CPU results: the rebuilt rank loads match the counted ones."""
    from pathlib import Path

    import pytest

    repo = Path(__file__).resolve().parents[1]
    measured = repo / "bench/results/runtime_ep_cpu.json"
    if not measured.is_file():
        pytest.skip("bench/results/runtime_ep_cpu.json not present")
    d = json.loads(measured.read_text())
    cm = tmp_path / "cm.json"
    cm.write_text(json.dumps({"device": "toy", "date": "2026-01-01", "source": "test",
                              "shape": {"hidden_size": d["hidden"], "moe_intermediate_size": d["intermediate"],
                                        "dtype_bytes": 2},
                              "compute": {"kind": "roofline", "ms_per_token": 0.001}}))
    out = tmp_path / "v.md"
    r = subprocess.run([sys.executable, str(repo / "bench/sim_validate.py"), "--measured", str(measured),
                        "--cost-model", str(cm), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == len(d["results"])
    for row in rows:
        if row["strategy"] == "balanced" or row["placement"] == "identity":
            assert row["busiest_load_err"] == 0.0, row  # the same placement, counts and split as on the devices
        assert row["busiest_load_err"] < 0.1
    assert "| identity |" in out.read_text()


def test_simulate_weight_format_fp8_halves_the_expert_bytes(tmp_path):
    common = ("simulate", "builtin:llama4_maverick_mmlu_decode", "--ep-size", "8", "--num-slots", "136",
              "--policy", "deepseek", "--hidden-size", "7168", "--moe-intermediate-size", "2048", "--no-progress",
              "--sim-range", "0-8", "--no-plots")
    dense = run(*common)
    fp8 = run(*common, "--weight-format", "fp8-block")
    assert dense.returncode == 0 and fp8.returncode == 0, (dense.stderr, fp8.stderr)
    assert "x 2 byte(s) (options): 88,080,384 bytes per expert" in " ".join(dense.stdout.split())
    assert "x FP8 + block scales (options): 44,050,944 bytes per expert" in " ".join(fp8.stdout.split())
    bad = run(*common, "--weight-format", "int4")
    assert bad.returncode == 2 and "expected one of ['dense', 'fp8-block'], got 'int4'" in " ".join(bad.stderr.split())
