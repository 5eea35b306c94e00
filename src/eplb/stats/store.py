"""Chunked, appendable trace recordings and merging of per-rank shards.

A recording directory holds one sub-directory per rank::

    REC/rank0/meta.json                      # sizes, layer ids, model, rank, world size, progress
    REC/rank0/chunk-000000.safetensors       # a Trace file (Trace.save format) of up to chunk_steps steps
    REC/rank0/chunk-000001.safetensors
    REC/rank1/...

:class:`TraceWriter` appends steps and writes a chunk file (atomically) every ``chunk_steps`` steps
(or when the buffered data passes ``max_chunk_bytes``), so a 100k-step recording never sits in
memory. :func:`read_dir` (also behind :meth:`Trace.load` of a directory) reads only the chunks
overlapping an ``iter_range`` and sums the ranks; :func:`iter_chunks` streams merged chunks;
:func:`merge` sums per-rank traces (files, directories or :class:`Trace` objects).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import ArrayLike
from eplb._io import atomic_write
from eplb.errors import InputError
from eplb.stats.trace import Trace, TraceError, parse_range

__all__ = ["DirInfo", "TraceWriter", "iter_chunks", "merge", "read_dir", "scan_dir"]

_CHUNK_RE = re.compile(r"^chunk-(\d+)\.safetensors$")
_RANK_RE = re.compile(r"^rank(\d+)$")
DIR_FORMAT = "eplb.trace-dir"


# --------------------------------------------------------------------------- writer
class TraceWriter:
    """Append per-step counts ``[t, L, E]`` to a recording directory (one writer per rank).

    Args:
        path: the recording directory (``path/rank{rank}/`` is this writer's shard).
        num_experts: ``E``.
        layer_ids: model layer index of each of the ``L`` MoE layers.
        top_k, model, source, ep_size, meta: trace metadata.
        rank, world_size: this shard's rank and the number of shards.
        chunk_steps: steps per chunk file.
        max_chunk_bytes: flush earlier when the buffered arrays reach this size (co-occurrence is big).
        overwrite: replace an existing shard of this rank (otherwise an existing shard is an error).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_experts: int,
        layer_ids: Sequence[int],
        *,
        top_k: int = 0,
        model: str = "",
        source: str = "",
        ep_size: int = 0,
        meta: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        chunk_steps: int = 1024,
        max_chunk_bytes: int = 256 << 20,
        overwrite: bool = False,
        background: bool = False,
    ) -> None:
        if chunk_steps <= 0:
            raise InputError(f"chunk_steps: expected a positive integer, got {chunk_steps}")
        if not 0 <= rank < max(world_size, 1):
            raise InputError(f"rank: {rank} is outside [0, world_size={world_size})")
        self.root = Path(path)
        if self.root.exists() and not self.root.is_dir():
            raise TraceError(f"{self.root}: exists and is not a directory")
        self.dir = self.root / f"rank{rank}"
        if self.dir.exists() and any(self.dir.iterdir()):
            if not overwrite:
                raise TraceError(f"{self.dir}: a recording shard already exists (pass overwrite=True to replace it)")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.num_experts = int(num_experts)
        self.layer_ids = tuple(int(i) for i in layer_ids)
        self.info: dict[str, Any] = {
            "format": DIR_FORMAT, "version": 1, "rank": int(rank), "world_size": int(world_size),
            "layer_ids": list(self.layer_ids), "num_experts": self.num_experts, "top_k": int(top_k), "model": model,
            "source": source, "ep_size": int(ep_size), "meta": dict(meta or {}), "complete": False,
            "num_steps": 0, "num_chunks": 0, "first_step": None, "last_step": None,
        }
        self.chunk_steps = int(chunk_steps)
        self.max_chunk_bytes = int(max_chunk_bytes)
        # buffered steps: (counts [t,L,E] int64, step ids [t], cooccurrence, topk ids, topk offsets)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]] = []
        self._buffered_steps = 0
        self._buffered_bytes = 0
        self._last: int | None = None
        self._appended = 0
        self._seq = 0
        self._closed = False
        self._pool: Any = None
        self._futures: list[Any] = []
        if background:  # chunk files written by one worker thread (in order), off the caller's thread
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-trace-writer")
        self._write_meta()

    # ------------------------------------------------------------------ state
    @property
    def num_steps(self) -> int:
        """Steps appended so far (written, being written or buffered)."""
        return self._appended

    @property
    def last_step(self) -> int | None:
        """Id of the last appended step (None before the first)."""
        return self._last

    def _write_meta(self) -> None:
        atomic_write(self.dir / "meta.json", json.dumps(self.info, indent=1).encode())

    # ----------------------------------------------------------------- append
    def append(
        self,
        counts: ArrayLike,
        step_ids: ArrayLike | None = None,
        *,
        cooccurrence: ArrayLike | None = None,
        topk_ids: ArrayLike | None = None,
        topk_offsets: ArrayLike | None = None,
        validate: bool = True,
    ) -> None:
        """Append ``counts`` ``[t, L, E]`` (or ``[L, E]`` = one step) with ids ``step_ids`` ``[t]``.

        Step ids default to continuing after the last one (0 first) and must keep increasing.
        ``cooccurrence`` ``[t, L, E, E]`` and ``topk_ids`` ``[N, L, k]`` + ``topk_offsets``
        ``[t + 1]`` are optional, but once given they must be given for every append.
        ``validate=False`` (trusted int64 arrays, e.g. from the recorder) defers the checks to the
        chunk, done once per ``chunk_steps`` steps.
        """
        if self._closed:
            raise TraceError(f"{self.dir}: writer is closed")
        c = np.asarray(counts.detach().cpu().numpy() if hasattr(counts, "detach") else counts)
        if c.ndim == 2:
            c = c[None]
        t = c.shape[0] if c.ndim == 3 else 0
        last = self._last
        steps = (np.arange(t, dtype=np.int64) + (0 if last is None else last + 1)) if step_ids is None \
            else np.asarray(step_ids, dtype=np.int64).reshape(-1)
        co = None if cooccurrence is None else np.asarray(cooccurrence)
        if co is not None and co.ndim == 3:
            co = co[None]
        ids = None if topk_ids is None else np.asarray(topk_ids)
        off = None if topk_offsets is None else np.asarray(topk_offsets, dtype=np.int64)
        if validate:
            try:
                part = Trace(c, self.layer_ids, steps, self.info["top_k"], cooccurrence=co, topk_ids=ids, topk_offsets=off)
            except ValueError as exc:
                raise TraceError(f"{self.dir}: append: {exc}") from None
            c, co, ids, off = part.counts, part.cooccurrence, part.topk_ids, part.topk_offsets
        elif c.ndim != 3 or c.shape[1:] != (len(self.layer_ids), self.num_experts) or steps.shape != (c.shape[0],):
            raise TraceError(f"{self.dir}: append: counts of shape {tuple(c.shape)} / {steps.shape[0]} step ids, "
                             f"expected [t, {len(self.layer_ids)}, {self.num_experts}]")
        if c.shape[2] != self.num_experts:
            raise TraceError(f"{self.dir}: append: counts have {c.shape[2]} experts, expected {self.num_experts}")
        if steps.size == 0:
            return
        if last is not None and int(steps[0]) <= last:
            raise TraceError(f"{self.dir}: append: step {int(steps[0])} does not follow the last step {last}")
        if self._parts:
            prev = self._parts[0]
            if (prev[2] is None) != (co is None) or (prev[3] is None) != (ids is None):
                raise TraceError(f"{self.dir}: append: cooccurrence/topk_ids must be given for every append or never")
        self._parts.append((c, steps, co, ids, off))
        self._last = int(steps[-1])
        self._appended += int(steps.size)
        self._buffered_steps += int(steps.size)
        self._buffered_bytes += c.nbytes + (0 if co is None else co.nbytes) + (0 if ids is None else ids.nbytes)
        if self._buffered_steps >= self.chunk_steps or self._buffered_bytes >= self.max_chunk_bytes:
            self.flush()

    def _chunk(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None,
                                       np.ndarray | None]]) -> Trace:
        counts = np.concatenate([p[0] for p in parts])
        steps = np.concatenate([p[1] for p in parts])
        co = np.concatenate([p[2] for p in parts if p[2] is not None]) if parts[0][2] is not None else None
        ids = off = None
        if parts[0][3] is not None:
            ids = np.concatenate([p[3] for p in parts if p[3] is not None])
            offs, base = [np.zeros(1, np.int64)], 0
            for p in parts:
                assert p[4] is not None
                offs.append(p[4][1:] + base)
                base += int(p[4][-1])
            off = np.concatenate(offs)
        try:
            return Trace(counts, self.layer_ids, steps, self.info["top_k"], self.info["model"], self.info["source"],
                         self.info["ep_size"], {}, co, ids, off)
        except ValueError as exc:
            raise TraceError(f"{self.dir}: chunk {self._seq}: {exc}") from None

    def _write_chunk(self, parts: list[Any], seq: int) -> None:
        chunk = self._chunk(parts)
        chunk.save(self.dir / f"chunk-{seq:06d}.safetensors")
        assert chunk.step_ids is not None
        if self.info["first_step"] is None:
            self.info["first_step"] = int(chunk.step_ids[0])
        self.info["last_step"] = int(chunk.step_ids[-1])
        self.info["num_steps"] = int(self.info["num_steps"]) + chunk.num_steps
        self.info["num_chunks"] = seq + 1
        self._write_meta()

    def _check_futures(self, wait: bool) -> None:
        pending = []
        for f in self._futures:
            if wait or f.done():
                f.result()  # re-raises a failed chunk write
            else:
                pending.append(f)
        self._futures = pending

    def flush(self) -> None:
        """Write the buffered steps as one chunk file (atomic) and update ``meta.json``."""
        if self._pool is not None:
            self._check_futures(wait=False)
        if not self._parts:
            return
        parts, seq = self._parts, self._seq
        self._parts, self._buffered_steps, self._buffered_bytes = [], 0, 0
        self._seq += 1
        if self._pool is not None:
            self._futures.append(self._pool.submit(self._write_chunk, parts, seq))
        else:
            self._write_chunk(parts, seq)

    def sync(self) -> None:
        """Wait until every submitted chunk file is written (re-raises a failed write)."""
        if self._pool is not None:
            self._check_futures(wait=True)

    def close(self) -> None:
        """Flush, wait for the chunk files and mark the shard complete."""
        if self._closed:
            return
        self.flush()
        self._finish()
        self.info["complete"] = True
        self._write_meta()
        self._closed = True

    def _finish(self) -> None:
        if self._pool is not None:
            try:
                self._check_futures(wait=True)
            finally:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # keep what was recorded, but leave the shard marked incomplete
            self.flush()
            self._finish()
            self._closed = True


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class DirInfo:
    """What a recording directory holds (read from ``meta.json`` files only)."""

    path: Path
    shards: tuple[Path, ...]
    metas: tuple[dict[str, Any], ...]
    layer_ids: tuple[int, ...]
    num_experts: int
    num_chunks: int

    @property
    def num_steps(self) -> int:
        return int(self.metas[0].get("num_steps", 0))


