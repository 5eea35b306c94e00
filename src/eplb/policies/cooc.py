"""``"eplb-cooc"``: communication-aware placement from co-activated expert pairs.

A token whose chosen experts sit on several nodes crosses nodes several times (all-to-all over RDMA);
experts that are often chosen together should share a node. This policy starts from eplb's balanced plan
and trades a bounded amount of balance for fewer co-activated pairs split across nodes
(:func:`eplb.metrics.cross_pairs`, uniform replica choice):

1. the balanced plan ``P0``: the ``eplb`` policy (``eplb-hierarchical`` when ``num_groups > 1`` divides into
   the nodes: group-limited routing, below), with the same options;
2. a swap local search (:func:`swap_search`): each iteration, per layer (all layers at once), every swap of
   two slots on different nodes (no colocated duplicate created) is scored by the exact drop of the
   cross-node pair weight; the best-scoring swaps that pass the necessary condition on the mean rank loads
   are checked exactly on every step of the window, and the best feasible one is applied. A layer stops
   when no swap among its ``cand`` best is feasible and improving, or after ``max_iters`` iterations.

Balance constraint (never exceeded, per layer). With per-step loads normalised by the step's mean rank
load, ``obj(P) = mean over steps with load of max_r load_t(r) / mean_r load_t(r)`` (``1 +`` the per-step
imbalance of :func:`eplb.metrics.step_imbalance`; for ``[L, E]`` input, the max / mean of the summed
loads). Every accepted swap keeps ``obj(P) - 1 <= (1 + imbalance_tolerance) (obj(P0) - 1)`` or, with
``load_tolerance`` given, ``obj(P) <= (1 + load_tolerance) obj(P0)``. Replica counts are those of ``P0``.
Summed ``[L, E]`` loads leave almost no imbalance to trade: give the per-step window ``[T, L, E]``.

Group-limited routing (``num_groups > 1``, ``num_groups % num_nodes == 0``, as DeepSeek's hierarchical
policy): every expert group and all its replicas stay on one node, so the router's node limit holds. The
search then swaps whole groups between nodes (the group pair weights, node loads per rank as the load
proxy, necessary for the rank constraint), each node's experts are re-placed on its ranks by
:func:`~eplb.policies.eplb_policy.rows_in_nodes`, for the proxy limits ``eps``, ``eps / 2``, ``eps / 4``; per
layer the candidate with the fewest cross-node pairs that meets the exact constraint is kept, else ``P0``.

Options: ``topk_ids=[N, L, k]`` (the tokens' routed ids) or ``cooccurrence=[T, L, E, E] / [L, E, E]`` (one
is required; ``eplb plan`` passes the trace's), ``imbalance_tolerance`` (default 0.05), ``load_tolerance``,
``level="node" | "rank"`` (``"rank"``: fewer ranks per token; the swaps are then between ranks),
``cand`` (default 256), ``max_iters`` (default ``2 S``), and ``max_replicas`` / ``effort`` / ``window`` /
``max_steps`` passed to the balanced plan.

Cost per iteration: ``O(L S^2)`` to score all swaps (one ``[L, S, S]`` array), ``O(L cand T)`` for the exact
checks, ``O(L E U)`` to update; at most ``max_iters`` iterations: ``O(max_iters L (S^2 + cand T))`` in all,
plus the balanced plan. (At DeepSeek-V3 size, ``S`` = 288, that is about 0.1 s per 10 iterations; the
speed budget of issue 21 item 3 is not met for large ``S``.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.errors import InputError
from eplb.metrics import LEVELS, cooccurrence_pairs, pair_counts
from eplb.policies import register_policy
from eplb.policies.eplb_policy import _check_cap, _solve, rows_in_nodes
from eplb.policies.packing import phy2log_counts

__all__ = ["COOC_OPTIONS", "normalised_steps", "step_objective", "swap_search"]

COOC_OPTIONS = ("topk_ids", "cooccurrence", "imbalance_tolerance", "load_tolerance", "level", "cand", "max_iters",
                "max_replicas", "effort", "window", "max_steps")
_BASE_OPTIONS = ("max_replicas", "effort", "window", "max_steps")


def normalised_steps(loads: np.ndarray, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w, sw)``: ``w [T, L, E]`` loads divided by each step's mean rank load (0 for empty steps) and
    ``sw [L, T]`` the step weights (``1 / steps with load`` for those steps, else 0)."""
    tot = loads.sum(-1, keepdims=True) / num_ranks  # [T, L, 1]
    w = np.where(tot > 0, loads / np.where(tot > 0, tot, 1.0), 0.0)
    act = (tot[..., 0] > 0).T.astype(np.float64)  # [L, T]
    return w, act / np.maximum(act.sum(1, keepdims=True), 1.0)


