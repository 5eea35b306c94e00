"""FP8 block-scaled expert weights (DeepSeek-V3 layout) and their SwiGLU expert compute.

Layout (the DeepSeek-V3 checkpoint's): a weight ``W [N, K]`` is stored as ``weight`` ``float8_e4m3fn
[N, K]`` plus ``weight_scale_inv`` ``float32 [ceil(N/bn), ceil(K/bk)]`` (default ``bn = bk = 128``),
and ``W ~= weight * weight_scale_inv`` blockwise (``weight_scale_inv[i, j]`` multiplies the block
``[i*bn:(i+1)*bn, j*bk:(j+1)*bk]``). The EP layer stacks the gate and up projections as ``w13 [spr,
2I, H]`` (scales ``[spr, 2I/bn, ceil(H/bk)]``, so ``I`` must be a multiple of ``bn``) and the down
projection as ``w2 [spr, H, I]`` (scales ``[spr, ceil(H/bn), ceil(I/bk)]``).

Compute (:func:`fp8_expert_ffn`), same inputs and outputs everywhere:

* ``"fp8-triton"`` (CUDA, compute capability >= 8.9, Triton installed): a grouped GEMM Triton kernel
  on FP8 operands. Activations are quantised per token and per ``bk`` columns (1 x 128 groups, the
  DeepSeek-V3 recipe); the kernel multiplies each ``bk``-wide K step's FP32 partial product by the
  activation and weight block scales. One launch per GEMM for all local slots, no host sync.
* ``"dequant"`` (CPU, older GPUs, no Triton): dequantise the weights at use
  (:func:`dequantize_blockwise`, exact: an FP8 value times an FP32 scale) into the compute dtype,
  then the dense :func:`eplb.runtime.compute.expert_ffn`. The CPU tests run the whole layer on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from eplb.runtime.compute import Activation, expert_ffn, resolve_impl

__all__ = ["FP8_DTYPE", "FP8_MAX", "dequantize_blockwise", "fp8_expert_ffn", "fp8_grouped_mm", "quantize_act",
           "quantize_blockwise", "resolve_fp8_impl", "scale_shape", "triton_available"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)


def scale_shape(rows: int, cols: int, block: Sequence[int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a ``[rows, cols]`` weight: ``(ceil(rows/bn), ceil(cols/bk))``."""
    bn, bk = int(block[0]), int(block[1])
    return (-(-int(rows) // bn), -(-int(cols) // bk))


def _expand(scale: torch.Tensor, rows: int, cols: int, block: Sequence[int]) -> torch.Tensor:
    bn, bk = int(block[0]), int(block[1])
    return scale.repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :cols]


def quantize_blockwise(w: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight float8_e4m3fn [..., N, K], weight_scale_inv float32 [..., ceil(N/bn), ceil(K/bk)])`` of ``w``.

    Each block's scale is its max magnitude / 448 (the e4m3 maximum), so the block uses FP8's whole range.
    """
    if w.ndim < 2:
        raise ValueError(f"quantize_blockwise: expected a [..., N, K] weight, got shape {tuple(w.shape)}")
    rows, cols = int(w.shape[-2]), int(w.shape[-1])
    nb, kb = scale_shape(rows, cols, block)
    bn, bk = int(block[0]), int(block[1])
    x = w.detach().float()
    pad = F.pad(x, (0, kb * bk - cols, 0, nb * bn - rows))
    blocks = pad.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn))  # [..., nb, bn, kb, bk]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (x / _expand(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale.to(torch.float32).contiguous()


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale_inv`` blockwise, in ``dtype`` (computed in float32, or float64 for a float64 ``dtype``)."""
    rows, cols = int(q.shape[-2]), int(q.shape[-1])
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(work) * _expand(scale_inv.to(work), rows, cols, block)).to(dtype)


