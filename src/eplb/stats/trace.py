"""The expert-load trace: per-step token counts ``[T, L, E]`` with metadata.

On disk a trace is either

* one safetensors file (:meth:`Trace.save`): tensor ``counts`` (``[T, L, E]``, stored as the
  smallest unsigned integer type that holds it), ``step_ids`` (int64 ``[T]``), optional
  ``cooccurrence`` (``[T, L, E, E]``), optional ``topk_ids`` (``[N, L, k]``) with ``topk_offsets``
  (int64 ``[T + 1]``), and the metadata as JSON under the safetensors header key ``"eplb.trace"``;
* or a recording directory of per-rank chunk files written by :class:`eplb.stats.store.TraceWriter`
  (read by :meth:`Trace.load` too, summing the ranks).

Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import MAX_COUNT, ArrayLike, check_load, exact_counts, exact_ints
from eplb._counts import StepCounts
from eplb._io import atomic_write  # noqa: F401 (moved to eplb._io; re-exported)
from eplb._safe_read import UNCLEAR, reading  # noqa: F401 (moved to eplb._safe_read; re-exported)
from eplb.errors import InputError, TraceError

__all__ = ["Trace", "TraceError", "atomic_write", "parse_range", "reading"]




def parse_range(spec: str | Sequence[int] | None, name: str = "iter-range") -> tuple[int, int] | None:
    """Parse ``"100-200"`` (inclusive start, exclusive stop, like TensorRT-LLM) into ``(100, 200)``."""
    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        a, b = (int(v) for v in spec)
    else:
        parts = spec.split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InputError(f"{name}: expected 'start-stop' with non-negative integers, got {spec!r}")
        a, b = int(parts[0]), int(parts[1])
    if b <= a:
        raise InputError(f"{name}: stop ({b}) must be greater than start ({a})")
    return a, b


def check_total(c: np.ndarray, name: str) -> None:
    """Sums over steps (what planners and ``Trace.total`` use) must stay exact: at most 2**53."""
    if c.dtype == np.int32 and c.shape[0] <= MAX_COUNT // 2**31:  # T * (2**31 - 1) <= 2**53: cannot overflow
        return
    tot = c.sum(0, dtype=np.float64)
    if tot.size and float(tot.max()) > MAX_COUNT:
        bad = np.unravel_index(int(np.argmax(tot)), tot.shape)
        raise TraceError(f"{name}: the sum over steps at (layer, expert) position {[int(i) for i in bad]} exceeds 2**53 "
                         "and cannot be kept exact")


def _short(ids: Sequence[int]) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= 8 else f"[{ids[0]}, {ids[1]}, ..., {ids[-1]}]"


@dataclass(eq=False)
class Trace(StepCounts):
    """Per-step expert loads.

    Attributes:
        counts: ``[T, L, E]`` tokens routed to each logical expert per step and MoE layer: int32 when the input is
            an integer array of at most 32 bits whose counts fit (a long trace is not widened in memory), else
            int64. Sums over steps (:meth:`total`) are int64 either way.
        layer_ids: model layer index of each MoE layer (``[L]``).
        step_ids: iteration id of each step (``[T]``; default ``0..T-1``).
        num_experts: ``E``.
        top_k: experts per token (0 if unknown).
        model: model name.
        source: where the data came from (free text: engine, dataset, "synthetic: ...").
        ep_size: EP size it was recorded at (0 if unknown).
        meta: any further JSON-serialisable metadata.
        cooccurrence: optional ``[T, L, E, E]`` int64: ``[t, l, i, j]`` = tokens of step ``t`` that chose
            both experts ``i`` and ``j`` at layer ``l`` (symmetric; the diagonal is ``counts``).
        topk_ids: optional ``[N, L, k]`` raw routed expert ids of every token (int16/int32/int64).
        topk_offsets: ``[T + 1]`` token offsets of each step into ``topk_ids`` (required with it).
    """

    counts: np.ndarray
    layer_ids: tuple[int, ...] = ()
    step_ids: np.ndarray | None = None
    top_k: int = 0
    model: str = ""
    source: str = ""
    ep_size: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    cooccurrence: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        try:
            c = exact_counts(self.counts, "counts", ndim=(2, 3), compact=True)
        except ValueError as exc:
            raise TraceError(str(exc)) from None
        if c.ndim == 2:
            c = c[None]
        check_total(c, "counts")
        self.counts = c
        T, L, _ = self.counts.shape
        try:
            lids = exact_ints(list(self.layer_ids), "layer_ids", minimum=0) if len(self.layer_ids) else np.arange(L)
            steps = np.arange(T, dtype=np.int64) if self.step_ids is None else exact_ints(self.step_ids, "step_ids")
        except ValueError as exc:
            raise TraceError(str(exc)) from None
        self.layer_ids = tuple(int(i) for i in lids)
        if len(self.layer_ids) != L:
            raise TraceError(f"layer_ids: {len(self.layer_ids)} ids for {L} layers")
        if len(set(self.layer_ids)) != L:
            raise TraceError(f"layer_ids: duplicate layer ids in {list(self.layer_ids)[:8]}")
        if steps.shape != (T,):
            raise TraceError(f"step_ids: expected {T} step ids, got shape {steps.shape}")
        if T > 1 and np.any(np.diff(steps) <= 0):
            i = int(np.argmax(np.diff(steps) <= 0))
            raise TraceError(f"step_ids: must be strictly increasing (step {int(steps[i])} is followed by {int(steps[i + 1])})")
        self.step_ids = steps
        E = self.counts.shape[2]
        if self.cooccurrence is not None:
            try:
                co = exact_counts(self.cooccurrence, "cooccurrence", ndim=4)
            except ValueError as exc:
                raise TraceError(str(exc)) from None
            if co.shape != (T, L, E, E):
                raise TraceError(f"cooccurrence: expected shape {(T, L, E, E)}, got {tuple(co.shape)}")
            check_total(co, "cooccurrence")
            self.cooccurrence = co
        if (self.topk_ids is None) != (self.topk_offsets is None):
            raise TraceError("topk_ids: topk_ids and topk_offsets must be given together")
        if self.topk_ids is not None and self.topk_offsets is not None:
            ids = np.asarray(self.topk_ids)
            try:
                off = exact_ints(self.topk_offsets, "topk_offsets", minimum=0)
            except ValueError as exc:
                raise TraceError(str(exc)) from None
            if ids.ndim != 3 or ids.shape[1] != L or ids.dtype.kind not in "iu":
                raise TraceError(f"topk_ids: expected an integer [tokens, {L}, k] array, got {ids.dtype} {tuple(ids.shape)}")
            if off.shape != (T + 1,) or off[0] != 0 or off[-1] != ids.shape[0] or np.any(np.diff(off) < 0):
                raise TraceError(f"topk_offsets: expected {T + 1} non-decreasing offsets from 0 to {ids.shape[0]}")
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise TraceError(f"topk_ids: expert ids must lie in [0, {E}), got {int(ids.min())}..{int(ids.max())}")
            self.topk_ids, self.topk_offsets = ids, off

    # ------------------------------------------------------------------ sizes (num_steps etc.: StepCounts)
    def total(self) -> np.ndarray:
        """``[L, E]`` counts summed over steps (the ``weight`` a planner takes)."""
        return self.counts.sum(0)

    def digest(self) -> str:
        """SHA-256 of the counts and layer ids (provenance of placements planned from it)."""
        h = hashlib.sha256()
        flat = self.counts.reshape(self.counts.shape[0], -1)
        step = max(1, 2**22 // max(flat.shape[1], 1))
        for a in range(0, flat.shape[0], step):  # the bytes of the int64 counts, whatever the stored dtype
            h.update(np.ascontiguousarray(flat[a:a + step], dtype=np.int64).tobytes())
        h.update(json.dumps(list(self.layer_ids)).encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- slicing
    def slice(self, iter_range: str | Sequence[int] | None = None, layers: Sequence[int] | None = None) -> Trace:
        """Steps whose id lies in ``[start, stop)`` and/or the given MoE layer *positions*."""
        assert self.step_ids is not None
        counts, steps, lids = self.counts, self.step_ids, self.layer_ids
        co, ids, off = self.cooccurrence, self.topk_ids, self.topk_offsets
        rng = parse_range(iter_range) if iter_range is not None else None
        if rng is not None:
            keep = (steps >= rng[0]) & (steps < rng[1])
            if not keep.any():
                raise TraceError(
                    f"iter-range: no steps in {rng[0]}-{rng[1]} (trace has steps {int(steps.min())}..{int(steps.max())})"
                )
            counts, steps = counts[keep], steps[keep]
            co = co[keep] if co is not None else None
            if ids is not None and off is not None:
                sel = np.flatnonzero(keep)  # steps kept are contiguous in position (ids increase)
                a, b = int(off[sel[0]]), int(off[sel[-1] + 1])
                ids, off = ids[a:b], off[sel[0]: sel[-1] + 2] - a
        if layers is not None:
            pos = [int(p) for p in layers]
            bad = [p for p in pos if not 0 <= p < self.num_layers]
            if bad:
                raise TraceError(f"layers: positions {bad} out of range [0, {self.num_layers})")
            counts = counts[:, pos]
            lids = tuple(lids[p] for p in pos)
            co = co[:, pos] if co is not None else None
            ids = ids[:, pos] if ids is not None else None
        return Trace(counts, lids, steps, self.top_k, self.model, self.source, self.ep_size, dict(self.meta), co, ids, off)

    def with_layer_ids(self, layer_ids: Sequence[int]) -> Trace:
        """``--layer-ids`` for a trace: label or select rows by model layer id.

        A trace whose ids are the positions ``0..L-1`` (e.g. a plain ``.npy``) and ``L`` ids given:
        the rows are labelled with them (DeepSeek-V2-Lite's MoE layers are ``1..26``). Otherwise
        the given model layer ids are selected (unknown ids are an error).
        """
        want = tuple(int(i) for i in layer_ids)
        if len(set(want)) != len(want) or any(i < 0 for i in want):
            raise TraceError(f"layer-ids: expected distinct model layer ids >= 0, got {list(want)[:12]}")
        if self.layer_ids == tuple(range(self.num_layers)) and len(want) == self.num_layers:
            out = self.slice()
            out.layer_ids = want
            return out
        if all(i in self.layer_ids for i in want):
            pos = {lid: p for p, lid in enumerate(self.layer_ids)}
            return self.slice(layers=[pos[i] for i in want])
        missing = [i for i in want if i not in self.layer_ids]
        raise TraceError(f"layer-ids: the trace has {self.num_layers} MoE layers with ids {_short(self.layer_ids)}; "
                         f"{len(want)} ids given and {missing[:8]} are not among them (give exactly "
                         f"{self.num_layers} ids to label a trace numbered 0..{self.num_layers - 1})")

    @classmethod
    def concat(cls, parts: Sequence[Trace]) -> Trace:
        """Steps of ``parts`` one after the other (same layers/experts; step ids must keep increasing)."""
        if not parts:
            raise TraceError("concat: no traces given")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if p.layer_ids != first.layer_ids or p.num_experts != first.num_experts:
                raise TraceError(f"concat: part {i} has layers {p.layer_ids[:4]}.. x {p.num_experts} experts, "
                                 f"expected {first.layer_ids[:4]}.. x {first.num_experts}")
        if len(parts) == 1:
            return first
        co = None
        if all(p.cooccurrence is not None for p in parts):
            co = np.concatenate([p.cooccurrence for p in parts if p.cooccurrence is not None])
        ids = off = None
        if all(p.topk_ids is not None for p in parts):
            ids = np.concatenate([p.topk_ids for p in parts if p.topk_ids is not None])
            offs, base = [np.zeros(1, np.int64)], 0
            for p in parts:
                assert p.topk_offsets is not None
                offs.append(p.topk_offsets[1:] + base)
                base += int(p.topk_offsets[-1])
            off = np.concatenate(offs)
        steps = np.concatenate([np.asarray(p.step_ids) for p in parts])
        return cls(np.concatenate([p.counts for p in parts]), first.layer_ids, steps, first.top_k, first.model,
                   first.source, first.ep_size, dict(first.meta), co, ids, off)

    # -------------------------------------------------------------------- I/O
    def metadata(self) -> dict[str, Any]:
        return {
            "format": "eplb.trace", "version": 1, "layer_ids": list(self.layer_ids), "num_experts": self.num_experts,
            "top_k": self.top_k, "model": self.model, "source": self.source, "ep_size": self.ep_size, "meta": self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as safetensors (atomic)."""
        from safetensors.numpy import save

        assert self.step_ids is not None
        mx = int(self.counts.max()) if self.counts.size else 0
        small = np.uint16 if mx < 2**16 else np.uint32 if mx < 2**32 else np.int64  # compact on disk
        tensors = {"counts": np.ascontiguousarray(self.counts, dtype=small), "step_ids": np.ascontiguousarray(self.step_ids)}
        if self.cooccurrence is not None:
            cmx = int(self.cooccurrence.max()) if self.cooccurrence.size else 0
            tensors["cooccurrence"] = np.ascontiguousarray(self.cooccurrence, dtype=np.uint32 if cmx < 2**32 else np.int64)
        if self.topk_ids is not None and self.topk_offsets is not None:
            tensors["topk_ids"] = np.ascontiguousarray(self.topk_ids)
            tensors["topk_offsets"] = np.ascontiguousarray(self.topk_offsets)
        data = save(tensors, metadata={"eplb.trace": json.dumps(self.metadata())})
        atomic_write(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], iter_range: str | Sequence[int] | None = None,
             layers: Sequence[int] | None = None) -> Trace:
        """Read a trace file written by :meth:`save` (:func:`eplb.read_trace` reads any format and directories).

        ``iter_range`` keeps steps with ids in ``[start, stop)``; ``layers`` keeps those MoE layer
        positions.
        """
        p = Path(path)
        with reading(p):
            return cls._load(p, iter_range, layers)

    @classmethod
    def _load(cls, p: Path, iter_range: str | Sequence[int] | None, layers: Sequence[int] | None) -> Trace:
        from safetensors import safe_open

        if p.is_dir():
            raise TraceError(f"{p}: is a directory; Trace.load reads one trace file (eplb.read_trace reads "
                             f"recording directories and every engine's format)")
        if not p.is_file():
            raise TraceError(f"{p}: no such trace file")
        try:
            with safe_open(str(p), framework="numpy") as f:
                md = f.metadata() or {}
                keys = set(f.keys())
                if "counts" not in keys:
                    raise TraceError(f"{p}: missing tensor 'counts'")
                counts = f.get_tensor("counts")
                steps = f.get_tensor("step_ids") if "step_ids" in keys else None
                co = f.get_tensor("cooccurrence") if "cooccurrence" in keys else None
                ids = f.get_tensor("topk_ids") if "topk_ids" in keys else None
                off = f.get_tensor("topk_offsets") if "topk_offsets" in keys else None
        except TraceError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise TraceError(f"{p}: not a readable safetensors trace ({exc})") from None
        from eplb._safe_read import parse_json

        info: Mapping[str, Any] = parse_json(f"{p}: metadata 'eplb.trace'", md.get("eplb.trace", "{}").encode(),
                                             error=TraceError)
        if not isinstance(info, dict):
            raise TraceError(f"{p}: metadata 'eplb.trace': expected a JSON object, got {type(info).__name__}")
        for key in ("top_k", "ep_size"):
            v = info.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
                raise TraceError(f"{p}: metadata 'eplb.trace': field '{key}': expected an integer in [0, 2**31), "
                                 f"got {str(v)[:40]!r}")
        lids, meta = info.get("layer_ids", ()), info.get("meta", {})
        if not isinstance(lids, (list, tuple)) or not isinstance(meta, dict):
            raise TraceError(f"{p}: metadata 'eplb.trace': 'layer_ids' must be a list and 'meta' a mapping")
        try:
            tr = cls(counts, tuple(lids), steps, int(info.get("top_k", 0)), str(info.get("model", "")),
                     str(info.get("source", "")), int(info.get("ep_size", 0)), dict(meta), co, ids, off)
        except ValueError as exc:
            raise TraceError(f"{p}: {exc}") from None
        return tr.slice(iter_range, layers) if iter_range is not None or layers is not None else tr


def as_counts(x: Trace | ArrayLike) -> np.ndarray:
    """``[T, L, E]`` counts of a Trace or an array (a 2-D array becomes one step)."""
    if isinstance(x, Trace):
        return x.counts
    c = check_load(x, "counts", ndim=(2, 3))
    return c[None] if c.ndim == 2 else c
