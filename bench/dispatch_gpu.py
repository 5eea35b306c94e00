"""Kernel timing of balanced dispatch (the per-layer solver and the whole assign_slots), CPU or CUDA.

SYNTHETIC routing (Zipf-skewed popularity, DeepSeek-V3 shape: 256 experts, top-8), planned with the
"deepseek" policy (8 groups) and, when registered, "eplb-dispatch". For each configuration it checks that
the device result equals the CPU torch reference bit for bit, compares the max rank load with the LP bound
(HiGHS, CPU) and times, median of ``--iters`` after warm-up (CUDA events on GPU):

* ``solver``: :func:`eplb.dispatch.plan_quotas` for one layer ([R, E] global counts in, per-replica quotas out),
  eager and captured in a CUDA graph (the fused Triton kernel on CUDA when available, and the pure-torch backend);
  also with fewer sweeps (3+1) and none (0+0: the kernel's fixed cost);
* ``fused kernel, all layers``: one Triton launch for every layer of a step (per-layer time = total / L);
* ``assign_slots``: the whole balanced assignment of one rank's tokens (plan + shares + slot lookup), eager and
  CUDA graph; local-first and round-robin for reference.

    python bench/dispatch_gpu.py --device cuda            # the lead runs this on an H100
    python bench/dispatch_gpu.py --device cpu --quick     # small CPU check of the script
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import eplb
from _common import command_line, sample_ms, write_text
from eplb.dispatch import DispatchTable, assign_slots, layer_tables, lp_max_load, plan_quotas
from eplb.dispatch.kernel import HAVE_TRITON, plan_quotas_triton
from eplb.dispatch.split import expert_ranks
from eplb.synthetic import zipf_popularity


def sample_rank_ids(probs: torch.Tensor, tokens: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """``[tokens, top_k]`` distinct experts per token (Gumbel top-k of ``probs`` ``[E]``). SYNTHETIC."""
    g = -torch.log(-torch.log(torch.rand(tokens, probs.numel(), generator=gen).clamp_min(1e-12)))
    return torch.topk(torch.log(probs + 1e-30) + g, top_k, dim=-1).indices


def timeit(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median microseconds of ``fn()``."""
    return statistics.median(sample_ms(fn, device, warmup, iters)) * 1e3


def graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any] | None:
    """``fn`` captured in a CUDA graph (None on CPU)."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def run_config(name: str, E: int, R: int, S: int, layers: int, steps: int, tokens_per_rank: int, top_k: int,
               policy: str, device: torch.device, iters: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.as_tensor(zipf_popularity(layers, E, 1.0, rng), dtype=torch.float32)  # [L, E]
    # per (step, layer, source rank) expert counts, and one rank's ids of the last step
    g_all = torch.zeros(steps, layers, R, E, dtype=torch.int64)
    ids_last = []
    for t in range(steps):
        for layer in range(layers):
            ids = sample_rank_ids(probs[layer], tokens_per_rank * R, top_k, gen).view(R, tokens_per_rank, top_k)
            g_all[t, layer] = torch.zeros(R, E, dtype=torch.int64).scatter_add_(
                1, ids.reshape(R, -1), torch.ones(R, tokens_per_rank * top_k, dtype=torch.int64))
            if t == steps - 1:
                ids_last.append(ids[0])
    counts = g_all.sum(2)  # [T, L, E]
    half = steps // 2
    p = eplb.plan(counts[:half].numpy(), S, R, policy=policy, num_groups=8 if E % 8 == 0 else 1)
    tabs_cpu = [DispatchTable.from_placement(p, layer) for layer in range(layers)]
    tabs = [t.to(device) for t in tabs_cpu]

    # correctness: device quotas == CPU torch quotas, and quality vs the LP bound, on the test steps
    equal = total = 0
    gaps, lbs, maxes, unif = [], [], [], []
    rr = expert_ranks(p)
    for t in range(half, steps):
        for layer in range(layers):
            g = g_all[t, layer]
            q_cpu = plan_quotas(g, tabs_cpu[layer], backend="torch")
            q_dev = plan_quotas(g.to(device), tabs[layer]).cpu()
            equal += int(torch.equal(q_cpu, q_dev))
            total += 1
            tab = tabs_cpu[layer]
            slot_q = torch.zeros(S, dtype=torch.int64).scatter_add_(0, tab.log2phy.clamp(min=0).view(-1), q_cpu.view(-1))
            mx = int(slot_q.view(R, -1).sum(1).max())
            lb = float(lp_max_load(g.sum(0).numpy(), rr[layer], R))
            c = g.sum(0).double()
            u = (c / tab.logcnt.double())[tab.phy2log].view(R, -1).sum(1).max().item()
            gaps.append(mx - np.ceil(lb - 1e-9))
            lbs.append(lb)
            maxes.append(mx)
            unif.append(u)
    mean_load = float(counts[half:].sum(-1).double().mean()) / R

    res: dict[str, Any] = {
        "name": name, "E": E, "R": R, "S": S, "layers": layers, "policy": policy,
        "tokens_per_rank": tokens_per_rank, "top_k": top_k,
        "F": int(tabs_cpu[0].fl_rank.shape[0]), "Kd": int(tabs_cpu[0].fl_rank.shape[1]),
        "colors": int(tabs_cpu[0].num_colors),
        "equal": f"{equal}/{total}",
        "gap_mean": float(np.mean(gaps)), "gap_max": float(np.max(gaps)),
        "imb_balanced": float(np.mean(maxes)) / mean_load - 1, "imb_lp": float(np.mean(lbs)) / mean_load - 1,
        "imb_uniform": float(np.mean(unif)) / mean_load - 1,
    }

    # timing, layer 0 of the last step
    g = g_all[-1, 0].to(device)
    tab = tabs[0]
    ids = ids_last[0].to(device)
    timings: dict[str, float | None] = {}
    timings["solver (auto backend)"] = timeit(lambda: plan_quotas(g, tab), device, iters)
    timings["solver (torch backend)"] = timeit(lambda: plan_quotas(g, tab, backend="torch"), device, iters)
    gr = graphed(lambda: plan_quotas(g, tab), device)
    timings["solver (auto backend), CUDA graph"] = timeit(gr, device, iters) if gr else None
    gr = graphed(lambda: plan_quotas(g, tab, backend="torch"), device)
    timings["solver (torch backend), CUDA graph"] = timeit(gr, device, iters) if gr else None
    if device.type == "cuda" and HAVE_TRITON:
        t_all = layer_tables(p)
        dev_t = {k: torch.as_tensor(v, device=device) for k, v in t_all.items() if isinstance(v, np.ndarray)}
        g_layers = g_all[-1].to(device).contiguous()  # [L, R, E]

        def all_layers() -> torch.Tensor:
            return plan_quotas_triton(g_layers, dev_t, int(t_all["num_colors"]), R)

        ref0 = plan_quotas(g_all[-1, 0], tabs_cpu[0], backend="torch")
        assert torch.equal(all_layers()[0, :, :ref0.shape[-1]].cpu(), ref0)  # batched tables pad K to the widest layer
        gr = graphed(all_layers, device)
        t_total = timeit(gr, device, iters) if gr else float("nan")
        timings[f"fused kernel, all {layers} layers in one launch, CUDA graph, per layer"] = t_total / layers
        for sw, isw in ((3, 1), (0, 0)):
            def fewer(sw: int = sw, isw: int = isw) -> torch.Tensor:
                return plan_quotas(g, tab, sweeps=sw, int_sweeps=isw)

            gr = graphed(fewer, device)
            timings[f"solver sweeps={sw}+{isw} (default 6+2), CUDA graph"] = timeit(gr, device, iters) if gr else None
    for strat in ("balanced", "local-first", "round-robin"):
        def fn(strat: str = strat) -> torch.Tensor:
            return assign_slots(ids, tab, strat, rank=0, global_counts=g)
        timings[f"assign_slots {strat} ({ids.shape[0]}x{top_k} ids)"] = timeit(fn, device, iters)
        gr = graphed(fn, device)
        timings[f"assign_slots {strat}, CUDA graph"] = timeit(gr, device, iters) if gr else None
    res["timings"] = timings
    return res


def write_report(results: list[dict[str, Any]], device: torch.device, args: argparse.Namespace,
                 argv: list[str] | None) -> None:
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        "# Balanced dispatch: kernel timing (bench/dispatch_gpu.py)",
        "",
        f"- device: {dev_name} ({device.type}); torch {torch.__version__}; triton: {HAVE_TRITON}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command_line(argv)}`",
        f"- host: {platform.node()} ({os.cpu_count()} CPUs)",
        "- data: SYNTHETIC (Zipf popularity, top-k Gumbel sampling per token and source rank); placement planned on the "
        "first half of the steps, checked on the second half.",
        "- `device == cpu`: (step, layer) problems whose device quotas equal the CPU torch reference exactly.",
        "- gap: max rank load minus the integer optimum ceil(LP bound), tokens, mean (max) over test problems.",
        "",
        "| config | policy | E | R | S | F x Kd | colours | device == cpu | imbalance uniform | balanced | LP bound | gap mean (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['policy']} | {r['E']} | {r['R']} | {r['S']} | {r['F']} x {r['Kd']} | {r['colors']} | "
                     f"{r['equal']} | {r['imb_uniform']:.4f} | {r['imb_balanced']:.4f} | {r['imb_lp']:.4f} | "
                     f"{r['gap_mean']:.3f} ({r['gap_max']:.0f}) |")
    lines += ["", "## Timings (median microseconds)", ""]
    keys = list(results[0]["timings"])
    lines.append("| what | " + " | ".join(f"{r['name']} [{r['policy']}]" for r in results) + " |")
    lines.append("| --- |" + " --- |" * len(results))
    for key in keys:
        cells = []
        for r in results:
            v = r["timings"].get(key)
            cells.append("n/a" if v is None else f"{v:.1f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_text(args.out, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU check of the script)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default="bench/results/dispatch_gpu.md")
    ap.add_argument("--big", action="store_true", help="also 72 ranks x 576 slots (slow: F~86 fluid experts, 9 colours)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    iters = args.iters or (5 if args.quick else 50)
    policies = ["deepseek"] + (["eplb-dispatch"] if "eplb-dispatch" in eplb.POLICIES else [])
    if args.quick:
        configs = [("DSv3-like 72 ranks (quick)", 256, 72, 288, 2, 4, 16, 8)]
        policies = policies[:1]
    else:
        configs = [
            ("DSv3-like 72 ranks", 256, 72, 288, 4, 8, 128, 8),
            ("DSv3-like 36 ranks", 256, 36, 288, 4, 8, 128, 8),
        ]
        if args.big:
            configs.append(("DSv3-like 72 ranks, 576 slots", 256, 72, 576, 4, 8, 128, 8))
    results = []
    for name, E, R, S, L, T, tpr, k in configs:
        for pol in policies:
            r = run_config(name, E, R, S, L, T, tpr, k, pol, device, iters, seed=0)
            results.append(r)
            print(f"{name} [{pol}]: F={r['F']} Kd={r['Kd']} colours={r['colors']} device==cpu {r['equal']}; "
                  f"imbalance uniform {r['imb_uniform']:.4f} balanced {r['imb_balanced']:.4f} LP {r['imb_lp']:.4f}; "
                  f"gap to integer optimum {r['gap_mean']:.3f} tokens (max {r['gap_max']:.0f})")
            for key, us in r["timings"].items():
                print(f"    {key:60s} {'n/a' if us is None else f'{us:9.1f} us'}")
            write_report(results, device, args, argv)  # after every configuration: a time-out still leaves a file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
