"""Load metrics of placements: rank loads, imbalance ratio, balancedness.

Pure functions on arrays. Counts are ``[..., L, E]`` (any leading step dimensions); a slot's
load is its expert's count divided by the expert's replica count (uniform split), unless a
per-slot split is given.

* imbalance ratio = ``max / mean - 1`` of rank load (TensorRT-LLM), computed per step, then averaged;
* balancedness = ``mean / max`` of rank load (vLLM, SGLang);
* :func:`lower_bound` -- a proven lower bound on the max rank load any placement can reach, and
  :func:`optimality_gap` of a placement to it; :func:`experts_moved` between two placements;
* communication (:func:`comm_stats`): ranks / nodes a token is sent to (:func:`fanout_per_token`) and
  co-activated expert pairs split across nodes (:func:`cross_pairs`, from :func:`pair_counts` of top-k ids or
  a trace's ``cooccurrence``), under a uniform choice among an expert's replicas (:func:`replica_share`).

Ranks listed in ``placement.meta["excluded_ranks"]`` (failed / drained ranks, set by the eplb policies'
``excluded_ranks=`` option) serve nothing: their slots get no load and an expert's count is split over
its replicas on the other ranks only (:func:`served_slots`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_layout, check_load
from eplb.errors import InputError
from eplb.placement import Placement

__all__ = [
    "LEVELS",
    "balancedness",
    "comm_stats",
    "cooccurrence_pairs",
    "cross_pairs",
    "fanout_per_token",
    "experts_moved",
    "hierarchical_lower_bound",
    "imbalance_ratio",
    "lower_bound",
    "max_rank_load",
    "optimality_gap",
    "pair_counts",
    "rank_loads",
    "replica_share",
    "served_slots",
    "slot_loads",
    "slot_share",
    "uniform_rank_loads",
    "uniform_slot_loads",
    "step_imbalance",
]


def served_slots(placement: Placement) -> np.ndarray:
    """``[L, S]`` bool: slots that receive tokens.

    A slot on a rank in ``placement.meta["excluded_ranks"]`` (drained / failing) serves nothing when its
    expert has a replica on another rank; an expert held *only* by excluded ranks is still served there
    (soft exclusion: a drain in progress never leaves an expert without a slot). The dispatch tables
    (:func:`eplb.dispatch.table.served_replicas`) follow the same rule.
    """
    L, S = placement.num_layers, placement.num_slots
    ex = placement.meta.get("excluded_ranks") or ()
    if not len(ex):
        return np.ones((L, S), dtype=bool)
    ok_rank = ~np.isin(placement.slot_rank(), np.asarray(list(ex), dtype=np.int64))  # [S]
    held_ok = np.zeros((L, placement.num_experts), dtype=np.int64)
    np.add.at(held_ok, (np.repeat(np.arange(L), int(ok_rank.sum())), placement.phy2log[:, ok_rank].ravel()), 1)
    return ok_rank[None, :] | (np.take_along_axis(held_ok, placement.phy2log, axis=1) == 0)


def slot_share(placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """The uniform split as two flat ``[L * S]`` arrays: ``index`` (``l * E + expert`` of the expert slot
    ``l * S + s`` holds) and ``replicas`` (float64: its expert's served replicas, :func:`served_slots`;
    ``inf`` on a slot that serves nothing). Slot loads of ``c [..., L, E]`` are
    ``take(c.reshape(..., L * E), index) / replicas``: one gather, ``O(S)`` per step and layer."""
    L, E = placement.num_layers, placement.num_experts
    mask = served_slots(placement)  # [L, S]
    cnt = np.zeros((L, E), dtype=np.int64)
    np.add.at(cnt, (np.nonzero(mask)[0], placement.phy2log[mask]), 1)
    reps = np.take_along_axis(cnt, placement.phy2log, axis=1).astype(np.float64)  # every expert has >= 1 served
    reps[~mask] = np.inf
    index = (np.arange(L, dtype=np.int64)[:, None] * E + placement.phy2log).ravel()
    return index, reps.ravel()


def uniform_slot_loads(c: np.ndarray, placement: Placement,
                       share: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``[..., L, S]`` float64 slot loads of already validated counts ``c [..., L, E]`` (any numeric dtype, no
    float copy of ``c``); ``share``: :func:`slot_share` of ``placement`` (pass it to reuse)."""
    index, reps = slot_share(placement) if share is None else share
    lead = c.shape[:-2]
    L, E = placement.num_layers, placement.num_experts
    out = np.take(c.reshape(lead + (L * E,)), index, axis=-1) / reps
    return out.reshape(lead + (L, placement.num_slots))


