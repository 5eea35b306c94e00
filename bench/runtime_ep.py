"""Expert-parallel MoE layers on 2 GPUs with trace-driven routing: identity vs DeepSeek vs eplb placements.

A stack of ``--layers`` MoE layers with DeepSeek-V3 experts (hidden 7168, expert intermediate 2048, bf16)
and the experts of a real trace (default: Llama-4-Maverick MMLU decode routing, 128 experts; each
token's ``--top-k`` distinct experts drawn with the trace's per-expert counts of that step and layer,
:class:`eplb.runtime.TraceRouter`). Each step every rank routes ``--batch`` tokens through every layer
(:class:`eplb.runtime.ExpertParallelMoE`: two all-to-alls + grouped GEMM).

Placements are planned on the first half of the trace (``--fit-steps``) and timed on the other half
(held out): ``identity`` (no redundancy), ``deepseek`` (DeepSeek's EPLB) and ``eplb`` (this package's
best policy) with ``--redundant`` extra slots per rank, each under the ``local-first``, ``round-robin``
and ``balanced`` replica strategies.

Reported per configuration: step time (all layers) mean / p50 / p99 (ms, slowest rank), (token, expert)
pairs computed per rank, mean imbalance (max/mean - 1 per step and layer), the measured gain (identity
mean step time / this one) and the ideal gain (sum over steps and layers of the busiest rank's pairs under
identity / under this configuration: what removing the imbalance buys if time followed the busiest rank).

GPU (2 GPUs):  torchrun --nproc-per-node 2 bench/runtime_ep.py --device cuda
CPU check:     python bench/runtime_ep.py --device cpu --quick     (spawns 2 gloo processes itself)
               torchrun --nproc-per-node 2 bench/runtime_ep.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before any NCCL communicator exists

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU check)")
    ap.add_argument("--trace", default="llama4_maverick_mmlu_decode", help="built-in trace name")
    ap.add_argument("--hidden", type=int, default=None, help="default 7168 (--quick 64)")
    ap.add_argument("--intermediate", type=int, default=None, help="default 2048 (--quick 32)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--batch", default=None, help="tokens per rank per step, comma list: one table each "
                                                  "(default 256,4096: decode-like and prefill-like; --quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="repeat all configurations, alternating their order "
                                                              "(default 2; --quick 1)")
    ap.add_argument("--layers", type=int, default=None, help="MoE layers (trace layers evenly spaced; default 4; "
                                                              "--quick 2)")
    ap.add_argument("--redundant", type=int, default=None, help="extra slots per rank (default E/16 per rank)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 40; --quick 4)")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 (--quick 1)")
    ap.add_argument("--fit-steps", default=None, help="trace steps the placements are planned on (default first half)")
    ap.add_argument("--policies", default="deepseek,eplb")
    ap.add_argument("--strategies", default="local-first,round-robin,balanced")
    ap.add_argument("--max-num-tokens", type=int, default=None)
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    ap.add_argument("--out", default=None, help="markdown (default bench/results/runtime_ep[_cpu].md)")
    ap.add_argument("--json-out", default=None, help="raw JSON (default next to --out)")
    a = ap.parse_args(argv)
    q = a.quick
    a.hidden = a.hidden or (64 if q else 7168)
    a.intermediate = a.intermediate or (32 if q else 2048)
    a.batch = [int(v) for v in str(a.batch or ("16" if q else "256,4096")).split(",")]
    a.rounds = a.rounds or (1 if q else 2)
    a.layers = a.layers or (2 if q else 4)
    a.steps = a.steps or (4 if q else 40)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 5)
    return a


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_assign(layer: Any, ids: torch.Tensor, world: int, dev: torch.device, reps: int = 10) -> float:
    """Median ms of this layer's replica assignment alone (``assign_slots``; balanced: its solver), no collectives."""
    from eplb.dispatch import assign_slots

    table = layer._dispatch_table()
    gc = torch.bincount(ids.reshape(-1), minlength=layer.num_experts).repeat(world, 1)
    times = []
    for i in range(reps + 2):
        _sync(dev)
        t0 = time.perf_counter()
        assign_slots(ids, table, layer.dispatch_strategy, rank=layer.rank,
                     global_counts=gc if layer.dispatch_strategy == "balanced" else None)
        _sync(dev)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run_rank(rank: int, world: int, a: argparse.Namespace, cmd: str) -> dict[str, Any] | None:
    """The benchmark on one rank (process group initialised)."""
    from eplb.datasets import load_builtin
    from eplb.placement import Placement
    from eplb.policies import POLICIES, plan
    from eplb.runtime.layer import ExpertParallelMoE
    from eplb.runtime.trace_router import TraceRouter
    from eplb.stats.trace import parse_range

    dev = torch.device(a.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, a.dtype)
    trace = load_builtin(a.trace)
    T, Lt, E = trace.counts.shape
    chosen = [int(v) for v in np.linspace(0, Lt - 1, a.layers).round()]
    fit = parse_range(a.fit_steps) or (0, T // 2)
    eval_steps = [s for s in range(T) if not fit[0] <= s < fit[1]] or list(range(T))
    loads_fit = trace.counts[fit[0]:fit[1]][:, chosen]
    redundant = a.redundant if a.redundant is not None else max(1, E // 16 // world)
    S = E + world * redundant
    configs: list[tuple[str, Placement, str]] = [("identity", Placement.contiguous(len(chosen), E, world), "local-first")]
    for pol in [p for p in a.policies.split(",") if p]:
        if pol not in POLICIES:
            if rank == 0:
                print(f"(policy {pol!r} not registered: skipped)")
            continue
        pl = plan(loads_fit, S, world, policy=pol)
        for strat in [s for s in a.strategies.split(",") if s]:
            configs.append((pol, pl, strat))
    H, inter, k = a.hidden, a.intermediate, a.top_k
    g = torch.Generator(device=dev).manual_seed(1234)  # same weights on every rank
    w13_full = (torch.randn(E, 2 * inter, H, generator=g, device=dev, dtype=torch.float32 if dev.type == "cpu"
                            else dtype) / H**0.5).to(dtype)
    w2_full = (torch.randn(E, H, inter, generator=g, device=dev, dtype=torch.float32 if dev.type == "cpu"
                           else dtype) / inter**0.5).to(dtype)
    router = TraceRouter(trace, num_ranks=world, rank=rank, seed=7, layer_map=chosen)
    n_steps = a.warmup + a.steps
    results = []
    for N in a.batch:
        ids = [[torch.as_tensor(router.draw(eval_steps[s % len(eval_steps)], pos, N, k), device=dev)
                for pos in range(len(chosen))] for s in range(n_steps)]
        gx = torch.Generator(device=dev).manual_seed(99 + rank)
        xs = [torch.randn(N, H, generator=gx, device=dev).to(dtype) for _ in range(4)]
        wts = torch.softmax(torch.randn(N, k, generator=gx, device=dev), -1)
        acc: dict[int, dict[str, Any]] = {}
        for rnd in range(a.rounds):
            order = list(range(len(configs)))
            if rnd % 2:
                order.reverse()
            for ci in order:
                name, pl, strat = configs[ci]
                layers = [ExpertParallelMoE.from_full_weights(w13_full, w2_full, pl, i, strategy=strat,
                                                              max_num_tokens=a.max_num_tokens)
                          for i in range(len(chosen))]
                step_ms = []
                pairs = []
                with torch.inference_mode():
                    for s in range(n_steps):
                        x = xs[s % len(xs)]
                        _sync(dev)
                        dist.barrier()
                        t0 = time.perf_counter()
                        for i, layer in enumerate(layers):
                            x = layer(x, ids[s][i], wts)
                        _sync(dev)
                        t1 = time.perf_counter()
                        done = torch.stack([layer.take_slot_counts()[1].sum() for layer in layers])
                        if s >= a.warmup:
                            step_ms.append((t1 - t0) * 1e3)
                            pairs.append(done)
                    assign_ms = _time_assign(layers[0], ids[0][0], world, dev)
                st = torch.tensor(step_ms, dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
                dist.all_reduce(st, op=dist.ReduceOp.MAX)
                p = torch.stack(pairs)  # [steps, layers] on this rank
                allp = [torch.empty_like(p) for _ in range(world)]
                dist.all_gather(allp, p)
                r = acc.setdefault(ci, {"placement": name, "strategy": strat, "slots": pl.num_slots, "batch": N,
                                        "step_ms": [], "pairs": [], "impl": layers[0].compute_impl, "assign_ms": []})
                r["step_ms"] += st.cpu().tolist()
                r["pairs"].append(torch.stack(allp).cpu().numpy())
                r["assign_ms"].append(assign_ms)
                del layers
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        for ci in range(len(configs)):
            r = acc[ci]
            r["pairs"] = np.concatenate(r["pairs"], axis=1).tolist()  # [R, rounds*steps, layers]
            r["assign_ms"] = float(np.median(r["assign_ms"]))
            results.append(r)
    if rank != 0:
        return None
    device = (f"{world}x {torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, torch {torch.__version__}, "
              f"NCCL, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')})" if dev.type == "cuda"
              else f"CPU, {world} gloo processes (torch {torch.__version__})")
    return {"device": device, "date": _dt.date.today().isoformat(), "command": cmd, "trace": a.trace,
            "trace_source": trace.source or trace.model, "trace_layers": chosen, "fit_steps": list(fit),
            "eval_steps": [eval_steps[0], eval_steps[-1] + 1], "experts": E, "top_k": k, "batches": a.batch,
            "rounds": a.rounds,
            "hidden": H, "intermediate": inter, "dtype": a.dtype, "ep_size": world, "redundant_per_rank": redundant,
            "warmup": a.warmup, "steps": a.steps, "results": results}


def summarise(d: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    base: dict[str, Any] | None = None
    for r in d["results"]:
        if base is not None and base["batch"] != r["batch"]:
            base = None
        P = np.asarray(r["pairs"], dtype=np.float64)  # [R, steps, layers]
        t = np.asarray(r["step_ms"])
        busiest = P.max(0).sum()
        mean = P.mean(0)
        imb = np.where(mean > 0, P.max(0) / np.where(mean > 0, mean, 1) - 1, 0).mean()
        row = {"placement": r["placement"], "strategy": r["strategy"], "slots": r["slots"], "impl": r["impl"],
               "batch": r["batch"], "assign_ms": r["assign_ms"],
               "mean_ms": float(t.mean()), "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
               "rank_pairs": [int(v) for v in P.sum((1, 2))], "imbalance": float(imb), "busiest": float(busiest),
               "perfect": float(mean.sum())}
        if base is None:
            base = row
        row["measured_gain"] = base["mean_ms"] / row["mean_ms"]
        row["ideal_gain"] = base["busiest"] / row["busiest"]
        row["perfect_gain"] = base["busiest"] / row["perfect"]
        rows.append(row)
    return rows


def render(d: dict[str, Any], rows: list[dict[str, Any]], quick_cpu: bool) -> str:
    lines = [f"# runtime_ep: EP MoE layers, trace-driven routing ({'QUICK CPU CHECK' if quick_cpu else 'GPU'})", "",
             f"- device: {d['device']}", f"- date: {d['date']}", f"- command: `{d['command']}`",
             f"- layer: {d['experts']} experts x (hidden {d['hidden']}, intermediate {d['intermediate']}) {d['dtype']}, "
             f"top-{d['top_k']}, {len(d['trace_layers'])} MoE layers per step (trace layers {d['trace_layers']}), "
             f"ep_size {d['ep_size']}, +{d['redundant_per_rank']} slots/rank for deepseek/eplb",
             f"- routing: REAL trace `{d['trace']}` ({d['trace_source']}); placements planned on trace steps "
             f"{d['fit_steps'][0]}-{d['fit_steps'][1]}, timed on held-out steps {d['eval_steps'][0]}-{d['eval_steps'][1]} "
             f"(each token's {d['top_k']} distinct experts drawn with that step's per-expert counts)",
             f"- {d['steps']} timed steps after {d['warmup']} warm-ups, x {d['rounds']} rounds (configuration order "
             f"alternating); step time = all layers, slowest rank"]
    for batch in d["batches"]:
        lines += ["", f"## {batch} tokens per rank per step ({batch * d['top_k']} (token, expert) pairs per rank)", "",
                  "| placement | strategy | slots | step mean ms | p50 | p99 | pairs per rank | imbalance | measured gain "
                  "| ideal gain | perfect-balance gain | assign ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["batch"] != batch:
                continue
            lines.append(f"| {r['placement']} | {r['strategy']} | {r['slots']} | {r['mean_ms']:.3f} | {r['p50_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {' / '.join(str(v) for v in r['rank_pairs'])} | {r['imbalance']:.3f} | "
                         f"{r['measured_gain']:.3f} | {r['ideal_gain']:.3f} | {r['perfect_gain']:.3f} | "
                         f"{r['assign_ms']:.3f} |")
    lines += ["", "- imbalance: mean over steps and layers of max/mean - 1 of the pairs computed per rank (measured by "
              "the layers' device counters).",
              "- measured gain: identity's mean step time / this one's (same batch).",
              "- ideal gain: sum over steps and layers of the busiest rank's pairs, identity / this one (the gain if "
              "step time followed the busiest rank's token count alone).",
              "- perfect-balance gain: identity's busiest-rank sum / this configuration's mean-rank sum (upper bound "
              "of any placement with the same tokens).",
              "- assign ms: one layer's replica assignment alone (`eplb.dispatch.assign_slots`, for `balanced` its "
              "quota solver), median of 10, no collectives.",
              f"- expert compute: `{rows[0]['impl']}`."]
    if quick_cpu:
        lines += ["", "This is the CPU/gloo check of the script at a toy size; its times say nothing about GPUs "
                  "(the token counts and ideal gains are exact)."]
    return "\n".join(lines) + "\n"


def _spawned(rank: int, world: int, a: argparse.Namespace, cmd: str) -> dict[str, Any] | None:
    return run_rank(rank, world, a, cmd)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    cmd = " ".join(shlex.quote(v) for v in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    cmd = ("torchrun --nproc-per-node " + os.environ["WORLD_SIZE"] + " " if "WORLD_SIZE" in os.environ
           else "python ") + cmd
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (use --device cpu --quick)", file=sys.stderr)
        return 2
    if "WORLD_SIZE" in os.environ:
        from eplb.runtime.distributed import init_from_env

        info = init_from_env(device=a.device)
        d = run_rank(info.rank, info.size, a, cmd)
        dist.destroy_process_group()
    else:
        if a.device.startswith("cuda"):
            print("error: launch with torchrun --nproc-per-node 2 for CUDA", file=sys.stderr)
            return 2
        from eplb.runtime.testing import run_distributed

        d = run_distributed(_spawned, a.nproc, a, cmd, timeout_s=600)[0]
    if d is None:
        return 0
    rows = summarise(d)
    quick_cpu = not a.device.startswith("cuda")
    text = render(d, rows, quick_cpu)
    out = Path(a.out) if a.out else REPO / "bench/results" / ("runtime_ep_cpu.md" if quick_cpu else "runtime_ep.md")
    from eplb.stats.trace import atomic_write

    atomic_write(out, text.encode())
    jout = Path(a.json_out) if a.json_out else out.with_suffix(".json")
    atomic_write(jout, (json.dumps({**d, "summary": rows}, indent=1) + "\n").encode())
    print(text)
    print(f"wrote {out} and {jout}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
