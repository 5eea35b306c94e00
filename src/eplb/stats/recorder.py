"""Always-on expert-load recorder for PyTorch MoE models.

:class:`ExpertRecorder` counts routed expert ids per MoE layer per step **on the device**:

* ``record(layer, topk_ids)`` does one ``index_add_`` of ones into a preallocated ``[W, L, E]``
  buffer (``W`` = ``flush_every`` steps) -- no host sync, no allocation per call;
* ``add_counts(layer, counts)`` adds per-expert counts an engine already has (e.g. the EP layer's
  dispatch counts), one ``add_``;
* ``step()`` ends a step; every ``W`` steps the buffer is copied to pinned host memory on a side
  stream (``non_blocking`` + an event) while recording continues in a second buffer; finished
  copies are drained to a :class:`~eplb.stats.store.TraceWriter` (chunked files) or kept in memory.

Steps are counted from 0 by ``step()``; only steps in ``iter_range`` ``[start, stop)`` are recorded
(TensorRT-LLM's ``EXPERT_STATISTIC_ITER_RANGE``); the recording is finalised at ``stop``.
Under ``torch.distributed`` each rank writes its own shard (``path/rank{R}/``); readers sum them.

HF ``transformers`` models are attached with :func:`attach` (forward hooks on the router modules
found by class name, see :data:`ROUTERS` / :func:`register_router`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eplb.errors import InputError
from eplb.stats.trace import Trace, TraceError, parse_range

__all__ = [
    "ROUTERS", "ExpertRecorder", "RouterInfo", "attach", "detach", "find_routers", "register_router", "topk_from_logits",
]

ENV_PATH = "EXPERT_STATISTIC_PATH"
ENV_RANGE = "EXPERT_STATISTIC_ITER_RANGE"
DEFAULT_PATH = "expert_statistic"


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ExpertRecorder:
    """Per-step, per-layer expert token counts recorded on the device.

    Args:
        num_layers: ``L`` MoE layers.
        num_experts: ``E`` logical experts.
        layer_ids: model layer index of each MoE layer (default ``0..L-1``); ``record``'s ``layer``
            argument is one of these ids.
        device: where counting happens (default: CUDA if available, else CPU).
        top_k: experts per token (metadata; 0 = unknown).
        path: recording directory (chunked, ``path/rank{R}/``); None keeps the trace in memory
            (see :meth:`trace`).
        iter_range: ``"start-stop"`` or ``(start, stop)``: the steps to record (default: all).
        flush_every: steps per device buffer (host copy every that many steps).
        chunk_steps: steps per chunk file.
        cooccurrence: also count ``[E, E]`` co-selections per step and layer (``one_hot.T @ one_hot``).
        record_topk: also keep the raw top-k ids of every token (debugging / communication analysis).
        rank, world_size: shard of this process (default: from ``torch.distributed``).
        output_format: ``"eplb"`` (chunk directory) or ``"trtllm"`` (also write TensorRT-LLM's
            ``rank{R}.safetensors`` + ``meta_info.json`` into ``path`` when the recording ends).
        overwrite: replace an existing shard at ``path``.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        layer_ids: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        top_k: int = 0,
        path: str | os.PathLike[str] | None = None,
        iter_range: str | Sequence[int] | None = None,
        flush_every: int = 64,
        chunk_steps: int = 1024,
        cooccurrence: bool = False,
        record_topk: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        model: str = "",
        source: str = "eplb.recorder",
        output_format: str = "eplb",
        overwrite: bool = False,
    ) -> None:
        if num_layers <= 0 or num_experts <= 0:
            raise InputError(f"num_layers/num_experts: expected positive sizes, got {num_layers} x {num_experts}")
        if flush_every <= 0:
            raise InputError(f"flush_every: expected a positive integer, got {flush_every}")
        if output_format not in ("eplb", "trtllm"):
            raise InputError(f"output_format: expected 'eplb' or 'trtllm', got {output_format!r}")
        if output_format == "trtllm" and path is None:
            raise InputError("output_format: 'trtllm' needs a path")
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.layer_ids = tuple(int(i) for i in layer_ids) if layer_ids is not None else tuple(range(num_layers))
        if len(self.layer_ids) != num_layers or len(set(self.layer_ids)) != num_layers:
            raise InputError(f"layer_ids: expected {num_layers} distinct ids, got {list(self.layer_ids)}")
        self._pos = {lid: i for i, lid in enumerate(self.layer_ids)}
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.top_k = int(top_k)
        self.range = parse_range(iter_range) if iter_range is not None else None
        self.flush_every = int(flush_every)
        self.cooccurrence = bool(cooccurrence)
        self.record_topk = bool(record_topk)
        r, w = _dist_rank_world()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        self.model, self.source = model, source
        self.output_format = output_format
        self.path = Path(path) if path is not None else None

        L, E, W = self.num_layers, self.num_experts, self.flush_every
        nbuf = 2 if self.device.type == "cuda" else 1
        self._bufs = [torch.zeros(W, L, E, dtype=torch.int64, device=self.device) for _ in range(nbuf)]
        self._co = [torch.zeros(W, L, E, E, dtype=torch.int64, device=self.device) for _ in range(nbuf)] \
            if self.cooccurrence else []
        pin = self.device.type == "cuda"
        self._host = [torch.zeros(W, L, E, dtype=torch.int64, pin_memory=pin) for _ in range(nbuf)]
        self._host_co = [torch.zeros(W, L, E, E, dtype=torch.int64, pin_memory=pin) for _ in range(nbuf)] \
            if self.cooccurrence else []
        self._ones = torch.ones(4096, dtype=torch.int64, device=self.device)
        self._ones_n: dict[int, torch.Tensor] = {}  # views of _ones by length (no slicing per call)
        # one prebuilt [E] view per (step slot, layer) of each buffer: record() does no tensor indexing
        self._rows = [list(buf.view(W * L, E).unbind(0)) for buf in self._bufs]
        self._base = 0  # = _slot * L
        self._events: list[Any] = [None] * nbuf  # copy-done event per buffer (CUDA)
        self._pending: list[tuple[int, list[int], list[list[torch.Tensor]] | None]] = []  # (buffer, step ids, topk)
        self._copy_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._b = 0  # current buffer
        self._slot = 0  # steps filled in the current buffer
        self._slot_steps: list[int] = []
        self._topk: list[list[torch.Tensor]] = []  # per buffered step: raw ids of each layer (record_topk)
        self._cur_topk: list[torch.Tensor | None] = [None] * L
        self.step_id = 0
        self.finished = False
        self._parts: list[tuple[Any, ...]] = []  # in-memory recording (path None): raw arrays per drained buffer
        self._writer = None
        if self.path is not None:
            from eplb.stats.store import TraceWriter

            self._writer = TraceWriter(
                self.path, E, self.layer_ids, top_k=self.top_k, model=model, source=source,
                ep_size=self.world_size, rank=self.rank, world_size=self.world_size, chunk_steps=chunk_steps,
                overwrite=overwrite, meta={"iter_range": list(self.range) if self.range else None}, background=True,
            )
        self.handles: list[Any] = []  # forward-hook handles installed by attach()
        self.active = self._in_range(0)

    # ----------------------------------------------------------------- config
    @classmethod
    def from_env(cls, num_layers: int, num_experts: int, **kwargs: Any) -> ExpertRecorder | None:
        """A recorder configured by ``EXPERT_STATISTIC_ITER_RANGE`` / ``EXPERT_STATISTIC_PATH``, or None if unset.

        The path defaults to ``./expert_statistic`` (TensorRT-LLM's default); keyword arguments override.
        """
        span = os.environ.get(ENV_RANGE)
        if span is None or span.strip() == "":
            return None
        kwargs.setdefault("iter_range", parse_range(span.strip(), name=ENV_RANGE))
        kwargs.setdefault("path", os.environ.get(ENV_PATH) or DEFAULT_PATH)
        return cls(num_layers, num_experts, **kwargs)

    def _in_range(self, step: int) -> bool:
        return not self.finished and (self.range is None or self.range[0] <= step < self.range[1])

    def _layer_pos(self, layer: int) -> int:
        try:
            return self._pos[layer]
        except KeyError:
            raise InputError(f"layer: {layer} is not a recorded MoE layer id (known: {list(self.layer_ids)[:8]}...)") from None

    # -------------------------------------------------------------- recording
    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count the routed expert ids ``topk_ids`` (``[tokens, k]``, any integer dtype) of MoE layer ``layer``.

        Runs entirely on the device (one ``index_add_`` into a prebuilt row view); ids must lie in ``[0, E)``.
        """
        if not self.active:
            return
        pos = self._layer_pos(layer)
        ids = topk_ids.reshape(-1)
        if ids.dtype is not torch.int64 and ids.dtype is not torch.int32:
            ids = ids.long()
        if ids.device != self.device:
            ids = ids.to(self.device, non_blocking=True)
        n = ids.numel()
        ones = self._ones_n.get(n)
        if ones is None:
            ones = self._ones_of(n)
        self._rows[self._b][self._base + pos].index_add_(0, ids, ones)
        if self.cooccurrence:
            k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
            oh = torch.zeros(n // k, self.num_experts, dtype=torch.float32, device=self.device)
            oh.scatter_(1, ids.view(-1, k).long(), 1.0)
            self._co[self._b][self._slot, pos] += (oh.T @ oh).round_().to(torch.int64)
        if self.record_topk:
            prev = self._cur_topk[pos]
            t = ids.view(-1, topk_ids.shape[-1] if topk_ids.dim() > 1 else 1).detach().clone()
            self._cur_topk[pos] = t if prev is None else torch.cat([prev, t])

    def _ones_of(self, n: int) -> torch.Tensor:
        if n > self._ones.numel():
            self._ones = torch.ones(max(n, 2 * self._ones.numel()), dtype=torch.int64, device=self.device)
            self._ones_n.clear()
        if len(self._ones_n) > 256:
            self._ones_n.clear()
        v = self._ones_n[n] = self._ones[:n]
        return v

    def add_counts(self, layer: int, counts: torch.Tensor) -> None:
        """Add per-expert token counts ``counts`` (``[E]``, on any device) of MoE layer ``layer``."""
        if not self.active:
            return
        pos = self._layer_pos(layer)
        if counts.numel() != self.num_experts:
            raise InputError(f"counts: expected shape [{self.num_experts}], got {tuple(counts.shape)}")
        c = counts.reshape(-1)
        if c.device != self.device:
            c = c.to(self.device, non_blocking=True)
        if c.dtype is not torch.int64:
            c = c.to(torch.int64)
        self._rows[self._b][self._base + pos].add_(c)

    def step(self) -> None:
        """End the current step (every ``flush_every`` recorded steps the buffer goes to the host)."""
        if self.active:
            self._slot_steps.append(self.step_id)
            if self.record_topk:
                self._topk.append(self._close_topk())
            self._slot += 1
            self._base = self._slot * self.num_layers
            if self._slot == self.flush_every:
                self._swap()
        self.step_id += 1
        self._poll()
        if self.range is not None and self.step_id >= self.range[1] and not self.finished:
            self.close()
        self.active = self._in_range(self.step_id)

    def _close_topk(self) -> list[torch.Tensor]:
        rows = []
        for pos, t in enumerate(self._cur_topk):
            rows.append(t if t is not None else torch.zeros(0, max(self.top_k, 1), dtype=torch.int64, device=self.device))
            self._cur_topk[pos] = None
        return rows

    # ----------------------------------------------------------- host copies
    def _swap(self) -> None:
        """Start the copy of the current buffer to the host and continue in the other one."""
        n, b = self._slot, self._b
        if n == 0:
            return
        steps, topk = list(self._slot_steps), (list(self._topk) if self.record_topk else None)
        self._slot, self._slot_steps, self._topk = 0, [], []
        self._base = 0
        if self._copy_stream is None:  # CPU: synchronous
            self._host[b][:n].copy_(self._bufs[b][:n])
            if self.cooccurrence:
                self._host_co[b][:n].copy_(self._co[b][:n])
            self._bufs[b].zero_()
            if self.cooccurrence:
                self._co[b].zero_()
            self._pending.append((b, steps, topk))
            self._drain(force=True)
            return
        cur = torch.cuda.current_stream(self.device)
        nb = (b + 1) % len(self._bufs)
        # host buffer b still holds the copy from two swaps ago until drained (long finished: no real wait)
        self._drain_buffer(b)
        self._copy_stream.wait_stream(cur)  # the copy sees every count added so far
        with torch.cuda.stream(self._copy_stream):
            self._host[b][:n].copy_(self._bufs[b][:n], non_blocking=True)
            if self.cooccurrence:
                self._host_co[b][:n].copy_(self._co[b][:n], non_blocking=True)
            self._bufs[b].zero_()
            if self.cooccurrence:
                self._co[b].zero_()
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._events[b] = ev
        self._pending.append((b, steps, topk))
        # record into buffer nb from now on; its own copy + zeroing (if any) must be done first (GPU-side wait)
        if self._events[nb] is not None:
            cur.wait_event(self._events[nb])
        self._b = nb

    def _poll(self) -> None:
        """Drain finished copies without blocking."""
        while self._pending and (self._events[self._pending[0][0]] is None or self._events[self._pending[0][0]].query()):
            self._drain_one()

    def _drain_buffer(self, b: int) -> None:
        while self._pending and any(p[0] == b for p in self._pending):
            self._drain_one(block=True)

    def _drain(self, force: bool = False) -> None:
        while self._pending:
            self._drain_one(block=force)

    def _drain_one(self, block: bool = True) -> None:
        b, steps, topk = self._pending.pop(0)
        ev = self._events[b]
        if ev is not None:
            ev.synchronize()
            self._events[b] = None
        n = len(steps)
        counts = self._host[b][:n].numpy().copy()
        co = self._host_co[b][:n].numpy().copy() if self.cooccurrence else None
        ids = off = None
        if topk is not None:
            per_step = []
            for rows in topk:
                ntok = {int(r.shape[0]) for r in rows}
                if len(ntok) != 1:
                    raise TraceError(f"record_topk: layers saw different token counts {sorted(ntok)} in one step")
                per_step.append(torch.stack([r.cpu() for r in rows], dim=1).numpy())
            k = max((a.shape[2] for a in per_step), default=1)
            per_step = [a if a.shape[2] == k else np.zeros((0, self.num_layers, k), np.int64) for a in per_step]
            ids = np.concatenate(per_step) if per_step else np.zeros((0, self.num_layers, k), np.int64)
            off = np.concatenate([[0], np.cumsum([a.shape[0] for a in per_step])])
        if self._writer is not None:  # trusted arrays: validated once per chunk, written by a worker thread
            self._writer.append(counts, steps, cooccurrence=co, topk_ids=ids, topk_offsets=off, validate=False)
        else:
            self._parts.append((counts, np.asarray(steps, dtype=np.int64), co, ids, off))

    # -------------------------------------------------------------- finishing
    def flush(self) -> None:
        """Copy everything recorded so far to the host / files (blocks)."""
        if self._slot:
            self._swap()
        self._drain(force=True)
        if self._writer is not None:
            self._writer.flush()
            self._writer.sync()

    def close(self) -> None:
        """Flush, finish the files (and TensorRT-LLM's layout if asked); further records are ignored."""
        if self.finished:
            return
        self.flush()
        self.finished = True
        self.active = False
        if self._writer is not None:
            self._writer.close()
            if self.output_format == "trtllm":
                self._write_trtllm_shard()

    def _write_trtllm_shard(self) -> None:
        import json

        from safetensors.numpy import save

        from eplb._io import atomic_write
        from eplb.stats.store import read_dir

        assert self.path is not None
        tr = read_dir(self.path / f"rank{self.rank}")
        assert tr.step_ids is not None
        data = {f"{int(s)}_{lid}": np.ascontiguousarray(tr.counts[t, j])
                for t, s in enumerate(tr.step_ids) for j, lid in enumerate(tr.layer_ids)}
        atomic_write(self.path / f"rank{self.rank}.safetensors", save(data))
        if tr.cooccurrence is not None:
            co = {f"{int(s)}_{lid}": np.ascontiguousarray(tr.cooccurrence[t, j])
                  for t, s in enumerate(tr.step_ids) for j, lid in enumerate(tr.layer_ids)}
            atomic_write(self.path / f"cooccurrence_rank{self.rank}.safetensors", save(co))
        if self.rank == 0:
            info = {"num_experts": self.num_experts, "num_experts_per_token": self.top_k,
                    "eplb_trace": {"model": self.model, "source": self.source}}
            atomic_write(self.path / "meta_info.json", json.dumps(info).encode())

    def trace(self) -> Trace:
        """The recording as a :class:`Trace` (this rank only; flushes first)."""
        self.flush()
        if self._writer is not None:
            from eplb.stats.store import read_dir

            assert self.path is not None
            return read_dir(self.path / f"rank{self.rank}")
        if not self._parts:
            rng = f" in iter-range {self.range[0]}-{self.range[1]}" if self.range else ""
            raise TraceError(f"recorder: no steps recorded{rng} ({self.step_id} steps ran; step() ends each step)")
        parts = [Trace(c, self.layer_ids, st, self.top_k, self.model, self.source, self.world_size, {}, co, ids, off)
                 for c, st, co, ids, off in self._parts]
        return Trace.concat(parts)

    def __enter__(self) -> ExpertRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# =========================================================================== HF transformers
Extractor = Callable[[nn.Module, Any], torch.Tensor]


def _tuple_indices(module: nn.Module, out: Any) -> torch.Tensor:
    """``(router_logits, weights, indices)`` -> indices (the ``*TopKRouter`` classes of transformers 5)."""
    return out[2]


def _generic(module: nn.Module, out: Any) -> torch.Tensor:
    """The last integer tensor of a tuple output; or top-k of logits when the module has ``top_k``."""
    if isinstance(out, (tuple, list)):
        for x in reversed(out):
            if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dim() >= 1:
                return x
        out = out[0]
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        k = getattr(module, "top_k", None) or getattr(module, "num_experts_per_tok", None)
        if k:
            return out.reshape(-1, out.shape[-1]).topk(int(k), dim=-1).indices
    raise TypeError(f"{type(module).__name__}: cannot find routed expert ids in its output; "
                    "register an extractor with eplb.stats.recorder.register_router")


def topk_from_logits(k: int) -> Extractor:
    """An extractor for routers that return logits ``[tokens, E]``: the top-``k`` ids (softmax is monotone)."""

    def fn(module: nn.Module, out: Any) -> torch.Tensor:
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits.reshape(-1, logits.shape[-1]).topk(k, dim=-1).indices

    return fn


#: router class name -> extractor ``(module, forward output) -> topk_ids [tokens, k]``.
ROUTERS: dict[str, Extractor] = {
    name: _tuple_indices
    for name in ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "DeepseekV2TopkRouter",
                 "DeepseekV3TopkRouter", "OlmoeTopKRouter")
}
_GENERIC_RE = re.compile(r"Top[kK]Router$")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def register_router(class_name: str, extract: Extractor | None = None) -> None:
    """Record modules of class ``class_name`` (by name); ``extract(module, output)`` returns ``[tokens, k]`` ids."""
    ROUTERS[class_name] = extract or _generic


