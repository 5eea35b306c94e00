"""What to plan: one migration-aware policy run and the resilience plans (drain, recovery).

:func:`compute_plan` is module-level and pure (picklable for a process pool); the runtime runs it
in a :class:`eplb.runtime.worker.PolicyWorker`, the simulator inline.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_load
from eplb.errors import InputError
from eplb.online.migration import plan_migration
from eplb.online.trigger import window_balancedness
from eplb.placement import Placement
from eplb.policies.exclude import serves_all, survivors, unsafe_layers
from eplb.policies.keep import keep_in_place

__all__ = ["PlanRequest", "PlanResult", "compute_plan", "drain_placement", "plan_excluding", "policy_layout",
           "recover_placement"]


def _checksum(layers: Sequence[int], rows: np.ndarray) -> int:
    """A 48-bit digest of a plan (the sum over <= 2**15 ranks still fits int64)."""
    h = hashlib.sha256(np.asarray(layers, dtype=np.int64).tobytes() + np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest()[:6], "little") + 1


@dataclass
class PlanRequest:
    """Input of one policy run: layer positions, their window ``[T, L', E]`` and current rows ``[L', S]``."""

    plan_id: int
    layers: tuple[int, ...]
    window: np.ndarray
    current: Placement  # the selected layers only
    policy: str
    options: dict[str, Any]
    excluded_ranks: tuple[int, ...] = ()
    min_gain: float = 0.0
    delay_s: float = 0.0  # artificial slowness (tests of the non-blocking property)
    strategy: str | None = "uniform"  # dispatch strategy balancedness is judged under


@dataclass
class PlanResult:
    """Output of one policy run (rows of the selected layers; unchanged rows equal the current ones).

    ``planned_loads`` ``[L', E]``: the window sum the plan was made for. ``balancedness_before/after``
    ``[L']`` on the window (mean per-step, under the request's strategy). ``changed`` ``[L']``: layers that will migrate. ``transfers`` ``[L']``:
    cross-rank expert copies per layer. ``checksum``: identical on every rank for identical plans.
    """

    plan_id: int
    layers: tuple[int, ...]
    rows: np.ndarray
    planned_loads: np.ndarray
    balancedness_before: np.ndarray
    balancedness_after: np.ndarray
    changed: np.ndarray
    transfers: np.ndarray
    seconds: float
    checksum: int


def policy_layout(options: Mapping[str, Any] | None, num_experts: int) -> tuple[int, dict[str, Any]]:
    """``(num_groups, the other options)`` of a config's ``policy_options``: the one place the online
    planner reads ``num_groups``; 1 when it does not divide the experts (a flat plan)."""
    opts = dict(options or {})
    try:
        g = max(1, int(opts.pop("num_groups", 1)))
    except (TypeError, ValueError):
        raise InputError(f"policy_options.num_groups: expected a positive integer, got {options!r}") from None
    return (g if num_experts % g == 0 else 1), opts


def plan_excluding(loads: ArrayLike, current: Placement, excluded_ranks: Sequence[int], *, policy: str,
                   options: Mapping[str, Any] | None = None) -> Placement:
    """A placement of ``current``'s shape in which the ranks ``excluded_ranks`` hold no expert that is
    not also served by another rank: the survivors' slots are planned with ``policy`` as a smaller
    cluster (``R - k`` ranks, ``S - k*spr`` slots, one node), the excluded ranks keep their old
    experts (no weights move there) and can leave without losing any expert.

    Raises ValueError saying how many slots are missing when the survivors cannot hold every expert.
    """
    from eplb.policies import plan, policy_info

    R, E, spr = current.num_ranks, current.num_experts, current.slots_per_rank
    ex, alive = survivors(excluded_ranks, E, spr, R)
    keep = alive.tolist()
    S2 = len(keep) * spr
    x = check_load(loads, "loads", ndim=(2, 3), num_experts=E)
    slot_idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
    sub_cur = Placement(current.phy2log[:, slot_idx], E, len(keep), 1, current.layer_ids) \
        if np.all(current.logcnt > 0) and serves_all(current.phy2log[:, slot_idx], E) else None
    num_groups, opts = policy_layout(options, E)
    opts.pop("num_nodes", None)
    if sub_cur is not None and policy_info(policy).migration_aware:
        opts["current"] = sub_cur
    sub = plan(x, S2, len(keep), num_nodes=1, num_groups=num_groups, policy=policy, layer_ids=current.layer_ids,
               **opts)
    sub = keep_in_place(current.phy2log[:, slot_idx], sub)
    rows = current.phy2log.copy()
    rows[:, slot_idx] = sub.phy2log
    return Placement(rows, E, R, current.num_nodes, current.layer_ids,
                     {**sub.meta, "excluded_ranks": ex, "policy": policy})


def drain_placement(current: Placement, rank: int | Sequence[int], loads: ArrayLike, *, policy: str = "eplb",
                    options: Mapping[str, Any] | None = None) -> Placement:
    """The placement after draining ``rank`` (or several): see :func:`plan_excluding`."""
    ranks = [rank] if isinstance(rank, (int, np.integer)) else list(rank)
    return plan_excluding(loads, current, ranks, policy=policy, options=options)


def recover_placement(previous: Placement, lost_ranks: Sequence[int], loads: ArrayLike | None = None, *,
                      policy: str = "eplb", options: Mapping[str, Any] | None = None) -> Placement:
    """The placement for the survivors of a hard rank loss: ``R - k`` ranks, ``S - k*spr`` slots.

    Survivor ``i`` (in old rank order) becomes new rank ``i``; the new layout keeps each survivor's old
    experts where the balance allows (:func:`keep_in_place`), so restarted workers can reuse cached
    weights. ``loads`` ``[L, E]`` or ``[T, L, E]`` (default: the previous placement's ``logcnt``, i.e.
    its replica counts as a load proxy). Raises ValueError with the number of missing slots when the
    survivors cannot hold every expert.
    """
    from eplb.policies import plan

    R, E, spr = previous.num_ranks, previous.num_experts, previous.slots_per_rank
    if len({int(r) for r in lost_ranks}) >= R and all(0 <= int(r) < R for r in lost_ranks):
        raise InputError("lost_ranks: every rank is lost; nothing to recover")
    lost, alive = survivors(lost_ranks, E, spr, R, what="lost_ranks")
    keep = alive.tolist()
    S2 = len(keep) * spr
    x = previous.logcnt.astype(np.float64) if loads is None else check_load(loads, "loads", ndim=(2, 3), num_experts=E)
    rpn = previous.ranks_per_node
    lost_nodes = {r // rpn for r in lost}
    whole = all(all(q in lost for q in range(n * rpn, (n + 1) * rpn)) for n in lost_nodes)
    N2 = previous.num_nodes - len(lost_nodes) if whole and previous.num_nodes > 1 else 1
    num_groups, opts = policy_layout(options, E)
    if num_groups % N2:
        num_groups = max(1, N2) if E % max(1, N2) == 0 else 1
    new = plan(x, S2, len(keep), num_nodes=N2, num_groups=num_groups, policy=policy, layer_ids=previous.layer_ids,
               **opts)
    slot_idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
    out = keep_in_place(previous.phy2log[:, slot_idx], new)
    return out.with_meta(recovered_from=previous.digest(), lost_ranks=lost, policy=policy)


def compute_plan(req: PlanRequest) -> PlanResult:
    """Run the policy for ``req`` (module-level so a process pool can pickle it).

    Migration-aware: the policy gets ``current=`` (incremental policies use it), the result is
    post-processed by :func:`keep_in_place`, and a layer only changes when its balancedness on the
    window (mean of per-step balancedness under ``req.strategy``) improves by more than ``min_gain``
    (or when it must, to drain ``excluded_ranks``).
    """
    from eplb.policies import plan, policy_info

    t0 = time.perf_counter()
    if req.delay_s > 0:
        time.sleep(req.delay_s)
    cur = req.current
    window = np.asarray(req.window, dtype=np.float64)
    wsum = window.sum(0)
    if req.excluded_ranks:
        new = plan_excluding(window, cur, req.excluded_ranks, policy=req.policy, options=req.options)
    else:
        num_groups, opts = policy_layout(req.options, cur.num_experts)
        if policy_info(req.policy).migration_aware:  # the placement in service, to move few experts
            opts["current"] = cur
        new = plan(window, cur.num_slots, cur.num_ranks, num_nodes=cur.num_nodes, num_groups=num_groups,
                   policy=req.policy, layer_ids=cur.layer_ids, **opts)
        new = keep_in_place(cur, new)
    before = window_balancedness(window, cur, req.strategy)
    after = window_balancedness(window, new, req.strategy)
    changed = np.any(new.phy2log != cur.phy2log, axis=1) & (after > before + req.min_gain)
    if req.excluded_ranks:  # layers whose excluded ranks still hold an expert served nowhere else must change
        must = np.zeros(len(cur.phy2log), dtype=bool)
        must[unsafe_layers(cur, req.excluded_ranks)] = True
        changed |= must & np.any(new.phy2log != cur.phy2log, axis=1)
    rows = np.where(changed[:, None], new.phy2log, cur.phy2log)
    transfers = np.array([plan_migration(cur.phy2log[i], rows[i], cur.num_ranks, cur.ranks_per_node).num_transfers
                          for i in range(len(rows))], dtype=np.int64)
    return PlanResult(req.plan_id, tuple(req.layers), rows, wsum, before,
                      np.where(changed, after, before), changed, transfers, time.perf_counter() - t0,
                      _checksum(req.layers, rows))

