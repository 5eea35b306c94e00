"""Planning time of every registered policy on ONE CPU core at the issue-21 speed shapes.

Shapes (loads SYNTHETIC: ``eplb.synthetic.zipf_popularity`` per layer, each step a multinomial draw of 4096 x 8 routed
tokens, a 64-step ``[T, L, E]`` window):

* DeepSeek-V3: 58 layers x 256 experts -> 288 slots / 32 ranks (budget <= 100 ms);
* scale: 61 layers x 384 experts -> 640 and 960 slots / 320 ranks (budget <= 1 s).

Each (shape, policy) runs in its own child process with OMP / MKL / OpenBLAS threads = 1 and
``torch.set_num_threads(1)``, timed around ``eplb.plan`` only (loads built first; the policy's module imported and one warm-up plan on a tiny case, so the one-time
import of scipy (about 2 s here) is not counted);
the child is killed after ``--timeout`` seconds and the row then reads ``> timeout``. ``eplb-incremental`` is given
the ``deepseek`` placement of the same window as ``current=``. Best of ``--repeats`` (the machine is shared, so
times are noisy; the minimum is the least disturbed run).

    python bench/placement_speed.py [--quick] [--repeats N] [--timeout S]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import REPO, command_line, cpu_name, utc_minute, write_text  # noqa: E402

SHAPES = [  # name, steps, layers, experts, slots, ranks, budget s
    ("DeepSeek-V3 58x256 -> 288 / 32", 64, 58, 256, 288, 32, 0.1),
    ("320 ranks 61x384 -> 640", 64, 61, 384, 640, 320, 1.0),
    ("320 ranks 61x384 -> 960", 64, 61, 384, 960, 320, 1.0),
]

_CHILD = r"""
import os, sys, json, time
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[v] = "1"
import numpy as np, torch
torch.set_num_threads(1)
import eplb
from eplb.synthetic import zipf_popularity
pol, T, L, E, S, R, reps = sys.argv[1], *map(int, sys.argv[2:8])
rng = np.random.default_rng(0)
probs = zipf_popularity(L, E, 1.0, rng)
loads = rng.multinomial(4096 * 8, np.broadcast_to(probs, (T, L, E))).astype(np.float64)
opts = {}
if pol == "eplb-incremental":
    opts["current"] = eplb.plan(loads, S, R, policy="deepseek")
def synthetic_topk(probs, n, k, rng):  # SYNTHETIC routed ids [n, L, k]: k distinct experts per token (Gumbel top-k)
    g = np.log(probs)[None] - np.log(-np.log(rng.random((n,) + probs.shape)))
    return np.argsort(-g, axis=-1)[..., :k]
if pol == "eplb-cooc":
    opts["topk_ids"] = synthetic_topk(probs, 1024, 8, rng)
from eplb.policies.registry import policy_info
policy_info(pol)  # imports the policy's module (scipy etc.: a one-time cost, not planning time)
w = np.random.default_rng(1).random((2, 3, 16)) + 0.5
warm = {"current": eplb.plan(w, 32, 8, policy="deepseek")} if "current" in opts else {}
if "topk_ids" in opts:
    warm["topk_ids"] = synthetic_topk(w.sum(0) / w.sum(0).sum(-1, keepdims=True), 64, 2, rng)
eplb.plan(w, 32, 8, policy=pol, **warm)
ts = []
for _ in range(reps):
    t0 = time.perf_counter()
    eplb.plan(loads, S, R, policy=pol, **opts)
    ts.append(time.perf_counter() - t0)
    print(json.dumps({"times": ts}), flush=True)
"""


def _run(pol: str, shape: tuple, repeats: int, timeout: float) -> tuple[list[float], bool]:
    _, T, L, E, S, R, _ = shape
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, pol, str(T), str(L), str(E), str(S), str(R), str(repeats)],
                             capture_output=True, text=True, timeout=timeout, env=env)
        lines, killed = out.stdout.strip().splitlines(), False
        if out.returncode != 0:
            raise RuntimeError(f"{pol} at {shape[0]} failed:\n{out.stderr[-2000:]}")
    except subprocess.TimeoutExpired as e:
        so = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        lines, killed = so.strip().splitlines(), True
    times = json.loads(lines[-1])["times"] if lines else []
    return times, killed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the DeepSeek-V3 shape only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per (shape, policy) child process")
    ap.add_argument("--policies", default="", help="comma-separated subset (default: every registered policy)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "placement_speed.md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from eplb.policies.registry import POLICIES

    pols = [p for p in args.policies.split(",") if p] or list(POLICIES)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for shape in shapes:
        for pol in pols:
            times, killed = _run(pol, shape, args.repeats, args.timeout)
            if times:
                best = min(times)
                cell = f"{best * 1e3:.0f}" + (f" ({len(times)} of {args.repeats} runs before the kill)" if killed else "")
                ok = "yes" if best <= shape[6] else "no"
            else:
                cell, ok = f"> {args.timeout * 1e3:.0f} (killed)", "no"
            print(f"{shape[0]} | {pol} | {cell} ms | within budget: {ok}", flush=True)
            rows.append(f"| {shape[0]} | {pol} | {cell} | {shape[6] * 1e3:.0f} | {ok} |")
    lines = [
        "# Placement planning speed, one CPU core (issue 21 item 3)",
        "",
        f"- date: {utc_minute()}",
        f"- device: CPU `{cpu_name()}`, {os.cpu_count()} cores on the machine (shared with other jobs), ONE thread per"
        f" child process (OMP/MKL/OpenBLAS = 1, torch.set_num_threads(1)); Python {platform.python_version()}",
        f"- command: `{command_line(argv)}`",
        f"- loads: SYNTHETIC Zipf `[64, L, E]` window (eplb.synthetic.zipf_popularity per layer, skew 1, each step a multinomial draw of 4096 x 8 routed tokens, seed 0);"
        f" `eplb-cooc` also gets SYNTHETIC `topk_ids` [1024, L, 8] (Gumbel top-8 draws from the same popularity); time = best of {args.repeats} `eplb.plan` calls; a child still running after {args.timeout:.0f} s is killed",
        "",
        "| shape | policy | time ms | budget ms | within budget |",
        "| --- | --- | ---: | ---: | --- |",
        *rows,
        "",
    ]
    write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