@dataclass(frozen=True)
class RouterInfo:
    """A router module found in a model."""

    layer_id: int
    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    extract: Extractor


def find_routers(model: nn.Module, *, generic: bool = True) -> list[RouterInfo]:
    """Router modules of ``model``: classes in :data:`ROUTERS` (and ``*TopKRouter`` classes when ``generic``).

    The layer id is the ``layers.{i}.`` index in the module name (else the order found).
    """
    found: list[RouterInfo] = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        ext = ROUTERS.get(cls)
        if ext is None and generic and _GENERIC_RE.search(cls):
            ext = _generic
        if ext is None:
            continue
        m = _LAYER_RE.search(name)
        lid = int(m.group(1)) if m else len(found)
        E = getattr(mod, "num_experts", None) or getattr(mod, "n_routed_experts", None)
        if E is None and isinstance(getattr(mod, "weight", None), torch.Tensor):
            E = mod.weight.shape[0]
        if E is None:
            raise InputError(f"{name} ({cls}): cannot tell its number of experts")
        k = getattr(mod, "top_k", None) or getattr(mod, "num_experts_per_tok", None) or 0
        found.append(RouterInfo(lid, name, mod, int(E), int(k), ext))
    ids = [r.layer_id for r in found]
    if len(set(ids)) != len(ids):
        raise InputError(f"routers: duplicate layer ids {ids}")
    return found


