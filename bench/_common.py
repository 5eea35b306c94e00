"""Shared header pieces of the benchmark scripts: device description, date, command line, atomic output, timing.

The scripts run as ``python bench/<name>.py`` (the script's folder is on ``sys.path``) and import this module
as ``_common``. Nothing heavy is imported at module level (``offline_demo.py`` times ``import eplb``, and
``sim_speed.py`` sets thread counts before numpy / torch load), so torch and eplb are imported inside the
functions that need them.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(dev: torch.device) -> str:
    """GPU name with CUDA and torch versions, or the CPU with the torch thread count."""
    import torch

    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads (torch {torch.__version__})"


def today() -> str:
    """Local date, ``YYYY-MM-DD``."""
    return datetime.date.today().isoformat()


def utc_minute() -> str:
    """UTC date and time to the minute, ``YYYY-MM-DD HH:MM UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line(argv: list[str] | None = None) -> str:
    """``python <script> <args>`` as run (shell-quoted); ``argv`` replaces ``sys.argv[1:]`` when given."""
    args = sys.argv[1:] if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *args])


def write_text(path: str | Path, text: str) -> None:
    """Write a result file atomically (``eplb.stats.trace.atomic_write``; parent folders are created)."""
    from eplb.stats.trace import atomic_write

    atomic_write(path, text.encode())


def sample_ms(fn: Callable[[], Any], dev: torch.device, warmup: int, repeats: int) -> list[float]:
    """Times of ``repeats`` calls of ``fn()`` in ms after ``warmup`` calls: CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)
        for _ in range(repeats):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def cuda_graphed(fn: Callable[[], Any], dev: torch.device, reps: int = 1) -> Callable[[], Any] | None:
    """``reps`` calls of ``fn`` captured in one CUDA graph (after 3 warm-up calls on a side stream); returns the
    graph's ``replay`` (``None`` on CPU). A model graph holds one call per layer: ``reps > 1`` measures that."""
    import torch

    if dev.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return g.replay
