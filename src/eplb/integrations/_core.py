"""Engine-independent core of the engine integrations: plan with eplb, migration-aware.

Engines (vLLM, SGLang) hand a policy the expert loads, the slot layout and -- for vLLM -- the
map they serve now (``old [L, S_old]``, ``-1`` in slots that hold no expert, e.g. the slots of
ranks that elastic EP just added). :func:`plan_for_engine` turns that into a new ``phy2log
[L, S]`` that

1. comes from an eplb policy (:func:`eplb.plan`, default ``"eplb"``; ``"deepseek"`` when that is
   not registered), handed the current placement (``current=``) when the policy is incremental;
2. keeps every expert on the rank it is on when the balance allows it: the new plan's ranks are
   relabelled (an exact two-level linear assignment per layer: ranks within nodes, nodes as a
   whole) to maximise the experts, then the replicas, that stay on their rank -- ranks of one
   node are interchangeable for the load, so this never changes the balance;
3. keeps an expert that stays on a rank in its old slot (no local copy either).

Steps 2 and 3 are :func:`eplb.policies.keep.align_to_current`, shared with the online manager
(``align_ranks`` and ``preserve_slots`` are re-exported from there).
4. keeps the old row of a layer whose old placement is already as good as the new one or as a
   fresh plan (max rank load within ``min_gain``), so with unchanged loads nothing moves.

All arrays are numpy; shapes: ``L`` layers, ``E`` experts, ``S`` slots, ``R`` ranks,
``spr = S // R`` slots per rank. Loads are tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_load, check_positive_int, to_numpy
from eplb.metrics import rank_loads
from eplb.placement import Placement
from eplb.policies import DEFAULT_POLICY, POLICIES, plan
from eplb.policies.keep import align_ranks, align_to_current, preserve_slots, rank_counts

#: ``[L, R, E]`` replicas per rank of a ``[L, S]`` map (kept name; the implementation is shared).
_counts_per_rank = rank_counts

__all__ = [
    "EngineLayoutError",
    "Layout",
    "align_ranks",
    "normalize_layout",
    "old_rank_counts",
    "plan_for_engine",
    "preserve_slots",
    "resolve_planner",
]

log = logging.getLogger("eplb.integrations")

#: Planners that accept the ``current=`` option (incremental: move few experts).
INCREMENTAL_OPTION = "current"

#: Hierarchical planners and the global planner used instead when the layout has no expert groups
#: divisible by the node count -- what vLLM's default policy and DeepSeek's ``rebalance_experts`` do.
GLOBAL_FALLBACK = {"deepseek-hierarchical": "deepseek-global", "eplb-hierarchical": "eplb"}


class EngineLayoutError(ValueError, AssertionError):
    """An engine passed an impossible layout (e.g. ``num_replicas`` not a multiple of ``num_ranks``).

    A ``ValueError`` like every eplb input error, and also an ``AssertionError`` because that is
    what vLLM's and SGLang's own policies raise for these inputs (their tests expect it).
    """


@dataclass(frozen=True)
class Layout:
    """The effective layout after applying the engines' fallbacks (see :func:`normalize_layout`)."""

    num_layers: int
    num_experts: int
    num_slots: int
    num_ranks: int
    num_nodes: int
    num_groups: int

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks


def normalize_layout(loads: np.ndarray, num_slots: Any, num_groups: Any, num_nodes: Any, num_ranks: Any) -> Layout:
    """Validate the engine's layout arguments and apply the engines' lenient fallbacks.

    * ``num_slots`` must be ``>= E`` and a multiple of ``num_ranks`` (else :class:`EngineLayoutError`);
    * ``num_nodes`` that does not divide ``num_ranks`` becomes 1 (vLLM does this before calling);
    * ``num_groups`` that is ``None``/``<= 0`` or does not divide ``E`` becomes 1 (global policy),
      as does one not divisible by ``num_nodes`` (DeepSeek's fallback to the global policy).
    """
    L, E = int(loads.shape[-2]), int(loads.shape[-1])
    try:
        S = check_positive_int(int(num_slots), "num_replicas")
        R = check_positive_int(int(num_ranks), "num_ranks")
    except (TypeError, ValueError) as exc:
        raise EngineLayoutError(str(exc)) from None
    if S < E:
        raise EngineLayoutError(f"num_replicas: {S} physical slots cannot serve {E} logical experts (need >= {E})")
    if S % R:
        raise EngineLayoutError(f"num_replicas: {S} slots are not divisible by num_ranks={R}")
    N = int(num_nodes) if num_nodes is not None and int(num_nodes) > 0 else 1
    if R % N:
        N = 1
    G = int(num_groups) if num_groups is not None and int(num_groups) > 0 else 1
    if E % G or G % N:
        G = 1
    return Layout(L, E, S, R, N, G)


