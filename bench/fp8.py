"""FP8 block-scaled expert compute vs bf16 on one GPU, DeepSeek-V3 expert shape (hidden 7168, intermediate 2048).

What one EP rank runs on the rows it received (:func:`eplb.runtime.fp8.fp8_expert_ffn`): SwiGLU experts over
rows grouped by local slot, ``--slots`` slots (default 32: 256 experts on EP 8), rows spread over the slots
uniformly at random (SYNTHETIC routing, seeded), weights random and quantised to FP8 with 128x128 block scales
(DeepSeek-V3 layout). Variants, all on the same FP8 weights:

* ``bf16 grouped``: the weights dequantised once to bf16, then the dense grouped GEMM (``grouped_mm``) -- what a
  bf16 checkpoint of the same model would run;
* ``fp8 triton``: the FP8 grouped GEMM Triton kernel (activations quantised per token and 128 columns), both
  GEMMs, the activation and both activation quantisations included;
* ``fp8 dequant+grouped``: the fallback of GPUs without FP8 (dequantise all local slots at every call).

Error columns: ``fp8 triton`` against the dequantise-then-bf16 reference (``bf16 grouped`` on the same
dequantised weights) and against a float32 reference (dequantised weights, float32 activations, loop).
Also the FP8 GEMM alone (first GEMM, ``[M, 7168] x [4096, 7168]^T`` per slot) for a few tile heights.

GPU:  python bench/fp8.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from _common import REPO, command_line, device_name, sample_ms, today, utc_minute, write_text
from eplb.runtime.compute import expert_ffn
from eplb.runtime.fp8 import (
    dequantize_blockwise,
    fp8_expert_ffn,
    fp8_grouped_mm,
    quantize_act,
    quantize_blockwise,
)


def med(fn, dev, warmup, repeats) -> float:
    return statistics.median(sample_ms(fn, dev, warmup, repeats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--rows", default="128,512,2048,8192,32768", help="rows per rank (decode: <= 2048, prefill: more)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fp8.md"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):  # the interpreter: a CPU smoke run
        print("bench/fp8.py: needs a CUDA GPU with FP8 (compute capability >= 8.9)", file=sys.stderr)
        return 2
    H, inter, S = args.hidden, args.inter, args.slots
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(S, 2 * inter, H, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    q13, s13 = quantize_blockwise(w13)
    del w13
    w2 = torch.randn(S, H, inter, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    q2, s2 = quantize_blockwise(w2)
    del w2
    d13 = dequantize_blockwise(q13, s13, dtype=torch.bfloat16)
    d2 = dequantize_blockwise(q2, s2, dtype=torch.bfloat16)
    fp8_bytes = q13.numel() + q2.numel() + 4 * (s13.numel() + s2.numel())
    rows_list = [int(r) for r in args.rows.split(",")]
    flops_row = 2 * 3 * H * inter
    lines, table = [], []
    gemm_rows = []
    for M in rows_list:
        slot = torch.randint(0, S, (M,), device=dev, generator=g)
        counts = torch.bincount(slot, minlength=S)
        x = torch.randn(M, H, device=dev, generator=g, dtype=torch.bfloat16)
        t_bf16 = med(lambda x=x, c=counts: expert_ffn(x, c, d13, d2, impl="grouped"), dev, args.warmup, args.repeats)
        t_fp8 = med(lambda x=x, c=counts: fp8_expert_ffn(x, c, q13, s13, q2, s2, impl="fp8-triton"), dev,
                    args.warmup, args.repeats)
        t_deq = med(lambda x=x, c=counts: fp8_expert_ffn(x, c, q13, s13, q2, s2, impl="grouped"), dev, 1,
                    max(3, args.repeats // 4))
        t_fp8_128 = med(lambda x=x, c=counts: fp8_expert_ffn(x, c, q13, s13, q2, s2, impl="fp8-triton", block_m=128),
                        dev, args.warmup, args.repeats)
        y = fp8_expert_ffn(x, counts, q13, s13, q2, s2, impl="fp8-triton").float()
        ref_bf16 = expert_ffn(x, counts, d13, d2, impl="grouped").float()
        host = counts.tolist()
        ref32 = expert_ffn(x.float(), counts, d13.float(), d2.float(), impl="loop", counts_host=host)
        err_bf16 = float((y - ref_bf16).abs().max())
        err32 = float((y - ref32).abs().max())
        rel32 = float((y - ref32).norm() / ref32.norm())
        relb = float((ref_bf16 - ref32).norm() / ref32.norm())
        amax = float(ref32.abs().max())
        tf = flops_row * M / (t_fp8 * 1e9)
        tb = flops_row * M / (t_bf16 * 1e9)
        table.append((M, t_bf16, t_fp8, t_deq, t_bf16 / t_fp8, tb, tf, err_bf16, err32, amax, rel32, relb, t_fp8_128))
        # the first GEMM alone, a few tile heights
        xq, xs = quantize_act(x)
        for bm in (16, 64, 128):
            t = med(lambda bm=bm, a=xq, s=xs, c=counts: fp8_grouped_mm(a, s, q13, s13, c, block_m=bm), dev,
                    args.warmup, args.repeats)
            gemm_rows.append((M, bm, t, 2 * M * 2 * inter * H / (t * 1e9)))
        print(f"rows {M:6d}: bf16 {t_bf16:.3f} ms, fp8 {t_fp8:.3f} ms, dequant {t_deq:.3f} ms, "
              f"max|err| vs bf16 ref {err_bf16:.3g}, rel vs fp32 {rel32:.3g}", flush=True)
        del x, y, ref_bf16, ref32, xq, xs
    lines.append("# FP8 block-scaled experts vs bf16 (DeepSeek-V3 expert shape)\n")
    lines.append(f"- device: {device_name(dev)}")
    lines.append(f"- date: {today()} ({utc_minute()})")
    lines.append(f"- command: `{command_line(argv)}` (run with `PYTHONPATH=src`)")
    lines.append(f"- shape: hidden {H}, intermediate {inter}, {S} local slots; weights random (N(0, 0.02^2)) quantised "
                 f"to float8_e4m3fn with 128x128 float32 block scales; rows spread over slots uniformly at random "
                 f"(SYNTHETIC); activations N(0, 1) bf16")
    lines.append(f"- local weights: FP8 {fp8_bytes / 1e9:.3f} GB (+ scales) vs bf16 "
                 f"{(q13.numel() + q2.numel()) * 2 / 1e9:.3f} GB; one FP8 expert = "
                 f"{fp8_bytes // S:,} bytes (bf16: {(q13.numel() + q2.numel()) * 2 // S:,})")
    lines.append(f"- times: median of {args.repeats} calls after {args.warmup} warm-ups, CUDA events "
                 f"(dequant+grouped: {max(3, args.repeats // 4)} calls)\n")
    lines.append("## Expert FFN (gate+up GEMM, SwiGLU, down GEMM)\n")
    lines.append("| rows | bf16 grouped ms | fp8 triton ms | fp8 triton ms, block_m 128 | fp8 dequant+grouped ms | "
                 "fp8 speed-up | bf16 TFLOP/s | fp8 TFLOP/s | max abs err vs dequant->bf16 ref | max abs err vs fp32 ref | "
                 "max abs ref | rel err fp8 vs fp32 | rel err bf16 vs fp32 |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        lines.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[12]:.3f} | {r[3]:.3f} | {r[4]:.2f}x | {r[5]:.0f} | "
                     f"{r[6]:.0f} | {r[7]:.3g} | {r[8]:.3g} | {r[9]:.3g} | {r[10]:.3g} | {r[11]:.3g} |")
    lines.append("\n`fp8 speed-up` = bf16 grouped / fp8 triton (default tile height); TFLOP/s count "
                 "2 x 3 x hidden x intermediate per row; errors are of `fp8 triton` (default tile height); "
                 "`rel err` = Frobenius norm of the difference / of the fp32 reference.")
    lines.append(f"\n## FP8 grouped GEMM alone (gate+up: [rows, {H}] x [{2 * inter}, {H}]^T per slot, fp32 out)\n")
    lines.append("| rows | block_m | ms | TFLOP/s |")
    lines.append("|---:|---:|---:|---:|")
    for r in gemm_rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
