"""The per-step replication planner as one Triton kernel launch (CUDA; CUDA-graph capturable).

Same integer algorithm as :func:`eplb.dispatch.replication.plan_replication` with ``start="uniform"``, bit for
bit. One program plans one (step, layer) problem on the slot view: the expert and tokens of every slot of every
rank (``[R, P + D]``, static then dynamic slots) stay in registers, an expert's tokens on a rank in its first slot
there until a final even split, and per slot the bit masks (int64) of the ranks holding its expert, all and static
replicas (``holders`` of :func:`eplb.dispatch.replication.slot_tables`; updated on every copy). An iteration looks
only at the most loaded rank's ``P + D`` slots: its holder masks expand to a ``[P + D, R]`` view against the rank
loads, so one iteration is a chain of six reductions (most loaded rank; its slot row; least loaded holder and
receiver per slot; best move; copy source) with no memory round trip. Rank loads and copy counters are ``[R]``
vectors; every ties-to-lowest-index choice is one reduction of a packed key (``load * 64 + rank`` in int32, hence
the planner's limits: at most 64 ranks and rank loads below ``2**24``; ``gain << 40 | (65535 - expert) << 8 | rank``
in int64 for the move, so fewer than 65536 experts). The loop runs while a move helps, at most ``max_iters``
times, so a launch is one kernel with no host synchronisation.

Also runs under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which the tests use where no GPU is.
"""

from __future__ import annotations

import torch

from eplb.dispatch.replication import BIG, DEFAULT_TOLERANCE, MAX_LOAD, tolerance_q16
from eplb.errors import InputError

