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
* token side (second table; 256 experts, 72 ranks, 288 slots, top-8, 256 and 2048 tokens per rank): turning
  this rank's running shares ``cum_e [E, K]`` into a slot per token, the current code
  (:func:`eplb.dispatch.assign.balanced_token_slots`: occurrence ranks from an ``[E, N]`` prefix sum on CUDA or
  a stable sort on CPU, then the replica from one ``searchsorted`` on CUDA or a boundary histogram on CPU) against
  the previous one written out here (stable sort for the occurrence ranks + an ``[M, K]`` gather), both eager and in
  a CUDA graph, and ``assign_slots`` balanced end to end with each. Checks: new == previous on the device, and
  on CUDA every strategy's ``assign_slots`` equals the CPU result bit for bit.

    python bench/dispatch_gpu.py --device cuda            # the lead runs this on an H100
    python bench/dispatch_gpu.py --device cpu --quick     # small CPU check of the script
    python bench/dispatch_gpu.py --device cpu --token-only  # only the token-side table (CPU: seconds)
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
from _common import command_line, cuda_graphed, sample_ms, write_text
from eplb.dispatch import (
    DispatchTable,
    assign_slots,
    layer_tables,
    lp_max_load,
    plan_quotas,
    send_matrix,
    source_shares,
)
from eplb.dispatch.assign import balanced_replica, balanced_token_slots, token_occurrence
from eplb.dispatch.kernel import HAVE_TRITON, plan_quotas_triton, rank_share_cum_triton
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
    return cuda_graphed(fn, device)


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


