"""One placement for several workloads (eplb.plan_multi) against plan-on-each and no EPLB, on REAL traces.

Workload sets (bench/_traces.py, /work/shared/data): ESFT-vanilla-lite's four domains (26 x 64, top-6, steps of
256 tokens), Llama-4-Maverick's two MMLU subjects (24 x 128, top-1, decode steps), OLMoE's five text domains
(layers 0 / 7 / 15 x 64, aggregate counts: one step each, in-sample only).

Protocol (per-step traces): plan on the first half of every workload's steps, measure the mean per-step
imbalance (max / mean - 1 of rank load, TensorRT-LLM) on the second half of each. Columns per evaluated
workload: no EPLB (contiguous, S = E), plan-on-own (the default policy planned on that workload's first half),
worst plan-on-other (planned on another single workload), plan-on-all (ours: plan_multi on all first halves).

    python bench/placement_multi.py --out bench/results/placement_multi.md
"""

from __future__ import annotations

import argparse
import platform
import time

from _common import command_line, cpu_name, utc_minute, write_text
from _traces import esft_domains, llama4_subjects, olmoe_domains


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/placement_multi.md")
    args = ap.parse_args()
    import eplb
    from eplb.metrics import step_imbalance
    from eplb.placement import Placement

    sets = [("ESFT domains", esft_domains(), [(8, 64), (8, 80)]),
            ("Llama-4 subjects", llama4_subjects(), [(16, 128), (16, 144)]),
            ("OLMoE domains", olmoe_domains(), [(8, 64), (8, 80)])]
    lines = ["# One placement for several workloads (issue 21 item 2)", "",
             f"- date: {utc_minute()}",
             f"- device: CPU `{cpu_name()}` (2 cores shared with other jobs), Python {platform.python_version()}",
             f"- command: `{command_line()}`",
             "- data: REAL routing from /work/shared/data (SOURCES.md) via bench/_traces.py; policy: the default "
             "(`eplb`); imbalance = mean per-step max/mean - 1 of rank load, averaged over layers",
             "- protocol: plan on the first half of each workload's steps, evaluate on the second half (OLMoE: "
             "aggregate counts, one step, so in-sample)", ""]
    summary = []
    for title, wl, layouts in sets:
        if not wl:
            lines += [f"## {title}: data missing", ""]
            continue
        names = list(wl)
        for R, S in layouts:
            T = {n: a.shape[0] for n, a in wl.items()}
            plan_part = {n: (a[: T[n] // 2] if T[n] > 1 else a) for n, a in wl.items()}
            eval_part = {n: (a[T[n] // 2:] if T[n] > 1 else a) for n, a in wl.items()}
            L, E = next(iter(wl.values())).shape[1:]
            each = {n: eplb.plan(plan_part[n], S, R) for n in names}
            t0 = time.perf_counter()
            multi = eplb.plan_multi([plan_part[n] for n in names], S, R, names=names)
            dt = time.perf_counter() - t0
            none = Placement.contiguous(L, E, R)
            lines += [f"## {title}: {L} layers x {E} experts, {R} ranks, {S} slots (plan_multi {dt:.2f} s)", "",
                      "| evaluated on | steps | no EPLB | plan-on-own | worst plan-on-other | plan-on-all (ours) | "
                      "ours <= no EPLB |", "|---|---|---|---|---|---|---|"]
            ok_all = True
            for n in names:
                ev = eval_part[n]
                imb = lambda p, ev=ev: float(step_imbalance(ev, p).mean())  # noqa: E731
                base, own, ours = imb(none), imb(each[n]), imb(multi)
                other = max((imb(each[m]) for m in names if m != n), default=float("nan"))
                ok = ours <= base * (1 + 1e-9)
                ok_all &= ok
                lines.append(f"| {n} | {ev.shape[0]} | {base:.4f} | {own:.4f} | {other:.4f} | {ours:.4f} | "
                             f"{'yes' if ok else 'NO'} |")
            summary.append((title, R, S, ok_all))
            lines.append("")
    lines += ["## Target: plan-on-all never worse than no EPLB on any single workload", "",
              "| workloads | ranks / slots | met |", "|---|---|---|"]
    lines += [f"| {t} | {R} / {S} | {'yes' if ok else 'NO'} |" for t, R, S, ok in summary]
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