def step_objective(w: np.ndarray, sw: np.ndarray, ent: np.ndarray, cnt: np.ndarray, bins: np.ndarray,
                   num_bins: int) -> np.ndarray:
    """``[L]`` ``sum_t sw[l, t] max_b load_t(b)``: the balance objective of items ``ent [L, M]`` (entity ids, each
    carrying ``w / cnt``) on bins ``bins [M]``."""
    return (_bin_loads(w, ent, cnt, bins, num_bins).max(-1) * sw).sum(-1)


def _bin_loads(w: np.ndarray, ent: np.ndarray, cnt: np.ndarray, bins: np.ndarray, num_bins: int) -> np.ndarray:
    """``[L, T, B]`` load of each bin per step."""
    T, L, _ = w.shape
    per = w / cnt[None]  # [T, L, X] load of one item of each entity
    item = np.take_along_axis(per, np.broadcast_to(ent[None], (T,) + ent.shape), axis=2)  # [T, L, M]
    onehot = bins[:, None] == np.arange(num_bins)[None, :]  # [M, B]
    out = item @ onehot.astype(np.float64)
    return out.transpose(1, 0, 2)


def swap_search(ent: np.ndarray, cnt: np.ndarray, unit: np.ndarray, num_units: int, bins: np.ndarray, num_bins: int,
                pairs: np.ndarray, w: np.ndarray, sw: np.ndarray, limit: np.ndarray, *, max_iters: int,
                cand: int = 32) -> np.ndarray:
    """Swap items between units to lower the co-activated pair weight across units, keeping the balance objective.

    Args:
        ent: ``[L, M]`` entity (expert / group) held by each item position (slot / group position).
        cnt: ``[L, X]`` items per entity (replica counts; unchanged by swaps).
        unit: ``[M]`` unit (node / rank) of each position; ``bins``: ``[M]`` bin (rank) whose load it adds to.
        pairs: ``[L, X, X]`` symmetric pair weights, zero diagonal.
        w, sw: per-step entity loads ``[T, L, X]`` and step weights ``[L, T]`` (:func:`normalised_steps`).
        limit: ``[L]`` bound on :func:`step_objective` every accepted swap keeps.

    The pair weight across units is ``sum_{i<j} pairs_ij (1 - p_i . p_j)`` with ``p_e(u)`` the share of ``e``'s
    items on ``u``. Swapping positions ``a`` (entity ``x``, unit ``u``) and ``b`` (``y``, ``v``) changes the
    shared weight by ``(A[x,v] - A[x,u]) / c_x + (A[y,u] - A[y,v]) / c_y - 2 pairs_xy / (c_x c_y)`` with
    ``A = pairs @ p``: all ``M^2`` swaps are scored at once. Returns the new ``ent``.
    """
    ent = ent.copy()
    L, M = ent.shape
    X = cnt.shape[1]
    T = w.shape[0]
    lidx = np.arange(L)
    tot = 0.5 * pairs.sum(axis=(1, 2))
    pn = pairs / np.where(tot > 0, tot, 1.0)[:, None, None]  # per-layer scale: gains are fractions of all pairs
    share = np.zeros((L, X, num_units))
    np.add.at(share, (np.repeat(lidx, M), ent.ravel(), np.tile(unit, L)), 1.0)
    share /= cnt[:, :, None]
    A = np.einsum("lij,lju->liu", pn, share)  # [L, X, U]
    onb = np.zeros((L, X, num_bins), dtype=np.int64)  # items of each entity per bin
    np.add.at(onb, (np.repeat(lidx, M), ent.ravel(), np.tile(bins, L)), 1)
    rl = _bin_loads(w, ent, cnt, bins, num_bins)  # [L, T, B]
    wmean = (w * sw.T[:, :, None]).sum(0)  # [L, X] step-weighted mean load
    diff_unit = unit[:, None] != unit[None, :]
    upper = np.triu(np.ones((M, M), dtype=bool), 1) & diff_unit
    active = np.ones(L, dtype=bool)
    K = max(1, min(int(cand), M * M))
    for _ in range(max(int(max_iters), 0)):
        if not active.any():
            break
        c_it = np.take_along_axis(cnt, ent, axis=1)  # [L, M]
        own = A[lidx[:, None], ent, unit[None, :]]  # [L, M]: A[x_a, u_a]
        at = A[lidx[:, None, None], ent[:, :, None], unit[None, None, :]]  # [L, M, M]: A[x_a, u_b]
        g1 = (at - own[:, :, None]) / c_it[:, :, None]
        pxy = pn[lidx[:, None, None], ent[:, :, None], ent[:, None, :]]
        gain = g1 + g1.transpose(0, 2, 1) - 2.0 * pxy / (c_it[:, :, None] * c_it[:, None, :])
        # feasibility: another entity, no second item of an entity on one bin
        ok = upper[None] & (ent[:, :, None] != ent[:, None, :])
        ok &= onb[lidx[:, None, None], ent[:, :, None], bins[None, None, :]] == 0
        ok &= onb[lidx[:, None, None], ent[:, None, :], bins[None, :, None]] == 0
        # necessary condition: mean_t max_b >= max_b of the step-weighted mean loads
        mload = (rl * sw[:, :, None]).sum(1)  # [L, B]
        d = (np.take_along_axis(wmean, ent, axis=1) / c_it)  # [L, M] mean load of each item
        delta = d[:, None, :] - d[:, :, None]  # [L, a, b]: load bin(a) gains when a <-> b
        na = mload[:, bins][:, :, None] + delta
        nb = mload[:, bins][:, None, :] - delta
        ok &= np.maximum(na, nb) <= limit[:, None, None] * (1 + 1e-12)
        ok &= gain > 1e-12
        ok &= active[:, None, None]
        score = np.where(ok, gain, -np.inf).reshape(L, M * M)
        top = np.argpartition(-score, K - 1, axis=1)[:, :K] if K < M * M else np.broadcast_to(np.arange(M * M), (L, K))
        g = np.take_along_axis(score, top, axis=1)  # [L, K]
        a, b = top // M, top % M
        x, y = np.take_along_axis(ent, a, 1), np.take_along_axis(ent, b, 1)
        cx, cy = np.take_along_axis(cnt, x, 1), np.take_along_axis(cnt, y, 1)
        # exact check on every step: new loads of bins ra, rb; the others' max from each step's top 3
        ra, rb = bins[a], bins[b]
        dt = (w[:, lidx[:, None], y] / cy[None] - w[:, lidx[:, None], x] / cx[None]).transpose(1, 2, 0)  # [L, K, T]
        rla = np.take_along_axis(rl, np.broadcast_to(ra[:, None, :], (L, T, K)), axis=2).transpose(0, 2, 1) + dt
        rlb = np.take_along_axis(rl, np.broadcast_to(rb[:, None, :], (L, T, K)), axis=2).transpose(0, 2, 1) - dt
        kk = min(3, num_bins)
        t3 = np.argpartition(-rl, kk - 1, axis=2)[:, :, :kk] if kk < num_bins else np.broadcast_to(
            np.arange(num_bins), (L, T, num_bins))  # [L, T, kk]
        v3 = np.take_along_axis(rl, t3, axis=2)
        excl = (t3[:, None] == ra[:, :, None, None]) | (t3[:, None] == rb[:, :, None, None])  # [L, K, T, kk]
        others = np.where(excl, -np.inf, v3[:, None]).max(-1)
        others = np.where(np.isfinite(others), others, 0.0)
        obj = (np.maximum(others, np.maximum(rla, rlb)) * sw[:, None, :]).sum(-1)  # [L, K]
        feas = np.isfinite(g) & (obj <= limit[:, None] * (1 + 1e-12))
        pick = np.argmax(np.where(feas, g, -np.inf), axis=1)
        go = feas[lidx, pick]
        active &= go
        if not go.any():
            break
        li = lidx[go]
        a1, b1 = a[li, pick[go]], b[li, pick[go]]
        x1, y1 = x[li, pick[go]], y[li, pick[go]]
        cx1, cy1 = cx[li, pick[go]].astype(np.float64), cy[li, pick[go]].astype(np.float64)
        ua, ub = unit[a1], unit[b1]
        # A[:, :, u] += pairs[:, :, e] * change of p_e(u)
        A[li, :, ua] += -pn[li, :, x1] / cx1[:, None] + pn[li, :, y1] / cy1[:, None]
        A[li, :, ub] += pn[li, :, x1] / cx1[:, None] - pn[li, :, y1] / cy1[:, None]
        ba, bb = bins[a1], bins[b1]
        np.add.at(onb, (li, x1, ba), -1)
        np.add.at(onb, (li, x1, bb), 1)
        np.add.at(onb, (li, y1, bb), -1)
        np.add.at(onb, (li, y1, ba), 1)
        step = dt[li, pick[go]]  # [n, T]
        rl[li, :, ba] += step
        rl[li, :, bb] -= step
        ent[li, a1], ent[li, b1] = y1, x1
    return ent


