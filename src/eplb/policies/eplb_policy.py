"""eplb's own placement policies: ``"eplb"`` (default), ``"eplb-hierarchical"``, ``"eplb-incremental"``.

``eplb`` per layer (all layers at once):

1. replica counts by greedy min-max apportionment (:func:`~eplb.policies.packing.replica_counts`,
   optionally capped by ``max_replicas``);
2. LPT packing with equal slots per rank that never puts two replicas of one expert on a rank when
   another rank with room exists (:func:`~eplb.policies.packing.lpt_place`);
3. local search: swaps between the heaviest rank and any other rank while the heaviest rank drops
   (:func:`~eplb.policies.packing.swap_search`), then a duplicate-removal pass that never raises
   the maximum;
4. the same local search started from DeepSeek's own placement (the exact ``"deepseek"`` policy for
   the same groups/nodes); per layer the better of the two is kept (lower max rank load, then fewer
   colocated duplicates). Local search never raises a maximum, so ``eplb`` is never worse than
   ``deepseek`` on the loads it was given.

Options accepted by ``eplb`` (and the other eplb policies where they make sense):

* ``current=<Placement or [L, S] phy2log>``: migration-aware mode (see :mod:`eplb.policies.incremental`);
  ``tolerance`` (default 0.01) is the accepted relative excess over the fresh plan's max load.
* ``max_replicas=<int>``: cap on any expert's replica count (``E * cap >= S`` needed).
* ``excluded_ranks=<iterable of rank ids>``: ranks that get no work (failed / drained). Every expert is
  placed on the surviving ranks; the excluded ranks' slots are filled with spare copies of the
  hottest experts (a :class:`~eplb.Placement` has no empty slot) and the ranks are recorded in
  ``meta["excluded_ranks"]``: :func:`eplb.metrics.slot_loads` and dispatch must send them nothing.
  With ``current=`` the excluded ranks keep their current experts instead (no copy to a leaving rank).
  The survivors are planned as one node (``eplb-hierarchical`` drops the node constraint then).
* ``max_iters=<int>``: local-search iteration cap (default ``4 * S``).
* ``effort="fast" | "default" | "high"``: how long to search (``fast``: LPT + swaps only, ~4x faster;
  ``high``: more replication rounds and iterated-local-search restarts, ~2-3x slower).
* ``window="steps" | "sum"`` (default ``"steps"``), ``max_steps`` (default 16): for a per-step window
  ``[T, L, E]`` with ``T > 1`` (and no ``current`` / ``excluded_ranks``), ``eplb`` minimises the mean per-step
  max rank load instead of the max of the summed loads (:func:`_window_rows`), falling back per layer to
  DeepSeek's placement where that one is better on the window under that per-step metric; ``"sum"`` plans
  the summed loads as above. ``[L, E]`` input (``T == 1``) always plans the sum.
* ``exact="auto" | "on" | "off"`` (default ``"off"``: a time-limited solve depends on the machine's speed, and
  a plan must be reproducible), ``exact_time_limit`` (seconds, default 1.0, shared by all
  layers): when the summed loads are planned (flat, no ``current`` / ``excluded_ranks``), every layer not already
  at :func:`eplb.metrics.lower_bound` whose exact program is small (``auto``: at most
  :data:`eplb.policies.exact.EXACT_MAX_VARS` integer variables and ``E <= 32``, e.g. ``E <= 16, R <= 4,
  S - E <= 2 R``; ``on``:
  any size) is solved by HiGHS (:mod:`eplb.policies.exact`, relative gap 0.5%) and the solution replaces the
  heuristic's where its max is lower (never worse; on a time-out the heuristic stays).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, to_numpy
from eplb._counts import evenly_spaced
from eplb.errors import InputError
from eplb.placement import Placement
from eplb.policies import POLICIES, plan, register_policy
from eplb.policies.deepseek import rebalance_experts_hierarchical, to_float32
from eplb.policies.incremental import incremental_rows
from eplb.policies.packing import (
    colocated_dups,
    dedup_pass,
    lpt_place,
    pack_loads,
    perturb_search,
    phy2log_counts,
    refine,
    replica_counts,
    replica_weights,
    swap_search,
)

__all__ = [
    "best_of",
    "best_placement_for",
    "eplb_rows",
    "excluded_layout",
    "hierarchical_rows",
    "row_quality",
    "rows_in_nodes",
]


# ---------------------------------------------------------------------------------------- helpers
def row_quality(weight: np.ndarray, phy2log: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """``([X] max pack load, [X] colocated duplicates)`` of placements ``phy2log [X, S]`` for ``weight [X, E]``."""
    E = weight.shape[1]
    c = phy2log_counts(phy2log, E)
    mx = pack_loads(replica_weights(weight, c, phy2log), num_packs).max(axis=1)
    dup = colocated_dups(phy2log, num_packs)
    return mx, dup


ROBUST_MAX_ITERS = 64
ROBUST_CAND = 64
ROBUST_MIN_GAIN = 0.0
ROBUST_PARTNER_RANKS = 8
"""Relative per-iteration gain below which the window search of the default policy stops a layer."""

DUP_TOLERANCE = 1e-3
"""Relative max-load excess accepted to avoid a colocated duplicate (a wasted slot) -- never beyond DeepSeek's."""


