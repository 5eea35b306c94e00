"""Online replay: the runtime Manager's rebalance decisions, replayed step by step on a trace.

The decision logic is NOT re-implemented here: every step's loads go to the runtime's own
:class:`eplb.runtime.manager.RebalanceTrigger` (cadence, warm-up, wall-clock interval, cosine
threshold, balancedness floor), new placements come from :func:`eplb.runtime.manager.compute_plan`
(the migration-aware policy run, with ``keep_in_place`` and the ``min_balancedness_gain`` rule),
and the weights to move come from :func:`eplb.runtime.manager.plan_migration` (what the
Executor sends). The simulator adds only the clock and the schedule:

* simulated time: ``now_s`` passed to the trigger is the sum of the simulated step times so far
  (so ``eplb_update_interval`` is in simulated seconds);
* the policy runs synchronously at the check (the runtime runs it in the background; in the
  simulator it finishes before the next step, an optimistic bound on its latency);
* changed layers are committed at step boundaries, ``layer_updates_per_iter`` per step, in
  ascending layer order, starting with the next step; while queued they are ``busy`` (the trigger
  leaves them out);
* a committed layer's transfers cost ``max over ranks of (experts sent or received) x expert
  bytes / P2P bandwidth`` (summed per rank over the layers committed in the same step); that
  migration time is reported per step and its exposed fraction (``migration_exposed`` of the cost
  model) is added to that step's time.
"""

from __future__ import annotations

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
    """(transfers, bytes, ms) of the layer migrations committed in one step."""
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
    """Replay ``trace`` starting from ``initial`` with the online balancer configured by ``config``.

    Args:
        trace: ``[T, L, E]`` counts.
        initial: starting placement (its ranks/nodes are the layout).
        config: a :class:`~eplb.runtime.manager.BalancerConfig` (``policy``, cadence, thresholds,
            ``layer_updates_per_iter``; ``policy_backend`` is ignored: the policy runs inline).
        planned_loads: ``[L, E]`` loads ``initial`` was planned for (default: unknown, i.e. zeros,
            so the first check rebalances every layer with traffic).
        strategy: replica-choice strategy for rank loads.

    Returns:
        A :class:`SimResult` (mode ``"online"``) with one event per policy run that changed layers.
    """
    from eplb.runtime.manager import (
        BalancerConfig,
        PlanRequest,
        RebalanceTrigger,
        compute_plan,
        plan_migration,
    )
    from eplb.sim.cost import default_cost_model

    if not isinstance(config, BalancerConfig):
        raise ValueError(f"config: expected a BalancerConfig, got {type(config).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown replica-choice strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    data = as_sim_input(trace)
    check_fits(initial, data, "initial placement")
    cm = cost or default_cost_model()
    T, L, E = data.num_steps, data.num_layers, data.num_experts
    R = initial.num_ranks
    trig = RebalanceTrigger(config, L, E)
    planned = np.zeros((L, E)) if planned_loads is None else np.asarray(planned_loads, dtype=np.float64)
    if planned.shape != (L, E):
        raise ValueError(f"planned_loads: expected shape {(L, E)}, got {planned.shape}")
    planned = planned.copy()
    per_step = max(1, int(config.layer_updates_per_iter))
    chunk = step_chunk(L, max(E, initial.num_slots))

    comp, comm, tok = np.zeros(T), np.zeros(T), np.zeros(T)
    mig_ms = np.zeros(T)
    mig_bytes = np.zeros(T, dtype=np.int64)
    updates = np.zeros(T, dtype=np.int64)
    imb = np.zeros((T, L))
    layer_sum = np.zeros(L)
    events: list[dict[str, Any]] = []
    queue: list[tuple[int, np.ndarray, Any, dict[str, Any]]] = []  # (layer, new row, migration, event)

    cur = initial
    share = expert_rank_share(cur) if strategy == "uniform" else None
    now_s = 0.0
    plan_id = 0
    t = 0
    while t < T:
        # commit queued layers at the boundary before step t
        if queue:
            batch, queue = queue[:per_step], queue[per_step:]
            rows = {li: row for li, row, _, _ in batch}
            cur = cur.with_layers(rows)
            share = expert_rank_share(cur) if strategy == "uniform" else None
            _, b, ms = _migration_step_cost([m for _, _, m, _ in batch], R, cm)
            mig_bytes[t], mig_ms[t], updates[t] = b, ms, len(batch)
            for done_ev in {id(e): e for _, _, _, e in batch}.values():
                own = [m for _, _, m, e in batch if e is done_ev]
                done_ev["ms"] += _migration_step_cost(own, R, cm)[2]
                done_ev["committed_step"] = int(data.step_ids[t])
        # evaluate steps until the next decision (or the end of the chunk)
        stop = min(T, t + (1 if queue else chunk))
        blk = evaluate_block(data.counts[t:stop], cur, cm, strategy, share)
        step_ms = blk.compute_ms + blk.comm_ms + cm.other_ms_per_layer * L
        end = stop
        for i in range(stop - t):
            s = t + i
            now_s += (step_ms[i] + cm.migration_exposed * mig_ms[s]) / 1e3
            busy = [li for li, _, _, _ in queue]
            layers = trig.observe(int(data.step_ids[s]), data.counts[s], now_s, planned, placement=cur, busy=busy)
            if layers:
                assert trig.window is not None
                req = PlanRequest(plan_id, tuple(layers), trig.window.array(layers), cur.select_layers(layers),
                                  config.policy, dict(config.policy_options), min_gain=config.min_balancedness_gain)
                plan_id += 1
                res = compute_plan(req)
                planned[list(layers)] = res.planned_loads  # every planned layer was re-planned for this window
                changed = [li for li, ch in zip(layers, res.changed, strict=True) if ch]
                if changed:
                    ev: dict[str, Any] = {"step": int(data.step_ids[s]), "layers": [int(x) for x in changed],
                                          "checked": [int(x) for x in layers], "committed_step": None,
                                          "transfers": 0, "bytes": 0, "ms": 0.0}
                    for j, li in enumerate(layers):
                        if not res.changed[j]:
                            continue
                        mig = plan_migration(cur.phy2log[li], res.rows[j], R, cur.ranks_per_node, layer=li)
                        ev["transfers"] += mig.num_transfers
                        ev["bytes"] += mig.bytes_moved(cm.expert_bytes)
                        queue.append((li, res.rows[j], mig, ev))
                    events.append(ev)
                end = s + 1
                break
        n = end - t
        comp[t:end], comm[t:end], tok[t:end] = blk.compute_ms[:n], blk.comm_ms[:n], blk.tokens[:n]
        imb[t:end] = blk.imbalance[:n]
        layer_sum += blk.layer_ms[:n].sum(axis=0)
        t = end
        if progress is not None:
            progress(t)
    step = comp + comm + cm.other_ms_per_layer * L + cm.migration_exposed * mig_ms
    policy = str(config.policy)
    return SimResult(
        label=label or f"{policy}+online", policy=policy, mode="online", strategy=strategy, num_ranks=R,
        num_slots=initial.num_slots, num_nodes=initial.num_nodes, step_ids=np.asarray(data.step_ids), step_ms=step,
        compute_ms=comp, comm_ms=comm, migration_ms=mig_ms, bytes_moved=mig_bytes, layer_updates=updates,
        imbalance=imb, layer_ms=layer_sum / T, tokens=tok, events=events, final_placement=cur,
        meta={"online": config.to_dict(), **dict(meta or {})},
    )

