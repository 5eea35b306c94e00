"""The online balancer's step pipeline as one state machine with no I/O (sans-I/O, like h11).

:class:`Pipeline` holds every decision of the online balancer: the trigger, the plan in progress,
the queue of layer migrations, the batch in flight (its transfers posted in chunks under
``max_migration_bytes_per_step``, batches bounded by ``layers_per_step`` and
``max_staging_bytes``), the excluded (draining) ranks, the placement served and the history. It
never talks to a network, a device, a thread or a clock: a *driver* feeds it what happened and
carries out what it asks for. Two drivers exist and they make the same decisions by construction:

* :class:`eplb.runtime.balancer.OnlineBalancer` -- all-reduced statistics, a policy worker, the
  migration executor (P2P transfers and commits);
* :func:`eplb.sim.online.replay_online` -- a trace, an inline policy run, the cost model.

At step boundary ``b`` a driver calls, in this order::

    pipe.start(b)
    batch = pipe.commit()                 # 1. the batch whose transfers all went out: commit it now
    req = pipe.consume(tag, loads, now_s, drains=..., ready=...)   # 2. statistics of boundary tag (<= b - 2)
    pipe.plan_finished(result)            # 3. when the policy run of ``req`` finished (announced with b's stats)
    post = pipe.launch()                  # 4. the transfers to post during forward step b

Statistics tagged ``b`` hold the loads counted up to boundary ``b`` (forward step ``b - 1``). A plan is
accepted at the first consumed tag that carries it on every rank (``ready``; a single process: the
tag it was announced with), so every rank accepts it at the same boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplb.errors import ConfigError, InputError
from eplb.online.config import BalancerConfig
from eplb.online.migration import LayerMigration, Transfer, chunk_size, max_staging_need, plan_migration
from eplb.online.planning import PlanRequest, PlanResult
from eplb.online.trigger import RebalanceTrigger
from eplb.placement import Placement
from eplb.policies.exclude import unsafe_layers
from eplb.policies.registry import policy_info

__all__ = ["Batch", "Launch", "Pipeline"]


@dataclass
class Batch:
    """Layers migrated together: their transfers go out in chunks, then they commit at once."""

    migrations: tuple[LayerMigration, ...]
    launched_step: int
    posted: int = 0  # transfers posted so far
    chunks: list[int] = field(default_factory=list)  # transfers posted per step

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(m.layer for m in self.migrations)

    @property
    def transfers(self) -> list[Transfer]:
        """Every transfer of the batch in posting order (layer by layer, each in ``(dst, expert)`` order)."""
        return [t for m in self.migrations for t in m.transfers]

    @property
    def pending(self) -> int:
        """Transfers not posted yet (the batch cannot commit before they are)."""
        return sum(m.num_transfers for m in self.migrations) - self.posted


@dataclass(frozen=True)
class Launch:
    """What to post during this forward step: the chunk ``transfers`` of ``batch`` (``new``: the
    batch starts now, so its staging is allocated now)."""

    batch: Batch
    new: bool
    transfers: tuple[Transfer, ...]


class Pipeline:
    """The online balancer's decisions, step boundary by step boundary (see the module docstring).

    Args:
        config: the balancer's configuration (``dispatch_strategy`` resolved by the driver).
        placement: the placement served at the start.
        bytes_per_expert: one expert's weight bytes (byte caps, staging, history).
        policy_delay_s: artificial extra policy time written into requests (tests).
    """

    def __init__(self, config: BalancerConfig, placement: Placement, *, bytes_per_expert: int,
                 policy_delay_s: float = 0.0) -> None:
        if not isinstance(config, BalancerConfig):
            raise InputError(f"config: expected a BalancerConfig, got {type(config).__name__}")
        try:
            policy_info(config.policy)
        except InputError as exc:
            raise ConfigError(f"BalancerConfig.policy: {exc}") from None
        self.config = config
        self.placement = placement
        self.num_layers, self.num_experts, self.num_ranks = placement.num_layers, placement.num_experts, placement.num_ranks
        self.bytes_per_expert = int(bytes_per_expert)
        self.policy_delay_s = float(policy_delay_s)
        layer_bytes = placement.slots_per_rank * self.bytes_per_expert
        if config.max_staging_bytes is not None and config.online and config.max_staging_bytes < layer_bytes:
            raise InputError(
                f"BalancerConfig.max_staging_bytes: {config.max_staging_bytes} bytes cannot stage one layer's local "
                f"weights ({layer_bytes} bytes = {placement.slots_per_rank} slots x {self.bytes_per_expert} bytes)")
        self.trigger = RebalanceTrigger(config, self.num_layers, self.num_experts)
        self.boundary = 0
        self.plan_id = 0
        self.plan_layers: tuple[int, ...] = ()  # layers of the plan in progress (submitted .. accepted)
        self.planning = False  # a request is out and its result not handed back yet
        self.result: PlanResult | None = None  # finished, announced, not accepted yet
        self.announced_at: int | None = None  # boundary whose statistics first carried ``result``
        self.decided: tuple[int, int] = (-1, -1)  # (boundary, tag) of the plan in progress
        self.deferred: set[int] = set()
        self.queue: deque[LayerMigration] = deque()
        self.inflight: Batch | None = None
        self.excluded_ranks: set[int] = set()
        self.history: list[dict[str, Any]] = []  # one entry per accepted plan
        self.commits: list[tuple[int, tuple[int, ...]]] = []  # (boundary, layers committed then)
        self.rebalancing = False  # an accepted plan's migrations are queued or in flight

    # ------------------------------------------------------------------ state
    @property
    def busy_layers(self) -> set[int]:
        """Layers being planned, queued or in flight (the trigger leaves them out)."""
        busy = set(self.plan_layers) if (self.planning or self.result is not None) else set()
        busy |= {m.layer for m in self.queue}
        if self.inflight is not None:
            busy |= set(self.inflight.layers)
        return busy

    @property
    def idle(self) -> bool:
        """No plan in progress, nothing queued or in flight."""
        return (not self.planning and self.result is None and not self.queue and self.inflight is None
                and not self.plan_layers)

    @property
    def active(self) -> bool:
        """Anything in progress that can change the placement soon (the simulator's quiet test)."""
        return not self.idle or bool(self.deferred)

    def unsafe_layers(self) -> list[int]:
        """Layers where an expert is served only by excluded (draining) ranks."""
        return unsafe_layers(self.placement, self.excluded_ranks)

    @property
    def drained(self) -> bool:
        """Every expert is served by non-excluded ranks in every layer, nothing in progress."""
        return bool(self.excluded_ranks) and not self.unsafe_layers() and self.idle

    def ready_fields(self) -> tuple[int, int] | None:
        """``(plan_id, checksum)`` of the finished plan to announce with this boundary's statistics."""
        return None if self.result is None else (self.result.plan_id, self.result.checksum)

    # ------------------------------------------------------------- transitions
    def start(self, boundary: int) -> None:
        """Begin step boundary ``boundary`` (increasing)."""
        self.boundary = int(boundary)

    def commit(self) -> Batch | None:
        """1. The in-flight batch whose transfers all went out, committed now (``None``: nothing to commit).
        The driver swaps the layers' weights and maps at this boundary."""
        batch = self.inflight
        if batch is None or batch.pending:
            return None
        self.inflight = None
        self.placement = self.placement.with_layers({m.layer: m.new_row for m in batch.migrations})
        self.commits.append((self.boundary, batch.layers))
        if not self.queue and self.rebalancing:
            self.rebalancing = False
            if self.history:
                self.history[-1]["done_step"] = self.boundary
        return batch

    def consume(self, tag: int, loads: np.ndarray, now_s: float | None = None, *, drains: Iterable[int] = (),
                ready: bool | None = None) -> PlanRequest | None:
        """2. The statistics launched at boundary ``tag``: ``loads`` ``[L, E]`` (all ranks' sum),
        ``now_s`` (rank 0's clock), ``drains`` (ranks asked to drain), ``ready`` (every rank announced
        the finished plan; ``None``: this process's announcement decides). Accepts a ready plan, feeds
        the trigger and returns the request to run next (or ``None``)."""
        new = {int(r) for r in drains} - self.excluded_ranks
        if new:
            self.excluded_ranks |= new
            self.placement = self.placement.with_meta(excluded_ranks=sorted(self.excluded_ranks))
        if self.result is not None:
            ok = (self.announced_at is not None and self.announced_at <= tag) if ready is None else bool(ready)
            if ok:
                self._accept(self.result, tag)
        layers = self.trigger.observe(tag, loads, now_s, placement=self.placement, busy=self.busy_layers)
        self.deferred |= set(layers)
        if self.excluded_ranks:
            self.deferred |= set(self.unsafe_layers()) - self.busy_layers
        if self.deferred and not self.planning and self.result is None and not self.plan_layers:
            sel = sorted(self.deferred - self.busy_layers)
            self.deferred = set()
            if sel:
                return self._request(sel, tag)
        return None

    def plan_finished(self, result: PlanResult) -> None:
        """3. The policy run of the last request finished; it is announced with this boundary's statistics."""
        if not self.planning:
            raise RuntimeError("Pipeline.plan_finished: no plan in progress")
        self.planning = False
        self.result = result
        self.announced_at = self.boundary

    def launch(self) -> Launch | None:
        """4. The transfers to post now: the next chunk of the batch in flight, or a new batch of up to
        ``layers_per_step`` queued layers whose staging fits ``max_staging_bytes``."""
        c = self.config
        new = False
        if self.inflight is None:
            if not self.queue or c.layers_per_step == 0:
                return None
            batch: list[LayerMigration] = []
            while self.queue and len(batch) < c.layers_per_step:
                cand = batch + [self.queue[0]]
                if (c.max_staging_bytes is not None and batch
                        and max_staging_need(cand, self.bytes_per_expert) > c.max_staging_bytes):
                    break
                batch.append(self.queue.popleft())
            self.inflight = Batch(tuple(batch), self.boundary)
            new = True
        b = self.inflight
        n = chunk_size(b.pending, c.max_migration_bytes_per_step, self.bytes_per_expert)
        chunk = tuple(b.transfers[b.posted:b.posted + n])
        b.posted += n
        b.chunks.append(n)
        return Launch(b, new, chunk)

    # --------------------------------------------------------------- helpers
    def _request(self, layers: list[int], tag: int) -> PlanRequest:
        self.plan_id += 1
        w = self.trigger.window
        window = w.array(layers) if w is not None and len(w) else np.zeros((1, len(layers), self.num_experts), np.int64)
        if window.sum() == 0 and self.excluded_ranks:  # draining before any load was seen: plan on replica counts
            window = self.placement.logcnt[layers][None]
        c = self.config
        self.plan_layers = tuple(layers)
        self.planning = True
        self.decided = (self.boundary, int(tag))
        return PlanRequest(self.plan_id, tuple(layers), window, self.placement.select_layers(layers), c.policy,
                           dict(c.policy_options), tuple(sorted(self.excluded_ranks)), c.min_balancedness_gain,
                           self.policy_delay_s, c.dispatch_strategy)

    def _accept(self, res: PlanResult, tag: int) -> None:
        migs = [plan_migration(self.placement.phy2log[li], res.rows[j], self.num_ranks, self.placement.ranks_per_node,
                               layer=li) for j, li in enumerate(res.layers) if res.changed[j]]
        self.trigger.mark_planned(res.layers, res.planned_loads)
        n = int(sum(m.num_transfers for m in migs))
        entry: dict[str, Any] = {
            "plan_id": res.plan_id, "step": self.boundary, "stats_step": int(tag),
            "decided_step": self.decided[0], "decided_stats_step": self.decided[1],
            "layers": [int(x) for x in res.layers], "migrating": [int(m.layer) for m in migs],
            "transfers": n, "bytes": n * self.bytes_per_expert, "policy_s": res.seconds,
            "balancedness_before": float(np.mean(res.balancedness_before)),
            "balancedness_after": float(np.mean(res.balancedness_after)),
        }
        self.history.append(entry)
        self.result = None
        self.announced_at = None
        self.plan_layers = ()
        if migs:
            self.queue.extend(migs)
            self.rebalancing = True
        else:
            entry["done_step"] = self.boundary

    @property
    def last_accepted(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None
