"""Per-step replication: copy hot experts into per-rank dynamic slots for one step and re-split the tokens.

A static placement gives every rank ``S / R`` slots. In per-step replication mode every rank also has ``D``
**dynamic slots**; each step and layer, from the step's exact counts, a deterministic planner (identical on every
rank: pure integer arithmetic on the all-gathered counts) chooses which experts to copy into which dynamic
slots (and from which rank), and how every expert's tokens are split over all its replicas, static and dynamic,
minimising the max rank load. Copies are bounded by a per-step transfer budget: each rank receives at most
``max_recv`` (<= ``D``) and sends at most ``max_send`` experts per layer, at most ``max_copies`` in all; with the
point-to-point time of one expert (:func:`copies_within`) a time budget becomes these counts.

The planner (:func:`plan_replication`) works on rank-level quotas ``Q[e, r]`` (tokens of expert ``e`` computed on
rank ``r``) and is a greedy descent on the max rank load. Each iteration takes the most loaded rank ``h``
(lowest index on ties) and, for every expert with tokens on ``h``, its best *free* move (to the least loaded
other rank already holding it) and its best *copy* (to the least loaded rank with a free dynamic slot that does
not hold it, if the expert has a static holder with send budget left and the step's copy budget is not spent);
a move of ``x`` tokens from ``h`` to rank ``t`` levels the pair: ``x = min(Q[e, h], (L_h - L_t) // 2)``. It
applies the largest free move, unless a copy moves strictly more tokens (ties: lowest expert id). It stops when
no move helps or after ``max_iters`` iterations. Every move keeps the max rank load from rising and strictly
lowers the sum of squared rank loads, so the loop terminates, and the result is never worse than the start.

The start is the static placement's split: ``"uniform"`` (each slot ``count / replicas``, remainder to the first
replicas; what the GPU kernel computes itself) or ``"balanced"`` (the per-step balanced split of
:func:`eplb.dispatch.split_counts`, so the result is never worse than static placement + balanced dispatch), or an
explicit ``[..., E, R]`` array.

Within a rank, an expert's tokens are split evenly over its static slots there (extra tokens to the first);
a dynamic slot is only ever added on a rank that does not hold the expert. Dynamic slot ``d`` of rank ``r``
is the ``d``-th copy that rank receives in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_load
from eplb.errors import InputError
from eplb.placement import Placement

__all__ = [
    "ReplicationPlan",
    "copies_within",
    "plan_replication",
    "replicated_rank_loads",
    "slot_tables",
    "slot_tokens",
    "static_holdings",
    "tolerance_q16",
    "uniform_start",
]

BIG = 1 << 30  # larger than any load the planner accepts (loads must stay below MAX_LOAD)
DEFAULT_TOLERANCE = 1 / 256  # stop once max rank load <= mean * (1 + 1/256): cuts the tail of tiny moves
MAX_LOAD = 1 << 24  # the GPU kernel packs (load, index) into one int32 key: load * 64 + index < 2**31


def tolerance_q16(tolerance: float) -> int:
    """``tolerance`` (a fraction of the mean rank load, in ``[0, 1]``) as the integer ``round(tolerance * 65536)``
    that the planner and its GPU kernel use."""
    t = float(tolerance)
    if not np.isfinite(t) or t < 0 or t > 1:
        raise InputError(f"tolerance: expected a fraction in [0, 1], got {tolerance!r}")
    return int(round(t * 65536))


def copies_within(budget_ms: float, copy_ms: float) -> int:
    """How many expert copies one rank's link can do in ``budget_ms`` when one copy takes ``copy_ms``."""
    if not np.isfinite(budget_ms) or budget_ms < 0:
        raise InputError(f"budget_ms: expected a finite time >= 0, got {budget_ms!r}")
    if not np.isfinite(copy_ms) or copy_ms <= 0:
        raise InputError(f"copy_ms: expected a finite time > 0, got {copy_ms!r}")
    return int(np.floor(budget_ms / copy_ms + 1e-9))


