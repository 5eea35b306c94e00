"""CLI of the offline flow: plan, validate, convert, evaluate (typer's CliRunner, main() and the console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from eplb import Placement, plan
from eplb.cli import app, main
from eplb.formats import read_placement, write_placement
from eplb.stats.report import load_table
from eplb.stats.trace import Trace
from eplb.synthetic import zipf_counts

runner = CliRunner()


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SYNTHETIC trace (Zipf-skewed routing): 12 steps x 3 MoE layers (model ids 1, 3, 5) x 16 experts."""
    counts = zipf_counts(12, 3, 16, tokens_per_step=64, top_k=2, skew=1.2, seed=7)
    tr = Trace(counts, layer_ids=(1, 3, 5), top_k=2, model="synthetic", source="synthetic: zipf_counts seed 7")
    path = tmp_path_factory.mktemp("trace") / "trace.safetensors"
    tr.save(path)
    return path


def ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def fails(args: list[str], match: str) -> None:
    """The command raises a ValueError whose message matches (main() turns it into exit code 2)."""
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert isinstance(res.exception, ValueError), (res.output, res.exception)
    import re

    assert re.search(match, str(res.exception)), str(res.exception)


# ------------------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize("fmt, name", [("trtllm", "lb.yaml"), ("vllm-ascend", "m.json"), ("sglang", "s.json"),
                                       ("sglang", "s.pt"), ("vllm", "v.pt"), ("native", "n.json")])
def test_plan_writes_each_format(tmp_path: Path, trace_file: Path, fmt: str, name: str) -> None:
    out = tmp_path / name
    S = 16 if fmt == "vllm-ascend" else 20  # vllm-ascend: one slot per expert per device; no replicas, no clash
    text = ok(["plan", str(trace_file), "--ep-size", "4", "--num-slots", str(S), "--policy", "deepseek-global",
               "-o", str(out), "--format", fmt])
    assert f"wrote {out} ({fmt})" in text
    tr = Trace.load(trace_file)
    want = plan(tr.counts, S, 4, policy="deepseek-global", layer_ids=tr.layer_ids)
    got = read_placement(out, num_experts=16, ep_size=4, layer_ids=tr.layer_ids)
    assert np.array_equal(got.phy2log, want.phy2log) and got.layer_ids == (1, 3, 5)


def test_plan_provenance_in_native(tmp_path: Path, trace_file: Path) -> None:
    out = tmp_path / "n.json"
    ok(["plan", str(trace_file), "--ep-size", "4", "--num-slots", "20", "--iter-range", "2-10", "-o", str(out),
        "-f", "native", "--policy", "deepseek"])
    meta = json.loads(out.read_text())["meta"]
    tr = Trace.load(trace_file, "2-10")
    assert meta["trace_digest"] == tr.digest() and meta["trace"] == str(trace_file)
    assert meta["policy"] == "deepseek" and meta["iter_range"] == "2-10" and meta["num_steps"] == 8
    assert meta["num_groups"] == 1 and meta["layer_updates_per_iter"] == 0
    from eplb.metrics import lower_bound, optimality_gap

    pl = read_placement(out)
    assert pl.phy2log.tolist() == plan(tr.counts, 20, 4, policy="deepseek").phy2log.tolist()  # planned on steps 2-9 only
    assert meta["lower_bound"] == pytest.approx(float(np.mean(lower_bound(tr.counts, 20, 4))), abs=1e-4)
    assert meta["optimality_gap"] == pytest.approx(float(np.mean(optimality_gap(tr.counts, pl))), abs=1e-6)
    assert meta["in_sample_imbalance"] == pytest.approx(load_table(tr, 4, pl).average[2], abs=1e-6)


def test_plan_trtllm_yaml_and_builtin(tmp_path: Path) -> None:
    out = tmp_path / "moe_load_balancer.yaml"
    text = ok(["plan", "builtin:qwen3_30b_sglang", "--ep-size", "8", "--num-slots", "136", "-o", str(out),
               "--layer-updates-per-iter", "2", "--policy", "deepseek"])
    assert "imbalance" in text and "lower bound" in text
    import yaml

    cfg = yaml.safe_load(out.read_text())
    assert cfg["num_slots"] == 136 and "ep_size" not in cfg and cfg["layer_updates_per_iter"] == 2
    assert sorted(cfg["initial_global_assignments"]) == list(range(48))


