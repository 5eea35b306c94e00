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

__all__ = ["HAVE_TRITON", "balanced_quotas_triton", "balanced_send_matrix_triton", "fused_token_slots", "plan_quotas_triton",
           "rank_share_cum_triton"]

try:  # pragma: no cover - exercised on GPU machines only
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:  # pragma: no cover - GPU only

    @triton.jit
    def _waterfill(o_raw, amount, valid, BLOCK_K: tl.constexpr, BIG: tl.constexpr, SORTFREE: tl.constexpr):
        # o_raw, valid: [BF, BK]; amount: [BF]. Same arithmetic as eplb.dispatch.solver.waterfill.
        o = tl.where(valid, o_raw, BIG)
        if SORTFREE:
            # no sort: level k's prefix is every valid level <= o_k (a tie group's end). The min over all prefixes
            # of (amount + sum) / count is reached at a group's end (inside a group of equal levels the ratio
            # moves monotonically toward that level), so H is the same as the sorted prefix scan's.
            le = (o[:, None, :] <= o[:, :, None]) & valid[:, None, :]  # [BF, k, i]: level i in level k's prefix
            cnt = tl.sum(le.to(tl.int64), axis=2)
            P = tl.sum(tl.where(le, o[:, None, :], 0), axis=2)
            h = tl.where(valid, (amount[:, None] + P) // tl.maximum(cnt, 1), BIG)
        else:
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
    def _sweep(q, cf, rr, valid, color, loads_ptr, num_colors, n_sweeps, BLOCK_K: tl.constexpr, BIG: tl.constexpr,
               SORTFREE: tl.constexpr):
        # loads_ptr holds the current rank loads; experts of one colour share no rank, so the stores of one
        # colour's update never collide. A sweep that changes no quota is a fixed point (the next sweep starts
        # from the same quotas and loads), so the remaining sweeps are skipped: the result is unchanged.
        changed = tl.full([], 1, tl.int32)
        for _s in range(n_sweeps):
            if changed != 0:
                q_prev = q
                for col in range(num_colors):
                    ld = tl.load(loads_ptr + rr, mask=valid, other=0)
                    tl.debug_barrier()
                    y = _waterfill(ld - q, cf, valid, BLOCK_K, BIG, SORTFREE)
                    upd = (color == col)[:, None] & valid
                    tl.store(loads_ptr + rr, ld - q + y, mask=upd)
                    q = tl.where((color == col)[:, None], y, q)
                    tl.debug_barrier()
                changed = tl.max(tl.max((q != q_prev).to(tl.int32), axis=1), axis=0)
        return q

    @triton.jit
    def _balanced_kernel(
        g_ptr, fe_ptr, rr_ptr, col_ptr, sr_ptr, sf_ptr, kd_ptr, mult_ptr, pos_ptr, l2p_ptr,
        out_ptr, slot_out_ptr, share_out_ptr, scratch_ptr,
        G_ROWS, g_bstride, src_rank, spr, t_bstride_e, t_bstride_f, t_bstride_fk, t_bstride_ek, o_bstride, so_bstride,
        E, F, Kd, K, R, num_colors, sweeps, int_sweeps,
        FRAC_BITS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_KK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BIG: tl.constexpr,
        SLOTS: tl.constexpr, SHARES: tl.constexpr, SORTFREE: tl.constexpr, ONE_COLOR: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        offs_f = tl.arange(0, BLOCK_F)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        offs_g = tl.arange(0, BLOCK_G)
        # scratch row: [BLOCK_R] rank loads | [BLOCK_E] expert counts | [BLOCK_F * BLOCK_K] quotas
        loads_ptr = scratch_ptr + b * (BLOCK_R + BLOCK_E + BLOCK_F * BLOCK_K)
        cnt_ptr = loads_ptr + BLOCK_R
        q_ptr = cnt_ptr + BLOCK_E
        me = offs_e < E
        # tables first (independent loads, their latency overlaps the count reduction)
        mf = offs_f < F
        fe = tl.load(fe_ptr + b * t_bstride_f + offs_f, mask=mf, other=-1).to(tl.int32)
        color = tl.load(col_ptr + b * t_bstride_f + offs_f, mask=mf, other=-1).to(tl.int32)
        mfk = mf[:, None] & (offs_k < Kd)[None, :]
        rr = tl.load(rr_ptr + b * t_bstride_fk + offs_f[:, None] * Kd + offs_k[None, :], mask=mfk, other=-1).to(tl.int32)
        sr = tl.load(sr_ptr + b * t_bstride_e + offs_e, mask=me, other=-1).to(tl.int32)
        # expert counts: the sum of the G_ROWS source-rank rows
        c = tl.zeros([BLOCK_E], dtype=tl.int64)
        g_lo = tl.zeros([BLOCK_E], dtype=tl.int64)  # tokens of source ranks before src_rank
        for r0 in range(0, G_ROWS, BLOCK_G):
            rows = r0 + offs_g
            tile = tl.load(g_ptr + b * g_bstride + rows[:, None] * E + offs_e[None, :],
                           mask=(rows < G_ROWS)[:, None] & me[None, :], other=0).to(tl.int64)
            c += tl.sum(tile, axis=0)
            if SHARES:
                g_lo += tl.sum(tl.where((rows < src_rank)[:, None], tile, 0), axis=0)
        tl.store(cnt_ptr + offs_e, c)
        # base loads: experts with a single rank
        tl.store(loads_ptr + offs_r, tl.zeros([BLOCK_R], dtype=tl.int64))
        tl.debug_barrier()
        tl.atomic_add(loads_ptr + tl.maximum(sr, 0), c, mask=me & (sr >= 0))
        tl.debug_barrier()
        base = tl.load(loads_ptr + offs_r)
        cf = tl.load(cnt_ptr + tl.maximum(fe, 0), mask=fe >= 0, other=0)
        tl.debug_barrier()
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
        if ONE_COLOR:
            # one colour: no two fluid experts share a rank, so each one's water-filling over the base loads is the
            # final split (eplb.dispatch.kernel._effective_sweeps) and never worse than the uniform one
            q = _waterfill(tl.load(loads_ptr + rrc, mask=valid, other=0), cf, valid, BLOCK_K, BIG, SORTFREE)
        elif num_colors > 0:
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
                q = _sweep(q, amt, rrc, valid, color, loads_ptr, num_colors, sweeps, BLOCK_K, BIG, SORTFREE)
                # whole tokens: floor, then the remaining tokens to the largest fractions (ties: lower index)
                whole = q >> FRAC_BITS
                frac = q - (whole << FRAC_BITS)
                rem = cf - tl.sum(whole, axis=1)
                key = tl.where(valid, frac * BLOCK_K + (BLOCK_K - 1 - offs_k)[None, :], -1)  # unique per row
                if SORTFREE:  # the rem largest keys: those with fewer than rem larger keys (rem < valid count)
                    above = tl.sum((key[:, None, :] > key[:, :, None]).to(tl.int64), axis=2)
                    q = whole + (valid & (above < rem[:, None])).to(tl.int64)
                else:
                    srt = tl.sort(key, dim=1, descending=True)
                    thr = tl.sum(tl.where(offs_k[None, :] == (rem - 1)[:, None], srt, 0), axis=1)
                    q = whole + (valid & (rem > 0)[:, None] & (key >= thr[:, None])).to(tl.int64)
            else:
                q = q0
            tl.debug_barrier()
            tl.store(loads_ptr + offs_r, base)
            tl.debug_barrier()
            tl.atomic_add(loads_ptr + rrc, q, mask=valid)
            tl.debug_barrier()
            q = _sweep(q, cf, rrc, valid, color, loads_ptr, num_colors, int_sweeps, BLOCK_K, BIG, SORTFREE)
            max1 = tl.max(tl.load(loads_ptr + offs_r), axis=0)
            if max1 > max0:
                q = q0
        else:
            q = q0
        tl.store(out_ptr + b * o_bstride + offs_f[:, None] * Kd + offs_k[None, :], q, mask=mfk)
        if SLOTS:
            # per-replica quotas [E, K]: a rank's quota split evenly over the expert's replicas on it
            offs_kk = tl.arange(0, BLOCK_KK)
            mek = me[:, None] & (offs_kk < K)[None, :]
            ek = b * t_bstride_ek + offs_e[:, None] * K + offs_kk[None, :]
            v = tl.load(l2p_ptr + ek, mask=mek, other=-1) >= 0
            sf = tl.load(sf_ptr + b * t_bstride_e + offs_e, mask=me, other=-1)
            kd = tl.load(kd_ptr + ek, mask=mek, other=0)
            mult = tl.load(mult_ptr + ek, mask=mek, other=1)
            rpos = tl.load(pos_ptr + ek, mask=mek, other=0)
            tl.store(q_ptr + offs_f[:, None] * BLOCK_K + offs_k[None, :], q)
            tl.debug_barrier()
            qf = tl.load(q_ptr + tl.maximum(sf, 0)[:, None] * BLOCK_K + kd, mask=v & (sf >= 0)[:, None], other=0)
            qr = tl.where((sf >= 0)[:, None], qf, c[:, None])
            per = qr // mult
            slot_q = tl.where(v, per + (rpos < qr - per * mult).to(tl.int64), 0)
            tl.store(slot_out_ptr + b * so_bstride + offs_e[:, None] * K + offs_kk[None, :], slot_q, mask=mek)
            if SHARES:
                # src_rank's share of every replica (same rule as eplb.dispatch.source_shares): each replica
                # first takes its own rank's tokens (replicas on one rank in slot order), then the rest is
                # matched in source-rank order (overlap of prefix sums); stored as a running sum over k
                rk = tl.load(l2p_ptr + ek, mask=mek, other=0) // spr
                extra = qr - per * mult
                prior = rpos * per + tl.minimum(rpos, extra)
                g_at = tl.load(g_ptr + b * g_bstride + rk * E + offs_e[:, None], mask=v, other=0).to(tl.int64)
                local = tl.where(v, tl.maximum(tl.minimum(g_at - prior, slot_q), 0), 0)
                g_me = tl.load(g_ptr + b * g_bstride + src_rank * E + offs_e, mask=me, other=0).to(tl.int64)
                s_lo = g_lo - tl.sum(tl.where(rk < src_rank, local, 0), axis=1)
                s_hi = s_lo + g_me - tl.sum(tl.where(rk == src_rank, local, 0), axis=1)
                u = slot_q - local
                u_cum = tl.cumsum(u, axis=1)
                amount = tl.maximum(tl.minimum(s_hi[:, None], u_cum) - tl.maximum(s_lo[:, None], u_cum - u), 0)
                share = amount + tl.where(rk == src_rank, local, 0)
                tl.store(share_out_ptr + b * so_bstride + offs_e[:, None] * K + offs_kk[None, :],
                         tl.cumsum(share, axis=1), mask=mek)


    @triton.jit
    def _token_slots_kernel(ids_ptr, q_ptr, g_ptr, sf_ptr, kd_ptr, mult_ptr, pos_ptr, l2p_ptr, cnt_ptr, cum_ptr,
                            slotq_ptr, out_ptr, M, K, Kd, E, G, rank, spr,
                            BALANCED: tl.constexpr, BLOCK_M: tl.constexpr, LOG_KK: tl.constexpr,
                            BLOCK_KK: tl.constexpr, BLOCK_G: tl.constexpr):
        # one program per expert e. Balanced: first expert e's row of the plan (the same arithmetic as the
        # plan kernel's SLOTS / SHARES part, here one expert per program instead of all experts in one):
        # its per-replica quotas from the fluid quotas q [F, Kd] (or all its tokens when not fluid), and
        # this rank's running shares of them (eplb.dispatch.source_shares), stored to cum[e, :].
        # Then the occurrence rank of each entry of e (a running prefix count over the row-major ids, chunk
        # by chunk), its replica (balanced: the number of running shares cum[e, j] <= occ, a binary search
        # over the non-decreasing row, padded with M > occ; past the shares round-robin; round-robin:
        # (occ + rank) % replicas) and its slot log2phy[e, rep]. Every entry is written by the program of
        # its expert only, so the result is deterministic.
        e = tl.program_id(0)
        offs = tl.arange(0, BLOCK_M)
        n = tl.maximum(tl.load(cnt_ptr + e).to(tl.int32), 1)
        if BALANCED:
            offs_kk = tl.arange(0, BLOCK_KK)
            mk = offs_kk < K
            row = e * K + offs_kk
            l2p = tl.load(l2p_ptr + row, mask=mk, other=-1)
            v = l2p >= 0
            sf = tl.load(sf_ptr + e)
            kd = tl.load(kd_ptr + row, mask=mk, other=0)
            mult = tl.load(mult_ptr + row, mask=mk, other=1)
            rpos = tl.load(pos_ptr + row, mask=mk, other=0)
            offs_g = tl.arange(0, BLOCK_G)
            acc = tl.zeros([BLOCK_G], dtype=tl.int64)
            acc_lo = tl.zeros([BLOCK_G], dtype=tl.int64)  # tokens of source ranks before this rank
            for r0 in range(0, G, BLOCK_G):
                rows = r0 + offs_g
                col = tl.load(g_ptr + rows * E + e, mask=rows < G, other=0).to(tl.int64)
                acc += col
                acc_lo += tl.where(rows < rank, col, 0)
            c_e = tl.sum(acc, axis=0)
            g_lo = tl.sum(acc_lo, axis=0)
            qf = tl.load(q_ptr + tl.maximum(sf, 0) * Kd + kd, mask=v & (sf >= 0), other=0)
            qr = tl.where(sf >= 0, qf, c_e)
            per = qr // mult
            extra = qr - per * mult
            slot_q = tl.where(v, per + (rpos < extra).to(tl.int64), 0)
            tl.store(slotq_ptr + row, slot_q, mask=mk)
            # rank's share of every replica: each replica first takes its own rank's tokens (replicas on one
            # rank in slot order), the rest is matched in source-rank order (overlap of prefix sums)
            rk = tl.maximum(l2p, 0) // spr
            prior = rpos * per + tl.minimum(rpos, extra)
            g_at = tl.load(g_ptr + rk * E + e, mask=v, other=0).to(tl.int64)
            local = tl.where(v, tl.maximum(tl.minimum(g_at - prior, slot_q), 0), 0)
            g_me = tl.load(g_ptr + rank * E + e).to(tl.int64)
            s_lo = g_lo - tl.sum(tl.where(rk < rank, local, 0), axis=0)
            s_hi = s_lo + g_me - tl.sum(tl.where(rk == rank, local, 0), axis=0)
            u = slot_q - local
            u_cum = tl.cumsum(u, axis=0)
            amount = tl.maximum(tl.minimum(s_hi, u_cum) - tl.maximum(s_lo, u_cum - u), 0)
            share = amount + tl.where(rk == rank, local, 0)
            tl.store(cum_ptr + row, tl.cumsum(share, axis=0), mask=mk)
            tl.debug_barrier()  # the row is read back below by other threads of this program
        carry = tl.zeros([1], dtype=tl.int32)
        for m0 in range(0, M, BLOCK_M):
            idx = m0 + offs
            ids = tl.load(ids_ptr + idx, mask=idx < M, other=-1).to(tl.int32)
            hit = ids == e
            h = hit.to(tl.int32)
            nh = tl.sum(h, 0)
            if nh > 0:  # a chunk without entries of e stores nothing
                occ = tl.cumsum(h, 0) - h + carry
                if BALANCED:
                    rep = tl.zeros([BLOCK_M], dtype=tl.int32)
                    for step in tl.static_range(LOG_KK):
                        half = 1 << (LOG_KK - 1 - step)
                        j = rep + (half - 1)
                        c = tl.load(cum_ptr + e * K + j, mask=hit & (j < K), other=M)
                        rep = tl.where(tl.minimum(c, M).to(tl.int32) <= occ, rep + half, rep)
                    rep = tl.where(rep >= n, (occ + rank) % n, rep)
                else:
                    rep = (occ + rank) % n
                slot = tl.load(l2p_ptr + e * K + rep, mask=hit, other=0)
                tl.store(out_ptr + idx, slot, mask=hit)
            carry += nh

    @triton.jit
    def _send_matrix_kernel(g_ptr, q_ptr, l2p_ptr, srank_ptr, out_ptr, R, E, K, S,
                            BLOCK_R: tl.constexpr, BLOCK_KK: tl.constexpr):
        # one program per expert e: column block [R, replicas of e] of eplb.dispatch.send_matrix's balanced
        # branch, the same integer arithmetic as eplb.dispatch.source_shares for every source rank at once
        # (local tokens first, replicas on one rank in slot order; the rest by overlaps of prefix sums).
        # Every slot hosts one (expert, replica), so each output entry is stored by one program only.
        e = tl.program_id(0)
        offs_k = tl.arange(0, BLOCK_KK)
        mk = offs_k < K
        l2p = tl.load(l2p_ptr + e * K + offs_k, mask=mk, other=-1)
        v = l2p >= 0
        rk = tl.where(v, tl.load(srank_ptr + tl.maximum(l2p, 0), mask=v, other=-1), -1)
        q = tl.load(q_ptr + e * K + offs_k, mask=mk, other=0).to(tl.int64)
        # quota of earlier valid replicas on the same rank
        offs_j = tl.arange(0, BLOCK_KK)
        rk_j = tl.load(srank_ptr + tl.maximum(tl.load(l2p_ptr + e * K + offs_j, mask=offs_j < K, other=-1), 0),
                       mask=offs_j < K, other=-1)
        v_j = tl.load(l2p_ptr + e * K + offs_j, mask=offs_j < K, other=-1) >= 0
        rk_j = tl.where(v_j, rk_j, -1)
        q_j = tl.load(q_ptr + e * K + offs_j, mask=offs_j < K, other=0).to(tl.int64)
        earlier = (rk[:, None] == rk_j[None, :]) & (offs_j[None, :] < offs_k[:, None]) & v_j[None, :]
        prior = tl.sum(tl.where(earlier, q_j[None, :], 0), axis=1)
        g_at = tl.load(g_ptr + tl.maximum(rk, 0) * E + e, mask=v, other=0).to(tl.int64)
        local = tl.where(v, tl.maximum(tl.minimum(g_at - prior, q), 0), 0)
        offs_r = tl.arange(0, BLOCK_R)
        mr = offs_r < R
        gcol = tl.load(g_ptr + offs_r * E + e, mask=mr, other=0).to(tl.int64)
        own = (rk[None, :] == offs_r[:, None]) & v[None, :]  # [BLOCK_R, BLOCK_KK]
        loc_own = tl.where(own, local[None, :], 0)
        s = gcol - tl.sum(loc_own, axis=1)
        s_cum = tl.cumsum(s, axis=0)
        u = q - local
        u_cum = tl.cumsum(u, axis=0)
        amount = tl.maximum(tl.minimum(s_cum[:, None], u_cum[None, :]) - tl.maximum((s_cum - s)[:, None],
                                                                                   (u_cum - u)[None, :]), 0)
        tl.store(out_ptr + offs_r[:, None] * S + tl.maximum(l2p, 0)[None, :], amount + loc_own,
                 mask=mr[:, None] & v[None, :])



def _effective_sweeps(num_colors: int, frac_bits: int, sweeps: int, int_sweeps: int) -> tuple[int, int, int]:
    """Solver settings that give the same quotas with less work. With one colour no two fluid experts share a
    rank, so an expert's water-filling sees only the single-replica base load on its ranks: the first whole-token
    sweep gives the final quotas whatever it starts from (the fractional phase and the later sweeps change
    nothing), the same result as :func:`eplb.dispatch.solver.balanced_quotas` with the full settings."""
    if int(num_colors) == 1 and int(int_sweeps) >= 1:
        return 0, 0, 1
    return int(frac_bits), int(sweeps), int(int_sweeps)


def _launch(g: torch.Tensor, tabs: dict[str, torch.Tensor], num_colors: int, num_ranks: int, *, slots: bool,
            frac_bits: int, sweeps: int, int_sweeps: int, num_warps: int, src_rank: int = -1,
            spr: int = 1, sortfree: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``g`` ``[B, G, E]`` counts (summed over ``G`` in the kernel); ``tabs`` with a leading ``B`` or none."""
    B, G, E = g.shape
    frac_bits, sweeps, int_sweeps = _effective_sweeps(num_colors, frac_bits, sweeps, int_sweeps)
    fl_rank = tabs["fl_rank"]
    F, Kd = fl_rank.shape[-2:]
    batched = fl_rank.ndim == 3
    l2p = tabs["log2phy"]
    K = l2p.shape[-1]
    block = {"BLOCK_E": triton.next_power_of_2(E), "BLOCK_F": triton.next_power_of_2(F),
             "BLOCK_K": triton.next_power_of_2(Kd), "BLOCK_KK": triton.next_power_of_2(K),
             "BLOCK_R": triton.next_power_of_2(num_ranks), "BLOCK_G": min(32, triton.next_power_of_2(G))}
    out = torch.empty((B, F, Kd), dtype=torch.int64, device=g.device)
    slot_out = torch.empty((B, E, K) if slots else (1,), dtype=torch.int64, device=g.device)
    shares = src_rank >= 0
    share_out = torch.empty((B, E, K) if shares else (1,), dtype=torch.int64, device=g.device)
    scratch = torch.empty((B, block["BLOCK_R"] + block["BLOCK_E"] + block["BLOCK_F"] * block["BLOCK_K"]),
                          dtype=torch.int64, device=g.device)
    _balanced_kernel[(B,)](
        g, tabs["fl_expert"], fl_rank, tabs["fl_color"], tabs["single_rank"], tabs["slot_f"], tabs["rep_kd"],
        tabs["rep_mult"], tabs["rep_pos"], l2p, out, slot_out, share_out, scratch,
        G, G * E, max(src_rank, 0), spr, E if batched else 0, F if batched else 0, F * Kd if batched else 0, E * K if batched else 0,
        F * Kd, E * K if slots else 0,
        E, F, Kd, K, num_ranks, int(num_colors), int(sweeps), int(int_sweeps),
        FRAC_BITS=int(frac_bits), BIG=1 << 60, SLOTS=bool(slots or shares), SHARES=shares, num_warps=num_warps,
        SORTFREE=bool(sortfree), ONE_COLOR=int(num_colors) == 1 and int_sweeps >= 1,
        **block,
    )
    return out, slot_out, share_out


_TABLE_KEYS = ("fl_expert", "fl_rank", "fl_color", "single_rank", "slot_f", "rep_kd", "rep_mult", "rep_pos", "log2phy")


def plan_quotas_triton(global_counts: torch.Tensor, tables: Any, num_colors: int | None = None,
                       num_ranks: int | None = None, *, frac_bits: int = 8, sweeps: int = 6, int_sweeps: int = 2,
                       num_warps: int = 8) -> torch.Tensor:
    """Per-replica quotas ``[..., E, K]`` in one kernel launch (the sum over source ranks, the solver and the
    split over co-located replicas all fused), equal to :func:`eplb.dispatch.plan_quotas`'s torch backend.

    ``global_counts``: ``[R_src, E]`` or ``[E]`` for one layer (``tables`` a :class:`DispatchTable`), or
    ``[B, R_src, E]`` / ``[B, E]`` with ``tables`` a dict of ``[B, ...]`` device tensors from
    :func:`eplb.dispatch.layer_tables` (then give ``num_colors`` and ``num_ranks``). Contiguous int64 (any
    integer dtype is converted).
    """
    if not HAVE_TRITON:
        raise RuntimeError("plan_quotas_triton: Triton is not installed")
    if isinstance(tables, dict):
        tabs = {k: tables[k] for k in _TABLE_KEYS}
        assert num_colors is not None and num_ranks is not None
        batched = tabs["fl_rank"].ndim == 3
    else:
        tabs = {k: getattr(tables, k) for k in _TABLE_KEYS}
        num_colors, num_ranks = tables.num_colors, tables.num_ranks
        batched = False
    g = global_counts.to(torch.int64)
    if batched:
        g = g if g.ndim == 3 else g.unsqueeze(1)
    else:
        g = g.view(1, 1, -1) if g.ndim == 1 else g.unsqueeze(0)
    _, slot_q, _ = _launch(g.contiguous(), {k: v.contiguous() for k, v in tabs.items()}, int(num_colors),
                        int(num_ranks), slots=True, frac_bits=frac_bits, sweeps=sweeps, int_sweeps=int_sweeps,
                        num_warps=num_warps)
    return slot_q if batched else slot_q[0]


def rank_share_cum_triton(global_counts: torch.Tensor, table: Any, rank: int, *, frac_bits: int = 8,
                          sweeps: int = 6, int_sweeps: int = 2, num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for :func:`eplb.dispatch.assign_slots`' balanced plan on ``rank``: returns the per-replica
    quotas ``[E, K]`` and ``rank``'s shares of them as a running sum over replicas ``[E, K]``
    (``cumsum(source_shares(g, quotas, table, rank), -1)``). ``global_counts`` ``[R, E]``."""
    if not HAVE_TRITON:
        raise RuntimeError("rank_share_cum_triton: Triton is not installed")
    tabs = {k: getattr(table, k).contiguous() for k in _TABLE_KEYS}
    g = global_counts.to(torch.int64).unsqueeze(0).contiguous()
    _, slot_q, cum = _launch(g, tabs, table.num_colors, table.num_ranks, slots=True, frac_bits=frac_bits,
                             sweeps=sweeps, int_sweeps=int_sweeps, num_warps=num_warps, src_rank=int(rank),
                             spr=int(table.slots_per_rank))
    return slot_q[0], cum[0]


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
    num_warps: int = 8,
) -> torch.Tensor:
    """Triton version of :func:`eplb.dispatch.solver.balanced_quotas` (same result, bit for bit).

    ``counts`` ``[B, E]`` or ``[E]``; tables ``[B, ...]`` (one per problem) or unbatched (shared);
    ``fl_color`` ``[..., F]`` is the colour of each fluid expert (``-1`` padding). Returns ``[B, F, Kd]``
    (or ``[F, Kd]``) int64 on the counts' device.
    """
    if not HAVE_TRITON:
        raise RuntimeError("balanced_quotas_triton: Triton is not installed")
    one = counts.ndim == 1
    c = counts.reshape(-1, 1, counts.shape[-1]).to(torch.int64).contiguous()
    E = c.shape[-1]
    K = 1
    tabs = {"fl_expert": fl_expert, "fl_rank": fl_rank, "fl_color": fl_color, "single_rank": single_rank}
    dummy = torch.zeros((1,), dtype=torch.int64, device=c.device)
    tabs.update({k: dummy for k in ("slot_f", "rep_kd", "rep_mult", "rep_pos")})
    tabs["log2phy"] = torch.zeros((E, K) if fl_rank.ndim == 2 else (fl_rank.shape[0], E, K), dtype=torch.int64,
                                  device=c.device)
    out, _, _ = _launch(c, {k: v.contiguous() for k, v in tabs.items()}, num_colors, num_ranks, slots=False,
                     frac_bits=frac_bits, sweeps=sweeps, int_sweeps=int_sweeps, num_warps=num_warps)
    return out[0] if one else out


def _fused_args(table: Any) -> dict[str, Any]:
    """Contiguous tables and launch constants of one :class:`~eplb.dispatch.DispatchTable`, cached on it."""
    cache = getattr(table, "_fused_cache", None)
    if cache is None or cache["dev"] != table.log2phy.device:
        tabs = {k: getattr(table, k).contiguous() for k in _TABLE_KEYS}
        E, K = tabs["log2phy"].shape
        F, Kd = tabs["fl_rank"].shape
        blk_r, blk_e = triton.next_power_of_2(table.num_ranks), triton.next_power_of_2(E)
        blk_f, blk_k = triton.next_power_of_2(F), triton.next_power_of_2(Kd)
        dev = table.log2phy.device
        # the plan's intermediates, reused by every call (consumed by the token kernel on the same stream)
        bufs = {"cum": torch.empty((E, K), dtype=torch.int64, device=dev),
                "slot_q": torch.empty((E, K), dtype=torch.int64, device=dev),
                "q": torch.empty((F, Kd), dtype=torch.int64, device=dev),
                "scratch": torch.empty((blk_r + blk_e + blk_f * blk_k,), dtype=torch.int64, device=dev)}
        cache = {"dev": dev, "tabs": tabs, "logcnt": table.logcnt.contiguous(), "E": E, "K": K,
                 "slot_rank": table.slot_rank.contiguous(),
                 "log_kk": int(triton.next_power_of_2(K + 1)).bit_length() - 1,  # a search over K + 1 >= padded
                 "F": F, "Kd": Kd, "bufs": bufs,
                 "block": {"BLOCK_E": triton.next_power_of_2(E), "BLOCK_F": triton.next_power_of_2(F),
                           "BLOCK_K": triton.next_power_of_2(Kd), "BLOCK_KK": triton.next_power_of_2(K),
                           "BLOCK_R": triton.next_power_of_2(table.num_ranks)}}
        object.__setattr__(table, "_fused_cache", cache)  # frozen dataclass: a private cache, not a field
    return cache


def fused_token_slots(topk_ids: torch.Tensor, table: Any, strategy: str, rank: int,
                      global_counts: torch.Tensor | None = None, *, frac_bits: int = 8, sweeps: int = 6,
                      int_sweeps: int = 2, num_warps: int = 8, token_block: int | None = None,
                      token_warps: int | None = None, quotas_out: torch.Tensor | None = None,
                      sortfree: bool = True) -> torch.Tensor:
    """:func:`eplb.dispatch.assign_slots` for ``"balanced"`` (two launches: the plan kernel's fluid quotas,
    then the token kernel, one program per expert, which also derives that expert's per-replica quotas and
    this rank's running shares of them) and ``"round-robin"`` (one launch: the token kernel) on CUDA.

    Equal to the torch path entry for entry. ``topk_ids`` ``[N, k]`` (any integer dtype, ids in ``[0, E)``),
    ``global_counts`` ``[R, E]`` (balanced). Returns ``[N, k]`` int64 slots. ``num_warps``: the plan kernel's;
    ``token_block`` / ``token_warps``: the token kernel's chunk of entries and warps (defaults by size).
    ``quotas_out``: an ``[E, K]`` int64 tensor (balanced) that receives the per-replica quotas of the plan
    (== :func:`eplb.dispatch.plan_quotas`), e.g. for :func:`eplb.dispatch.send_matrix` without a second plan.
    ``sortfree``: the plan's water-filling by pairwise level comparisons instead of a sort (same quotas).
    """
    if not HAVE_TRITON:
        raise RuntimeError("fused_token_slots: Triton is not installed")
    a = _fused_args(table)
    E, K = a["E"], a["K"]
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    M = ids.numel()
    out = torch.empty(topk_ids.shape, dtype=torch.int64, device=ids.device)
    balanced = strategy == "balanced"
    if M == 0 and (not balanced or quotas_out is None):
        return out
    tabs = a["tabs"]
    bufs = a["bufs"]
    if balanced:
        assert global_counts is not None
        blk = a["block"]
        g = global_counts if global_counts.dtype == torch.int64 and global_counts.is_contiguous() else (
            global_counts.to(torch.int64).contiguous())
        G = g.shape[0]
        fb, sw, isw = _effective_sweeps(table.num_colors, frac_bits, sweeps, int_sweeps)
        _balanced_kernel[(1,)](  # the fluid quotas only: [F, Kd] into bufs["q"]
            g, tabs["fl_expert"], tabs["fl_rank"], tabs["fl_color"], tabs["single_rank"], tabs["slot_f"],
            tabs["rep_kd"], tabs["rep_mult"], tabs["rep_pos"], tabs["log2phy"], bufs["q"], bufs["slot_q"],
            bufs["cum"], bufs["scratch"],
            G, G * E, int(rank), int(table.slots_per_rank), 0, 0, 0, 0, 0, 0,
            E, a["F"], a["Kd"], K, table.num_ranks, int(table.num_colors), sw, isw,
            FRAC_BITS=fb, BIG=1 << 60, SLOTS=False, SHARES=False, num_warps=num_warps, SORTFREE=bool(sortfree),
            ONE_COLOR=int(table.num_colors) == 1 and isw >= 1,
            BLOCK_G=min(32, triton.next_power_of_2(G)), **blk,
        )
        slot_q = bufs["slot_q"] if quotas_out is None else quotas_out
        assert slot_q.shape == (E, K) and slot_q.dtype == torch.int64 and slot_q.is_contiguous()
    else:
        g, G, slot_q = out, 1, out  # unused
    bm = token_block or min(2048, max(128, triton.next_power_of_2(M)))
    tw = token_warps or (4 if bm <= 1024 else 8)
    _token_slots_kernel[(E,)](ids, bufs["q"], g, tabs["slot_f"], tabs["rep_kd"], tabs["rep_mult"], tabs["rep_pos"],
                              tabs["log2phy"], a["logcnt"], bufs["cum"], slot_q, out, M, K, a["Kd"], E, G,
                              int(rank), int(table.slots_per_rank),
                              BALANCED=balanced, BLOCK_M=bm, LOG_KK=a["log_kk"], BLOCK_KK=a["block"]["BLOCK_KK"],
                              BLOCK_G=min(128, triton.next_power_of_2(G)), num_warps=tw)
    return out


def balanced_send_matrix_triton(global_counts: torch.Tensor, table: Any, quotas: torch.Tensor) -> torch.Tensor:
    """:func:`eplb.dispatch.send_matrix`'s ``"balanced"`` branch in one launch (plus the output's zero fill):
    ``[R, S]`` rows every source rank sends to every slot, from the ``[R, E]`` counts and the ``[E, K]``
    per-replica quotas of the step's plan. Equal to the torch path entry for entry."""
    if not HAVE_TRITON:
        raise RuntimeError("balanced_send_matrix_triton: Triton is not installed")
    g = global_counts if global_counts.dtype == torch.int64 and global_counts.is_contiguous() else (
        global_counts.to(torch.int64).contiguous())
    q = quotas if quotas.dtype == torch.int64 and quotas.is_contiguous() else quotas.to(torch.int64).contiguous()
    a = _fused_args(table)
    E, K = a["E"], a["K"]
    R = g.shape[0]
    S = int(table.num_slots)
    out = torch.zeros((R, S), dtype=torch.int64, device=g.device)
    if R == 0 or E == 0:
        return out
    _send_matrix_kernel[(E,)](g, q, a["tabs"]["log2phy"], a["slot_rank"], out, R, E, K, S,
                              BLOCK_R=triton.next_power_of_2(R), BLOCK_KK=a["block"]["BLOCK_KK"], num_warps=4)
    return out
