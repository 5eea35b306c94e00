"""Vectorised building blocks of eplb's own policies: replication, packing, local search, alignment.

Every function works on a batch of independent rows (``X`` rows: layers, or (layer, node) pairs)
and loops in Python only over items (slots, replicas, swap iterations), never over rows.

Vocabulary: a row has ``E`` experts with loads ``weight [X, E]`` (tokens), ``S`` slots split into
``P`` packs (ranks) of ``spr = S // P`` consecutive slots; ``phy2log [X, S]`` is the expert of every
slot; ``counts [X, E]`` the replica count of every expert. A replica carries ``weight / counts``
(uniform split), so a pack's load is the sum of its replicas' loads.
"""

from __future__ import annotations

import numpy as np

from eplb.errors import InputError
from eplb.policies.align import align_packs
from eplb.policies.apportion import jump_counts

__all__ = [
    "align_packs",
    "colocated_dups",
    "count_step",
    "dedup_pass",
    "expert_pack_count",
    "lpt_place",
    "pack_loads",
    "perturb_search",
    "phy2log_counts",
    "refine",
    "replica_counts",
    "replica_weights",
    "swap_search",
]

_REL_TOL = 1e-12


def replica_counts(weight: np.ndarray, num_slots: int, max_replicas: int | None = None) -> np.ndarray:
    """Greedy replica counts minimising the largest per-replica load (min-max apportionment).

    Args:
        weight: ``[X, E]`` non-negative expert loads.
        num_slots: ``S >= E`` replicas per row.
        max_replicas: optional cap on any expert's replica count (``E * cap >= S`` required).

    Returns:
        ``[X, E]`` int64 counts, each ``>= 1``, rows summing to ``S``. Each extra replica goes to the
        expert with the largest ``weight / count``; ties go to the expert with fewer replicas, then
        the lower id. The result minimises ``max_e weight_e / count_e`` over all count vectors that
        respect the cap (the classic greedy exchange argument), which makes it a valid ingredient of
        :func:`eplb.metrics.lower_bound`.
    """
    X, E = weight.shape
    if num_slots < E:
        raise InputError(f"num_slots: {num_slots} slots cannot hold {E} experts")
    if max_replicas is not None and E * max_replicas < num_slots:
        raise InputError(
            f"max_replicas: {E} experts x at most {max_replicas} replicas = {E * max_replicas} < {num_slots} slots to fill"
        )
    counts = jump_counts(weight, num_slots, max_replicas) if num_slots - E > 16 else np.ones((X, E), dtype=np.int64)
    left = num_slots - counts.sum(axis=1)  # greedy steps still to take per row
    rows = np.arange(X)
    big = np.iinfo(np.int64).max
    for _ in range(int(left.max(initial=0))):
        val = weight / counts
        if max_replicas is not None:
            val = np.where(counts >= max_replicas, -np.inf, val)
        top = val.max(axis=1, keepdims=True)
        cand = val >= top
        pick = np.argmin(np.where(cand, counts, big), axis=1)
        go = left > 0
        counts[rows[go], pick[go]] += 1
        left -= go
    return counts


