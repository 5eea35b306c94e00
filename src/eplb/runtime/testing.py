"""Run a function on ``N`` local processes with a ``torch.distributed`` group (gloo), with a hard timeout.

Used by the runtime's multi-process tests and handy for trying the EP layer on a laptop::

    from eplb.runtime.testing import run_distributed
    results = run_distributed(worker, 2, arg1, timeout_s=60)   # worker(rank, world_size, arg1) -> picklable

Each process initialises the default group over TCP on a free local port, runs ``fn``, and
destroys the group. Return values come back in rank order. If any process raises, the error (with
its traceback) is raised here; if they do not all finish within ``timeout_s`` (a hang), every process
is killed and ``TimeoutError`` is raised.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from eplb.errors import InputError

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, out_dir: str,
           collective_timeout_s: float, args: tuple[Any, ...]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        try:
            result: Any = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0,
                    backend: str = "gloo", start_method: str = "fork",
                    collective_timeout_s: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results in rank order.

    ``fn`` must be picklable for ``start_method="spawn"`` (a module-level function). Raises
    ``RuntimeError`` with the first failing rank's traceback, or ``TimeoutError`` after ``timeout_s``.
    """
    if world_size < 1:
        raise InputError(f"world_size: expected a positive integer, got {world_size}")
    coll = collective_timeout_s if collective_timeout_s is not None else max(5.0, timeout_s)
    with tempfile.TemporaryDirectory(prefix="eplb-dist-") as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, out_dir, coll, args),
                                 nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.05, min(0.5, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed: {world_size} processes did not finish within {timeout_s} s "
                                       f"(a collective hang?)")
        except mp.ProcessExitedException as exc:
            raise RuntimeError(f"run_distributed: a process died: {exc}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results: list[Any] = []
        errors: list[str] = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(value)
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise RuntimeError("run_distributed: " + "\n".join(errors))
        return results
