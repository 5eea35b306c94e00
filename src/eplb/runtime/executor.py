"""The online balancer's *Executor*: moves changed expert slots between ranks and commits layers.

A layer's migration (:class:`~eplb.runtime.manager.LayerMigration`, the same plan on every rank)
runs in two halves at two step boundaries:

1. :meth:`MigrationExecutor.launch` (step boundary ``t``): each rank posts its part of the
   cross-rank transfers as one ``torch.distributed.batch_isend_irecv``: sources send straight from
   their live weights (which do not change until the commit), destinations receive into *staging
   buffers* holding only the experts they lack (``[n_recv, ...]`` per weight name). On CUDA this is
   queued on a side stream, so the serving stream never waits for it.
2. :meth:`MigrationExecutor.finish` (boundary ``t + 1``, every rank at the same one): waits for the
   transfers (on CUDA the serving stream waits for the side stream's event; no host sync), then on
   the serving stream writes only the changed slots into the layer's weights (local moves gathered
   before any write, received experts copied from staging, also into duplicate slots) and calls
   ``layer.commit(new_row, weights)``, which swaps the layer's map and weights together (the live
   tensors are passed, so the commit's copy is a no-op). No forward runs between the writes and the
   map swap, so no token ever reaches a slot whose weights are in flight.

Staging memory per rank is ``(experts received + experts moved locally) * bytes_per_expert`` of the
layers in flight (:attr:`MigrationExecutor.peak_staging_bytes`); the balancer bounds it with
``max_staging_bytes`` (the same decision on every rank). Transfers only carry experts a rank does
not hold yet (one per (rank, expert)), so the bytes on the wire are ``num_transfers *
bytes_per_expert`` per layer, and after a commit every slot is a bit-exact copy of its expert.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.runtime.manager import LayerMigration

__all__ = ["InFlight", "MigrationExecutor", "layer_weight_bytes"]


def layer_weight_bytes(layer: Any) -> int:
    """Bytes of one expert slot's weights of ``layer`` (sum over ``layer.expert_weight_names``)."""
    total = 0
    for name in layer.expert_weight_names:
        t = getattr(layer, name)
        total += int(t[0].numel()) * int(t.element_size())
    return total


@dataclass
class _LayerJob:
    mig: LayerMigration
    staging: dict[str, torch.Tensor] | None  # [n_recv, ...] received experts
    recv_dst: list[int]  # local dst slot of each (slot, staging index) pair
    recv_idx: list[int]
    local_dst: list[int]  # local moves: dst slot <- old value of src slot
    local_src: list[int]


@dataclass
class InFlight:
    """Layers being migrated together: transfers are posted in chunks (:meth:`MigrationExecutor.launch`,
    :meth:`MigrationExecutor.post_next`), then :meth:`MigrationExecutor.finish` commits them."""

    jobs: list[_LayerJob]
    reqs: list[Any]
    launched_at: float
    staging_bytes: int
    bytes_sent: int
    bytes_received: int
    event: Any = None
    layers: tuple[int, ...] = field(default=())
    todo: list[tuple[int, int]] = field(default_factory=list)  # (job index, transfer index) not posted yet
    chunks: int = 0


