"""The online balancer: Manager + Policy + Executor, driven once per serving step.

Usage (every rank of the EP group, identical calls)::

    bal = OnlineBalancer(layers, config=BalancerConfig(num_iterations_eplb_update=400,
                                                       layer_updates_per_iter=2))
    for step in range(...):
        bal.step()                 # at the step boundary, before the model's forward
        out = model(batch)         # the EP layers count tokens on the device
    bal.close()                    # records the placement, stops the policy worker

What :meth:`OnlineBalancer.step` does (no blocking on the critical path):

1. **Commit** the layers whose transfers were launched at the previous boundary
   (:meth:`MigrationExecutor.finish`; at most ``layer_updates_per_iter`` layers).
2. **Collect** the load statistics all-reduced two boundaries ago (the collective had a whole step
   to finish; on CUDA the result was copied to pinned host memory one step ago): global per-expert
   loads ``[L, E]``, rank 0's clock, and the policy/drain control fields. Feed them to the
   :class:`~eplb.runtime.manager.RebalanceTrigger`; submit triggered layers to the policy worker
   (thread or process); accept a finished plan once *every* rank reports it ready (with the same
   checksum), at the same step on every rank.
3. **Launch** this step's statistics all-reduce (``async_op=True``) of the layers' device counters
   (``layer.take_counts()``, no host sync).
4. **Launch** the next queued layers' transfers (:meth:`MigrationExecutor.launch`), bounded by
   ``layer_updates_per_iter`` and ``max_staging_bytes``.

All decisions come from all-reduced data, so every rank takes them at the same step.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.metrics import balancedness, imbalance_ratio, rank_loads
from eplb.placement import Placement
from eplb.runtime._agreement import check_balancer_agreement
from eplb.runtime._watchdog import CollectiveWatchdog
from eplb.runtime.distributed import group_info
from eplb.runtime.executor import InFlight, MigrationExecutor
from eplb.runtime.manager import (
    BalancerConfig,
    LayerMigration,
    PlanRequest,
    PlanResult,
    PolicyWorker,
    RebalanceTrigger,
    plan_migration,
    read_map,
    recover_placement,
)
from eplb.runtime.metrics_export import BalancerMetrics
from eplb.stats.trace import atomic_write

__all__ = ["OnlineBalancer", "native_record_path", "resume_placement"]

log = logging.getLogger("eplb.online")

# control fields after the L*E counts in the all-reduced buffer
_C_TIME, _C_READY, _C_CHECK, _C_ERR = range(4)
_NCTRL = 4


def native_record_path(path: str | Path) -> Path:
    """Where the native placement file goes next to a vllm-ascend ``expert_map_record_path``:
    ``eplb.json`` -> ``eplb.native.json``."""
    p = Path(path)
    return p.with_name(p.stem + ".native.json")


class OnlineBalancer:
    """Online expert-placement balancer of a stack of EP layers (one object per rank).

    Args:
        layers: EP layers (:class:`eplb.runtime.ExpertParallelMoE` or anything with interface 2:
            ``expert_weight_names``, those ``[spr, ...]`` weights, ``placement_row``, ``take_counts()``,
            ``commit(row, weights)``), in placement-row order.
        config: :class:`BalancerConfig` (default: all defaults).
        placement: the placement the layers serve now (default: read from the layers).
        group: the EP process group (``None``: WORLD).
        comm_group: group for the balancer's own traffic (stats all-reduce and weight transfers).
            ``"new"`` (default when ``group`` is WORLD/None): a new group over the same ranks, so the
            balancer's NCCL work runs on its own communicator, concurrently with the model's
            all-to-alls (a collective call: every process must construct the balancer). ``None``:
            use ``group``. Or an existing group.
        clock: seconds (rank 0's is the one used for ``eplb_update_interval``).
        metrics: collect :class:`BalancerMetrics` (a Prometheus registry); served on
            ``config.metrics_port`` on rank 0 when set.
        policy_delay_s: artificial extra policy time (tests of the non-blocking property).
        layer_ids: model layer ids (default: from ``placement``).
    """

    def __init__(self, layers: Sequence[Any], config: BalancerConfig | None = None, *,
                 placement: Placement | None = None, group: Any = None, comm_group: Any = "new",
                 clock: Callable[[], float] = time.monotonic, metrics: bool = True,
                 policy_delay_s: float = 0.0) -> None:
        self.config = config if config is not None else BalancerConfig()
        if not isinstance(self.config, BalancerConfig):
            raise ValueError(f"config: expected a BalancerConfig, got {type(self.config).__name__}")
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("layers: expected at least one EP layer")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        if placement is None:
            placement = self._placement_from_layers()
        if not isinstance(placement, Placement):
            raise ValueError(f"placement: expected an eplb.Placement, got {type(placement).__name__}")
        if placement.num_layers != len(self.layers):
            raise ValueError(f"placement: {placement.num_layers} layers, but {len(self.layers)} EP layers were given")
        if placement.num_ranks != self.world:
            raise ValueError(f"placement: laid out for {placement.num_ranks} ranks, the EP group has {self.world}")
        for i, layer in enumerate(self.layers):
            row = layer.placement_row.detach().cpu().numpy()
            if not np.array_equal(row, placement.phy2log[i]):
                raise ValueError(f"placement: row {i} differs from layers[{i}].placement_row "
                                 f"(the balancer must start from the placement the layers serve)")
        if self.config.policy not in _policies():
            raise ValueError(f"BalancerConfig.policy: unknown policy {self.config.policy!r}; "
                             f"expected one of {sorted(_policies())}")
        self.placement = placement
        L, E = placement.num_layers, placement.num_experts
        self.num_layers, self.num_experts = L, E
        self._own_group = False
        if comm_group == "new":
            comm_group = _new_group_like(group) if self.distributed else None
            self._own_group = comm_group is not None and comm_group is not group
        elif comm_group is None:
            comm_group = group
        self.comm_group = comm_group
        self.executor = MigrationExecutor(self.layers, group=comm_group, rank=self.rank, num_ranks=self.world)
        self.device = self.executor.device
        self.watchdog = CollectiveWatchdog(self.rank, self.world, self.config.collective_timeout_s,
                                           name="OnlineBalancer") if self.distributed and self.world > 1 else None
        self.executor.watchdog = self.watchdog
        if self.distributed and self.world > 1:
            self._warm_up_comm()
        if (self.config.max_staging_bytes is not None and self.config.online
                and self.config.max_staging_bytes < self.executor.layer_bytes):
            raise ValueError(
                f"BalancerConfig.max_staging_bytes: {self.config.max_staging_bytes} bytes cannot stage one layer's local "
                f"weights ({self.executor.layer_bytes} bytes = {self.executor.slots_per_rank} slots x "
                f"{self.executor.bytes_per_expert} bytes)")
        if self.config.dispatch_strategy is None:
            strategies = {str(getattr(layer, "strategy", "uniform")) for layer in self.layers}
            if len(strategies) != 1:
                raise ValueError(f"layers: mixed replica strategies {sorted(strategies)}; set "
                                 f"BalancerConfig.dispatch_strategy")
            self.config = self.config.replace(dispatch_strategy=strategies.pop())
        # every rank must hold the same options and placement (AgreementError on every rank otherwise)
        check_balancer_agreement(group_info(self.comm_group) if self.distributed else group_info(None), self.config,
                                 placement.digest(), watchdog=self.watchdog, device=self.device)
        self.trigger = RebalanceTrigger(self.config, L, E)
        # import what the policy needs now, not in the worker thread while serving (imports hold the GIL)
        import scipy.optimize  # noqa: F401

        import eplb.dispatch  # noqa: F401
        self.worker = PolicyWorker(self.config.policy_backend)
        if self.config.online:
            self.worker.start(self.config.dispatch_strategy)
        self.policy_delay_s = float(policy_delay_s)
        self.clock = clock
        self._t0 = clock()
        self.step_idx = 0
        self._pending: deque[tuple[int, torch.Tensor, Any]] = deque()  # (step, device buffer, work)
        self._host: deque[tuple[int, torch.Tensor, Any]] = deque()  # (step, host buffer, cuda event)
        self._plan_id = 0
        self._plan_layers: tuple[int, ...] = ()
        self._result: PlanResult | None = None
        self._error: BaseException | None = None
        self._deferred: set[int] = set()
        self._queue: deque[LayerMigration] = deque()
        self._inflight: InFlight | None = None
        self._rebalance_started: float | None = None
        self._drain_request: set[int] = set()
        self.excluded_ranks: set[int] = set()
        self._last_step_t: float | None = None
        self._migrating = False
        self.last_committed: list[int] = []  # layers committed at the last boundary
        self.last_launched: list[int] = []  # layers whose transfers were posted at the last boundary
        self.metrics = BalancerMetrics(placement.layer_ids) if metrics else None
        if self.metrics is not None and self.config.metrics_port is not None and self.rank == 0:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_addr)
        self.history: list[dict[str, Any]] = []  # one entry per accepted plan
        self.commits: list[tuple[int, tuple[int, ...]]] = []  # (step index, layers committed then)
        self.closed = False
        self._warned_record = False

    # ----------------------------------------------------------------- helpers
    def _warm_up_comm(self) -> None:
        """One all-reduce and one ring of P2P transfers on the balancer's group, so communicator set-up
        (NCCL: lazy) happens here and not in a served step."""
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        x = torch.ones(1, dtype=torch.int64, device=dev)
        wd = self.watchdog
        work = dist.all_reduce(x, group=self.comm_group, async_op=True)
        wd.wait(work, "warm-up all-reduce", "warm-up") if wd is not None else work.wait()
        peer = self.executor._peer
        wdt = self.layers[0].w13.dtype if hasattr(self.layers[0], "w13") else torch.float32
        send = torch.full((1,), self.rank, dtype=torch.uint8 if wdt.itemsize == 1 else wdt, device=dev)  # fp8: bytes
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, **peer((self.rank + 1) % self.world)),
               dist.P2POp(dist.irecv, recv, **peer((self.rank - 1) % self.world))]
        reqs = dist.batch_isend_irecv(ops)
        if wd is not None and self.device.type != "cuda":  # gloo: a P2P work must be waited exactly once
            wd.wait_all(reqs, "warm-up transfers", "warm-up-p2p", p2p=True)
        else:
            for req in reqs:
                req.wait()
        if int(x.item()) != self.world or int(recv.item()) != (self.rank - 1) % self.world:
            raise RuntimeError("OnlineBalancer: the balancer's process group does not work as expected")

    def _wait_stats(self, step: int, work: Any) -> None:
        """Wait for step ``step``'s statistics all-reduce (with the watchdog's deadline)."""
        if self.watchdog is not None:
            self.watchdog.wait(work, f"load statistics all-reduce of step {step}", f"stats-{step}")
        else:
            work.wait()

    def _placement_from_layers(self) -> Placement:
        rows, first = [], self.layers[0]
        for layer in self.layers:
            rows.append(layer.placement_row.detach().cpu().numpy())
        lids = tuple(int(getattr(layer, "layer_id", i)) for i, layer in enumerate(self.layers))
        num_nodes = int(getattr(first, "num_nodes", 1))
        return Placement(np.stack(rows), int(first.num_experts), self.world, num_nodes, lids, {"source": "layers"})

    @property
    def bytes_per_expert(self) -> int:
        return self.executor.bytes_per_expert

    @property
    def busy_layers(self) -> set[int]:
        """Layers being planned, queued or in flight (the trigger leaves them out)."""
        busy = set(self._plan_layers) if self.worker.busy or self._result is not None else set()
        busy |= {m.layer for m in self._queue}
        if self._inflight is not None:
            busy |= set(self._inflight.layers)
        return busy

    @property
    def migrating(self) -> bool:
        """Whether the last :meth:`step` committed or launched a migration (the step it opened is a
        migration step)."""
        return self._migrating

    @property
    def idle(self) -> bool:
        """No plan in progress, nothing queued or in flight."""
        return (not self.worker.busy and self._result is None and not self._queue and self._inflight is None
                and not self._plan_layers)

    # -------------------------------------------------------------------- step
    def step(self) -> list[int]:
        """Run the balancer's work of one step boundary; returns the layers committed now."""
        if self.closed:
            raise RuntimeError("OnlineBalancer.step: the balancer is closed")
        now = self.clock()
        if self._last_step_t is not None and self.metrics is not None:
            self.metrics.observe_step(now - self._last_step_t, self._migrating)
        self._last_step_t = now
        committed = self._commit()
        self._collect()
        self._launch_stats(now)
        launched = self._launch_migrations()
        self._migrating = bool(committed) or bool(launched)
        self.last_committed, self.last_launched = committed, launched
        if self.metrics is not None:
            self.metrics.observe_staging(self.executor.staging_bytes, self.executor.peak_staging_bytes)
            if self.config.log_interval and self.rank == 0 and self.step_idx % self.config.log_interval == 0:
                log.info(self.metrics.log_line(self.step_idx))
        self.step_idx += 1
        return committed

    # ------------------------------------------------------------------ commit
    def _commit(self) -> list[int]:
        if self._inflight is None or self.executor.pending(self._inflight):
            return []
        inflight, self._inflight = self._inflight, None
        rows = {j.mig.layer: j.mig.new_row for j in inflight.jobs}
        done = self.executor.finish(inflight)
        self.placement = self.placement.with_layers({i: rows[i] for i in done})
        self.commits.append((self.step_idx, tuple(done)))
        if self.metrics is not None:
            self.metrics.observe_commit(len(done))
        if not self._queue and self._inflight is None and self._rebalance_started is not None:
            seconds = time.perf_counter() - self._rebalance_started
            self._rebalance_started = None
            if self.history:
                self.history[-1]["migration_s"] = seconds
                self.history[-1]["done_step"] = self.step_idx
            if self.metrics is not None:
                self.metrics.observe_migration_done(seconds)
            if self.config.expert_map_record_path is not None:
                self.record()
        return done

    # ------------------------------------------------------------------- stats
    def _launch_stats(self, now: float) -> None:
        L, E = self.num_layers, self.num_experts
        counts = torch.stack([layer.take_counts().reshape(-1).to(torch.int64) for layer in self.layers])
        ctrl = np.zeros(_NCTRL + self.world, dtype=np.int64)
        if self.rank == 0:
            ctrl[_C_TIME] = int(round((now - self._t0) * 1e6))
        if self._result is None and self.worker.done():
            try:
                self._result = self.worker.poll()
            except Exception as exc:  # noqa: BLE001 - reported to every rank through the all-reduce
                self._error = exc
                log.error("eplb policy failed on rank %d: %s", self.rank, exc)
        if self._result is not None:
            ctrl[_C_READY] = self._result.plan_id
            ctrl[_C_CHECK] = self._result.checksum
        if self._error is not None:
            ctrl[_C_ERR] = 1
        for r in self._drain_request:
            ctrl[_NCTRL + r] = 1
        self._drain_request = set()
        ctrl_t = torch.from_numpy(ctrl)
        if counts.device.type == "cuda":
            ctrl_t = ctrl_t.pin_memory().to(counts.device, non_blocking=True)
        buf = torch.cat([counts.reshape(L * E).to(ctrl_t.device), ctrl_t])
        work = dist.all_reduce(buf, group=self.comm_group, async_op=True) if self.distributed else None
        self._pending.append((self.step_idx, buf, work))

    def _collect(self) -> None:
        # stage 2: host copies made one boundary ago -> consume
        while self._host and self._host[0][0] <= self.step_idx - 2:
            step, host, event = self._host.popleft()
            if event is not None:
                event.synchronize()
            self._consume(step, host.numpy())
        # stage 1: collectives launched one boundary ago -> wait (already done) and copy to host
        while self._pending and self._pending[0][0] <= self.step_idx - 1:
            step, buf, work = self._pending.popleft()
            if work is not None:
                self._wait_stats(step, work)
            if buf.device.type == "cuda":
                host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
                host.copy_(buf, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(buf.device))
                self._host.append((step, host, event))
            else:
                self._host.append((step, buf, None))

    def _consume(self, step: int, vals: np.ndarray) -> None:
        L, E, R = self.num_layers, self.num_experts, self.world
        counts = vals[: L * E].reshape(L, E)
        ctrl = vals[L * E:]
        now_s = float(ctrl[_C_TIME]) / 1e6
        if self.metrics is not None and counts.sum() > 0:
            rl = rank_loads(counts.astype(np.float64), self.placement)
            self.metrics.observe_balance(balancedness(rl), imbalance_ratio(rl))
        if ctrl[_C_ERR] > 0:
            mine = f": {self._error}" if self._error is not None else ""
            raise RuntimeError(f"OnlineBalancer: the placement policy failed on {int(ctrl[_C_ERR])} of {R} ranks{mine}")
        drains = {int(r) for r in np.flatnonzero(ctrl[_NCTRL:_NCTRL + R] > 0)}
        if drains - self.excluded_ranks:
            self.excluded_ranks |= drains
            for layer in self.layers:  # tokens leave the drained ranks wherever an expert is held elsewhere
                layer.exclude_ranks(sorted(self.excluded_ranks))
            log.info("eplb: draining rank(s) %s", sorted(drains))
        if self._result is not None and ctrl[_C_READY] == R * self._result.plan_id:
            if ctrl[_C_CHECK] != R * self._result.checksum:
                raise RuntimeError(f"OnlineBalancer: ranks computed different plans for plan {self._result.plan_id} "
                                   f"(checksums disagree); the policy must be deterministic")
            self._accept(self._result, step)
            self._result = None
            self._plan_layers = ()
        layers = self.trigger.observe(step, counts, now_s, placement=self.placement, busy=self.busy_layers)
        self._deferred |= set(layers)
        if self.excluded_ranks:
            self._deferred |= set(self._unsafe_layers()) - self.busy_layers
        if self._deferred and not self.worker.busy and self._result is None and not self._plan_layers:
            self._submit(sorted(self._deferred - self.busy_layers))
            self._deferred = set()

    def _unsafe_layers(self) -> list[int]:
        """Layers where an expert is served only by excluded (draining) ranks."""
        if not self.excluded_ranks:
            return []
        spr = self.placement.slots_per_rank
        keep = [r for r in range(self.world) if r not in self.excluded_ranks]
        idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
        E = self.num_experts
        return [i for i, row in enumerate(self.placement.phy2log) if len(np.unique(row[idx])) < E]

    @property
    def drained(self) -> bool:
        """Whether every expert is served by non-excluded ranks in every layer (after :meth:`drain`)."""
        return bool(self.excluded_ranks) and not self._unsafe_layers() and self.idle

    # ------------------------------------------------------------------ policy
    def _submit(self, layers: list[int]) -> None:
        if not layers:
            return
        self._plan_id += 1
        window = self.trigger.window.array(layers) if self.trigger.window is not None and len(self.trigger.window) \
            else np.zeros((1, len(layers), self.num_experts), dtype=np.int64)
        if window.sum() == 0 and self.excluded_ranks:  # draining before any load was seen: plan on replica counts
            window = self.placement.logcnt[layers][None]
        req = PlanRequest(self._plan_id, tuple(layers), window, self.placement.select_layers(layers),
                          self.config.policy, dict(self.config.policy_options), tuple(sorted(self.excluded_ranks)),
                          self.config.min_balancedness_gain, self.policy_delay_s, self.config.dispatch_strategy)
        self._plan_layers = tuple(layers)
        self.worker.submit(req)

    def _accept(self, res: PlanResult, step: int) -> None:
        migs = []
        for j, li in enumerate(res.layers):
            if not res.changed[j]:
                continue
            migs.append(plan_migration(self.placement.phy2log[li], res.rows[j], self.world,
                                       self.placement.ranks_per_node, layer=li))
        self.trigger.mark_planned(res.layers, res.planned_loads)
        nbytes = sum(m.num_transfers for m in migs) * self.bytes_per_expert
        entry = {"plan_id": res.plan_id, "step": self.step_idx, "stats_step": step, "layers": list(res.layers),
                 "migrating": [m.layer for m in migs], "transfers": int(sum(m.num_transfers for m in migs)),
                 "bytes": int(nbytes), "policy_s": res.seconds,
                 "balancedness_before": float(np.mean(res.balancedness_before)),
                 "balancedness_after": float(np.mean(res.balancedness_after))}
        if self.metrics is not None:
            self.metrics.observe_plan(res.seconds)
        if not migs:
            entry["migration_s"] = 0.0
            self.history.append(entry)
            return
        self.history.append(entry)
        self._queue.extend(migs)
        if self._rebalance_started is None:
            self._rebalance_started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_rebalance(len(migs), nbytes)

    # --------------------------------------------------------------- migration
    def _launch_migrations(self) -> list[int]:
        cap = self.config.max_migration_bytes_per_step
        if self._inflight is not None:  # a byte-capped batch still posting its chunks
            self.executor.post_next(self._inflight, cap)
            return list(self._inflight.layers)
        n = self.config.layer_updates_per_iter
        if not self._queue or n == 0:
            return []
        batch: list[LayerMigration] = []
        budget = self.config.max_staging_bytes
        while self._queue and len(batch) < n:
            cand = batch + [self._queue[0]]
            if budget is not None and batch and self.executor.max_staging_need(cand) > budget:
                break
            batch.append(self._queue.popleft())
        self._inflight = self.executor.launch(batch, cap)
        return [m.layer for m in batch]

    # -------------------------------------------------------------- resilience
    def drain(self, rank: int) -> None:
        """Move every expert of ``rank`` onto the other ranks while serving continues.

        Takes effect at the same step on every rank (the request travels in the next all-reduce; it may
        be called on one rank or on all). Layers are re-planned without ``rank`` and migrated
        ``layer_updates_per_iter`` per step; every expert stays served throughout (each committed row
        is a complete placement). :attr:`drained` turns true when done. The rank keeps its old
        experts as spare copies (nothing is sent to it). Raises ValueError when the other ranks cannot
        hold every expert, saying how many slots are missing.
        """
        r = int(rank)
        if not 0 <= r < self.world:
            raise ValueError(f"drain: rank {r} out of range [0, {self.world})")
        ex = self.excluded_ranks | self._drain_request | {r}
        spr, E = self.placement.slots_per_rank, self.num_experts
        have = (self.world - len(ex)) * spr
        if have < E:
            raise ValueError(
                f"drain({r}): the remaining {self.world - len(ex)} ranks have {have} slots per layer but {E} experts "
                f"must stay served: {E - have} slots are missing (drain needs redundancy: at least "
                f"{-(-E // max(1, self.world - len(ex)))} slots per rank)")
        self._drain_request.add(r)

    # ----------------------------------------------------------------- records
    def record(self, path: str | Path | None = None) -> list[Path]:
        """Write the current placement (rank 0 only): vllm-ascend JSON at ``path`` (default
        ``expert_map_record_path``) and the native file next to it (:func:`native_record_path`),
        whose meta carries the window's loads (for :func:`resume_placement`). Returns the paths written."""
        target = path if path is not None else self.config.expert_map_record_path
        if target is None or self.rank != 0:
            return []
        p = Path(target)
        meta = {"step": self.step_idx, "source": "eplb.online", "excluded_ranks": sorted(self.excluded_ranks)}
        if self.trigger.window is not None and len(self.trigger.window):
            meta["window_loads"] = self.trigger.window.sum().tolist()
        pl = self.placement.with_meta(**meta)
        from eplb.formats import write_placement

        written = []
        nat = native_record_path(p)
        atomic_write(nat, (json.dumps(pl.to_dict()) + "\n").encode())
        written.append(nat)
        try:
            write_placement(pl, p, "vllm-ascend")
            written.append(p)
        except ValueError as exc:  # e.g. co-located replicas, which vllm-ascend's map cannot express
            if not self._warned_record:
                log.warning("eplb: expert_map_record_path %s not written in vllm-ascend format (%s); native file: %s "
                            "(warned once)", p, exc, nat)
                self._warned_record = True
        return written

    # ------------------------------------------------------------------ status
    def stats(self) -> dict[str, Any]:
        """A summary for logs and benchmarks (this rank's view)."""
        out: dict[str, Any] = {
            "step": self.step_idx, "rebalances": len([h for h in self.history if h["migrating"]]),
            "plans": len(self.history), "layers_migrated": sum(len(c[1]) for c in self.commits),
            "bytes_moved": int(sum(h["bytes"] for h in self.history)),
            "bytes_sent_by_rank": self.executor.bytes_sent, "bytes_received_by_rank": self.executor.bytes_received,
            "peak_staging_bytes": self.executor.peak_staging_bytes, "bytes_per_expert": self.bytes_per_expert,
            "excluded_ranks": sorted(self.excluded_ranks),
        }
        if self.metrics is not None:
            out["step_time"] = self.metrics.step_time_quantiles()
            out["migration_step_time"] = self.metrics.step_time_quantiles(True)
        return out

    def close(self, *, record: bool = True) -> None:
        """Finish pending work (in-flight layers are committed, pending collectives completed), record
        the placement (``expert_map_record_path``) and stop the policy worker and metrics server.
        Collective: call on every rank."""
        if self.closed:
            return
        if self._inflight is not None:
            while self.executor.pending(self._inflight):
                self.executor.post_next(self._inflight)
            self._commit()
        for step, _, work in self._pending:
            if work is not None:
                self._wait_stats(step, work)
        self._pending.clear()
        self._host.clear()
        self.worker.close()
        if record and self.config.expert_map_record_path is not None:
            self.record()
        if self.metrics is not None:
            self.metrics.close()
        if self._own_group and self.distributed:
            dist.destroy_process_group(self.comm_group)
        self.closed = True

    def __enter__(self) -> OnlineBalancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _policies() -> dict[str, Any]:
    from eplb.policies import POLICIES

    return POLICIES


