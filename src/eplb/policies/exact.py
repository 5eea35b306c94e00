"""The exact optimum of one layer's placement: a mixed-integer program solved by HiGHS (``scipy.optimize.milp``).

Model (the one :func:`eplb.metrics.rank_loads` measures): ``E`` experts with loads ``w_e``, ``S`` slots on ``R``
ranks, ``spr = S / R`` slots per rank; expert ``e`` gets ``c_e >= 1`` replicas (``sum_e c_e = S``), each
carrying ``w_e / c_e`` (uniform static split over all its replicas, colocated ones included); minimise the
largest rank load ``M``.

Formulation (exact, linear): for every allowed pair ``(e, c)`` a binary ``y[e, c]`` (``e`` has ``c`` replicas)
and, per rank ``p``, an integer ``z[e, c, p] in [0, min(c, spr)]`` (copies of ``e`` on ``p`` when ``e`` has
``c`` replicas)::

    sum_c y[e, c] = 1                          (one replica count per expert)
    sum_p z[e, c, p] = c * y[e, c]             (all c copies placed, none when the count is not c)
    sum_{e, c} z[e, c, p] = spr                (every rank's slots filled)
    sum_{e, c} (w_e / c) z[e, c, p] <= M       (rank load; w_e / c is a constant per pair)
    sum_c z[e0, c, 0] >= 1                     (symmetry breaking: the heaviest expert e0 has a copy on rank 0,
    load_p >= load_{p+1} for p >= 1             the other ranks ordered by load)

A pair ``(e, c)`` is allowed when ``c <= S - E + 1`` (and ``<= max_replicas``) and ``w_e / c <= U`` for a known
upper bound ``U`` on the optimum (e.g. a heuristic's max), so every optimal solution stays feasible; ``M`` is
bounded below by :func:`eplb.metrics.lower_bound`. Size: ``R * sum_e |c_e|`` integers, at most
``E * (S - E + 1) * R``; HiGHS solves the small cases (``E <= 16``, ``R <= 4``, ``S - E <= 2 R``) in tens of ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from eplb.errors import InputError

__all__ = ["EXACT_GAP", "EXACT_MAX_EXPERTS", "EXACT_MAX_VARS", "ExactResult", "exact_layer", "exact_rows", "exact_size"]

#: ``exact="auto"`` solves a layer exactly only when its program has at most this many integer variables ...
EXACT_MAX_VARS = 800
#: ... and it has at most this many experts (larger partitions are slow to prove, and the heuristic is close there).
EXACT_MAX_EXPERTS = 32

#: HiGHS's relative gap for the policy's exact path: its result is within 0.5% of the optimum when proven.
EXACT_GAP = 5e-3


@dataclass(frozen=True)
class ExactResult:
    """One layer's result: ``phy2log [S]`` (rank-major), its max rank load, whether it is proven optimal
    (to HiGHS's relative gap ``mip_rel_gap``), the solve time in seconds and a proven lower bound on the optimum:
    the optimum lies in ``[bound, max_load]``."""

    phy2log: np.ndarray | None
    max_load: float
    optimal: bool
    seconds: float
    bound: float = 0.0  # proven lower bound on the optimum (HiGHS's dual bound, at least the given ``lower``)


def _pairs(w: np.ndarray, S: int, cap: int | None, upper: float) -> tuple[np.ndarray, np.ndarray]:
    """Allowed ``(expert, count)`` pairs (see the module docstring) as two int arrays."""
    E = w.size
    cmax = S - E + 1 if cap is None else min(S - E + 1, int(cap))
    c = np.arange(1, cmax + 1)
    ok = w[:, None] / c[None, :] <= upper * (1 + 1e-9) + 1e-300  # [E, C]
    e_idx, c_idx = np.nonzero(ok)
    return e_idx, c[c_idx]


def exact_size(w: np.ndarray, num_slots: int, num_ranks: int, cap: int | None = None,
               upper: float | None = None) -> int:
    """Number of integer variables of the program for loads ``w [E]`` (``upper``: the pruning bound)."""
    w = np.asarray(w, dtype=np.float64)
    e_idx, _ = _pairs(w, num_slots, cap, float(w.max()) if upper is None else upper)
    return int(e_idx.size * (num_ranks + 1))


def exact_layer(w: np.ndarray, num_slots: int, num_ranks: int, *, max_replicas: int | None = None,
                upper: float | None = None, lower: float | None = None, time_limit: float = 10.0,
                mip_rel_gap: float = 1e-7, distinct: bool = False, node_limit: int | None = None) -> ExactResult:
    """Minimise the max rank load of one layer exactly (module docstring).

    Args:
        w: ``[E]`` non-negative loads.
        num_slots / num_ranks: ``S`` (multiple of ``R``, ``>= E``) and ``R``.
        max_replicas: optional cap on any expert's replica count.
        upper: a known achievable max load (prunes pairs); default ``spr * max(w)``, which bounds every
            placement's max (a rank holds ``spr`` replicas, each at most ``max(w)``).
        lower: a known lower bound on the optimum (default :func:`eplb.metrics.lower_bound`).
        time_limit: seconds for HiGHS; on time-out the best solution found is returned, ``optimal=False``.
        mip_rel_gap: HiGHS's relative optimality gap.
        distinct: no colocated duplicates: the copies of an expert with at most ``R`` replicas go to distinct
            ranks (``z <= 1``); the optimum over those placements (``False``: over all placements).
        node_limit: optional cap on HiGHS's branch-and-bound nodes (a machine-independent stop; with a large
            ``time_limit`` the result is reproducible).

    Returns:
        :class:`ExactResult`; ``phy2log`` is ``None`` when HiGHS found no solution in time.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    from eplb.metrics import lower_bound

    w = np.asarray(w, dtype=np.float64).ravel()
    E, S, R = w.size, int(num_slots), int(num_ranks)
    if S < E or S % R:
        raise InputError(f"num_slots: {S} slots must be >= {E} experts and a multiple of {R} ranks")
    spr = S // R
    t0 = time.perf_counter()
    scale = float(w.sum())
    if scale <= 0:  # nothing to balance: any placement is optimal
        p2l = np.concatenate([np.arange(E), np.zeros(S - E, dtype=np.int64)]).astype(np.int64)
        return ExactResult(p2l, 0.0, True, time.perf_counter() - t0, 0.0)
    x = w / scale  # loads sum to 1: HiGHS's tolerances are absolute
    up = (float(upper) / scale) * (1 + 1e-6) if upper is not None else spr * float(x.max())  # + rounding room
    lo = float(lower) / scale if lower is not None else float(lower_bound(x[None], S, R)[0])
    lo = min(lo, up)
    e_idx, c_val = _pairs(x, S, max_replicas, up)
    n = e_idx.size
    # variables: y[n], z[n * R] (pair-major, rank-minor), M
    nz = n * R
    nv = n + nz + 1
    iM = nv - 1
    zi = n + np.arange(nz).reshape(n, R)
    per = x[e_idx] / c_val  # [n] load of one copy
    rows, cols, vals, lb_c, ub_c = [], [], [], [], []
    r = 0

    def add(rr: np.ndarray, cc: np.ndarray, vv: np.ndarray, lo_: np.ndarray, hi_: np.ndarray) -> int:
        rows.append(rr)
        cols.append(cc)
        vals.append(vv)
        lb_c.append(lo_)
        ub_c.append(hi_)
        return int(lo_.size)

    # one count per expert
    r += add(r + e_idx, np.arange(n), np.ones(n), np.ones(E), np.ones(E))
    # sum_p z[e,c,p] - c y[e,c] = 0
    rr = r + np.repeat(np.arange(n), R + 1)
    cc = np.concatenate([zi, np.arange(n)[:, None]], axis=1).ravel()
    vv = np.concatenate([np.ones((n, R)), -c_val[:, None].astype(np.float64)], axis=1).ravel()
    r += add(rr, cc, vv, np.zeros(n), np.zeros(n))
    # slots per rank
    r += add(r + np.tile(np.arange(R), n), zi.ravel(), np.ones(nz), np.full(R, spr), np.full(R, spr))
    # rank load - M <= 0
    rr = np.concatenate([r + np.tile(np.arange(R), n), r + np.arange(R)])
    cc = np.concatenate([zi.ravel(), np.full(R, iM)])
    vv = np.concatenate([np.repeat(per, R), -np.ones(R)])
    r += add(rr, cc, vv, np.full(R, -np.inf), np.zeros(R))
    # symmetry (ranks are interchangeable): the heaviest expert has a copy on rank 0, ranks 1.. by load
    if R > 1:
        top = int(np.argmax(x))
        sel = np.flatnonzero(e_idx == top)
        r += add(np.full(sel.size, r), zi[sel, 0], np.ones(sel.size), np.ones(1), np.full(1, np.inf))
    if R > 2:
        k = np.arange(1, R - 1)
        m = k.size
        rr = np.concatenate([r + np.repeat(np.arange(m), n), r + np.repeat(np.arange(m), n)])
        cc = np.concatenate([zi[:, 1:-1].T.ravel(), zi[:, 2:].T.ravel()])
        vv = np.concatenate([np.tile(per, m), -np.tile(per, m)])
        r += add(rr, cc, vv, np.zeros(m), np.full(m, np.inf))
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, nv)).tocsr()
    cons = LinearConstraint(A, np.concatenate(lb_c), np.concatenate(ub_c))
    obj = np.zeros(nv)
    obj[iM] = 1.0
    vlo = np.zeros(nv)
    zmax = np.minimum(c_val, spr)
    if distinct:
        zmax = np.where(c_val <= R, 1, zmax)
    vhi = np.concatenate([np.ones(n), np.repeat(zmax, R).astype(np.float64), [up * (1 + 1e-9)]])
    vlo[iM] = lo * (1 - 1e-6)
    integrality = np.concatenate([np.ones(n + nz), [0]])
    opts = {"time_limit": max(float(time_limit), 1e-3), "mip_rel_gap": mip_rel_gap, "presolve": True}
    if node_limit is not None:
        opts["node_limit"] = int(node_limit)
    res = milp(obj, constraints=cons, integrality=integrality, bounds=Bounds(vlo, vhi), options=opts)
    if res.status == 2:  # HiGHS can call the program infeasible when [lo, up] is very narrow: retry without lo
        vlo[iM] = 0.0
        opts["time_limit"] = max(float(time_limit) - (time.perf_counter() - t0), 1e-3)
        res = milp(obj, constraints=cons, integrality=integrality, bounds=Bounds(vlo, vhi), options=opts)
    dt = time.perf_counter() - t0
    dual = getattr(res, "mip_dual_bound", None)
    bound = max(lo, float(dual) if dual is not None and np.isfinite(dual) else lo) * scale * (1 - 1e-6)
    if res.x is None:
        return ExactResult(None, float("inf"), False, dt, bound)
    z = np.rint(res.x[n:n + nz]).astype(np.int64).reshape(n, R)
    p2l = np.concatenate([np.repeat(e_idx, z[:, p]) for p in range(R)]).astype(np.int64)
    if p2l.size != S or np.bincount(p2l, minlength=E).min() < 1:  # rounding broke it (never seen): no result
        return ExactResult(None, float("inf"), False, dt, bound)
    cnt = np.bincount(p2l, minlength=E)
    mx = float((w / cnt)[p2l].reshape(R, spr).sum(1).max())
    return ExactResult(p2l, mx, res.status == 0, dt, min(bound, mx))


