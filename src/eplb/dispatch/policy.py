"""``"eplb-dispatch"``: a placement policy designed for balanced per-step dispatch.

Balanced dispatch (:func:`eplb.dispatch.plan_quotas`) moves the tokens of replicated ("fluid") experts
between their replicas every step, so the max rank load of a step is bounded below by each rank's
*non-fluid* load of that step and is otherwise limited only by how well the fluid replicas connect the
ranks. A placement for it should therefore

1. spread every replicated expert over distinct ranks (a co-located duplicate adds no flexibility),
2. give every rank a similar fluid volume (so any rank can shed load when its other experts spike),
3. pack the non-fluid experts so that each rank's per-step load, not only its mean, is balanced:
   experts that co-vary (hot in the same steps) go to different ranks.

The policy builds candidates for every layer at once -- replica counts by min-max apportionment (:func:`eplb.policies.packing.replica_counts`) of
``mean + alpha * std`` of the per-step loads for a few ``alpha`` (noisy experts earn replicas; optionally
also :func:`coverage_counts`), replicas packed with (2) and a covariance-aware LPT for (3) -- plus
DeepSeek's own placement, evaluates each
candidate by the balanced-dispatch max rank load on every step of the window (the same solver as the
runtime), and keeps, per layer, the best. Vectorised over layers; Python loops run over slots (items) and
candidates only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eplb._counts import evenly_spaced
from eplb.placement import Placement
from eplb.policies import register_policy
from eplb.policies.deepseek import rebalance_experts, to_float32
from eplb.policies.packing import replica_counts

__all__ = ["coverage_counts", "dispatch_aware_placement", "pack_for_dispatch", "window_balanced_max"]


def _capped_counts(weight: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """:func:`eplb.policies.packing.replica_counts` with at most one replica per rank (``num_ranks``), or
    ``ceil(S / E)`` where more slots than ``E x R`` need co-located replicas."""
    E = weight.shape[1]
    return replica_counts(weight, num_slots, max(num_ranks, -(-num_slots // E)))


def coverage_counts(loads: np.ndarray, num_slots: int, num_ranks: int, headroom: float = 1.0) -> np.ndarray:
    """``[L, E]`` replica counts that first give each expert enough replicas for its per-step peak
    (``ceil(p90 / (headroom * mean rank load))``) and then spend the remaining slots making as many other
    experts as possible replicated (two replicas), noisiest (largest per-step std) first, so that fluid
    replicas reach as many ranks as possible. Falls back to DeepSeek's rule when the peaks need more slots
    than there are."""
    T, L, E = loads.shape
    R = num_ranks
    rank_mean = loads.sum(-1).mean(0) / R  # [L]
    peak = np.quantile(loads, 0.9, axis=0) if T > 1 else loads[0]
    need = np.clip(np.ceil(peak / np.maximum(headroom * rank_mean[:, None], 1e-9)), 1, R).astype(np.int64)
    over = need.sum(1) > num_slots
    cnt = need.copy()
    std = loads.std(0) if T > 1 else loads[0]
    rows = np.arange(L)
    # spend remaining slots: +1 to the noisiest expert among those with the fewest replicas (items: slots)
    for _ in range(num_slots - E):
        left = num_slots - cnt.sum(1)
        fewest = cnt.min(1, keepdims=True)
        score = np.where((cnt == fewest) & (cnt < R), std + 1e-9 * loads.mean(0), -np.inf)
        best = np.argmax(score, axis=1)
        cnt[rows, best] += (left > 0).astype(np.int64)
    if over.any():
        cnt[over] = _capped_counts(loads.mean(0)[over] + 1e-12, num_slots, R)
    return cnt


def pack_for_dispatch(loads: np.ndarray, cnt: np.ndarray, num_ranks: int, num_nodes: int = 1) -> np.ndarray:
    """``phy2log`` ``[L, S]`` from per-step loads ``[T, L, E]`` and replica counts ``[L, E]``.

    Replicas of replicated experts first (heaviest expert first), each to the rank with the least fluid
    volume among those with a free slot and no replica of that expert yet; then the single-replica experts,
    heaviest first, each to the rank minimising ``sum_t (load_r[t] + x[t]) ** 2`` (per-step loads, fluid
    replicas counted at their uniform share), i.e. a covariance-aware LPT. Ties go to the lowest rank.
    """
    T, L, E = loads.shape
    R = num_ranks
    S = int(cnt[0].sum())
    spr = S // R
    mean = loads.mean(0)  # [L, E]
    fluid = cnt > 1
    # items: one per replica, fluid experts first, then by mean load (descending), then expert id
    order = np.lexsort((np.broadcast_to(np.arange(E), (L, E)), -mean, ~fluid), axis=-1)  # [L, E]
    cum = np.cumsum(np.take_along_axis(cnt, order, 1), axis=1)  # [L, E]
    j = (cum[:, :, None] <= np.arange(S)[None, None, :]).sum(1)  # [L, S]: which sorted expert item i belongs to
    items = np.take_along_axis(order, j, 1)
    share = loads / cnt[None]  # [T, L, E] uniform share of one replica
    rows = np.arange(L)
    free = np.full((L, R), spr, dtype=np.int64)
    has = np.zeros((L, R, E), dtype=bool)
    fluid_vol = np.zeros((L, R))
    rank_load = np.zeros((L, R, T))  # per-step load of each rank (fluid at uniform share)
    rank_mean = np.zeros((L, R))
    slot_of_rank = np.zeros((L, R), dtype=np.int64)
    phy2log = np.full((L, S), -1, dtype=np.int64)
    for i in range(S):  # items
        e = items[:, i]
        is_fl = fluid[rows, e]
        x = share[:, rows, e].T  # [L, T]
        ok = (free > 0) & ~has[rows, :, e]
        # no free rank without this expert (more replicas than ranks, or the free slots sit on ranks that
        # hold it already): a co-located replica, never a write past a full rank's slots
        ok = np.where(ok.any(1, keepdims=True), ok, free > 0)
        score = fluid_vol * (1 + 1e-9) + rank_mean * 1e-9
        if not is_fl.all():  # fluid items come first: the [L, R, T] product only for single-replica items
            score = np.where(is_fl[:, None], score, np.einsum("lrt,lt->lr", rank_load, x))
        r = np.argmin(np.where(ok, score, np.inf), axis=1)
        phy2log[rows, r * spr + slot_of_rank[rows, r]] = e
        slot_of_rank[rows, r] += 1
        free[rows, r] -= 1
        has[rows, r, e] = True
        fluid_vol[rows, r] += np.where(is_fl, mean[rows, e] / cnt[rows, e], 0.0)
        rank_load[rows, r] += x
        rank_mean[rows, r] += x.mean(-1)
    assert (phy2log >= 0).all(), "pack_for_dispatch: a slot was left unassigned"
    return phy2log


def _as_integer_counts(loads: np.ndarray) -> np.ndarray:
    if np.all(loads == np.round(loads)) and float(loads.max(initial=0.0)) <= 2**53:  # exact in int64
        return loads.astype(np.int64)
    per_step = loads.sum(-1).mean()
    scale = 4096.0 / per_step if per_step > 0 else 1.0
    return np.round(loads * scale).astype(np.int64)


def window_balanced_max(loads: np.ndarray, placement: Placement, **solver_options: int) -> np.ndarray:
    """``[L]`` mean over the window's steps of the max rank load under balanced dispatch."""
    from eplb.dispatch.split import split_rank_loads

    c = _as_integer_counts(loads)
    return np.asarray(split_rank_loads(c, placement, "balanced", **solver_options)).max(-1).mean(0)