def _pick(weight: np.ndarray, cands: Sequence[np.ndarray], num_packs: int, allowed: Sequence[np.ndarray | None] = (),
          ref_max: np.ndarray | None = None, dup_tol: float = DUP_TOLERANCE) -> np.ndarray:
    """Per row: among the candidates whose max load is within ``dup_tol`` of the best (and not above
    ``ref_max``, e.g. DeepSeek's), the one with the fewest colocated duplicates, then the lowest max,
    then the first listed."""
    X = weight.shape[0]
    mx, dup = zip(*(row_quality(weight, c, num_packs) for c in cands), strict=True)
    M = np.stack(mx)  # [C, X]
    D = np.stack(dup).astype(np.float64)
    for i, a in enumerate(allowed):
        if a is not None:
            M[i] = np.where(a, M[i], np.inf)
    best = M.min(axis=0)
    lim = best * (1 + dup_tol)
    if ref_max is not None:
        lim = np.minimum(lim, np.maximum(ref_max, best))
    near = M <= lim[None, :] * (1 + 1e-12)
    Dk = np.where(near, D, np.inf)
    order = np.lexsort((np.arange(len(cands))[:, None].repeat(X, 1), M, Dk), axis=0)
    pick = order[0]
    return np.stack(cands)[pick, np.arange(X)]


def _improve(weight: np.ndarray, p2l: np.ndarray, num_packs: int, max_iters: int | None,
             max_replicas: int | None = None, rounds: int = 0, perturb: int = 0,
             partners: int | None = None) -> np.ndarray:
    if rounds > 0:
        p = refine(weight, p2l, num_packs, max_replicas=max_replicas, max_rounds=rounds, max_iters=max_iters)
        if perturb > 0:
            p = perturb_search(weight, p, num_packs, max_replicas=max_replicas, rounds=perturb, max_iters=max_iters)
    else:
        p = swap_search(weight, p2l, num_packs, max_iters=max_iters, partner_packs=partners)
    return dedup_pass(weight, p, num_packs, max_replicas=max_replicas)


def eplb_rows(
    weight: np.ndarray,
    num_slots: int,
    num_packs: int,
    *,
    max_replicas: int | None = None,
    start: np.ndarray | None = None,
    max_iters: int | None = None,
    rounds: int = 16,
    perturb: int = 4,
    partners: int | None = None,
) -> np.ndarray:
    """eplb's plan for independent rows.

    Args:
        weight: ``[X, E]`` non-negative expert loads.
        num_slots: ``S`` slots per row (multiple of ``num_packs``, ``>= E``).
        num_packs: ``P`` ranks.
        max_replicas: optional replica cap.
        start: optional ``[X, S]`` extra starting placement (e.g. DeepSeek's) that is improved by the
            same local search and competes per row.
        max_iters: local-search iteration cap.
        rounds: replication moves per row (:func:`~eplb.policies.packing.refine`; 0 = packing only).
        perturb: rounds of iterated local search (:func:`~eplb.policies.packing.perturb_search`).
        partners: with ``rounds == 0``, swap partners only on this many lightest ranks (default all).

    Returns:
        ``phy2log [X, S]`` int64.
    """
    E = weight.shape[1]
    # more replicas than packs forces a colocated duplicate: cap at P where E * P >= S allows it
    cap = num_packs if E * num_packs >= num_slots else None
    if max_replicas is not None:
        cap = min(cap, max_replicas) if cap is not None else max_replicas
    counts = replica_counts(weight, num_slots, cap)
    ours = _improve(weight, lpt_place(weight, counts, num_packs), num_packs, max_iters, cap, rounds, perturb,
                    partners)
    if start is None:
        return ours
    other = _improve(weight, start, num_packs, max_iters, cap, 0, 0)  # the safety net: swaps only
    allowed: list[np.ndarray | None] = [None, None]
    if max_replicas is not None:
        allowed[1] = np.asarray((phy2log_counts(other, weight.shape[1]) <= max_replicas).all(axis=1))
    return _pick(weight, [ours, other], num_packs, allowed, ref_max=row_quality(weight, start, num_packs)[0])