def static_holdings(placement: Placement) -> np.ndarray:
    """``[L, E, R]`` int64: how many static slots of rank ``r`` hold expert ``e`` (excluded ranks count 0
    for experts that have a replica elsewhere, as in :func:`eplb.dispatch.table.served_replicas`)."""
    from eplb.dispatch.table import served_replicas

    log2phy, _ = served_replicas(placement)
    L, E, _K = log2phy.shape
    out = np.zeros((L, E, placement.num_ranks), dtype=np.int64)
    li, ei, ki = np.nonzero(log2phy >= 0)
    np.add.at(out, (li, ei, log2phy[li, ei, ki] // placement.slots_per_rank), 1)
    return out


def uniform_start(counts: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """``[..., E, R]`` rank quotas of the static uniform split: each replica ``count // n`` tokens and the
    ``count % n`` left over to the first replicas in rank order (``n`` = replicas of the expert)."""
    c = np.asarray(counts, dtype=np.int64)[..., None]
    m = np.asarray(mult, dtype=np.int64)
    n = m.sum(-1, keepdims=True)
    if np.any((n == 0) & (c > 0)):
        raise InputError("counts: an expert with tokens has no replica in the placement")
    n1 = np.maximum(n, 1)
    base = c // n1
    rem = c - base * n1
    before = np.cumsum(m, -1) - m  # replicas on lower ranks
    extra = np.clip(rem - before, 0, m)
    return base * m + extra


@dataclass(frozen=True)
class ReplicationPlan:
    """One planned step (leading dims ``...`` of the counts, then ``L`` layers unless a single layer).

    Attributes:
        rank_tokens: ``[..., E, R]`` tokens of each expert computed on each rank (sums to the expert's count).
        dyn_expert: ``[..., R, D]`` expert copied into each dynamic slot (``-1``: unused).
        dyn_source: ``[..., R, D]`` rank the copy comes from (``-1``: unused).
        rank_loads: ``[..., R]`` tokens per rank.
        copies: ``[...]`` expert copies of the step; ``iterations``: ``[...]`` planner iterations used.
    """

    rank_tokens: np.ndarray
    dyn_expert: np.ndarray
    dyn_source: np.ndarray
    rank_loads: np.ndarray
    copies: np.ndarray
    iterations: np.ndarray

    @property
    def max_recv(self) -> np.ndarray:
        """``[...]`` most copies any rank receives."""
        return (self.dyn_expert >= 0).sum(-1).max(-1)

    @property
    def max_send(self) -> np.ndarray:
        """``[...]`` most copies any rank sends."""
        R = self.dyn_source.shape[-2]
        src = self.dyn_source.reshape(self.dyn_source.shape[:-2] + (-1,))
        hits = (src[..., None] == np.arange(R)).sum(-2)
        return hits.max(-1)


def _first_argmin_key(key: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Min along ``axis`` and the lowest index attaining it."""
    idx = np.argmin(key, axis=axis)  # numpy returns the first occurrence
    return np.take_along_axis(key, np.expand_dims(idx, axis), axis).squeeze(axis), idx


def plan_replication(
    counts: ArrayLike,
    mult: ArrayLike,
    dynamic_slots: int,
    *,
    max_recv: int | None = None,
    max_send: int | None = None,
    max_copies: int | None = None,
    start: str | ArrayLike = "uniform",
    max_iters: int | None = None,
    min_copy_gain: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    accept: ArrayLike | None = None,
) -> ReplicationPlan:
    """Plan one step's dynamic replicas and token split (vectorised over every leading dimension).

    Args:
        counts: ``[..., E]`` whole tokens per expert this step (e.g. ``[T, L, E]``; sum an ``[R, E]`` all-gather
            over its source ranks first).
        mult: ``[..., E, R]`` static slots of each expert on each rank (:func:`static_holdings`; e.g. ``[L, E, R]``),
            broadcast against ``counts``.
        dynamic_slots: ``D`` dynamic slots per rank (0: only free moves between static replicas).
        max_recv: copies a rank may receive per step (default ``D``; capped at ``D``).
        max_send: copies a rank may send per step (default: ``max_recv``).
        max_copies: copies in all per step and layer (default: no limit beyond the per-rank ones).
        start: ``"uniform"``, ``"balanced"`` (needs ``mult`` of a placement: use :func:`replicated_rank_loads`), or an
            ``[..., E, R]`` array of starting rank quotas (each expert's row summing to its count, zero where
            ``mult`` is 0).
        max_iters: iteration cap (default ``4 * R + 2 * R * D``).
        min_copy_gain: a copy must move at least this many tokens off the most loaded rank (default 1; larger
            values spend fewer copies, and link time, on small gains).
        tolerance: stop once the max rank load is within this fraction of the mean (``L_max * R <= total +
            slack``, ``slack = (total * round(tolerance * 65536)) >> 16`` in integers; default 1/256; 0: only when no
            move helps). Bounds the serial iterations where a good placement leaves many tiny moves.
        accept: ``[..., R]`` bool, ranks that may receive copies (default all; :func:`slot_tables` gives the
            placement's, excluding ``meta["excluded_ranks"]``).

    Returns a :class:`ReplicationPlan`. Identical on every call with the same input (integer arithmetic only;
    the GPU kernel :func:`eplb.dispatch.replication_kernel.plan_replication_gpu` gives the same plan).
    """
    c = check_load(counts, "counts", ndim=tuple(range(1, 8)))
    if np.any(c != np.round(c)):
        raise InputError("counts: per-step replication needs whole token counts")
    m = np.asarray(mult)
    if m.ndim < 2 or m.shape[-2] != c.shape[-1]:
        raise InputError(f"mult: expected [..., E={c.shape[-1]}, R], got shape {tuple(m.shape)}")
    if np.any(m < 0):
        raise InputError("mult: slot counts must be >= 0")
    D = int(dynamic_slots)
    if D < 0:
        raise InputError(f"dynamic_slots: expected an integer >= 0, got {dynamic_slots!r}")
    E, R = m.shape[-2:]
    if R > 64:
        raise InputError(f"mult: at most 64 ranks are supported, got {R}")
    recv = D if max_recv is None else min(int(max_recv), D)
    send = recv if max_send is None else int(max_send)
    total = BIG if max_copies is None else int(max_copies)
    if recv < 0 or send < 0 or total < 0:
        raise InputError("max_recv, max_send, max_copies: expected integers >= 0")
    iters = 4 * R + 2 * R * D if max_iters is None else int(max_iters)
    min_gain = max(int(min_copy_gain), 1)
    tol = tolerance_q16(tolerance)
    ci = c.astype(np.int64)
    lead = np.broadcast_shapes(ci.shape[:-1], m.shape[:-2])
    ci = np.broadcast_to(ci, lead + (E,)).reshape(-1, E)
    mm = np.broadcast_to(m.astype(np.int64), lead + (E, R)).reshape(-1, E, R)
    if isinstance(start, str):
        if start != "uniform":
            raise InputError(f"start: expected 'uniform' or an [..., E, R] array here, got {start!r}")
        Q = uniform_start(ci, mm)
    else:
        Q = np.broadcast_to(np.asarray(start, dtype=np.int64), lead + (E, R)).reshape(-1, E, R).copy()
        if np.any(Q < 0) or np.any(Q.sum(-1) != ci) or np.any((Q > 0) & (mm == 0)):
            raise InputError("start: rank quotas must be >= 0, sum to each expert's count and sit on its static ranks")
    B = Q.shape[0]
    acc = np.ones((B, R), dtype=bool) if accept is None else np.broadcast_to(
        np.asarray(accept, dtype=bool), lead + (R,)).reshape(B, R)
    L = Q.sum(1)  # [B, R]
    if B and L.max(initial=0) >= MAX_LOAD:
        raise InputError(f"counts: rank loads must stay below {MAX_LOAD} tokens per step and layer")
    Hs = mm > 0
    H = Hs.copy()
    nrecv = np.zeros((B, R), dtype=np.int64)
    nsend = np.zeros((B, R), dtype=np.int64)
    ncopy = np.zeros(B, dtype=np.int64)
    n_it = np.zeros(B, dtype=np.int64)
    dyn_e = np.full((B, R, max(D, 0)), -1, dtype=np.int64)
    dyn_s = np.full((B, R, max(D, 0)), -1, dtype=np.int64)
    rr = np.arange(R)
    act = np.arange(B)
    if tol:  # problems already within the tolerance make no move
        stop_at = L.sum(-1) + ((L.sum(-1) * tol) >> 16)  # [B] (the total never changes)
        act = act[L.max(-1) * R > stop_at]
    for _ in range(iters):
        if act.size == 0:
            break
        Qa, La, Ha = Q[act], L[act], H[act]
        n = act.size
        Lhi = La.max(-1)
        hi = np.argmax(La, -1)  # first max
        q = Qa[np.arange(n), :, hi]  # [n, E]
        # free moves: least loaded other holder
        ka = np.where(Ha & (rr != hi[:, None])[:, None, :], La[:, None, :], BIG)
        la, a = _first_argmin_key(ka, -1)
        ga = np.where((q > 0) & (la < BIG), np.minimum(q, (Lhi[:, None] - la) // 2), 0)
        # copies: least loaded rank with a free dynamic slot not holding the expert
        kb = np.where(~Ha & ((nrecv[act] < recv) & acc[act])[:, None, :], La[:, None, :], BIG)
        lb, b = _first_argmin_key(kb, -1)
        src_ok = (Hs[act] & (nsend[act] < send)[:, None, :]).any(-1)
        allow = src_ok & (ncopy[act] < total)[:, None]
        gb = np.where((q > 0) & (lb < BIG) & allow, np.minimum(q, (Lhi[:, None] - lb) // 2), 0)
        gb = np.where(gb >= min_gain, gb, 0)
        ea = np.argmax(ga, -1)
        GA = ga[np.arange(n), ea]
        eb = np.argmax(gb, -1)
        GB = gb[np.arange(n), eb]
        use_b = GB > GA
        moving = use_b | (GA > 0)
        e = np.where(use_b, eb, ea)
        x = np.where(use_b, GB, GA)
        dest = np.where(use_b, b[np.arange(n), eb], a[np.arange(n), ea])
        sel = np.nonzero(moving)[0]
        bi, ei, hi_s, de, xs = act[sel], e[sel], hi[sel], dest[sel], x[sel]
        Q[bi, ei, hi_s] -= xs
        Q[bi, ei, de] += xs
        L[bi, hi_s] -= xs
        L[bi, de] += xs
        n_it[bi] += 1
        cp = np.nonzero(use_b[sel])[0]
        if cp.size:
            cb, ce, cd = bi[cp], ei[cp], de[cp]
            skey = np.where(Hs[cb, ce] & (nsend[cb] < send), nsend[cb] * 64 + rr, BIG)
            src = np.argmin(skey, -1)
            nsend[cb, src] += 1
            dyn_e[cb, cd, nrecv[cb, cd]] = ce
            dyn_s[cb, cd, nrecv[cb, cd]] = src
            nrecv[cb, cd] += 1
            H[cb, ce, cd] = True
            ncopy[cb] += 1
        act = act[sel]
        if tol:
            act = act[L[act].max(-1) * R > stop_at[act]]
    return ReplicationPlan(
        rank_tokens=Q.reshape(lead + (E, R)),
        dyn_expert=dyn_e.reshape(lead + (R, max(D, 0))),
        dyn_source=dyn_s.reshape(lead + (R, max(D, 0))),
        rank_loads=L.reshape(lead + (R,)),
        copies=ncopy.reshape(lead),
        iterations=n_it.reshape(lead),
    )


def slot_tokens(plan: ReplicationPlan, placement: Placement) -> np.ndarray:
    """``[..., L, R, P + D]`` tokens of every slot of a plan over all ``L`` layers of ``placement``, rank-major: the
    ``P`` static slots of each rank in the placement's order, then its ``D`` dynamic slots. An expert's tokens on a
    rank are split evenly over its static slots there (the extra tokens to the first), like the balanced split."""
    Q = plan.rank_tokens  # [..., L, E, R]
    L, R = placement.num_layers, placement.num_ranks
    if Q.shape[-3:] != (L, placement.num_experts, R):
        raise InputError(f"plan: expected rank_tokens [..., {L}, {placement.num_experts}, {R}], got {Q.shape}")
    ex = placement.rank_experts()  # [L, R, P]
    lidx = np.arange(L)[:, None, None]
    ridx = np.arange(R)[None, :, None]
    q = Q[..., lidx, ex, ridx]  # [..., L, R, P] tokens of the slot's expert on its rank
    mult = static_holdings(placement)[lidx, ex, ridx]  # [L, R, P]
    same = ex[..., :, None] == ex[..., None, :]
    pos = np.tril(same, -1).sum(-1)  # earlier slots of the same expert on this rank
    base = q // np.maximum(mult, 1)
    static = np.where(mult > 0, base + (pos < q - base * np.maximum(mult, 1)), 0)
    de = plan.dyn_expert  # [..., L, R, D]
    dyn = np.where(de >= 0, np.take_along_axis(np.swapaxes(Q, -1, -2), np.clip(de, 0, None), -1), 0)
    return np.concatenate([static, dyn], -1)


def slot_tables(placement: Placement) -> dict[str, np.ndarray]:
    """Static per-slot tables of every layer for the GPU kernel (int32, ``[L, R, P]``): ``expert`` (the served expert
    of each static slot, ``-1`` if the slot's rank is excluded for it), and for the uniform start ``mult`` (the
    expert's slots on this rank at its first slot there, else 0), ``before`` (its served slots on lower ranks) and
    ``replicas`` (its served slots in all); ``holders`` (int64: bit ``r`` set when rank ``r`` serves the slot's
    expert, 0 for an unserved slot); and ``accept`` ``[L, R]``: 1 for ranks that may receive copies (not in
    ``meta["excluded_ranks"]``)."""
    mult = static_holdings(placement)  # [L, E, R]
    ex = placement.rank_experts()  # [L, R, P]
    L, R, P = ex.shape
    li = np.arange(L)[:, None, None]
    ri = np.arange(R)[None, :, None]
    m = mult[li, ex, ri]
    served = m > 0
    same = ex[..., :, None] == ex[..., None, :]
    first = ~np.tril(same, -1).any(-1)
    before = (np.cumsum(mult, -1) - mult)[li, ex, ri]
    bits = ((mult > 0).astype(np.uint64) << np.arange(R, dtype=np.uint64)).sum(-1, dtype=np.uint64).view(np.int64)
    return {
        "expert": np.where(served, ex, -1).astype(np.int32),
        "mult": np.where(served & first, m, 0).astype(np.int32),
        "before": before.astype(np.int32),
        "replicas": mult.sum(-1)[li, ex].astype(np.int32),
        "holders": np.where(served, bits[li, ex], 0).astype(np.int64),
        "accept": np.broadcast_to(~np.isin(np.arange(R), list(placement.meta.get("excluded_ranks", ()))),
                                  (L, R)).astype(np.int32),
    }


def balanced_start(counts: np.ndarray, placement: Placement) -> np.ndarray:
    """``[..., L, E, R]`` rank quotas of the static placement's balanced split (:func:`eplb.dispatch.split_counts`)."""
    from eplb.dispatch.split import split_counts

    slots = split_counts(counts, placement, "balanced")  # [..., L, S]
    L, S, R = placement.num_layers, placement.num_slots, placement.num_ranks
    E = placement.num_experts
    lead = slots.shape[:-2]
    flat = slots.reshape(-1, L, S).astype(np.int64)
    out = np.zeros((flat.shape[0], L, E, R), dtype=np.int64)
    li = np.repeat(np.arange(L), S)
    ex = placement.phy2log.ravel()
    rk = np.tile(placement.slot_rank(), L)
    for t in range(flat.shape[0]):
        np.add.at(out[t], (li, ex, rk), flat[t].ravel())
    return out.reshape(lead + (L, E, R))


def replicated_rank_loads(counts: ArrayLike, placement: Placement, dynamic_slots: int, *,
                          start: str = "balanced", **options: Any) -> tuple[np.ndarray, ReplicationPlan]:
    """``[..., L, R]`` rank loads of per-step replication on ``placement`` for counts ``[..., L, E]``, and the plan.

    ``start`` is ``"balanced"`` (default: never worse than the placement with balanced dispatch) or ``"uniform"``;
    ``options`` go to :func:`plan_replication` (``max_recv``, ``max_send``, ``max_copies``, ``max_iters``).
    """
    from eplb.dispatch.split import _check_counts

    c = _check_counts(counts, placement)
    mult = static_holdings(placement)
    if start == "balanced":
        st: Any = balanced_start(c, placement)
    elif start == "uniform":
        st = "uniform"
    else:
        raise InputError(f"start: expected 'balanced' or 'uniform', got {start!r}")
    options.setdefault("accept", slot_tables(placement)["accept"].astype(bool))
    plan = plan_replication(c, mult, dynamic_slots, start=st, **options)
    return plan.rank_loads, plan
