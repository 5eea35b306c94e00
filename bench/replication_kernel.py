"""Timing of the per-step replication planner kernel (one Triton launch), and GPU == CPU reference checks.

SYNTHETIC routing (Zipf-skewed expert popularity per layer, DeepSeek-V3 shape: 256 experts, top-8, 2048 tokens per
rank; counts sampled as a multinomial of tokens x top-k pairs), static placement from the "deepseek" policy
(8 groups) planned on the first half of the steps; the planner runs on the second half. For each configuration:

* equality: :func:`eplb.dispatch.replication_kernel.plan_replication_gpu` == :func:`eplb.dispatch.replication.plan_replication`
  (every output, every problem);
* ``1 layer``: one launch for one (step, layer) problem, eager (Python launch included) and as a CUDA graph replay;
* ``all layers``: one launch for every layer of a step (CUDA graph), total and per layer;
* the max / mean rank load before (static uniform split) and after the plan, iterations and copies used.

Times are medians over the test steps (each step's counts copied into the graph's input between replays, outside
the timed region), CUDA events.

    python bench/replication_kernel.py --device cuda --out bench/results/replication_kernel.md
    python bench/replication_kernel.py --device cpu --quick      # CPU check of the script (Triton interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import numpy as np


def graphed(fn: Any) -> Any:
    """One call of ``fn`` captured in a CUDA graph (bench/_common.py's helper)."""
    import torch

    from _common import cuda_graphed

    return cuda_graphed(fn, torch.device("cuda"))


def time_us(fn: Any, dev: Any, reps: int) -> float:
    """Median time of one call in us (bench/_common.py's CUDA-event / wall-clock sampler, one warm-up call)."""
    from _common import sample_ms

    return statistics.median(sample_ms(fn, dev, 1, reps)) * 1e3


def variant_kwargs(name: str) -> dict[str, Any]:
    """``wN``: N warps per program."""
    return {"num_warps": int(name[1:])}


def _times(fn: Any, dev: Any, reps: int, graph: bool, setups: list[Any]) -> list[float]:
    """Per problem (each ``setup()`` loads one problem into the inputs): the median time of ``fn`` (or its graph)."""
    rep = graphed(fn) if (graph and dev.type == "cuda") else fn
    out = []
    for setup in setups:
        setup()
        out.append(time_us(rep, dev, reps))
    return out


def run_config(E: int, R: int, S: int, D: int, layers: int, steps: int, tokens_per_rank: int, drift: bool, dev: Any,
               reps: int, warps: list[int], seed: int, before: bool) -> dict[str, Any]:
    import torch

    import eplb
    from eplb.dispatch.replication import (
        DEFAULT_TOLERANCE,
        plan_replication,
        slot_tables,
        slot_tokens,
        static_holdings,
        uniform_start,
    )
    from eplb.dispatch.replication_kernel import plan_replication_gpu
    from eplb.synthetic import zipf_popularity

    rng = np.random.default_rng(seed)
    probs = zipf_popularity(layers, E, 1.0, rng)  # [L, E] SYNTHETIC
    pairs = tokens_per_rank * R * 8
    half = steps // 2
    # drift: the test steps' popularity is a random permutation of the planning steps' (a stale placement)
    test_probs = np.stack([p[rng.permutation(E)] for p in probs]) if drift else probs
    counts = np.stack([np.stack([rng.multinomial(pairs, (probs if t < half else test_probs)[la]) for la in range(layers)])
                       for t in range(steps)])
    pl = eplb.plan(counts[:half], S, R, policy="deepseek", num_groups=8)
    mult = static_holdings(pl)
    test = counts[half:]
    c_dev = torch.as_tensor(test, device=dev)
    tabs = {k: torch.as_tensor(v, device=dev) for k, v in slot_tables(pl).items()}
    out: dict[str, Any] = {"E": E, "R": R, "S": S, "D": D, "layers": layers, "drift": drift}
    before_mm = uniform_start(test, mult[None]).sum(-2)
    out["max_mean_before"] = float((before_mm.max(-1) / before_mm.mean(-1)).mean())
    for tag, tol in (("", DEFAULT_TOLERANCE), ("_t0", 0.0)):
        ref = plan_replication(test, mult, D, tolerance=tol)
        want = {"slot_tokens": slot_tokens(ref, pl), "dyn_expert": ref.dyn_expert, "dyn_source": ref.dyn_source,
                "rank_loads": ref.rank_loads, "copies": ref.copies, "iterations": ref.iterations}
        got = plan_replication_gpu(c_dev, tabs, D, tolerance=tol)
        per_problem = np.ones(test.shape[:2], dtype=bool)
        for k, r in want.items():
            g = got[k].cpu().numpy()
            per_problem &= (g == r).reshape(test.shape[:2] + (-1,)).all(-1)
        out["problems"] = int(per_problem.size)
        out["equal" + tag] = int(per_problem.sum())
        out["max_mean_after" + tag] = float((ref.rank_loads.max(-1) / ref.rank_loads.mean(-1)).mean())
        out["iters_mean" + tag] = float(ref.iterations.mean())
        out["iters_max" + tag] = int(ref.iterations.max())
        out["copies_mean" + tag] = float(ref.copies.mean())
        if not tag:
            want_default = want
    # timings: one launch for one (step, layer), 3 layers x every test step; one launch for all layers of a step
    one_in = c_dev[0, :1].clone()
    t_one = {k: v[:1].clone() for k, v in tabs.items()}
    all_in = c_dev[0].clone()

    def load_one(t: int, la: int) -> Any:
        def f() -> None:
            one_in.copy_(c_dev[t, la:la + 1])
            for k, v in t_one.items():
                v.copy_(tabs[k][la:la + 1])
        return f

    setups_one = [load_one(t, la) for t in range(test.shape[0]) for la in (0, layers // 2, layers - 1)]
    setups_all = [(lambda t=t: all_in.copy_(c_dev[t])) for t in range(test.shape[0])]
    variants = [(w, variant_kwargs(w)) for w in warps] + [("w4_t0", {"num_warps": 4, "tolerance": 0.0})]
    for name, kw in variants:
        if not name.endswith("_t0"):  # every variant == the CPU reference on every problem
            got = plan_replication_gpu(c_dev, tabs, D, **kw)
            out[f"equal_{name}"] = bool(np.array_equal(got["slot_tokens"].cpu().numpy(), want_default["slot_tokens"])
                                        and np.array_equal(got["dyn_source"].cpu().numpy(), want_default["dyn_source"]))
        buf = plan_replication_gpu(one_in, t_one, D, **kw)["_out"]
        bufa = plan_replication_gpu(all_in, tabs, D, **kw)["_out"]

        def one(kw: dict = kw, buf: dict = buf) -> None:
            plan_replication_gpu(one_in, t_one, D, out=buf, **kw)

        def alll(kw: dict = kw, bufa: dict = bufa) -> None:
            plan_replication_gpu(all_in, tabs, D, out=bufa, **kw)

        if not name.endswith("_t0"):
            out[f"one_eager_{name}"] = statistics.median(_times(one, dev, reps, False, setups_one))
        g = _times(one, dev, reps, True, setups_one)
        out[f"one_graph_{name}"] = statistics.median(g)
        out[f"one_graph_max_{name}"] = max(g)
        out[f"all_graph_{name}"] = statistics.median(_times(alll, dev, reps, True, setups_all))
    if before:  # the 2026-12-02 kernel (bench/_replication_kernel_before.py), 4 warps, tolerance 0
        from _replication_kernel_before import plan_replication_gpu_before

        got = plan_replication_gpu_before(c_dev, tabs, D)
        ref = plan_replication(test, mult, D, tolerance=0.0)
        out["before_equal"] = bool(np.array_equal(got["rank_loads"].cpu().numpy(), ref.rank_loads))
        buf = plan_replication_gpu_before(one_in, t_one, D, num_warps=4)["_out"]
        bufa = plan_replication_gpu_before(all_in, tabs, D, num_warps=4)["_out"]
        g = _times(lambda: plan_replication_gpu_before(one_in, t_one, D, num_warps=4, out=buf), dev, reps, True, setups_one)
        out["one_graph_before"] = statistics.median(g)
        out["one_graph_max_before"] = max(g)
        out["all_graph_before"] = statistics.median(
            _times(lambda: plan_replication_gpu_before(all_in, tabs, D, num_warps=4, out=bufa), dev, reps, True, setups_all))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU check of the script)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-before", action="store_true", help="skip the previous kernel's timing")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(__file__))
    import torch

    from _common import command_line, device_name, utc_minute, write_text

    dev = torch.device(args.device)
    if args.quick:
        configs = [(32, 8, 40, 2, 2, 4, 16, True)]
        warps, reps = ["w4"], 2
    else:
        configs = [(256, 64, 320, 2, 58, 8, 2048, False), (256, 64, 320, 2, 58, 8, 2048, True),
                   (256, 64, 256, 2, 58, 8, 2048, False), (256, 32, 288, 2, 58, 8, 2048, True),
                   (256, 64, 320, 4, 58, 8, 2048, True)]
        warps, reps = ["w1", "w2", "w4", "w8"], args.reps
    before = not args.no_before
    rows = []
    for i, (E, R, S, D, L, T, tok, drift) in enumerate(configs):
        r = run_config(E, R, S, D, L, T, tok, drift, dev, reps, warps, seed=i, before=before)
        rows.append(r)
        print(r, flush=True)
    from eplb.dispatch.replication import DEFAULT_TOLERANCE

    lines = [
        "# Per-step replication planner kernel",
        "",
        f"Device: {device_name(dev)}. Date: {utc_minute()}. Command: `{command_line(argv)}`.",
        "",
        "SYNTHETIC routing (Zipf popularity, 256 experts, top-8, 2048 tokens per rank; 'deepseek' static placement "
        "planned on 4 steps, planner run on 4 other steps x all layers; `drift`: the other steps' popularity is a "
        "random permutation of the planning steps', so the static placement is stale). Median microseconds (CUDA "
        "events around one call or one graph replay). `1 layer`: one launch for one (step, layer), median (max) over "
        "3 layers x 4 steps; `all layers`: one launch for every layer of a step, per-layer time = total / layers. "
        "max/mean: rank load over mean rank load, averaged over problems, static uniform split before, plan after. "
        f"Default stopping tolerance {DEFAULT_TOLERANCE:.5f} (stop once max <= mean x (1 + tolerance)); `tol 0`: "
        "without it (only when no move helps). `before`: the previous kernel (bench/_replication_kernel_before.py, "
        "4 warps, tol 0) in the same run. `wN`: N warps per program (the default is w4). `ok`: that variant == CPU "
        "reference on every problem.",
        "",
        "| E | R | slots | D | drift | GPU == CPU (default / tol 0) | max/mean before | after tol 0 | after | "
        "iterations mean / max, tol 0 | iterations mean / max | copies mean | 1 layer graph, before | "
        "1 layer graph w4, tol 0 |"
        + "".join(f" {w} ok | 1 layer eager {w} | 1 layer graph {w} | all layers graph {w} (per layer) |" for w in warps),
        "| --- " * (14 + 4 * len(warps)) + "|",
    ]

    def gr(r: dict, k: str) -> str:
        return f"{r[f'one_graph_{k}']:.1f} ({r[f'one_graph_max_{k}']:.1f})" if f"one_graph_{k}" in r else "-"

    for r in rows:
        cells = [str(r["E"]), str(r["R"]), str(r["S"]), str(r["D"]), "yes" if r["drift"] else "no",
                 f"{r['equal']}/{r['problems']} / {r['equal_t0']}/{r['problems']}",
                 f"{r['max_mean_before']:.3f}", f"{r['max_mean_after_t0']:.4f}", f"{r['max_mean_after']:.4f}",
                 f"{r['iters_mean_t0']:.1f} / {r['iters_max_t0']}", f"{r['iters_mean']:.1f} / {r['iters_max']}",
                 f"{r['copies_mean']:.1f}", gr(r, "before"), gr(r, "w4_t0")]
        for w in warps:
            a = r[f"all_graph_{w}"]
            cells += ["yes" if r[f"equal_{w}"] else "NO", f"{r[f'one_eager_{w}']:.1f}", gr(r, w),
                      f"{a:.1f} ({a / r['layers']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    if before:
        lines += ["", "All layers, one launch, before kernel (per layer): " + ", ".join(
            f"row {i + 1}: {r['all_graph_before']:.1f} ({r['all_graph_before'] / r['layers']:.2f})"
            for i, r in enumerate(rows)) + ". Before kernel == CPU reference (tol 0) on rank loads: "
            + ", ".join(str(r["before_equal"]) for r in rows) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)
    ok = all(r["equal"] == r["problems"] == r["equal_t0"] and all(r[f"equal_{w}"] for w in warps) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
