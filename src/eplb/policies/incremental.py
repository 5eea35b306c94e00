"""Migration-aware re-planning: reach (nearly) the balance of a fresh plan while moving few experts.

A "move" is an expert weight copy that must cross ranks (:meth:`eplb.Placement.moves`): a slot whose
new expert was not on that rank before. Candidates, per row, and the choice among them:

* ``keep``: the current placement itself (no moves);
* ``aligned``: the fresh plan with its ranks relabelled and slots reordered to overlap the current
  placement the most (:func:`~eplb.policies.packing.align_packs`; exactly the fresh balance);
* ``repair``: the current placement with replica counts adjusted to the new loads (surplus replicas
  dropped from the heaviest ranks, missing ones added LPT-style into the freed slots), then a
  migration-aware swap search (:func:`~eplb.policies.packing.swap_search` with ``home=``) that stops
  once the heaviest rank is within ``target``;
* ``swap``: the current replica counts, only the migration-aware swap search.

Among the candidates whose heaviest rank is ``<= target = fresh_max * (1 + tolerance)`` the one with
the fewest moves wins (ties: the lower max). ``aligned`` always qualifies, so the result is never
worse than the fresh plan by more than ``tolerance``.
"""

from __future__ import annotations

import numpy as np

from eplb.policies.packing import (
    align_packs,
    expert_pack_count,
    pack_loads,
    phy2log_counts,
    replica_counts,
    replica_weights,
    swap_search,
)

__all__ = ["incremental_rows", "moves_rows", "repair_counts"]


def moves_rows(current: np.ndarray, new: np.ndarray, num_packs: int, num_experts: int) -> np.ndarray:
    """``[X]`` cross-pack copies to go from ``current`` to ``new``: one per (pack, expert) that ``new``
    puts on a pack not holding it under ``current`` (the rule of ``Placement.moves`` and the executor)."""
    home = expert_pack_count(current, num_experts, num_packs) > 0
    need = expert_pack_count(new, num_experts, num_packs) > 0
    return (need & ~home).sum(axis=(1, 2))


def _max_load(weight: np.ndarray, p2l: np.ndarray, num_packs: int) -> np.ndarray:
    c = phy2log_counts(p2l, weight.shape[1])
    return pack_loads(replica_weights(weight, c, p2l), num_packs).max(axis=1)


def repair_counts(weight: np.ndarray, current: np.ndarray, counts: np.ndarray, num_packs: int) -> np.ndarray:
    """Change ``current``'s replica counts to ``counts`` touching as few slots as possible.

    Args:
        weight: ``[X, E]`` loads.
        current: ``[X, S]`` phy2log; may use ``-1`` for slots that must be refilled (e.g. excluded ranks).
        counts: ``[X, E]`` wanted replica counts (rows sum to ``S``).

    Returns:
        ``[X, S]``: each expert keeps ``min(current, wanted)`` of its slots (dropping surplus replicas
        on the heaviest ranks first); the missing replicas fill the freed slots heaviest first, each
        into the freed slot on the lightest rank that does not hold its expert yet.
    """
    X, S = current.shape
    E = weight.shape[1]
    spr = S // num_packs
    rows = np.arange(X)
    pk = np.arange(S) // spr
    p2l = current.copy()
    valid = p2l >= 0
    safe = np.where(valid, p2l, 0)
    cur_cnt = np.zeros((X, E), dtype=np.int64)
    np.add.at(cur_cnt, (np.repeat(rows, S), safe.ravel()), valid.ravel().astype(np.int64))
    iw = np.where(valid, np.take_along_axis(weight / np.maximum(cur_cnt, 1), safe, axis=1), 0.0)
    load = pack_loads(iw, num_packs)
    # occurrence index of each slot within its expert, lightest rank first (those are kept)
    slot_load = load[:, pk]
    ekey = np.where(valid, safe, E)
    order = np.lexsort((slot_load, ekey), axis=1)
    sorted_e = np.take_along_axis(ekey, order, axis=1)
    cnt_ext = np.concatenate([cur_cnt, (~valid).sum(axis=1, keepdims=True)], axis=1)
    starts = np.cumsum(cnt_ext, axis=1) - cnt_ext
    occ_sorted = np.arange(S)[None, :] - np.take_along_axis(starts, sorted_e, axis=1)
    occ = np.empty_like(occ_sorted)
    np.put_along_axis(occ, order, occ_sorted, axis=1)
    want = np.take_along_axis(counts, safe, axis=1)
    drop = ~valid | (occ >= want)
    p2l[drop] = -1
    need = np.maximum(counts - np.minimum(cur_cnt, counts), 0)  # [X, E]
    kept = np.where(p2l >= 0, p2l, 0)
    iw = np.where(p2l >= 0, np.take_along_axis(weight / np.maximum(counts, 1), kept, axis=1), 0.0)
    load = pack_loads(iw, num_packs)
    has = np.zeros((X, E, num_packs), dtype=bool)
    m = p2l >= 0
    has[np.repeat(rows, S)[m.ravel()], p2l[m], np.tile(pk, X)[m.ravel()]] = True
    n_need = int(need.sum(axis=1).max()) if X else 0
    if n_need == 0:
        return p2l
    # list of needed replicas per row, heaviest first
    items = np.repeat(np.tile(np.arange(E), X), need.ravel())
    row_of = np.repeat(rows, need.sum(axis=1))
    per_rep = (weight / np.maximum(counts, 1))[row_of, items]
    pos = np.arange(items.size) - np.repeat(np.cumsum(need.sum(axis=1)) - need.sum(axis=1), need.sum(axis=1))
    tab_e = np.full((X, n_need), -1, dtype=np.int64)
    tab_w = np.full((X, n_need), -np.inf)
    tab_e[row_of, pos] = items
    tab_w[row_of, pos] = per_rep
    o = np.argsort(-tab_w, axis=1, kind="stable")
    tab_e = np.take_along_axis(tab_e, o, axis=1)
    tab_w = np.take_along_axis(tab_w, o, axis=1)
    for j in range(n_need):
        e = tab_e[:, j]
        live = e >= 0
        if not live.any():
            break
        r = rows[live]
        ej = e[live]
        free = p2l[r] < 0  # [r, S]
        ok = free & ~has[r[:, None], ej[:, None], pk[None, :]]
        use = np.where(ok.any(axis=1, keepdims=True), ok, free)
        slot = np.argmin(np.where(use, load[r][:, pk], np.inf), axis=1)
        p2l[r, slot] = ej
        load[r, pk[slot]] += tab_w[live, j]
        has[r, ej, pk[slot]] = True
    return p2l


