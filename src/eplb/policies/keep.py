"""Migration-aware "keep in place" post-processing of a new placement against the current one.

A policy plans a new ``phy2log [L, S]`` without caring which GPU each rank's experts are on now.
Ranks of one node are interchangeable for the load (and nodes are, as a whole), so the new
placement may be relabelled freely at rank level inside nodes and at node level without changing
the balance. This module picks, per layer, the relabelling that moves the fewest weights:

1. :func:`match_ranks` -- an exact two-level maximum-overlap assignment
   (:func:`scipy.optimize.linear_sum_assignment`): for every (new node, old node) pair the best
   rank assignment inside it, then the best node assignment on those values. The objective is
   lexicographic: first the number of *distinct* experts a rank already holds (each one a
   cross-rank transfer saved, :func:`eplb.runtime.manager.plan_migration`'s count), then the
   number of *replicas* it already holds (fewer local copies), then the identity on ties;
2. :func:`preserve_slots` -- inside each rank, the ``k``-th old copy of an expert keeps its slot
   when the new rank still holds more than ``k`` copies of it; the other new experts fill the
   remaining slots in their order.

The current map may hold ``-1`` (or any id outside ``[0, E)``) for empty slots -- e.g. the slots of
ranks elastic EP just added -- and may be narrower or wider than the new one (ranks added or
removed; slots per rank do not change, slot ``s`` is on rank ``s // spr``; slots of ranks beyond
the new rank count are ignored).

Guarantees (per layer): every rank of the result holds the multiset of experts of one of ``new``'s
ranks of the same-position node block (balance unchanged: same rank loads up to relabelling within
a node, same node loads up to node relabelling), and the identity is a candidate, so the result
never needs more cross-rank transfers than ``new`` itself.

Shapes: ``L`` layers, ``E`` experts, ``S`` slots, ``R`` ranks, ``N`` nodes, ``spr = S // R``,
``rpn = R // N``. Pure numpy/scipy, no I/O; the overlaps are vectorised over layers, the linear
assignments (scipy has no batched solver) run per layer and node pair.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from eplb.errors import InputError
from eplb.placement import Placement, PlacementError

__all__ = [
    "align_ranks",
    "align_to_current",
    "keep_in_place",
    "match_ranks",
    "preserve_slots",
    "rank_counts",
]


def rank_counts(phy2log: np.ndarray, num_ranks: int, num_experts: int,
                slots_per_rank: int | None = None) -> np.ndarray:
    """``[L, R, E]`` int64 replicas of each expert on each rank of ``phy2log [L, S']``.

    Entries outside ``[0, E)`` (``-1`` = empty slot) are ignored, as are slots of ranks
    ``>= num_ranks`` (a wider map). ``slots_per_rank`` defaults to ``S' // num_ranks``.
    """
    p = np.asarray(phy2log, dtype=np.int64)
    if p.ndim != 2:
        raise InputError(f"phy2log: expected a [layers, slots] array, got shape {p.shape}")
    L, S = p.shape
    spr = S // num_ranks if slots_per_rank is None else int(slots_per_rank)
    if spr < 1:
        raise InputError(f"phy2log: {S} slots cannot hold {num_ranks} ranks")
    rank = np.arange(S) // spr
    valid = (p >= 0) & (p < num_experts) & (rank < num_ranks)[None, :]
    li, si = np.nonzero(valid)
    out = np.zeros((L, num_ranks, num_experts), dtype=np.int64)
    np.add.at(out, (li, rank[si], p[li, si]), 1)
    return out


def _overlap(new_counts: np.ndarray, have: np.ndarray) -> np.ndarray:
    """``[L, R, R]`` lexicographic overlap score of new rank ``a`` with current rank ``b``.

    ``distinct * (spr_max + 1) * R + replicas`` where ``distinct`` is the number of experts on
    both and ``replicas = sum_e min(n_ae, h_be)``; the weight makes any assignment's total
    ``distinct`` dominate its total ``replicas`` (at most ``R * spr_max``).
    """
    n = new_counts.astype(np.float64)
    h = have.astype(np.float64)
    kmax = int(min(new_counts.max(initial=0), have.max(initial=0)))
    distinct = np.einsum("lae,lbe->lab", np.minimum(n, 1.0), np.minimum(h, 1.0))
    replicas = distinct.copy()
    for k in range(1, kmax):  # sum_e min(n, h) = sum_k sum_e [n > k][h > k]
        replicas += np.einsum("lae,lbe->lab", (n > k).astype(np.float64), (h > k).astype(np.float64))
    R = new_counts.shape[1]
    weight = float(R * (int(new_counts.sum(-1).max(initial=0)) + 1) + 1)
    return distinct * weight + replicas


def _assign(score: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximum-``score [n, n]`` assignment, ties preferring the identity: ``(perm, value)``, ``a -> perm[a]``.

    The identity bonus (``< 1`` in total) cannot outweigh one unit of ``score`` (integers).
    """
    n = score.shape[0]
    rows, cols = linear_sum_assignment(score * (n + 1) + np.eye(n), maximize=True)
    perm = np.empty(n, dtype=np.int64)
    perm[rows] = cols
    return perm, float(score[rows, cols].sum())


def match_ranks(new_counts: np.ndarray, have: np.ndarray, num_nodes: int = 1) -> np.ndarray:
    """``[L, R]`` int64: new rank ``a`` becomes rank ``perm[l, a]`` (ranks move within nodes, nodes as a whole).

    ``new_counts``, ``have``: ``[L, R, E]`` replicas per rank of the new plan and of the current
    map (:func:`rank_counts`). Exact over the two-level structure: one assignment per node pair,
    then a node assignment on their values (``N**2`` assignments of size ``rpn`` plus one of size
    ``N`` per layer). Maximises distinct experts kept per rank, then replicas kept, then prefers
    the identity.
    """
    L, R, _ = new_counts.shape
    if have.shape != new_counts.shape:
        raise InputError(f"have: expected shape {new_counts.shape}, got {have.shape}")
    N = int(num_nodes)
    if N < 1 or R % N:
        raise InputError(f"num_nodes: {R} ranks are not divisible by {N} nodes")
    rpn = R // N
    ov = _overlap(new_counts, have)  # [L, R, R]
    out = np.empty((L, R), dtype=np.int64)
    for layer in range(L):  # one assignment problem per layer: no batched LSA exists
        o = ov[layer]
        if N == 1:
            out[layer] = _assign(o)[0]
            continue
        inner = np.empty((N, N, rpn), dtype=np.int64)
        val = np.zeros((N, N))
        for a in range(N):
            for b in range(N):
                inner[a, b], val[a, b] = _assign(o[a * rpn:(a + 1) * rpn, b * rpn:(b + 1) * rpn])
        node_perm, _ = _assign(val)
        out[layer] = (node_perm[:, None] * rpn + inner[np.arange(N), node_perm]).reshape(R)
    return out


def align_ranks(new: np.ndarray, have: np.ndarray, num_ranks: int, num_nodes: int = 1) -> np.ndarray:
    """Relabel the ranks (and nodes) of ``new [L, S]`` to keep the most experts on their rank.

    ``have [L, R, E]``: what each rank holds now (:func:`rank_counts` of the current map). A rank's
    slot block moves as a whole (slot order inside it unchanged), so every rank's and node's load
    is unchanged. See :func:`match_ranks` for the objective.
    """
    new = np.asarray(new)
    L, S = new.shape
    R = int(num_ranks)
    spr = S // R
    perm = match_ranks(rank_counts(new, R, have.shape[2], spr), have, num_nodes)
    out = np.empty((L, R, spr), dtype=new.dtype)
    out[np.arange(L)[:, None], perm] = new.reshape(L, R, spr)
    return out.reshape(L, S)


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

    ``old [L, S]`` may hold ``-1`` (empty slots, never matched). Per rank, the ``k``-th copy of
    expert ``e`` in the old slots keeps its slot when the new rank still holds ``> k`` copies of
    ``e``; the other new experts fill the remaining slots in their order. Each rank keeps exactly
    its new multiset of experts. Vectorised over layers and ranks.
    """
    new = np.asarray(new)
    old = np.asarray(old)
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
    out = np.where(keep, ol, -1).astype(new.dtype)
    take = np.arange(spr)[None, :] < m[:, None]
    rr = np.broadcast_to(rows, (X, spr))[take]
    out[rr, free_pos[take]] = nl[rr, free_items[take]]
    return out.reshape(L, S)


def align_to_current(current: np.ndarray, new: np.ndarray, num_ranks: int, num_nodes: int = 1,
                     num_experts: int | None = None) -> np.ndarray:
    """``new [L, S]`` relabelled and slot-permuted to stay closest to ``current [L, S']``: ``[L, S]``.

    ``current`` may hold ``-1`` (empty slots) and may be narrower or wider than ``new`` as long as
    ``S'`` is a multiple of ``spr = S // num_ranks`` (ranks added or removed). Ranks move within
    nodes and nodes as a whole (:func:`match_ranks`), then experts staying on a rank keep their
    slot (:func:`preserve_slots`). Never changes the balance (each rank holds one of ``new``'s rank
    multisets, relabelled within the node structure) and never increases the cross-rank moves.
    ``num_experts`` defaults to ``max(new) + 1``.
    """
    cur = np.asarray(current, dtype=np.int64)
    nw = np.asarray(new, dtype=np.int64)
    if nw.ndim != 2 or cur.ndim != 2 or cur.shape[0] != nw.shape[0]:
        raise InputError(f"current: expected [{nw.shape[0]}, slots] like new {nw.shape}, got {cur.shape}")
    L, S = nw.shape
    R = int(num_ranks)
    if R < 1 or S % R:
        raise InputError(f"num_ranks: {S} slots are not divisible by {R} ranks")
    spr = S // R
    if cur.shape[1] % spr:
        raise InputError(f"current: {cur.shape[1]} slots are not a multiple of {spr} slots per rank")
    E = int(nw.max(initial=-1)) + 1 if num_experts is None else int(num_experts)
    out = align_ranks(nw, rank_counts(cur, R, E, spr), R, num_nodes)
    width = min(cur.shape[1], S)
    old = np.full_like(nw, -1)
    old[:, :width] = cur[:, :width]
    return preserve_slots(out, old, R, E)


def keep_in_place(current: Placement | np.ndarray, new: Placement) -> Placement:
    """Migration-aware post-processing: the same rank loads as ``new``, moving the fewest experts.

    ``current``: a :class:`Placement` of ``new``'s shape, or raw current rows ``[L, S']`` (which need
    not serve every expert; ``-1`` = empty slot). Per layer, :func:`align_to_current` with ``new``'s
    rank and node counts; the result's meta is ``new``'s plus ``keep_in_place: True``.
    Raises :class:`PlacementError` when the shapes or expert counts differ.
    """
    if isinstance(current, Placement):
        current._check_same_shape(new)
        if current.num_experts != new.num_experts:
            raise PlacementError(f"keep_in_place: {current.num_experts} vs {new.num_experts} experts")
        rows = current.phy2log
    else:
        rows = np.asarray(current)
    out = align_to_current(rows, new.phy2log, new.num_ranks, new.num_nodes, new.num_experts)
    return Placement(out, new.num_experts, new.num_ranks, new.num_nodes, new.layer_ids,
                     {**new.meta, "keep_in_place": True})