def reference_occurrence(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The previous ``eplb.dispatch.occurrence``: stable int64 sort of the flat ids ``[M]``."""
    M = ids.shape[0]
    sorted_ids, perm = torch.sort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    starts = torch.cumsum(counts, 0) - counts
    occ_sorted = torch.arange(M, device=ids.device) - starts[sorted_ids]
    occ = torch.empty_like(occ_sorted)
    occ[perm] = occ_sorted
    return occ


def reference_token_slots(topk_ids: torch.Tensor, tab: DispatchTable, rank: int, cum_e: torch.Tensor) -> torch.Tensor:
    """The previous balanced token side: sort-based occurrence ranks + an ``[M, K]`` gather of ``cum_e``."""
    ids = topk_ids.reshape(-1).to(torch.int64)
    occ = reference_occurrence(ids, tab.num_experts)
    rep = (cum_e[ids] <= occ.unsqueeze(-1)).sum(-1)
    over = rep >= tab.logcnt[ids]
    rep = torch.where(over, torch.remainder(occ + rank, tab.logcnt[ids]), rep)
    return tab.log2phy[ids, rep].view(topk_ids.shape)


def rank_cum(g: torch.Tensor, tab: DispatchTable, rank: int) -> torch.Tensor:
    """``rank``'s running shares ``[E, K]`` as ``assign_slots`` computes them (one Triton kernel on CUDA)."""
    if g.is_cuda and HAVE_TRITON:
        return rank_share_cum_triton(g, tab, rank)[1]
    return torch.cumsum(source_shares(g, plan_quotas(g, tab), tab, rank), -1)


def token_side_config(E: int, R: int, S: int, tokens_per_rank: int, top_k: int, device: torch.device, iters: int,
                      seed: int) -> dict[str, Any]:
    """Token-side timings of one rank (rank 0) at one shape; SYNTHETIC Zipf routing, "deepseek" placement."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.as_tensor(zipf_popularity(1, E, 1.0, rng), dtype=torch.float32)[0]  # [E]
    M = tokens_per_rank * top_k

    def rank_counts() -> torch.Tensor:  # [R, E] counts of R ranks (multinomial draws; only the totals matter)
        draws = torch.multinomial(probs.expand(R, E), M, replacement=True, generator=gen)
        return torch.zeros(R, E, dtype=torch.int64).scatter_add_(1, draws, torch.ones(R, M, dtype=torch.int64))

    p = eplb.plan(rank_counts().sum(0)[None].numpy(), S, R, policy="deepseek", num_groups=8 if E % 8 == 0 else 1)
    tab_cpu = DispatchTable.from_placement(p, 0)
    ids_cpu = sample_rank_ids(probs, tokens_per_rank, top_k, gen)  # rank 0's tokens
    g_cpu = rank_counts()
    g_cpu[0] = torch.bincount(ids_cpu.view(-1), minlength=E)
    tab, ids, g = tab_cpu.to(device), ids_cpu.to(device), g_cpu.to(device)
    cum = rank_cum(g, tab, 0)
    ok = torch.equal(balanced_token_slots(ids, tab, 0, cum), reference_token_slots(ids, tab, 0, cum))
    for method in ("auto", "sort", "dense"):
        ok = ok and torch.equal(token_occurrence(ids, E, method), reference_occurrence(ids.view(-1), E))
    if device.type == "cuda":
        for strat in ("balanced", "local-first", "round-robin"):
            a = assign_slots(ids_cpu, tab_cpu, strat, rank=0, global_counts=g_cpu)
            ok = ok and torch.equal(a, assign_slots(ids, tab, strat, rank=0, global_counts=g).cpu())
    flat, occ = ids.view(-1), token_occurrence(ids, E)
    want = (cum[flat] <= occ.unsqueeze(-1)).sum(-1)
    for method in ("auto", "search", "count"):
        ok = ok and torch.equal(balanced_replica(flat, occ, cum, method), want)
    fns: dict[str, Callable[[], Any]] = {
        "occurrence ranks, previous (stable int64 sort)": lambda: reference_occurrence(ids.view(-1), E),
        "occurrence ranks, now (token_occurrence, auto)": lambda: token_occurrence(ids, E),
        "occurrence ranks, int32/int64 stable sort (method='sort')": lambda: token_occurrence(ids, E, "sort"),
        "occurrence ranks, [E, N] prefix sum (method='dense')": lambda: token_occurrence(ids, E, "dense"),
        "replica lookup, previous ([M, K] gather, compare, sum)": lambda: (cum[flat] <= occ.unsqueeze(-1)).sum(-1),
        "replica lookup, now (balanced_replica, auto)": lambda: balanced_replica(flat, occ, cum),
        "replica lookup, method='search'": lambda: balanced_replica(flat, occ, cum, "search"),
        "replica lookup, method='count'": lambda: balanced_replica(flat, occ, cum, "count"),
        "token side, previous (sort + [M, K] gather)": lambda: reference_token_slots(ids, tab, 0, cum),
        "token side, now (balanced_token_slots)": lambda: balanced_token_slots(ids, tab, 0, cum),
        "assign_slots balanced end to end, previous token side": lambda: reference_token_slots(
            ids, tab, 0, rank_cum(g, tab, 0)),
        "assign_slots balanced end to end, now": lambda: assign_slots(ids, tab, "balanced", rank=0, global_counts=g),
        "assign_slots round-robin, now": lambda: assign_slots(ids, tab, "round-robin", rank=0, global_counts=g),
    }
    timings: dict[str, float | None] = {}
    for key, fn in fns.items():
        timings[key] = timeit(fn, device, iters)
        gr = graphed(fn, device)
        timings[key + ", CUDA graph"] = timeit(gr, device, iters) if gr else None
    return {"name": f"E={E} R={R} S={S} top-{top_k}, {tokens_per_rank} tokens/rank", "equal": ok,
            "K": int(tab_cpu.log2phy.shape[1]), "timings": timings}


def graphed_many(fn: Callable[[], Any], device: torch.device, reps: int) -> Callable[[], Any] | None:
    """``reps`` calls of ``fn`` captured in one CUDA graph (a model graph holds one call per layer)."""
    return cuda_graphed(fn, device, reps)


BUDGET_REPS = 20


def budget_config(R: int, tokens_per_rank: int, policy: str, device: torch.device, iters: int,
                  seed: int) -> dict[str, Any]:
    """Issue 14's dispatch budget at E=256, S=288, top-8: the fused balanced / round-robin assign_slots against
    local-first, eager and in a CUDA graph (one call per graph, and per layer with BUDGET_REPS calls in one graph).
    SYNTHETIC Zipf routing; rank 0's tokens by Gumbel top-k, the other ranks' counts by multinomial draws."""
    from eplb.dispatch.kernel import fused_token_slots

    E, S, top_k = 256, 288, 8
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.as_tensor(zipf_popularity(1, E, 1.0, rng), dtype=torch.float32)[0]
    M = tokens_per_rank * top_k
    draws = torch.multinomial(probs.expand(R, E), M, replacement=True, generator=gen)
    g_cpu = torch.zeros(R, E, dtype=torch.int64).scatter_add_(1, draws, torch.ones(R, M, dtype=torch.int64))
    p = eplb.plan(g_cpu.sum(0)[None].numpy(), S, R, policy=policy, num_groups=8)
    tab_cpu = DispatchTable.from_placement(p, 0)
    ids_cpu = sample_rank_ids(probs, tokens_per_rank, top_k, gen)
    g_cpu[0] = torch.bincount(ids_cpu.view(-1), minlength=E)
    tab, ids, g = tab_cpu.to(device), ids_cpu.to(device), g_cpu.to(device)
    ok = True
    for strat in ("balanced", "round-robin", "local-first"):
        ref = assign_slots(ids_cpu, tab_cpu, strat, rank=0, global_counts=g_cpu, backend="torch")
        for backend in ("torch", "auto"):
            ok = ok and torch.equal(ref, assign_slots(ids, tab, strat, rank=0, global_counts=g, backend=backend).cpu())
    fns: dict[str, Callable[[], Any]] = {
        "local-first": lambda: assign_slots(ids, tab, "local-first", rank=0, global_counts=g),
        "balanced, fused (2 launches)": lambda: assign_slots(ids, tab, "balanced", rank=0, global_counts=g),
        "balanced, torch token side (before)": lambda: assign_slots(ids, tab, "balanced", rank=0, global_counts=g,
                                                                    backend="torch"),
        "round-robin, fused (1 launch)": lambda: assign_slots(ids, tab, "round-robin", rank=0, global_counts=g),
        "round-robin, torch (before)": lambda: assign_slots(ids, tab, "round-robin", rank=0, global_counts=g,
                                                            backend="torch"),
    }
    quotas = torch.empty(tab.log2phy.shape, dtype=torch.int64, device=device)
    quotas.copy_(plan_quotas(g, tab))
    for strat in ("balanced", "round-robin", "local-first"):  # the layer's send matrix: device == CPU torch
        ok = ok and torch.equal(send_matrix(g_cpu, tab_cpu, strat, backend="torch"), send_matrix(g, tab, strat).cpu())

    def layer_dispatch(strat: str, share: bool, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        # what ExpertParallelMoE.forward runs: assign_slots, then the [R, S] send matrix of the same counts
        q = quotas if share and strat == "balanced" else None
        slots = assign_slots(ids, tab, strat, rank=0, global_counts=g, quotas_out=q)
        return slots, send_matrix(g, tab, strat, quotas=q, backend=backend)

    if device.type == "cuda" and HAVE_TRITON:
        ref = assign_slots(ids_cpu, tab_cpu, "balanced", rank=0, global_counts=g_cpu, backend="torch")
        for sortfree in (True, False):  # both water-filling variants of the plan kernel equal the reference
            ok = ok and torch.equal(ref, fused_token_slots(ids, tab, "balanced", 0, g, sortfree=sortfree).cpu())
        fns["balanced, fused, plan water-filling by sort (before)"] = (
            lambda: fused_token_slots(ids, tab, "balanced", 0, g, sortfree=False))
        for nw in (2, 4):
            fns[f"balanced, fused, plan kernel num_warps={nw} (default 8)"] = (
                lambda nw=nw: fused_token_slots(ids, tab, "balanced", 0, g, num_warps=nw))
        fns["plan + shares in one program (rank_share_cum_triton)"] = lambda: rank_share_cum_triton(g, tab, 0)
        fns["token kernel alone (round-robin)"] = lambda: fused_token_slots(ids, tab, "round-robin", 0, g)
        for tb, tw in ((512, 4), (1024, 4)):
            fns[f"balanced, fused, token block {tb} / {tw} warps (default <= 2048)"] = (
                lambda tb=tb, tw=tw: fused_token_slots(ids, tab, "balanced", 0, g, token_block=tb, token_warps=tw))
        fns["send_matrix balanced alone (Triton, given quotas)"] = lambda: send_matrix(g, tab, "balanced", quotas=quotas)
    fns["layer dispatch: local-first assign_slots + send_matrix"] = lambda: layer_dispatch("local-first", False)
    fns["layer dispatch: balanced, one plan (quotas_out)"] = lambda: layer_dispatch("balanced", True)
    fns["layer dispatch: balanced, one plan, torch send_matrix (before)"] = (
        lambda: layer_dispatch("balanced", True, "torch"))
    fns["layer dispatch: balanced, two plans (before)"] = lambda: layer_dispatch("balanced", False, "torch")
    t: dict[str, dict[str, float | None]] = {}
    for key, fn in fns.items():
        eager = timeit(fn, device, iters)
        gr = graphed(fn, device)
        one = timeit(gr, device, iters) if gr else None
        gm = graphed_many(fn, device, BUDGET_REPS)
        many = timeit(gm, device, iters) / BUDGET_REPS if gm else None
        t[key] = {"eager": eager, "graph1": one, "graphL": many}
    return {"name": f"R={R}, {tokens_per_rank} tok/rank [{policy}]", "ok": ok, "K": int(tab_cpu.log2phy.shape[1]),
            "F": int(tab_cpu.fl_rank.shape[0]), "Kd": int(tab_cpu.fl_rank.shape[1]), "colors": int(tab_cpu.num_colors),
            "t": t}


def budget_lines(budget: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Dispatch budget (issue 14): E=256, S=288, top-8, rank 0 (median microseconds)", "",
             "SYNTHETIC Zipf routing. `eager`: CUDA events around one call; `graph, 1 call`: replay of a graph holding "
             f"one call; `graph, per layer`: a graph holding {BUDGET_REPS} calls (as a model graph holds one per "
             "layer), replay time / " + str(BUDGET_REPS) + ". Budget: balanced minus local-first <= 10 us per layer in "
             "a CUDA graph, <= 25 us eager. `checks`: every strategy and backend on the device equals the CPU torch "
             "reference.", ""]
    lines.append("| what | " + " | ".join(f"{b['name']} (F={b['F']}, Kd={b['Kd']}, colours={b['colors']})"
                                          for b in budget) + " |")
    lines.append("| --- |" + " --- |" * len(budget))
    lines.append("| checks | " + " | ".join("pass" if b["ok"] else "FAIL" for b in budget) + " |")
    for mode, label in (("eager", "eager"), ("graph1", "graph, 1 call"), ("graphL", "graph, per layer")):
        for key in budget[0]["t"]:
            cells = []
            for b in budget:
                v = b["t"][key][mode]
                cells.append("n/a" if v is None else f"{v:.1f}")
            lines.append(f"| {key}, {label} | " + " | ".join(cells) + " |")
        for key, base in (("balanced, fused (2 launches)", "local-first"), ("round-robin, fused (1 launch)", "local-first"),
                          ("layer dispatch: balanced, one plan (quotas_out)",
                           "layer dispatch: local-first assign_slots + send_matrix")):
            cells = []
            for b in budget:
                a, lf = b["t"][key][mode], b["t"][base][mode]
                cells.append("n/a" if a is None or lf is None else f"**{a - lf:.1f}**")
            what = key.split(',')[0] if base == "local-first" else "layer dispatch: balanced (one plan)"
            lines.append(f"| {what} minus local-first, {label} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: list[dict[str, Any]], device: torch.device, args: argparse.Namespace,
                 argv: list[str] | None, token_results: list[dict[str, Any]] | None = None,
                 budget: list[dict[str, Any]] | None = None) -> None:
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        "# Balanced dispatch: kernel timing (bench/dispatch_gpu.py)",
        "",
        f"- device: {dev_name} ({device.type}); torch {torch.__version__}; triton: {HAVE_TRITON}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command_line(argv)}`",
        f"- host: {platform.node()} ({os.cpu_count()} CPUs)",
    ]
    if results:
        lines += [
            "- data: SYNTHETIC (Zipf popularity, top-k Gumbel sampling per token and source rank); placement planned on "
            "the first half of the steps, checked on the second half.",
            "- `device == cpu`: (step, layer) problems whose device quotas equal the CPU torch reference exactly.",
            "- gap: max rank load minus the integer optimum ceil(LP bound), tokens, mean (max) over test problems.",
            "",
            "| config | policy | E | R | S | F x Kd | colours | device == cpu | imbalance uniform | balanced | LP bound "
            "| gap mean (max) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    for r in results:
        lines.append(f"| {r['name']} | {r['policy']} | {r['E']} | {r['R']} | {r['S']} | {r['F']} x {r['Kd']} | {r['colors']} | "
                     f"{r['equal']} | {r['imb_uniform']:.4f} | {r['imb_balanced']:.4f} | {r['imb_lp']:.4f} | "
                     f"{r['gap_mean']:.3f} ({r['gap_max']:.0f}) |")
    if results:
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
    if token_results:
        lines += ["", "## Token side (median microseconds, rank 0; SYNTHETIC Zipf routing, deepseek placement)", "",
                  "\"previous\" rows: the code before the token-side change (sort-based occurrence ranks, an [M, K] "
                  "gather of the running shares), written out in this script; \"now\": `eplb.dispatch.assign` as "
                  "installed. One synthetic step: rank 0's tokens by Gumbel top-k, the other ranks' counts by "
                  "multinomial draws.", "",
                  "`checks`: the current token side equals the previous one (sort + [M, K] gather) on this device"
                  + (", and every strategy's assign_slots on CUDA equals the CPU result" if device.type == "cuda"
                     else "") + ".", ""]
        lines.append("| what | " + " | ".join(f"{r['name']} (K={r['K']})" for r in token_results) + " |")
        lines.append("| --- |" + " --- |" * len(token_results))
        lines.append("| checks | " + " | ".join("pass" if r["equal"] else "FAIL" for r in token_results) + " |")
        for key in token_results[0]["timings"]:
            cells = ["n/a" if r["timings"][key] is None else f"{r['timings'][key]:.1f}" for r in token_results]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if budget:
        lines += budget_lines(budget)
    text = "\n".join(lines) + "\n"
    write_text(args.out, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU check of the script)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default="bench/results/dispatch_gpu.md")
    ap.add_argument("--big", action="store_true", help="also 72 ranks x 576 slots (slow: F~86 fluid experts, 9 colours)")
    ap.add_argument("--token-only", action="store_true", help="only the token-side table")
    ap.add_argument("--budget-only", action="store_true", help="only the dispatch budget table (issue 14)")
    ap.add_argument("--no-budget", action="store_true", help="skip the dispatch budget table")
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
    results: list[dict[str, Any]] = []
    token_results: list[dict[str, Any]] = []
    budget: list[dict[str, Any]] = []
    if not args.no_budget:
        for R in ((72,) if args.quick else (72, 36)):
            for tpr in ((256,) if args.quick else (256, 2048)):
                for pol in policies:
                    b = budget_config(R, tpr, pol, device, iters, seed=0)
                    budget.append(b)
                    print(f"budget {b['name']}: checks {'pass' if b['ok'] else 'FAIL'}")
                    for key, v in b["t"].items():
                        print(f"    {key:58s} " + "  ".join(
                            f"{m} {'n/a' if x is None else f'{x:8.1f}'}" for m, x in v.items()))
                    write_report(results, device, args, argv, token_results, budget)
    if args.budget_only:
        print(f"wrote {args.out}")
        return 0 if all(b["ok"] for b in budget) else 1
    for tpr in (256, 2048):  # the issue's shape: 256 experts, 72 ranks, 288 slots, top-8
        tr = token_side_config(256, 72, 288, tpr, 8, device, iters, seed=0)
        token_results.append(tr)
        print(f"token side, {tr['name']} (K={tr['K']}): checks {'pass' if tr['equal'] else 'FAIL'}")
        for key, us in tr["timings"].items():
            print(f"    {key:70s} {'n/a' if us is None else f'{us:9.1f} us'}")
        write_report(results, device, args, argv, token_results, budget)
    if args.token_only:
        configs = []
    for name, E, R, S, L, T, tpr, k in configs:
        for pol in policies:
            r = run_config(name, E, R, S, L, T, tpr, k, pol, device, iters, seed=0)
            results.append(r)
            print(f"{name} [{pol}]: F={r['F']} Kd={r['Kd']} colours={r['colors']} device==cpu {r['equal']}; "
                  f"imbalance uniform {r['imb_uniform']:.4f} balanced {r['imb_balanced']:.4f} LP {r['imb_lp']:.4f}; "
                  f"gap to integer optimum {r['gap_mean']:.3f} tokens (max {r['gap_max']:.0f})")
            for key, us in r["timings"].items():
                print(f"    {key:60s} {'n/a' if us is None else f'{us:9.1f} us'}")
            write_report(results, device, args, argv, token_results, budget)  # after every config: a time-out leaves a file
    print(f"wrote {args.out}")
    return 0 if all(r["equal"] for r in token_results) and all(b["ok"] for b in budget) else 1


if __name__ == "__main__":
    raise SystemExit(main())
