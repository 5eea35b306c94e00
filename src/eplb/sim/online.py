"""Online replay: the runtime's online balancer, replayed step by step on a trace.

The decision logic is NOT re-implemented here: every step's loads go to the runtime's own
:class:`eplb.runtime.manager.RebalanceTrigger` (cadence, warm-up, wall-clock interval, cosine
threshold, balancedness floor, busy layers), new placements come from
:func:`eplb.runtime.manager.compute_plan` (the migration-aware policy run: ``keep_in_place`` and
the ``min_balancedness_gain`` rule), the weights to move from
:func:`eplb.runtime.manager.plan_migration` (what the Executor sends), and the trigger's record
of planned-for loads is updated with ``mark_planned`` exactly when the runtime does.

The simulator reproduces the step-boundary pipeline of :class:`eplb.runtime.balancer.OnlineBalancer`
(``step()`` at boundary ``b``, before forward step ``b``):

1. commit the layers whose transfers were launched at boundary ``b - 1``;
2. consume the statistics launched at boundary ``b - 2`` (tag ``b - 2`` holds the loads of forward
   step ``b - 3``; tag 0 is empty): accept a finished plan, then ``trigger.observe`` (layers being
   planned, queued or in flight are busy), defer triggered layers while a plan is in progress,
   submit the deferred ones otherwise;
3. launch this boundary's statistics (a plan that finished is announced with them);
4. launch the next ``layer_updates_per_iter`` queued layers' transfers.

Differences from a served run, by design:

* the policy runs inline (the runtime's ``policy_backend="inline"``): a plan submitted at boundary
  ``b`` is ready at ``b``, accepted at ``b + 2``, its first layers committed at ``b + 3`` (with a
  thread or process backend it may take longer);
* time is simulated: ``now_s`` (for ``eplb_update_interval``) is the sum of simulated step times;
* ``max_staging_bytes`` is not simulated (only ``layer_updates_per_iter`` bounds a batch);
* transfers launched at boundary ``b`` run during forward step ``b``: their time (the busiest rank's
  experts sent or received x expert bytes / P2P bandwidth) and bytes are charged to step ``b``,
  and the cost model's ``migration_exposed`` fraction of that time is added to its step time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from eplb._checks import ArrayLike
from eplb.placement import Placement
from eplb.sim.cost import CostModel
from eplb.sim.engine import (
    STRATEGIES,
    SimInput,
    SimResult,
    as_sim_input,
    check_fits,
    evaluate_block,
    expert_rank_share,
    step_chunk,
)
from eplb.stats.trace import Trace

__all__ = ["ONLINE_KEYS", "online_items", "parse_online_spec", "replay_online"]

#: Short keys of ``--online key=value,...`` and the :class:`BalancerConfig` field each sets.
ONLINE_KEYS: dict[str, str] = {
    "interval": "eplb_update_interval",
    "threshold": "eplb_update_threshold",
    "iterations": "num_iterations_eplb_update",
    "every": "num_iterations_eplb_update",
    "wait": "num_wait_worker_iterations",
    "warmup": "num_wait_worker_iterations",
    "window": "window_size",
    "floor": "balancedness_floor",
    "gain": "min_balancedness_gain",
    "layers": "layer_updates_per_iter",
}


def _value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("none", "null", "off"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def online_items(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"interval=60,threshold=0.9"`` (or a mapping) -> ``{BalancerConfig name or alias: value}``.

    Short keys of :data:`ONLINE_KEYS` are expanded; other keys are passed through for
    :meth:`BalancerConfig.from_dict` (our field names and the engines' aliases).
    """
    if isinstance(spec, Mapping):
        raw = dict(spec)
    else:
        raw = {}
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"online: expected key=value pairs separated by commas, got {part.strip()!r}")
            k, v = part.split("=", 1)
            if not k.strip():
                raise ValueError(f"online: empty key in {part.strip()!r}")
            raw[k.strip()] = _value(v)
    return {ONLINE_KEYS.get(str(k).strip().lower().replace("-", "_"), str(k)): v for k, v in raw.items()}


def parse_online_spec(spec: str | Mapping[str, Any] | None, **defaults: Any) -> Any:
    """A :class:`~eplb.runtime.manager.BalancerConfig` from ``"interval=60,threshold=0.9,layer_updates_per_iter=2"``.

    Keys: see :func:`online_items`. ``defaults`` are applied first (e.g. ``num_slots``, ``policy``).
    ``interval`` is in (simulated) seconds.
    """
    from eplb.runtime.manager import BalancerConfig

    return BalancerConfig.from_dict({**defaults, **online_items(spec)}, source="online")


def _migration_step_cost(migs: list[Any], num_ranks: int, cost: CostModel) -> tuple[int, int, float]:
    """(transfers, bytes, ms) of layer migrations whose transfers run together in one step."""
    send = np.zeros(num_ranks, dtype=np.int64)
    recv = np.zeros(num_ranks, dtype=np.int64)
    n = 0
    for m in migs:
        for t in m.transfers:
            send[t.src] += 1
            recv[t.dst] += 1
        n += m.num_transfers
    busiest = int(max(send.max(initial=0), recv.max(initial=0)))
    return n, n * cost.expert_bytes, float(cost.migration_ms(busiest))


