"""Token -> physical slot assignment on one rank (pure torch; CPU and CUDA; no host sync on CUDA).

Strategies (``STRATEGIES``):

* ``"local-first"``: a fixed map per source rank (:attr:`DispatchTable.static_map`): the replica on this
  rank, else one on this node, else one spread deterministically over the replicas (SGLang's static dispatch).
* ``"round-robin"``: the ``m``-th token of expert ``e`` on rank ``r`` goes to replica ``(m + r) % replicas``.
* ``"balanced"``: from the all-gathered per-(source rank, expert) counts of this step, every rank computes
  the same global plan: per-replica quotas minimising the max rank load (:func:`plan_quotas`), then each
  source rank's share of every replica's quota (:func:`source_shares`: local replicas first, the rest in
  source-rank order, prefix sums). This rank's tokens fill its shares in order, so the per-replica totals
  over all ranks equal the planned quotas exactly.
"""

from __future__ import annotations

import torch

from eplb.dispatch.kernel import (
    HAVE_TRITON,
    balanced_send_matrix_triton,
    fused_token_slots,
    plan_quotas_triton,
    rank_share_cum_triton,
)
from eplb.dispatch.solver import balanced_quotas, slot_quotas
from eplb.dispatch.table import DispatchTable
from eplb.errors import InputError
from eplb.strategies import REPLICA_STRATEGIES

__all__ = ["STRATEGIES", "assign_slots", "balanced_replica", "balanced_token_slots", "occurrence", "plan_quotas",
           "send_matrix", "source_shares", "token_occurrence"]

STRATEGIES = REPLICA_STRATEGIES

#: On CUDA :func:`token_occurrence` uses the dense ``[E, N]`` count table up to this many entries (``int32``,
#: 16 MiB), a sort above it.
DENSE_OCCURRENCE_MAX = 1 << 22


