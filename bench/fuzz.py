"""Reliability fuzz: >= 10,000 mutated inputs over every eplb reader and the plan path, outcome counts.

Inputs are SYNTHETIC: small valid placements / traces written by eplb's own writers, then mutated
(eplb._fuzz: adversarial leaves, dropped / added keys, ragged lists, deep nesting, uint64 past 2**63,
floats past 2**53, booleans, truncated / flipped bytes, TensorRT-LLM ``load_balancer`` paths to
/dev/zero, a FIFO or outside the config's folder; adversarial loads and sizes for ``eplb.plan``).
Outcomes (target: 0 unclear, 0 silent-wrong, 0 hang): see eplb._fuzz. Also times ``eplb-incremental``
at 4,096 ranks (SYNTHETIC gamma loads), the shape the review measured at 274 s.

    python bench/fuzz.py                   # 12,000 cases, writes bench/results/fuzz.md
    python bench/fuzz.py --cases 500       # quick
"""

from __future__ import annotations

import argparse
import collections
import time
import warnings

from _common import REPO, command_line, cpu_name, today, utc_minute, write_text


def _incremental(ranks: int, layers: int) -> float:
    import numpy as np

    import eplb

    rng = np.random.default_rng(0)
    loads = rng.gamma(0.5, 100, (4, layers, 256))
    cur = eplb.plan(loads[:2], ranks, ranks, policy="deepseek")
    t0 = time.perf_counter()
    eplb.plan(loads[2:], ranks, ranks, policy="eplb-incremental", current=cur)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12_000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--limit-s", type=float, default=10.0, help="per-case time limit (a longer case is a hang)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fuzz.md"))
    ap.add_argument("--before", action="store_true",
                    help="run against an older eplb on PYTHONPATH (no /dev/zero case, 8 GiB address-space cap)")
    args = ap.parse_args()
    import eplb._fuzz as fz
    from eplb._fuzz import OUTCOMES, run_cases

    if args.before:
        import resource

        fz.INDIRECT_TARGETS.remove("/dev/zero")
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_cases(args.cases, args.seed, limit_s=args.limit_s)
    secs = time.perf_counter() - t0
    by = collections.defaultdict(collections.Counter)
    for o in res:
        by[o.reader][o.kind] += 1
    total = collections.Counter(o.kind for o in res)
    inc = [] if args.before else [(r, layers, _incremental(r, layers)) for r, layers in ((1024, 4), (4096, 4))]
    lines = [
        "# Reliability fuzz: every reader and the plan path",
        "",
        f"- device: {cpu_name()} (one process; a shared machine)",
        f"- date: {today()} ({utc_minute()})",
        f"- command: `{command_line()}`",
        f"- data: SYNTHETIC -- small valid maps / traces from eplb's writers, mutated by `eplb._fuzz` (seed {args.seed}); "
        f"{len(res)} cases in {secs:.0f} s, per-case limit {args.limit_s:g} s",
        "- outcomes: clear = eplb error naming the file (plan: ValueError naming the argument); valid = accepted and equal "
        "to the input's exact values; silent-wrong = accepted but not equal (or no exact values); unclear = another "
        "exception type or an error without the file; hang = past the limit",
        "",
        "| reader / path | cases | " + " | ".join(OUTCOMES) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in OUTCOMES) + " |",
    ]
    for g in sorted(by):
        c = by[g]
        lines.append(f"| {g} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in OUTCOMES) + " |")
    lines.append(f"| **all** | **{len(res)}** | " + " | ".join(f"**{total[k]}**" for k in OUTCOMES) + " |")
    bad = collections.Counter((o.kind, o.fmt, o.mutation, o.detail[:100]) for o in res
                              if o.kind in ("unclear", "silent-wrong", "hang"))
    if bad:
        lines += ["", "Cases off target:", "", "| count | outcome | reader | mutation | detail |", "| ---: | --- | --- | --- | --- |"]
        lines += [f"| {n} | {k} | {f} | {m} | {d} |" for (k, f, m, d), n in bad.most_common(30)]
    if inc:
        lines += ["", "## eplb-incremental at scale (SYNTHETIC gamma(0.5) loads, 256 experts, one slot per rank)", "",
                  "| ranks | layers | seconds |", "| ---: | ---: | ---: |"]
        lines += [f"| {r} | {layers} | {s:.2f} |" for r, layers, s in inc]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
