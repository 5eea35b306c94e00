"""Wall time of the offline flow (``eplb demo``) on the CPU, and per-format write + read-back cost.

Runs the whole demo on the shipped REAL trace ``llama4_maverick_mmlu_decode`` (Llama-4-Maverick
routing on 235 MMLU requests; 128 decode steps x 24 MoE layers x 128 experts) --repeats times
in a fresh output directory and reports the median time of each stage, plus the size and the
write / read-back time of each map format at the demo's setting and at DeepSeek-V3 shape (58
layers x 288 slots over 36 ranks, a SYNTHETIC placement: only file I/O is timed there).

    python bench/offline_demo.py                 # writes bench/results/offline_demo.md
    python bench/offline_demo.py --quick         # one repeat, no plots
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import command_line, cpu_name, today, write_text


def format_io(pl: object, repeats: int) -> list[tuple[str, str, int, float, float]]:
    """(format, file, bytes, write ms, read ms) medians for every format."""
    from eplb.formats import read_placement, write_placement
    from eplb.offline import DEMO_FILES

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fmt, name in DEMO_FILES.items():
            path = Path(d) / name
            w, r = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                write_placement(pl, path, fmt)  # type: ignore[arg-type]
                t1 = time.perf_counter()
                read_placement(path, fmt, ep_size=pl.num_ranks, layer_ids=pl.layer_ids)  # type: ignore[attr-defined]
                t2 = time.perf_counter()
                w.append(t1 - t0)
                r.append(t2 - t1)
            rows.append((fmt, name, path.stat().st_size, statistics.median(w) * 1e3, statistics.median(r) * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, no plots")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "offline_demo.md")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    plots = not args.quick

    t_import = time.perf_counter()
    from eplb import Placement
    from eplb.offline import demo

    t_import = time.perf_counter() - t_import
    from eplb.formats import read_placement

    runs = []
    res = None
    demo_pl = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            res = demo(Path(d), plots=plots, echo=lambda *a: None)
            runs.append(res.timings)
            demo_pl = read_placement(res.files["native"])
    assert res is not None and demo_pl is not None
    stages = list(runs[0])
    med = {k: statistics.median(r[k] for r in runs) for k in stages}

    rng = np.random.default_rng(0)
    big_rows = []
    for _ in range(58):  # SYNTHETIC DeepSeek-V3-shaped placement: 256 experts, 288 slots = 36 ranks x 8, no duplicates
        ranks: list[list[int]] = [[] for _ in range(36)]
        for j, e in enumerate(rng.permutation(256).tolist()):
            ranks[j % 36].append(e)
        for r in ranks:
            while len(r) < 8:
                e = int(rng.integers(256))
                if e not in r:
                    r.append(e)
        big_rows.append([e for r in ranks for e in r])
    big = Placement(np.asarray(big_rows), 256, 36, layer_ids=tuple(range(3, 61)))
    io_demo = format_io(demo_pl, repeats)
    io_big = format_io(big, repeats)

    lines = [
        "# Offline flow: `eplb demo` wall time and map-format I/O",
        "",
        f"- date: {today()}",
        f"- device: {cpu_name()} (CPU only, no GPU, {os.cpu_count()} cores; load average at the end "
        f"{os.getloadavg()[0]:.1f}: timings on a shared machine), Python {platform.python_version()}",
        f"- command: `{command_line()}`",
        "- data: REAL trace `llama4_maverick_mmlu_decode` (128 decode steps x 24 MoE layers x 128 experts); "
        "the DeepSeek-V3-shaped placement of the I/O table is SYNTHETIC (file I/O only)",
        f"- demo setting: 16 ranks, 144 slots, plan on steps 0-63, evaluate on 64-127, plots {'on' if plots else 'off'}, "
        f"median of {repeats} run(s); `import eplb.offline` took {t_import:.2f} s",
        "",
        "| stage | median time (s) |",
        "| --- | --- |",
        *[f"| {k} | {med[k]:.2f} |" for k in stages],
        "",
        f"Result: imbalance {res.before.imbalance:.4f} without EPLB -> {res.after.imbalance:.4f} "
        f"({res.after.label})"
        + (f" -> {res.after.balanced_imbalance:.4f} with balanced dispatch" if res.after.balanced_imbalance is not None else "")
        + ".",
        "",
    ]
    for title, rows in (("demo placement (24 layers x 144 slots, 16 ranks)", io_demo),
                        ("DeepSeek-V3 shape (58 layers x 288 slots, 36 ranks; SYNTHETIC placement)", io_big)):
        lines += [f"Map formats, {title}:", "", "| format | file | bytes | write (ms) | read + validate (ms) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {f} | {n} | {b:,} | {w:.1f} | {r:.1f} |" for f, n, b, w, r in rows]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