def _read_meta(d: Path) -> dict[str, Any]:
    f = d / "meta.json"
    try:
        info = json.loads(f.read_text())
    except FileNotFoundError:
        raise TraceError(f"{f}: missing (not a recording shard)") from None
    except json.JSONDecodeError as exc:
        raise TraceError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != DIR_FORMAT:
        raise TraceError(f"{f}: field 'format' must be {DIR_FORMAT!r}")
    for key in ("layer_ids", "num_experts"):
        if key not in info:
            raise TraceError(f"{f}: missing field '{key}'")
    return info


def _chunks(d: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _CHUNK_RE.match(p.name)))
    return [p for _, p in found]


def scan_dir(path: str | os.PathLike[str]) -> DirInfo:
    """Find the shards of a recording directory and check they describe the same model."""
    p = Path(path)
    if not p.is_dir():
        raise TraceError(f"{p}: not a directory")
    shards = sorted((int(m.group(1)), d) for d in p.iterdir() if d.is_dir() and (m := _RANK_RE.match(d.name))
                     and (d / "meta.json").exists())
    dirs = [d for _, d in shards] if shards else ([p] if (p / "meta.json").exists() else [])
    if not dirs:
        raise TraceError(f"{p}: no recording shards (expected rank*/meta.json or meta.json)")
    metas = [_read_meta(d) for d in dirs]
    lids, E = tuple(int(i) for i in metas[0]["layer_ids"]), int(metas[0]["num_experts"])
    for d, md in zip(dirs, metas, strict=True):
        if tuple(int(i) for i in md["layer_ids"]) != lids or int(md["num_experts"]) != E:
            raise TraceError(f"{d / 'meta.json'}: layers/experts differ from {dirs[0] / 'meta.json'}")
    nchunks = [len(_chunks(d)) for d in dirs]
    return DirInfo(p, tuple(dirs), tuple(metas), lids, E, max(nchunks))