def replay_online(
    trace: Trace | ArrayLike | SimInput,
    initial: Placement,
    config: Any,
    *,
    cost: CostModel | None = None,
    strategy: str = "uniform",
    planned_loads: ArrayLike | None = None,
    label: str | None = None,
    progress: Callable[[int], None] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> SimResult:
    """Replay ``trace`` starting from ``initial`` under the online balancer configured by ``config``.

    Args:
        trace: ``[T, L, E]`` counts (forward step ``t`` routes ``counts[t]``).
        initial: starting placement (its ranks/nodes are the layout).
        config: a :class:`~eplb.runtime.manager.BalancerConfig` (``policy``, cadence, thresholds,
            ``layer_updates_per_iter``); the policy runs inline whatever ``policy_backend`` says.
        planned_loads: ``[L, E]`` loads ``initial`` was planned for, recorded in the trigger before the
            first step (``trigger.mark_planned``). Default ``None``: like a served
            :class:`~eplb.runtime.balancer.OnlineBalancer`, which starts with no record, so the
            first check re-plans every layer with traffic.
        strategy: replica-choice strategy for rank loads.

    Returns:
        A :class:`SimResult` (mode ``"online"``): ``events`` has one entry per accepted plan, with the
        keys of the runtime balancer's ``history`` (``plan_id``, ``step``: boundary of acceptance,
        ``stats_step``: the statistics tag consumed then, ``layers`` planned, ``migrating`` layers,
        ``transfers``, ``bytes``) plus ``decided_step`` / ``decided_stats_step`` (boundary and tag of
        the trigger), ``ms`` (migration time) and ``commits`` (``[boundary, [layers]]`` pairs);
        ``meta["commits"]`` lists every commit like the balancer's ``commits``. Boundaries and tags are
        step positions ``0..T-1`` in the replayed trace.
    """
    from eplb.runtime.manager import (
        BalancerConfig,
        LayerMigration,
        PlanRequest,
        PlanResult,
        RebalanceTrigger,
        compute_plan,
        plan_migration,
    )
    from eplb.sim.cost import default_cost_model

    if not isinstance(config, BalancerConfig):
        raise ValueError(f"config: expected a BalancerConfig, got {type(config).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown replica-choice strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    from eplb.sim.capacity import known_policies

    if config.policy not in known_policies():
        raise ValueError(f"BalancerConfig.policy: unknown policy {config.policy!r}; expected one of {sorted(known_policies())}")
    data = as_sim_input(trace)
    check_fits(initial, data, "initial placement")
    cm = cost or default_cost_model()
    T, L, E = data.num_steps, data.num_layers, data.num_experts
    R = initial.num_ranks
    trig = RebalanceTrigger(config, L, E)
    if planned_loads is not None:
        pl0 = np.asarray(planned_loads, dtype=np.float64)
        if pl0.shape != (L, E):
            raise ValueError(f"planned_loads: expected shape {(L, E)}, got {pl0.shape}")
        trig._ensure(E)  # the record needs the window's shape; no load is observed
        trig.mark_planned(range(L), pl0)
    chunk = step_chunk(L, max(E, initial.num_slots))
    n_per = int(config.layer_updates_per_iter)

    comp, comm, tok = np.zeros(T), np.zeros(T), np.zeros(T)
    step_ms = np.zeros(T)
    mig_ms = np.zeros(T)
    mig_bytes = np.zeros(T, dtype=np.int64)
    updates = np.zeros(T, dtype=np.int64)
    imb = np.zeros((T, L))
    layer_sum = np.zeros(L)
    events: list[dict[str, Any]] = []
    commits: list[tuple[int, tuple[int, ...]]] = []
    clock = np.zeros(T + 1)  # simulated seconds at each boundary

    cur = initial
    share = expert_rank_share(cur) if strategy == "uniform" else None
    queue: deque[LayerMigration] = deque()
    inflight: list[LayerMigration] = []
    inflight_ev: list[dict[str, Any]] = []
    worker_result: PlanResult | None = None  # finished plan not yet announced (worker busy)
    announced: tuple[int, PlanResult] | None = None  # (tag announced with, plan)
    plan_layers: tuple[int, ...] = ()
    decided: tuple[int, int] = (-1, -1)  # (boundary, tag) of the pending plan's trigger
    deferred: set[int] = set()
    ev_of_layer: dict[int, dict[str, Any]] = {}
    plan_id = 0
    cache: tuple[int, Any] | None = None  # (first step, block) under the current placement

    def busy_layers() -> set[int]:
        busy = set(plan_layers) if (worker_result is not None or announced is not None) else set()
        busy |= {m.layer for m in queue}
        busy |= {m.layer for m in inflight}
        return busy

    def stats(tag: int) -> np.ndarray:
        return data.counts[tag - 1] if tag >= 1 else np.zeros((L, E), dtype=np.int64)

    def stats_step(tag: int) -> int:  # the step id the balancer's counter would carry
        return tag

    for b in range(T):
        # 1. commit what was launched at b - 1
        if inflight:
            cur = cur.with_layers({m.layer: m.new_row for m in inflight})
            share = expert_rank_share(cur) if strategy == "uniform" else None
            cache = None
            done = tuple(m.layer for m in inflight)
            commits.append((b, done))
            for ev in {id(e): e for e in inflight_ev}.values():
                ev["commits"].append([b, [m.layer for m, e in zip(inflight, inflight_ev, strict=True) if e is ev]])
            inflight, inflight_ev = [], []
        # 2. consume the statistics launched at b - 2
        tag = b - 2
        if tag >= 0:
            if announced is not None and announced[0] <= tag:
                res = announced[1]
                announced = None
                migs = [plan_migration(cur.phy2log[li], res.rows[j], R, cur.ranks_per_node, layer=li)
                        for j, li in enumerate(res.layers) if res.changed[j]]
                trig.mark_planned(res.layers, res.planned_loads)
                ev = {"plan_id": res.plan_id, "step": b, "stats_step": tag, "decided_step": decided[0],
                      "decided_stats_step": decided[1], "layers": [int(x) for x in res.layers],
                      "migrating": [int(m.layer) for m in migs], "transfers": int(sum(m.num_transfers for m in migs)),
                      "bytes": int(sum(m.num_transfers for m in migs) * cm.expert_bytes), "ms": 0.0, "commits": []}
                events.append(ev)
                for m in migs:
                    ev_of_layer[m.layer] = ev
                queue.extend(migs)
                plan_layers = ()
            layers = trig.observe(stats_step(tag), stats(tag), float(clock[tag]), placement=cur, busy=busy_layers())
            deferred |= set(layers)
            if deferred and worker_result is None and announced is None and not plan_layers:
                sel = sorted(deferred - busy_layers())
                deferred = set()
                if sel:
                    plan_id += 1
                    assert trig.window is not None
                    window = trig.window.array(sel) if len(trig.window) else np.zeros((1, len(sel), E), np.int64)
                    req = PlanRequest(plan_id, tuple(sel), window, cur.select_layers(sel), config.policy,
                                      dict(config.policy_options), (), config.min_balancedness_gain)
                    worker_result = compute_plan(req)
                    plan_layers = tuple(sel)
                    decided = (b, tag)
        # 3. statistics launch: a finished plan is announced with this boundary's tag
        if worker_result is not None and announced is None:
            announced, worker_result = (b, worker_result), None
        # 4. launch the next queued layers' transfers (they run during forward step b)
        if queue and n_per > 0:
            while queue and len(inflight) < n_per:
                m = queue.popleft()
                inflight.append(m)
                inflight_ev.append(ev_of_layer[m.layer])
            _, nbytes, ms = _migration_step_cost(inflight, R, cm)
            mig_bytes[b], mig_ms[b], updates[b] = nbytes, ms, len(inflight)
            for ev in {id(e): e for e in inflight_ev}.values():
                own = [m for m, e in zip(inflight, inflight_ev, strict=True) if e is ev]
                ev["ms"] += _migration_step_cost(own, R, cm)[2]
        # forward step b under the current placement
        if cache is None or not (cache[0] <= b < cache[0] + len(cache[1].compute_ms)):
            quiet = not (queue or inflight or worker_result is not None or announced is not None or deferred)
            stop = min(T, b + (chunk if quiet else 1))
            cache = (b, evaluate_block(data.counts[b:stop], cur, cm, strategy, share))
        i = b - cache[0]
        blk = cache[1]
        comp[b], comm[b], tok[b] = blk.compute_ms[i], blk.comm_ms[i], blk.tokens[i]
        imb[b] = blk.imbalance[i]
        layer_sum += blk.layer_ms[i]
        step_ms[b] = comp[b] + comm[b] + cm.other_ms_per_layer * L + cm.migration_exposed * mig_ms[b]
        clock[b + 1] = clock[b] + step_ms[b] / 1e3
        if progress is not None and (b + 1 == T or (b + 1) % 256 == 0):
            progress(b + 1)
    policy = str(config.policy)
    info = {"online": config.to_dict(), "commits": [[c[0], list(c[1])] for c in commits],
            "pending_at_end": {"queued": [m.layer for m in queue], "in_flight": [m.layer for m in inflight]},
            **dict(meta or {})}
    return SimResult(
        label=label or f"{policy}+online", policy=policy, mode="online", strategy=strategy, num_ranks=R,
        num_slots=initial.num_slots, num_nodes=initial.num_nodes, step_ids=np.asarray(data.step_ids), step_ms=step_ms,
        compute_ms=comp, comm_ms=comm, migration_ms=mig_ms, bytes_moved=mig_bytes, layer_updates=updates,
        imbalance=imb, layer_ms=layer_sum / T, tokens=tok, events=events, final_placement=cur, meta=info,
    )
