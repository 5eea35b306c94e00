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


def run_config(E: int, R: int, S: int, D: int, layers: int, steps: int, tokens_per_rank: int, drift: bool, dev: Any,
               reps: int, warps: list[int], seed: int) -> dict[str, Any]:
    import torch

    import eplb
    from eplb.dispatch.replication import (
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
    ref = plan_replication(test, mult, D)
    want = {"slot_tokens": slot_tokens(ref, pl), "dyn_expert": ref.dyn_expert, "dyn_source": ref.dyn_source,
            "rank_loads": ref.rank_loads, "copies": ref.copies, "iterations": ref.iterations}
    c_dev = torch.as_tensor(test, device=dev)
    tabs = {k: torch.as_tensor(v, device=dev) for k, v in slot_tables(pl).items()}
    got = plan_replication_gpu(c_dev, tabs, D)
    per_problem = np.ones(test.shape[:2], dtype=bool)
    for k, r in want.items():
        g = got[k].cpu().numpy()
        per_problem &= (g == r).reshape(test.shape[:2] + (-1,)).all(-1)
    before = uniform_start(test, mult[None]).sum(-2)
    out: dict[str, Any] = {
        "E": E, "R": R, "S": S, "D": D, "layers": layers, "drift": drift, "problems": int(per_problem.size),
        "equal": int(per_problem.sum()),
        "max_mean_before": float((before.max(-1) / before.mean(-1)).mean()),
        "max_mean_after": float((ref.rank_loads.max(-1) / ref.rank_loads.mean(-1)).mean()),
        "iters_mean": float(ref.iterations.mean()), "iters_max": int(ref.iterations.max()),
        "copies_mean": float(ref.copies.mean()),
    }
    # timings
    one_in = c_dev[0, :1].clone()
    t_one = {k: v[:1].clone() for k, v in tabs.items()}
    for w in warps:
        res = plan_replication_gpu(one_in, t_one, D, num_warps=w)
        buf = res["_out"]

        def one(w: int = w, buf: dict = buf) -> None:
            plan_replication_gpu(one_in, t_one, D, num_warps=w, out=buf)

        eager, graph = [], []
        rep = graphed(one) if dev.type == "cuda" else one
        for t in range(test.shape[0]):
            for la in (0, layers // 2, layers - 1):
                one_in.copy_(c_dev[t, la:la + 1])
                for k, v in t_one.items():
                    v.copy_(tabs[k][la:la + 1])
                eager.append(time_us(one, dev, reps))
                graph.append(time_us(rep, dev, reps))
        out[f"one_eager_w{w}"] = statistics.median(eager)
        out[f"one_graph_w{w}"] = statistics.median(graph)
        all_in = c_dev[0].clone()
        res = plan_replication_gpu(all_in, tabs, D, num_warps=w)
        bufa = res["_out"]

        def alll(w: int = w, bufa: dict = bufa, all_in: Any = all_in) -> None:
            plan_replication_gpu(all_in, tabs, D, num_warps=w, out=bufa)

        repa = graphed(alll) if dev.type == "cuda" else alll
        ta = []
        for t in range(test.shape[0]):
            all_in.copy_(c_dev[t])
            ta.append(time_us(repa, dev, reps))
        out[f"all_graph_w{w}"] = statistics.median(ta)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU check of the script)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(__file__))
    import torch

    from _common import command_line, device_name, utc_minute, write_text

    dev = torch.device(args.device)
    if args.quick:
        configs = [(32, 8, 40, 2, 2, 4, 16, True)]
        warps, reps = [4], 2
    else:
        configs = [(256, 64, 320, 2, 58, 8, 2048, False), (256, 64, 320, 2, 58, 8, 2048, True),
                   (256, 64, 256, 2, 58, 8, 2048, False), (256, 32, 288, 2, 58, 8, 2048, True),
                   (256, 64, 320, 4, 58, 8, 2048, True)]
        warps, reps = [1, 2, 4, 8], args.reps
    rows = []
    for i, (E, R, S, D, L, T, tok, drift) in enumerate(configs):
        r = run_config(E, R, S, D, L, T, tok, drift, dev, reps, warps, seed=i)
        rows.append(r)
        print(r, flush=True)
    lines = [
        "# Per-step replication planner kernel",
        "",
        f"Device: {device_name(dev)}. Date: {utc_minute()}. Command: `{command_line(argv)}`.",
        "",
        "SYNTHETIC routing (Zipf popularity, 256 experts, top-8, 2048 tokens per rank; 'deepseek' static placement "
        "planned on 4 steps, planner run on 4 other steps x all layers; `drift`: the other steps' popularity is a "
        "random permutation of the planning steps', so the static placement is stale). Median microseconds (CUDA events). "
        "`1 layer`: one launch for one (step, layer); `all layers`: one launch for every layer of a step, "
        "per-layer time = total / layers. max/mean: rank load over mean rank load, averaged over problems, "
        "static uniform split before, plan after.",
        "",
        "| E | R | slots | D | layers | drift | GPU == CPU | max/mean before | after | iterations mean / max | copies mean |"
        + "".join(f" 1 layer eager w{w} | 1 layer graph w{w} | all layers graph w{w} (per layer) |" for w in warps),
        "| --- " * (11 + 3 * len(warps)) + "|",
    ]
    for r in rows:
        cells = [str(r["E"]), str(r["R"]), str(r["S"]), str(r["D"]), str(r["layers"]), "yes" if r["drift"] else "no", f"{r['equal']}/{r['problems']}",
                 f"{r['max_mean_before']:.3f}", f"{r['max_mean_after']:.3f}", f"{r['iters_mean']:.1f} / {r['iters_max']}",
                 f"{r['copies_mean']:.1f}"]
        for w in warps:
            a = r[f"all_graph_w{w}"]
            cells += [f"{r[f'one_eager_w{w}']:.1f}", f"{r[f'one_graph_w{w}']:.1f}", f"{a:.1f} ({a / r['layers']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0 if all(r["equal"] == r["problems"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