def _load_chunk(f: Path, rng: tuple[int, int] | None, layers: Sequence[int] | None) -> Trace | None:
    """A chunk file, restricted to ``rng``/``layers``; None when no step of it is in ``rng``."""
    if rng is not None:
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="numpy") as h:
                steps = h.get_tensor("step_ids")
        except Exception as exc:
            raise TraceError(f"{f}: not a readable chunk ({exc})") from None
        if steps.size == 0 or steps.max() < rng[0] or steps.min() >= rng[1]:
            return None
    tr = Trace.load(f)
    if rng is not None or layers is not None:
        tr = tr.slice(rng, layers)
    return tr


def _shard_chunks(d: Path, meta: dict[str, Any], rng: tuple[int, int] | None,
                  layers: Sequence[int] | None) -> Iterator[Trace]:
    for f in _chunks(d):
        tr = _load_chunk(f, rng, layers)
        if tr is None:
            continue
        tr.top_k, tr.model, tr.source = int(meta.get("top_k", 0)), str(meta.get("model", "")), str(meta.get("source", ""))
        tr.ep_size, tr.meta = int(meta.get("ep_size", 0)), dict(meta.get("meta", {}))
        yield tr


def iter_chunks(
    path: str | os.PathLike[str],
    iter_range: str | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Trace]:
    """Stream a recording directory chunk by chunk, ranks summed (each chunk is a :class:`Trace`).

    Every rank must have written the same step ids per chunk (as the recorder does); otherwise
    run :func:`merge` first. ``progress(n)`` is called once per chunk index.
    """
    info = scan_dir(path)
    rng = parse_range(iter_range) if iter_range is not None else None
    gens = [_shard_chunks(d, m, rng, layers) for d, m in zip(info.shards, info.metas, strict=True)]
    while True:
        parts = [next(g, None) for g in gens]
        if progress is not None:
            progress(1)
        if all(p is None for p in parts):
            return
        if any(p is None for p in parts):
            missing = [str(d) for d, p in zip(info.shards, parts, strict=True) if p is None]
            raise TraceError(f"{path}: shards {missing} have fewer chunks than the others (unequal recordings)")
        yield merge([p for p in parts if p is not None], sources=[str(d) for d in info.shards])


