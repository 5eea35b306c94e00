"""eplb / DeepSeek against the exact optimum (HiGHS MILP, eplb.policies.exact) on small single-layer instances.

Protocol of issue 21: per shape (E 8-16 experts, R 3-4 ranks, S from the first multiple of R >= E up to
E + 2R slots) 16 random instances (SYNTHETIC loads: floor(lognormal(0, 1) * 100) + 1, seed 21). The
reference is solved with relative gap 1e-6 and a time limit; "opt" is then known to lie in
[bound, best solution]; a policy is "above" when its max rank load exceeds the best solution found, and its
gap is measured against the proven bound (an upper bound on the true gap).

    python bench/placement_exact.py --out bench/results/placement_exact.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

from _common import command_line, cpu_name, utc_minute, write_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/placement_exact.md")
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=10.0, help="reference solve limit per instance (s)")
    args = ap.parse_args()
    import eplb
    from eplb.metrics import lower_bound, max_rank_load
    from eplb.policies.exact import exact_layer

    rng = np.random.default_rng(21)
    rows = []
    for E in (8, 12, 16):
        for R in (3, 4):
            for S in range(-(-E // R) * R, E + 2 * R + 1, R):
                st = {k: [] for k in ("eplb", "eplb-noexact", "deepseek")}
                above = {k: 0 for k in st}
                proven, lb_ok, t_ref, t_pol = 0, True, [], []
                for _ in range(args.instances):
                    w = np.floor(rng.lognormal(0.0, 1.0, E) * 100) + 1
                    t0 = time.perf_counter()
                    got = {"eplb": float(max_rank_load(w[None], eplb.plan(w[None], S, R, exact="auto"))[0])}
                    t_pol.append(time.perf_counter() - t0)
                    got["eplb-noexact"] = float(max_rank_load(w[None], eplb.plan(w[None], S, R, exact="off"))[0])
                    got["deepseek"] = float(max_rank_load(w[None], eplb.plan(w[None], S, R, policy="deepseek"))[0])
                    ref = exact_layer(w, S, R, upper=min(got.values()), time_limit=args.time_limit, mip_rel_gap=1e-6)
                    t_ref.append(ref.seconds)
                    best = min(ref.max_load, *got.values())
                    proven += ref.optimal
                    lb_ok &= bool(lower_bound(w[None], S, R)[0] <= best * (1 + 1e-9))
                    for k, v in got.items():
                        above[k] += v > best * (1 + 1e-9)
                        st[k].append(v / ref.bound - 1)
                rows.append((E, R, S, args.instances, proven, above, {k: max(v) for k, v in st.items()}, lb_ok,
                             float(np.median(t_pol)), max(t_pol), max(t_ref)))
                print(rows[-1], flush=True)
    lines = ["# eplb vs the exact optimum on small instances (issue 21)", "",
             f"- date: {utc_minute()}",
             f"- device: CPU `{cpu_name()}` (2 cores shared with other jobs), Python {platform.python_version()}",
             f"- command: `{command_line()}`",
             f"- loads: SYNTHETIC, floor(lognormal(0, 1) * 100) + 1 per expert, seed 21, {args.instances} per shape",
             f"- reference: `eplb.policies.exact.exact_layer` (HiGHS via scipy.optimize.milp), gap 1e-6, "
             f"{args.time_limit:g} s limit; 'proven' = solved to that gap; gaps are against the proven lower "
             "bound (so they over-state the true gap where not proven)",
             "- `eplb` = `eplb` with its opt-in exact path (`exact=\"auto\"`, its default 1 s limit, gap 0.5%); "
             "`eplb exact=off` = the heuristic alone", "",
             "| E | R | S | instances | proven | eplb above best | eplb worst gap | eplb exact=off above | "
             "exact=off worst gap | deepseek above | deepseek worst gap | lower bound <= best | eplb time median / max s "
             "| reference max s |", "|" + "---|" * 14]
    for E, R, S, n, pr, ab, wg, lb_ok, tm, tx, tr in rows:
        lines.append(f"| {E} | {R} | {S} | {n} | {pr} | {ab['eplb']} | {wg['eplb']:.2%} | {ab['eplb-noexact']} | "
                     f"{wg['eplb-noexact']:.2%} | {ab['deepseek']} | {wg['deepseek']:.2%} | {'yes' if lb_ok else 'NO'} | "
                     f"{tm:.2f} / {tx:.2f} | {tr:.2f} |")
    write_text(args.out, "\n".join(lines) + "\n")
    print("wrote", args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
