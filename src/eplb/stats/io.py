"""The one trace format dispatcher: which format a path holds, and reading / writing any of them.

Formats (:data:`FORMATS`; :func:`detect_trace_format` picks one from the path): ``eplb`` (one safetensors
file, :meth:`eplb.Trace.save`), ``eplb-dir`` (a chunked recording directory,
:mod:`eplb.stats.store`), ``trtllm``, ``sglang``, ``vllm-ascend`` (:mod:`eplb.stats.importers`),
and plain ``npy`` / ``npz`` / ``csv`` / ``json`` arrays. The readers and writers of each format know
nothing of the others; only this module decides "what format is this path", so the import graph is
``trace <- store, importers <- io`` with no circle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from eplb._io import atomic_dir
from eplb._safe_read import reading
from eplb.placement import Placement
from eplb.stats.importers import (
    read_sglang,
    read_trtllm,
    read_vllm_ascend,
    write_sglang,
    write_trtllm,
    write_vllm_ascend,
)
from eplb.stats.plain import _read_plain, _write_plain
from eplb.stats.store import TraceWriter, read_dir
from eplb.stats.trace import Trace, TraceError

__all__ = ["FORMATS", "detect_trace_format", "read_trace", "write_trace"]

FORMATS = ("eplb", "eplb-dir", "trtllm", "sglang", "vllm-ascend", "npy", "npz", "csv", "json")
_EXT = {".safetensors": "eplb", ".pt": "sglang", ".pth": "sglang", ".npy": "npy", ".npz": "npz", ".csv": "csv",
        ".json": "json"}


def detect_trace_format(path: str | os.PathLike[str], *, for_write: bool = False) -> str:
    """The format of ``path``: a directory by its contents (or ``eplb-dir`` for a new one), a file by extension."""
    p = Path(path)
    if p.is_dir():
        if (p / "meta_info.json").exists():
            return "trtllm"
        if (p / "meta.json").exists() or any(p.glob("rank*/meta.json")):
            return "eplb-dir"
        if any(p.glob("rank*.safetensors")):
            raise TraceError(f"{p}: looks like a TensorRT-LLM dump but meta_info.json is missing")
        if for_write and not any(p.iterdir()):
            return "eplb-dir"
        raise TraceError(f"{p}: directory holds no known trace (expected meta_info.json or rank*/meta.json)")
    fmt = _EXT.get(p.suffix.lower())
    if fmt is None:
        if for_write and p.suffix == "":
            return "eplb-dir"
        raise TraceError(f"{p}: unknown trace file type {p.suffix or '(no extension)'!r}; "
                         f"known: {', '.join(sorted(_EXT))} or a directory; or give the format ({', '.join(FORMATS)})")
    return fmt


def _check_format(fmt: str) -> str:
    f = fmt.lower().replace("_", "-")
    f = {"tensorrt-llm": "trtllm", "trt-llm": "trtllm", "native": "eplb", "safetensors": "eplb", "dir": "eplb-dir",
         "vllm_ascend": "vllm-ascend", "ascend": "vllm-ascend"}.get(f, f)
    if f not in FORMATS:
        raise TraceError(f"format: unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    return f


# =========================================================================== dispatch
def read_trace(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    iter_range: str | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    expert_map: str | os.PathLike[str] | Placement | None = None,
    progress: Callable[[int], None] | None = None,
) -> Trace:
    """Read a trace of any format (``format`` overrides detection); slice by ``iter_range``/``layers`` positions.

    Every malformed input is a :class:`TraceError` whose message starts with the file's name.
    """
    p = Path(path)
    with reading(p):
        return _read_trace(p, format, iter_range=iter_range, layers=layers, expert_map=expert_map, progress=progress)


def _read_trace(
    p: Path,
    format: str | None,
    *,
    iter_range: str | Sequence[int] | None,
    layers: Sequence[int] | None,
    expert_map: str | os.PathLike[str] | Placement | None,
    progress: Callable[[int], None] | None,
) -> Trace:
    if not p.exists():
        raise TraceError(f"{p}: no such file or directory")
    fmt = _check_format(format) if format else detect_trace_format(p)
    if fmt in ("eplb", "eplb-dir"):
        if fmt == "eplb-dir":
            return read_dir(p, iter_range=iter_range, layers=layers, progress=progress)
        return Trace.load(p, iter_range=iter_range, layers=layers)
    if fmt == "trtllm":
        tr = read_trtllm(p)
    elif fmt == "sglang":
        tr = read_sglang(p)
    elif fmt == "vllm-ascend":
        tr = read_vllm_ascend(p, expert_map)
    else:
        tr = _read_plain(p, fmt)
    return tr.slice(iter_range, layers) if iter_range is not None or layers is not None else tr


def write_trace(
    trace: Trace,
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    overwrite: bool = False,
    ep_size: int | None = None,
    placement: Placement | None = None,
    chunk_steps: int = 1024,
) -> None:
    """Write ``trace`` to ``path`` in ``format`` (default: from the extension; a new directory is ``eplb-dir``).

    ``ep_size`` is used by ``trtllm`` (number of rank files) and ``vllm-ascend`` (devices);
    ``placement`` by ``vllm-ascend`` (physical slots). Existing outputs are only replaced with ``overwrite``.
    """
    p = Path(path)
    fmt = _check_format(format) if format else detect_trace_format(p, for_write=True)
    is_dir_fmt = fmt in ("trtllm", "eplb-dir")
    if p.exists():
        if not overwrite:
            raise TraceError(f"{p}: already exists (pass overwrite=True / --force to replace it)")
        if p.is_dir() != is_dir_fmt:
            raise TraceError(f"{p}: exists as a {'directory' if p.is_dir() else 'file'}, but format {fmt!r} writes a "
                             f"{'directory' if is_dir_fmt else 'file'}")
        _check_same_kind(p, fmt)
    if fmt == "eplb":
        trace.save(p)
    elif fmt == "eplb-dir":
        def build(tmp: Path) -> None:
            with TraceWriter(tmp, trace.num_experts, trace.layer_ids, top_k=trace.top_k, model=trace.model,
                             source=trace.source, ep_size=trace.ep_size, meta=trace.meta, chunk_steps=chunk_steps) as w:
                for a in range(0, trace.num_steps, chunk_steps):
                    part = _step_slice(trace, a, a + chunk_steps)
                    w.append(part.counts, part.step_ids, cooccurrence=part.cooccurrence, topk_ids=part.topk_ids,
                             topk_offsets=part.topk_offsets)

        atomic_dir(p, build)
    elif fmt == "trtllm":
        write_trtllm(trace, p, ep_size=ep_size)
    elif fmt == "sglang":
        write_sglang(trace, p)
    elif fmt == "vllm-ascend":
        write_vllm_ascend(trace, p, ep_size=ep_size, placement=placement)
    else:
        _write_plain(trace, p, fmt)


def _check_same_kind(p: Path, fmt: str) -> None:
    """``--force`` replaces only an output of the kind being written: a directory holding a trace of
    ``fmt`` (or nothing), or a regular file; never another directory, a device or a link to one."""
    if p.is_symlink():
        raise TraceError(f"{p}: is a symbolic link; not replacing it")
    if p.is_dir():
        if any(p.iterdir()):
            try:
                have = detect_trace_format(p)
            except TraceError:
                raise TraceError(f"{p}: exists and holds no trace; not replacing it (remove it yourself)") from None
            if have != fmt:
                raise TraceError(f"{p}: holds a {have} trace, not {fmt}; not replacing it")
    elif not p.is_file():
        raise TraceError(f"{p}: exists and is not a regular file; not replacing it")


def _step_slice(trace: Trace, a: int, b: int) -> Trace:
    assert trace.step_ids is not None
    ids = trace.step_ids[a:b]
    return trace.slice((int(ids[0]), int(ids[-1]) + 1))