def read_dir(
    path: str | os.PathLike[str],
    iter_range: str | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Trace:
    """Read a recording directory into one :class:`Trace` (ranks summed). See :func:`iter_chunks`.

    Other directories (a TensorRT-LLM dump) are read by :func:`eplb.stats.io.read_trace`.
    """
    p = Path(path)
    info = scan_dir(p)
    rng = parse_range(iter_range) if iter_range is not None else None
    per_rank = []
    for d, m in zip(info.shards, info.metas, strict=True):
        parts = list(_shard_chunks(d, m, rng, layers))
        if progress is not None:
            progress(1)
        if not parts:
            where = f"in iter-range {rng[0]}-{rng[1]}" if rng else "(no chunk files)"
            raise TraceError(f"{d}: no steps {where}")
        per_rank.append(Trace.concat(parts))
    out = merge(per_rank, sources=[str(d) for d in info.shards])
    out.meta = {**out.meta, "world_size": len(info.shards)}
    return out


# --------------------------------------------------------------------------- merge
def merge(traces: Sequence[Trace | str | os.PathLike[str]], sources: Sequence[str] | None = None) -> Trace:
    """Sum per-rank shards (counts and co-occurrence; raw top-k ids concatenated per step, rank order).

    All shards must have the same layer ids, number of experts and step ids. Paths are loaded
    with :meth:`Trace.load` (single files or recording directories).
    """
    if not traces:
        raise TraceError("merge: no traces given")
    names = list(sources) if sources is not None else [str(t) if not isinstance(t, Trace) else f"trace #{i}"
                                                       for i, t in enumerate(traces)]
    trs = [t if isinstance(t, Trace) else Trace.load(t) for t in traces]
    first = trs[0]
    assert first.step_ids is not None
    for name, t in zip(names[1:], trs[1:], strict=True):
        assert t.step_ids is not None
        if t.layer_ids != first.layer_ids:
            raise TraceError(f"merge: {name}: layer ids {list(t.layer_ids)[:6]}... differ from {names[0]}'s "
                             f"{list(first.layer_ids)[:6]}...")
        if t.num_experts != first.num_experts:
            raise TraceError(f"merge: {name}: {t.num_experts} experts, but {names[0]} has {first.num_experts}")
        if t.num_steps != first.num_steps or not np.array_equal(t.step_ids, first.step_ids):
            sa, sb = set(first.step_ids.tolist()), set(t.step_ids.tolist())
            diff = sorted(sa ^ sb)[:5]
            raise TraceError(f"merge: {name}: step ids differ from {names[0]}'s ({t.num_steps} vs {first.num_steps} "
                             f"steps; e.g. step(s) {diff} only in one)")
        if (t.cooccurrence is None) != (first.cooccurrence is None) or (t.topk_ids is None) != (first.topk_ids is None):
            raise TraceError(f"merge: {name}: has/lacks co-occurrence or top-k ids unlike {names[0]}")
    if len(trs) == 1:
        return first
    counts = np.sum([t.counts for t in trs], axis=0)
    co = np.sum([t.cooccurrence for t in trs if t.cooccurrence is not None], axis=0) if first.cooccurrence is not None else None
    ids = off = None
    if first.topk_ids is not None:
        pieces, lens = [], np.zeros(first.num_steps, dtype=np.int64)
        for s in range(first.num_steps):
            for t in trs:
                assert t.topk_ids is not None and t.topk_offsets is not None
                a, b = int(t.topk_offsets[s]), int(t.topk_offsets[s + 1])
                pieces.append(t.topk_ids[a:b])
                lens[s] += b - a
        ids = np.concatenate(pieces)
        off = np.concatenate([[0], np.cumsum(lens)])
    ep = first.ep_size or len(trs)
    return Trace(counts, first.layer_ids, first.step_ids, first.top_k, first.model, first.source, ep,
                 {**first.meta, "merged_from": len(trs)}, co, ids, off)
