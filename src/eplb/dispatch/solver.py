"""The balanced split: each replicated expert's tokens over its replicas, minimising the max rank load.

Problem (one step, one layer): expert ``e`` received ``c[e]`` tokens (token-expert pairs) and has
replicas on ranks ``rank(e, k)``. Choose integers ``q[e, k] >= 0`` with ``sum_k q[e, k] = c[e]``
minimising ``max_r load[r]``, ``load[r] = sum_{(e,k) on r} q[e, k]``. The LP relaxation's optimum
``T*`` is the per-step lower bound of a fixed placement; the integer optimum is ``ceil(T*)``
(a max-flow with integer capacities ``ceil(T*) - base`` is integral).

Two solvers live here:

* :func:`balanced_quotas` -- the fast one (pure torch, batched over any leading dimensions, CPU and
  CUDA, no host sync): block coordinate descent where a block is one replicated expert, whose
  tokens are water-filled exactly over its replicas' ranks given every other expert's split.
  Experts that share no rank are updated together (a colouring computed once per placement),
  so a sweep costs ``num_colors`` parallel updates. It first runs in fixed point (``frac_bits``
  binary digits below one token: a near-exact fractional optimum, since the max-load minimiser
  of this problem is also the minimiser of the sum of squared loads that block descent
  converges to), then rounds to whole tokens and finishes with whole-token sweeps. Each update
  never raises the max over the ranks it touches, so the result is never worse than its start
  (the uniform round-robin split), and the result is checked against that start (kept if it were
  better). All arithmetic is integer: CPU and GPU give identical results.
* :func:`lp_max_load` -- the exact LP optimum with HiGHS (reference and bound).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["balanced_quotas", "lp_max_load", "uniform_quotas", "waterfill"]

_BIG = 1 << 60


def _sorted_last(x: torch.Tensor) -> torch.Tensor:
    """Values of ``x`` sorted along the last dimension (numpy's sort on CPU tensors: several times faster than
    torch's on the short rows here; the values are the same)."""
    if x.device.type == "cpu" and not x.requires_grad:
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


def _min_last(x: torch.Tensor) -> torch.Tensor:
    """``x.amin(-1, keepdim=True)`` (numpy's reduction on CPU tensors, same values)."""
    if x.device.type == "cpu" and not x.requires_grad:
        return torch.from_numpy(x.numpy().min(axis=-1, keepdims=True))
    return torch.amin(x, -1, keepdim=True)


def uniform_quotas(counts: torch.Tensor, valid: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """``[..., E, K]`` whole-token round-robin split of ``counts`` ``[..., E]`` over the ``valid``
    ``[..., E, K]`` replicas : ``c // n`` each, the ``c % n`` extra tokens to replicas
    ``offset, offset + 1, ...`` (mod ``n``); padded replicas get 0."""
    vi = valid.to(torch.int64)
    n1 = vi.sum(-1).clamp(min=1)
    base = torch.div(counts, n1, rounding_mode="floor")
    rem = counts - base * n1
    k_idx = torch.cumsum(vi, -1) - 1  # index among the valid replicas
    shift = k_idx - (offset.unsqueeze(-1) if isinstance(offset, torch.Tensor) else offset)
    pos = torch.remainder(shift, n1.unsqueeze(-1))
    extra = (pos < rem.unsqueeze(-1)) & valid
    return (base.unsqueeze(-1) * valid + extra).to(torch.int64)


def waterfill(other: torch.Tensor, amount: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Exact whole-unit water-filling of ``amount`` ``[...]`` over levels ``other`` ``[..., K]``.

    Returns ``y`` ``[..., K]`` (``y >= 0``, 0 where not ``valid``, ``sum y = amount``) minimising
    ``max_k (other_k + y_k)`` over valid ``k``, filling the lowest levels first: every valid entry is
    raised to level ``H = floor(h*)`` (``h*`` the fractional water level) and the ``r < m`` units left
    over go to the first ``r`` valid entries at or below ``H`` (lowest index first). Integer tensors.
    ``h* = min_j (amount + sum of the j lowest levels) / j`` depends only on the multiset of levels.
    """
    o = other.masked_fill(~valid, _BIG)
    srt = _sorted_last(o)
    P = torch.cumsum(torch.where(srt < _BIG, srt, torch.zeros_like(srt)), -1)
    n = torch.arange(1, o.shape[-1] + 1, device=o.device)
    h = torch.div(amount.unsqueeze(-1) + P, n, rounding_mode="floor")
    h = torch.where(srt < _BIG, h, torch.full_like(h, _BIG))
    H = _min_last(h)
    y = (H - o).clamp(min=0) * valid
    rem = amount.unsqueeze(-1) - y.sum(-1, keepdim=True)
    elig = valid & (o <= H)
    order = torch.cumsum(elig.to(torch.int64), -1)
    return y + (elig & (order <= rem)).to(y.dtype)


def _sweeps(q: torch.Tensor, c: torch.Tensor, base: torch.Tensor, rr: torch.Tensor, valid: torch.Tensor,
            members: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` block-descent sweeps; a block is a fluid expert; one colour's experts (``members[..., col, :]``,
    sharing no rank) are water-filled together."""
    Kd = q.shape[-1]
    rr_flat = rr.flatten(-2)
    lead = q.shape[:-2]
    for _ in range(n):
        for col in range(members.shape[-2]):
            idx = members[..., col, :].expand(lead + members.shape[-1:])  # [..., Fc]
            idx_k = idx.unsqueeze(-1).expand(lead + (idx.shape[-1], Kd))
            loads = base.scatter_add(-1, rr_flat, q.flatten(-2))
            rr_c = rr.gather(-2, idx_k)
            q_c = q.gather(-2, idx_k)
            other = loads.gather(-1, rr_c.flatten(-2)).view(q_c.shape) - q_c
            y = waterfill(other, c.gather(-1, idx), valid.gather(-2, idx_k))
            q = q.scatter(-2, idx_k, y)
    return q


def balanced_quotas(
    counts: torch.Tensor,
    fl_expert: torch.Tensor,
    fl_rank: torch.Tensor,
    color_members: torch.Tensor,
    single_rank: torch.Tensor,
    num_ranks: int,
    *,
    frac_bits: int = 8,
    sweeps: int = 6,
    int_sweeps: int = 2,
) -> torch.Tensor:
    """Tokens of each fluid expert on each of its ranks, ``[..., F, Kd]`` (int64), (nearly) minimising the max rank load.

    Args:
        counts: ``[..., E]`` tokens per expert this step (whole numbers >= 0).
        fl_expert, fl_rank, color_members, single_rank: the compact solver view of
            :func:`eplb.dispatch.table.layer_tables` (``[..., F]``, ``[..., F, Kd]``, ``[..., C, Fc]``, ``[..., E]``;
            broadcastable against ``counts``' leading dimensions).
        num_ranks: ``R``.
        frac_bits: fixed-point bits below one token for the fractional phase (0 skips it).
        sweeps: block-descent sweeps of the fractional phase (each updates every colour once).
        int_sweeps: whole-token sweeps after rounding.

    Each row sums to its expert's count exactly; padded entries are 0.
    """
    c = counts.to(torch.int64)
    # numpy's broadcast of the shapes: torch.broadcast_shapes imports sympy on first use (~1 s, ~100 MB)
    lead = torch.Size(np.broadcast_shapes(c.shape[:-1], fl_rank.shape[:-2], single_rank.shape[:-1]))
    c = c.expand(lead + c.shape[-1:])
    fe = fl_expert.expand(lead + fl_expert.shape[-1:])
    valid = (fl_rank >= 0).expand(lead + fl_rank.shape[-2:])
    rr = fl_rank.clamp(min=0).expand(valid.shape)
    sr = single_rank.expand(c.shape)
    base = torch.zeros(lead + (num_ranks,), dtype=torch.int64, device=c.device)
    base.scatter_add_(-1, sr.clamp(min=0), c * (sr >= 0))
    cf = c.gather(-1, fe.clamp(min=0)) * (fe >= 0)  # [..., F]
    if color_members.shape[-2] == 0:
        return uniform_quotas(cf, valid)
    q0 = uniform_quotas(cf, valid)
    rr_flat = rr.flatten(-2)
    if frac_bits:
        scale = 1 << frac_bits
        q = _sweeps(uniform_quotas(cf * scale, valid), cf * scale, base * scale, rr, valid, color_members, sweeps)
        # whole tokens: floor, then each expert's remaining tokens to its largest fractions (ties: lower index)
        whole = torch.div(q, scale, rounding_mode="floor")
        frac = torch.where(valid, q - whole * scale, torch.full_like(q, -1))
        rem = cf - whole.sum(-1)
        order = torch.sort(-frac, dim=-1, stable=True).indices  # positions by fraction, descending
        got = torch.zeros_like(q).scatter_(-1, order, (torch.arange(q.shape[-1], device=q.device) < rem.unsqueeze(-1)).to(q.dtype).expand(q.shape).contiguous())
        q = whole + got * valid
    else:
        q = q0
    q = _sweeps(q, cf, base, rr, valid, color_members, int_sweeps)
    # never worse than the static (uniform) split it started from
    worse = base.scatter_add(-1, rr_flat, q.flatten(-2)).amax(-1) > base.scatter_add(-1, rr_flat, q0.flatten(-2)).amax(-1)
    return torch.where(worse[..., None, None], q0, q)


def slot_quotas(q: torch.Tensor, counts: torch.Tensor, slot_f: torch.Tensor, rep_kd: torch.Tensor,
                rep_mult: torch.Tensor, rep_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-replica quotas ``[..., E, K]`` (replica ``k`` = slot ``log2phy[e, k]``) from the fluid quotas
    ``q`` ``[..., F, Kd]`` and ``counts`` ``[..., E]`` (non-fluid experts keep all their tokens on their rank).
    A rank's quota is split evenly over the expert's replicas on that rank (extra tokens to the first)."""
    c = counts.to(torch.int64)
    lead = torch.Size(np.broadcast_shapes(q.shape[:-2], c.shape[:-1], rep_kd.shape[:-2]))  # numpy's: no sympy import
    E = c.shape[-1]
    qf = q.expand(lead + q.shape[-2:]).gather(-2, slot_f.clamp(min=0).expand(lead + (E,)).unsqueeze(-1).expand(lead + (E, q.shape[-1])))
    qr = qf.gather(-1, rep_kd.expand(lead + rep_kd.shape[-2:]))
    qr = torch.where((slot_f >= 0).unsqueeze(-1), qr, c.expand(lead + (E,)).unsqueeze(-1))
    base = torch.div(qr, rep_mult, rounding_mode="floor")
    return ((base + (rep_pos < qr - base * rep_mult)) * valid).to(torch.int64)


def lp_max_load(counts: np.ndarray, rep_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """Exact LP optimum ``T*`` (max rank load, fractional tokens) of independent problems, HiGHS via scipy.

    ``counts`` ``[B, E]`` (or ``[E]``), ``rep_rank`` ``[B, E, K]`` or ``[E, K]`` (``-1`` padded; the solver view
    of :func:`eplb.dispatch.table.layer_tables`). Returns ``[B]`` (or a 0-d array). All problems go into one
    block-diagonal LP (minimise the sum of the per-problem maxima, which minimises each).
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    c = np.asarray(counts, dtype=np.float64)
    one = c.ndim == 1
    c = np.atleast_2d(c)
    B, E = c.shape
    rr = np.broadcast_to(np.asarray(rep_rank), (B,) + np.asarray(rep_rank).shape[-2:])
    R = num_ranks
    valid = rr >= 0
    n_rep = valid.sum(-1)
    base = np.zeros((B, R))
    single = n_rep == 1
    bi, ei = np.nonzero(single)
    np.add.at(base, (bi, rr[bi, ei, np.argmax(valid[bi, ei], -1)]), c[bi, ei])
    fl = (n_rep > 1) & (c > 0)
    if not fl.any():
        out = base.max(-1)
        return out[0] if one else out
    b_idx, e_idx, k_idx = np.nonzero(valid & fl[..., None])
    ranks = rr[b_idx, e_idx, k_idx]
    nv = b_idx.size
    # variables: x (nv) then T_b (B); minimise sum_b T_b
    obj = np.concatenate([np.zeros(nv), np.ones(B)])
    row_of = np.full((B, E), -1)
    fb, fe = np.nonzero(fl)
    row_of[fb, fe] = np.arange(fb.size)
    a_eq = coo_matrix((np.ones(nv), (row_of[b_idx, e_idx], np.arange(nv))), shape=(fb.size, nv + B))
    rows = np.concatenate([b_idx * R + ranks, np.arange(B * R)])
    cols = np.concatenate([np.arange(nv), nv + np.repeat(np.arange(B), R)])
    vals = np.concatenate([np.ones(nv), -np.ones(B * R)])
    a_ub = coo_matrix((vals, (rows, cols)), shape=(B * R, nv + B))
    res = linprog(obj, A_ub=a_ub.tocsr(), b_ub=-base.ravel(), A_eq=a_eq.tocsr(), b_eq=c[fb, fe], bounds=(0, None),
                  method="highs")
    if res.status != 0:  # pragma: no cover - the LP is always feasible and bounded
        raise RuntimeError(f"LP failed: {res.message}")
    out = np.maximum(res.x[nv:], base.max(-1))
    return out[0] if one else out

