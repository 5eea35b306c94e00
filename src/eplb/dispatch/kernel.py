"""The balanced split as one Triton kernel (CUDA): the same integer algorithm as
:func:`eplb.dispatch.solver.balanced_quotas`, bit for bit, in a single launch per batch of layers.

One program solves one (step, layer) problem: the fluid experts' quotas ``[F, Kd]`` stay in
registers, the rank loads live in a small scratch row (L1/L2) updated in place (experts of one colour
share no rank, so one colour's stores never collide; integer atomics build the initial loads), and the
water-filling sorts each expert's ``Kd`` levels, so the whole block descent (``sweeps`` fractional and
``int_sweeps`` whole-token sweeps over all colours) is one launch. Used automatically by
:func:`eplb.dispatch.plan_quotas` on CUDA when Triton is importable.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HAVE_TRITON", "balanced_quotas_triton"]

try:  # pragma: no cover - exercised on GPU machines only
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:  # pragma: no cover - GPU only

    @triton.jit
    def _waterfill(o_raw, amount, valid, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
        # o_raw, valid: [BF, BK]; amount: [BF]. Same arithmetic as eplb.dispatch.solver.waterfill.
        o = tl.where(valid, o_raw, BIG)
        srt = tl.sort(o, dim=1)
        P = tl.cumsum(tl.where(srt < BIG, srt, 0), axis=1)
        n = (tl.arange(0, BLOCK_K) + 1).to(tl.int64)
        h = tl.where(srt < BIG, (amount[:, None] + P) // n[None, :], BIG)
        H = tl.min(h, axis=1)
        y = tl.where(valid, tl.maximum(H[:, None] - o, 0), 0)
        rem = amount - tl.sum(y, axis=1)
        elig = valid & (o <= H[:, None])
        order = tl.cumsum(elig.to(tl.int64), axis=1)
        return y + (elig & (order <= rem[:, None])).to(tl.int64)

    @triton.jit
    def _sweep(q, cf, rr, valid, color, loads_ptr, num_colors, n_sweeps, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
        # loads_ptr holds the current rank loads; experts of one colour share no rank, so the
        # stores of one colour's update never collide.
        for _s in range(n_sweeps):
            for col in range(num_colors):
                ld = tl.load(loads_ptr + rr, mask=valid, other=0)
                tl.debug_barrier()
                y = _waterfill(ld - q, cf, valid, BLOCK_K, BIG)
                upd = (color == col)[:, None] & valid
                tl.store(loads_ptr + rr, ld - q + y, mask=upd)
                q = tl.where((color == col)[:, None], y, q)
                tl.debug_barrier()
        return q

    @triton.jit
    def _balanced_kernel(
        c_ptr, fe_ptr, rr_ptr, col_ptr, sr_ptr, out_ptr, scratch_ptr,
        c_bstride, t_bstride_e, t_bstride_f, t_bstride_fk, o_bstride,
        E, F, Kd, R, num_colors, sweeps, int_sweeps,
        FRAC_BITS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BIG: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        offs_f = tl.arange(0, BLOCK_F)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        loads_ptr = scratch_ptr + b * BLOCK_R
        me = offs_e < E
        c = tl.load(c_ptr + b * c_bstride + offs_e, mask=me, other=0).to(tl.int64)
        sr = tl.load(sr_ptr + b * t_bstride_e + offs_e, mask=me, other=-1).to(tl.int32)
        # base loads: experts with a single rank
        tl.store(loads_ptr + offs_r, tl.zeros([BLOCK_R], dtype=tl.int64))
        tl.debug_barrier()
        tl.atomic_add(loads_ptr + tl.maximum(sr, 0), c, mask=me & (sr >= 0))
        tl.debug_barrier()
        base = tl.load(loads_ptr + offs_r)
        tl.debug_barrier()
        mf = offs_f < F
        fe = tl.load(fe_ptr + b * t_bstride_f + offs_f, mask=mf, other=-1).to(tl.int32)
        cf = tl.load(c_ptr + b * c_bstride + tl.maximum(fe, 0), mask=fe >= 0, other=0).to(tl.int64)
        color = tl.load(col_ptr + b * t_bstride_f + offs_f, mask=mf, other=-1).to(tl.int32)
        mfk = mf[:, None] & (offs_k < Kd)[None, :]
        rr = tl.load(rr_ptr + b * t_bstride_fk + offs_f[:, None] * Kd + offs_k[None, :], mask=mfk, other=-1).to(tl.int32)
        valid = rr >= 0
        rrc = tl.maximum(rr, 0)
        vi = valid.to(tl.int64)
        n1 = tl.maximum(tl.sum(vi, axis=1), 1)
        pos = tl.cumsum(vi, axis=1) - 1  # index among the valid replicas
        if FRAC_BITS > 0:
            amt = cf * (1 << FRAC_BITS)
        else:
            amt = cf
        # uniform start: c // n each, the c % n extra to the first valid replicas
        q = tl.where(valid, (amt // n1)[:, None] + (pos < (amt % n1)[:, None]).to(tl.int64), 0)
        q0 = tl.where(valid, (cf // n1)[:, None] + (pos < (cf % n1)[:, None]).to(tl.int64), 0)
        if num_colors > 0:
            # max rank load of the static (uniform) split, to never return anything worse
            tl.atomic_add(loads_ptr + rrc, q0, mask=valid)
            tl.debug_barrier()
            max0 = tl.max(tl.load(loads_ptr + offs_r), axis=0)
            if FRAC_BITS > 0:
                tl.debug_barrier()
                tl.store(loads_ptr + offs_r, base * (1 << FRAC_BITS))
                tl.debug_barrier()
                tl.atomic_add(loads_ptr + rrc, q, mask=valid)
                tl.debug_barrier()
                q = _sweep(q, amt, rrc, valid, color, loads_ptr, num_colors, sweeps, BLOCK_K, BIG)
                # whole tokens: floor, then the remaining tokens to the largest fractions (ties: lower index)
                whole = q >> FRAC_BITS
                frac = q - (whole << FRAC_BITS)
                rem = cf - tl.sum(whole, axis=1)
                key = tl.where(valid, frac * BLOCK_K + (BLOCK_K - 1 - offs_k)[None, :], -1)  # unique per row
                srt = tl.sort(key, dim=1, descending=True)
                thr = tl.sum(tl.where(offs_k[None, :] == (rem - 1)[:, None], srt, 0), axis=1)
                q = whole + (valid & (rem > 0)[:, None] & (key >= thr[:, None])).to(tl.int64)
            tl.debug_barrier()
            tl.store(loads_ptr + offs_r, base)
            tl.debug_barrier()
            tl.atomic_add(loads_ptr + rrc, q, mask=valid)
            tl.debug_barrier()
            q = _sweep(q, cf, rrc, valid, color, loads_ptr, num_colors, int_sweeps, BLOCK_K, BIG)
            max1 = tl.max(tl.load(loads_ptr + offs_r), axis=0)
            if max1 > max0:
                q = q0
        tl.store(out_ptr + b * o_bstride + offs_f[:, None] * Kd + offs_k[None, :], q, mask=mfk)


def balanced_quotas_triton(
    counts: torch.Tensor,
    fl_expert: torch.Tensor,
    fl_rank: torch.Tensor,
    fl_color: torch.Tensor,
    single_rank: torch.Tensor,
    num_colors: int,
    num_ranks: int,
    *,
    frac_bits: int = 8,
    sweeps: int = 6,
    int_sweeps: int = 2,
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton version of :func:`eplb.dispatch.solver.balanced_quotas` (same result, bit for bit).

    ``counts`` ``[B, E]`` or ``[E]``; tables ``[B, ...]`` (one per problem) or unbatched (shared);
    ``fl_color`` ``[..., F]`` is the colour of each fluid expert (``-1`` padding). Returns ``[B, F, Kd]``
    (or ``[F, Kd]``) int64 on the counts' device.
    """
    if not HAVE_TRITON:
        raise RuntimeError("balanced_quotas_triton: Triton is not installed")
    one = counts.ndim == 1
    c = counts.reshape(-1, counts.shape[-1]).contiguous()
    B, E = c.shape
    F, Kd = fl_rank.shape[-2:]
    batched_tables = fl_rank.ndim == 3
    fe = fl_expert.contiguous()
    rr = fl_rank.contiguous()
    col = fl_color.contiguous()
    sr = single_rank.contiguous()
    out = torch.empty((B, F, Kd), dtype=torch.int64, device=c.device)
    block_r = triton.next_power_of_2(num_ranks)
    scratch = torch.empty((B, block_r), dtype=torch.int64, device=c.device)
    meta: dict[str, Any] = {
        "FRAC_BITS": int(frac_bits),
        "BLOCK_E": triton.next_power_of_2(E),
        "BLOCK_F": triton.next_power_of_2(F),
        "BLOCK_K": triton.next_power_of_2(Kd),
        "BLOCK_R": block_r,
        "BIG": 1 << 60,
    }
    _balanced_kernel[(B,)](
        c, fe, rr, col, sr, out, scratch,
        E, E if batched_tables else 0, F if batched_tables else 0, F * Kd if batched_tables else 0, F * Kd,
        E, F, Kd, num_ranks, int(num_colors), int(sweeps), int(int_sweeps),
        num_warps=num_warps, **meta,
    )
    return out[0] if one else out