def resolve_planner(name: str | None) -> str:
    """The registered eplb policy to use: ``name``, or ``"eplb"`` falling back to ``"deepseek"``."""
    if name:
        if name not in POLICIES:
            raise ValueError(f"policy: unknown eplb policy {name!r}; expected one of {sorted(POLICIES)}")
        return name
    return DEFAULT_POLICY if DEFAULT_POLICY in POLICIES else "deepseek"


def old_rank_counts(old: np.ndarray, layout: Layout) -> np.ndarray | None:
    """``[L, R, E]`` replicas of each expert on each (new) rank in the engine's current map.

    ``old`` is ``[L, S_old]`` with ``-1`` for empty slots. Slot ``s`` is on rank ``s // spr``
    (slots per rank do not change when elastic EP adds or removes ranks); slots of ranks beyond
    the new rank count are ignored. ``None`` when ``old`` cannot be related to the new layout.
    """
    if old.ndim != 2 or old.shape[0] != layout.num_layers or old.shape[1] % layout.slots_per_rank:
        return None
    return rank_counts(old, layout.num_ranks, layout.num_experts, layout.slots_per_rank)


def _valid_current(old: np.ndarray | None, layout: Layout) -> Placement | None:
    """``old`` as a Placement when it is a complete map of the new layout (same slots, every expert served)."""
    if old is None or old.shape != (layout.num_layers, layout.num_slots):
        return None
    if np.any((old < 0) | (old >= layout.num_experts)):
        return None
    try:
        return Placement(old.copy(), layout.num_experts, layout.num_ranks, layout.num_nodes)
    except ValueError:
        return None


def _plan(arr: np.ndarray, layout: Layout, policy: str, options: dict[str, Any]) -> np.ndarray:
    """``eplb.plan`` with the current placement when the policy takes one.

    A policy that is not migration-aware refuses ``current=`` (``"current: ..."`` error): plan
    without it. A policy that needs it (``eplb-incremental``) while the engine has no complete
    current map: plan with the default planner instead.
    """
    def run(name: str, opts: dict[str, Any]) -> np.ndarray:
        return plan(arr, layout.num_slots, layout.num_ranks, num_nodes=layout.num_nodes,
                    num_groups=layout.num_groups, policy=name, **opts).phy2log.copy()

    try:
        return run(policy, options)
    except ValueError as exc:
        if not str(exc).startswith(f"{INCREMENTAL_OPTION}:"):
            raise
        if options:
            log.debug("eplb: policy %r is not migration-aware (%s); planning without the current map", policy, exc)
            return run(policy, {})
        fallback = resolve_planner(None)
        log.debug("eplb: policy %r needs a complete current map (%s); planning with %r", policy, exc, fallback)
        return run(fallback, {})


def deepseek_global(loads: np.ndarray, layout: Layout) -> np.ndarray:
    """DeepSeek's global algorithm (one group, one node) on the summed loads: defined for every valid layout."""
    from eplb.policies.deepseek import rebalance_experts_hierarchical

    w = (loads.sum(0) if loads.ndim == 3 else loads).astype(np.float32)
    phy2log, _, _ = rebalance_experts_hierarchical(w, layout.num_slots, 1, 1, layout.num_ranks)
    return np.asarray(phy2log, dtype=np.int64)


