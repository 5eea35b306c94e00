"""Engine-independent core of the engine integrations: plan with eplb, migration-aware.

Engines (vLLM, SGLang) hand a policy the expert loads, the slot layout and -- for vLLM -- the
map they serve now (``old [L, S_old]``, ``-1`` in slots that hold no expert, e.g. the slots of
ranks that elastic EP just added). :func:`plan_for_engine` turns that into a new ``phy2log
[L, S]`` that

1. comes from an eplb policy (:func:`eplb.plan`, default ``"eplb"``; ``"deepseek"`` when that is
   not registered), handed the current placement (``current=``) when the policy is incremental;
2. keeps every expert on the rank it is on when the balance allows it: the new plan's ranks are
   relabelled (a linear assignment per layer, nodes first, then ranks within each node) to
   maximise the replicas that stay on their rank -- ranks of one node are interchangeable for
   the load, so this never changes the balance;
3. keeps an expert that stays on a rank in its old slot (no local copy either);
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
from scipy.optimize import linear_sum_assignment

from eplb._checks import ArrayLike, check_load, check_positive_int, to_numpy
from eplb.metrics import rank_loads
from eplb.placement import Placement
from eplb.policies import POLICIES, plan

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
    return "eplb" if "eplb" in POLICIES else "deepseek"


def old_rank_counts(old: np.ndarray, layout: Layout) -> np.ndarray | None:
    """``[L, R, E]`` replicas of each expert on each (new) rank in the engine's current map.

    ``old`` is ``[L, S_old]`` with ``-1`` for empty slots. Slot ``s`` is on rank ``s // spr``
    (slots per rank do not change when elastic EP adds or removes ranks); slots of ranks beyond
    the new rank count are ignored. ``None`` when ``old`` cannot be related to the new layout.
    """
    L, E, R, spr = layout.num_layers, layout.num_experts, layout.num_ranks, layout.slots_per_rank
    if old.ndim != 2 or old.shape[0] != L or old.shape[1] % spr:
        return None
    width = min(old.shape[1], layout.num_slots)
    sub = old[:, :width]
    valid = (sub >= 0) & (sub < E)
    out = np.zeros((L, R, E), dtype=np.int64)
    li, si = np.nonzero(valid)
    np.add.at(out, (li, si // spr, sub[li, si]), 1)
    return out


def _counts_per_rank(phy2log: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """``[L, R, E]`` replicas of each expert on each rank."""
    L, S = phy2log.shape
    spr = S // num_ranks
    out = np.zeros((L, num_ranks, num_experts), dtype=np.int64)
    li = np.repeat(np.arange(L), S)
    np.add.at(out, (li, np.tile(np.arange(S) // spr, L), phy2log.ravel()), 1)
    return out


def _assign(overlap: np.ndarray) -> np.ndarray:
    """Bin -> target permutation maximising ``overlap [B, B]``, preferring the identity on ties."""
    n = overlap.shape[0]
    score = overlap.astype(np.float64) * (2 * n) + np.eye(n)  # diagonal bonus < one unit of overlap
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(n, dtype=np.int64)
    perm[rows] = cols
    return perm


def align_ranks(new: np.ndarray, have: np.ndarray, num_ranks: int, num_nodes: int) -> np.ndarray:
    """Relabel the ranks (and nodes) of ``new [L, S]`` to keep as many replicas on their rank as possible.

    ``have [L, R, E]`` is what each rank holds now (:func:`old_rank_counts`). Nodes are matched
    first (by the replicas a node keeps), then the ranks inside each node; a rank's slot block
    moves as a whole, so every rank's (and node's) load is unchanged. One linear assignment per
    layer (scipy), ``O(R^3)`` each.
    """
    L, S = new.shape
    E = have.shape[2]
    R, N = num_ranks, num_nodes
    spr, rpn = S // R, R // N
    newcnt = _counts_per_rank(new, R, E)  # [L, R, E]
    out = np.empty_like(new)
    blocks = new.reshape(L, R, spr)
    for layer in range(L):  # one assignment problem per layer; no batched LSA exists
        nc, hc = newcnt[layer], have[layer]
        if N > 1:
            ncn = nc.reshape(N, rpn, E).sum(1)
            hcn = hc.reshape(N, rpn, E).sum(1)
            node_perm = _assign(np.minimum(ncn[:, None, :], hcn[None, :, :]).sum(-1))
        else:
            node_perm = np.zeros(1, dtype=np.int64)
        rank_perm = np.empty(R, dtype=np.int64)
        for n in range(N):
            src = np.arange(n * rpn, (n + 1) * rpn)
            dst = np.arange(node_perm[n] * rpn, (node_perm[n] + 1) * rpn)
            ov = np.minimum(nc[src][:, None, :], hc[dst][None, :, :]).sum(-1)
            rank_perm[src] = dst[_assign(ov)]
        row = np.empty((R, spr), dtype=new.dtype)
        row[rank_perm] = blocks[layer]
        out[layer] = row.reshape(S)
    return out


def _occurrence(x: np.ndarray) -> np.ndarray:
    """For each row of ``x [X, n]``: ``k`` if ``x[i, j]`` is the ``k``-th occurrence of its value in the row."""
    X, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    sx = np.take_along_axis(x, order, axis=1)
    idx = np.broadcast_to(np.arange(n), (X, n))
    new_run = np.ones((X, n), dtype=bool)
    new_run[:, 1:] = sx[:, 1:] != sx[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0), axis=1)
    occ_sorted = idx - run_start
    occ = np.empty_like(occ_sorted)
    np.put_along_axis(occ, order, occ_sorted, axis=1)
    return occ


def preserve_slots(new: np.ndarray, old: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """Permute slots within each rank of ``new [L, S]`` so experts that stay on a rank keep their old slot.

    ``old [L, S]`` may hold ``-1`` (empty slots). Per rank, the ``k``-th copy of expert ``e`` in
    the old slots keeps its slot when the new rank still holds ``> k`` copies of ``e``; the other
    new experts fill the remaining slots in their order. Each rank keeps exactly its new multiset
    of experts. Vectorised over layers and ranks.
    """
    L, S = new.shape
    spr = S // num_ranks
    X = L * num_ranks
    nl = new.reshape(X, spr)
    ol = old.reshape(X, spr)
    E1 = num_experts + 1  # column E counts the empty slots (-1), which never match
    ol_key = np.where((ol >= 0) & (ol < num_experts), ol, num_experts)
    rows = np.arange(X)[:, None]
    ncnt = np.zeros((X, E1), dtype=np.int64)
    np.add.at(ncnt, (np.broadcast_to(rows, nl.shape), nl), 1)
    ocnt = np.zeros((X, E1), dtype=np.int64)
    np.add.at(ocnt, (np.broadcast_to(rows, ol_key.shape), ol_key), 1)
    ncnt[:, num_experts] = 0
    ocnt[:, num_experts] = 0
    keep = _occurrence(ol_key) < ncnt[rows, ol_key]  # [X, spr] old slots kept as they are
    matched = _occurrence(nl) < ocnt[rows, nl]  # [X, spr] new items placed by a kept slot
    free_pos = np.argsort(keep, axis=1, kind="stable")  # not-kept positions first, ascending
    free_items = np.argsort(matched, axis=1, kind="stable")  # unmatched items first, in order
    m = (~keep).sum(1)  # == (~matched).sum(1)
    out = np.where(keep, ol, -1)
    take = np.arange(spr)[None, :] < m[:, None]
    rr = np.broadcast_to(rows, (X, spr))[take]
    out[rr, free_pos[take]] = nl[rr, free_items[take]]
    return out.reshape(L, S)


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
    """
    arr = check_load(loads, name, ndim=(2, 3))
    layout = normalize_layout(arr, num_slots, num_groups, num_nodes, num_ranks)
    policy = resolve_planner(planner)
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
    new = _plan(arr, layout, policy, options)
    if old_arr is None:
        return new
    have = old_rank_counts(old_arr, layout)
    if have is not None:
        new = align_ranks(new, have, layout.num_ranks, layout.num_nodes)
        width = min(old_arr.shape[1], layout.num_slots)
        old_full = np.full_like(new, -1)
        old_full[:, :width] = old_arr[:, :width]
        new = preserve_slots(new, old_full, layout.num_ranks, layout.num_experts)
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