def _new_group_like(group: Any) -> Any:
    """A new process group over ``group``'s ranks (WORLD when ``None``), same backend."""
    if group is None or group is dist.group.WORLD:
        return dist.new_group(ranks=list(range(dist.get_world_size())), backend=str(dist.get_backend()))
    return group  # a subgroup: creating one needs every process of WORLD; reuse the EP group


def resume_placement(config: BalancerConfig, *, num_experts: int, num_ranks: int, num_layers: int | None = None,
                     layer_ids: Sequence[int] = (), num_nodes: int = 1, lost_ranks: Sequence[int] | None = None
                     ) -> Placement | None:
    """The placement to start (or restart) serving with.

    In order: ``expert_map_path`` / ``init_expert_location`` / ``initial_global_assignments``
    (:meth:`BalancerConfig.initial_placement`); else the native record next to
    ``expert_map_record_path`` if it exists: as is when it was made for ``num_ranks`` ranks, else
    (after a hard rank loss, e.g. torchrun elastic restarting the survivors with a smaller world) a
    placement for the survivors planned by :func:`~eplb.runtime.manager.recover_placement` from the
    recorded window loads (``lost_ranks`` default: the highest old ranks). ``None``: nothing configured.
    """
    pl = config.initial_placement(num_experts, num_ranks, num_layers=num_layers, layer_ids=layer_ids,
                                  num_nodes=num_nodes) if (config.expert_map_path or config.init_expert_location
                                                           or config.initial_global_assignments) else None
    if pl is not None or config.expert_map_record_path is None:
        return pl
    nat = native_record_path(config.expert_map_record_path)
    if not nat.exists():
        return None
    prev = read_map(nat, num_experts=num_experts, what="expert_map_record_path")
    if num_layers is not None and prev.num_layers != num_layers:
        raise ValueError(f"expert_map_record_path: {nat} has {prev.num_layers} layers, the model has {num_layers}")
    if prev.num_ranks == num_ranks:
        return prev
    if prev.num_ranks < num_ranks:
        raise ValueError(f"expert_map_record_path: {nat} was recorded for {prev.num_ranks} ranks; growing to "
                         f"{num_ranks} ranks is not a recovery (plan a new placement instead)")
    k = prev.num_ranks - num_ranks
    lost = list(lost_ranks) if lost_ranks is not None else list(range(prev.num_ranks - k, prev.num_ranks))
    if len(lost) != k:
        raise ValueError(f"lost_ranks: {len(lost)} ranks given, but {prev.num_ranks} -> {num_ranks} ranks lost {k}")
    loads = prev.meta.get("window_loads")
    arr = np.asarray(loads, dtype=np.float64) if loads is not None else None
    if arr is not None and arr.sum() == 0:
        arr = None
    return recover_placement(prev, lost, arr, policy=config.policy, options=dict(config.policy_options))