def quantize_act(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-``group``-column FP8 quantisation of activations ``[M, K]``:
    ``(x_fp8 [M, K], x_scale float32 [M, ceil(K/group)])`` with ``x ~= x_fp8 * x_scale``."""
    M, K = int(x.shape[0]), int(x.shape[1])
    kb = -(-K // group)
    xf = F.pad(x.float(), (0, kb * group - K)).view(M, kb, group)
    s = (xf.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(M, kb * group)[:, :K]
    return q.contiguous(), s.contiguous()


# ------------------------------------------------------------------------------------ triton
_TRITON: dict[str, Any] = {}


def triton_available() -> bool:
    """Whether Triton can be imported (the kernel itself only runs on CUDA)."""
    if "ok" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON["ok"] = True
        except Exception:  # noqa: BLE001 - any import failure means no Triton
            _TRITON["ok"] = False
    return bool(_TRITON["ok"])


def _kernel() -> Any:
    if "kernel" in _TRITON:
        return _TRITON["kernel"]
    import triton
    import triton.language as tl

    @triton.jit
    def _fp8_grouped_gemm(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr,
                          N, K, stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_N: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_e_ptr + pid_t)
        if e < 0:
            return
        r0 = tl.load(tile_r0_ptr + pid_t)
        r1 = tl.load(tile_r1_ptr + pid_t)
        offs_m = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < r1
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
        bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + (offs_n // GROUP_N) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
            b_s = tl.load(bs_ptrs + kb, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _TRITON["kernel"] = _fp8_grouped_gemm
    return _fp8_grouped_gemm


def _tile_schedule(counts: torch.Tensor, M: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Per M-tile ``(slot, first row, end row)`` for rows grouped by slot, on the device (no host sync).
    The grid has ``ceil(M/BM) + slots`` tiles (an upper bound); unused tiles get slot ``-1``."""
    dev = counts.device
    c = counts.to(torch.int64)
    ends = torch.cumsum(c, 0)
    starts = ends - c
    tiles = (c + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_start = tile_end - tiles
    T = -(-M // block_m) + int(counts.shape[0])
    t = torch.arange(T, device=dev, dtype=torch.int64)
    slot = torch.searchsorted(tile_end, t, right=True).clamp(max=int(counts.shape[0]) - 1)
    valid = t < tile_end[-1]
    r0 = starts[slot] + (t - tile_start[slot]) * block_m
    r1 = ends[slot]
    slot = torch.where(valid, slot, torch.full_like(slot, -1))
    return slot.to(torch.int32).contiguous(), r0.to(torch.int32).contiguous(), r1.to(torch.int32).contiguous()


def fp8_grouped_mm(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   counts: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK,
                   out_dtype: torch.dtype = torch.bfloat16, block_m: int | None = None,
                   num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """``y[m] = dequant(x)[m] @ dequant(w[s])^T`` for rows grouped by slot (Triton, CUDA).

    Args:
        x: ``fp8 [M, K]`` rows grouped by slot; x_scale: ``float32 [M, ceil(K/bk)]`` (:func:`quantize_act`).
        w: ``fp8 [S, N, K]``; w_scale: ``float32 [S, ceil(N/bn), ceil(K/bk)]``.
        counts: ``[S]`` rows per slot (device).
        block_m: rows per tile (default 16 when slots average <= 16 rows, else 64); num_warps default
            4 (8 for ``block_m >= 128``).
    """
    M, K = int(x.shape[0]), int(x.shape[1])
    S, N = int(w.shape[0]), int(w.shape[1])
    bn, bk = int(block[0]), int(block[1])
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0:
        return out
    if block_m is None:
        block_m = 16 if M <= S * 16 else 64  # bench/results/fp8.md: 64 is faster from ~32 rows per slot
    block_n = 128 if bn % 128 == 0 else bn
    tile_e, tile_r0, tile_r1 = _tile_schedule(counts, M, block_m)
    grid = (int(tile_e.shape[0]), -(-N // block_n))
    _kernel()[grid](x, x_scale, w, w_scale, out, tile_e, tile_r0, tile_r1, N, K,
                    x.stride(0), x_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
                    out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, GROUP_N=bn,
                    num_warps=num_warps or (8 if block_m >= 128 else 4), num_stages=num_stages)
    return out


# ------------------------------------------------------------------------------------ compute
def resolve_fp8_impl(impl: str, w13: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK) -> str:
    """``"fp8-triton"`` where the Triton kernel runs (CUDA, compute capability >= 8.9, Triton, ``bk`` a
    power of two >= 16 and ``H``, ``I`` multiples of ``bk``), else ``"dequant"``. ``impl``: ``"auto"``,
    ``"fp8-triton"`` (error if unavailable), ``"dequant"``, or ``"grouped"`` / ``"loop"`` (dequant, then that
    dense implementation)."""
    if impl not in ("auto", "fp8-triton", "dequant", "grouped", "loop"):
        raise ValueError(f"compute: expected 'auto', 'fp8-triton', 'dequant', 'grouped' or 'loop' for FP8 experts, "
                         f"got {impl!r}")
    if impl in ("dequant", "grouped", "loop"):
        return impl
    dev = w13.device
    bk = int(block[1])
    ok = (dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9) and triton_available()
          and bk >= 16 and bk & (bk - 1) == 0 and int(w13.shape[2]) % bk == 0 and (int(w13.shape[1]) // 2) % bk == 0)
    if impl == "fp8-triton" and not ok:
        raise ValueError(f"compute: the FP8 Triton kernel needs CUDA with compute capability >= 8.9, Triton, and "
                         f"H, I multiples of a power-of-two block >= 16 (device {dev}, block {tuple(block)}); use "
                         f"compute='auto' or 'dequant'")
    return "fp8-triton" if ok else "dequant"


def fp8_expert_ffn(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                   w2: torch.Tensor, w2_scale: torch.Tensor, *, block: Sequence[int] = DEFAULT_BLOCK,
                   act: Activation = F.silu, impl: str = "dequant", compute_dtype: torch.dtype = torch.bfloat16,
                   counts_host: Sequence[int] | None = None, block_m: int | None = None) -> torch.Tensor:
    """SwiGLU experts with FP8 block-scaled weights on tokens sorted by slot; ``[M, H]`` in ``compute_dtype``.

    ``impl``: ``"fp8-triton"``; ``"dequant"`` (dequantise, then the dense grouped GEMM where it runs, else
    the loop); ``"grouped"`` / ``"loop"`` (dequantise, then that dense implementation). ``block_m``: the
    Triton kernel's tile height (default: :func:`fp8_grouped_mm`'s).
    """
    inter = int(w2.shape[2])
    if impl == "fp8-triton":
        M = int(x.shape[0])
        if M == 0:
            return x.new_zeros(0, int(w2.shape[1]), dtype=compute_dtype)
        bk = int(block[1])
        xq, xs = quantize_act(x, bk)
        h = fp8_grouped_mm(xq, xs, w13, w13_scale, counts, block, out_dtype=torch.float32, block_m=block_m)
        a = act(h[:, :inter]) * h[:, inter:]
        aq, as_ = quantize_act(a, bk)
        return fp8_grouped_mm(aq, as_, w2, w2_scale, counts, block, out_dtype=compute_dtype, block_m=block_m)
    d13 = dequantize_blockwise(w13, w13_scale, block, compute_dtype)
    d2 = dequantize_blockwise(w2, w2_scale, block, compute_dtype)
    dense = resolve_impl("auto", d13, d2) if impl == "dequant" else impl
    return expert_ffn(x, counts, d13, d2, act=act, impl=dense, counts_host=counts_host)