def dispatch_aware_placement(
    loads: np.ndarray,
    num_slots: int,
    num_ranks: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    *,
    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    coverage_headrooms: Sequence[float] = (),
    include_deepseek: bool = True,
    solver_options: dict[str, int] | None = None,
    score_steps: int = 16,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Best per layer of the candidates (see the module docstring) on the window ``loads`` ``[T, L, E]``.

    Candidates are scored on at most ``score_steps`` evenly spaced steps of the window (the balanced solver is
    the dominant cost: ``O(C * T' * L * sweeps * colours * F * Kd)`` for ``C`` candidates on ``T'`` steps);
    packing costs ``O(C * S * L * R * T)``.

    Returns ``phy2log`` ``[L, S]`` and info: ``chosen`` (candidate name per layer) and ``window_max``
    (the chosen candidates' mean per-step balanced max load per layer).
    """
    T, L, E = loads.shape
    R = num_ranks
    mean = loads.mean(0)
    std = loads.std(0) if T > 1 else np.zeros_like(mean)
    cands: dict[str, np.ndarray] = {}
    cnts: dict[str, np.ndarray] = {}
    for a in alphas:
        w = mean + a * std
        w = np.where(w > 0, w, 1e-9)
        cnts[f"alpha={a:g}"] = _capped_counts(w, num_slots, R)
    for h in coverage_headrooms:
        cnts[f"coverage={h:g}"] = coverage_counts(loads, num_slots, R, h)
    if cnts:  # all count vectors packed in one batch of rows (one Python loop over the S items)
        packed = pack_for_dispatch(np.tile(loads, (1, len(cnts), 1)), np.concatenate(list(cnts.values())), R, num_nodes)
        for i, n in enumerate(cnts):
            cands[n] = packed[i * L:(i + 1) * L]
    if include_deepseek:
        ng = num_groups if E % num_groups == 0 else 1
        cands["deepseek"] = np.asarray(rebalance_experts(to_float32(mean), num_slots, ng, num_nodes, R)[0])
    opts = {"sweeps": 3, "int_sweeps": 1, **(solver_options or {})}
    names = list(cands)
    steps = evenly_spaced(T, score_steps)
    sub = loads[steps]
    scores = np.stack([window_balanced_max(sub, Placement(cands[n], E, R, num_nodes), **opts) for n in names])
    best = np.argmin(scores, axis=0)  # [L]
    stacked = np.stack([cands[n] for n in names])  # [C, L, S]
    phy2log = stacked[best, np.arange(L)]
    return phy2log, {"chosen": [names[b] for b in best], "window_max": scores[best, np.arange(L)].tolist()}


@register_policy("eplb-dispatch", options=("alphas", "coverage_headrooms", "include_deepseek", "solver_options",
                                          "score_steps"))
def _eplb_dispatch(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                   **options: Any) -> np.ndarray:
    """Placement for balanced per-step dispatch (:func:`dispatch_aware_placement`); options: ``alphas``,
    ``coverage_headrooms``, ``include_deepseek``, ``solver_options``, ``score_steps``."""
    known = {k: options[k] for k in ("alphas", "coverage_headrooms", "include_deepseek", "solver_options", "score_steps")
             if k in options}
    phy2log, _ = dispatch_aware_placement(np.asarray(loads, dtype=np.float64), num_slots, num_ranks, num_nodes,
                                          num_groups, **known)
    return phy2log
