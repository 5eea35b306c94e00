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

Every per-expert tensor a layer lists in ``expert_weight_names`` (FP8 weights *and* their block
scales, biases, ...) travels as one :class:`~eplb.runtime.weights.ExpertWeightSet` unit: staged,
sent, fingerprinted and committed together; ``bytes_per_expert`` is their summed size (an FP8
DeepSeek-V3 expert: 44 MB of weights + 176 KB of scales, against 88 MB in bf16). 1-byte float tensors
(float8) go on the wire as ``uint8`` views (bit-exact on every backend).

Staging memory per rank is ``(experts received + experts moved locally) * bytes_per_expert`` of the
layers in flight (:attr:`MigrationExecutor.peak_staging_bytes`); the balancer bounds it with
``max_staging_bytes`` (the same decision on every rank). Transfers only carry experts a rank does
not hold yet (one per (rank, expert)), so the bytes on the wire are ``num_transfers *
bytes_per_expert`` per layer, and after a commit every slot is a bit-exact copy of its expert.

Transfer check (``verify_transfers``, default on): each source also sends the fingerprints of the
expert it sends (:meth:`ExpertWeightSet.fingerprints`, computed on the device at launch, ``16 *
len(expert_weight_names)`` bytes); at :meth:`MigrationExecutor.finish` each destination recomputes them
over its staging buffers, and one all-reduce of the mismatch counts makes every rank raise
:class:`TransferCorruptionError` *before* any slot is written or any map swapped (a wrong scale or a
flipped bit never reaches a forward). This costs one small all-reduce and a few host syncs per commit
boundary; with ``verify_transfers=False`` none of it happens.
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
from eplb.runtime.weights import ExpertWeightSet, wire_view

__all__ = ["InFlight", "MigrationExecutor", "TransferCorruptionError", "layer_weight_bytes"]


class TransferCorruptionError(RuntimeError):
    """A received expert's bytes differ from what its source sent (raised on every rank, nothing committed)."""


def layer_weight_bytes(layer: Any) -> int:
    """Bytes of one expert slot of ``layer``: every tensor of ``layer.expert_weight_names`` (weights, scales, ...)."""
    return ExpertWeightSet.of(layer).slot_bytes


