"""Rank alignment of a new pack layout to the current one (few moved experts): a part of
:mod:`eplb.policies.packing` (re-exported there), kept apart to keep that module short.
"""

from __future__ import annotations

import numpy as np

from eplb.policies.keep import preserve_slots

__all__ = ["align_packs"]


def align_packs(current: np.ndarray, new: np.ndarray, num_packs: int, num_experts: int) -> np.ndarray:
    """Relabel the packs of ``new`` (and reorder slots inside each) to overlap ``current`` the most, counting
    expert *copies* kept (a pack holding an expert twice keeps two).

    Not :func:`eplb.policies.keep.align_ranks`, which maximises *distinct* experts kept per rank exactly (with a
    node level) for the executor's per (rank, expert) move count: the two objectives differ where a rank holds
    duplicates, and the incremental policy scores this one's candidate by its own copy count.

    Permuting whole packs and slots within a pack leaves every pack's load unchanged, so the
    result balances exactly as well as ``new`` while needing fewer expert copies from ``current``.
    Packs are matched greedily (the pair sharing the most experts first, vectorised over rows) and
    then improved by pairwise exchanges; inside a pack an expert that stays keeps its old slot.
    (The pack matching stays greedy rather than :func:`eplb.policies.keep.match_ranks`: that one
    maximises distinct experts kept, which can cost a copy or two more when a pack holds an expert
    twice; the within-pack step is :func:`eplb.policies.keep.preserve_slots`.)

    Args:
        current, new: ``[X, S]`` phy2log rows.

    Returns:
        ``[X, S]`` placement equal to ``new`` up to pack relabelling and within-pack slot order, never adding more
        (pack, expert) copies than ``new`` as it stands (rows where the greedy matching would keep ``new``'s packs).
    """
    X, S = new.shape
    P = num_packs
    spr = S // P
    rows = np.arange(X)
    assign = np.stack([_match_packs(current[x], new[x], P, num_experts) for x in range(X)]) if X else \
        np.zeros((0, P), dtype=np.int64)
    # move new pack q into old pack position assign[q]
    blocks = new.reshape(X, P, spr)
    out = np.empty_like(blocks)
    out[rows[:, None], assign] = blocks
    out = out.reshape(X, S)
    # the greedy matching can lose to no relabelling at all: keep whichever adds fewer (pack, expert) copies
    worse = _new_pairs(current, out, P, num_experts) > _new_pairs(current, new, P, num_experts)
    out[worse] = new[worse]
    # within each pack: experts that stay keep their old local slot
    return preserve_slots(out, current, P, num_experts)


def _new_pairs(current: np.ndarray, new: np.ndarray, P: int, E: int) -> np.ndarray:
    """``[X]`` distinct (pack, expert) pairs of ``new`` that ``current`` lacks (the executor's move count)."""
    X, S = new.shape
    pk = np.arange(S) // (S // P)
    ok = (current >= 0) & (current < E)
    have = np.zeros((X, P * E), dtype=bool)
    xi = np.broadcast_to(np.arange(X)[:, None], (X, S))
    have[xi[ok], (pk[None, :] * E + np.where(ok, current, 0))[ok]] = True
    want = np.zeros((X, P * E), dtype=bool)
    want[xi, pk[None, :] * E + new] = True
    return (want & ~have).sum(axis=1)


def _pack_overlap(current: np.ndarray, new: np.ndarray, P: int, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse ``overlap[q, p]`` = distinct experts new pack ``q`` shares with old pack ``p`` of one row:
    sorted keys ``q * P + p`` and their (positive) values."""
    S = new.shape[0]
    pk = np.arange(S) // (S // P)
    valid = (current >= 0) & (current < E)
    cur = np.unique(current[valid].astype(np.int64) * P + pk[valid])  # distinct (expert, old pack)
    nw = np.unique(new.astype(np.int64) * P + pk)  # distinct (expert, new pack)
    ce, cp = cur // P, cur % P
    ne, nq = nw // P, nw % P
    lo = np.searchsorted(ce, ne, side="left")
    hi = np.searchsorted(ce, ne, side="right")
    n = hi - lo
    if not n.sum():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    idx = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))  # old entries of the same expert
    keys, vals = np.unique(np.repeat(nq, n) * P + cp[idx], return_counts=True)
    return keys, vals.astype(np.int64)


def _match_packs(current: np.ndarray, new: np.ndarray, P: int, E: int) -> np.ndarray:
    """``assign[q]`` = old pack of new pack ``q`` for one row: greedy on the sparse overlap (largest first,
    ties to the lowest ``(q, p)``; packs without overlap paired in increasing order), then pairwise
    exchanges while one gains (the best, ties to the lowest pair). ``O(nnz log nnz)`` per pass instead
    of the dense ``[P, P]`` matrix (``P`` = 4096 ranks: 16M entries per layer)."""
    keys, vals = _pack_overlap(current, new, P, E)
    assign = np.full(P, -1, dtype=np.int64)
    used_p = np.zeros(P, dtype=bool)
    left = P
    for k in keys[np.lexsort((keys, -vals))].tolist():
        q, p = divmod(k, P)
        if assign[q] < 0 and not used_p[p]:
            assign[q] = p
            used_p[p] = True
            left -= 1
            if not left:
                break
    free_q = np.flatnonzero(assign < 0)
    assign[free_q] = np.flatnonzero(~used_p)[: free_q.size]
    if not keys.size:
        return assign

    def ov(q: np.ndarray, p: np.ndarray) -> np.ndarray:
        k = q * P + p
        i = np.minimum(np.searchsorted(keys, k), keys.size - 1)
        return np.where(keys[i] == k, vals[i], 0)

    kq, kp = keys // P, keys % P
    for _ in range(2 * P):
        inv = np.empty(P, dtype=np.int64)
        inv[assign] = np.arange(P)
        q1 = kq
        q2 = inv[kp]  # new pack now on old pack kp
        p1 = assign[q1]
        gain = vals + ov(q2, p1) - ov(q1, p1) - ov(q2, kp)
        gain = np.where(q1 == q2, 0, gain)
        best = int(gain.max())
        if best <= 0:
            break
        sel = gain == best
        pair = np.minimum(q1[sel], q2[sel]) * P + np.maximum(q1[sel], q2[sel])
        a, b = divmod(int(pair.min()), P)
        assign[a], assign[b] = assign[b], assign[a]
    return assign
