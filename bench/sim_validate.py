"""Validate the simulator against measured EP step times: bench/runtime_ep.py's results JSON vs eplb.sim's prediction.

For every configuration (placement x replica strategy) that bench/runtime_ep.py timed, this script rebuilds
exactly what was run -- the same trace steps and layers, the same group routing counts
(:class:`eplb.runtime.TraceRouter.group_counts`, the code the benchmark routed with), the same placement
(planned with the same policy on the same fit window) -- and predicts the step time two ways:

* ``sim``: the simulator end to end (:func:`eplb.sim.replay_static`: rank loads from the placement and strategy
  via eplb.dispatch.split_counts, then the cost model);
* ``cost model on measured loads``: the cost model applied to the per-rank (token, expert) pairs the layers
  counted on the GPUs (isolates the time model from the rank-load prediction).

Errors are (predicted - measured) / measured of the mean step time (all MoE layers, slowest rank). Target:
within 10%. Also printed: the per-layer overhead that would zero the mean error (an in-sample calibration
suggestion for ``other_ms_per_layer``, not applied to the numbers above).

    python bench/sim_validate.py --measured bench/results/runtime_ep.json [--cost-model FILE] [--out FILE]
    python bench/sim_validate.py --measured bench/results/runtime_ep_cpu.json --cost-model CPU.json --out /tmp/v.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _common import REPO, command_line, today, write_text

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def rebuild(d: dict[str, Any]) -> tuple[dict[int, np.ndarray], dict[tuple[str, int], Any], list[int]]:
    """As runtime_ep.py built them: ``{batch: group counts [rounds * steps, layers, E]}`` of the timed steps (in
    the order of each row's ``step_ms``), the placements, and the timed trace steps of one round."""
    from eplb.datasets import load_builtin
    from eplb.placement import Placement
    from eplb.policies import plan
    from eplb.runtime.trace_router import TraceRouter

    trace = load_builtin(d["trace"])
    T, _, E = trace.counts.shape
    if E != d["experts"]:
        raise ValueError(f"measured: trace {d['trace']} has {E} experts, the results say {d['experts']}")
    chosen = [int(v) for v in d["trace_layers"]]
    fit = (int(d["fit_steps"][0]), int(d["fit_steps"][1]))
    eval_steps = [s for s in range(T) if not fit[0] <= s < fit[1]] or list(range(T))
    world, k = int(d["ep_size"]), int(d["top_k"])
    warm, steps, rounds = int(d["warmup"]), int(d["steps"]), int(d.get("rounds", 1))
    timed = [eval_steps[s % len(eval_steps)] for s in range(warm, warm + steps)]
    router = TraceRouter(trace, num_ranks=world, rank=0, seed=7, layer_map=chosen)
    batches = {int(r.get("batch", d.get("batch_per_rank", 0))) for r in d["results"]}
    counts = {}
    for N in batches:
        one = np.stack([np.stack([router.group_counts(t, pos, N, k) for pos in range(len(chosen))]) for t in timed])
        counts[N] = np.concatenate([one] * rounds)
    loads_fit = trace.counts[fit[0]:fit[1]][:, chosen]
    placements: dict[tuple[str, int], Any] = {}
    for r in d["results"]:
        key = (r["placement"], int(r["slots"]))
        if key in placements:
            continue
        if r["placement"] == "identity":
            placements[key] = Placement.contiguous(len(chosen), E, world, int(r["slots"]))
        else:
            placements[key] = plan(loads_fit, int(r["slots"]), world, policy=r["placement"])
    return counts, placements, timed


def layer_time_ms(cm: Any, loads: np.ndarray, spr: int, R: int) -> np.ndarray:
    """``[steps]`` sum over layers of the cost model's time for per-rank loads ``[steps, layers, R]``."""
    mx = loads.max(-1)
    comp = cm.compute_ms(loads, spr).max(-1)
    return (comp + 2 * cm.a2a_ms(mx, R) + cm.other_ms_per_layer).sum(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", default=str(REPO / "bench/results/runtime_ep.json"),
                    help="bench/runtime_ep.py's JSON (default bench/results/runtime_ep.json)")
    ap.add_argument("--cost-model", default=None, help="cost model JSON (default: eplb.sim.default_cost_model(); "
                                                      "missing sections are completed from reference/gpu.md)")
    ap.add_argument("--out", default=None, help="markdown (default bench/results/simulator.md)")
    ap.add_argument("--exclude-strategy", default="", help="comma list of replica strategies whose measured rows are "
                    "left out (e.g. rows timed with older code)")
    ap.add_argument("--calibrate-on", default="", help="PLACEMENT:STRATEGY of one measured row: fit the per-layer "
                    "fixed overhead (other_ms_per_layer) on it and report the error on the OTHER rows (held out)")
    a = ap.parse_args(argv)
    from eplb.sim import replay_static
    from eplb.sim.cost import default_cost_model, load_cost_model, reference_cost_model
    from eplb.sim.engine import strategy_rank_loads

    mpath = Path(a.measured)
    if not mpath.is_file():
        print(f"error: {mpath}: no such file (run bench/runtime_ep.py first)", file=sys.stderr)
        return 2
    d = json.loads(mpath.read_text())
    cm = load_cost_model(a.cost_model, base=reference_cost_model()) if a.cost_model else default_cost_model()
    counts, placements, timed = rebuild(d)
    world = int(d["ep_size"])
    shape_ok = (cm.hidden_size, cm.moe_intermediate_size, cm.dtype_bytes) == (
        int(d["hidden"]), int(d["intermediate"]), DTYPE_BYTES.get(d["dtype"], 2))
    rows = []
    skip = {x for x in a.exclude_strategy.split(",") if x}
    for r in d["results"]:
        if r["strategy"] in skip:
            continue
        pl = placements[(r["placement"], int(r["slots"]))]
        meas = np.asarray(r["step_ms"], dtype=np.float64)
        N = int(r.get("batch", d.get("batch_per_rank", 0)))
        sim = replay_static(counts[N], pl, cost=cm, strategy=r["strategy"])
        pairs = np.asarray(r["pairs"], dtype=np.float64).transpose(1, 2, 0)  # [steps, layers, R]
        from_meas = layer_time_ms(cm, pairs, pl.slots_per_rank, world)
        pred_loads = strategy_rank_loads(counts[N], pl, r["strategy"])
        mi = np.where(pairs.mean(-1) > 0, pairs.max(-1) / np.maximum(pairs.mean(-1), 1e-12) - 1, 0).mean()
        load_err = float(np.abs(pred_loads.max(-1) - pairs.max(-1)).sum() / pairs.max(-1).sum())
        rows.append({"placement": r["placement"], "strategy": r["strategy"], "slots": int(r["slots"]), "batch": N,
                     "measured_ms": float(meas.mean()), "measured_p99": float(np.percentile(meas, 99)),
                     "sim_ms": float(sim.step_ms.mean()), "from_pairs_ms": float(from_meas.mean()),
                     "measured_imbalance": float(mi), "sim_imbalance": float(sim.imbalance.mean()),
                     "busiest_load_err": load_err})
    for r in rows:
        r["sim_err"] = r["sim_ms"] / r["measured_ms"] - 1
        r["pairs_err"] = r["from_pairs_ms"] / r["measured_ms"] - 1
    L = len(d["trace_layers"])
    resid = np.array([r["measured_ms"] - r["sim_ms"] for r in rows])
    overhead = float(resid.mean() / L)
    cmd = command_line(argv)
    lines = [
        "# Simulator validation: predicted vs measured EP step time", "",
        f"- date: {today()}", f"- command: `{cmd}`",
        f"- measured: `{mpath.name}` from bench/runtime_ep.py on {d['device']} ({d['date']}; `{d['command']}`)",
        f"- configuration: {d['experts']} experts, top-{d['top_k']}, "
        f"{d.get('batches', [d.get('batch_per_rank')])} tokens/rank/step, {L} MoE "
        f"layers (hidden {d['hidden']}, intermediate {d['intermediate']}, {d['dtype']}), ep_size {world}; REAL routing "
        f"`{d['trace']}` trace steps {timed[0]}..{timed[-1]} (group counts rebuilt with TraceRouter.group_counts)",
        f"- cost model: {cm.device}, {cm.date}, {cm.source}",
    ]
    if not shape_ok:
        lines.append(f"- WARNING: the cost model's shape (hidden {cm.hidden_size}, intermediate "
                     f"{cm.moe_intermediate_size}, {cm.dtype_bytes} B) differs from the benchmark's: its compute "
                     f"table does not describe these experts")
    sprs = sorted({placements[(r["placement"], int(r["slots"]))].slots_per_rank for r in d["results"]})
    if cm.compute_kind == "table" and any(s not in cm.compute_slots_per_rank for s in sprs):
        lines.append(f"- note: slots per rank {sprs} are not all rows of the compute table "
                     f"{list(cm.compute_slots_per_rank)}: interpolated/scaled (measure those rows with "
                     f"`bench/runtime_compute.py --slots ...` for a direct reading)")
    gpu = [g for g in ("H200", "H100", "B200", "A100") if g in d["device"]]
    if gpu and gpu[0] not in cm.device:
        lines.append(f"- note: measured on {gpu[0]} but the cost model's compute is from {cm.device}")
    lines += ["", "| placement | strategy | slots | tokens/rank | measured mean ms | sim ms | sim error | cost model on measured "
              "loads ms | error | measured imbalance | sim imbalance | busiest-rank load error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['placement']} | {r['strategy']} | {r['slots']} | {r['batch']} | {r['measured_ms']:.3f} | "
                     f"{r['sim_ms']:.3f} | {r['sim_err']:+.1%} | {r['from_pairs_ms']:.3f} | {r['pairs_err']:+.1%} | "
                     f"{r['measured_imbalance']:.3f} | {r['sim_imbalance']:.3f} | {r['busiest_load_err']:.1%} |")
    e1 = np.abs([r["sim_err"] for r in rows])
    e2 = np.abs([r["pairs_err"] for r in rows])
    lines += ["",
              f"- sim error: mean |error| {e1.mean():.1%}, max {e1.max():.1%} over {len(rows)} configurations "
              f"(target: within 10%: {'met' if e1.max() <= 0.10 else 'NOT met'})",
              f"- cost model on measured loads: mean |error| {e2.mean():.1%}, max {e2.max():.1%}",
              f"- in-sample calibration suggestion: other_ms_per_layer += {overhead:.4f} ms would zero the mean sim "
              f"residual (not applied above)",
              "- busiest-rank load error: sum over steps and layers of |predicted - measured| busiest-rank pairs / "
              "measured (local-first is predicted as an expectation over source ranks, so it is not exact)."]
    if skip:
        lines.append(f"- left out: measured rows with strategy {sorted(skip)} (--exclude-strategy)")
    if a.calibrate_on:
        cp, _, cs = a.calibrate_on.partition(":")
        cal = [r for r in rows if r["placement"] == cp and r["strategy"] == cs]
        if not cal:
            print(f"error: --calibrate-on {a.calibrate_on}: no such measured row", file=sys.stderr)
            return 2
        extra = (cal[0]["measured_ms"] - cal[0]["sim_ms"]) / L  # ms per layer, fitted on one configuration
        held = [r for r in rows if r is not cal[0]]
        lines += ["", f"## Held-out calibration: other_ms_per_layer += {extra:.4f} ms fitted on `{a.calibrate_on}` "
                  "only, then checked on every other row", "",
                  "| placement | strategy | measured mean ms | calibrated sim ms | error |", "|---|---|---|---|---|"]
        errs = []
        for r in held:
            pred = r["sim_ms"] + extra * L
            errs.append(pred / r["measured_ms"] - 1)
            r["calibrated_sim_ms"], r["calibrated_err"] = pred, errs[-1]
            lines.append(f"| {r['placement']} | {r['strategy']} | {r['measured_ms']:.3f} | {pred:.3f} | {errs[-1]:+.1%} |")
        ea = np.abs(errs)
        lines += ["", f"- held-out error after calibrating on one configuration: mean |error| {ea.mean():.1%}, "
                  f"max {ea.max():.1%} over {len(held)} configurations (target within 10%: "
                  f"{'met' if ea.max() <= 0.10 else 'mean met, max NOT met' if ea.mean() <= 0.10 else 'NOT met'})"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out) if a.out else REPO / "bench/results/simulator.md"
    write_text(out, text)
    write_text(out.with_suffix(".json"), json.dumps({"rows": rows, "cost_model": cm.to_dict(),
                                                     "measured": str(mpath)}, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