def _pairs(E: int, L: int, topk_ids: Any, cooccurrence: Any) -> np.ndarray:
    if topk_ids is not None:
        p = pair_counts(topk_ids, E)
    elif cooccurrence is not None:
        p = cooccurrence_pairs(cooccurrence)
    else:
        raise InputError("topk_ids: policy 'eplb-cooc' needs topk_ids=[tokens, layers, k] or "
                         "cooccurrence=[steps, layers, E, E] (a trace that records them)")
    if p.shape != (L, E, E):
        raise InputError(f"cooccurrence: pairs of shape {p.shape} for {L} layers x {E} experts")
    return p


def _limit(obj0: np.ndarray, imbalance_tolerance: float, load_tolerance: float | None) -> np.ndarray:
    if load_tolerance is not None:
        if not float(load_tolerance) >= 0:
            raise InputError(f"load_tolerance: expected a number >= 0, got {load_tolerance!r}")
        return obj0 * (1.0 + float(load_tolerance))
    if not float(imbalance_tolerance) >= 0:
        raise InputError(f"imbalance_tolerance: expected a number >= 0, got {imbalance_tolerance!r}")
    return 1.0 + (1.0 + float(imbalance_tolerance)) * np.maximum(obj0 - 1.0, 0.0)


@register_policy("eplb-cooc", options=COOC_OPTIONS)
def eplb_cooc_policy(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                     topk_ids: Any = None, cooccurrence: Any = None, imbalance_tolerance: float = 0.05,
                     load_tolerance: float | None = None, level: str = "node", cand: int = 256,
                     max_iters: int | None = None, **options: Any) -> np.ndarray:
    """Communication-aware eplb (module docstring). Returns ``phy2log [L, S]``."""
    T, L, E = loads.shape
    S, R, N = num_slots, num_ranks, num_nodes
    if level not in LEVELS:
        raise InputError(f"level: expected one of {list(LEVELS)}, got {level!r}")
    pairs = _pairs(E, L, topk_ids, cooccurrence)
    base = {k: v for k, v in options.items() if k in _BASE_OPTIONS}
    grouped = level == "node" and num_groups > 1 and num_groups % N == 0 and N > 1
    p0 = _solve(loads, num_slots=S, num_ranks=R, num_nodes=N, num_groups=num_groups,
                mode="hierarchical" if grouped else "global", **base)
    U = N if level == "node" else R
    if U == 1:
        return p0
    iters = 2 * S if max_iters is None else int(max_iters)
    w, sw = normalised_steps(loads, R)
    spr = S // R
    rank = np.arange(S) // spr
    cnt0 = phy2log_counts(p0, E).astype(np.float64)
    obj0 = step_objective(w, sw, p0, cnt0, rank, R)
    limit = _limit(obj0, imbalance_tolerance, load_tolerance)
    cap = _check_cap(options.get("max_replicas"), E, S)
    if grouped:
        return _grouped(loads, p0, p0, pairs, w, sw, limit, S, R, N, num_groups, iters, cand, cap)
    unit = rank // (R // N) if level == "node" else rank
    return swap_search(p0, cnt0, unit, U, rank, R, pairs, w, sw, limit, max_iters=iters, cand=cand)


