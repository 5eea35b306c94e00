"""One placement for several workloads (domains, tenants, prefill / decode): minimise the worst of them.

:func:`plan_multi` takes ``K`` load windows (``[T_k, L, E]`` or ``[L, E]`` each, same layers and experts) and
returns one :class:`~eplb.Placement`:

1. every step of every workload is normalised to total 1 per layer (so a workload with more tokens does not
   dominate, and a step's mean rank load is ``1 / R``); the objective of a placement on workload ``k`` is
   ``F_k = mean over its steps of R * max_r load_t(r)`` = 1 + its mean per-step imbalance (TensorRT-LLM's
   ``max / mean - 1``); the plan minimises ``max_k F_k`` per layer, keeping every ``F_k`` at or below no
   EPLB's where it can (``objective="auto"``);
2. candidates: ``policy`` planned on the combination (the mean over workloads of their normalised mean loads),
   ``policy`` planned on each workload alone, and (when ``R`` divides ``E``) no EPLB -- the contiguous
   placement, plus extra replicas of the hottest experts when ``S > E`` (:func:`contiguous_plus`); per layer the
   candidate with the lowest ``max_k F_k`` starts;
3. a local search (:func:`minimax_rows`), on ``max_k F_k`` and on ``max_k F_k / F_k(no EPLB)``: swaps of a slot of the rank most often at the per-step maximum in
   the currently worst workload with any other slot (no new colocated duplicate), scored exactly on every
   sampled step, applied while the objective drops. Replica counts are those of the start. The result is the
   per-layer lowest ``max_k F_k`` if that is not worse than no EPLB on any workload (layer mean, planning
   window), else per layer the lowest ``max_k F_k`` among the plans not worse than no EPLB, else the lowest ratio.

The objective is evaluated on at most ``max_steps`` evenly spaced steps per workload (all of them for the
final choice). Cost: the candidates' plans, then ``O(iters * L * (spr * S + cand * K * T'))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_layout, check_load
from eplb._counts import evenly_spaced
from eplb.errors import InputError
from eplb.placement import Placement
from eplb.policies import DEFAULT_POLICY, plan
from eplb.policies.packing import expert_pack_count, phy2log_counts, replica_counts

__all__ = ["contiguous_plus", "minimax_rows", "plan_multi", "workload_objective"]


def _normalise(loads: np.ndarray) -> np.ndarray:
    """``[T, L, E]`` with every (step, layer) summing to 1 (all-zero ones stay 0)."""
    tot = loads.sum(axis=2, keepdims=True)
    return np.where(tot > 0, loads / np.where(tot > 0, tot, 1.0), 0.0)


def _group_matrix(sizes: Sequence[int]) -> np.ndarray:
    """``[T, K]``: column ``k`` averages the steps of workload ``k``."""
    T = int(sum(sizes))
    G = np.zeros((T, len(sizes)))
    start = 0
    for k, n in enumerate(sizes):
        G[start:start + n, k] = 1.0 / n
        start += n
    return G


def workload_objective(loads: np.ndarray, G: np.ndarray, phy2log: np.ndarray, num_packs: int) -> np.ndarray:
    """``[X, K]``: ``R * mean_t max_r`` per workload (1 + mean per-step imbalance for normalised ``loads [T, X, E]``)."""
    T, X, E = loads.shape
    c = phy2log_counts(phy2log, E)
    per = loads / np.maximum(c, 1)[None]
    iw = np.take_along_axis(per, np.broadcast_to(phy2log, (T,) + phy2log.shape), axis=2)
    mx = iw.reshape(T, X, num_packs, -1).sum(-1).max(axis=2)  # [T, X]
    return num_packs * (mx.T @ G)


def minimax_rows(loads: np.ndarray, G: np.ndarray, start: np.ndarray, num_packs: int, *, max_iters: int | None = None,
                 cand: int = 64) -> np.ndarray:
    """Swap search lowering ``max_k (loads' per-step max, averaged by G[:, k])`` for every row.

    Args:
        loads: ``[T, X, E]`` per-step loads of all workloads, concatenated.
        G: ``[T, K]`` averaging weights of each workload's steps (:func:`_group_matrix`).
        start: ``[X, S]`` start placement (replica counts kept).
        num_packs: ``P`` ranks.
        cand: swaps per row scored exactly per iteration (prefiltered on the worst workload's mean loads).

    Returns ``[X, S]`` whose objective is ``<=`` the start's on every row. Vectorised over rows; the Python loop
    is over iterations (at most ``max_iters``, default ``min(2 S, 64)``).
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
    iters = min(2 * S, 64) if max_iters is None else int(max_iters)
    for _ in range(iters):
        if active.size == 0:
            break
        A = active
        a = A.size
        ar = np.arange(a)
        Rl = rl[A]  # [a, T, P]
        am = np.argmax(Rl, axis=2)
        vmax = Rl.max(axis=2)  # [a, T]
        gobj = vmax @ G  # [a, K]
        obj = gobj.max(axis=1)
        kw = np.argmax(gobj, axis=1)  # worst workload
        wt = G[:, kw].T  # [a, T] its step weights
        blame = np.zeros((a, num_packs))
        np.add.at(blame, (np.repeat(ar, T), am.ravel()), (vmax * wt).ravel())
        ra = np.argmax(blame, axis=1)
        top = np.argsort(-Rl, axis=2)[:, :, :3]
        topv = np.take_along_axis(Rl, top, axis=2)
        excl = np.zeros((a, T, num_packs))
        filled = np.zeros((a, T, num_packs), dtype=bool)
        for j in range(top.shape[2]):
            idx = top[:, :, j][:, :, None]
            okj = (idx != ra[:, None, None]) & (idx != np.arange(num_packs)[None, None, :]) & ~filled
            excl = np.where(okj, topv[:, :, j][:, :, None], excl)
            filled |= okj
        mpos = ra[:, None] * spr + local
        ae = p2l[A[:, None], mpos]
        be = p2l[A]
        aw = iw[A[:, None], :, mpos]  # [a, spr, T]
        # prefilter on the worst workload's mean loads: the swaps that best even the two ranks there
        am_mean = np.einsum("ajt,at->aj", aw, wt)
        bw_mean = np.einsum("ats,at->as", iw[A], wt)
        Rm = np.einsum("atp,at->ap", Rl, wt)
        dm = am_mean[:, :, None] - bw_mean[:, None, :]
        static = np.maximum(Rm[ar, ra][:, None, None] - dm, Rm[:, slot_pack][:, None, :] + dm)
        valid = np.broadcast_to(slot_pack[None, None, :] != ra[:, None, None], (a, spr, S)).copy()
        valid &= has[A[:, None], ae, :][:, :, slot_pack] == 0
        valid &= (has[A[:, None], be, ra[:, None]] == 0)[:, None, :]
        valid &= ae[:, :, None] != be[:, None, :]
        static = np.where(valid, static, np.inf).reshape(a, -1)
        K = min(cand, static.shape[1])
        sel = np.argpartition(static, K - 1, axis=1)[:, :K] if K < static.shape[1] else np.argsort(static, axis=1)
        sel_ok = np.isfinite(np.take_along_axis(static, sel, axis=1))
        sj, sk = sel // S, sel % S
        d = aw[ar[:, None], sj] - iw[A[:, None], :, sk]  # [a, K, T]
        pb = slot_pack[sk]
        newmax = np.maximum(np.maximum(Rl[ar, :, ra][:, None, :] - d, Rl[ar[:, None], :, pb] + d),
                            excl[ar[:, None], :, pb])
        newobj = (newmax @ G).max(axis=2)  # [a, K]
        key = np.where(sel_ok & (newobj < (obj - 1e-12 * np.maximum(obj, 1e-300))[:, None]), newobj, np.inf)
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
        wa, wb = iw[A, :, sa].copy(), iw[A, :, k].copy()
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


def contiguous_plus(weight: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """``[L, S]``: no EPLB (expert ``e`` on rank ``e // (E / R)``) plus ``(S - E) / R`` extra replicas per rank.

    Replica counts are :func:`~eplb.policies.packing.replica_counts` of ``weight [L, E]`` (at most ``R`` each);
    the extra copies, heaviest per replica first, go to the lightest rank with a free extra slot that does not
    hold the expert yet (else the lightest with a free slot). Loops over the ``S - E`` extra copies, vectorised
    over layers. Requires ``E % R == 0``.
    """
    L, E = weight.shape
    S, R = num_slots, num_ranks
    epr, xpr = E // R, (S - E) // R
    base = np.broadcast_to(np.arange(E), (L, E))
    if S == E:
        return np.array(base, dtype=np.int64)
    cnt = replica_counts(weight, S, R if E * R >= S else None)
    per = weight / cnt
    home = np.arange(E) // epr
    load = np.zeros((L, R))
    np.add.at(load, (slice(None), home), per)
    reps = cnt - 1  # [L, E] extra copies per expert
    # extras sorted by per-replica load, heaviest first: [L, S - E]
    order = np.argsort(-per, axis=1, kind="stable")
    ex = np.stack([np.repeat(order[x], reps[x, order[x]]) for x in range(L)]) if L else np.zeros((0, S - E), int)
    holds = np.zeros((L, E, R), dtype=bool)
    holds[:, np.arange(E), home] = True
    free = np.full((L, R), xpr)
    got = np.full((L, R, xpr), -1, dtype=np.int64)
    rows = np.arange(L)
    for j in range(S - E):
        e = ex[:, j]
        ok = free > 0
        pref = ok & ~holds[rows, e]
        cand = np.where(pref.any(axis=1)[:, None], pref, ok)
        r = np.argmin(np.where(cand, load, np.inf), axis=1)
        got[rows, r, xpr - free[rows, r]] = e
        free[rows, r] -= 1
        holds[rows, e, r] = True
        load[rows, r] += per[rows, e]
    out = np.concatenate([base.reshape(L, R, epr), got], axis=2).reshape(L, S)
    return out.astype(np.int64)


def step_imbalance_rows(loads: np.ndarray, phy2log: np.ndarray, num_packs: int) -> np.ndarray:
    """``[L]`` mean per-step imbalance (``max / mean - 1`` of rank load) of ``phy2log`` on ``loads [T, L, E]``."""
    from eplb.metrics import imbalance_ratio

    c = phy2log_counts(phy2log, loads.shape[2])
    iw = np.take_along_axis(loads / np.maximum(c, 1)[None], np.broadcast_to(phy2log, (loads.shape[0],) + phy2log.shape),
                            axis=2)
    return imbalance_ratio(iw.reshape(loads.shape[0], loads.shape[1], num_packs, -1).sum(-1)).mean(axis=0)


def _sample(loads: np.ndarray, max_steps: int) -> np.ndarray:
    T = loads.shape[0]
    steps = evenly_spaced(T, max_steps)
    return loads[steps]


def plan_multi(
    workloads: Sequence[ArrayLike],
    num_slots: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str = DEFAULT_POLICY,
    layer_ids: Sequence[int] = (),
    max_steps: int = 16,
    max_iters: int | None = None,
    objective: str = "auto",
    names: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> Placement:
    """One placement for all ``workloads`` minimising the worst workload's mean per-step imbalance (module docstring).

    Args:
        workloads: ``K >= 1`` load windows, ``[T_k, L, E]`` or ``[L, E]`` each (same ``L`` and ``E``).
        num_slots / num_ranks / num_nodes / num_groups / layer_ids: as :func:`eplb.plan`.
        policy: the policy that plans the candidates (default: the default policy); ``options`` go to it.
        max_steps: steps per workload the search scores (evenly spaced).
        max_iters: local-search iterations (default ``min(2 S, 64)``).
        objective: ``"max"``: minimise ``max_k F_k``; ``"ratio"``: minimise ``max_k F_k / F_k(no EPLB)`` (per layer;
            needs ``R | E``); ``"auto"`` (default): search both; the per-layer lowest ``max_k F_k`` when that is not
            worse than no EPLB on any workload (layer mean, planning window), else per layer the lowest ``max_k F_k``
            among the plans not worse than no EPLB there, else the lowest ratio.
        names: workload names for ``meta["workloads"]``.

    Returns:
        A :class:`Placement`; ``meta`` records ``policy`` (``"<policy>+multi"``), ``workloads`` and
        ``workload_imbalance`` (per workload, mean per-step imbalance on its whole window).
    """
    if len(workloads) == 0:
        raise InputError("workloads: need at least one load window")
    arrs = []
    for i, w in enumerate(workloads):
        a = check_load(w, f"workloads[{i}]", ndim=(2, 3))
        arrs.append(a[None] if a.ndim == 2 else a)
    L, E = arrs[0].shape[1:]
    for i, a in enumerate(arrs):
        if a.shape[1:] != (L, E):
            raise InputError(f"workloads[{i}]: {a.shape[1]} layers x {a.shape[2]} experts, but workloads[0] has "
                             f"{L} x {E}")
    S, R = int(num_slots), int(num_ranks)
    check_layout(E, S, R, num_nodes, num_groups=num_groups)
    if names and len(names) != len(arrs):
        raise InputError(f"names: {len(names)} names for {len(arrs)} workloads")
    norm = [_normalise(a) for a in arrs]
    combo = np.mean([n.mean(axis=0) for n in norm], axis=0)  # [L, E]
    kw = dict(num_nodes=num_nodes, num_groups=num_groups, policy=policy, layer_ids=layer_ids, **options)
    cands = [np.asarray(plan(combo, S, R, **kw).phy2log)]
    if len(arrs) > 1:
        cands += [np.asarray(plan(a, S, R, **kw).phy2log) for a in arrs]
    if E % R == 0:  # no EPLB (S == E), or no EPLB plus extra replicas
        cands.append(contiguous_plus(combo, S, R))
    if objective not in ("auto", "ratio", "max"):
        raise InputError(f"objective: expected 'auto', 'ratio' or 'max', got {objective!r}")
    G = _group_matrix([n.shape[0] for n in norm])
    full = np.concatenate(norm, axis=0)
    ref = None
    if objective != "max" and E % R == 0:  # F_k of no EPLB, per layer and workload
        none = np.asarray(Placement.contiguous(L, E, R).phy2log)
        ref = np.maximum(workload_objective(full, G, none, R), 1e-12)  # [L, K]
    modes = ["max", "ratio"] if objective == "auto" else [objective]
    found = []
    for mode in modes:
        if mode == "ratio" and ref is None:
            continue
        nk = [n / ref[None, :, k, None] for k, n in enumerate(norm)] if mode == "ratio" else norm
        sample = [_sample(n, max_steps) for n in nk]  # ratio: workload k's loads scaled by 1 / F_k(no EPLB)
        Gs = _group_matrix([x.shape[0] for x in sample])
        win = np.concatenate(sample, axis=0)
        obj = np.stack([workload_objective(win, Gs, c, R).max(axis=1) for c in cands])  # [C, L]
        start = np.stack(cands)[np.argmin(obj, axis=0), np.arange(L)]
        found.append(minimax_rows(win, Gs, start, R, max_iters=max_iters))
    # the final choice per layer on every step of every workload
    allc = [*found, *cands]
    F = np.stack([workload_objective(full, G, c, R) for c in allc])  # [C, L, K]
    fmax = F.max(axis=2)
    if ref is None:
        key = fmax
    else:
        rmax = (F / ref[None]).max(axis=2)
        if objective == "ratio":
            key = rmax
        else:  # auto: the lowest worst-workload F per layer if that is not worse than no EPLB on any workload
            # (averaged over layers, as the imbalance is reported); else per layer the lowest worst-workload F
            # among the plans not worse than no EPLB there, else the lowest ratio
            pick = np.argmin(fmax, axis=0)
            if np.all(F[pick, np.arange(L)].mean(axis=0) <= ref.mean(axis=0) * (1 + 1e-9)):
                key = fmax
            else:
                ok = rmax <= 1 + 1e-9
                key = np.where(ok.any(axis=0)[None], np.where(ok, fmax, np.inf), rmax)
    out = np.stack(allc)[np.argmin(key, axis=0), np.arange(L)]
    per_w = [float((step_imbalance_rows(a, out, R)).mean()) for a in arrs]
    info: dict[str, Any] = {"policy": f"{policy}+multi", "num_groups": int(num_groups), "workloads": list(names) or
                            [f"workload {i}" for i in range(len(arrs))],
                            "workload_imbalance": [round(float(v), 6) for v in per_w]}
    info.update(meta or {})
    return Placement(out, E, R, int(num_nodes), tuple(layer_ids), info)