@pytest.mark.parametrize("extra, match", [
    (["--num-slots", "18"], r"num-slots: 18 slots cannot be split evenly over ep-size 4 ranks \(try 20\)"),
    (["--num-slots", "12"], r"num-slots: 12 slots cannot hold the trace's 16 experts"),
    (["--num-slots", "20", "--num-nodes", "3"], r"num-nodes: ep-size 4 ranks cannot be split evenly over 3 nodes"),
    (["--num-slots", "20", "--policy", "nope"], r"policy: unknown policy 'nope'"),
    (["--num-slots", "20", "--iter-range", "9-3"], r"iter-range: stop \(3\) must be greater than start \(9\)"),
    (["--num-slots", "20", "--iter-range", "50-60"], r"iter-range: no steps in 50-60"),
    (["--num-slots", "20", "--format", "foo"], r"format: unknown format 'foo'"),
])
def test_plan_bad_input_writes_nothing(tmp_path: Path, trace_file: Path, extra: list[str], match: str) -> None:
    out = tmp_path / "lb.yaml"
    fails(["plan", str(trace_file), "--ep-size", "4", "-o", str(out), *extra], match)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_plan_output_name_and_trace_errors(tmp_path: Path, trace_file: Path) -> None:
    fails(["plan", str(trace_file), "--ep-size", "4", "-o", str(tmp_path / "x.json")], r"\.json is used by several formats")
    fails(["plan", str(tmp_path / "missing.safetensors"), "--ep-size", "4", "-o", str(tmp_path / "x.yaml")],
          r"no such file or directory")
    fails(["plan", str(trace_file), "-o", str(tmp_path / "x.yaml")], r"ep-size: the trace does not record an EP size")
    fails(["plan", "builtin:nope", "--ep-size", "4", "-o", str(tmp_path / "x.yaml")], r"unknown built-in trace 'nope'")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- validate
def test_validate(tmp_path: Path, trace_file: Path) -> None:
    pl = Placement(np.tile(np.arange(20) % 16, (3, 1)), 16, 4, layer_ids=(1, 3, 5))
    write_placement(pl, tmp_path / "m.yaml")
    text = ok(["validate", str(tmp_path / "m.yaml"), "--trace", str(trace_file)])
    assert text.startswith(f"OK {tmp_path / 'm.yaml'} (trtllm): 3 layers (ids 1..5 step 2), 16 experts, 20 slots over 4 ranks")
    write_placement(pl, tmp_path / "s.json", "sglang")
    text = ok(["validate", str(tmp_path / "s.json")])
    assert "does not record the EP size" in text and "20 slots" in text
    assert "5 per rank" in ok(["validate", str(tmp_path / "s.json"), "--ep-size", "4"])
    fails(["validate", str(tmp_path / "s.json"), "--ep-size", "3"], r"20 slots per layer are not divisible by ep_size=3")
    fails(["validate", str(tmp_path / "m.yaml"), "--ep-size", "5"], r"ep_size is 4 in the file, expected 5")
    fails(["validate", str(tmp_path / "m.yaml"), "--num-experts", "18"], r"layer 1: expert 16 has no slot")
    # a map whose expert count does not match the trace
    small = Placement(np.tile(np.arange(8), (3, 1)), 8, 4, layer_ids=(1, 3, 5))
    write_placement(small, tmp_path / "small.yaml")
    fails(["validate", str(tmp_path / "small.yaml"), "--trace", str(trace_file)], r"small\.yaml: does not fit trace .* \(16 experts, 8 in the map\)")
    other = Placement(np.tile(np.arange(16), (2, 1)), 16, 4, layer_ids=(1, 7))
    write_placement(other, tmp_path / "other.yaml")
    fails(["validate", str(tmp_path / "other.yaml"), "--trace", str(trace_file)], r"other\.yaml: does not fit trace .*: placement: no row for trace layer\(s\) \[3, 5\]")


