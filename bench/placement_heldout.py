"""Held-out per-step imbalance of placement policies on REAL traces, and planning time at scale (one core).

Protocol (issue 21): plan on the first half of a workload's steps (or on another workload), evaluate the per-step
imbalance (max/mean - 1 of every step, TensorRT-LLM's metric, :func:`eplb.metrics.step_imbalance`) on the rest.

* REAL ESFT (DeepSeek-V2-Lite architecture, 26 x 64, top-6; 256 tokens per step, bench/_traces.py): each domain
  first half -> second half at (R, S) = (8, 64), (8, 80), (4, 72); every ordered pair of domains at (8, 80);
* REAL Llama-4-Maverick decode per MMLU subject (24 x 128, top-1): first half -> second half at (16, 144),
  (8, 136); each subject -> the other at (16, 144);
* SYNTHETIC timing: eplb.synthetic.deepseek_v3_like, 64-step window, 58 x 256 -> 288 slots / 32 ranks.

    python bench/placement_heldout.py [--policies deepseek,eplb,eplb-robust,eplb-dispatch]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _traces  # noqa: E402
import eplb  # noqa: E402
from _common import REPO, command_line, cpu_name, utc_minute, write_text  # noqa: E402
from eplb.metrics import step_imbalance  # noqa: E402
from eplb.policies import load_policy_plugins  # noqa: E402
from eplb.synthetic import deepseek_v3_like  # noqa: E402

torch.set_num_threads(1)


def rows() -> list[tuple[str, np.ndarray, np.ndarray, int, int]]:
    out = []
    esft = _traces.esft_domains()
    for d, c in esft.items():
        h = c.shape[0] // 2
        for R, S in ((8, 64), (8, 80), (4, 72)):
            out.append((f"ESFT {d} 1st half -> 2nd, R={R} S={S}", c[:h], c[h:], S, R))
    for a in esft:
        for b in esft:
            if a != b:
                out.append((f"ESFT {a} -> {b}, R=8 S=80", esft[a], esft[b], 80, 8))
    l4 = _traces.llama4_subjects()
    for d, c in l4.items():
        h = c.shape[0] // 2
        for R, S in ((16, 144), (8, 136)):
            out.append((f"Llama-4 {d} 1st half -> 2nd, R={R} S={S}", c[:h], c[h:], S, R))
    ks = list(l4)
    for a, b in ((0, 1), (1, 0)) if len(ks) == 2 else ():
        out.append((f"Llama-4 {ks[a]} -> {ks[b]}, R=16 S=144", l4[ks[a]], l4[ks[b]], 144, 16))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="deepseek,eplb,eplb-robust,eplb-dispatch")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "placement_heldout.md")
    args = ap.parse_args(argv)
    load_policy_plugins()
    pols = args.policies.split(",")
    assert pols[0] == "deepseek", "the first policy is the reference"
    table = []
    res: dict[str, list[float]] = {p: [] for p in pols}
    for name, plan_c, eval_c, S, R in rows():
        vals = []
        for p in pols:
            v = float(step_imbalance(eval_c, eplb.plan(plan_c, S, R, policy=p)).mean())
            res[p].append(v)
            vals.append(v)
        table.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        print(table[-1], flush=True)
    ds = np.array(res["deepseek"])
    summary = []
    for p in pols:
        v = np.array(res[p])
        summary.append(f"| {p} | {v.mean():.4f} | {1 - v.mean() / ds.mean():+.3f} | {np.mean(1 - v / ds):+.3f} | "
                       f"{int((v > ds * (1 + 1e-9)).sum())}/{len(v)} | {np.max(v / ds - 1):+.3f} |")
    c = deepseek_v3_like(64, tokens_per_step=4096, seed=0).astype(np.float64)
    eplb.plan(c[:2], 288, 32, policy="deepseek")  # warm-up
    timing = []
    for p in pols:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            eplb.plan(c, 288, 32, policy=p)
            ts.append(time.perf_counter() - t0)
        timing.append(f"| {p} | {min(ts) * 1e3:.0f} |")
    lines = [
        "# Held-out per-step imbalance and planning time (issue 21)",
        "",
        f"- date: {utc_minute()}",
        f"- device: CPU {cpu_name()}, one thread (OMP/BLAS = 1, torch.set_num_threads(1)); the 2-core machine is shared"
        " with other jobs (load average 5-8 during this run), so the times are upper bounds",
        f"- command: `{command_line(argv)}`",
        "- metric: per-step imbalance (max/mean - 1 of each step, averaged over the evaluation steps); every policy gets"
        " the per-step planning window [T, L, E]",
        "",
        "## Summary (REAL rows)",
        "",
        "| policy | mean | 1 - mean/deepseek mean | mean of (1 - row/deepseek row) | rows worse than deepseek |"
        " worst row vs deepseek |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *summary,
        "",
        "## Planning time, SYNTHETIC DeepSeek-V3 shape (58 x 256 -> 288 slots / 32 ranks, 64-step window), best of 3",
        "",
        "| policy | ms |",
        "| --- | ---: |",
        *timing,
        "",
        "## Rows",
        "",
        "| case | " + " | ".join(pols) + " |",
        "| --- | " + " | ".join("---:" for _ in pols) + " |",
        *table,
        "",
    ]
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines[:24]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