__all__ = ["HAVE_TRITON", "plan_replication_gpu"]

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["one"])
    def _replication_slot_kernel(
        c_ptr, x_ptr, m_ptr, bf_ptr, n_ptr, acc_ptr, hm_ptr, st_ptr, de_ptr, ds_ptr, l_ptr, info_ptr,
        E, R, P, D, LM, recv, send, total, max_iters, min_gain, tol, one,
        BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, KEYBIG: tl.constexpr,
    ):
        # One layout for everything: [BLOCK_J, BLOCK_R] tensors, slot j (rows: static, then dynamic) of rank r
        # (columns), and [1, BLOCK_R] rank vectors / [BLOCK_J, 1] slot vectors / [1, 1] scalars cut from it, so
        # the loop has no layout conversion. With one warp, ranks lie across the lanes and slots in a thread: a
        # reduction over ranks is one warp-reduce instruction per row, one over slots stays in the thread, and the
        # loop has no shared memory and no barrier; measured on an H200, 4 warps (the default) are still faster
        # (the warp-reduce results serialise through uniform registers).
        b = tl.program_id(0)
        layer = b % LM
        PD = P + D
        r1 = tl.arange(0, BLOCK_R)[None, :]  # [1, BR]
        j1 = tl.arange(0, BLOCK_J)[:, None]  # [BJ, 1]
        rv = r1 < R
        # rank bit masks as two int32 halves (ranks 0-31, 32-63): a warp reduces an int32 in one instruction
        r_lo = r1 < 32
        rb = tl.full([1, BLOCK_R], 1, tl.int32) << (r1 % 32)
        rb_lo = tl.where(r_lo, rb, 0)
        rb_hi = tl.where(r_lo, 0, rb)
        sv = rv & (j1 < P)
        # `one` (= 1, not specialised) hides that the tables are contiguous along j, so the loads keep the default
        # layout (ranks across lanes) instead of one with slots across lanes
        sidx = layer * R * P + r1 * P + j1 * one
        X = tl.load(x_ptr + sidx, mask=sv, other=-1)  # expert of each slot (-1: empty or unserved)
        m = tl.load(m_ptr + sidx, mask=sv, other=0)
        bf = tl.load(bf_ptr + sidx, mask=sv, other=0)
        n = tl.maximum(tl.load(n_ptr + sidx, mask=sv, other=1), 1)
        hm = tl.load(hm_ptr + sidx, mask=sv, other=0)  # bit masks of the ranks holding the slot's expert statically
        S_lo = (hm & 0xFFFFFFFF).to(tl.int32)
        S_hi = (hm >> 32).to(tl.int32)
        M_lo = S_lo  # ... and in any slot
        M_hi = S_hi
        c = tl.load(c_ptr + b * E + tl.maximum(X, 0), mask=sv & (X >= 0), other=0).to(tl.int32)
        base = c // n
        # tokens: an expert's tokens on a rank sit in its first slot there (`first`) until the final even split
        T = base * m + tl.minimum(tl.maximum(c - base * n - bf, 0), m)
        first = (m > 0) | (j1 >= P)
        L = tl.sum(T, axis=0, keep_dims=True)  # [1, BR] rank loads
        acc = tl.load(acc_ptr + layer * R + r1, mask=rv, other=0) > 0
        DS = tl.full([BLOCK_J, BLOCK_R], -1, tl.int32)  # source rank of each dynamic slot
        nrecv = tl.zeros([1, BLOCK_R], dtype=tl.int32)
        nsend = tl.zeros([1, BLOCK_R], dtype=tl.int32)
        sm_lo = tl.sum(tl.where(rv & (send > 0), rb_lo, 0), axis=1, keep_dims=True)  # ranks that may send
        sm_hi = tl.sum(tl.where(rv & (send > 0), rb_hi, 0), axis=1, keep_dims=True)
        tot = tl.sum(L, axis=1, keep_dims=True).to(tl.int64)  # [1, 1]
        stop_at = tot + ((tot * tol) >> 16)  # stop once max load * R <= stop_at (tol = 0: only when no move helps)
        ncopy = tl.zeros([1, 1], dtype=tl.int32)
        it = tl.zeros([1, 1], dtype=tl.int32)
        pend = tl.zeros([1, 1], dtype=tl.int32) > 0  # the last move was a copy whose source is not chosen yet
        pse_lo = tl.zeros([1, 1], dtype=tl.int32)  # its expert's static holders
        pse_hi = tl.zeros([1, 1], dtype=tl.int32)
        pnew = tl.zeros([BLOCK_J, BLOCK_R], dtype=tl.int32) > 0  # its new slot
        go = max_iters > 0
        while go:
            # the previous copy's source (static holder with the fewest sends, lowest rank), here so that it
            # overlaps this iteration's first reductions, which need only the loads
            sk = tl.min(tl.where((((pse_lo & rb_lo) | (pse_hi & rb_hi)) != 0) & (nsend < send) & rv,
                                 nsend * 64 + r1, KEYBIG), axis=1, keep_dims=True)
            src = sk % 64
            nsend = nsend + ((r1 == src) & pend).to(tl.int32)
            DS = tl.where(pnew & pend, src, DS)
            full = pend & (sk // 64 + 1 >= send)
            sbit = tl.full([1, 1], 1, tl.int32) << (src % 32)
            sm_lo = tl.where(full & (src < 32), sm_lo & ~sbit, sm_lo)
            sm_hi = tl.where(full & (src >= 32), sm_hi & ~sbit, sm_hi)
            # most loaded rank (lowest index on ties) and its slots
            kh = tl.max(tl.where(rv, L * 64 + (63 - r1), -1), axis=1, keep_dims=True)  # [1, 1]
            Lhi = kh // 64
            hi = 63 - kh % 64
            colhi = r1 == hi
            eh = tl.max(tl.where(colhi, X, -1), axis=1, keep_dims=True)  # [BJ, 1] experts of rank hi's slots
            th = tl.sum(tl.where(colhi, T, 0), axis=1, keep_dims=True)
            # one column is selected, so the sum is that column's bits
            mh_lo = tl.sum(tl.where(colhi, M_lo, 0), axis=1, keep_dims=True)
            mh_hi = tl.sum(tl.where(colhi, M_hi, 0), axis=1, keep_dims=True)
            sh_lo = tl.sum(tl.where(colhi, S_lo, 0), axis=1, keep_dims=True)
            sh_hi = tl.sum(tl.where(colhi, S_hi, 0), axis=1, keep_dims=True)
            hold = ((tl.where(r_lo, mh_lo, mh_hi) >> (r1 % 32)) & 1) != 0  # [BJ, BR]: rank r holds expert eh[j]
            ehv = (eh >= 0) & (th > 0)
            Lk = L * 64 + r1
            ka = tl.min(tl.where(hold & (r1 != hi) & rv, Lk, KEYBIG), axis=1, keep_dims=True)  # [BJ, 1]
            okr = rv & acc & (nrecv < recv)
            kb = tl.min(tl.where((~hold) & okr, Lk, KEYBIG), axis=1, keep_dims=True)
            src_ok = ((sh_lo & sm_lo) | (sh_hi & sm_hi)) != 0
            ga = tl.where(ehv & (ka < KEYBIG), tl.minimum(th, (Lhi - ka // 64) // 2), 0)
            gb = tl.where(ehv & (kb < KEYBIG) & src_ok & (ncopy < total), tl.minimum(th, (Lhi - kb // 64) // 2), 0)
            gb = tl.where(gb >= min_gain, gb, 0)
            # one key per candidate: gain | free move (wins ties) | lowest expert | slot | destination
            ko = ((65535 - eh).to(tl.int64) << 14) | (j1.to(tl.int64) << 6)
            KA = tl.where(ga > 0, (ga.to(tl.int64) << 31) | (1 << 30) | ko | (ka % 64).to(tl.int64), 0)
            KB = tl.where(gb > 0, (gb.to(tl.int64) << 31) | ko | (kb % 64).to(tl.int64), 0)
            K = tl.max(tl.maximum(KA, KB), axis=0, keep_dims=True)  # [1, 1]
            moving = (K > 0) & (Lhi.to(tl.int64) * R > stop_at)
            use_b = moving & (((K >> 30) & 1) == 0)
            x = tl.where(moving, (K >> 31).to(tl.int32), 0)
            e = (65535 - ((K >> 14) & 65535)).to(tl.int32)
            js = ((K >> 6) & 255).to(tl.int32)
            dest = (K & 63).to(tl.int32)
            coldest = r1 == dest
            dbit = tl.full([1, 1], 1, tl.int32) << (dest % 32)
            sel = j1 == js  # the chosen slot's masks (a reduction in the thread)
            me_lo = tl.sum(tl.where(sel, mh_lo, 0), axis=0, keep_dims=True) | tl.where(dest < 32, dbit, 0)
            me_hi = tl.sum(tl.where(sel, mh_hi, 0), axis=0, keep_dims=True) | tl.where(dest < 32, 0, dbit)
            se_lo = tl.sum(tl.where(sel, sh_lo, 0), axis=0, keep_dims=True)
            se_hi = tl.sum(tl.where(sel, sh_hi, 0), axis=0, keep_dims=True)
            newc = coldest & (j1 == P + nrecv) & use_b
            X = tl.where(newc, e, X)
            S_lo = tl.where(newc, se_lo, S_lo)
            S_hi = tl.where(newc, se_hi, S_hi)
            isx = X == e
            M_lo = tl.where(isx & use_b, me_lo, M_lo)
            M_hi = tl.where(isx & use_b, me_hi, M_hi)
            isf = isx & first
            T = T - tl.where(colhi & isf, x, 0) + tl.where(coldest & isf, x, 0)
            L = L - tl.where(colhi, x, 0) + tl.where(coldest, x, 0)
            cp = use_b.to(tl.int32)
            nrecv = nrecv + tl.where(coldest, cp, 0)
            ncopy = ncopy + cp
            it = it + moving.to(tl.int32)
            pend = use_b
            pse_lo = se_lo
            pse_hi = se_hi
            pnew = newc
            go = tl.max(tl.max((moving & (it < max_iters)).to(tl.int32), axis=1), axis=0) > 0
        # the last copy's source
        sk = tl.min(tl.where((((pse_lo & rb_lo) | (pse_hi & rb_hi)) != 0) & (nsend < send) & rv,
                             nsend * 64 + r1, KEYBIG), axis=1, keep_dims=True)
        DS = tl.where(pnew & pend, sk % 64, DS)
        # final even split of a rank's tokens over its static slots of the same expert (extra tokens to the first)
        cnt = tl.zeros([BLOCK_J, BLOCK_R], dtype=tl.int32)
        tsum = tl.zeros([BLOCK_J, BLOCK_R], dtype=tl.int32)
        pos = tl.zeros([BLOCK_J, BLOCK_R], dtype=tl.int32)
        stat = j1 < P
        for jj in tl.static_range(BLOCK_J):
            xr = tl.max(tl.where(j1 == jj, X, -1), axis=0, keep_dims=True)
            tr = tl.sum(tl.where(j1 == jj, T, 0), axis=0, keep_dims=True)
            same = (xr == X) & stat & (jj < P)
            cnt = cnt + same.to(tl.int32)
            tsum = tsum + tl.where(same, tr, 0)
            pos = pos + (same & (jj < j1)).to(tl.int32)
        cnt1 = tl.maximum(cnt, 1)
        q = tsum // cnt1
        split = q + (pos < tsum - q * cnt1).to(tl.int32)
        out = tl.where(stat, split, T)
        tl.store(st_ptr + b * R * PD + r1 * PD + j1, out, mask=rv & (j1 < PD))
        dv = rv & (j1 >= P) & (j1 < PD)
        tl.store(de_ptr + b * R * D + r1 * D + (j1 - P), X, mask=dv)
        tl.store(ds_ptr + b * R * D + r1 * D + (j1 - P), DS, mask=dv)
        tl.store(l_ptr + b * R + r1, L, mask=rv)
        tl.store(info_ptr + b * 2 + r1 * 0, ncopy + r1 * 0, mask=r1 == 0)
        tl.store(info_ptr + b * 2 + 1 + r1 * 0, it + r1 * 0, mask=r1 == 0)


def plan_replication_gpu(
    counts: torch.Tensor,
    tables: dict[str, torch.Tensor],
    dynamic_slots: int,
    *,
    max_recv: int | None = None,
    max_send: int | None = None,
    max_copies: int | None = None,
    max_iters: int | None = None,
    min_copy_gain: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    num_warps: int = 4,
    out: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`eplb.dispatch.replication.plan_replication` (uniform start) in one launch (Triton), on ``counts``' device.

    Args:
        counts: ``[..., E]`` integer tokens per expert, ``[B, E]`` once flattened; problem ``b`` uses layer ``b % LM``
            of the tables.
        tables: :func:`eplb.dispatch.replication.slot_tables` of the placement (``[LM, R, P]`` each) as tensors on
            the device.
        out: preallocated outputs of a previous call with the same shapes (``result["_out"]``), for CUDA graphs.

    Returns a dict of int32 tensors: ``slot_tokens`` ``[..., R, P + D]`` (as
    :func:`eplb.dispatch.replication.slot_tokens`), ``dyn_expert`` / ``dyn_source`` ``[..., R, D]``, ``rank_loads``
    ``[..., R]``, ``copies`` and ``iterations`` ``[...]``. No host synchronisation: loads must stay below ``2**24``
    (the caller checks where it can afford to).
    """
    if not HAVE_TRITON:  # pragma: no cover
        raise RuntimeError("plan_replication_gpu needs Triton")
    x = tables["expert"]
    if x.dim() == 2:
        tables = {k: v.unsqueeze(0) for k, v in tables.items()}
        x = tables["expert"]
    LM, R, P = x.shape
    E = counts.shape[-1]
    if R > 64:
        raise InputError(f"tables: at most 64 ranks are supported, got {R}")
    if E >= 65536:
        raise InputError(f"counts: at most 65535 experts are supported, got {E}")
    if MAX_LOAD * 64 > BIG:  # pragma: no cover - module constants
        raise AssertionError("packed keys overflow")
    lead = tuple(counts.shape[:-1])
    c = counts.reshape(-1, E)
    c = (c if c.dtype in (torch.int32, torch.int64) else c.to(torch.int32)).contiguous()  # the kernel casts int64
    B = c.shape[0]
    if B % LM:
        raise InputError(f"counts: {B} problems is not a multiple of the tables' {LM} layers")
    D = int(dynamic_slots)
    if D < 0:
        raise InputError(f"dynamic_slots: expected an integer >= 0, got {dynamic_slots!r}")
    if P + D > 256:
        raise InputError(f"tables: at most 256 slots per rank (static + dynamic) are supported, got {P + D}")
    recv = D if max_recv is None else min(int(max_recv), D)
    send = recv if max_send is None else int(max_send)
    total = BIG if max_copies is None else int(max_copies)
    iters = 4 * R + 2 * R * D if max_iters is None else int(max_iters)
    dev = c.device
    Dp = max(D, 1)
    if out is None:
        out = {
            "slot_tokens": torch.empty((B, R, P + D), dtype=torch.int32, device=dev),
            "dyn_expert": torch.empty((B, R, Dp), dtype=torch.int32, device=dev),
            "dyn_source": torch.empty((B, R, Dp), dtype=torch.int32, device=dev),
            "rank_loads": torch.empty((B, R), dtype=torch.int32, device=dev),
            "info": torch.empty((B, 2), dtype=torch.int32, device=dev),
        }
    tt = [tables[k].to(device=dev, dtype=torch.int32).contiguous() for k in ("expert", "mult", "before", "replicas", "accept")]
    hm = tables.get("holders")
    if hm is None:  # older tables: the static holder bit masks from the slot experts (a few extra launches)
        ex = tt[0].long()
        bit = torch.ones((), dtype=torch.int64, device=dev) << torch.arange(R, device=dev).view(1, R, 1)
        oh = torch.zeros((LM, E + 1, R), dtype=torch.int64, device=dev)
        oh.scatter_(1, torch.where(ex >= 0, ex, E).permute(0, 2, 1), torch.ones_like(ex).permute(0, 2, 1))
        mask = (oh[:, :E] * bit.view(1, 1, R)).sum(-1)  # distinct bits: the sum is the OR
        hm = torch.where(ex >= 0, mask.gather(1, ex.clamp(min=0).view(LM, -1)).view(LM, R, P), 0)
    tt.append(hm.to(device=dev, dtype=torch.int64).contiguous())
    _replication_slot_kernel[(B,)](
        c, *tt, out["slot_tokens"], out["dyn_expert"], out["dyn_source"], out["rank_loads"], out["info"],
        E, R, P, Dp if D else 0, LM, recv, send, total, iters, max(int(min_copy_gain), 1), tolerance_q16(tolerance), 1,
        BLOCK_R=max(triton.next_power_of_2(R), 2), BLOCK_J=max(triton.next_power_of_2(P + D), 2), KEYBIG=BIG,
        num_warps=num_warps,
    )
    return {
        "slot_tokens": out["slot_tokens"].view(lead + (R, P + D)),
        "dyn_expert": out["dyn_expert"][..., :D].reshape(lead + (R, D)),
        "dyn_source": out["dyn_source"][..., :D].reshape(lead + (R, D)),
        "rank_loads": out["rank_loads"].view(lead + (R,)),
        "copies": out["info"][:, 0].reshape(lead),
        "iterations": out["info"][:, 1].reshape(lead),
        "_out": out,
    }