# -------------------------------------------------------------------------------------------- convert
def test_convert_chain_through_every_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(3):  # 4 ranks x 5 slots, no expert twice on a rank (vllm-ascend needs that)
        perm = rng.permutation(16)
        ranks = [[*perm[4 * r: 4 * r + 4], perm[(4 * r + 4) % 16]] for r in range(4)]
        rows.append([int(e) for r in ranks for e in rng.permutation(r)])
    pl = Placement(rows, 16, 4, layer_ids=(1, 3, 5))
    a = tmp_path / "a.yaml"
    write_placement(pl, a)
    ok(["convert", str(a), str(tmp_path / "b.json"), "--to", "vllm-ascend"])
    text = ok(["convert", str(tmp_path / "b.json"), str(tmp_path / "c.yaml")])
    assert "numbers MoE layers 0..2" in text  # positional rows: the user is told to pass --layer-ids
    ok(["convert", str(tmp_path / "b.json"), str(tmp_path / "c.pt"), "--to", "vllm", "--layer-ids", "1-5:2"])
    ok(["convert", str(tmp_path / "c.pt"), str(tmp_path / "d.json"), "--to", "sglang", "--num-layers", "8"])
    ok(["convert", str(tmp_path / "d.json"), str(tmp_path / "e.json"), "--to", "native", "--ep-size", "4",
        "--layer-ids", "1,3,5"])
    ok(["convert", str(tmp_path / "e.json"), str(tmp_path / "f.yml")])
    assert read_placement(tmp_path / "f.yml") == pl
    assert read_placement(tmp_path / "c.yaml").layer_ids == (0, 1, 2)
    assert len(json.loads((tmp_path / "d.json").read_text())["physical_to_logical_map"]) == 8
    fails(["convert", str(tmp_path / "d.json"), str(tmp_path / "g.yaml")], r"does not record the EP size")
    fails(["convert", str(a), str(tmp_path / "h.json")], r"\.json is used by several formats")
    fails(["convert", str(a), str(tmp_path / "h.json"), "--to", "vllm-ascend", "--num-layers", "3"],
          r"num-layers: only used by the sglang format")
    assert not (tmp_path / "h.json").exists() and not (tmp_path / "g.yaml").exists()


def test_convert_delegates_traces(tmp_path: Path, trace_file: Path) -> None:
    ok(["convert", str(trace_file), str(tmp_path / "t.npz")])
    from eplb.stats.importers import read_trace

    back = read_trace(tmp_path / "t.npz")
    assert np.array_equal(back.counts, Trace.load(trace_file).counts)
    ok(["convert", "builtin:qwen3_30b_sglang", str(tmp_path / "q.pt"), "--to", "sglang"])
    # SGLang's stat dump holds logical_count: as a map it is planned on read
    pl = read_placement(tmp_path / "q.pt", ep_size=8, num_slots=136, policy="deepseek")
    assert pl.num_slots == 136 and pl.num_layers == 48


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_numbers_match_the_report(tmp_path: Path, trace_file: Path) -> None:
    tr = Trace.load(trace_file)
    pl = plan(tr.counts[:6], 20, 4, policy="deepseek", layer_ids=tr.layer_ids)
    write_placement(pl, tmp_path / "m.yaml")
    js = tmp_path / "ev.json"
    text = ok(["evaluate", str(trace_file), "-p", str(tmp_path / "m.yaml"), "--iter-range", "6-12", "--json", str(js)])
    assert "imbalance before" in text and "average" in text and "lower bound" in text
    rows = {e["label"]: e for e in json.loads(js.read_text())["evaluations"]}
    ev_tr = tr.slice("6-12")
    assert rows["no EPLB"]["imbalance"] == pytest.approx(load_table(ev_tr, 4).average[2])
    after = rows["map m.yaml"]
    assert after["imbalance"] == pytest.approx(load_table(ev_tr, 4, pl).average[2])
    assert after["window"] == "6-12" and after["num_slots"] == 20
    from eplb.dispatch import split_rank_loads
    from eplb.metrics import imbalance_ratio, rank_loads

    assert after["max_load"] == pytest.approx(rank_loads(ev_tr.counts, pl).max(-1).mean())
    bal = imbalance_ratio(split_rank_loads(ev_tr.counts, pl, "balanced")).mean()
    assert after["balanced_imbalance"] == pytest.approx(bal)
    assert after["balanced_imbalance"] <= after["imbalance"] + 1e-9  # balanced dispatch never worse than static
    assert after["dispatch_bound"] <= after["balanced_max_load"] + 1e-6
    assert after["lower_bound"] <= after["max_load"] + 1e-6
    # strategy="auto": the per-layer choice, its predicted gain and cost, in the JSON and the printed report
    from eplb.dispatch.auto import auto_strategies, auto_summary
    from eplb.sim.cost import default_cost_model

    auto = after["auto_dispatch"]
    want = auto_summary(auto_strategies(ev_tr.counts, pl, default_cost_model().compute_ms))
    assert auto["per_layer"] == want["per_layer"] and auto["balanced_layers"] == want["balanced_layers"]
    assert len(auto["per_layer"]) == pl.num_layers and "auto dispatch: balanced on" in text


