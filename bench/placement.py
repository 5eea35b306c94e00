"""Placement policies: time, balance, held-out per-step imbalance, gap to the lower bound, migration.

Cases
* REAL (shipped with eplb, see src/eplb/data/SOURCES.md):
  - ``llama4_maverick_mmlu_decode`` [128 steps, 24 layers, 128 experts] and ``..._prefill`` [235 steps]
    at 8/16/32 ranks with E, E + R and E + 2R slots; held-out = plan on the first half of the steps,
    evaluate per-step imbalance on the second half;
  - ``qwen3_30b_sglang`` / ``qwen3_235b_sglang`` (aggregate counts, one step: in-sample only) at 8/16/32 ranks
    with E and E + R slots.
* SYNTHETIC (eplb.synthetic.deepseek_v3_like, Zipf skew 1.0, 4096 tokens/step, top-8): DeepSeek-V3 shape
  58 layers x 256 experts -> 288 and 320 slots on 32/36/64/72 ranks where divisible, 8 groups, 1 and 4 nodes;
  16 steps, plan on the first 8, evaluate on the last 8.

Per case and policy: planning time on ONE CPU core (threads pinned to 1; median of ``--repeats``), in-sample
max/mean rank load of the summed planning window (layer mean), gap to :func:`eplb.metrics.lower_bound`
(max / bound - 1, layer mean), held-out per-step imbalance (TensorRT-LLM definition, :func:`step_imbalance`),
colocated duplicates, and whether ``eplb`` is never worse than ``deepseek`` on any layer. A migration table
compares a fresh ``eplb`` plan with ``eplb-incremental`` (current = the plan of the first half, new loads =
the second half): experts moved and max/mean.

Targets checked (issue 3): deepseek-compatible < 30 ms at the DeepSeek-V3 shape; eplb never worse than
deepseek on any case/layer; eplb closes >= half of deepseek's gap to the lower bound on average.

    python bench/placement.py            # full run, writes bench/results/placement.md
    python bench/placement.py --quick    # a few cases (CI smoke)
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eplb  # noqa: E402
from _common import REPO, command_line, utc_minute, write_text  # noqa: E402
from eplb.datasets import load_builtin  # noqa: E402
from eplb.metrics import hierarchical_lower_bound, lower_bound, max_rank_load, step_imbalance  # noqa: E402
from eplb.synthetic import deepseek_v3_like  # noqa: E402

torch.set_num_threads(1)


@dataclass
class Case:
    name: str
    data: str  # "REAL" or "SYNTHETIC"
    plan_counts: np.ndarray  # [T, L, E]
    eval_counts: np.ndarray | None  # [T', L, E] held-out steps, or None
    slots: int
    ranks: int
    nodes: int = 1
    groups: int = 1
    policies: tuple[str, ...] = ("deepseek", "eplb")
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def _real_cases(quick: bool) -> list[Case]:
    out: list[Case] = []
    traces = ["llama4_maverick_mmlu_decode"] if quick else ["llama4_maverick_mmlu_decode", "llama4_maverick_mmlu_prefill"]
    for name in traces:
        c = load_builtin(name).counts.astype(np.float64)
        half = c.shape[0] // 2
        E = c.shape[2]
        for R in (8, 16, 32) if not quick else (16,):
            for S in (E, E + R, E + 2 * R) if not quick else (E + R,):
                out.append(Case(f"{name} R={R} S={S}", "REAL", c[:half], c[half:], S, R,
                                policies=("deepseek", "eplb", "eplb-robust")))
    for name in ([] if quick else ["qwen3_30b_sglang", "qwen3_235b_sglang"]):
        c = load_builtin(name).counts.astype(np.float64)
        E = c.shape[2]
        for R in (8, 16, 32):
            for S in (E, E + R):
                out.append(Case(f"{name} R={R} S={S}", "REAL", c, None, S, R))
    return out


def _synthetic_cases(quick: bool) -> list[Case]:
    c = deepseek_v3_like(16, tokens_per_step=4096, seed=0).astype(np.float64)
    out = []
    layouts = [(288, 32), (288, 36), (288, 72), (320, 32), (320, 64)] if not quick else [(288, 32)]
    for S, R in layouts:
        for N in (1, 4) if not quick else (1,):
            pols = ("deepseek", "eplb") + (("deepseek-hierarchical", "eplb-hierarchical") if N > 1 else ("eplb-robust",))
            out.append(Case(f"DeepSeek-V3 shape S={S} R={R} N={N}", "SYNTHETIC", c[:8], c[8:], S, R, N, 8, pols))
    return out


def _time(fn: Any, repeats: int) -> tuple[float, Any]:
    ts, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts)), res


def run_case(case: Case, repeats: int) -> None:
    W = case.plan_counts.sum(0)
    lb = lower_bound(W, case.slots, case.ranks)
    hlb = hierarchical_lower_bound(W, case.slots, case.ranks, case.nodes, case.groups) if case.nodes > 1 else None
    mean = W.sum(1) / case.ranks
    for pol in case.policies:
        loads = case.plan_counts if pol == "eplb-robust" else W
        reps = 1 if pol == "eplb-robust" else repeats
        dt, p = _time(lambda pol=pol, loads=loads: eplb.plan(loads, case.slots, case.ranks, num_nodes=case.nodes,
                                                             num_groups=case.groups, policy=pol), reps)
        mx = max_rank_load(W, p)
        r: dict[str, Any] = {
            "time_s": dt,
            "max_mean": float(np.mean(np.where(mean > 0, mx / np.where(mean > 0, mean, 1), 1.0))),
            "gap": float(np.mean(np.where(lb > 0, mx / np.where(lb > 0, lb, 1) - 1, 0.0))),
            "max": mx,
            "dups": int(p.colocated_duplicates().sum()),
            "placement": p,
        }
        hier = pol.endswith("hierarchical") or (pol == "deepseek" and case.groups % case.nodes == 0)
        if hlb is not None and hier:
            r["gap_h"] = float(np.mean(np.where(hlb > 0, mx / np.where(hlb > 0, hlb, 1) - 1, 0.0)))
        if case.eval_counts is not None:
            r["heldout"] = float(step_imbalance(case.eval_counts, p).mean())
            r["insample_step"] = float(step_imbalance(case.plan_counts, p).mean())
        case.results[pol] = r
    case.results["_lb"] = {"lb_mean": float(np.mean(lb / np.where(mean > 0, mean, 1)))}


def migration_rows(cases: list[Case]) -> list[str]:
    rows = []
    for case in cases:
        if case.eval_counts is None or "eplb" not in case.results:
            continue
        cur = case.results["eplb"]["placement"]
        new = case.eval_counts.sum(0)
        mean = new.sum(1) / case.ranks
        t0 = time.perf_counter()
        fresh = eplb.plan(new, case.slots, case.ranks, num_nodes=case.nodes, num_groups=case.groups, policy="eplb")
        t1 = time.perf_counter()
        inc = eplb.plan(new, case.slots, case.ranks, num_nodes=case.nodes, num_groups=case.groups,
                        policy="eplb-incremental", current=cur)
        t2 = time.perf_counter()
        ds = eplb.plan(new, case.slots, case.ranks, num_nodes=case.nodes, num_groups=case.groups, policy="deepseek")
        same = eplb.plan(case.plan_counts.sum(0), case.slots, case.ranks, num_nodes=case.nodes, num_groups=case.groups,
                         policy="eplb-incremental", current=cur)

        def mm(p: Any, new: np.ndarray = new, mean: np.ndarray = mean) -> float:
            return float(np.mean(max_rank_load(new, p) / np.where(mean > 0, mean, 1)))

        L = new.shape[0]
        rows.append(
            f"| {case.name} | {case.data} | {cur.moves(ds).sum() / L:.1f} | {mm(ds):.4f} | {cur.moves(fresh).sum() / L:.1f} | "
            f"{mm(fresh):.4f} | {cur.moves(inc).sum() / L:.1f} | {mm(inc):.4f} | {cur.moves(same).sum()} | "
            f"{(t1 - t0) * 1e3:.0f} / {(t2 - t1) * 1e3:.0f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few small cases")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "placement.md")
    args = ap.parse_args(argv)
    cases = _real_cases(args.quick) + _synthetic_cases(args.quick)
    # warm-up (imports, first-call allocations)
    eplb.plan(np.ones((2, 16)), 32, 8, policy="eplb")
    for i, case in enumerate(cases):
        run_case(case, args.repeats)
        print(f"[{i + 1}/{len(cases)}] {case.name}: " + ", ".join(
            f"{p} {r['time_s'] * 1e3:.0f} ms gap {r['gap']:.4f}" for p, r in case.results.items() if not p.startswith("_")),
            flush=True)

    lines: list[str] = []
    lines += [
        "# Placement policies benchmark",
        "",
        f"- date: {utc_minute()}",
        f"- device: CPU `{platform.processor() or platform.machine()}`, {os.cpu_count()} cores on the machine, "
        f"ONE thread used (OMP/BLAS threads = 1, torch.set_num_threads(1)); Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__}",
        f"- command: `{command_line()}`",
        "- timings: best of "
        f"{args.repeats} runs (eplb-robust: 1 run); the 2-core machine is shared with other jobs, so times are noisy",
        "- max/mean: max rank load / mean rank load of the summed planning window (uniform split over replicas), mean over"
        " layers; gap: max / lower_bound - 1 (eplb.metrics.lower_bound, a proven bound; the true optimum lies in"
        " between); held-out: per-step imbalance max/mean - 1 averaged over steps (TensorRT-LLM), planned on the first"
        " half of the steps and evaluated on the second half; dups: colocated duplicate replicas (wasted slots), all layers;"
        " gap to node LB (N > 1, node-constrained policies only: deepseek hierarchical, *-hierarchical): max /"
        " eplb.metrics.hierarchical_lower_bound - 1, the bound for placements that keep each group and its replicas on"
        " one node (global policies such as eplb are not bound by it)",
        "",
        "## Results",
        "",
        "| case | data | policy | time ms | max/mean | gap to LB | gap to node LB | held-out step imb. |"
        " in-sample step imb. | dups |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        for pol, r in case.results.items():
            if pol.startswith("_"):
                continue
            ho = f"{r['heldout']:.4f}" if "heldout" in r else "-"
            ins = f"{r['insample_step']:.4f}" if "insample_step" in r else "-"
            gh = f"{r['gap_h']:.4f}" if "gap_h" in r else "-"
            lines.append(f"| {case.name} | {case.data} | {pol} | {r['time_s'] * 1e3:.1f} | {r['max_mean']:.4f} | "
                         f"{r['gap']:.4f} | {gh} | {ho} | {ins} | {r['dups']} |")

    # ------------------------------------------------------------------ targets
    closed: list[float] = []
    closed_big: list[float] = []
    never_worse = True
    worst_ratio = 0.0
    ds_times = []
    eplb_times = []
    gap_rows = []
    for case in cases:
        d, e = case.results["deepseek"], case.results["eplb"]
        ratio = float(np.max(e["max"] / np.where(d["max"] > 0, d["max"], 1)))
        worst_ratio = max(worst_ratio, ratio)
        never_worse &= bool(np.all(e["max"] <= d["max"] * (1 + 1e-9) + 1e-12))
        W = case.plan_counts.sum(0)
        lb = lower_bound(W, case.slots, case.ranks)
        gd = float((d["max"] - lb).sum())
        ge = float((e["max"] - lb).sum())
        frac = 1 - ge / gd if gd > 1e-9 * float(lb.sum()) else None
        if frac is not None:
            closed.append(frac)
            if d["gap"] >= 1e-3:
                closed_big.append(frac)
        gap_rows.append(f"| {case.name} | {d['gap']:.4f} | {e['gap']:.4f} | "
                        f"{'-' if frac is None else f'{frac:.2f}'} | {ratio:.4f} |")
        if case.data == "SYNTHETIC":
            ds_times.append(d["time_s"])
            eplb_times.append(e["time_s"])
    avg_closed = float(np.mean(closed)) if closed else float("nan")
    lines += [
        "",
        "## eplb vs deepseek: gap to the lower bound closed",
        "",
        "closed = 1 - sum over layers (eplb max - LB) / sum (deepseek max - LB); '-' where deepseek is already at the"
        " bound (nothing to close). worst ratio = max over layers of eplb max / deepseek max (<= 1 means never worse).",
        "",
        "| case | deepseek gap | eplb gap | closed | worst eplb/deepseek |",
        "| --- | ---: | ---: | ---: | ---: |",
        *gap_rows,
        "",
        "## Migration (eplb fresh vs eplb-incremental)",
        "",
        "current = the eplb plan of the first half; new loads = the second half (summed). moves = expert copies that"
        " cross ranks per layer (Placement.moves); 'unchanged' = moves when re-planning the SAME loads with current"
        " (must be 0); times = fresh / incremental planning ms.",
        "",
        "| case | data | deepseek moves | deepseek max/mean | eplb fresh moves | fresh max/mean | incremental moves |"
        " incremental max/mean | unchanged moves | ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *migration_rows(cases),
    ]
    # held-out summary
    ho_lines = []
    for data in ("REAL", "SYNTHETIC"):
        sel = [c for c in cases if c.data == data and c.eval_counts is not None]
        for pol in ("deepseek", "eplb", "eplb-robust"):
            vals = [c.results[pol]["heldout"] for c in sel if pol in c.results]
            ins_vals = [c.results[pol]["insample_step"] for c in sel if pol in c.results]
            if vals:
                wins = sum(c.results[pol]["heldout"] <= c.results["deepseek"]["heldout"] for c in sel if pol in c.results)
                ho_lines.append(f"| {data} | {pol} | {len(vals)} | {np.mean(ins_vals):.4f} | {np.mean(vals):.4f} | "
                                f"{wins}/{len(vals)} |")
    dup_cases = [f"{c.name} ({c.results['eplb']['dups']})" for c in cases if c.results["eplb"]["dups"]]
    lines += [
        "",
        "## Held-out per-step imbalance (what a serving step waits for)",
        "",
        "Mean over the cases with per-step data of the per-step imbalance (max/mean - 1 per step, averaged), in-sample"
        " (planning half) and held-out (second half); <= deepseek = cases where the policy's held-out value is not above"
        " deepseek's.",
        "",
        "| data | policy | cases | in-sample | held-out | <= deepseek |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *ho_lines,
        "",
        "Colocated duplicates kept by eplb (all layers): " + (", ".join(dup_cases) if dup_cases else "none") + ". Rule:"
        " eplb must never be worse than deepseek, so in a layer where DeepSeek's placement (which has the duplicate,"
        " improved by swaps) has a lower max load than every duplicate-free placement eplb found, that one is kept;"
        " otherwise the placement with the fewest duplicates within 0.1% of the best max load wins.",
    ]
    t_ds = max(ds_times) if ds_times else float("nan")
    t_ep = max(eplb_times) if eplb_times else float("nan")
    lines += [
        "",
        "## Targets (issue 3)",
        "",
        f"- deepseek-compatible policy at the DeepSeek-V3 shape (58 x 256 -> 288/320 slots), one core: slowest case "
        f"{t_ds * 1e3:.1f} ms -> target < 30 ms **{'MET' if t_ds < 0.030 else 'NOT MET'}**",
        f"- eplb never worse than deepseek on any case and layer: worst eplb/deepseek max ratio {worst_ratio:.6f} -> "
        f"**{'MET' if never_worse else 'NOT MET'}**",
        f"- eplb closes >= half of deepseek's gap to the lower bound on average: mean closed fraction "
        f"{avg_closed:.2f} over {len(closed)} cases (min {min(closed) if closed else float('nan'):.2f}) -> "
        f"**{'MET' if avg_closed >= 0.5 else 'NOT MET'}**; over the {len(closed_big)} cases where deepseek's gap is"
        f" >= 0.1%: mean {float(np.mean(closed_big)) if closed_big else float('nan'):.2f}, min "
        f"{min(closed_big) if closed_big else float('nan'):.2f} (cases with 0.00: both policies reach the same max"
        " there; in this run they are the S = E layouts without redundant slots)",
        f"- eplb time at the DeepSeek-V3 shape (aim: well under 1 s on one core): slowest case {t_ep * 1e3:.0f} ms -> "
        f"**{'MET' if t_ep < 1.0 else 'NOT MET'}**",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