def _group_nodes(weight: np.ndarray, num_groups: int, num_nodes: int, max_iters: int | None) -> np.ndarray:
    """``[L, G]`` node of each expert group: equal groups per node, balanced node loads (LPT + swaps)."""
    L, E = weight.shape
    gw = weight.reshape(L, num_groups, E // num_groups).sum(-1)
    p = _improve(gw, lpt_place(gw, np.ones_like(gw, dtype=np.int64), num_nodes), num_nodes, max_iters)
    node = np.empty((L, num_groups), dtype=np.int64)
    np.put_along_axis(node, p, np.broadcast_to(np.arange(num_groups) // (num_groups // num_nodes), p.shape), axis=1)
    return node


def rows_in_nodes(weight: np.ndarray, node: np.ndarray, num_slots: int, num_ranks: int, num_nodes: int, *,
                  max_replicas: int | None = None, max_iters: int | None = None, rounds: int = 16,
                  perturb: int = 4) -> np.ndarray:
    """``phy2log [L, S]`` for a given node of every expert group (``node [L, G]``, equal groups per node): each
    node's experts are replicated into its ``S / N`` slots and packed onto its ``R / N`` ranks by :func:`eplb_rows`."""
    L, E = weight.shape
    N, G = num_nodes, node.shape[1]
    gs = E // G
    # experts of node n, in group order: [L, N, E/N]
    gorder = np.argsort(node, axis=1, kind="stable")  # groups sorted by node
    experts = (gorder[:, :, None] * gs + np.arange(gs)).reshape(L, N, E // N)
    w_local = np.take_along_axis(weight, experts.reshape(L, E), axis=1).reshape(L * N, E // N)
    loc = eplb_rows(w_local, num_slots // N, num_ranks // N, max_replicas=max_replicas, max_iters=max_iters,
                    rounds=rounds, perturb=perturb)
    return np.take_along_axis(experts.reshape(L * N, E // N), loc, axis=1).reshape(L, num_slots)


def hierarchical_rows(
    weight: np.ndarray,
    num_slots: int,
    num_ranks: int,
    num_nodes: int,
    num_groups: int,
    *,
    max_replicas: int | None = None,
    max_iters: int | None = None,
    rounds: int = 16,
    perturb: int = 4,
) -> np.ndarray:
    """Node-aware plan: every expert group and all replicas of its experts stay on one node.

    Groups go to nodes (equal group count per node, balanced by LPT + swaps); inside each node the
    node's experts are replicated into its ``S / N`` slots and packed onto its ``R / N`` ranks by
    :func:`eplb_rows`; DeepSeek's hierarchical placement, improved by swaps inside each node,
    competes per layer. Returns ``phy2log [L, S]``.
    """
    L, E = weight.shape
    N, G = num_nodes, num_groups
    if G % N:
        raise InputError(f"num_groups: hierarchical policy needs num_groups ({G}) divisible by num_nodes ({N})")
    node = _group_nodes(weight, G, N, max_iters)  # [L, G]
    ours = rows_in_nodes(weight, node, num_slots, num_ranks, N, max_replicas=max_replicas, max_iters=max_iters,
                         rounds=rounds, perturb=perturb)
    # DeepSeek hierarchical, improved inside each node (global ids, rows = (layer, node))
    ds, _, _ = rebalance_experts_hierarchical(to_float32(weight), num_slots, G, N, num_ranks)
    w_rep = np.repeat(weight, N, axis=0)
    ds_rows = dedup_pass(w_rep, swap_search(w_rep, ds.reshape(L * N, -1), num_ranks // N, max_iters=max_iters),
                         num_ranks // N).reshape(L, num_slots)
    allowed: list[np.ndarray | None] = [None, None]
    if max_replicas is not None:
        allowed[1] = np.asarray((phy2log_counts(ds_rows, E) <= max_replicas).all(axis=1))
    return _pick(weight, [ours, ds_rows], num_ranks, allowed, ref_max=row_quality(weight, ds, num_ranks)[0])


def _deepseek_start(weight: np.ndarray, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int) -> np.ndarray:
    """Exactly what the ``"deepseek"`` policy returns for these loads."""
    w32 = to_float32(weight)
    if num_groups % num_nodes == 0:
        p, _, _ = rebalance_experts_hierarchical(w32, num_slots, num_groups, num_nodes, num_ranks)
    else:
        p, _, _ = rebalance_experts_hierarchical(w32, num_slots, 1, 1, num_ranks)
    return np.asarray(p, dtype=np.int64)


# ----------------------------------------------------------------------------- excluded ranks
def excluded_layout(excluded_ranks: Iterable[int] | None, num_experts: int, num_slots: int, num_ranks: int
                    ) -> tuple[list[int], np.ndarray]:
    """Validate ``excluded_ranks``; return ``(sorted excluded ranks, [R'] surviving ranks)``.

    Raises ValueError when a rank id is out of range or the survivors' slots cannot hold every
    expert (the message says how many slots are missing).
    """
    from eplb.policies.exclude import survivors

    return survivors(excluded_ranks, num_experts, num_slots // num_ranks, num_ranks)


def _embed(sub: np.ndarray, weight: np.ndarray, alive: np.ndarray, num_slots: int, num_ranks: int,
           current: np.ndarray | None = None) -> np.ndarray:
    """Spread survivor rows ``sub [L, R'*spr]`` onto all ranks. Excluded ranks keep what they hold in
    ``current`` (no copy needed) or, without one, get spare copies of the hottest experts."""
    L = sub.shape[0]
    spr = num_slots // num_ranks
    out = np.empty((L, num_ranks, spr), dtype=np.int64)
    out[:, alive] = sub.reshape(L, alive.size, spr)
    dead = np.setdiff1d(np.arange(num_ranks), alive)
    if dead.size and current is not None:
        out[:, dead] = current.reshape(L, num_ranks, spr)[:, dead]
    elif dead.size:
        c = phy2log_counts(sub, weight.shape[1])
        hot = np.argsort(-(weight / c), axis=1, kind="stable")  # hottest per replica first
        k = dead.size * spr
        fill = hot[:, np.arange(k) % hot.shape[1]]
        out[:, dead] = fill.reshape(L, dead.size, spr)
    return out.reshape(L, num_slots)


def _current_rows(current: Any, L: int, E: int, S: int, R: int) -> np.ndarray:
    if isinstance(current, Placement):
        if current.num_experts != E or current.num_layers != L or current.num_slots != S or current.num_ranks != R:
            raise InputError(
                f"current: placement has {current.num_layers} layers x {current.num_experts} experts, {current.num_slots} "
                f"slots on {current.num_ranks} ranks; expected {L} x {E}, {S} slots on {R} ranks"
            )
        return np.array(current.phy2log)
    arr = to_numpy(current)
    if arr.ndim != 2 or arr.shape != (L, S):
        raise InputError(f"current: expected a Placement or a [{L}, {S}] phy2log array, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.int64)
    if np.any((arr < 0) | (arr >= E)):
        raise InputError(f"current: expert ids must be in [0, {E})")
    return arr


def _check_cap(max_replicas: Any, E: int, S: int) -> int | None:
    if max_replicas is None:
        return None
    if isinstance(max_replicas, bool) or not isinstance(max_replicas, (int, np.integer)) or max_replicas < 1:
        raise InputError(f"max_replicas: expected a positive integer, got {max_replicas!r}")
    if E * int(max_replicas) < S:
        raise InputError(
            f"max_replicas: {E} experts x at most {max_replicas} replicas = {E * int(max_replicas)} < {S} slots to fill"
        )
    return int(max_replicas)


#: Options of the eplb policies (``_solve``'s keywords).
EPLB_OPTIONS = ("current", "max_replicas", "excluded_ranks", "tolerance", "max_iters", "effort", "window", "max_steps",
                "exact", "exact_time_limit")

EFFORT = {"fast": (0, 0), "default": (16, 4), "high": (32, 12)}
"""``effort`` option -> (replication rounds, iterated-local-search rounds) of :func:`eplb_rows`."""


def _effort(effort: Any) -> tuple[int, int]:
    if effort not in EFFORT:
        raise InputError(f"effort: expected one of {sorted(EFFORT)}, got {effort!r}")
    return EFFORT[effort]


def _solve(
    loads: np.ndarray,
    *,
    num_slots: int,
    num_ranks: int,
    num_nodes: int,
    num_groups: int,
    mode: str,
    current: Any = None,
    max_replicas: Any = None,
    excluded_ranks: Iterable[int] | None = None,
    tolerance: float = 0.01,
    max_iters: int | None = None,
    effort: str = "default",
    window: str = "steps",
    max_steps: int = 16,
    exact: Any = "off",
    exact_time_limit: float = 1.0,
) -> np.ndarray:
    if window not in ("steps", "sum"):
        raise InputError(f"window: expected 'steps' or 'sum', got {window!r}")
    if loads.shape[0] > 1 and window == "steps" and current is None and not excluded_ranks and mode == "global":
        return _window_rows(loads, num_slots, num_ranks, num_nodes, num_groups, _check_cap(max_replicas, loads.shape[2],
                            num_slots), max_iters, max_steps)
    rounds, perturb = _effort(effort)
    w = loads.sum(axis=0)
    L, E = w.shape
    S, R = num_slots, num_ranks
    cap = _check_cap(max_replicas, E, S)
    ex, alive = excluded_layout(excluded_ranks, E, S, R)
    cur = None if current is None else _current_rows(current, L, E, S, R)
    spr = S // R
    if ex:
        Sa, Ra = alive.size * spr, alive.size
        if cap is not None and E * cap < Sa:
            pass  # fewer slots: cap is easier to meet
        fresh = eplb_rows(w, Sa, Ra, max_replicas=cap, start=None if cap else _deepseek_start(w, Sa, Ra, 1, 1),
                          max_iters=max_iters, rounds=rounds, perturb=perturb)
        if cur is not None:
            cur_sub = cur.reshape(L, R, spr)[:, alive].reshape(L, Sa)
            # experts only found on excluded ranks must be re-placed: incremental handles missing experts
            sub, _ = incremental_rows(w, cur_sub, Ra, fresh, tolerance=tolerance, max_replicas=cap)
        else:
            sub = fresh
        return _embed(sub, w, alive, S, R, cur)
    if mode == "hierarchical":
        fresh = hierarchical_rows(w, S, R, num_nodes, num_groups, max_replicas=cap, max_iters=max_iters,
                                  rounds=rounds, perturb=perturb)
    else:
        fresh = eplb_rows(w, S, R, max_replicas=cap, start=_deepseek_start(w, S, R, num_nodes, num_groups),
                          max_iters=max_iters, rounds=rounds, perturb=perturb)
        if exact not in ("auto", "off", "on", True, False):
            raise InputError(f"exact: expected 'auto', 'on' or 'off', got {exact!r}")
        if exact in ("auto", "on", True):
            from eplb.policies.exact import EXACT_MAX_VARS, exact_rows

            fresh = exact_rows(w, fresh, S, R, max_replicas=cap, time_limit=float(exact_time_limit),
                               max_vars=EXACT_MAX_VARS if exact == "auto" else None, dup_tol=DUP_TOLERANCE)
    if cur is None:
        return fresh
    out, _ = incremental_rows(w, cur, R, fresh, tolerance=tolerance, max_replicas=cap)
    return out


#: Steps of a longer window that :func:`_window_rows` scores its candidates on (the sum uses every step).
CHECK_STEPS = 2048


def _window_rows(loads: np.ndarray, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                 cap: int | None, max_iters: int | None, max_steps: int) -> np.ndarray:
    """Plan for a per-step window ``[T, L, E]`` (``T > 1``): what a serving step waits for is its slowest rank.

    1. the summed loads are planned with ``effort="fast"`` (replica counts, LPT, swaps with partners on the
       ``ROBUST_PARTNER_RANKS`` lightest ranks; the deeper search of the summed maximum buys nothing a step can see);
    2. :func:`eplb.policies.search.robust_rows` lowers ``mean_t max_r`` on at most ``max_steps`` evenly spaced
       steps (``ROBUST_CAND`` = 64 candidate swaps, partners on the ``ROBUST_PARTNER_RANKS`` = 8 ranks lightest on
       the window mean, scored per step each iteration, at most ``min(2 S, 64)`` iterations), kept per layer
       where it is better on the whole window. (Splitting the window into search / validation steps was tried: it
       avoids fitting i.i.d. noise on SYNTHETIC data but loses half of the gain on the real traces. Fewer candidates
       (32, 48) or a gain-based early stop were tried in the speed pass: each raised the held-out per-step
       imbalance on the real traces of bench/placement_heldout.py, so neither is used.)
    3. per layer, among this plan and DeepSeek's (the exact ``"deepseek"`` policy), each also with its colocated
       duplicates removed (:func:`~eplb.policies.packing.dedup_pass`), the one with the fewest duplicates within
       ``DUP_TOLERANCE`` of the lowest mean per-step max rank load on the whole window and never above
       DeepSeek's: so the result is never worse than DeepSeek's on the window under that per-step metric.

    Cost (``Q`` = 8 partner ranks, ``spr = S / R``): ``O(L * (E * 40 + S * R + iters * spr^2 * Q))`` for step 1,
    ``O(iters * L * (R * T' + spr^2 * Q + 64 * T'))`` for step 2 (``T' = min(T, max_steps)``, ``iters <= 64``),
    ``O(min(T, CHECK_STEPS) * L * S)`` for the checks; every step is vectorised across layers.

    A window longer than ``CHECK_STEPS`` (2048) steps is summed in full, but the checks of steps 2-3 ("the whole
    window" above) use ``CHECK_STEPS`` evenly spaced steps of it: the objective is a mean over steps, and a
    10,000-step simulator window would otherwise spend seconds re-scoring candidates.
    """
    from eplb.policies.search import robust_rows, step_max_mean

    T, L, E = loads.shape
    w = loads.sum(axis=0)
    if T > CHECK_STEPS:
        loads = loads[evenly_spaced(T, CHECK_STEPS)]
        T = loads.shape[0]
    ds = _deepseek_start(w, num_slots, num_ranks, num_nodes, num_groups)
    start = eplb_rows(w, num_slots, num_ranks, max_replicas=cap, max_iters=max_iters, rounds=0, perturb=0,
                      partners=ROBUST_PARTNER_RANKS)
    steps = evenly_spaced(T, max_steps)
    iters = min(2 * num_slots, ROBUST_MAX_ITERS) if max_iters is None else int(max_iters)
    found = robust_rows(loads[steps], start, num_ranks, max_iters=iters, cand=ROBUST_CAND, min_gain=ROBUST_MIN_GAIN,
                        partner_ranks=ROBUST_PARTNER_RANKS)
    o_found, o_start = step_max_mean(loads, found, num_ranks), step_max_mean(loads, start, num_ranks)
    keep = o_found < o_start
    out = np.where(keep[:, None], found, start)
    # per layer: the candidate with the fewest colocated duplicates among those within DUP_TOLERANCE of the best
    # mean per-step max (never above DeepSeek's), then the lowest; DeepSeek's own placement is the last resort
    cands = [dedup_pass(w, out, num_ranks, max_replicas=cap), out, dedup_pass(w, ds, num_ranks, max_replicas=cap), ds]
    o_out, o_ds = np.where(keep, o_found, o_start), step_max_mean(loads, ds, num_ranks)

    def rescored(new: np.ndarray, old: np.ndarray, o_old: np.ndarray) -> np.ndarray:  # only the layers that changed
        o, ch = o_old.copy(), np.flatnonzero((new != old).any(axis=1))
        if ch.size:
            o[ch] = step_max_mean(loads[:, ch], new[ch], num_ranks)
        return o

    obj = np.stack([rescored(cands[0], out, o_out), o_out, rescored(cands[2], ds, o_ds), o_ds])  # [C, L]
    if cap is not None:
        for i in (2, 3):
            obj[i] = np.where((phy2log_counts(cands[i], E) <= cap).all(axis=1), obj[i], np.inf)
    dups = np.stack([colocated_dups(c, num_ranks) for c in cands])
    rows = np.flatnonzero((dups > 0).all(axis=0))
    if rows.size:  # every candidate wastes a slot there: add the summed-load plan (its deeper search removes them)
        full = out.copy()
        full[rows] = eplb_rows(w[rows], num_slots, num_ranks, max_replicas=cap, start=None if cap else ds[rows],
                               max_iters=max_iters)
        cands.append(full)
        obj = np.concatenate([obj, step_max_mean(loads, full, num_ranks)[None]])
        dups = np.concatenate([dups, colocated_dups(full, num_ranks)[None]])
    C = len(cands)
    best = obj.min(axis=0)
    lim = np.minimum(best * (1 + DUP_TOLERANCE), obj[3])
    near = obj <= np.maximum(lim, best)[None] * (1 + 1e-12)
    order = np.lexsort((np.arange(C)[:, None].repeat(L, 1), obj, np.where(near, dups, np.inf)), axis=0)
    return np.stack(cands)[order[0], np.arange(L)]


# ---------------------------------------------------------------------------------- registered
@register_policy("eplb", options=EPLB_OPTIONS)
def eplb_policy(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                **options: Any) -> np.ndarray:
    """eplb's default policy (module docstring); ``current=`` switches to migration-aware mode."""
    return _solve(loads, num_slots=num_slots, num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                  mode="global", **options)


@register_policy("eplb-hierarchical", options=EPLB_OPTIONS)
def eplb_hierarchical_policy(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                             **options: Any) -> np.ndarray:
    """Node-aware eplb: expert groups and their replicas stay on one node (:func:`hierarchical_rows`)."""
    return _solve(loads, num_slots=num_slots, num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                  mode="hierarchical", **options)


@register_policy("eplb-incremental", options=EPLB_OPTIONS)
def eplb_incremental_policy(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                            **options: Any) -> np.ndarray:
    """Migration-aware eplb; requires ``current=`` (the placement now in service)."""
    if options.get("current") is None:
        raise InputError("current: policy 'eplb-incremental' needs current=<Placement now in service>")
    return _solve(loads, num_slots=num_slots, num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                  mode="global", **options)


# ---------------------------------------------------------------------------------- for others
def best_of(loads: ArrayLike, placements: Sequence[Placement], *, meta: Mapping[str, Any] | None = None) -> Placement:
    """Per layer, the placement (of ``placements``) with the lowest max rank load on ``loads`` (``[L, E]``
    or ``[T, L, E]``, summed over steps); ties go to fewer colocated duplicates, then the earlier one."""
    if not placements:
        raise InputError("placements: need at least one placement")
    w = to_numpy(loads).astype(np.float64)
    if w.ndim == 3:
        w = w.sum(0)
    first = placements[0]
    for p in placements[1:]:
        if p.phy2log.shape != first.phy2log.shape or p.num_ranks != first.num_ranks:
            raise InputError("placements: all placements must have the same layers, slots and ranks")
    best = _pick(w, [np.asarray(p.phy2log) for p in placements], first.num_ranks)
    info = {"policy": "best-of", "candidates": [str(p.meta.get("policy", "?")) for p in placements]}
    info.update(meta or {})
    return Placement(best, first.num_experts, first.num_ranks, first.num_nodes, first.layer_ids, info)


def best_placement_for(
    loads: ArrayLike,
    num_slots: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    policies: Sequence[str] = ("eplb", "deepseek"),
    layer_ids: Sequence[int] = (),
    **options: Any,
) -> Placement:
    """Plan with every policy in ``policies`` (same options) and keep, per layer, the best one.

    ``loads`` is ``[L, E]`` or ``[T, L, E]``; quality is the max rank load of the summed loads.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InputError(f"policies: unknown policies {unknown}; expected names in {sorted(POLICIES)}")
    pls = [plan(loads, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, policy=p,
                layer_ids=layer_ids, **options) for p in policies]
    return best_of(loads, pls)