def incremental_rows(
    weight: np.ndarray,
    current: np.ndarray,
    num_packs: int,
    fresh: np.ndarray,
    *,
    tolerance: float = 0.01,
    max_replicas: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Migration-aware plan for every row (see the module docstring).

    Args:
        weight: ``[X, E]`` loads.
        current: ``[X, S]`` current phy2log (``-1`` marks slots that must be refilled).
        num_packs: ``P`` ranks.
        fresh: ``[X, S]`` a fresh plan for ``weight`` (e.g. ``eplb``'s); sets the balance target.
        tolerance: accepted relative excess of the heaviest rank over the fresh plan's.
        max_replicas: cap used when recomputing replica counts.

    Returns:
        ``(phy2log [X, S], candidate index [X])`` with candidates 0 keep, 1 aligned, 2 repair, 3 swap.
    """
    X, S = current.shape
    E = weight.shape[1]
    rows = np.arange(X)
    complete: np.ndarray = np.asarray((current >= 0).all(axis=1))
    if complete.all():
        complete = complete & np.asarray((phy2log_counts(current, E) > 0).all(axis=1))
    cur_safe = np.where(current >= 0, current, 0)
    home = expert_pack_count(cur_safe, E, num_packs) > 0
    if not (current >= 0).all():
        pk = np.arange(S) // (S // num_packs)
        home[:] = False
        m = current >= 0
        home[np.repeat(rows, S)[m.ravel()], current[m], np.tile(pk, X)[m.ravel()]] = True
    fresh_max = _max_load(weight, fresh, num_packs)
    target = fresh_max * (1 + max(float(tolerance), 0.0)) * (1 + 1e-12)
    cands = []
    cands.append(np.where(complete[:, None], cur_safe, fresh))  # keep (invalid rows fall back to fresh)
    cands.append(align_packs(cur_safe, fresh, num_packs, E))
    counts = replica_counts(weight, S, max_replicas)
    rep = repair_counts(weight, current, counts, num_packs)
    cands.append(swap_search(weight, rep, num_packs, home=home, target=target))
    if complete.any():
        sw = swap_search(weight, cur_safe, num_packs, home=home, target=target, rows_mask=complete)
        cands.append(np.where(complete[:, None], sw, fresh))
    else:
        cands.append(cands[1])
    stack = np.stack(cands)  # [C, X, S]
    C = stack.shape[0]
    mx = np.stack([_max_load(weight, c, num_packs) for c in cands])  # [C, X]
    mv = np.stack([(~home[rows[:, None], c, (np.arange(S) // (S // num_packs))[None, :]]).sum(axis=1) for c in cands])
    ok = mx <= target[None, :]
    ok[0] &= complete
    if max_replicas is not None:
        for ci in range(C):
            ok[ci] &= (phy2log_counts(cands[ci], E) <= max_replicas).all(axis=1) | (ci == 1)
    key = np.where(ok, mv.astype(np.float64) + mx / np.maximum(target, 1e-300)[None, :] * 0.5, np.inf)
    pick = np.argmin(key, axis=0)
    return stack[pick, rows], pick