def _grouped(loads: np.ndarray, incumbent: np.ndarray, start: np.ndarray, pairs: np.ndarray, w: np.ndarray,
             sw: np.ndarray, limit: np.ndarray, S: int, R: int, N: int, G: int, iters: int, cand: int,
             cap: int | None) -> np.ndarray:
    """Whole expert groups swapped between nodes, starting from ``start`` (each group on one node), each node
    re-placed inside by :func:`rows_in_nodes`; per layer the plan with the fewest cross-node pairs among
    ``incumbent`` and those meeting ``limit`` (several node-load proxy limits are tried)."""
    from eplb.metrics import cross_pairs
    from eplb.placement import Placement

    T, L, E = loads.shape
    gs = E // G
    gid = np.arange(E) // gs
    onehot = (gid[:, None] == np.arange(G)[None, :]).astype(np.float64)  # [E, G]
    gp = np.einsum("eg,lef,fh->lgh", onehot, pairs, onehot)
    gp[:, np.arange(G), np.arange(G)] = 0.0
    gw = (w @ onehot) / (R // N)  # [T, L, G]: group load per rank of its node
    # node of each group in ``start`` (all its experts' slots lie on one node): that of a slot of its first expert
    first = np.argmax(start[:, :, None] == (np.arange(G) * gs)[None, None, :], axis=1)  # [L, G]
    node0 = first // (S // N)
    pos_node = np.arange(G) // (G // N)  # G / N group positions per node
    ent0 = np.argsort(node0, axis=1, kind="stable")  # group at each position, ordered by node
    ones = np.ones((L, G))
    rank = np.arange(S) // (S // R)
    proxy0 = step_objective(gw, sw, ent0, ones, pos_node, N)
    obj_s = step_objective(w, sw, start, phy2log_counts(start, E).astype(np.float64), rank, R)
    tot = loads.sum(0)
    best, best_cross = incumbent, cross_pairs(Placement(incumbent, E, R, N), pairs)
    for frac in (1.5, 1.0, 0.6, 0.3):
        # the inner packing adds about obj(start) - proxy0 to the node proxy: leave that room under the limit
        lim = proxy0 + frac * (limit - obj_s)
        if not np.any(lim >= proxy0):
            continue
        ent = swap_search(ent0, ones, pos_node, N, pos_node, N, gp, gw, sw, np.maximum(lim, proxy0),
                          max_iters=iters, cand=cand)
        node = np.empty((L, G), dtype=np.int64)
        np.put_along_axis(node, ent, np.broadcast_to(pos_node, (L, G)), axis=1)
        rows = rows_in_nodes(tot, node, S, R, N, max_replicas=cap)
        obj = step_objective(w, sw, rows, phy2log_counts(rows, E).astype(np.float64), rank, R)
        cr = cross_pairs(Placement(rows, E, R, N), pairs)
        take = (obj <= limit * (1 + 1e-12)) & (cr < best_cross)
        best = np.where(take[:, None], rows, best)
        best_cross = np.where(take, cr, best_cross)
    return best
