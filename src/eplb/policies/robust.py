"""``"eplb-robust"``: minimise the expected per-step max rank load over a window of steps.

A serving step waits for its slowest rank, so the cost of a static placement on a window of
per-step loads ``[T, L, E]`` is ``mean_t max_r load_t(r)`` (per layer), not the max of the summed
loads. The policy starts from ``eplb``'s plan of the summed loads and runs a local search on that
objective: each iteration, per layer, it takes the rank that is the per-step maximum most often
(weighted by its load there), evaluates every swap of one of its slots with a slot on another rank
(no new colocated duplicate) on every step of the window, and applies the swap that lowers the mean
per-step maximum the most. Replica counts come from the summed loads.

Options: those of ``eplb`` except ``current``; ``max_steps`` (default 64): windows longer than this
are searched on ``max_steps`` evenly spaced steps (the result is still checked on all of them);
``max_iters`` (default ``2 * S``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.policies import register_policy
from eplb.policies.eplb_policy import _check_cap, _deepseek_start, _embed, eplb_rows, excluded_layout
from eplb.policies.packing import expert_pack_count, phy2log_counts

__all__ = ["robust_rows", "step_max_mean"]


def step_max_mean(loads: np.ndarray, phy2log: np.ndarray, num_packs: int) -> np.ndarray:
    """``[X]`` mean over steps of the max rank load: ``loads [T, X, E]``, ``phy2log [X, S]``."""
    T, X, E = loads.shape
    c = phy2log_counts(phy2log, E)
    per = loads / np.maximum(c, 1)[None]
    iw = np.take_along_axis(per, np.broadcast_to(phy2log, (T,) + phy2log.shape), axis=2)
    rl = iw.reshape(T, X, num_packs, -1).sum(-1)
    return rl.max(axis=2).mean(axis=0)


def robust_rows(loads: np.ndarray, start: np.ndarray, num_packs: int, *, max_iters: int | None = None,
                cand: int = 256) -> np.ndarray:
    """Local search on ``mean_t max_r`` for every row (see the module docstring).

    Args:
        loads: ``[T, X, E]`` per-step loads.
        start: ``[X, S]`` starting placement (its replica counts are kept).
        num_packs: ``P`` ranks.
        cand: swaps per row scored exactly per step each iteration: the ``cand`` swaps (of a slot of the
            chosen rank with any other slot) that best even the two ranks' window-mean loads.

    Returns:
        ``[X, S]`` phy2log whose objective is ``<=`` the start's.
    """
    T, X, E = loads.shape
    S = start.shape[1]
    spr = S // num_packs
    p2l = start.copy()
    if num_packs == 1 or T == 0:
        return p2l
    c = phy2log_counts(p2l, E)
    per = np.ascontiguousarray((loads / np.maximum(c, 1)[None]).transpose(1, 0, 2))  # [X, T, E]
    iw = np.take_along_axis(per, np.broadcast_to(p2l[:, None, :], (X, T, S)), axis=2)  # [X, T, S]
    rl = iw.reshape(X, T, num_packs, spr).sum(-1)  # [X, T, P]
    has = expert_pack_count(p2l, E, num_packs)
    slot_pack = np.arange(S) // spr
    local = np.arange(spr)
    active = np.arange(X)
    iters = 2 * S if max_iters is None else int(max_iters)
    for _ in range(iters):
        if active.size == 0:
            break
        A = active
        a = A.size
        ar = np.arange(a)
        R = rl[A]  # [a, T, P]
        am = np.argmax(R, axis=2)  # [a, T]
        vmax = R.max(axis=2)
        obj = vmax.mean(axis=1)
        blame = np.zeros((a, num_packs))
        np.add.at(blame, (np.repeat(ar, T), am.ravel()), vmax.ravel())
        ra = np.argmax(blame, axis=1)  # [a]
        # top-3 per step to get the max over ranks other than {ra, rb}
        top = np.argsort(-R, axis=2)[:, :, :3]  # [a, T, 3]
        topv = np.take_along_axis(R, top, axis=2)
        P3 = top.shape[2]
        rb_all = np.arange(num_packs)
        excl = np.full((a, T, num_packs), 0.0)
        filled = np.zeros((a, T, num_packs), dtype=bool)
        for j in range(P3):
            idx = top[:, :, j][:, :, None]
            okj = (idx != ra[:, None, None]) & (idx != rb_all[None, None, :]) & ~filled
            excl = np.where(okj, topv[:, :, j][:, :, None], excl)
            filled |= okj
        mpos = ra[:, None] * spr + local  # [a, spr]
        ae = p2l[A[:, None], mpos]  # [a, spr]
        be = p2l[A]  # [a, S]
        aw = iw[A[:, None], :, mpos]  # [a, spr, T]
        # prefilter on the window mean: the K partners whose swap best evens the two ranks on average
        am_mean = aw.mean(axis=2)  # [a, spr]
        bw_mean = iw[A].mean(axis=1)  # [a, S]
        Rm = R.mean(axis=1)  # [a, P]
        dm = am_mean[:, :, None] - bw_mean[:, None, :]
        static = np.maximum(Rm[ar, ra][:, None, None] - dm, Rm[:, slot_pack][:, None, :] + dm)
        valid = np.broadcast_to(slot_pack[None, None, :] != ra[:, None, None], (a, spr, S)).copy()
        valid &= has[A[:, None], ae, :][:, :, slot_pack] == 0
        valid &= (has[A[:, None], be, ra[:, None]] == 0)[:, None, :]
        valid &= ae[:, :, None] != be[:, None, :]
        static = np.where(valid, static, np.inf).reshape(a, -1)
        K = min(cand, static.shape[1])
        sel = np.argpartition(static, K - 1, axis=1)[:, :K] if K < static.shape[1] else np.argsort(static, axis=1)
        sel_ok = np.isfinite(np.take_along_axis(static, sel, axis=1))  # [a, K]
        sj, sk = sel // S, sel % S  # slot of ra (local), partner slot
        awk = aw[ar[:, None], sj]  # [a, K, T]
        bwk = iw[A[:, None], :, sk]  # [a, K, T]
        d = awk - bwk
        Ra = R[ar, :, ra]  # [a, T]
        pb = slot_pack[sk]  # [a, K]
        Rb = R[ar[:, None], :, pb]  # [a, K, T]
        ex_b = excl[ar[:, None], :, pb]  # [a, K, T]
        newmax = np.maximum(np.maximum(Ra[:, None, :] - d, Rb + d), ex_b)
        newobj = newmax.mean(axis=2)  # [a, K]
        tol = 1e-12 * np.maximum(obj, 1e-300)
        key = np.where(sel_ok & (newobj < (obj - tol)[:, None]), newobj, np.inf)
        kbest = np.argmin(key, axis=1)
        ok = np.isfinite(key[ar, kbest])
        if not ok.any():
            break
        best = sel[ar, kbest]
        A, best, ra = A[ok], best[ok], ra[ok]
        j, k = best // S, best % S
        sa = ra * spr + j
        pb = slot_pack[k]
        ea, eb = p2l[A, sa], p2l[A, k]
        wa, wb = iw[A, :, sa].copy(), iw[A, :, k].copy()  # [n, T]
        p2l[A, sa], p2l[A, k] = eb, ea
        iw[A, :, sa], iw[A, :, k] = wb, wa
        rl[A, :, ra] += wb - wa
        rl[A, :, pb] += wa - wb
        has[A, ea, ra] -= 1
        has[A, eb, pb] -= 1
        has[A, ea, pb] += 1
        has[A, eb, ra] += 1
        active = A
    return p2l


@register_policy("eplb-robust", options=("max_replicas", "excluded_ranks", "max_steps", "max_iters", "current"))
def eplb_robust_policy(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                       max_replicas: Any = None, excluded_ranks: Any = None, max_steps: int = 64,
                       max_iters: int | None = None, **options: Any) -> np.ndarray:
    """Robust eplb on a window ``[T, L, E]`` (module docstring). Returns ``phy2log [L, S]``."""
    if options.get("current") is not None:
        raise ValueError("current: policy 'eplb-robust' is not migration-aware; use 'eplb' or 'eplb-incremental'")
    T, L, E = loads.shape
    w = loads.sum(axis=0)
    cap = _check_cap(max_replicas, E, num_slots)
    ex, alive = excluded_layout(excluded_ranks, E, num_slots, num_ranks)
    spr = num_slots // num_ranks
    S, R = (alive.size * spr, alive.size) if ex else (num_slots, num_ranks)
    start = eplb_rows(w, S, R, max_replicas=cap,
                      start=None if (cap or ex) else _deepseek_start(w, S, R, num_nodes, num_groups),
                      max_iters=max_iters)
    if T > 1:
        steps = np.unique(np.linspace(0, T - 1, min(T, max(int(max_steps), 1))).round().astype(np.int64))
        out = robust_rows(loads[steps], start, R, max_iters=max_iters)
        # keep the search result only where it is at least as good on the whole window
        better = step_max_mean(loads, out, R) <= step_max_mean(loads, start, R) * (1 + 1e-12)
        out = np.where(better[:, None], out, start)
    else:
        out = start
    return _embed(out, w, alive, num_slots, num_ranks) if ex else out