def replica_weights(weight: np.ndarray, counts: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """``[X, S]`` load of every slot: its expert's load divided by the expert's replica count."""
    return np.take_along_axis(weight / np.maximum(counts, 1), phy2log, axis=1)


def phy2log_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[X, E]`` replica count of every expert in ``phy2log [X, S]``."""
    X, S = phy2log.shape
    key = (np.arange(X)[:, None] * num_experts + phy2log).ravel()
    return np.bincount(key, minlength=X * num_experts).reshape(X, num_experts)


def expert_pack_count(phy2log: np.ndarray, num_experts: int, num_packs: int) -> np.ndarray:
    """``[X, E, P]`` replicas of expert ``e`` in pack ``p``."""
    X, S = phy2log.shape
    spr = S // num_packs
    key = ((np.arange(X)[:, None] * num_experts + phy2log) * num_packs + np.arange(S) // spr).ravel()
    return np.bincount(key, minlength=X * num_experts * num_packs).reshape(X, num_experts, num_packs)


def colocated_dups(phy2log: np.ndarray, num_packs: int) -> np.ndarray:
    """``[X]`` colocated duplicates (replicas of an expert beyond the first in a pack) of ``phy2log [X, S]``:
    ``clip(expert_pack_count - 1, 0).sum`` in ``O(X S log S)`` without the ``[X, E, P]`` array."""
    X, S = phy2log.shape
    key = np.sort((np.arange(S) // (S // num_packs)) * (int(phy2log.max(initial=0)) + 1) + phy2log, axis=1)
    return (key[:, 1:] == key[:, :-1]).sum(axis=1)


def pack_loads(item_w: np.ndarray, num_packs: int) -> np.ndarray:
    """``[X, P]`` pack loads from per-slot loads ``[X, S]``."""
    X, S = item_w.shape
    return item_w.reshape(X, num_packs, S // num_packs).sum(-1)


def lpt_place(weight: np.ndarray, counts: np.ndarray, num_packs: int, *, avoid_duplicates: bool = True) -> np.ndarray:
    """Greedy LPT with equal slots per pack and no two replicas of an expert in one pack when avoidable.

    Replicas are taken heaviest first; each goes to the lightest pack that still has a free slot and
    does not hold its expert yet (if every pack with room holds it, the lightest pack with room).

    Args:
        weight: ``[X, E]`` expert loads.
        counts: ``[X, E]`` replica counts, rows summing to ``S`` (a multiple of ``num_packs``).
        num_packs: ``P``.

    Returns:
        ``phy2log [X, S]``: pack ``p`` owns slots ``p*spr .. (p+1)*spr-1``.
    """
    X, E = weight.shape
    S = int(counts[0].sum())
    spr = S // num_packs
    rows = np.arange(X)
    eids = np.repeat(np.tile(np.arange(E), X), counts.ravel()).reshape(X, S)
    iw = replica_weights(weight, counts, eids)
    order = np.argsort(-iw, axis=1, kind="stable")
    eids = np.take_along_axis(eids, order, axis=1)
    iw = np.take_along_axis(iw, order, axis=1)
    load = np.zeros((X, num_packs))
    fill = np.zeros((X, num_packs), dtype=np.int64)
    has = np.zeros((X, E, num_packs), dtype=bool)
    out = np.empty((X, S), dtype=np.int64)
    for j in range(S):
        e = eids[:, j]
        room = fill < spr
        key = np.where(room, load, np.inf)
        if avoid_duplicates:
            ok = room & ~has[rows, e]
            key = np.where(ok.any(axis=1, keepdims=True), np.where(ok, load, np.inf), key)
        p = np.argmin(key, axis=1)
        out[rows, p * spr + fill[rows, p]] = e
        fill[rows, p] += 1
        load[rows, p] += iw[:, j]
        has[rows, e, p] = True
    return out


def swap_search(
    weight: np.ndarray,
    phy2log: np.ndarray,
    num_packs: int,
    *,
    max_iters: int | None = None,
    home: np.ndarray | None = None,
    target: np.ndarray | None = None,
    rows_mask: np.ndarray | None = None,
    partner_packs: int | None = None,
) -> np.ndarray:
    """Local search: swap a replica of the heaviest pack with one of another pack while that lowers it.

    Each iteration, for every still-active row, evaluates every swap of a slot of the heaviest pack
    with a slot of any other pack (``spr x S`` candidates) that creates no colocated duplicate, and
    applies the one that minimises the larger of the two new pack loads if that is below the
    current maximum. Replica counts are unchanged, so every item keeps its load. A row stops when
    no swap improves its heaviest pack (or when its maximum is ``<= target``).

    Args:
        weight: ``[X, E]`` expert loads.
        phy2log: ``[X, S]`` starting placement (not modified).
        num_packs: ``P``.
        max_iters: iteration cap (default ``4 * S``).
        home: optional ``[X, E, P]`` bool, where each expert already is (migration-aware mode):
            swaps are ranked by the number of new cross-pack copies they add first, and their
            improvement second.
        target: optional ``[X]`` loads; a row stops once its heaviest pack is ``<= target``.
        rows_mask: optional ``[X]`` bool, rows to work on (default all).
        partner_packs: swap partners only on this many packs, the lightest ones (default: every pack);
            each iteration then costs ``O(a spr^2 Q)`` instead of ``O(a spr S)``.

    Returns:
        The improved ``phy2log [X, S]``; the heaviest pack load never increases.
    """
    X, S = phy2log.shape
    E = weight.shape[1]
    spr = S // num_packs
    p2l = phy2log.copy()
    if spr == S or num_packs == 1:
        return p2l
    counts = phy2log_counts(p2l, E)
    per = weight / np.maximum(counts, 1)
    iw = np.take_along_axis(per, p2l, axis=1)
    loads = pack_loads(iw, num_packs)
    has = expert_pack_count(p2l, E, num_packs)
    slot_pack = np.arange(S) // spr
    active = np.arange(X) if rows_mask is None else np.flatnonzero(rows_mask)
    iters = 4 * S if max_iters is None else int(max_iters)
    local = np.arange(spr)
    Q = num_packs - 1 if partner_packs is None else max(1, min(int(partner_packs), num_packs - 1))
    for _ in range(iters):
        if active.size == 0:
            break
        A = active
        a = A.size
        ar = np.arange(a)
        Lr = loads[A]
        m = np.argmax(Lr, axis=1)
        Lm = Lr[ar, m]
        if target is not None:
            keep = Lm > target[A]
            A, m, Lm, Lr = A[keep], m[keep], Lm[keep], Lr[keep]
            a = A.size
            ar = np.arange(a)
            if a == 0:
                break
        mpos = m[:, None] * spr + local  # [a, spr]
        aw = iw[A[:, None], mpos]
        ae = p2l[A[:, None], mpos]
        if Q < num_packs - 1:  # partners on the Q lightest packs only
            packs = np.argpartition(Lr, Q, axis=1)[:, :Q]  # the heaviest (m) is never among the Q lightest
            bs = (packs[:, :, None] * spr + local).reshape(a, Q * spr)
            bw = np.take_along_axis(iw[A], bs, axis=1)
            be = np.take_along_axis(p2l[A], bs, axis=1)
            bpk = slot_pack[bs]  # [a, nb]
        else:
            bs = None
            bw = iw[A]
            be = p2l[A]
            bpk = np.broadcast_to(slot_pack, (a, S))
        d = aw[:, :, None] - bw[:, None, :]  # [a, spr, nb]
        tol = _REL_TOL * np.maximum(Lm, 1e-300)
        newm = Lm[:, None, None] - d
        newr = (Lr[:, slot_pack] if bs is None else np.take_along_axis(Lr, bpk, axis=1))[:, None, :] + d
        pm = np.maximum(newm, newr)
        valid = (bpk[:, None, :] != m[:, None, None]) & (d > tol[:, None, None])
        # no new duplicates: a's expert must be absent from b's pack, b's expert absent from the heavy pack
        a_on = has[A[:, None], ae, :]  # [a, spr, P]
        if bs is None:
            valid &= a_on[:, :, slot_pack] == 0
        else:
            valid &= np.take_along_axis(a_on, np.broadcast_to(bpk[:, None, :], d.shape), axis=2) == 0
        b_on_m = has[A[:, None], be, m[:, None]]  # [a, nb]
        valid &= (b_on_m == 0)[:, None, :]
        improving = valid & (pm < (Lm - tol)[:, None, None])
        if home is not None:
            hA = home[A]
            bp = bpk
            mm = np.broadcast_to(m[:, None], (a, spr))
            a_home_m = hA[ar[:, None], ae, mm]  # a's expert was on m
            b_home_b = hA[ar[:, None], be, bp]  # b's expert was on b's pack
            a_home_b = hA[ar[:, None, None], ae[:, :, None], bp[:, None, :]]
            b_home_m = hA[ar[:, None], be, m[:, None]]
            dmoves = (
                (~a_home_b).astype(np.int64)
                + (~b_home_m)[:, None, :]
                - (~a_home_m)[:, :, None]
                - (~b_home_b)[:, None, :]
            )
            key = np.where(improving, dmoves + pm / np.maximum(Lm, 1e-300)[:, None, None], np.inf)
        else:
            key = np.where(improving, pm, np.inf)
        flat = key.reshape(a, -1)
        best = np.argmin(flat, axis=1)
        ok = np.isfinite(flat[ar, best])
        if not ok.any():
            break
        nb = flat.shape[1] // spr
        j, k = best // nb, best % nb
        if bs is not None:
            k = bs[ar, k]
        A, j, k, m = A[ok], j[ok], k[ok], m[ok]
        sa = m * spr + j
        ea, eb = p2l[A, sa], p2l[A, k]
        wa, wb = iw[A, sa], iw[A, k]
        pk = slot_pack[k]
        p2l[A, sa], p2l[A, k] = eb, ea
        iw[A, sa], iw[A, k] = wb, wa
        loads[A, m] += wb - wa
        loads[A, pk] += wa - wb
        has[A, ea, m] -= 1
        has[A, eb, pk] -= 1
        has[A, ea, pk] += 1
        has[A, eb, m] += 1
        active = A
    return p2l


def dedup_pass(weight: np.ndarray, phy2log: np.ndarray, num_packs: int, *, max_iters: int | None = None,
               max_replicas: int | None = None) -> np.ndarray:
    """Remove colocated duplicates by moves that do not raise the row's heaviest pack.

    For a pack holding two replicas of one expert ``e``, first try to swap one of them with a slot of a
    pack that does not hold ``e`` (and whose expert is absent from the first pack), choosing the swap
    with the smallest resulting pair maximum; else try to *merge* it: give the slot to the expert ``f``
    (absent from the pack, within ``max_replicas``) with the smallest new replica load, which makes
    ``e``'s other replicas heavier. Either is accepted only if no pack ends above the row's current
    maximum (``e``'s grown packs are bounded without ``f``'s shrink). Duplicates that cannot be removed
    this way (e.g. an expert with more replicas than packs) stay.
    """
    X, S = phy2log.shape
    E = weight.shape[1]
    spr = S // num_packs
    p2l = phy2log.copy()
    if spr == 1:
        return p2l
    todo = colocated_dups(p2l, num_packs) > 0  # rows are independent: work on those with a duplicate only
    if not todo.all():
        if todo.any():
            p2l[todo] = dedup_pass(weight[todo], p2l[todo], num_packs, max_iters=max_iters, max_replicas=max_replicas)
        return p2l
    counts = phy2log_counts(p2l, E)
    iw = np.take_along_axis(weight / np.maximum(counts, 1), p2l, axis=1)
    loads = pack_loads(iw, num_packs)
    has = expert_pack_count(p2l, E, num_packs)
    slot_pack = np.arange(S) // spr
    iters = S if max_iters is None else int(max_iters)
    tried = np.zeros((X, S), dtype=bool)
    for _ in range(iters):
        # a duplicate slot: its expert has >= 2 replicas in its pack; take the first untried one per row
        dup = (has[np.arange(X)[:, None], p2l, slot_pack[None, :]] > 1) & ~tried
        rows = np.flatnonzero(dup.any(axis=1))
        if rows.size == 0:
            break
        sa = np.argmax(dup[rows], axis=1)
        tried[rows, sa] = True
        pa = slot_pack[sa]
        ea = p2l[rows, sa]
        wa = iw[rows, sa]
        d = wa[:, None] - iw[rows]  # [r, S]
        La = loads[rows, pa]
        newa = La[:, None] - d
        newb = loads[rows][:, slot_pack] + d
        pm = np.maximum(newa, newb)
        gmax = loads[rows].max(axis=1)
        valid = slot_pack[None, :] != pa[:, None]
        valid &= has[rows[:, None], ea[:, None], slot_pack[None, :]] == 0
        valid &= has[rows[:, None], p2l[rows], pa[:, None]] == 0
        valid &= pm <= gmax[:, None] * (1 + _REL_TOL)
        key = np.where(valid, pm, np.inf)
        k = np.argmin(key, axis=1)
        ok = np.isfinite(key[np.arange(rows.size), k])
        if (~ok).any():
            _merge_dups(weight, p2l, counts, iw, loads, has, rows[~ok], sa[~ok], slot_pack, max_replicas)
        rows, sa, k, pa, ea, wa = rows[ok], sa[ok], k[ok], pa[ok], ea[ok], wa[ok]
        if rows.size == 0:
            continue
        eb, wb, pb = p2l[rows, k], iw[rows, k], slot_pack[k]
        p2l[rows, sa], p2l[rows, k] = eb, ea
        iw[rows, sa], iw[rows, k] = wb, wa
        loads[rows, pa] += wb - wa
        loads[rows, pb] += wa - wb
        has[rows, ea, pa] -= 1
        has[rows, eb, pb] -= 1
        has[rows, ea, pb] += 1
        has[rows, eb, pa] += 1
    return p2l


def _merge_dups(weight: np.ndarray, p2l: np.ndarray, counts: np.ndarray, iw: np.ndarray, loads: np.ndarray,
                has: np.ndarray, rows: np.ndarray, sa: np.ndarray, slot_pack: np.ndarray,
                max_replicas: int | None) -> None:
    """In place: give duplicate slot ``sa`` of each row in ``rows`` to another expert if no pack ends
    above the row's maximum (see :func:`dedup_pass`); updates every state array of changed rows."""
    P = loads.shape[1]
    r = rows
    ar = np.arange(r.size)
    pa = slot_pack[sa]
    e = p2l[r, sa]
    w = weight[r]
    c = counts[r].astype(np.float64)
    ce = c[ar, e]
    we = w[ar, e]
    grow = np.where(ce >= 2, we / np.maximum(ce - 1, 1) - we / ce, np.inf)
    ne = has[r, e, :]  # [r, P]
    La = loads[r, pa]
    newi = w / (c + 1)
    # only experts this row already serves (rows may be one node's part of a layer)
    elig = (has[r[:, None], np.arange(w.shape[1])[None, :], pa[:, None]] == 0) & (c >= 1)
    if max_replicas is not None:
        elig &= c + 1 <= max_replicas
    cand = np.where(elig, newi, np.inf)
    f = np.argmin(cand, axis=1)
    fv = cand[ar, f]  # inf where no expert is eligible
    new_pa = La - we / ce + (ne[ar, pa] - 1) * grow + fv
    other = np.where((ne > 0) & (np.arange(P)[None, :] != pa[:, None]), loads[r] + ne * grow[:, None], -np.inf)
    gmax = loads[r].max(axis=1)
    ok = np.isfinite(fv) & (np.maximum(new_pa, other.max(axis=1)) <= gmax * (1 + _REL_TOL))
    if not ok.any():
        return
    rr = r[ok]
    p2l[rr, sa[ok]] = f[ok]
    # recompute the changed rows' state
    E = weight.shape[1]
    counts[rr] = phy2log_counts(p2l[rr], E)
    iw[rr] = np.take_along_axis(weight[rr] / np.maximum(counts[rr], 1), p2l[rr], axis=1)
    loads[rr] = pack_loads(iw[rr], P)
    has[rr] = expert_pack_count(p2l[rr], E, P)


def _top2_by_expert(val: np.ndarray, p2l: np.ndarray, counts: np.ndarray, slot_pack: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per expert, over its slots: (largest ``val``, that slot's pack, second largest ``val``; ``-inf`` if none).

    ``val [a, S]`` per slot, ``p2l [a, S]``, ``counts [a, E]``.
    """
    S = val.shape[1]
    order = np.lexsort((-val, p2l), axis=1)
    sv = np.take_along_axis(val, order, axis=1)
    start = np.cumsum(counts, axis=1) - counts  # [a, E] first sorted position of each expert
    st = np.minimum(start, S - 1).astype(np.int64)
    v1 = np.take_along_axis(sv, st, axis=1)
    p1 = slot_pack[np.take_along_axis(order, st, axis=1)]
    st2 = np.minimum(st + 1, S - 1)
    v2 = np.where(counts >= 2, np.take_along_axis(sv, st2, axis=1), -np.inf)
    v1 = np.where(counts >= 1, v1, -np.inf)
    return v1, p1, v2


def count_step(
    weight: np.ndarray,
    phy2log: np.ndarray,
    num_packs: int,
    *,
    max_replicas: int | None = None,
    rows_mask: np.ndarray | None = None,
    pick: int = 0,
    force: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One replication move per row: re-assign one slot to another expert if that lowers the max pack.

    Changing slot ``s`` (pack ``r_s``) from expert ``j`` (``c_j >= 2``) to expert ``i`` shrinks every
    replica of ``i`` to ``w_i / (c_i + 1)`` and grows the other replicas of ``j`` to ``w_j / (c_j - 1)``.
    Two families of moves are scored for every row:

    * (A) ``i`` is an expert of the heaviest pack ``m``, ``s`` any slot of a multi-replica expert elsewhere;
    * (B) ``s`` is a slot of ``m`` holding a multi-replica expert, ``i`` the expert with the smallest new
      replica load that is not on ``m`` (any other ``i`` only leaves ``m`` heavier).

    The score of a move is an upper bound on the largest new load among the packs it changes: ``m``
    (shrunk), ``r_s``, and the packs of ``j``'s other replicas (grown; the shrink of ``i``'s packs is
    ignored there). Moves that put ``i`` twice in a pack or exceed ``max_replicas`` are skipped. The best
    move is applied when its score is below the current maximum, so the pair (max, number of packs at
    the max) strictly decreases and the max never increases.

    With ``force=True`` the ``pick``-th best move (0-based) is applied whatever its score: a perturbation
    for :func:`perturb_search`.

    Returns:
        ``(phy2log [X, S], improved [X] bool)``.
    """
    X, S = phy2log.shape
    E = weight.shape[1]
    P = num_packs
    spr = S // P
    p2l = phy2log.copy()
    improved = np.zeros(X, dtype=bool)
    if P == 1:
        return p2l, improved
    A = np.arange(X) if rows_mask is None else np.flatnonzero(rows_mask)
    if A.size == 0:
        return p2l, improved
    a = A.size
    ar = np.arange(a)
    pa = p2l[A]
    w = weight[A]
    c = phy2log_counts(pa, E).astype(np.float64)
    n = expert_pack_count(pa, E, P)  # [a, E, P]
    per = w / np.maximum(c, 1)
    load = pack_loads(np.take_along_axis(per, pa, axis=1), P)  # [a, P]
    m = np.argmax(load, axis=1)
    Lm = load[ar, m]
    multi = c >= 2
    grow = np.where(multi, w / np.maximum(c - 1, 1) - per, 0.0)  # [a, E]
    newi = w / (c + 1)
    shrink = per - newi
    cap_ok = np.ones((a, E), dtype=bool) if max_replicas is None else c + 1 <= max_replicas
    # heaviest / second heaviest pack of each expert after growing its replicas there (for j's other packs)
    slot_pack = np.arange(S) // spr
    gv = load[:, slot_pack] + n[ar[:, None], pa, slot_pack[None, :]] * grow[ar[:, None], pa]  # [a, S]
    j1, jp1, j2 = _top2_by_expert(gv, pa, c.astype(np.int64), slot_pack)
    local = np.arange(spr)
    tol = _REL_TOL * np.maximum(Lm, 1e-300)
    # ---- (A): i on the heavy pack, donor slot s elsewhere
    mi = pa[ar[:, None], m[:, None] * spr + local]  # [a, spr]
    donor = multi[ar[:, None], pa] & (slot_pack[None, :] != m[:, None])  # [a, S]
    D = int(donor.sum(axis=1).max()) if donor.any() else 0
    if D:
        order = np.argsort(~donor, axis=1, kind="stable")[:, :D]
        dval = np.take_along_axis(donor, order, axis=1)  # [a, D]
        sj = np.take_along_axis(pa, order, axis=1)
        rs = slot_pack[order]
        jmax = np.where(jp1[ar[:, None], sj] == rs, j2[ar[:, None], sj], j1[ar[:, None], sj])  # j's other packs
        nj_rs = n[ar[:, None], sj, rs] - 1  # other replicas of j on s's own pack grow too
        rs_new = (load[ar[:, None], rs] - per[ar[:, None], sj] + nj_rs * grow[ar[:, None], sj])[:, None, :]
        rs_new = rs_new + newi[ar[:, None], mi][:, :, None]
        m_new = (Lm[:, None] - n[ar[:, None], mi, m[:, None]] * shrink[ar[:, None], mi])[:, :, None]
        score = np.maximum(np.maximum(rs_new, m_new), jmax[:, None, :])  # [a, spr, D]
        ok = dval[:, None, :] & cap_ok[ar[:, None], mi][:, :, None]
        ok &= n[ar[:, None, None], mi[:, :, None], rs[:, None, :]] == 0
        ok &= mi[:, :, None] != sj[:, None, :]
        score = np.where(ok, score, np.inf).reshape(a, -1)
        sA = order[:, None, :].repeat(spr, axis=1).reshape(a, -1)
        iA = mi[:, :, None].repeat(D, axis=2).reshape(a, -1)
    else:
        score = np.full((a, 0), np.inf)
        sA = iA = np.zeros((a, 0), dtype=np.int64)
    # ---- (B): donor slot on the heavy pack, receiver = smallest new replica not on m
    sB = m[:, None] * spr + local
    jB = pa[ar[:, None], sB]  # [a, spr]
    recv_ok = cap_ok & (n[ar, :, m] == 0) & (c >= 1)  # only experts this row already serves
    iv = np.where(recv_ok, newi, np.inf)
    istar = np.argmin(iv, axis=1)
    ival = iv[ar, istar]
    jmaxB = np.where(jp1[ar[:, None], jB] == m[:, None], j2[ar[:, None], jB], j1[ar[:, None], jB])
    nj_m = n[ar[:, None], jB, m[:, None]] - 1
    scoreB = np.maximum((Lm[:, None] - per[ar[:, None], jB] + nj_m * grow[ar[:, None], jB]) + ival[:, None], jmaxB)
    scoreB = np.where(multi[ar[:, None], jB] & np.isfinite(ival)[:, None], scoreB, np.inf)
    allscore = np.concatenate([score, scoreB], axis=1)
    alls = np.concatenate([sA, sB], axis=1)
    alli = np.concatenate([iA, np.broadcast_to(istar[:, None], (a, spr))], axis=1)
    if pick == 0:
        k = np.argmin(allscore, axis=1)
    else:
        kk = min(pick, allscore.shape[1] - 1)
        k = np.argpartition(allscore, kk, axis=1)[:, kk]
    best = allscore[ar, k]
    arg_s = alls[ar, k]
    arg_i = alli[ar, k]
    if force:
        good = np.isfinite(best)
        rows = A[good]
        p2l[rows, arg_s[good]] = arg_i[good]
        improved[rows] = True
        return p2l, improved
    good = best < Lm - tol
    rows = A[good]
    p2l[rows, arg_s[good]] = arg_i[good]
    improved[rows] = True
    return p2l, improved


def refine(
    weight: np.ndarray,
    phy2log: np.ndarray,
    num_packs: int,
    *,
    max_replicas: int | None = None,
    max_rounds: int = 32,
    max_iters: int | None = None,
    rows_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Alternate :func:`swap_search` (packing) and :func:`count_step` (replication) until neither lowers
    a row's heaviest pack (at most ``max_rounds`` replication moves per row); the max never increases."""
    p = swap_search(weight, phy2log, num_packs, max_iters=max_iters, rows_mask=rows_mask)
    active = np.ones(p.shape[0], dtype=bool) if rows_mask is None else rows_mask.copy()
    for _ in range(max_rounds):
        p, imp = count_step(weight, p, num_packs, max_replicas=max_replicas, rows_mask=active)
        if not imp.any():
            break
        p = swap_search(weight, p, num_packs, max_iters=max_iters, rows_mask=imp)
        active = imp
    return p


def perturb_search(
    weight: np.ndarray,
    phy2log: np.ndarray,
    num_packs: int,
    *,
    max_replicas: int | None = None,
    rounds: int = 6,
    max_iters: int | None = None,
) -> np.ndarray:
    """Iterated local search: force the ``k``-th best replication move (round ``k``), re-run :func:`refine`,
    keep the result per row only if its heaviest pack is lower. The max never increases."""
    E = weight.shape[1]
    best = phy2log.copy()

    def max_load(p: np.ndarray) -> np.ndarray:
        return pack_loads(replica_weights(weight, phy2log_counts(p, E), p), num_packs).max(axis=1)

    bmx = max_load(best)
    for k in range(rounds):
        cand, moved = count_step(weight, best, num_packs, max_replicas=max_replicas, pick=k, force=True)
        if not moved.any():
            break
        cand = refine(weight, cand, num_packs, max_replicas=max_replicas, max_rounds=4, max_iters=max_iters,
                      rows_mask=moved)
        mx = max_load(cand)
        better = moved & (mx < bmx * (1 - _REL_TOL))
        best[better] = cand[better]
        bmx = np.where(better, mx, bmx)
    return best
