"""Simulator speed on one CPU core: 10,000 steps x 58 layers x 256 experts at 36 ranks (target < 10 s), and 320 ranks.

Data is SYNTHETIC (eplb.synthetic.drifting_hot_set: Zipf popularity re-drawn every --period steps; each step
routes --pairs (token, expert) pairs per layer drawn independently, i.e. 4096 tokens x top-8 approximated by
32,768 top-1 draws, which the generator does quickly). Only the simulation is timed, not the data generation.

    python bench/sim_speed.py                      # full size, writes bench/results/sim_speed.md
    python bench/sim_speed.py --quick              # small size (smoke test)
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core: set before numpy loads
    os.environ[_v] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from _common import command_line, cpu_name, today, write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=32_768, help="(token, expert) pairs per step and layer")
    ap.add_argument("--period", type=int, default=1000, help="steps between hot-set changes")
    ap.add_argument("--skew", type=float, default=0.5, help="Zipf exponent of expert popularity")
    ap.add_argument("--ranks", type=int, nargs="+", default=[36, 320])
    ap.add_argument("--balanced-steps", type=int, default=20, help="steps timed with the balanced strategy (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each static replay (the minimum is reported)")
    ap.add_argument("--quick", action="store_true", help="small size: 500 steps x 8 layers")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sim_speed.md"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.layers, args.period, args.balanced_steps = 500, 8, 100, 5
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        pinned = f"pinned to CPU {min(os.sched_getaffinity(0))}"
    except (AttributeError, OSError):
        pinned = "not pinned"
    import torch

    torch.set_num_threads(1)
    import eplb
    from eplb.online import BalancerConfig
    from eplb.sim import replay_online, replay_static
    from eplb.sim.engine import SimInput
    from eplb.synthetic import drifting_hot_set

    T, L, E = args.steps, args.layers, args.experts
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    counts = drifting_hot_set(T, L, E, tokens_per_step=args.pairs, top_k=1, skew=args.skew, period=args.period, seed=0)
    gen_s = time.perf_counter() - t0
    data = SimInput(counts, np.arange(T), tuple(range(L)), "SYNTHETIC drifting_hot_set", 1, True)
    train = counts[: min(T, args.period)]
    rows: list[tuple[str, ...]] = []

    def timed(fn, repeats: int = args.repeats):  # noqa: ANN001, ANN202
        best = float("inf")
        for _ in range(repeats):  # the minimum of a few runs: the machine may be shared
            t = time.perf_counter()
            r = fn()
            best = min(best, time.perf_counter() - t)
        return r, best

    for R in args.ranks:
        spr = max(1, -(-E // R))
        S = spr * R
        pl = eplb.plan(train, S, R, policy="deepseek")
        res, s = timed(lambda pl=pl: replay_static(data, pl))
        sm = res.summary()
        rows.append(("static, uniform split, deepseek placement", str(R), str(S), f"{T}x{L}x{E}", f"{s:.2f}",
                     f"{T / s:,.0f}", f"{sm['imbalance_mean']:.3f}", f"{sm['step_ms_mean']:.2f}"))
        print(rows[-1], flush=True)
        if R == args.ranks[0]:
            cfg = BalancerConfig(num_slots=S, num_iterations_eplb_update=args.period // 2, num_wait_worker_iterations=30,
                                 eplb_update_threshold=0.95, layer_updates_per_iter=4, window_size=args.period // 2,
                                 policy="deepseek", policy_backend="inline")
            res, s = timed(lambda pl=pl, cfg=cfg: replay_online(data, pl, cfg), 1)
            sm = res.summary()
            rows.append((f"online (check every {args.period // 2} steps, 4 layers/step, deepseek), "
                         f"{sm['plans']} plans, {sm['layer_updates']} layer updates", str(R), str(S), f"{T}x{L}x{E}",
                         f"{s:.2f}", f"{T / s:,.0f}", f"{sm['imbalance_mean']:.3f}", f"{sm['step_ms_mean']:.2f}"))
            print(rows[-1], flush=True)
            if args.balanced_steps:
                n = min(T, args.balanced_steps)
                res, s = timed(lambda pl=pl, n=n: replay_static(data.slice_steps(0, n), pl, strategy="balanced"), 1)
                sm = res.summary()
                rows.append(("static, balanced split (eplb.dispatch.split_counts)", str(R), str(S), f"{n}x{L}x{E}",
                             f"{s:.2f}", f"{n / s:,.1f}", f"{sm['imbalance_mean']:.3f}", f"{sm['step_ms_mean']:.2f}"))
                print(rows[-1], flush=True)

    load_after = os.getloadavg()
    head = ("| run | ranks | slots | steps x layers x experts | seconds | steps/s | imbalance mean | "
            "simulated step ms mean |")
    lines = [
        "# Simulator speed (one CPU core)", "",
        f"- device: {cpu_name()}, {pinned}, OMP/OpenBLAS/MKL/torch threads = 1; Python {platform.python_version()}, "
        f"numpy {np.__version__}",
        f"- date: {today()}; machine load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (a shared machine: static replays report the minimum of {args.repeats} runs, the "
        f"online and balanced runs one run)",
        f"- command: `{command_line()}`",
        f"- data: SYNTHETIC -- `eplb.synthetic.drifting_hot_set({T}, {L}, {E}, tokens_per_step={args.pairs}, top_k=1, "
        f"skew={args.skew}, period={args.period}, seed=0)` ({args.pairs} independent (token, expert) draws per step and layer, "
        f"standing in for 4096 tokens x top-8); generated in {gen_s:.1f} s (not timed)",
        "- placements: `deepseek` planned on the first "
        f"{len(train)} steps; cost model: the default ({_src()})",
        "- timed: the replay only (rank loads, imbalance, cost model, online decisions); target: 10,000 x 58 x 256 at "
        "36 ranks in < 10 s", "",
        head, "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)
    print(f"wrote {args.out}")


def _src() -> str:
    from eplb.sim.cost import default_cost_model

    m = default_cost_model()
    return f"{m.device}, {m.date}"


if __name__ == "__main__":
    main()
