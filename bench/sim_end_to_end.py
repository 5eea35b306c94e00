"""`eplb simulate` end to end on a 10,000-step x 58-layer x 256-expert trace: wall time and peak memory.

Issue 21's target: < 10 s and < 1 GB for the whole command (load, validate, plan, replay, report). Each run is
one `python -m eplb simulate` child process; its wall time and peak resident memory (``ru_maxrss`` of that
child, from ``os.wait4``) are reported. The trace is SYNTHETIC: a Zipf(0.5) popularity per layer, re-drawn
every 1,000 steps, and Poisson counts around 32,768 (token, expert) pairs per step and layer, saved as an
int32 ``.npy`` file (generated first, not timed).

    python bench/sim_end_to_end.py                 # writes bench/results/sim_end_to_end.md
    python bench/sim_end_to_end.py --steps 2000    # smaller
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, command_line, cpu_name, utc_minute, write_text


def synthetic_trace(path: Path, steps: int, layers: int, experts: int, seed: int = 0) -> None:
    """SYNTHETIC ``[steps, layers, experts]`` int32 counts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = np.empty((steps, layers, experts), dtype=np.int32)
    base = 1.0 / np.arange(1, experts + 1) ** 0.5
    base /= base.sum()
    for s in range(0, steps, 1000):
        pop = np.stack([base[rng.permutation(experts)] for _ in range(layers)])
        n = min(1000, steps - s)
        out[s:s + n] = rng.poisson(32768 * pop, size=(n, layers, experts))
    np.save(path, out)


def run(args: list[str]) -> tuple[float, float, int]:
    """``(wall s, peak RSS MB, exit status)`` of one ``python -m eplb`` child."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "eplb", *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.returncode:
        print(err[-2000:], file=sys.stderr)
    return wall, ru.ru_maxrss / 1024, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--ep-size", type=int, default=36)
    ap.add_argument("--num-slots", type=int, default=288)
    ap.add_argument("--policies", nargs="+", default=["deepseek", "eplb"])
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/sim_end_to_end.md")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.npy"
        synthetic_trace(path, a.steps, a.layers, a.experts)
        load0 = os.getloadavg()[0]
        for pol in a.policies:
            for strat in ("uniform", "balanced"):
                wall, mb, rc = run(["simulate", str(path), "--ep-size", str(a.ep_size), "--num-slots",
                                    str(a.num_slots), "--policy", pol, "--strategy", strat, "--no-progress"]
                                   if strat == "uniform" else
                                   ["simulate", str(path), "--ep-size", str(a.ep_size), "--num-slots",
                                    str(a.num_slots), "--policy", pol, "--strategy", strat, "--no-progress",
                                    "--sim-range", "0-200"])
                rows.append((pol, strat, 200 if strat == "balanced" else a.steps, wall, mb, rc))
                print(rows[-1], flush=True)
        load1 = os.getloadavg()[0]
    shape = f"{a.steps} x {a.layers} x {a.experts}"
    lines = [
        "# `eplb simulate` end to end (issue 21: 10k x 58 x 256 in < 10 s and < 1 GB)", "",
        f"- date: {utc_minute()}",
        f"- device: CPU `{cpu_name()}`, {os.cpu_count()} cores on the machine, one thread (OMP/BLAS = 1); "
        f"load average (1 min) {load0:.1f} before, {load1:.1f} after (a shared machine: times are upper bounds)",
        f"- command: `{command_line()}`",
        f"- data: SYNTHETIC {shape} int32 `.npy` (Zipf(0.5) popularity re-drawn every 1,000 steps, Poisson counts "
        "around 32,768 pairs per step and layer); plan window = all steps; the balanced runs replay steps 0-199 "
        "(`--sim-range 0-200`) after planning on all steps",
        f"- layout: {a.ep_size} ranks, {a.num_slots} slots; each run is one `python -m eplb simulate` process "
        "(import, load and validate, plan, replay, report, the auto-dispatch line)", "",
        "| policy | strategy | replayed steps | wall s | peak RSS MB | exit |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {p} | {s} | {n} | {w:.1f} | {m:.0f} | {rc} |" for p, s, n, w, m, rc in rows]
    write_text(a.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
