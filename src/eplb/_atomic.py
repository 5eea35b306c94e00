"""Crash-safe writes: a file or a directory is either the old complete one or the new complete one.

* :func:`atomic_write` writes a temp sibling ``.NAME.PID.XXXX.tmp``, ``fsync``\\ s it, renames it over
  ``NAME`` and ``fsync``\\ s the directory.
* :func:`atomic_dir` builds a directory under a temp sibling, ``fsync``\\ s every file in it, then swaps
  it with the old directory in one ``renameat2(RENAME_EXCHANGE)`` (Linux, through ``ctypes``), so
  ``NAME`` always names a complete directory. Where the exchange is not available the old directory
  is renamed to ``.NAME.PID.XXXX.old`` and the new one moved in; a kill between the two renames
  leaves the old one there, and the next write (or :func:`recover`) moves it back.
* Temp and old siblings left by a killed writer (its PID no longer runs) are removed by the next
  write of the same name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write", "cleanup_stale", "exchange", "recover"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}


def _sibling_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[^.]+\.(tmp|old)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def recover(path: str | os.PathLike[str]) -> None:
    """If ``path`` is missing but a killed writer left its previous version as a ``.old`` sibling,
    move that back (the fallback of :func:`atomic_dir` between its two renames)."""
    p = Path(path)
    if p.exists() or not p.parent.is_dir():
        return
    pat = _sibling_re(p.name)
    olds = [q for q in p.parent.iterdir() if (m := pat.match(q.name)) and m.group(2) == "old"
            and not _alive(int(m.group(1)))]
    if olds:
        newest = max(olds, key=lambda q: q.stat().st_mtime)
        os.replace(newest, p)


def cleanup_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.NAME.PID.*.tmp`` / ``.old`` siblings of ``path`` whose writer no longer runs; returns them."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    recover(p)
    pat = _sibling_re(p.name)
    gone = []
    for q in p.parent.iterdir():
        m = pat.match(q.name)
        if m and not _alive(int(m.group(1))):
            _remove(q)
            gone.append(q)
    return gone


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path``: temp sibling, ``fsync``, rename, ``fsync`` of the directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)


_renameat2: Callable[[int, bytes, int, bytes, int], int] | None | bool = False


def _get_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    global _renameat2
    if _renameat2 is False:
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            if hasattr(libc, "renameat2"):
                f = libc.renameat2
                f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn = f
            elif platform.system() == "Linux" and platform.machine() in _SYS_RENAMEAT2:
                nr = _SYS_RENAMEAT2[platform.machine()]
                sc = libc.syscall

                def fn(a: int, b: bytes, c: int, d: bytes, e: int) -> int:  # type: ignore[misc]
                    return int(sc(nr, a, b, c, d, e))
        except OSError:
            fn = None
        _renameat2 = fn
    return _renameat2 or None  # type: ignore[return-value]


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Atomically swap the names ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system does not support it."""
    fn = _get_renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: not supported here
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def _fsync_tree(d: Path) -> None:
    for root, _dirs, files in os.walk(d):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def atomic_dir(dest: str | os.PathLike[str], build: Callable[[Path], None]) -> None:
    """Build a directory with ``build(tmp)`` under a temp sibling, then put it at ``dest`` (replacing
    an existing directory) so that ``dest`` always names a complete directory (see the module doc)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        build(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            if exchange(tmp, dest):  # tmp now holds the old directory
                _fsync_dir(dest.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".old", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
            _fsync_dir(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