def attach(
    model: nn.Module,
    recorder: ExpertRecorder | None = None,
    *,
    auto_step: bool = True,
    **kwargs: Any,
) -> ExpertRecorder:
    """Hook ``model``'s routers into ``recorder`` (created from the routers found when None).

    With ``auto_step`` every forward of ``model`` ends one step (decode step / prefill batch).
    The hook handles are kept in ``recorder.handles`` (call :func:`detach` to remove them).
    """
    routers = find_routers(model)
    if not routers:
        raise InputError(f"{type(model).__name__}: no router modules found (known classes: {sorted(ROUTERS)}; "
                         "use eplb.stats.recorder.register_router)")
    E = {r.num_experts for r in routers}
    if len(E) != 1:
        raise InputError(f"routers: different expert counts per layer {sorted(E)}")
    if recorder is None:
        dev = kwargs.pop("device", None)
        if dev is None:
            p = next(model.parameters(), None)
            dev = p.device if p is not None else "cpu"
        kwargs.setdefault("model", getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)
        kwargs.setdefault("top_k", routers[0].top_k)
        recorder = ExpertRecorder(len(routers), E.pop(), layer_ids=[r.layer_id for r in routers], device=dev, **kwargs)
    handles = []
    for r in routers:
        handles.append(r.module.register_forward_hook(_make_hook(recorder, r)))
    if auto_step:
        handles.append(model.register_forward_hook(lambda m, i, o: recorder.step()))
    recorder.handles.extend(handles)
    return recorder


def _make_hook(recorder: ExpertRecorder, r: RouterInfo) -> Callable[[nn.Module, Any, Any], None]:
    lid, ext = r.layer_id, r.extract

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if recorder.active:
            recorder.record(lid, ext(module, output))

    return hook


def detach(recorder: ExpertRecorder) -> None:
    """Remove the hooks :func:`attach` installed."""
    for h in recorder.handles:
        h.remove()
    recorder.handles.clear()