def test_evaluate_held_out(tmp_path: Path, trace_file: Path) -> None:
    js = tmp_path / "ev.json"
    ok(["evaluate", str(trace_file), "--held-out", "0-6:6-12", "--ep-size", "4", "--num-slots", "20", "--policy",
        "deepseek", "--no-dispatch", "--json", str(js)])
    rows = {e["label"]: e for e in json.loads(js.read_text())["evaluations"]}
    tr = Trace.load(trace_file)
    ho, orc = rows["deepseek planned on 0-6 (held-out)"], rows["deepseek planned on 6-12 (in-sample oracle)"]
    pl = plan(tr.counts[:6], 20, 4, policy="deepseek", layer_ids=tr.layer_ids)
    assert ho["imbalance"] == pytest.approx(load_table(tr.slice("6-12"), 4, pl).average[2])
    assert ho["window"] == orc["window"] == "6-12" and ho["balanced_imbalance"] is None
    fails(["evaluate", str(trace_file), "--held-out", "6-12:0-6", "--ep-size", "4"], r"must start at or after the end")
    fails(["evaluate", str(trace_file), "--held-out", "0-6", "--ep-size", "4"], r"expected PLAN_RANGE:EVAL_RANGE")
    fails(["evaluate", str(trace_file)], r"pass --placement MAP and/or --held-out")


def test_evaluate_map_must_fit_the_trace(tmp_path: Path, trace_file: Path) -> None:
    write_placement(Placement(np.tile(np.arange(8), (3, 1)), 8, 4, layer_ids=(1, 3, 5)), tmp_path / "m.yaml")
    fails(["evaluate", str(trace_file), "-p", str(tmp_path / "m.yaml")], r"m\.yaml: does not fit trace .*trace\.safetensors \(16 experts, 8 in the map\): 8 slots per layer cannot hold 16")


# --------------------------------------------------------------------------- exit code 2, one line
@pytest.mark.parametrize("args, match", [
    (["validate", "{d}/bad.json"], "truncated JSON"),
    (["plan", "{trace}", "--ep-size", "4", "--num-slots", "18", "-o", "{d}/x.yaml"], "num-slots: 18 slots"),
    (["convert", "{d}/bad.json", "{d}/y.yaml"], "truncated JSON"),
    (["evaluate", "{trace}", "-p", "{d}/nope.yaml"], "nope.yaml: no such file"),
])
def test_main_exits_2_with_one_line(tmp_path: Path, trace_file: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, args: list[str], match: str) -> None:
    (tmp_path / "bad.json").write_text('{"moe_layer_count": 2, "layer_list": [')
    argv = ["eplb", *(a.format(d=tmp_path, trace=trace_file) for a in args)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: ") and match in err and err.count("\n") == 1
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "y.yaml").exists()


def test_console_script_exit_code_2(tmp_path: Path) -> None:
    exe = shutil.which("eplb")
    cmd = [exe] if exe else [sys.executable, "-c", "from eplb.cli import main; main()"]
    (tmp_path / "m.yaml").write_text("num_slots: 4\nep_size: 2\ninitial_global_assignments:\n  3: [0, 1, 2]\n")
    res = subprocess.run([*cmd, "validate", str(tmp_path / "m.yaml")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr == f"eplb: error: {tmp_path / 'm.yaml'}: layer 3: 3 slots, expected num_slots=4\n"
    res = subprocess.run([*cmd, "convert", str(tmp_path / "m.yaml"), str(tmp_path / "o.weird")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("eplb: error: ") and not (tmp_path / "o.weird").exists()