def exact_rows(weight: np.ndarray, start: np.ndarray, num_slots: int, num_ranks: int, *,
               max_replicas: int | None = None, time_limit: float = 1.0, max_vars: int | None = EXACT_MAX_VARS,
               mip_rel_gap: float = EXACT_GAP, dup_tol: float = 1e-3) -> np.ndarray:
    """Per row of ``weight [X, E]``, the exact optimum where it beats ``start [X, S]`` (a heuristic plan).

    Rows already at :func:`eplb.metrics.lower_bound` are proven optimal and skipped; rows whose program is
    larger than ``max_vars`` integer variables, or with more than :data:`EXACT_MAX_EXPERTS` experts, are skipped
    (``max_vars=None``: no limit); ``time_limit`` seconds are
    shared by all rows (each solve gets what is left; a timed-out solve returns its best solution, used only
    where it is better). The solver's placement has its colocated duplicates removed where that keeps its max
    (:func:`~eplb.policies.packing.dedup_pass`) and replaces the row when its max load is lower, by more than
    ``dup_tol`` (eplb passes its ``DUP_TOLERANCE``, 0.1%) if it has more colocated duplicates than ``start`` (a duplicate can be optimal: it
    fills a slot of a rank that must carry less): the result is never worse than ``start`` on any row.
    Cost: one HiGHS solve per row not at its bound (tens of ms at ``E <= 16, R <= 4``), bounded by ``time_limit``.
    """
    from eplb.metrics import lower_bound
    from eplb.policies.packing import (
        dedup_pass,
        expert_pack_count,
        pack_loads,
        phy2log_counts,
        replica_weights,
    )

    X, E = weight.shape
    out = start.copy()

    def quality(p2l: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mx = pack_loads(replica_weights(weight[rows], phy2log_counts(p2l, E), p2l), num_ranks).max(axis=1)
        dup = np.clip(expert_pack_count(p2l, E, num_ranks) - 1, 0, None).sum(axis=(1, 2))
        return mx, dup

    cur, cur_dup = quality(start, np.arange(X))
    lb = lower_bound(weight, num_slots, num_ranks)
    deadline = time.perf_counter() + float(time_limit)
    if max_vars is not None and E > EXACT_MAX_EXPERTS:
        return out
    for x in np.flatnonzero(cur > lb * (1 + 1e-9) + 1e-12):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        if max_vars is not None and exact_size(weight[x], num_slots, num_ranks, max_replicas, float(cur[x])) > max_vars:
            continue
        res = exact_layer(weight[x], num_slots, num_ranks, max_replicas=max_replicas, upper=float(cur[x]),
                          lower=float(lb[x]), time_limit=left, mip_rel_gap=mip_rel_gap)
        if res.phy2log is None:
            continue
        cand = dedup_pass(weight[x:x + 1], res.phy2log[None], num_ranks, max_replicas=max_replicas)
        mx, dup = quality(cand, np.array([x]))
        if mx[0] < cur[x] * (1 - (1e-9 if dup[0] <= cur_dup[x] else dup_tol)):
            out[x] = cand[0]
    return out
