"""Online replay: the online balancer's own pipeline, driven step by step on a trace.

Nothing of the decision logic lives here: every boundary runs the same
:class:`eplb.online.Pipeline` as :class:`eplb.runtime.balancer.OnlineBalancer` -- trigger (cadence,
warm-up, wall-clock interval, cosine threshold, balancedness floor, busy layers), the
migration-aware policy run (:func:`eplb.online.compute_plan`), the weight moves
(:func:`eplb.online.plan_migration`, what the executor sends), batches bounded by
``layers_per_step`` and ``max_staging_bytes``, transfers chunked under
``max_migration_bytes_per_step``, and drains (``drains={boundary: ranks}``, like
``OnlineBalancer.drain`` called before that boundary's ``step()``). This driver supplies what the
runtime's collectives, worker and executor supply there:

* statistics: boundary ``b`` consumes the tag ``b - 2``, i.e. the loads of forward step ``b - 3``
  (tag 0 is empty), as the runtime's two-stage all-reduce does;
* the policy runs inline (the runtime's ``policy_backend="inline"``): a plan submitted at boundary
  ``b`` is announced with ``b``'s statistics, accepted at ``b + 2``, its first layers committed at
  ``b + 3`` (with a thread or process backend it may take longer);
* time is simulated: ``now_s`` is the sum of simulated step times;
* transfers posted at boundary ``b`` run during forward step ``b``: their time (the busiest rank's
  experts sent or received x expert bytes / P2P bandwidth) and bytes are charged to step ``b``, and
  the cost model's ``migration_exposed`` fraction of that time is added to its step time;
* rank loads follow the served slots (:func:`eplb.metrics.served_slots`): drained ranks get no load
  wherever their experts are held elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike
from eplb.errors import InputError
from eplb.metrics import slot_share
from eplb.placement import Placement
from eplb.sim.cost import CostModel
from eplb.sim.engine import (
    SimInput,
    SimResult,
    as_sim_input,
    check_fits,
    evaluate_block,
    step_chunk,
)
from eplb.stats.trace import Trace
from eplb.strategies import check_strategy

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
                raise InputError(f"online: expected key=value pairs separated by commas, got {part.strip()!r}")
            k, v = part.split("=", 1)
            if not k.strip():
                raise InputError(f"online: empty key in {part.strip()!r}")
            raw[k.strip()] = _value(v)
    return {ONLINE_KEYS.get(str(k).strip().lower().replace("-", "_"), str(k)): v for k, v in raw.items()}


def parse_online_spec(spec: str | Mapping[str, Any] | None, **defaults: Any) -> Any:
    """A :class:`~eplb.online.BalancerConfig` from ``"interval=60,threshold=0.9,layer_updates_per_iter=2"``.

    Keys: see :func:`online_items`. ``defaults`` are applied first (e.g. ``num_slots``, ``policy``).
    ``interval`` is in (simulated) seconds.
    """
    from eplb.online import BalancerConfig

    return BalancerConfig.from_dict({**defaults, **online_items(spec)}, source="online")


def _transfer_cost(transfers: Sequence[Any], num_ranks: int, cost: CostModel) -> tuple[int, int, float]:
    """(transfers, bytes, ms) of transfers that run together in one step."""
    send = np.zeros(num_ranks, dtype=np.int64)
    recv = np.zeros(num_ranks, dtype=np.int64)
    for t in transfers:
        send[t.src] += 1
        recv[t.dst] += 1
    n = len(transfers)
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
    drains: Mapping[int, Sequence[int]] | None = None,
    label: str | None = None,
    progress: Callable[[int], None] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> SimResult:
    """Replay ``trace`` starting from ``initial`` under the online balancer configured by ``config``.

    Args:
        trace: ``[T, L, E]`` counts (forward step ``t`` routes ``counts[t]``).
        initial: starting placement (its ranks/nodes are the layout).
        config: a :class:`~eplb.online.BalancerConfig`; the policy runs inline whatever
            ``policy_backend`` says; ``dispatch_strategy`` unset means ``strategy`` (as the runtime
            takes its layers' strategy).
        planned_loads: ``[L, E]`` loads ``initial`` was planned for, recorded in the trigger before the
            first step. Default ``None``: like a served balancer, which starts with no record, so the
            first check re-plans every layer with traffic.
        drains: ``{boundary: [ranks]}``: ranks asked to drain before that boundary.
        strategy: replica-choice strategy for rank loads.

    Returns:
        A :class:`SimResult` (mode ``"online"``): ``events`` are the pipeline's ``history`` (one entry per
        accepted plan: ``plan_id``, ``step``, ``stats_step``, ``decided_step``, ``decided_stats_step``,
        ``layers``, ``migrating``, ``transfers``, ``bytes``, ...) plus ``ms`` (migration time) and
        ``commits`` (``[boundary, [layers]]`` pairs); ``meta["commits"]`` lists every commit like the
        balancer's ``commits``. Boundaries and tags are step positions ``0..T-1`` in the replayed trace.
    """
    from eplb.online import BalancerConfig, Pipeline, compute_plan
    from eplb.policies.exclude import survivors
    from eplb.sim.cost import default_cost_model

    if not isinstance(config, BalancerConfig):
        raise InputError(f"config: expected a BalancerConfig, got {type(config).__name__}")
    check_strategy(strategy)
    data = as_sim_input(trace)
    check_fits(initial, data, "initial placement")
    cm = cost or default_cost_model()
    T, L, E = data.num_steps, data.num_layers, data.num_experts
    R = initial.num_ranks
    drain_at: dict[int, set[int]] = {}
    for step, ranks in (drains or {}).items():
        drain_at.setdefault(int(step), set()).update(int(r) for r in ranks)
    if drain_at:
        survivors(set().union(*drain_at.values()), E, initial.slots_per_rank, R, what="drains")
    if config.dispatch_strategy is None:
        config = config.replace(dispatch_strategy=strategy)
    pipe = Pipeline(config, initial, bytes_per_expert=cm.expert_bytes)
    if planned_loads is not None:
        pl0 = np.asarray(planned_loads, dtype=np.float64)
        if pl0.shape != (L, E):
            raise InputError(f"planned_loads: expected shape {(L, E)}, got {pl0.shape}")
        pipe.trigger._ensure(E)  # the record needs the window's shape; no load is observed
        pipe.trigger.mark_planned(range(L), pl0)
    chunk = step_chunk(L, max(E, initial.num_slots))

    comp, comm, tok = np.zeros(T), np.zeros(T), np.zeros(T)
    step_ms = np.zeros(T)
    mig_ms = np.zeros(T)
    mig_bytes = np.zeros(T, dtype=np.int64)
    updates = np.zeros(T, dtype=np.int64)
    imb = np.zeros((T, L))
    layer_sum = np.zeros(L)
    clock = np.zeros(T + 1)  # simulated seconds at each boundary
    ev_of_layer: dict[int, dict[str, Any]] = {}
    share = slot_share(initial) if strategy == "uniform" else None
    cache: tuple[int, Any] | None = None  # (first step, block) under the current placement
    finished: Any = None  # a policy result computed at this boundary, announced with its statistics

    def stats(tag: int) -> np.ndarray:
        return data.counts[tag - 1] if tag >= 1 else np.zeros((L, E), dtype=np.int64)

    for b in range(T):
        pipe.start(b)
        # 1. commit what went out completely by b - 1
        batch = pipe.commit()
        changed = batch is not None
        if batch is not None:
            by_ev: dict[int, tuple[dict[str, Any], list[int]]] = {}
            for layer in batch.layers:
                ev = ev_of_layer[layer]
                by_ev.setdefault(id(ev), (ev, []))[1].append(layer)
            for ev, layers in by_ev.values():
                ev["commits"].append([b, layers])
        # 2. consume the statistics launched at b - 2
        tag = b - 2
        if tag >= 0:
            n_hist, n_ex = len(pipe.history), len(pipe.excluded_ranks)
            req = pipe.consume(tag, stats(tag), float(clock[tag]), drains=drain_at.get(tag, ()))
            changed |= len(pipe.excluded_ranks) != n_ex
            if len(pipe.history) > n_hist:
                ev = pipe.history[-1]
                ev["ms"], ev["commits"] = 0.0, []
                for layer in ev["migrating"]:
                    ev_of_layer[layer] = ev
            if req is not None:
                finished = compute_plan(req)
        # 3. a finished plan is announced with this boundary's statistics
        if finished is not None:
            pipe.plan_finished(finished)
            finished = None
        # 4. the transfers posted now run during forward step b
        post = pipe.launch()
        if post is not None:
            _, mig_bytes[b], mig_ms[b] = _transfer_cost(post.transfers, R, cm)
            if not post.batch.pending:
                updates[b] = len(post.batch.layers)
            own: dict[int, tuple[dict[str, Any], list[Any]]] = {}
            layer_of = {id(t): m.layer for m in post.batch.migrations for t in m.transfers}
            for t in post.transfers:
                ev = ev_of_layer[layer_of[id(t)]]
                own.setdefault(id(ev), (ev, []))[1].append(t)
            for ev, ts in own.values():
                ev["ms"] += _transfer_cost(ts, R, cm)[2]
        if changed:
            share = slot_share(pipe.placement) if strategy == "uniform" else None
            cache = None
        # forward step b under the current placement
        if cache is None or not (cache[0] <= b < cache[0] + len(cache[1].compute_ms)):
            stop = min(T, b + (1 if pipe.active else chunk))
            cache = (b, evaluate_block(data.counts[b:stop], pipe.placement, cm, strategy, share))
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
    info = {"online": config.to_dict(), "commits": [[c[0], list(c[1])] for c in pipe.commits],
            "pending_at_end": {"queued": [m.layer for m in pipe.queue],
                               "in_flight": list(pipe.inflight.layers) if pipe.inflight is not None else []},
            "excluded_ranks": sorted(pipe.excluded_ranks), **dict(meta or {})}
    return SimResult(
        label=label or f"{policy}+online", policy=policy, mode="online", strategy=strategy, num_ranks=R,
        num_slots=initial.num_slots, num_nodes=initial.num_nodes, step_ids=np.asarray(data.step_ids), step_ms=step_ms,
        compute_ms=comp, comm_ms=comm, migration_ms=mig_ms, bytes_moved=mig_bytes, layer_updates=updates,
        imbalance=imb, layer_ms=layer_sum / T, tokens=tok, events=pipe.history, final_placement=pipe.placement,
        meta=info,
    )