def slot_loads(counts: ArrayLike, placement: Placement) -> np.ndarray:
    """``[..., L, S]`` load of each slot: count of its expert / served replicas of that expert."""
    c = check_load(counts, "counts", ndim=(2, 3, 4), num_experts=placement.num_experts)
    if c.shape[-2] != placement.num_layers:
        raise InputError(f"counts: {c.shape[-2]} layers, but the placement has {placement.num_layers}")
    return uniform_slot_loads(c, placement)


def uniform_rank_loads(c: np.ndarray, placement: Placement,
                       share: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``[..., L, R]`` rank loads of already validated counts (:func:`uniform_slot_loads` summed per rank)."""
    s = uniform_slot_loads(c, placement, share)
    return s.reshape(s.shape[:-1] + (placement.num_ranks, placement.slots_per_rank)).sum(-1)


def rank_loads(counts: ArrayLike, placement: Placement, *, share: tuple[np.ndarray, np.ndarray] | None = None
               ) -> np.ndarray:
    """``[..., L, R]`` load of each rank under uniform splitting over served replicas (:func:`served_slots`).

    One gather of each slot's expert count (``O(S)`` per step and layer; a product with an ``[L, E, R]``
    share matrix costs ``O(E R)``); ``share`` (:func:`slot_share` of ``placement``) may be passed to reuse it
    over many calls. Equals :func:`slot_loads` summed over each rank's slots.
    """
    c = check_load(counts, "counts", ndim=(2, 3, 4), num_experts=placement.num_experts)
    if c.shape[-2] != placement.num_layers:
        raise InputError(f"counts: {c.shape[-2]} layers, but the placement has {placement.num_layers}")
    return uniform_rank_loads(c, placement, share)


def imbalance_ratio(loads: ArrayLike, axis: int = -1) -> np.ndarray:
    """``max / mean - 1`` over ``axis`` (ranks); 0 where the mean is 0."""
    x = np.asarray(loads, dtype=np.float64)
    mean = x.mean(axis=axis)
    mx = x.max(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, mx / np.where(mean > 0, mean, 1.0) - 1.0, 0.0)


def balancedness(loads: ArrayLike, axis: int = -1) -> np.ndarray:
    """``mean / max`` over ``axis`` (ranks); 1 where the max is 0."""
    x = np.asarray(loads, dtype=np.float64)
    mx = x.max(axis=axis)
    return np.where(mx > 0, x.mean(axis=axis) / np.where(mx > 0, mx, 1.0), 1.0)


# --------------------------------------------------------------------------------- lower bound
def _lb_feasible(w: np.ndarray, T: np.ndarray, num_slots: int, num_ranks: int, max_m: int) -> np.ndarray:
    """``[X]`` the necessary condition ``N(T)`` of :func:`lower_bound` for rows ``w [X, E]``, thresholds ``T [X]``."""
    S, R = num_slots, num_ranks
    spr = S // R
    eps = 1e-9
    x = w / np.maximum(T, 1e-300)[:, None]
    lo = np.maximum(np.ceil(x * (1 - eps)), 1.0)  # fewest replicas keeping every replica <= T
    used = lo.sum(axis=1)
    ok = used <= S
    budget = S - used
    pos = w > 0
    for m in range(1, min(spr - 1, max_m) + 1):
        h = np.ceil(x * (m + 1) * (1 - eps))  # fewest replicas making every replica <= T/(m+1)
        counted = pos & (lo < h)
        base = np.where(counted, lo, 0.0).sum(axis=1)
        if not np.any(ok & (base > m * R)):
            continue
        # fractional knapsack: raising e to h_e costs h_e - lo_e replicas and stops counting its lo_e items
        cost = np.where(counted, h - lo, 0.0)
        val = np.where(counted, lo, 0.0)
        ratio = np.where(counted, val / np.where(counted, cost, 1.0), -1.0)
        order = np.argsort(-ratio, axis=1)
        cs = np.take_along_axis(cost, order, axis=1)
        vs = np.take_along_axis(val, order, axis=1)
        prev = np.cumsum(cs, axis=1) - cs
        room = np.clip(budget[:, None] - prev, 0.0, None)
        frac = np.where(cs > 0, np.clip(room / np.where(cs > 0, cs, 1.0), 0.0, 1.0), 0.0)
        ok &= base - (vs * frac).sum(axis=1) <= m * R
    return ok


def _lb_rows(w: np.ndarray, num_slots: int, num_ranks: int, *, iters: int = 32, max_m: int = 8) -> np.ndarray:
    """Lower bound for every row of ``w [X, E]`` (see :func:`lower_bound`)."""
    S, R = int(num_slots), int(num_ranks)
    W = w.sum(axis=1)
    res = W / R
    need = (W > 0) & ~_lb_feasible(w, res, S, R, max_m)
    if need.any():
        sub = w[need]
        lo_t = res[need].copy()  # N fails here (or it is W/R): a valid bound
        hi_t = W[need].copy()  # N(W) holds: one replica each, at most m replicas above W/(m+1)
        for _ in range(iters):
            mid = 0.5 * (lo_t + hi_t)
            f = _lb_feasible(sub, mid, S, R, max_m)
            lo_t = np.where(f, lo_t, mid)
            hi_t = np.where(f, mid, hi_t)
        res[need] = lo_t
    spr = S // R
    if spr > 1:
        res = np.maximum(res, _fill_bound(w, S, R, iters))
    return res


def _fill_bound(w: np.ndarray, num_slots: int, num_ranks: int, iters: int) -> np.ndarray:
    """``[X]`` (smallest possible largest replica) + (``spr - 1`` smallest possible other replicas)."""
    X, E = w.shape
    S, spr = num_slots, num_slots // num_ranks
    B = S - E
    # g = min over counts of max_e w_e / c_e: bisection on "sum_e max(1, ceil(w_e / T)) <= S"
    lo_t = np.zeros(X)
    hi_t = w.max(axis=1)
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        need = np.maximum(np.ceil(w / np.maximum(mid, 1e-300)[:, None] * (1 - 1e-9)), 1.0).sum(axis=1)
        f = need <= S
        lo_t = np.where(f, lo_t, mid)
        hi_t = np.where(f, mid, hi_t)
    # every replica of e is >= w_e / (B + 1) and e has at most B + 1 replicas
    k = spr - 1
    small = np.sort(w, axis=1) / (B + 1)
    reps = min(B + 1, k)
    fill = np.repeat(small, reps, axis=1)[:, :k].sum(axis=1) if k > 0 else np.zeros(X)
    return lo_t + fill


def lower_bound(counts: ArrayLike, num_slots: int, num_ranks: int) -> np.ndarray:
    """``[L]`` lower bound on the max rank load of ANY placement of ``num_slots`` slots on ``num_ranks`` ranks.

    Args:
        counts: ``[L, E]`` loads (tokens), or ``[T, L, E]`` per-step loads; then the bound is on the
            mean over steps of the per-step max rank load of any single (static) placement.
        num_slots: ``S`` slots per layer (``>= E``, multiple of ``num_ranks``).
        num_ranks: ``R``.

    Model: a placement gives expert ``e`` ``c_e >= 1`` replicas (``sum c_e = S``), each carrying
    ``w_e / c_e`` (uniform split), and every rank holds exactly ``spr = S / R`` replicas.

    Proof (``[L, E]``). Let ``T*`` be the optimal max rank load and ``c`` an optimal placement's counts.
    The bound returned is ``max(W / R, sup{T : N(T) fails})`` where ``N(T)`` is a necessary condition
    for "some placement has max rank load ``<= T``", monotone in ``T`` (a placement feasible for ``T`` is
    feasible for every larger ``T``), so ``N(T*)`` holds and every ``T`` with ``N(T)`` false is ``< T*``:

    * ``W / R``: the rank loads sum to ``W``, so the largest is at least the mean.
    * replica sizes: every replica lies on some rank, so ``w_e / c_e <= T`` i.e. ``c_e >= lo_e = max(1,
      ceil(w_e / T))``; ``N`` requires ``sum lo_e <= S`` (this alone gives the greedy replication bound
      ``min_c max_e w_e / c_e``).
    * fill: the rank holding the largest replica (``>= g = min_c max_e w_e / c_e``) holds ``spr - 1`` other
      replicas; a replica of ``e`` is ``>= w_e / (B + 1)`` (``B = S - E``, so ``c_e <= B + 1``) and ``e`` has
      at most ``B + 1`` of them, so they sum to at least the ``spr - 1`` smallest values of the multiset
      ``{w_e / (B + 1)}`` with multiplicity ``min(B + 1, spr - 1)``: ``T* >= g + that sum`` (tight when
      ``S == E``: the hottest expert plus the ``spr - 1`` coldest ones).
    * pigeonhole: a rank holding ``m + 1`` replicas each ``> T / (m + 1)`` has load ``> T``; so at most
      ``m`` such replicas per rank and at most ``m R`` in all, for ``m = 1 .. spr - 1``. Expert ``e``
      contributes ``c_e`` such replicas if ``c_e < h_e = ceil((m + 1) w_e / T)``, else none. For fixed
      ``m``, the fewest such replicas over all ``c >= lo`` with ``sum c <= S`` is at least the value of a
      fractional knapsack (start from ``sum lo_e [lo_e < h_e]``, buy savings ``lo_e`` at price ``h_e - lo_e``
      replicas from the budget ``S - sum lo``; any integer choice of ``c`` is such a purchase and
      fractional relaxation only lowers the minimum). ``N`` requires that value ``<= m R``.

    ``N(T)`` is evaluated in floating point with ``ceil`` of values shrunk by ``1e-9`` (relative), which
    only weakens it; the supremum is found by bisection keeping the lower end at a point where ``N``
    fails (or at ``W / R``), so the returned value is a valid bound up to that rounding margin.

    ``[T, L, E]``: for every step ``t`` and any static placement, ``max_r load_t(r) >= LB(counts_t)``
    (a placement of the window is a placement of each step), so the mean per-step max is ``>=
    mean_t LB(counts_t)``; also ``sum_t max_r load_t(r) >= max_r sum_t load_t(r) >= LB(sum_t counts_t)``.
    The bound is the larger of ``mean_t LB(counts_t)`` and ``LB(sum_t counts_t) / T``.
    """
    c = check_load(counts, "counts", ndim=(2, 3))
    check_layout(c.shape[-1], num_slots, num_ranks)
    if c.ndim == 2:
        return _lb_rows(c, num_slots, num_ranks)
    T, L, E = c.shape
    per_step = _lb_rows(c.reshape(T * L, E), num_slots, num_ranks).reshape(T, L).mean(axis=0)
    whole = _lb_rows(c.sum(axis=0), num_slots, num_ranks) / T
    return np.maximum(per_step, whole)


def max_rank_load(counts: ArrayLike, placement: Placement) -> np.ndarray:
    """``[L]`` max rank load: of ``[L, E]`` loads, or the mean over steps of the per-step max for ``[T, L, E]``."""
    rl = rank_loads(counts, placement)
    mx = rl.max(axis=-1)
    return mx if mx.ndim == 1 else mx.reshape(-1, placement.num_layers).mean(axis=0)


def optimality_gap(counts: ArrayLike, placement: Placement, *, bound: ArrayLike | None = None) -> np.ndarray:
    """``[L]`` ``max_rank_load / lower_bound - 1`` (0 where the bound is 0); an upper bound on the
    true relative distance to the optimal placement. ``bound``: the :func:`lower_bound` already
    computed for these counts and layout (not recomputed)."""
    mx = max_rank_load(counts, placement)
    lb = lower_bound(counts, placement.num_slots, placement.num_ranks) if bound is None else np.asarray(bound)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lb > 0, mx / np.where(lb > 0, lb, 1.0) - 1.0, 0.0)


def experts_moved(a: Placement, b: Placement) -> np.ndarray:
    """``[L]`` expert copies that must cross ranks to go from placement ``a`` to ``b`` (``a.moves(b)``)."""
    return a.moves(b)


def step_imbalance(counts: ArrayLike, placement: Placement) -> np.ndarray:
    """``[L]`` per-step imbalance ratio ``max / mean - 1`` over (served) ranks, averaged over steps.

    TensorRT-LLM's definition. ``counts`` is ``[T, L, E]`` (a ``[L, E]`` array is one step). Steps
    where a layer has no load count as 0.
    """
    c = check_load(counts, "counts", ndim=(2, 3), num_experts=placement.num_experts)
    if c.ndim == 2:
        c = c[None]
    rl = rank_loads(c, placement)  # [T, L, R]
    ex = placement.meta.get("excluded_ranks") or ()
    if len(ex):
        keep = np.setdiff1d(np.arange(placement.num_ranks), np.asarray(list(ex), dtype=np.int64))
        rl = rl[..., keep]
    return imbalance_ratio(rl, axis=-1).mean(axis=0)


def _equal_partitions(n: int, k: int, limit: int) -> np.ndarray | None:
    """All partitions of ``range(n)`` into ``k`` unordered blocks of ``n // k`` as ``[P, n]`` block labels
    (``None`` when there are more than ``limit``)."""
    size = n // k
    out: list[list[int]] = []

    def rec(label: list[int], counts: list[int], item: int, used: int) -> bool:
        if len(out) > limit:
            return False
        if item == n:
            out.append(label.copy())
            return True
        for b in range(min(used + 1, k)):
            if counts[b] < size:
                label[item] = b
                counts[b] += 1
                ok = rec(label, counts, item + 1, max(used, b + 1))
                counts[b] -= 1
                if not ok:
                    return False
        return True

    rec([0] * n, [0] * k, 0, 0)
    return None if len(out) > limit else np.asarray(out, dtype=np.int64)


def hierarchical_lower_bound(counts: ArrayLike, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                             *, max_partitions: int = 20000) -> np.ndarray:
    """``[L]`` lower bound on the max rank load of any placement that keeps every expert group, with all
    replicas of its experts, on one node, equal group count per node (DeepSeek's hierarchical layout).

    Proof: a node's ranks carry exactly the load of its groups, so its heaviest rank carries at least
    ``node load / (R / N)``; minimising the heaviest node over every partition of the groups into
    ``N`` equal blocks (enumerated exactly, up to ``max_partitions``) bounds every such placement. The
    global :func:`lower_bound` also holds, so the larger of the two is returned. ``counts`` ``[L, E]``
    (a ``[T, L, E]`` input is summed).
    """
    c = check_load(counts, "counts", ndim=(2, 3))
    if c.ndim == 3:
        c = c.sum(axis=0)
    L, E = c.shape
    check_layout(E, num_slots, num_ranks, num_nodes)
    if num_groups <= 0 or E % num_groups or num_groups % num_nodes:
        raise InputError(f"num_groups: {num_groups} groups must divide {E} experts and be divisible by "
                         f"num_nodes={num_nodes}")
    base = _lb_rows(c, num_slots, num_ranks)
    parts = _equal_partitions(num_groups, num_nodes, max_partitions)
    if parts is None or num_nodes == 1:
        return base
    gl = c.reshape(L, num_groups, E // num_groups).sum(-1)  # [L, G]
    onehot = parts[:, :, None] == np.arange(num_nodes)[None, None, :]  # [P, G, N]
    node = np.einsum("lg,pgn->lpn", gl, onehot.astype(np.float64))
    best = node.max(axis=2).min(axis=1) / (num_ranks // num_nodes)
    return np.maximum(base, best)


# ------------------------------------------------------------------ communication: fan-out, co-activated pairs
#: The units a token's experts can sit on: ``"rank"`` (GPU) or ``"node"`` (host; ranks ``n*(R/N)..``).
LEVELS = ("rank", "node")


def _units(placement: Placement, level: str) -> tuple[int, np.ndarray]:
    if level not in LEVELS:
        raise InputError(f"level: expected one of {list(LEVELS)}, got {level!r}")
    return (placement.num_ranks, placement.slot_rank()) if level == "rank" else (placement.num_nodes, placement.slot_node())


def replica_share(placement: Placement, level: str = "node") -> np.ndarray:
    """``[L, E, U]`` fraction of expert ``e``'s served replicas (:func:`served_slots`) on each rank / node ``u``.

    The replica-choice model of the communication metrics: a token's expert is computed by one of its served
    replicas chosen uniformly and independently of the token's other experts (the ``uniform`` split of
    :mod:`eplb.strategies`, the analytic model of every metric here). ``O(L S)``.
    """
    U, unit = _units(placement, level)
    L, E = placement.num_layers, placement.num_experts
    mask = served_slots(placement)
    share = np.zeros((L * E * U,))
    flat = (np.arange(L)[:, None] * E + placement.phy2log) * U + unit[None, :]
    np.add.at(share, flat[mask], 1.0)
    share = share.reshape(L, E, U)
    return share / share.sum(-1, keepdims=True)


def pair_counts(topk_ids: ArrayLike, num_experts: int, *, chunk: int = 1 << 16) -> np.ndarray:
    """``[L, E, E]`` co-activated pairs from the tokens' routed ids ``topk_ids [N, L, k]``.

    ``[l, i, j]`` (``i != j``) = tokens that chose both ``i`` and ``j`` at layer ``l``; symmetric, zero diagonal
    (the off-diagonal of a trace's ``cooccurrence`` summed over steps). A token listing an expert twice adds
    nothing for that pair. ``O(N L k^2)`` time (one ``bincount``), ``O(chunk L k^2 + L E^2)`` memory.
    """
    ids = np.asarray(topk_ids)
    if ids.ndim != 3 or ids.dtype.kind not in "iu":
        raise InputError(f"topk_ids: expected an integer [tokens, layers, k] array, got {ids.dtype} {ids.shape}")
    N, L, k = ids.shape
    E = int(num_experts)
    if ids.size and (ids.min() < 0 or ids.max() >= E):
        raise InputError(f"topk_ids: expert ids must lie in [0, {E})")
    a, b = np.triu_indices(k, 1)
    base = (np.arange(L, dtype=np.int64) * E)[None, :, None]
    out = np.zeros(L * E * E)
    for s in range(0, N, max(int(chunk), 1)):
        part = ids[s: s + chunk].astype(np.int64)
        flat = ((base + part[:, :, a]) * E + part[:, :, b]).ravel()
        out += np.bincount(flat, minlength=L * E * E)
    m = out.reshape(L, E, E)
    m = m + m.transpose(0, 2, 1)
    m[:, np.arange(E), np.arange(E)] = 0.0
    return m


def cooccurrence_pairs(cooccurrence: ArrayLike) -> np.ndarray:
    """``[L, E, E]`` co-activated pairs from a trace's ``cooccurrence`` (``[T, L, E, E]`` summed over steps, or
    ``[L, E, E]``): float64, symmetrised, diagonal set to 0 (the diagonal is the per-expert count)."""
    c = np.asarray(cooccurrence, dtype=np.float64)
    if c.ndim == 4:
        c = c.sum(0)
    if c.ndim != 3 or c.shape[1] != c.shape[2]:
        raise InputError(f"cooccurrence: expected [T, L, E, E] or [L, E, E], got shape {c.shape}")
    m = 0.5 * (c + c.transpose(0, 2, 1))
    m[:, np.arange(c.shape[1]), np.arange(c.shape[1])] = 0.0
    return m


def cross_pairs(placement: Placement, pairs: ArrayLike, *, level: str = "node", rule: str = "uniform") -> np.ndarray:
    """``[L]`` co-activated expert pairs whose two experts are computed on different nodes (ranks), summed over tokens.

    ``pairs [L, E, E]``: :func:`pair_counts` or :func:`cooccurrence_pairs` (symmetric, zero diagonal; each
    unordered pair ``{i, j}`` of a token's chosen experts counted once). A pair of one token is *cross-node*
    when its two experts run on different nodes, so the token's hidden state crosses nodes for at least one of
    them (a pair on one node is served by one inter-node transfer). With replicas:

    * ``rule="uniform"`` (default; the model of :func:`replica_share`, eplb's ``uniform`` split): each expert's
      replica is chosen uniformly and independently, so the pair crosses with probability
      ``1 - sum_u p_i(u) p_j(u)``; the value is the expectation ``sum_{i<j} pairs_ij (1 - p_i . p_j)``.
    * ``rule="colocated"``: a pair is local if some node holds a replica of both (a router that picks replicas
      to keep pairs together; an optimistic lower bound for the same placement).

    Without replicas the two rules agree and the count is exact. ``O(L E^2 U)``.
    """
    p = np.asarray(pairs, dtype=np.float64)
    L, E = placement.num_layers, placement.num_experts
    if p.shape != (L, E, E):
        raise InputError(f"pairs: expected shape {(L, E, E)}, got {p.shape}")
    share = replica_share(placement, level)
    if rule == "uniform":
        same = np.einsum("liu,lju->lij", share, share)
    elif rule == "colocated":
        h = (share > 0).astype(np.float64)
        same = (np.einsum("liu,lju->lij", h, h) > 0).astype(np.float64)
    else:
        raise InputError(f"rule: expected 'uniform' or 'colocated', got {rule!r}")
    return 0.5 * (p * (1.0 - same)).sum(axis=(1, 2))


def fanout_per_token(placement: Placement, *, topk_ids: np.ndarray | None = None, counts: ArrayLike | None = None,
                     top_k: int = 0, chunk: int = 1 << 22) -> dict[str, Any]:
    """Mean number of distinct ranks and nodes one token is dispatched to, per layer and averaged.

    With the tokens' routed ids (``topk_ids [N, L, k]``, e.g. TensorRT-LLM's raw statistics) the
    expectation is exact under a uniform choice among an expert's replicas (:func:`replica_share`): a unit
    ``u`` is touched with probability ``1 - prod_j (1 - share[id_j, u])``. With counts only (``[T, L, E]``
    and ``top_k``), each of a token's ``k`` choices is taken as independent with ``P(e) = c_e /
    (tokens * k)`` -- an approximation (real choices are distinct and correlated). Returns
    ``{"method": "topk_ids" | "counts", "ranks": [L], "nodes": [L], "mean_ranks", "mean_nodes"}``.
    The node bound of group-limited routing (e.g. DeepSeek-V3: at most 4 nodes) applies to ``nodes``.
    Vectorised over layers and tokens (``chunk`` gathered elements at a time): ``O(N L k U)``.
    """
    L, E = placement.num_layers, placement.num_experts
    out: dict[str, Any] = {}
    if topk_ids is None:
        if counts is None or top_k <= 0:
            raise InputError("fanout_per_token: needs topk_ids, or counts and top_k")
        tot = np.asarray(counts, dtype=np.float64).reshape(-1, L, E).sum(0)  # [L, E]
        tokens = tot.sum(-1, keepdims=True) / top_k
        q = np.clip(tot / np.maximum(tokens * top_k, 1e-300), 0.0, 1.0)  # per single choice
    else:
        ids = np.asarray(topk_ids)
        N, _, k = ids.shape
        lidx = np.arange(L)[None, :, None]
    for level in LEVELS:
        U, _ = _units(placement, level)
        share = replica_share(placement, level)  # [L, E, U]
        if topk_ids is None:
            miss = (1.0 - np.einsum("le,leu->lu", q, share)) ** top_k  # [L, U]: no choice lands on u
            per_layer = (1.0 - miss).sum(-1)
        else:
            per_layer = np.zeros(L)
            step = max(1, int(chunk) // max(L * k * U, 1))
            for s in range(0, N, step):
                miss = np.prod(1.0 - share[lidx, ids[s: s + step]], axis=2)  # [n, L, U]
                per_layer += (1.0 - miss).sum(axis=(0, 2))
            per_layer = per_layer / N if N else per_layer
        out[f"{level}s"] = per_layer
        out[f"mean_{level}s"] = float(per_layer.mean())
    out["method"] = "topk_ids" if topk_ids is not None else "counts"
    return out


def comm_stats(placement: Placement, *, topk_ids: np.ndarray | None = None, cooccurrence: ArrayLike | None = None,
               counts: ArrayLike | None = None, top_k: int = 0) -> dict[str, Any]:
    """Communication of ``placement`` per token: ranks / nodes touched and cross-node (cross-rank) pairs.

    The fan-out is :func:`fanout_per_token` (exact from ``topk_ids``, else expected from ``counts`` and
    ``top_k``). Co-activated pairs come from ``topk_ids`` (:func:`pair_counts`) or the trace's
    ``cooccurrence`` (:func:`cooccurrence_pairs`); with neither, the pair keys are absent. Tokens per layer:
    ``N`` with ``topk_ids``; else ``sum_i C_ii / k`` with ``k = top_k`` or, when unknown, inferred from the
    co-occurrence as ``1 + 2 sum_{i<j} C_ij / sum_i C_ii`` (exact when every token picks ``k`` distinct experts).

    Returns the fan-out keys plus ``cross_node_pairs`` / ``cross_rank_pairs`` (``[L]`` per token, uniform
    replica choice, :func:`cross_pairs`), their means (``mean_cross_node_pairs``, ...), ``cross_node_pairs_colocated``
    (rule ``"colocated"``), ``pairs_per_token`` ``[L]`` and ``cross_node_fraction`` (cross-node / all pairs).
    """
    L, E = placement.num_layers, placement.num_experts
    if topk_ids is not None:
        out = fanout_per_token(placement, topk_ids=topk_ids)
    elif counts is not None and top_k > 0:
        out = fanout_per_token(placement, counts=counts, top_k=top_k)
    else:
        out = {}
    if topk_ids is not None:
        pairs = pair_counts(topk_ids, E)
        tokens = np.full(L, float(np.asarray(topk_ids).shape[0]))
    elif cooccurrence is not None:
        co = np.asarray(cooccurrence, dtype=np.float64)
        co = co.sum(0) if co.ndim == 4 else co
        pairs = cooccurrence_pairs(co)
        diag = np.einsum("lii->l", co)
        k = np.full(L, float(top_k)) if top_k > 0 else 1.0 + pairs.sum((1, 2)) / np.maximum(diag, 1e-300)
        tokens = diag / np.maximum(k, 1e-300)
        out.setdefault("method", "cooccurrence")
    else:
        return out
    per = np.where(tokens > 0, 1.0 / np.maximum(tokens, 1e-300), 0.0)
    total = 0.5 * pairs.sum(axis=(1, 2))
    out["pairs_per_token"] = total * per
    for level in LEVELS:
        cp = cross_pairs(placement, pairs, level=level) * per
        out[f"cross_{level}_pairs"] = cp
        out[f"mean_cross_{level}_pairs"] = float(cp.mean())
    out["cross_node_pairs_colocated"] = cross_pairs(placement, pairs, level="node", rule="colocated") * per
    s = float(total.sum())
    out["cross_node_fraction"] = float((out["cross_node_pairs"] / np.where(per > 0, per, 1.0)).sum() / s) if s else 0.0
    return out