@dataclass
class _LayerJob:
    mig: LayerMigration
    staging: ExpertWeightSet | None  # [n_recv, ...] received experts
    fp_sent: dict[int, torch.Tensor] = field(default_factory=dict)  # transfer index -> fingerprints this rank sends
    fp_recv: torch.Tensor | None = None  # [n_recv, names, 2] fingerprints received with the experts
    recv_dst: list[int] = field(default_factory=list)  # local dst slot of each (slot, staging index) pair
    recv_idx: list[int] = field(default_factory=list)
    local_dst: list[int] = field(default_factory=list)  # local moves: dst slot <- old value of src slot
    local_src: list[int] = field(default_factory=list)
    recv_src: list[tuple[int, int]] = field(default_factory=list)  # (source rank, expert) of each staging row


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
        verify_transfers: send each expert's fingerprints with it and check them before the commit
            (module doc); must be the same on every rank.
    """

    def __init__(self, layers: Sequence[Any], *, group: Any = None, rank: int | None = None,
                 num_ranks: int | None = None, use_side_stream: bool = True, verify_transfers: bool = True) -> None:
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
        self.verify_transfers = bool(verify_transfers)
        self.transfers_verified = 0

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
            live = ExpertWeightSet.of(layer)
            staging = None
            job = _LayerJob(mig, None)
            if recvs:  # allocated on the serving stream (its caching-allocator owner)
                staging = live.new_empty(len(recvs))
                job.staging = staging
                if self.verify_transfers:
                    job.fp_recv = torch.empty(len(recvs), len(self.names), 2, dtype=torch.int64, device=self.device)
            local = [(d - lo, s - lo) for d, s in mig.local_copies if lo <= d < lo + spr]
            stage_bytes += (len(recvs) + len(local)) * self.bytes_per_expert
            k = 0
            for i, t in enumerate(mig.transfers):
                if t.dst == me:
                    job.recv_dst += [d - lo for d in t.dst_slots]
                    job.recv_idx += [k] * len(t.dst_slots)
                    job.recv_src.append((int(t.src), int(getattr(t, "expert", -1))))
                    k += 1
                elif t.src == me and self.verify_transfers:  # from the live weights, before the side stream reads
                    job.fp_sent[i] = live.fingerprints([t.src_slot - lo])[0]
            job.local_dst, job.local_src = [d for d, _ in local], [s for _, s in local]
            jobs.append(job)
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
                    ops.append(dist.P2POp(dist.isend, wire_view(getattr(layer, name)[t.src_slot - lo]),
                                          **self._peer(t.dst)))
                if self.verify_transfers:
                    ops.append(dist.P2POp(dist.isend, job.fp_sent[i], **self._peer(t.dst)))
                sent += bpe
            elif t.dst == me:
                assert job.staging is not None
                for name in self.names:
                    ops.append(dist.P2POp(dist.irecv, wire_view(job.staging[name][recv_pos[(j, i)]]),
                                          **self._peer(t.src)))
                if job.fp_recv is not None:
                    ops.append(dist.P2POp(dist.irecv, job.fp_recv[recv_pos[(j, i)]], **self._peer(t.src)))
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
        self._wait(inflight)
        if self.verify_transfers:
            self._verify(inflight)
        return self._commit(inflight)

    def _wait(self, inflight: InFlight) -> None:
        """Wait for the posted transfers (CUDA: the serving stream waits for the side stream's event)."""
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

    def _verify(self, inflight: InFlight) -> None:
        """Compare received experts' fingerprints with their sources'; raise on every rank on a mismatch."""
        bad: list[str] = []
        n_bad = torch.zeros(self.num_ranks, dtype=torch.int64, device=self.device)
        for job in inflight.jobs:
            if job.staging is None or job.fp_recv is None:
                continue
            mine = job.staging.fingerprints()
            diff = (mine != job.fp_recv).any(-1)  # [n_recv, names]
            n_bad[self.rank] += diff.sum()
            self.transfers_verified += int(diff.shape[0])
            if bool(diff.any()):  # host read only on this (failing) path's rank
                for k, row in enumerate(diff.tolist()):
                    names = [n for n, b in zip(self.names, row, strict=True) if b]
                    if names:
                        src, e = job.recv_src[k]
                        bad.append(f"layer {job.mig.layer} expert {e} from rank {src}: {', '.join(names)}")
        if dist.is_available() and dist.is_initialized() and self.num_ranks > 1:
            dist.all_reduce(n_bad, group=self.group)  # every rank learns every rank's mismatches
        counts = n_bad.cpu().tolist()
        if any(counts):
            where = [r for r, c in enumerate(counts) if c]
            mine_msg = f"; here (rank {self.rank}): {'; '.join(bad)}" if bad else ""
            self.staging_bytes -= inflight.staging_bytes
            inflight.jobs, inflight.reqs = [], []
            raise TransferCorruptionError(
                f"migration of layers {list(inflight.layers)}: received expert bytes differ from the source's "
                f"fingerprints on rank(s) {where} ({sum(counts)} tensors); nothing was committed{mine_msg}")

    def _commit(self, inflight: InFlight) -> list[int]:
        done: list[int] = []
        dev = self.device
        for job in inflight.jobs:
            layer = self.layers[job.mig.layer]
            live = ExpertWeightSet.of(layer)
            if job.local_dst:  # gather every local source before any slot is overwritten
                src = torch.as_tensor(job.local_src, dtype=torch.int64).to(dev, non_blocking=True)
                dst = torch.as_tensor(job.local_dst, dtype=torch.int64).to(dev, non_blocking=True)
                live.copy_slots_(dst, live.select(src))
            if job.staging is not None and job.recv_dst:
                dst = torch.as_tensor(job.recv_dst, dtype=torch.int64).to(dev, non_blocking=True)
                idx = torch.as_tensor(job.recv_idx, dtype=torch.int64).to(dev, non_blocking=True)
                live.copy_slots_(dst, job.staging, idx)
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