class MigrationExecutor:
    """Moves and commits expert weights of EP layers (interface 2 of the brief).

    Args:
        layers: the EP layers in placement-row order (``layers[i]`` serves row ``i``); each has
            ``expert_weight_names``, those ``[spr, ...]`` tensors, and ``commit(row, weights)``.
        group: process group for the transfers (``None``: WORLD). Ranks in the plans are group ranks.
        rank / num_ranks: this process's rank in ``group`` and the group size (default: from ``group``).
        use_side_stream: on CUDA, post the transfers on a side stream (default True).
    """

    def __init__(self, layers: Sequence[Any], *, group: Any = None, rank: int | None = None,
                 num_ranks: int | None = None, use_side_stream: bool = True) -> None:
        if not layers:
            raise ValueError("layers: expected at least one EP layer")
        self.layers = list(layers)
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = int(rank) if rank is not None else (dist.get_rank(group) if distributed else 0)
        self.num_ranks = int(num_ranks) if num_ranks is not None else (
            dist.get_world_size(group) if distributed else 1)
        first = self.layers[0]
        self.names: tuple[str, ...] = tuple(first.expert_weight_names)
        self.bytes_per_expert = layer_weight_bytes(first)
        for i, layer in enumerate(self.layers):
            if tuple(layer.expert_weight_names) != self.names:
                raise ValueError(f"layers[{i}]: expert_weight_names {layer.expert_weight_names} differ from layer 0's")
            if layer_weight_bytes(layer) != self.bytes_per_expert:
                raise ValueError(f"layers[{i}]: expert weights of {layer_weight_bytes(layer)} bytes, layer 0 has "
                                 f"{self.bytes_per_expert} (all layers must have the same expert shape)")
        w = getattr(first, self.names[0])
        self.slots_per_rank = int(w.shape[0])
        self.device: torch.device = w.device
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if (self.cuda and use_side_stream) else None
        self.staging_bytes = 0
        self.peak_staging_bytes = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    # ------------------------------------------------------------------ sizes
    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's local weights on this rank."""
        return self.slots_per_rank * self.bytes_per_expert

    def staging_need(self, mig: LayerMigration, rank: int | None = None) -> int:
        """Staging bytes ``rank`` (default: this one) needs for ``mig``: experts it receives plus
        experts it moves between its own slots."""
        r = self.rank if rank is None else int(rank)
        spr = self.slots_per_rank
        n_local = sum(1 for d, _ in mig.local_copies if d // spr == r)
        return (len(mig.recvs(r)) + n_local) * self.bytes_per_expert

    def max_staging_need(self, migs: Sequence[LayerMigration]) -> int:
        """The largest staging any rank needs for ``migs`` together (the same number on every rank)."""
        return max(sum(self.staging_need(m, r) for m in migs) for r in range(self.num_ranks)) if migs else 0

    def _peer(self, r: int) -> dict[str, Any]:
        if self.group is None:
            return {"peer": r}
        return {"group_peer": r, "group": self.group}

    # ----------------------------------------------------------------- launch
    def launch(self, migrations: Sequence[LayerMigration], max_bytes: int | None = None) -> InFlight:
        """Allocate staging for ``migrations`` and post their first chunk of transfers (the same list,
        in the same order, on every rank). ``max_bytes``: cap on the bytes of one chunk (all ranks'
        transfers together; at least one transfer per chunk); ``None``: everything at once. Further
        chunks go out with :meth:`post_next` at later step boundaries."""
        me, spr = self.rank, self.slots_per_rank
        lo = me * spr
        t0 = time.perf_counter()
        jobs: list[_LayerJob] = []
        stage_bytes = 0
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        for mig in migrations:
            if not 0 <= mig.layer < len(self.layers):
                raise ValueError(f"migration: layer position {mig.layer} out of range [0, {len(self.layers)})")
            if mig.num_ranks != self.num_ranks or mig.slots_per_rank != spr:
                raise ValueError(f"migration: planned for {mig.num_ranks} ranks x {mig.slots_per_rank} slots, the "
                                 f"group has {self.num_ranks} x {spr}")
        todo: list[tuple[int, int]] = []
        for j, mig in enumerate(migrations):
            layer = self.layers[mig.layer]
            recvs = mig.recvs(me)
            staging = None
            if recvs:  # allocated on the serving stream (its caching-allocator owner)
                staging = {n: getattr(layer, n).new_empty((len(recvs), *getattr(layer, n).shape[1:]))
                           for n in self.names}
            local = [(d - lo, s - lo) for d, s in mig.local_copies if lo <= d < lo + spr]
            stage_bytes += (len(recvs) + len(local)) * self.bytes_per_expert
            recv_dst: list[int] = []
            recv_idx: list[int] = []
            k = 0
            for t in mig.transfers:
                if t.dst == me:
                    recv_dst += [d - lo for d in t.dst_slots]
                    recv_idx += [k] * len(t.dst_slots)
                    k += 1
            jobs.append(_LayerJob(mig, staging, recv_dst, recv_idx, [d for d, _ in local], [s for _, s in local]))
            todo += [(j, i) for i in range(len(mig.transfers))]
        if self._stream is not None and main is not None:
            self._stream.wait_stream(main)  # staging allocations and the weights are ready for the side stream
        self.staging_bytes += stage_bytes
        self.peak_staging_bytes = max(self.peak_staging_bytes, self.staging_bytes)
        inflight = InFlight(jobs, [], t0, stage_bytes, 0, 0, layers=tuple(j.mig.layer for j in jobs), todo=todo)
        self.post_next(inflight, max_bytes)
        return inflight

    def pending(self, inflight: InFlight) -> bool:
        """Transfers of ``inflight`` not posted yet (the layers cannot commit before they are)."""
        return bool(inflight.todo)

    def post_next(self, inflight: InFlight, max_bytes: int | None = None) -> int:
        """Post the next chunk of ``inflight``'s transfers (at most ``max_bytes`` over all ranks, at least
        one transfer) as one ``batch_isend_irecv``; returns the number of transfers in the chunk."""
        me, spr, bpe = self.rank, self.slots_per_rank, self.bytes_per_expert
        lo = me * spr
        n = len(inflight.todo) if max_bytes is None else max(1, min(len(inflight.todo), int(max_bytes) // bpe))
        chunk, inflight.todo = inflight.todo[:n], inflight.todo[n:]
        if not chunk:
            return 0
        ops: list[dist.P2POp] = []
        sent = received = 0
        recv_pos: dict[tuple[int, int], int] = {}
        for j, job in enumerate(inflight.jobs):  # staging index of each transfer this rank receives
            k = 0
            for i, t in enumerate(job.mig.transfers):
                if t.dst == me:
                    recv_pos[(j, i)] = k
                    k += 1
        for j, i in chunk:
            job = inflight.jobs[j]
            t = job.mig.transfers[i]
            layer = self.layers[job.mig.layer]
            if t.src == me:
                for name in self.names:
                    ops.append(dist.P2POp(dist.isend, getattr(layer, name)[t.src_slot - lo], **self._peer(t.dst)))
                sent += bpe
            elif t.dst == me:
                assert job.staging is not None
                for name in self.names:
                    ops.append(dist.P2POp(dist.irecv, job.staging[name][recv_pos[(j, i)]], **self._peer(t.src)))
                received += bpe
        if ops:
            ctx: Any = torch.cuda.stream(self._stream) if self._stream is not None else _nullctx()
            with ctx:
                inflight.reqs += list(dist.batch_isend_irecv(ops))
        inflight.chunks += 1
        inflight.bytes_sent += sent
        inflight.bytes_received += received
        self.bytes_sent += sent
        self.bytes_received += received
        return len(chunk)

    # ----------------------------------------------------------------- finish
    def finish(self, inflight: InFlight) -> list[int]:
        """Wait for ``inflight``'s transfers and commit its layers; returns the committed layer positions.

        Must be called on every rank at the same step boundary (between two forward steps), after every
        chunk was posted (:meth:`pending` is false).
        """
        if inflight.todo:
            raise RuntimeError(f"finish: {len(inflight.todo)} transfers of layers {list(inflight.layers)} not posted yet")
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        ctx: Any = torch.cuda.stream(self._stream) if self._stream is not None else _nullctx()
        wd = getattr(self, "watchdog", None)
        self._finishes = getattr(self, "_finishes", 0) + 1
        waited = wd is not None and not self.cuda
        if waited:  # gloo: the host waits, so bound it (a stalled peer is named); a P2P work is waited once
            wd.wait_all(inflight.reqs, f"weight transfers of layers {list(inflight.layers)}", f"mig-{self._finishes}",
                        p2p=True)
        with ctx:
            for req in inflight.reqs if not waited else ():
                req.wait()  # NCCL: the side stream waits; gloo: the host waits for the (finished) transfer
            if self._stream is not None:
                inflight.event = self._stream.record_event()
        if main is not None and inflight.event is not None:
            main.wait_event(inflight.event)
        done: list[int] = []
        dev = self.device
        for job in inflight.jobs:
            layer = self.layers[job.mig.layer]
            if job.local_dst:  # gather every local source before any slot is overwritten
                src = torch.as_tensor(job.local_src, dtype=torch.int64).to(dev, non_blocking=True)
                dst = torch.as_tensor(job.local_dst, dtype=torch.int64).to(dev, non_blocking=True)
                moved = {n: getattr(layer, n).index_select(0, src) for n in self.names}
                for n in self.names:
                    getattr(layer, n).index_copy_(0, dst, moved[n])
            if job.staging is not None and job.recv_dst:
                dst = torch.as_tensor(job.recv_dst, dtype=torch.int64).to(dev, non_blocking=True)
                idx = torch.as_tensor(job.recv_idx, dtype=torch.int64).to(dev, non_blocking=True)
                for n in self.names:
                    getattr(layer, n).index_copy_(0, dst, job.staging[n].index_select(0, idx))
            # the live tensors: the layer's copy is a no-op, the map swaps at the same boundary
            layer.commit(np.asarray(job.mig.new_row), {n: getattr(layer, n) for n in self.names})
            done.append(job.mig.layer)
        self.staging_bytes -= inflight.staging_bytes
        inflight.jobs = []
        inflight.reqs = []
        return done


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
