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

from eplb.dispatch.kernel import HAVE_TRITON, plan_quotas_triton, rank_share_cum_triton
from eplb.dispatch.solver import balanced_quotas, slot_quotas
from eplb.dispatch.table import DispatchTable

__all__ = ["STRATEGIES", "assign_slots", "occurrence", "plan_quotas", "source_shares"]

STRATEGIES = ("local-first", "round-robin", "balanced")


def occurrence(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For flat expert ids ``[M]``: how many earlier entries chose the same expert (``0, 1, 2, ...`` per expert)."""
    M = ids.shape[0]
    sorted_ids, perm = torch.sort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    starts = torch.cumsum(counts, 0) - counts
    occ_sorted = torch.arange(M, device=ids.device) - starts[sorted_ids]
    occ = torch.empty_like(occ_sorted)
    occ[perm] = occ_sorted
    return occ


def plan_quotas(global_counts: torch.Tensor, table: DispatchTable, *, backend: str = "auto",
                **solver_options: int) -> torch.Tensor:
    """``[E, K]`` tokens each replica (slot ``table.log2phy[e, k]``) receives this step under balanced dispatch.

    ``global_counts`` ``[R, E]`` (or ``[E]`` totals). Deterministic integer arithmetic: identical on every
    rank and device. ``backend``: ``"torch"`` (:func:`~eplb.dispatch.solver.balanced_quotas`), ``"triton"``
    (:func:`~eplb.dispatch.kernel.balanced_quotas_triton`, one kernel, CUDA) or ``"auto"`` (Triton on CUDA when
    available); both give the same quotas. ``solver_options`` go to the solver (``frac_bits``, ``sweeps``, ...).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
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
        raise ValueError(f"topk_ids: expected a [tokens, top_k] integer tensor, got {getattr(topk_ids, 'shape', type(topk_ids))}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool or topk_ids.is_complex():
        raise ValueError(f"topk_ids: expected integer expert ids, got dtype {topk_ids.dtype}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown dispatch strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < table.num_ranks:
        raise ValueError(f"rank: expected an integer in [0, {table.num_ranks}), got {rank!r}")
    E = table.num_experts
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"topk_ids: expert ids must lie in [0, {E}), found {lo if lo < 0 else hi}")
    if strategy == "balanced":
        if global_counts is None:
            raise ValueError("global_counts: the 'balanced' strategy needs the per-(source rank, expert) counts "
                             f"of this step, a [{table.num_ranks}, {E}] tensor")
        if tuple(global_counts.shape) != (table.num_ranks, E):
            raise ValueError(f"global_counts: expected shape [{table.num_ranks}, {E}] (ranks, experts), "
                             f"got {list(global_counts.shape)}")


def assign_slots(topk_ids: torch.Tensor, table: DispatchTable, strategy: str = "local-first", *, rank: int,
                 global_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Physical slot of every (token, choice) routed on this rank.

    Args:
        topk_ids: ``[N, k]`` logical expert ids (any integer dtype) of this rank's tokens.
        table: the layer's :class:`DispatchTable` (same device as ``topk_ids``).
        strategy: ``"local-first"``, ``"round-robin"`` or ``"balanced"``.
        rank: this rank's index in the EP group.
        global_counts: ``[R, E]`` (source rank, expert) counts of this step over all ranks, this rank's row
            included (``"balanced"`` only; e.g. an ``all_gather`` of every rank's ``bincount``).

    Returns:
        ``[N, k]`` ``int64`` slot ids; slot ``s`` lives on rank ``s // table.slots_per_rank``. Every entry is a
        replica of its expert. Deterministic: with the same ``global_counts`` every rank's plan agrees,
        so the per-slot totals over all ranks equal :func:`plan_quotas`.
    """
    _check(topk_ids, table, strategy, rank, global_counts)
    ids = topk_ids.reshape(-1).to(torch.int64)
    if strategy == "local-first":
        return table.static_map[rank][ids].view(topk_ids.shape)
    occ = occurrence(ids, table.num_experts)
    if strategy == "round-robin":
        rep = torch.remainder(occ + rank, table.logcnt[ids])
        return table.log2phy[ids, rep].view(topk_ids.shape)
    assert global_counts is not None
    if global_counts.is_cuda and HAVE_TRITON:
        _, cum_e = rank_share_cum_triton(global_counts, table, rank)  # plan + this rank's shares: one kernel
    else:
        quotas = plan_quotas(global_counts, table)
        cum_e = torch.cumsum(source_shares(global_counts, quotas, table, rank), -1)  # [E, K]
    cum = cum_e[ids]  # [M, K]
    rep = (cum <= occ.unsqueeze(-1)).sum(-1)
    # tokens beyond this rank's announced count (inconsistent global_counts) fall back to round-robin
    over = rep >= table.logcnt[ids]
    rep = torch.where(over, torch.remainder(occ + rank, table.logcnt[ids]), rep)
    return table.log2phy[ids, rep].view(topk_ids.shape)
