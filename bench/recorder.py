"""Overhead of the always-on expert-load recorder on a DeepSeek-V3-sized MoE layer.

The layer (per EP rank, bf16 on CUDA): router GEMM ``[N, 7168] x [7168, 256]`` in fp32 with DeepSeek-V3's
grouped top-8 (sigmoid scores + bias, 8 groups, top-4 groups), the per-expert token counts a dispatch
computes for its split sizes, a sort of the ``N x 8`` token-expert pairs, SwiGLU experts (hidden 7168,
intermediate 2048) over the pairs with ``eplb.runtime.compute.expert_ffn`` (``grouped_mm`` when the device
supports it, else a loop), and the weighted combine. The 256 logical experts map onto ``--local-experts``
(8) weight sets, so the rank computes every pair of its ``N`` tokens: the per-rank expert work of EP
with attention-DP (each rank receives about ``N x 8`` pairs per step). No all-to-all.

Timed variants (same layer; ``--layers-per-step`` forwards per step, then ``recorder.step()``):

* ``base``: the layer alone;
* ``record``: + ``recorder.record(layer, topk_ids)`` (one ``index_add_`` of ones into ``[W, L, E]``);
* ``add_counts``: + ``recorder.add_counts(layer, counts)`` reusing the dispatch's per-expert counts;
* ``trtllm``: + TensorRT-LLM-style ``bincount(...).cpu()`` per layer (a host sync), for comparison.

Blocks of one step are timed with CUDA events (wall clock on CPU), each starting from an idle device,
variants interleaved round-robin, median over ``--repeats`` blocks; overhead = median(variant) / median(base) - 1.

GPU:  python bench/recorder.py --device cuda
CPU:  python bench/recorder.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import REPO, command_line, device_name, utc_minute, write_text
from eplb.runtime.compute import expert_ffn, resolve_impl
from eplb.stats.recorder import ExpertRecorder


class MoELayer:
    """DeepSeek-V3-style routed MoE layer of one EP rank (see the module doc)."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int, groups: int, topk_groups: int,
                 local: int, dev: torch.device, dtype: torch.dtype, impl: str) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        self.E, self.k, self.G, self.TG, self.local = experts, top_k, groups, topk_groups, local
        self.gate = (torch.randn(experts, hidden, generator=g) / hidden**0.5).to(dev)
        self.bias = (torch.randn(experts, generator=g) * 0.01).to(dev)
        self.w13 = (torch.randn(local, 2 * inter, hidden, generator=g) / hidden**0.5).to(dev, dtype)
        self.w2 = (torch.randn(local, hidden, inter, generator=g) / inter**0.5).to(dev, dtype)
        self.impl = resolve_impl(impl, self.w13, self.w2)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.gate).sigmoid()
        choice = scores + self.bias
        gs = choice.view(-1, self.G, self.E // self.G).topk(2, dim=-1)[0].sum(-1)
        gidx = gs.topk(self.TG, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(gs).scatter_(1, gidx, 1.0).bool()
        choice = choice.masked_fill(~mask.repeat_interleave(self.E // self.G, dim=1), float("-inf"))
        ids = choice.topk(self.k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        return ids, w / (w.sum(-1, keepdim=True) + 1e-20)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out [N, H], topk_ids [N, k], per-expert counts [E])``."""
        ids, w = self.route(x)
        expert_counts = torch.zeros(self.E, dtype=torch.int64, device=x.device)  # the dispatch's split sizes
        flat = ids.reshape(-1)
        expert_counts.index_add_(0, flat, torch.ones_like(flat))
        local = flat % self.local
        order = torch.argsort(local, stable=True)
        tok = order // self.k
        local_counts = torch.bincount(local, minlength=self.local)
        y = expert_ffn(x[tok], local_counts, self.w13, self.w2, impl=self.impl)
        out = torch.zeros_like(x)
        out.index_add_(0, tok, (y * w.reshape(-1)[order, None].to(y.dtype)).to(x.dtype))
        return out, ids, expert_counts


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    layer = MoELayer(args.hidden, args.inter, args.experts, args.top_k, args.groups, args.topk_groups,
                     args.local_experts, dev, dtype, args.compute)
    L = args.layers_per_step
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for n in args.tokens:
        x = torch.randn(n, args.hidden, device=dev, dtype=dtype)
        rec = ExpertRecorder(L, args.experts, device=dev, top_k=args.top_k, flush_every=args.flush_every)
        trt_records: dict[str, torch.Tensor] = {}

        def block(variant: str, step: list[int], rec: ExpertRecorder = rec, x: torch.Tensor = x,
                  trt: dict[str, torch.Tensor] = trt_records) -> None:
            for lid in range(L):
                _, ids, cnt = layer.forward(x)
                if variant == "record":
                    rec.record(lid, ids)
                elif variant == "add_counts":
                    rec.add_counts(lid, cnt)
                elif variant == "trtllm":
                    c = torch.bincount(ids.flatten(), minlength=args.experts).cpu()
                    key = f"{step[0]}_{lid}"
                    trt[key] = trt[key] + c if key in trt else c
            if variant in ("record", "add_counts"):
                rec.step()
            step[0] += 1

        variants = ["base", "record", "add_counts"] + (["trtllm"] if args.trtllm else [])
        times: dict[str, list[float]] = {v: [] for v in variants}
        step = [0]
        for _ in range(args.warmup):
            for v in variants:
                block(v, step)
        sync()
        for _ in range(args.repeats):
            for v in variants:
                sync()  # every block starts from an idle GPU (the trtllm variant leaves it idle after each sync)
                if dev.type == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    block(v, step)
                    b.record()
                    b.synchronize()
                    times[v].append(a.elapsed_time(b) / L)
                else:
                    t0 = time.perf_counter()
                    block(v, step)
                    times[v].append((time.perf_counter() - t0) * 1e3 / L)
        tr = rec.trace()
        rec.close()
        # both recording variants counted every routed pair of their steps
        assert int(tr.counts.sum()) == tr.num_steps * L * n * args.top_k, "recorder lost counts"
        base = statistics.median(times["base"])
        row: dict[str, Any] = {"tokens": n, "base_ms": base, "impl": layer.impl}
        for v in variants[1:]:
            med = statistics.median(times[v])
            row[f"{v}_ms"] = med
            row[f"{v}_pct"] = (med / base - 1) * 100
        # the recorder's own work in isolation: one record()/add_counts() call, per layer
        ids = layer.route(x)[0]
        cnt = torch.ones(args.experts, dtype=torch.int64, device=dev)
        rec2 = ExpertRecorder(1, args.experts, device=dev, flush_every=1)
        row["record_us"] = _op_time(lambda r=rec2, i=ids: r.record(0, i), dev, args) * 1e3
        row["add_counts_us"] = _op_time(lambda r=rec2, c=cnt: r.add_counts(0, c), dev, args) * 1e3
        row["bincount_cpu_us"] = _op_time(lambda i=ids: torch.bincount(i.flatten(), minlength=args.experts).cpu(),
                                          dev, args) * 1e3
        if dev.type == "cuda":  # device time only: calls queued behind a sleep kernel, so launch cost is hidden
            row["record_gpu_us"] = _gpu_time(lambda r=rec2, i=ids: r.record(0, i)) * 1e3
            row["add_counts_gpu_us"] = _gpu_time(lambda r=rec2, c=cnt: r.add_counts(0, c)) * 1e3
            row["record_gpu_pct"] = row["record_gpu_us"] / (base * 1e3) * 100
        rows.append(row)
        del x
    return rows


def _gpu_time(fn: Any, n: int = 200, sleep: bool = True) -> float:
    """Mean ms of GPU time per ``fn`` call: the calls run back to back (behind a sleep kernel when ``sleep``)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep:
        torch.cuda._sleep(50_000_000)  # ~25-30 ms: the host enqueues every call meanwhile
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def _op_time(fn: Any, dev: torch.device, args: argparse.Namespace, n: int = 200) -> float:
    """Mean ms of ``fn`` over ``n`` back-to-back calls (CUDA events / wall clock)."""
    if dev.type == "cuda":
        return _gpu_time(fn, n, sleep=False)
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU check)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per step (default 256 2048 8192)")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048, help="expert intermediate size")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--topk-groups", type=int, default=4)
    ap.add_argument("--local-experts", type=int, default=8, help="weight sets on the rank")
    ap.add_argument("--layers-per-step", type=int, default=58, help="MoE layers per step (DeepSeek-V3: 58)")
    ap.add_argument("--flush-every", type=int, default=4,
                    help="recorder: steps per device buffer (small = host copies inside the timed steps)")
    ap.add_argument("--compute", default="auto", choices=["auto", "grouped", "loop"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-trtllm", dest="trtllm", action="store_false", help="skip the bincount+.cpu() variant")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.inter = min(args.hidden, 256), min(args.inter, 128)
        args.layers_per_step = min(args.layers_per_step, 4)
        args.repeats = min(args.repeats, 5)
        args.warmup = 1
        args.tokens = args.tokens or [64, 256]
    args.tokens = args.tokens or [256, 2048, 8192]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/recorder.py: --device cuda but CUDA is not available")
    rows = run(args)
    cmd = command_line(argv)
    head = ("| tokens/step | layer fwd (ms) | + record (ms) | overhead | + add_counts (ms) | overhead |"
            + (" + bincount().cpu() (ms) | overhead |" if args.trtllm else "")
            + " record() alone (us) | add_counts() alone (us) | bincount().cpu() alone (us) |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['tokens']} | {r['base_ms']:.3f} | {r['record_ms']:.3f} | {r['record_pct']:+.2f}% | "
                f"{r['add_counts_ms']:.3f} | {r['add_counts_pct']:+.2f}% |")
        if args.trtllm:
            line += f" {r['trtllm_ms']:.3f} | {r['trtllm_pct']:+.2f}% |"
        line += f" {r['record_us']:.1f} | {r['add_counts_us']:.1f} | {r['bincount_cpu_us']:.1f} |"
        lines.append(line)
    if dev.type == "cuda":
        lines += ["", "| tokens/step | record() GPU time (us) | = % of the layer forward | add_counts() GPU time (us) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['record_gpu_us']:.2f} | {r['record_gpu_pct']:.3f}% | {r['add_counts_gpu_us']:.2f} |"
                  for r in rows]
    table = "\n".join(lines)
    print(table)
    tag = "cpu" if dev.type == "cpu" else "cuda"
    out = args.out or REPO / "bench" / "results" / ("recorder.md" if tag == "cuda" else "recorder_cpu.md")
    md = [
        "# Recorder overhead on a DeepSeek-V3-sized MoE layer",
        "",
        f"- device: {device_name(dev)}",
        f"- date: {utc_minute()}",
        f"- command: `{cmd}`",
        f"- layer: hidden {args.hidden}, expert intermediate {args.inter}, {args.experts} experts, top-{args.top_k} "
        f"(grouped: {args.groups} groups, top-{args.topk_groups}), {args.local_experts} local weight sets, "
        f"{'bf16' if dev.type == 'cuda' else 'fp32'}, expert compute `{rows[0]['impl']}`",
        f"- {args.layers_per_step} layer forwards per step, then `recorder.step()`; recorder buffer {args.flush_every} "
        f"steps; median of {args.repeats} interleaved steps per variant; times per layer forward",
        "- overhead = median(variant) / median(layer alone) - 1 (negative values = below the noise)",
        "",
        table,
        "",
        "`record()` = `ExpertRecorder.record(layer, topk_ids)` (index_add_ of ones, no host sync); `add_counts()` = "
        "`ExpertRecorder.add_counts(layer, counts)` with the dispatch's per-expert counts; `bincount().cpu()` = what "
        "TensorRT-LLM's statistic does per layer (a host sync). 'alone' columns: mean of 200 back-to-back calls (host "
        "bound: Python + launch). 'GPU time': the same calls queued behind a sleep kernel, so only device time counts "
        "(the recorder's cost when the host runs ahead of the GPU, as in steady-state serving).",
        "",
    ]
    if args.quick:
        md.insert(2, "**Quick CPU run (reduced sizes): checks the script, not the GPU target.**\n")
    write_text(out, "\n".join(md))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