def plan_for_engine(
    loads: ArrayLike,
    num_slots: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int | None = 1,
    old: ArrayLike | None = None,
    planner: str | None = None,
    min_gain: float | None = 0.0,
    name: str = "weight",
    group_limited: bool = True,
) -> np.ndarray:
    """Plan a new ``phy2log [L, S]`` (int64) for an engine; see the module docstring.

    Args:
        loads: ``[L, E]`` token counts per logical expert, or ``[T, L, E]`` per step.
        num_slots: ``S`` physical slots per layer.
        num_ranks: ``R`` EP ranks.
        num_nodes: nodes (falls back to 1 when it does not divide ``R``).
        num_groups: expert groups (falls back to 1 when ``None``, ``<= 0`` or not a divisor of ``E``).
        old: the engine's current map ``[L, S_old]`` (``-1`` = empty slot), or ``None``.
        planner: eplb policy name (default ``"eplb"``, else ``"deepseek"``).
        min_gain: keep a layer's old row when its max rank load is within ``(1 + min_gain)`` of the
            new row's or of a fresh plan's (``None`` disables this; only for a complete old map of
            the same shape).
        name: argument name used in error messages.
        group_limited: with expert groups dividing evenly over several nodes, plan ``"eplb"`` as
            ``"eplb-hierarchical"`` (every group on one node: the node bound of group-limited
            routing, as vLLM's default policy). False: spread groups for the best token balance.
    """
    arr = check_load(loads, name, ndim=(2, 3))
    layout = normalize_layout(arr, num_slots, num_groups, num_nodes, num_ranks)
    policy = resolve_planner(planner)
    if group_limited and policy == "eplb" and layout.num_groups > 1 and layout.num_nodes > 1 \
            and layout.num_groups % layout.num_nodes == 0:
        policy = "eplb-hierarchical"  # keep each expert group on one node, as the engines' default policies do
    if policy in GLOBAL_FALLBACK and layout.num_groups % layout.num_nodes:
        log.info("eplb: %d expert group(s) cannot be split over %d nodes; %r falls back to the global %r (as the "
                 "engine's default policy does)", layout.num_groups, layout.num_nodes, policy, GLOBAL_FALLBACK[policy])
        policy = GLOBAL_FALLBACK[policy]
    old_arr: np.ndarray | None = None
    if old is not None:
        old_arr = to_numpy(old)
        if old_arr.ndim != 2 or old_arr.dtype.kind not in "iu":
            raise ValueError(
                f"old_global_expert_indices: expected an integer [layers, slots] map, got shape "
                f"{tuple(old_arr.shape)} dtype {old_arr.dtype}"
            )
        old_arr = old_arr.astype(np.int64)
        if old_arr.shape[0] != layout.num_layers:
            raise ValueError(
                f"old_global_expert_indices: {old_arr.shape[0]} layers, but {name} has {layout.num_layers}"
            )
    current = _valid_current(old_arr, layout)
    options: dict[str, Any] = {}
    if current is not None and policy not in ("deepseek", "deepseek-global", "deepseek-hierarchical"):
        options[INCREMENTAL_OPTION] = current
    try:
        new = _plan(arr, layout, policy, options)
    except Exception:
        # The engine accepted this layout and the input is valid: never raise (in vLLM's async mode an
        # exception kills the EPLB thread and rebalancing stops silently). Last resort: DeepSeek global.
        log.warning("eplb: planner %r failed on a valid layout (%d experts, %d slots, %d ranks, %d nodes, %d groups); "
                    "using DeepSeek's global algorithm for this rebalance", policy, layout.num_experts,
                    layout.num_slots, layout.num_ranks, layout.num_nodes, layout.num_groups, exc_info=True)
        new = deepseek_global(arr, layout)
    if old_arr is None:
        return new
    if old_arr.shape[1] % layout.slots_per_rank == 0:  # else the old map cannot be related to the new layout
        new = align_to_current(old_arr, new, layout.num_ranks, layout.num_nodes, layout.num_experts)
    if current is not None and min_gain is not None:
        w = arr if arr.ndim == 3 else arr[None]

        def max_load(p2l: np.ndarray) -> np.ndarray:  # [L] per-step max rank load, averaged over steps
            p = Placement(p2l.copy(), layout.num_experts, layout.num_ranks, layout.num_nodes)
            return rank_loads(w, p).max(-1).mean(0)

        old_max = max_load(current.phy2log)
        tol = 1.0 + float(min_gain)
        keep = old_max <= max_load(new) * tol
        if options and not keep.all() and np.any(new != current.phy2log):
            # The current map is also kept where it is as good as a fresh plan: a planner handed the
            # current map may search further than a fresh plan does, but a map as good as a fresh
            # plan is not worth moving weights for (and re-planning unchanged loads moves nothing).
            keep |= old_max <= max_load(_plan(arr, layout, policy, {})) * tol
        new[keep] = current.phy2log[keep]
        if keep.any():
            log.debug("eplb: kept the current map of %d/%d layers (no gain above %.3g)", int(keep.sum()),
                      layout.num_layers, float(min_gain))
    return new
