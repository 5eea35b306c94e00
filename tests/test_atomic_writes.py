"""kill -9 during writes: the final name always holds a complete old or new output, and the next write
leaves no temp / old sibling behind. Writers run in a subprocess that is killed at random moments."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eplb._atomic import atomic_dir, atomic_write, cleanup_stale
from eplb.stats.importers import read_trace, write_trace
from eplb.stats.trace import Trace

HERE = Path(__file__).resolve().parent
A, B = b"A" * 200_000, b"B" * 300_000


def _trace(v: int) -> Trace:
    return Trace(np.full((3, 2, 4), v, dtype=np.int64), (1, 3), top_k=2)


def _write(kind: str, path: Path, i: int) -> None:
    if kind == "file":
        atomic_write(path, A if i % 2 else B)
    elif kind == "trtllm":
        write_trace(_trace(1 + i % 2), path, "trtllm", ep_size=4, overwrite=True)
    else:
        write_trace(_trace(1 + i % 2), path, "eplb-dir", overwrite=True, chunk_steps=1)


def _child(kind: str, path: str, fallback: bool) -> None:  # runs in the killed subprocess
    if fallback:
        import eplb._atomic as atomic

        atomic.exchange = lambda a, b: False  # the rename-to-.old path (no renameat2)
    i = 0
    print("ready", flush=True)
    while True:
        _write(kind, Path(path), i)
        i += 1


def _check_complete(kind: str, path: Path) -> None:
    assert path.exists(), f"{path} is missing after the kill"
    if kind == "file":
        assert path.read_bytes() in (A, B)
    else:
        assert np.unique(read_trace(path).counts).tolist() in ([1], [2])  # trtllm: rank 0 + zero ranks


def _siblings(path: Path) -> list[str]:
    pat = re.compile(rf"^\.{re.escape(path.name)}\..*\.(tmp|old)$")
    return [p.name for p in path.parent.iterdir() if pat.match(p.name)]


@pytest.mark.parametrize(("kind", "fallback"), [("file", False), ("trtllm", False), ("eplb-dir", False),
                                                ("trtllm", True)])
def test_kill_9_never_leaves_an_empty_or_partial_output(tmp_path: Path, kind: str, fallback: bool) -> None:
    path = tmp_path / ("out.bin" if kind == "file" else "out")
    _write(kind, path, 0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(17)
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_atomic_writes as t; " \
           f"t._child({kind!r}, {str(path)!r}, {fallback!r})"
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if fallback:  # a kill between the two renames: the next write (or a reader's recover) restores it
            cleanup_stale(path)
        _check_complete(kind, path)
        _write(kind, path, 1)  # the next write cleans up what the killed writer left
        assert _siblings(path) == []
        _check_complete(kind, path)


def test_stale_siblings_of_a_dead_writer_are_removed_and_a_lost_dir_restored(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid = dead.pid
    dest = tmp_path / "out"
    old = tmp_path / f".out.{pid}.abc.old"
    old.mkdir()
    (old / "x").write_text("previous")
    (tmp_path / f".out.{pid}.def.tmp").mkdir()
    (tmp_path / f".f.bin.{pid}.ghi.tmp").write_bytes(b"half")
    mine = tmp_path / f".out.{os.getpid()}.jkl.tmp"  # a live writer's temp: kept
    mine.mkdir()
    atomic_dir(dest, lambda d: (d / "x").write_text("new"))
    assert (dest / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name, f".f.bin.{pid}.ghi.tmp"])
    atomic_write(tmp_path / "f.bin", b"ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name, "f.bin"])
    # the fallback's crash window: dest gone, the previous version under .old -> moved back
    os.rename(dest, tmp_path / f".out.{pid}.zzz.old")
    cleanup_stale(dest)
    assert (dest / "x").read_text() == "new"


def test_directory_replace_swaps_atomically(tmp_path: Path) -> None:
    from eplb._atomic import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (b / "f").read_text() == "a" and not (a / "f").exists()
