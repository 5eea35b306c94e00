"""FROZEN COPY (bench only) of the replication planner kernel of 2026-12-02 (src/eplb/dispatch/replication_kernel.py
before the one-layout rewrite), kept so that bench/replication_kernel.py times before and after in one call. Same
plan as :func:`eplb.dispatch.replication.plan_replication` with ``tolerance=0``. Not part of the package.
"""

from __future__ import annotations

import torch

from eplb.dispatch.replication import BIG, MAX_LOAD
from eplb.errors import InputError

__all__ = ["HAVE_TRITON", "plan_replication_gpu_before"]

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _or(a, b):
        return a | b

    @triton.jit
    def _replication_slot_kernel(
        c_ptr, x_ptr, m_ptr, bf_ptr, n_ptr, acc_ptr, hm_ptr, st_ptr, de_ptr, ds_ptr, l_ptr, info_ptr,
        E, R, P, D, LM, recv, send, total, max_iters, min_gain,
        BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, KEYBIG: tl.constexpr,
    ):
        # State per rank and slot: X [R, P + D] expert of each slot (static, then dynamic; -1 empty), T [R, P + D]
        # tokens (an expert's tokens on a rank sit in its first slot there, `first`, until the final even split),
        # M / S [R, P + D] int64 bit masks of the ranks holding the slot's expert (all / static replicas), so an
        # iteration needs no [P + D, R, P + D] comparison: its dependency chain is six reductions.
        b = tl.program_id(0)
        layer = b % LM
        PD = P + D
        offs_r = tl.arange(0, BLOCK_R)
        offs_j = tl.arange(0, BLOCK_J)
        rbit = tl.full([BLOCK_R], 1, tl.int64) << offs_r.to(tl.int64)
        rv = offs_r < R
        sv = rv[:, None] & (offs_j[None, :] < P)
        sidx = layer * R * P + offs_r[:, None] * P + offs_j[None, :]
        X = tl.load(x_ptr + sidx, mask=sv, other=-1)
        m = tl.load(m_ptr + sidx, mask=sv, other=0)
        bf = tl.load(bf_ptr + sidx, mask=sv, other=0)
        n = tl.maximum(tl.load(n_ptr + sidx, mask=sv, other=1), 1)
        S = tl.load(hm_ptr + sidx, mask=sv, other=0)
        M = S
        c = tl.load(c_ptr + b * E + tl.maximum(X, 0), mask=sv & (X >= 0), other=0)
        base = c // n
        T = base * m + tl.minimum(tl.maximum(c - base * n - bf, 0), m)
        first = (m > 0) | (offs_j[None, :] >= P)
        L = tl.sum(T, axis=1)
        acc = tl.load(acc_ptr + layer * R + offs_r, mask=rv, other=0) > 0
        static_col = offs_j < P
        nrecv = tl.zeros([BLOCK_R], dtype=tl.int32)
        nsend = tl.zeros([BLOCK_R], dtype=tl.int32)
        sendmask = tl.reduce(tl.where(rv & (send > 0), rbit, 0), 0, _or)  # ranks with send budget left
        ncopy = tl.full((), 0, tl.int32)
        it = tl.full((), 0, tl.int32)
        go = it < max_iters
        while go:
            kh = tl.max(tl.where(rv, L * 64 + (63 - offs_r), -1), axis=0)  # most loaded rank, lowest index
            Lhi = kh // 64
            hi = 63 - kh % 64
            rowhi = offs_r[:, None] == hi
            eh = tl.max(tl.where(rowhi, X, -1), axis=0)  # [J] experts of rank hi's slots
            th = tl.sum(tl.where(rowhi, T, 0), axis=0)
            mh = tl.reduce(tl.where(rowhi, M, 0), 0, _or)
            shh = tl.reduce(tl.where(rowhi, S, 0), 0, _or)
            hold = ((mh[:, None] >> offs_r[None, :].to(tl.int64)) & 1) != 0  # [J, R]
            ehv = eh >= 0
            Lk = L * 64 + offs_r
            ka = tl.min(tl.where(hold & (offs_r[None, :] != hi) & rv[None, :], Lk[None, :], KEYBIG), axis=1)
            okr = rv & acc & (nrecv < recv)
            kb = tl.min(tl.where((~hold) & okr[None, :], Lk[None, :], KEYBIG), axis=1)
            src_ok = (shh & sendmask) != 0
            ga = tl.where(ehv & (th > 0) & (ka < KEYBIG), tl.minimum(th, (Lhi - ka // 64) // 2), 0)
            gb = tl.where(ehv & (th > 0) & (kb < KEYBIG) & src_ok & (ncopy < total),
                          tl.minimum(th, (Lhi - kb // 64) // 2), 0)
            gb = tl.where(gb >= min_gain, gb, 0)
            # (gain, lowest expert, its destination) packed in one int64 key per candidate move
            eko = (65535 - eh).to(tl.int64) << 8
            KA = tl.max(tl.where(ga > 0, (ga.to(tl.int64) << 40) | eko | (ka % 64).to(tl.int64), 0), axis=0)
            KB = tl.max(tl.where(gb > 0, (gb.to(tl.int64) << 40) | eko | (kb % 64).to(tl.int64), 0), axis=0)
            GA = (KA >> 40).to(tl.int32)
            GB = (KB >> 40).to(tl.int32)
            use_b = GB > GA
            moving = use_b | (GA > 0)
            K = tl.where(use_b, KB, KA)
            e = (65535 - ((K >> 8) & 65535)).to(tl.int32)
            dest = (K & 255).to(tl.int32)
            x = tl.where(moving, (K >> 40).to(tl.int32), 0)
            rowd = offs_r[:, None] == dest
            dbit = tl.full((), 1, tl.int64) << dest.to(tl.int64)
            ese = eh == e
            me = tl.reduce(tl.where(ese, mh, 0), 0, _or) | dbit
            se = tl.reduce(tl.where(ese, shh, 0), 0, _or)
            newc = rowd & (offs_j[None, :] == P + nrecv[:, None]) & use_b
            X = tl.where(newc, e, X)
            S = tl.where(newc, se, S)
            isx = X == e
            M = tl.where(isx & use_b, me, M)
            T = T - tl.where(rowhi & isx & first, x, 0) + tl.where(rowd & isx & first, x, 0)
            L = L - tl.where(offs_r == hi, x, 0) + tl.where(offs_r == dest, x, 0)
            sk = tl.min(tl.where(((se & rbit) != 0) & (nsend < send) & rv, nsend * 64 + offs_r, KEYBIG), axis=0)
            src = sk % 64
            tl.store(ds_ptr + (b * R + offs_r) * D + nrecv, tl.zeros([BLOCK_R], dtype=tl.int32) + src,
                     mask=(offs_r == dest) & use_b)
            cp = use_b.to(tl.int32)
            nsend = nsend + tl.where(offs_r == src, cp, 0)
            full = use_b & (sk // 64 + 1 >= send)
            sendmask = tl.where(full, sendmask & ~(tl.full((), 1, tl.int64) << src.to(tl.int64)), sendmask)
            nrecv = nrecv + tl.where(offs_r == dest, cp, 0)
            ncopy = ncopy + cp
            it = it + moving.to(tl.int32)
            go = moving & (it < max_iters)
        # final even split of a rank's tokens over its static slots of the same expert
        same2 = (X[:, :, None] == X[:, None, :]) & static_col[None, :, None] & static_col[None, None, :]  # [R, J, J]
        cnt = tl.sum(same2.to(tl.int32), axis=2)
        tot = tl.sum(tl.where(same2, T[:, None, :], 0), axis=2)
        pos = tl.sum((same2 & (offs_j[None, None, :] < offs_j[None, :, None])).to(tl.int32), axis=2)
        cnt1 = tl.maximum(cnt, 1)
        q = tot // cnt1
        split = q + (pos < tot - q * cnt1).to(tl.int32)
        out = tl.where(static_col[None, :], split, T)
        ov = rv[:, None] & (offs_j[None, :] < PD)
        tl.store(st_ptr + b * R * PD + offs_r[:, None] * PD + offs_j[None, :], out, mask=ov)
        dv = rv[:, None] & (offs_j[None, :] >= P) & (offs_j[None, :] < PD)
        tl.store(de_ptr + b * R * D + offs_r[:, None] * D + (offs_j[None, :] - P), X, mask=dv)
        tl.store(l_ptr + b * R + offs_r, L, mask=rv)
        tl.store(info_ptr + b * 2, ncopy)
        tl.store(info_ptr + b * 2 + 1, it)


def plan_replication_gpu_before(
    counts: torch.Tensor,
    tables: dict[str, torch.Tensor],
    dynamic_slots: int,
    *,
    max_recv: int | None = None,
    max_send: int | None = None,
    max_copies: int | None = None,
    max_iters: int | None = None,
    min_copy_gain: int = 1,
    num_warps: int = 8,
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
    c = counts.reshape(-1, E).to(torch.int32).contiguous()
    B = c.shape[0]
    if B % LM:
        raise InputError(f"counts: {B} problems is not a multiple of the tables' {LM} layers")
    D = int(dynamic_slots)
    if D < 0:
        raise InputError(f"dynamic_slots: expected an integer >= 0, got {dynamic_slots!r}")
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
    out["dyn_source"].fill_(-1)
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
        E, R, P, Dp if D else 0, LM, recv, send, total, iters, max(int(min_copy_gain), 1),
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
