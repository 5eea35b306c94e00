"""Issue 21 research: does a prior / robust planning load make a static placement generalise? (REAL rows)

The rows and metric of bench/placement_heldout.py (plan on a window, measure per-step imbalance on held-out steps or
another domain). Every variant is the default ``eplb`` policy planned on a transformed planning load:

* ``eplb``: the window itself (today's default); ``sum``: ``window="sum"`` (the summed loads);
* ``shrinkA``: per step and layer, ``(1 - A) * load + A * uniform`` of the same total (shrinkage toward uniform);
* ``q90``: the per-expert 90th percentile over the window's steps, as one ``[L, E]`` load;
* ``msd``: per-expert mean + one standard deviation over steps (variance-aware replica counts);
* ``sqrt``: square-rooted per-step counts (flattened hot experts);
* ``oracle``: planned on the evaluation window itself (the ceiling of a static placement; not a policy).

    python bench/placement_heldout_priors.py [--variants eplb,sum,...] [--out FILE]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eplb  # noqa: E402
from _common import REPO, command_line, cpu_name, utc_minute, write_text  # noqa: E402
from eplb.metrics import step_imbalance  # noqa: E402
from placement_heldout import rows  # noqa: E402

torch.set_num_threads(1)


def _shrink(c: np.ndarray, a: float) -> np.ndarray:
    c = c.astype(np.float64)
    return (1 - a) * c + a * c.sum(-1, keepdims=True) / c.shape[-1]


def planned(variant: str, plan_c: np.ndarray, eval_c: np.ndarray, S: int, R: int) -> eplb.Placement:
    c = plan_c.astype(np.float64)
    if variant == "oracle":
        return eplb.plan(eval_c, S, R, policy="eplb")
    if variant == "sum":
        return eplb.plan(c, S, R, policy="eplb", window="sum")
    if variant.startswith("shrink"):
        return eplb.plan(_shrink(c, float(variant[6:])), S, R, policy="eplb")
    load = {"eplb": lambda: c, "q90": lambda: np.quantile(c, 0.9, axis=0), "msd": lambda: c.mean(0) + c.std(0),
            "sqrt": lambda: np.sqrt(c)}[variant]()
    return eplb.plan(load, S, R, policy="eplb")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="eplb,sum,shrink0.2,shrink0.6,q90,msd,sqrt,oracle")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "placement_heldout_priors.md")
    args = ap.parse_args(argv)
    vs = ["deepseek", *args.variants.split(",")]
    res: dict[str, list[float]] = {v: [] for v in vs}
    table = []
    for name, plan_c, eval_c, S, R in rows():
        vals = []
        for v in vs:
            p = eplb.plan(plan_c, S, R, policy="deepseek") if v == "deepseek" else planned(v, plan_c, eval_c, S, R)
            x = float(step_imbalance(eval_c, p).mean())
            res[v].append(x)
            vals.append(x)
        table.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in vals) + " |")
        print(table[-1], flush=True)
    ds = np.array(res["deepseek"])
    n_esft = sum(1 for r in rows() if r[0].startswith("ESFT"))
    summary = []
    for v in vs:
        x = np.array(res[v])
        summary.append(f"| {v} | {x.mean():.4f} | {1 - x.mean() / ds.mean():+.3f} | {np.mean(1 - x / ds):+.3f} | "
                       f"{1 - x[:n_esft].mean() / ds[:n_esft].mean():+.3f} | "
                       f"{1 - x[n_esft:].mean() / ds[n_esft:].mean():+.3f} | "
                       f"{int((x > ds * (1 + 1e-9)).sum())}/{len(x)} | {np.max(x / ds - 1):+.3f} |")
    lines = [
        "# Prior / robust planning loads on held-out per-step imbalance (issue 21 research)",
        "",
        f"- date: {utc_minute()}",
        f"- device: CPU {cpu_name()}, one thread; the 2-core machine is shared with other jobs",
        f"- command: `{command_line(argv)}`",
        "- rows and metric: those of bench/placement_heldout.py; every variant is the default `eplb` planned on a"
        " transformed planning load (module docstring); `oracle` plans on the evaluation window (a ceiling, not a"
        " policy)",
        "",
        "## Summary",
        "",
        "| variant | mean | 1 - mean/deepseek mean | mean of (1 - row/deepseek row) | ESFT rows: 1 - mean/ds |"
        " Llama-4 rows: 1 - mean/ds | rows worse than deepseek | worst row vs deepseek |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *summary,
        "",
        "## Rows",
        "",
        "| case | " + " | ".join(vs) + " |",
        "| --- | " + " | ".join("---:" for _ in vs) + " |",
        *table,
        "",
    ]
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines[:20]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
