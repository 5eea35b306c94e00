"""Local search on the per-step objective ``mean_t max_r load_t(r)`` of a static placement.

A serving step waits for its slowest rank, so the cost of a placement on a window of per-step loads
``[T, L, E]`` is the mean over steps of the max rank load (per layer). :func:`robust_rows` improves a
start placement by slot swaps on that objective; ``eplb-robust`` (:mod:`eplb.policies.robust`) and
``eplb``'s window plan (:mod:`eplb.policies.eplb_policy`) both call it.
"""

from __future__ import annotations

import numpy as np

from eplb.policies.packing import expert_pack_count, phy2log_counts

__all__ = ["robust_rows", "step_loads", "step_max_mean"]


def step_loads(loads: np.ndarray, phy2log: np.ndarray, num_packs: int) -> np.ndarray:
    """``[T, X, P]`` per-step rank loads of placements ``phy2log [X, S]`` for ``loads [T, X, E]`` (uniform split).

    One flat gather of the ``T * X * S`` slot loads (no broadcast index array): ``O(T X S)``.
    """
    T, X, E = loads.shape
    S = phy2log.shape[1]
    flat = (np.arange(X)[:, None] * E + phy2log).ravel()
    inv = 1.0 / np.maximum(phy2log_counts(phy2log, E), 1).ravel()[flat]  # [X * S] share of each slot
    iw = loads.reshape(T, X * E)[:, flat]
    iw *= inv
    return iw.reshape(T, X, num_packs, S // num_packs).sum(axis=3)


def step_max_mean(loads: np.ndarray, phy2log: np.ndarray, num_packs: int) -> np.ndarray:
    """``[X]`` mean over steps of the max rank load: ``loads [T, X, E]``, ``phy2log [X, S]``; ``O(T X S)``."""
    return step_loads(loads, phy2log, num_packs).max(axis=2).mean(axis=0)


def robust_rows(loads: np.ndarray, start: np.ndarray, num_packs: int, *, max_iters: int | None = None,
                cand: int = 256, min_gain: float = 0.0, partner_ranks: int | None = None) -> np.ndarray:
    """Local search on ``mean_t max_r`` for every row (see the module docstring).

    Each iteration, for every still-active row: the rank ``ra`` that is the per-step maximum with the
    largest summed load ("blame"); the swaps of one of its ``spr`` slots with any slot of another rank that
    create no colocated duplicate are ranked by how well they even the two ranks' window-mean loads, the best
    ``cand`` of them are scored exactly on every step, and the best one is applied if it lowers the row's
    objective. A row stops when no scored swap lowers it, or when the gain is below ``min_gain`` times its
    objective (the swap is still applied).

    Args:
        loads: ``[T, X, E]`` per-step loads.
        start: ``[X, S]`` starting placement (its replica counts are kept).
        num_packs: ``P`` ranks.
        max_iters: iteration cap (default ``2 * S``).
        cand: swaps per row scored exactly per step each iteration.
        min_gain: relative gain below which a row stops (0: run until no improving swap or the cap).
        partner_ranks: partners only on this many ranks, the lightest on the window mean (default all).

    Returns:
        ``[X, S]`` phy2log whose objective is ``<=`` the start's.

    Cost per iteration over ``a`` active rows: ``O(a (T P + spr S + cand T))``, everything vectorised across
    rows (no per-row Python loop); the state (per-step slot / rank loads, their window means, the
    ``[X, E, P]`` expert-on-rank counts) is updated in place for the swapped slots only. The ``a * cand * T``
    scoring is five passes over one ``[a, cand, T]`` buffer: three flat row gathers (``np.take``) and two maxima; the
    largest load over the ranks other than the two swapped ones is tabulated once per (row, rank) on ``[a, P, T]``.
    """
    T, X, E = loads.shape
    S = start.shape[1]
    spr = S // num_packs
    P = num_packs
    p2l = start.copy()
    if P == 1 or T == 0:
        return p2l
    flat = (np.arange(X)[:, None] * E + p2l).ravel()
    inv = 1.0 / np.maximum(phy2log_counts(p2l, E), 1).ravel()[flat]
    iw = np.ascontiguousarray((loads.reshape(T, X * E)[:, flat] * inv).T).reshape(X, S, T)  # [X, S, T]
    rl = iw.reshape(X, P, spr, T).sum(2)  # [X, P, T]
    iwm = iw.mean(axis=2)  # [X, S] window-mean slot loads
    rlm = rl.mean(axis=2)  # [X, P]
    iw2, rl2 = iw.reshape(X * S, T), rl.reshape(X * P, T)  # views, for flat row gathers
    has = expert_pack_count(p2l, E, P)
    slot_pack = np.arange(S) // spr
    local = np.arange(spr)
    Q = P - 1 if partner_ranks is None else max(1, min(int(partner_ranks), P - 1))
    active = np.arange(X)
    iters = 2 * S if max_iters is None else int(max_iters)
    for _ in range(iters):
        if active.size == 0:
            break
        A = active
        a = A.size
        ar = np.arange(a)
        R = rl[A]  # [a, P, T]
        am = np.argmax(R, axis=1)  # [a, T]
        vmax = np.take_along_axis(R, am[:, None, :], axis=1)[:, 0]
        obj = vmax.mean(axis=1)
        blame = np.bincount((ar[:, None] * P + am).ravel(), weights=vmax.ravel(), minlength=a * P).reshape(a, P)
        ra = np.argmax(blame, axis=1)  # [a]
        # per step, the largest load over ranks other than ra (m1, on rank i1) and the next one (m2)
        Ra = R[ar, ra]  # [a, T]
        R[ar, ra] = -np.inf
        i1 = np.argmax(R, axis=1)
        m1 = np.take_along_axis(R, i1[:, None, :], axis=1)[:, 0]
        np.put_along_axis(R, i1[:, None, :], -np.inf, axis=1)
        m2 = R.max(axis=1) if P > 2 else np.full_like(m1, -np.inf)
        # prefilter on the window mean: the swaps that best even ra and the partner's rank on average
        mpos = ra[:, None] * spr + local  # [a, spr]
        ae = p2l[A[:, None], mpos]  # [a, spr]
        Rm = rlm[A]  # [a, P]
        if Q < P - 1:  # partners on the Q ranks lightest on the window mean
            Rq = Rm.copy()
            Rq[ar, ra] = np.inf
            ranks = np.argpartition(Rq, Q - 1, axis=1)[:, :Q]  # [a, Q]
        else:
            ranks = np.broadcast_to(np.arange(P), (a, P))
        nb = ranks.shape[1] * spr
        bs = (ranks[:, :, None] * spr + local).reshape(a, nb)  # [a, nb] partner slots
        be = p2l[A[:, None], bs]
        dm = iwm[A[:, None], mpos][:, :, None] - iwm[A[:, None], bs][:, None, :]  # [a, spr, nb]
        Rb_m = np.repeat(np.take_along_axis(Rm, ranks, axis=1), spr, axis=1)  # [a, nb]
        static = np.maximum(Rm[ar, ra][:, None, None] - dm, Rb_m[:, None, :] + dm)
        # no new colocated duplicate: a's expert absent from b's rank (this also excludes b on ra and
        # b holding a's expert), b's expert absent from ra
        valid = np.repeat(np.take_along_axis(has[A[:, None], ae, :], ranks[:, None, :], axis=2) == 0, spr, axis=2)
        valid &= (has[A[:, None], be, ra[:, None]] == 0)[:, None, :]
        static = np.where(valid, static, np.inf).reshape(a, -1)
        K = min(cand, static.shape[1])
        sel = np.argpartition(static, K - 1, axis=1)[:, :K] if K < static.shape[1] else np.argsort(static, axis=1)
        sel_ok = np.isfinite(np.take_along_axis(static, sel, axis=1))  # [a, K]
        sj, sk = sel // nb, np.take_along_axis(bs, sel % nb, axis=1)  # slot of ra (local), partner slot
        sa_k = ra[:, None] * spr + sj
        # flat row gathers (np.take on axis 0 of [X * S, T] / [X * P, T]: cheaper than 2-D fancy indexing)
        As, Ap = (A * S)[:, None], (A * P)[:, None]
        d = np.take(iw2, As + sa_k, axis=0)  # [a, K, T]
        d -= np.take(iw2, As + sk, axis=0)
        pb = slot_pack[sk]  # [a, K]
        Rb = np.take(rl2, Ap + pb, axis=0)  # [a, K, T]
        # new per-step max = max(ra - d, rb + d, largest other rank: m2 where that is b's own rank, else m1),
        # computed in place (fresh [a, K, T] temporaries cost more than the arithmetic); the "largest other
        # rank" is tabulated per (row, rank) on [a, P, T] and gathered, not masked per candidate
        Rb += d
        np.subtract(Ra[:, None, :], d, out=d)
        np.maximum(d, Rb, out=d)
        other = np.where(np.arange(P)[None, :, None] == i1[:, None, :], m2[:, None, :], m1[:, None, :])  # [a, P, T]
        np.maximum(d, np.take(other.reshape(a * P, T), (ar * P)[:, None] + pb, axis=0), out=d)
        newobj = d.sum(axis=2) / T  # [a, K]
        tol = 1e-12 * np.maximum(obj, 1e-300)
        key = np.where(sel_ok & (newobj < (obj - tol)[:, None]), newobj, np.inf)
        kbest = np.argmin(key, axis=1)
        kv = key[ar, kbest]
        ok = np.isfinite(kv)
        if not ok.any():
            break
        cont = ok & (obj - kv > min_gain * obj)
        A, ra = A[ok], ra[ok]
        j, k = sj[ar, kbest][ok], sk[ar, kbest][ok]
        sa = ra * spr + j
        pb = slot_pack[k]
        ea, eb = p2l[A, sa], p2l[A, k]
        wa, wb = iw[A, sa], iw[A, k]  # [n, T] (copies)
        p2l[A, sa], p2l[A, k] = eb, ea
        iw[A, sa], iw[A, k] = wb, wa
        dw = wb - wa
        rl[A, ra] += dw
        rl[A, pb] -= dw
        dwm = iwm[A, k] - iwm[A, sa]
        iwm[A, sa], iwm[A, k] = iwm[A, k], iwm[A, sa] + 0.0
        rlm[A, ra] += dwm
        rlm[A, pb] -= dwm
        has[A, ea, ra] -= 1
        has[A, eb, pb] -= 1
        has[A, ea, pb] += 1
        has[A, eb, ra] += 1
        active = A[cont[ok]]
    return p2l