def occurrence(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For flat expert ids ``[M]``: how many earlier entries chose the same expert (``0, 1, 2, ...`` per expert).

    ``int64`` ``[M]``, from a stable sort of the ids (``int32`` keys on CUDA: half the radix passes; ``int64``
    on CPU, where that measured faster). Ids must lie in ``[0, num_experts)``.
    """
    M = ids.shape[0]
    dev = ids.device
    dt = torch.int32 if ids.is_cuda else torch.int64
    sorted_ids, perm = torch.sort(ids.to(dt), stable=True)
    counts = torch.zeros(num_experts, dtype=dt, device=dev)
    counts.scatter_add_(0, ids.to(torch.int64), torch.ones(M, dtype=dt, device=dev))
    starts = torch.cumsum(counts, 0, dtype=dt) - counts
    occ_sorted = torch.arange(M, dtype=dt, device=dev) - starts[sorted_ids.to(torch.int64)]
    occ = torch.empty(M, dtype=torch.int64, device=dev)
    occ[perm] = occ_sorted.to(torch.int64)
    return occ


def token_occurrence(topk_ids: torch.Tensor, num_experts: int, method: str = "auto") -> torch.Tensor:
    """:func:`occurrence` of the row-major flattened ``[N, k]`` ids, as ``int64`` ``[N * k]``.

    ``method``: ``"sort"`` (:func:`occurrence`), ``"dense"`` (no sort: entry ``(n, j)``'s occurrence = tokens
    ``n' < n`` that chose its expert, a prefix sum along tokens of the ``int32`` per-(expert, token) counts
    ``[E, N]``, + earlier choices ``j' < j`` of token ``n`` with the same expert, ``[N, k, k]``, 0 for distinct
    top-k ids) or ``"auto"``: dense on CUDA while ``N * E <= DENSE_OCCURRENCE_MAX``, else the sort (on CPU the
    sort measured faster: torch's CPU prefix sum is slow). All give identical results. Ids ``int64`` in
    ``[0, num_experts)``.
    """
    if method not in ("auto", "sort", "dense"):
        raise InputError(f"method: expected 'auto', 'sort' or 'dense', got {method!r}")
    N, k = topk_ids.shape
    if method == "sort" or (method == "auto" and (not topk_ids.is_cuda or N * num_experts > DENSE_OCCURRENCE_MAX)):
        return occurrence(topk_ids.reshape(-1), num_experts)
    dev = topk_ids.device
    flat = torch.add(torch.arange(N, device=dev).unsqueeze(1), topk_ids, alpha=N)  # [N, k] place in [E, N]
    per = torch.zeros(num_experts * N, dtype=torch.int32, device=dev)
    per.scatter_add_(0, flat.view(-1), torch.ones(N * k, dtype=torch.int32, device=dev))
    incl = torch.cumsum(per.view(num_experts, N), 1, dtype=torch.int32).view(-1)  # tokens <= n per expert
    # the inclusive count minus this token's choices j' >= j of the same expert (itself included)
    jj = torch.arange(k, device=dev)
    at_or_after = (topk_ids.unsqueeze(2) == topk_ids.unsqueeze(1)) & (jj.view(1, k) >= jj.view(k, 1))
    return (incl[flat] - at_or_after.sum(-1)).view(-1)  # int32 - int64 -> int64


def balanced_replica(ids: torch.Tensor, occ: torch.Tensor, cum_e: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Replica index of each entry under this rank's running shares: ``(cum_e[ids] <= occ[:, None]).sum(-1)``.

    ``ids``, ``occ`` ``[M]`` int64: expert ids and :func:`occurrence` ranks (so ``occ < `` the expert's count in
    ``ids``); ``cum_e`` ``[E, K]`` non-decreasing along ``K``. Returns ``int64`` ``[M]``, without the ``[M, K]``
    gather. Clamping ``cum_e`` to ``[0, count]`` keeps every comparison with ``occ``. ``method``:

    * ``"search"``: one ``searchsorted`` of ``e * (M + 1) + occ`` in the flattened keys
      ``e * (M + 1) + clamp(cum_e, 0, M)`` (the experts' rows one after the other);
    * ``"count"``: with this rank's per-expert counts and their exclusive prefix sum ``start``, the replica
      boundaries ``start[e] + clamp(cum_e[e], 0, count[e])`` are marked in an ``[M + 1]`` histogram whose prefix
      sum at ``start[e] + occ`` counts ``e * K`` + the boundaries of ``e`` at or below ``occ`` (O(M + E K));
    * ``"auto"``: ``"search"`` on CUDA (fewer kernels), ``"count"`` on CPU (measured faster there).
    """
    if method not in ("auto", "search", "count"):
        raise InputError(f"method: expected 'auto', 'search' or 'count', got {method!r}")
    M = ids.shape[0]
    E, K = cum_e.shape
    dev = cum_e.device
    if method == "search" or (method == "auto" and cum_e.is_cuda):
        base = torch.arange(E, dtype=torch.int64, device=dev).unsqueeze(-1) * (M + 1)
        keys = (cum_e.clamp(0, M) + base).view(-1)
        idx = torch.searchsorted(keys, torch.add(occ, ids, alpha=M + 1), right=True)
        return torch.sub(idx, ids, alpha=K)
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    start = torch.cumsum(counts, 0) - counts
    bounds = start.unsqueeze(-1) + torch.minimum(cum_e.clamp(min=0), counts.unsqueeze(-1))  # [E, K] in [0, M]
    marks = torch.zeros(M + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, bounds.view(-1), torch.ones(E * K, dtype=torch.int64, device=dev))
    return torch.sub(torch.cumsum(marks, 0)[start[ids] + occ], ids, alpha=K)


def plan_quotas(global_counts: torch.Tensor, table: DispatchTable, *, backend: str = "auto",
                **solver_options: int) -> torch.Tensor:
    """``[E, K]`` tokens each replica (slot ``table.log2phy[e, k]``) receives this step under balanced dispatch.

    ``global_counts`` ``[R, E]`` (or ``[E]`` totals). Deterministic integer arithmetic: identical on every
    rank and device. ``backend``: ``"torch"`` (:func:`~eplb.dispatch.solver.balanced_quotas`), ``"triton"``
    (:func:`~eplb.dispatch.kernel.balanced_quotas_triton`, one kernel, CUDA) or ``"auto"`` (Triton on CUDA when
    available); both give the same quotas. ``solver_options`` go to the solver (``frac_bits``, ``sweeps``, ...).
    """
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend == "auto" and global_counts.is_cuda and HAVE_TRITON):
        return plan_quotas_triton(global_counts, table, **solver_options)  # one fused kernel
    c = global_counts.to(torch.int64)
    if c.ndim == 2:
        c = c.sum(0)
    q = balanced_quotas(c, table.fl_expert, table.fl_rank, table.color_members, table.single_rank,
                        table.num_ranks, **solver_options)
    return slot_quotas(q, c, table.slot_f, table.rep_kd, table.rep_mult, table.rep_pos, table.log2phy >= 0)


def source_shares(global_counts: torch.Tensor, quotas: torch.Tensor, table: DispatchTable,
                  rank: int | None = None) -> torch.Tensor:
    """How many tokens each source rank sends to each replica: ``[R, E, K]`` (or ``[E, K]`` for one ``rank``).

    First every replica takes what its own rank routed to the expert (up to its quota; several replicas on
    one rank fill in slot order); the remaining supply of each source rank and the remaining quota of each
    replica are then matched in order (source ranks ascending, replicas ascending: the north-west-corner
    rule, i.e. overlaps of prefix sums). Rows sum to ``global_counts`` and columns to ``quotas``.
    """
    g = global_counts.to(torch.int64)  # [R, E]
    q = quotas.to(torch.int64)  # [E, K]
    R = g.shape[0]
    valid = table.log2phy >= 0
    rk = torch.where(valid, table.slot_rank[table.log2phy.clamp(min=0)], torch.full_like(table.log2phy, -1))
    K = rk.shape[-1]
    kk = torch.arange(K, device=q.device)
    earlier = (rk.unsqueeze(-1) == rk.unsqueeze(-2)) & (kk.view(1, K) < kk.view(K, 1)) & valid.unsqueeze(-2)
    prior = (earlier * q.unsqueeze(-2)).sum(-1)  # quota of earlier replicas on the same rank
    g_at = g.t().gather(1, rk.clamp(min=0))  # [E, K] tokens the replica's own rank routed to e
    local = torch.minimum(g_at - prior, q).clamp(min=0) * valid
    used = torch.zeros(g.shape[1], R, dtype=torch.int64, device=g.device).scatter_add_(1, rk.clamp(min=0), local)
    s = g - used.t()  # [R, E] remaining supply
    u = q - local  # [E, K] remaining quota
    s_cum = torch.cumsum(s, 0)
    u_cum = torch.cumsum(u, -1)
    if rank is not None:
        s_hi, s_lo = s_cum[rank].unsqueeze(-1), (s_cum[rank] - s[rank]).unsqueeze(-1)  # [E, 1]
        amount = (torch.minimum(s_hi, u_cum) - torch.maximum(s_lo, u_cum - u)).clamp(min=0)
        return amount + local * (rk == rank)
    s_hi = s_cum.unsqueeze(-1)  # [R, E, 1]
    s_lo = (s_cum - s).unsqueeze(-1)
    amount = (torch.minimum(s_hi, u_cum.unsqueeze(0)) - torch.maximum(s_lo, (u_cum - u).unsqueeze(0))).clamp(min=0)
    own = rk.unsqueeze(0) == torch.arange(R, device=g.device).view(R, 1, 1)
    return amount + local.unsqueeze(0) * own


def _check(topk_ids: torch.Tensor, table: DispatchTable, strategy: str, rank: int,
           global_counts: torch.Tensor | None) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.ndim != 2:
        raise InputError(f"topk_ids: expected a [tokens, top_k] integer tensor, got {getattr(topk_ids, 'shape', type(topk_ids))}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool or topk_ids.is_complex():
        raise InputError(f"topk_ids: expected integer expert ids, got dtype {topk_ids.dtype}")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: unknown dispatch strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < table.num_ranks:
        raise InputError(f"rank: expected an integer in [0, {table.num_ranks}), got {rank!r}")
    E = table.num_experts
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= E:
            raise InputError(f"topk_ids: expert ids must lie in [0, {E}), found {lo if lo < 0 else hi}")
    if strategy == "balanced":
        if global_counts is None:
            raise InputError("global_counts: the 'balanced' strategy needs the per-(source rank, expert) counts "
                             f"of this step, a [{table.num_ranks}, {E}] tensor")
        if tuple(global_counts.shape) != (table.num_ranks, E):
            raise InputError(f"global_counts: expected shape [{table.num_ranks}, {E}] (ranks, experts), "
                             f"got {list(global_counts.shape)}")


def assign_slots(topk_ids: torch.Tensor, table: DispatchTable, strategy: str = "local-first", *, rank: int,
                 global_counts: torch.Tensor | None = None, backend: str = "auto",
                 quotas_out: torch.Tensor | None = None) -> torch.Tensor:
    """Physical slot of every (token, choice) routed on this rank.

    Args:
        topk_ids: ``[N, k]`` logical expert ids (any integer dtype) of this rank's tokens.
        table: the layer's :class:`DispatchTable` (same device as ``topk_ids``).
        strategy: ``"local-first"``, ``"round-robin"`` or ``"balanced"``.
        rank: this rank's index in the EP group.
        global_counts: ``[R, E]`` (source rank, expert) counts of this step over all ranks, this rank's row
            included (``"balanced"`` only; e.g. an ``all_gather`` of every rank's ``bincount``).
        backend: ``"torch"`` (the reference, any device), ``"triton"`` (:func:`~eplb.dispatch.kernel.fused_token_slots`:
            balanced in two kernel launches, round-robin in one) or ``"auto"`` (Triton on CUDA when available).
            Both give identical slots. On CUDA the ids are not range-checked (that would sync with the host):
            they must lie in ``[0, E)``.
        quotas_out: ``"balanced"`` only, optional: an ``[E, K]`` int64 tensor on the table's device that receives
            the step's per-replica quotas (== :func:`plan_quotas`), so that :func:`send_matrix` (``quotas=``)
            reuses this plan instead of solving it again.

    Returns:
        ``[N, k]`` ``int64`` slot ids; slot ``s`` lives on rank ``s // table.slots_per_rank``. Every entry is a
        replica of its expert. Deterministic: with the same ``global_counts`` every rank's plan agrees,
        so the per-slot totals over all ranks equal :func:`plan_quotas`.
    """
    _check(topk_ids, table, strategy, rank, global_counts)
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if quotas_out is not None:
        K = table.log2phy.shape[1]
        if strategy != "balanced":
            raise InputError(f"quotas_out: only the 'balanced' strategy has a plan, got strategy {strategy!r}")
        if (tuple(quotas_out.shape) != (table.num_experts, K) or quotas_out.dtype != torch.int64
                or not quotas_out.is_contiguous() or quotas_out.device != table.log2phy.device):
            raise InputError(f"quotas_out: expected a contiguous [{table.num_experts}, {K}] int64 tensor on "
                             f"{table.log2phy.device}, got {list(quotas_out.shape)} {quotas_out.dtype} on {quotas_out.device}")
    if strategy != "local-first" and (backend == "triton" or (backend == "auto" and topk_ids.is_cuda and HAVE_TRITON)):
        return fused_token_slots(topk_ids, table, strategy, rank, global_counts, quotas_out=quotas_out)
    ids2 = topk_ids.to(torch.int64)
    ids = ids2.reshape(-1)
    if strategy == "local-first":
        return table.static_map[rank][ids].view(topk_ids.shape)
    occ = token_occurrence(ids2, table.num_experts)
    if strategy == "round-robin":
        rep = torch.remainder(occ + rank, table.logcnt[ids])
        return table.log2phy[ids, rep].view(topk_ids.shape)
    assert global_counts is not None
    if global_counts.is_cuda and HAVE_TRITON:
        quotas, cum_e = rank_share_cum_triton(global_counts, table, rank)  # plan + this rank's shares: one kernel
    else:
        quotas = plan_quotas(global_counts, table)
        cum_e = torch.cumsum(source_shares(global_counts, quotas, table, rank), -1)  # [E, K]
    if quotas_out is not None:
        quotas_out.copy_(quotas)
    return balanced_token_slots(ids2, table, rank, cum_e, occ)


def balanced_token_slots(topk_ids: torch.Tensor, table: DispatchTable, rank: int, cum_e: torch.Tensor,
                         occ: torch.Tensor | None = None) -> torch.Tensor:
    """The token side of balanced dispatch: ``[N, k]`` int64 slots from this rank's running shares.

    ``topk_ids`` ``[N, k]`` int64 expert ids; ``cum_e`` ``[E, K]`` = ``cumsum(source_shares(..., rank), -1)``;
    ``occ`` (optional) = :func:`token_occurrence` of ``topk_ids``. The ``m``-th entry of expert ``e`` goes to
    the first replica ``j`` with ``m < cum_e[e, j]``; entries beyond this rank's shares (inconsistent
    ``global_counts``) fall back to round-robin.
    """
    ids = topk_ids.reshape(-1)
    if occ is None:
        occ = token_occurrence(topk_ids, table.num_experts)
    rep = balanced_replica(ids, occ, cum_e)  # == (cum_e[ids] <= occ[:, None]).sum(-1)
    cnt = table.logcnt[ids]
    rep = torch.where(rep >= cnt, torch.remainder(occ + rank, cnt), rep)
    return table.log2phy.reshape(-1)[torch.add(rep, ids, alpha=table.log2phy.shape[1])].view(topk_ids.shape)


def send_matrix(global_counts: torch.Tensor, table: DispatchTable, strategy: str,
                quotas: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``[R, S]`` int64: rows every source rank sends to every physical slot this step, from the step's
    ``[R, E]`` (source rank, expert) counts alone (no host sync; any device).

    Row ``r`` equals the per-slot counts of rank ``r``'s :func:`assign_slots` under ``strategy`` whenever
    ``global_counts[r]`` are the counts of its ids, so every rank of an EP group learns the whole exchange
    (what it receives from each source for each of its slots) from one ``all_gather`` of the counts:
    ``local-first`` through :attr:`DispatchTable.static_map`; ``round-robin``: the ``m``-th token of expert
    ``e`` on rank ``r`` goes to replica ``(m + r) % n``, so replica ``j`` gets ``c // n + ((j - r) % n < c % n)``;
    ``balanced``: :func:`source_shares` of :func:`plan_quotas` (or of ``quotas``, the ``[E, K]`` plan of this
    step already solved, e.g. by :func:`assign_slots`' ``quotas_out``: one plan per step instead of two).
    ``backend`` (balanced): ``"torch"`` (the reference), ``"triton"``
    (:func:`~eplb.dispatch.kernel.balanced_send_matrix_triton`, one launch, equal entry for entry), ``"auto"``
    (Triton on CUDA when importable).
    """
    if backend not in ("auto", "torch", "triton"):
        raise InputError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: unknown dispatch strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    g = global_counts.to(torch.int64)
    R, E = g.shape
    S = table.num_slots
    out = torch.zeros(R, S, dtype=torch.int64, device=g.device)
    if strategy == "local-first":
        return out.scatter_add_(1, table.static_map, g)
    K = table.log2phy.shape[1]
    if strategy == "round-robin":
        n = table.logcnt.clamp(min=1).view(1, E, 1)
        j = torch.arange(K, device=g.device).view(1, 1, K)
        r = torch.arange(R, device=g.device).view(R, 1, 1)
        c = g.unsqueeze(-1)
        per = torch.div(c, n, rounding_mode="floor") + (torch.remainder(j - r, n) < torch.remainder(c, n)).to(torch.int64)
    else:
        q = plan_quotas(g, table, backend="torch" if backend == "torch" else "auto") if quotas is None else quotas
        if backend == "triton" or (backend == "auto" and g.is_cuda and HAVE_TRITON):
            return balanced_send_matrix_triton(g, table, q)
        per = source_shares(g, q, table)  # [R, E, K]
    valid = (table.log2phy >= 0).unsqueeze(0)
    per = per * valid
    idx = table.log2phy.clamp(min=0).reshape(1, E * K).expand(R, E * K)
    return out.scatter_add_(1, idx, per.reshape(R, E * K))
