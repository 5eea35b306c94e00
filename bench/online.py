"""Online EPLB while serving: no EPLB vs a static placement vs the online balancer, on a drifting load.

A decode-style loop over a stack of :class:`eplb.runtime.ExpertParallelMoE` layers (random weights,
trace-driven routing via :class:`eplb.runtime.TraceRouter`), expert parallel over 2 ranks:

* ``none``:   the identity placement, ``E`` slots (no redundancy, no balancing);
* ``static``: ``S`` slots planned once (policy ``eplb``) on a calibration segment before the run;
* ``online``: starts from the static placement; :class:`eplb.runtime.balancer.OnlineBalancer`
  re-plans layers whose load drifted and migrates ``layer_updates_per_iter`` layers per step;
* ``oracle``  (computed, not served): per window of ``--window`` steps, a placement planned on that very
  window's counts (in-sample, knows the future) -- the balancedness target.

Load: ``--trace synthetic`` = :func:`eplb.synthetic.drifting_hot_set` (SYNTHETIC Zipf routing whose hot set is
redrawn every ``--period`` steps), or ``--trace llama4`` = the REAL Llama-4 Maverick MMLU decode counts shipped
with eplb (128 steps x 24 layers x 128 experts, top-1) replayed in a loop with the expert ids permuted per
layer every ``--period`` steps (the shift is synthetic, the skew is real).

Reported per mode: mean balancedness (mean/max rank load, per step and layer, then averaged) modelled with
:func:`eplb.dispatch.split_rank_loads` for the layers' dispatch strategy and also *measured* from the layers'
per-rank computed-token counters; ratio to the oracle; step time p50/p99 (max over ranks); for online the
p99 of migration steps (a boundary that launched or committed a layer) vs the other steps; rebalances, layers
migrated, bytes moved, peak staging memory, policy and migration time.

``--recovery`` (CPU, gloo) measures the time to recover from a hard rank loss under real ``torchrun`` elastic:
3 single-process torchrun agents (``--nnodes 2:3``, c10d rendezvous) serve with the online balancer and
``expert_map_record_path``; one agent and its worker are killed with SIGKILL; the survivors' collectives
fail, their agents restart them as a 2-rank world, and the workers resume from the recorded map with a
placement for the survivors (:func:`eplb.runtime.balancer.resume_placement`), checking every expert is
served and outputs equal the reference MoE. Written to ``bench/results/online_recovery_cpu.md``.

GPU (lead):  torchrun --nproc-per-node 2 bench/online.py --device cuda
CPU check:   python bench/online.py --device cpu --quick        (spawns 2 gloo processes itself)
             torchrun --nproc-per-node 2 bench/online.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import eplb  # noqa: E402
import eplb.datasets  # noqa: E402
import eplb.synthetic  # noqa: E402
from eplb import Placement  # noqa: E402
from eplb.dispatch import split_rank_loads  # noqa: E402
from eplb.metrics import balancedness  # noqa: E402
from eplb.online import BalancerConfig  # noqa: E402
from eplb.runtime.balancer import OnlineBalancer  # noqa: E402
from eplb.runtime.layer import ExpertParallelMoE  # noqa: E402
from eplb.runtime.trace_router import TraceRouter  # noqa: E402
from eplb.stats.trace import atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU check)")
    ap.add_argument("--trace", default=None, help="comma list of: synthetic, llama4 (default: both; --quick: synthetic)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None, help="E (synthetic; llama4 has 128)")
    ap.add_argument("--redundant-per-rank", type=int, default=None, help="extra slots per rank over E/R")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--inter", type=int, default=None, help="expert intermediate size")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per rank per step")
    ap.add_argument("--top-k", type=int, default=None, help="synthetic top-k (llama4 is top-1)")
    ap.add_argument("--skew", type=float, default=1.2, help="synthetic Zipf skew")
    ap.add_argument("--period", type=int, default=None, help="steps between hot-set shifts")
    ap.add_argument("--window", type=int, default=None, help="rebalance cadence = load window = oracle window (steps)")
    ap.add_argument("--layer-updates-per-iter", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.95, help="eplb_update_threshold (cosine)")
    ap.add_argument("--max-migration-mb-per-step", type=float, default=None,
                    help="max_migration_bytes_per_step in MB (spread a layer's transfers over steps)")
    ap.add_argument("--strategy", default="round-robin,balanced",
                    help="comma list of the layers' replica strategies: local-first, round-robin, balanced")
    ap.add_argument("--policy-backend", default=None, choices=["thread", "process"])
    ap.add_argument("--comm-group", default="new", choices=["new", "shared"],
                    help="balancer traffic on its own process group (new communicator, concurrent with the model's "
                         "all-to-alls) or on the EP group (serialised with them)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown output (default bench/results/online[_cpu|_recovery_cpu].md)")
    ap.add_argument("--recovery", action="store_true", help="measure hard-rank-loss recovery under torchrun elastic")
    ap.add_argument("--recovery-worker", default=None, help=argparse.SUPPRESS)  # work dir of a recovery worker
    a = ap.parse_args(argv)
    q = a.quick
    d = {"steps": 120 if q else 600, "layers": 2 if q else 8, "experts": 16 if q else 64,
         "redundant_per_rank": 2 if q else 4, "hidden": 64 if q else 7168, "inter": 32 if q else 2048,
         "tokens": 64 if q else 2048, "top_k": 4 if q else 8, "period": 40 if q else 200, "window": 10 if q else 50,
         "dtype": "fp32" if a.device == "cpu" else "bf16", "warmup": 3 if q else 10,
         "policy_backend": "thread" if a.device == "cpu" else "process",
         "trace": "synthetic" if q else "synthetic,llama4"}
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


# ------------------------------------------------------------------------------------------ loads
def make_loads(kind: str, a: argparse.Namespace, total_steps: int) -> tuple[np.ndarray, int, int, str]:
    """``(counts [T, L, E], E, top_k, label)`` for the run (calibration segment first)."""
    if kind == "synthetic":
        c = eplb.synthetic.drifting_hot_set(total_steps, a.layers, a.experts, tokens_per_step=256, top_k=a.top_k,
                                            skew=a.skew, period=a.period, seed=a.seed)
        return c, a.experts, a.top_k, (f"SYNTHETIC drifting hot set (Zipf skew {a.skew}, hot set redrawn every "
                                       f"{a.period} steps, eplb.synthetic.drifting_hot_set)")
    if kind == "llama4":
        tr = eplb.datasets.load_builtin("llama4_maverick_mmlu_decode")
        base = tr.counts  # [128, 24, 128] real
        T0, L0, E = base.shape
        rng = np.random.default_rng(a.seed)
        out = np.empty((total_steps, a.layers, E), dtype=np.int64)
        perms = None
        for t in range(total_steps):
            if t % a.period == 0:
                perms = [np.arange(E) if t == 0 else rng.permutation(E) for _ in range(a.layers)]
            assert perms is not None
            for li in range(a.layers):
                row = base[t % T0, li % L0]
                shifted = np.empty_like(row)
                shifted[perms[li]] = row
                out[t, li] = shifted
        return out, E, int(tr.top_k or 1), (f"REAL Llama-4 Maverick MMLU decode counts ({T0} steps x {L0} layers x "
                                            f"{E} experts, looped), expert ids permuted per layer every {a.period} "
                                            f"steps (SYNTHETIC shift)")
    raise SystemExit(f"--trace: unknown trace {kind!r} (expected synthetic or llama4)")


# -------------------------------------------------------------------------------------------- run
def build_layers(pl: Placement, a: argparse.Namespace, dev: torch.device, dtype: torch.dtype,
                 strategy: str) -> list[ExpertParallelMoE]:
    layers = []
    for li in range(pl.num_layers):
        g = torch.Generator(device=dev).manual_seed(1234 + li)  # identical full weights on every rank
        E = pl.num_experts
        w13 = torch.randn(E, 2 * a.inter, a.hidden, generator=g, device=dev, dtype=dtype).mul_(0.02)
        w2 = torch.randn(E, a.hidden, a.inter, generator=g, device=dev, dtype=dtype).mul_(0.02)
        layers.append(ExpertParallelMoE.from_full_weights(w13, w2, pl, li, strategy=strategy))
        del w13, w2
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return layers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()  # the serving stream only (a decode loop's sampling sync)


def run_mode(mode: str, pl: Placement, ids: torch.Tensor, a: argparse.Namespace, dev: torch.device,
             dtype: torch.dtype, rank: int, world: int, strategy: str) -> dict[str, Any]:
    """Serve ``a.warmup`` untimed then ``a.steps`` timed steps routed by ``ids [warmup + steps, L, N, k]``
    (this rank's expert ids, on the device); returns per-step times, placements and measured loads."""
    layers = build_layers(pl, a, dev, dtype, strategy)
    top_k = int(ids.shape[-1])
    hidden = torch.randn(a.tokens, a.hidden, device=dev, dtype=dtype, generator=torch.Generator(device=dev).manual_seed(rank))
    wts = torch.full((a.tokens, top_k), 1.0 / top_k, device=dev, dtype=torch.float32)

    def forward(t: int) -> None:
        for li, layer in enumerate(layers):
            layer(hidden, ids[t, li], wts)

    for t in range(a.warmup):
        forward(t)
    sync(dev)
    for layer in layers:
        layer.take_counts()
        layer.take_slot_counts()
    bal = None
    if mode == "online":
        cfg = BalancerConfig(num_wait_worker_iterations=0, num_iterations_eplb_update=a.window, window_size=a.window,
                             eplb_update_threshold=a.threshold, layer_updates_per_iter=a.layer_updates_per_iter,
                             policy="eplb", policy_backend=a.policy_backend,
                             max_migration_bytes_per_step=(None if a.max_migration_mb_per_step is None
                                                           else max(1, int(a.max_migration_mb_per_step * 1e6))))
        bal = OnlineBalancer(layers, cfg, placement=pl, comm_group="new" if a.comm_group == "new" else None)
        if not bal.worker.ready(300):  # the policy process starts (and imports) before the timed steps
            raise SystemExit("online: the policy worker did not start within 300 s")
    T, L = a.steps, pl.num_layers
    step_s = np.zeros(T)
    migrating = np.zeros(T, dtype=bool)
    rows = np.zeros((T, L, pl.num_slots), dtype=np.int64)
    done = torch.zeros(T, L, dtype=torch.int64, device=dev)
    dist.barrier()
    for t in range(T):
        t0 = time.perf_counter()
        if bal is not None:
            bal.step()
            migrating[t] = bal.migrating
        forward(a.warmup + t)
        sync(dev)
        step_s[t] = time.perf_counter() - t0
        rows[t] = bal.placement.phy2log if bal is not None else pl.phy2log
        for li, layer in enumerate(layers):
            done[t, li] = layer.take_slot_counts()[1].sum()
    if bal is not None:
        bal.close(record=False)
    # measured per-rank computed pairs [R, T, L] and per-step max time over ranks
    parts = [torch.empty_like(done) for _ in range(world)]
    dist.all_gather(parts, done)
    times = torch.as_tensor(step_s, dtype=torch.float64, device=dev)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    measured = torch.stack(parts).cpu().numpy()
    out = {"mode": mode, "step_s": times.cpu().numpy(), "migrating": migrating, "rows": rows,
           "measured": measured, "slots": pl.num_slots}
    if bal is not None:
        st = bal.stats()
        out.update(history=bal.history, stats=st)
        tot = torch.tensor([st["peak_staging_bytes"]], dtype=torch.int64, device=dev)
        dist.all_reduce(tot, op=dist.ReduceOp.MAX)
        out["peak_staging_max"] = int(tot.item())
        out["bytes_per_expert"] = bal.bytes_per_expert
    layers.clear()
    bal = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------- metrics
def modelled_balancedness(counts: np.ndarray, rows: np.ndarray, E: int, R: int, strategy: str) -> np.ndarray:
    """``[T, L]`` balancedness of ``counts [T, L, E]`` under the per-step placements ``rows [T, L, S]``."""
    T = counts.shape[0]
    out = np.zeros(counts.shape[:2])
    t = 0
    while t < T:  # segments of constant placement
        u = t + 1
        while u < T and np.array_equal(rows[u], rows[t]):
            u += 1
        pl = Placement(rows[t], E, R)
        rl = np.asarray(split_rank_loads(counts[t:u].astype(np.float64), pl, strategy))
        out[t:u] = balancedness(rl)
        t = u
    return out


def oracle_balancedness(counts: np.ndarray, S: int, E: int, R: int, window: int, strategy: str) -> np.ndarray:
    T = counts.shape[0]
    out = np.zeros(counts.shape[:2])
    for w0 in range(0, T, window):
        seg = counts[w0:w0 + window]
        pl = eplb.plan(seg, S, R, policy="eplb")
        out[w0:w0 + window] = balancedness(np.asarray(split_rank_loads(seg.astype(np.float64), pl, strategy)))
    return out


def q(x: np.ndarray, p: float) -> float:
    return float(np.percentile(x, p)) if len(x) else float("nan")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__})"


# ------------------------------------------------------------------------------------------- main
def bench(a: argparse.Namespace, rank: int, world: int) -> str | None:
    dev = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[a.dtype]
    lines: list[str] = []
    tables: list[str] = []
    strategies = [x.strip() for x in a.strategy.split(",") if x.strip()]
    for x in strategies:
        if x not in ("local-first", "round-robin", "balanced"):
            raise SystemExit(f"--strategy: unknown replica strategy {x!r}")
    for kind in [k.strip() for k in a.trace.split(",") if k.strip()]:
        calib = a.window * 2
        total = calib + a.warmup + a.steps
        counts, E, top_k, label = make_loads(kind, a, total)
        R = world
        if E % R:
            raise SystemExit(f"--experts: {E} experts are not divisible by {R} ranks")
        spr = E // R + a.redundant_per_rank
        S = spr * R
        static = eplb.plan(counts[:calib], S, R, policy="eplb")
        start = calib + a.warmup
        router = TraceRouter(counts, num_ranks=R, rank=rank, seed=a.seed)
        group = np.stack([[router.group_counts(t, li, a.tokens, top_k) for li in range(a.layers)]
                          for t in range(start, start + a.steps)])  # what is routed: [T, L, E]
        ids = torch.as_tensor(np.stack([[router.draw(t, li, a.tokens, top_k) for li in range(a.layers)]
                                        for t in range(start - a.warmup, start + a.steps)]).astype(np.int32),
                              device=dev)  # this rank's ids, precomputed: no host work in the timed loop
        for strategy in strategies:
            results = [run_mode(mode, pl, ids, a, dev, dtype, rank, world, strategy)
                       for mode, pl in (("none", Placement.contiguous(a.layers, E, R)), ("static", static),
                                        ("online", static))]
            if rank == 0:
                line, tab = report(kind, label, strategy, results, group, a, E, R, S, spr, top_k, calib)
                lines.append(line)
                tables += tab
    if rank != 0:
        return None
    cmd = " ".join(shlex.quote(x) for x in ([os.environ["EPLB_BENCH_CMD"]] if "EPLB_BENCH_CMD" in os.environ
                                            else ["python", "bench/online.py", *sys.argv[1:]]))
    head = [f"# online: no EPLB vs static vs online balancer{' (QUICK CPU CHECK)' if a.quick else ''}", "",
            f"- device: {device_name(dev)} x {world} ranks ({dist.get_backend()})",
            f"- date: {_dt.date.today().isoformat()}",
            f"- command: `{cmd}`",
            f"- expert shape: hidden {a.hidden}, intermediate {a.inter}, {a.dtype}; NCCL_NVLS_ENABLE="
            f"{os.environ.get('NCCL_NVLS_ENABLE')}",
            "- balancedness = mean/max of per-rank (token, expert) pairs per layer and step, averaged; 'model' = "
            "eplb.dispatch.split_rank_loads of the routed counts under the placement in service at each step, "
            "'measured' = the layers' per-rank computed-pair counters. Step time = wall time of balancer.step() + "
            "the forward of all layers + a sync of the serving stream, max over ranks. Migration step = a step "
            "whose boundary launched, posted or committed a layer migration.",
            "", "## Summary", "", *[f"- {x}" for x in lines], "", "## Details", *tables, ""]
    return "\n".join(head)


def report(kind: str, label: str, strategy: str, results: list[dict[str, Any]], group: np.ndarray,
           a: argparse.Namespace, E: int, R: int, S: int, spr: int, top_k: int, calib: int) -> tuple[str, list[str]]:
    """One (trace, strategy) section: summary line and markdown tables."""
    split = strategy  # split_counts names the runtime strategies the same way
    oracle = oracle_balancedness(group, S, E, R, a.window, split)
    tables = [f"\n### {kind}, strategy `{strategy}`\n", f"Load: {label}.\n",
              f"E={E} experts, top-{top_k}, {a.layers} layers, {R} ranks, {a.tokens} tokens per rank per step; "
              f"online/static/oracle: {S} slots ({spr} per rank), none: {E} slots; {a.steps} timed steps after "
              f"{a.warmup} warm-up; static planned on {calib} calibration steps; online cadence = window = "
              f"{a.window} steps, threshold {a.threshold}, layer_updates_per_iter {a.layer_updates_per_iter}, "
              f"policy `eplb` ({a.policy_backend} backend), balancer traffic on the {a.comm_group} process group, max migration per step "
              f"{'unlimited' if a.max_migration_mb_per_step is None else f'{a.max_migration_mb_per_step} MB'}.\n",
              "| mode | slots | balancedness (model) | vs oracle | balancedness (measured) | step p50 ms | "
              "step p99 ms | mean ms |", "|---|---|---|---|---|---|---|---|"]
    ob = float(oracle.mean())
    model: dict[str, np.ndarray] = {}
    for res in results:
        mb = modelled_balancedness(group, res["rows"], E, R, split)
        model[res["mode"]] = mb
        meas = res["measured"].astype(np.float64)  # [R, T, L]
        mx = meas.max(0)
        measured = float(np.where(mx > 0, meas.mean(0) / np.where(mx > 0, mx, 1), 1.0).mean())
        st = res["step_s"] * 1e3
        tables.append(f"| {res['mode']} | {res['slots']} | {mb.mean():.4f} | {mb.mean() / ob:.3f} | {measured:.4f} | "
                      f"{q(st, 50):.3f} | {q(st, 99):.3f} | {st.mean():.3f} |")
    tables.append(f"| oracle (per-window plan, in-sample) | {S} | {ob:.4f} | 1.000 | - | - | - | - |")
    on = results[2]
    st = on["step_s"] * 1e3
    mig, non = st[on["migrating"]], st[~on["migrating"]]
    hist = on["history"]
    moved = [h for h in hist if h["migrating"]]
    bpe = on["bytes_per_expert"]
    p99_ratio = q(mig, 99) / q(non, 99) if len(mig) and len(non) else float("nan")
    static_st = results[1]["step_s"] * 1e3
    tables += ["", "| online migration | value |", "|---|---|"]
    for k, v in (
        ("rebalances (plans that moved layers)", f"{len(moved)} of {len(hist)} plans"),
        ("layers migrated", str(on["stats"]["layers_migrated"])),
        ("bytes moved (all ranks)", f"{on['stats']['bytes_moved'] / 1e9:.3f} GB ({on['stats']['bytes_moved'] // max(1, bpe)} "
                                    f"experts x {bpe / 1e6:.2f} MB)"),
        ("bytes moved per rebalance (mean)", f"{np.mean([h['bytes'] for h in moved]) / 1e6:.2f} MB" if moved else "-"),
        ("peak staging memory per rank (max over ranks)", f"{on['peak_staging_max'] / 1e6:.2f} MB"),
        ("policy time per plan (mean, off the step)", f"{np.mean([h['policy_s'] for h in hist]) * 1e3:.1f} ms" if hist else "-"),
        ("migration time per rebalance (mean, first launch to last commit)",
         f"{np.mean([h.get('migration_s', 0.0) for h in moved]) * 1e3:.1f} ms" if moved else "-"),
        ("migration steps / other steps", f"{len(mig)} / {len(non)}"),
        ("step p50 ms: migration steps / other steps", f"{q(mig, 50):.3f} / {q(non, 50):.3f}"),
        ("step p99 ms: migration steps / other steps", f"{q(mig, 99):.3f} / {q(non, 99):.3f} (ratio {p99_ratio:.3f}, "
                                                       f"target <= 1.05)"),
        ("step p99 ms: online other steps / static", f"{q(non, 99):.3f} / {q(static_st, 99):.3f}"),
        ("online balancedness / oracle", f"{model['online'].mean() / ob:.3f} (target >= 0.95)"),
        ("static balancedness / oracle", f"{model['static'].mean() / ob:.3f}"),
    ):
        tables.append(f"| {k} | {v} |")
    W = a.window
    nwin = (a.steps + W - 1) // W
    tables += ["\nPer-window mean balancedness (model):\n",
               "| window | " + " | ".join(f"{w * W}-{min(a.steps, (w + 1) * W) - 1}" for w in range(nwin)) + " |",
               "|---|" + "---|" * nwin]
    for mode, mb in model.items():
        m = mb.mean(1)
        tables.append(f"| {mode} | " + " | ".join(f"{m[w * W:(w + 1) * W].mean():.3f}" for w in range(nwin)) + " |")
    orw = oracle.mean(1)
    tables.append("| oracle | " + " | ".join(f"{orw[w * W:(w + 1) * W].mean():.3f}" for w in range(nwin)) + " |")
    line = (f"{kind}, `{strategy}`: balancedness online/oracle {model['online'].mean() / ob:.3f}, static/oracle "
            f"{model['static'].mean() / ob:.3f}, none/oracle {model['none'].mean() / ob:.3f}; step p99 migration/other "
            f"{p99_ratio:.3f}; {on['stats']['bytes_moved'] / 1e9:.3f} GB moved in {len(moved)} rebalances")
    return line, tables


# --------------------------------------------------------------------------------------- recovery
REC_L, REC_E, REC_SPR, REC_H, REC_I, REC_N, REC_K = 2, 12, 6, 32, 16, 16, 2


def recovery_worker(workdir: str) -> None:
    """One torchrun-elastic worker: serve until killed (first world) or 20 steps (restarted world)."""
    import json

    from eplb.runtime.balancer import resume_placement
    from eplb.runtime.distributed import init_from_env
    from eplb.runtime.layer import reference_moe

    d = Path(workdir)
    t_start = time.time()
    torch.set_num_threads(1)
    info = init_from_env(device="cpu", timeout_s=30)
    rank, world = info.rank, info.size
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    g = torch.Generator().manual_seed(11)  # the "checkpoint": any rank can load any expert
    w13 = torch.randn(REC_L, REC_E, 2 * REC_I, REC_H, generator=g) * 0.3
    w2 = torch.randn(REC_L, REC_E, REC_H, REC_I, generator=g) * 0.3
    cfg = BalancerConfig(num_wait_worker_iterations=0, num_iterations_eplb_update=5, window_size=5,
                         layer_updates_per_iter=1, policy="eplb", policy_backend="inline",
                         policy_options={"max_replicas": 2}, expert_map_record_path=str(d / "eplb.json"))
    t_plan = time.time()
    pl = resume_placement(cfg, num_experts=REC_E, num_ranks=world, num_layers=REC_L)
    resumed = pl is not None
    if pl is None:
        pl = Placement.contiguous(REC_L, REC_E, world, world * REC_SPR)
    t_plan = time.time() - t_plan
    layers = [ExpertParallelMoE.from_full_weights(w13[i], w2[i], pl, i) for i in range(REC_L)]
    bal = OnlineBalancer(layers, cfg)
    rng = np.random.default_rng(rank)
    first = None
    steps = 20 if restart else 100000
    for t in range(steps):
        bal.step()
        hidden = torch.randn(REC_N, REC_H)
        for i, layer in enumerate(layers):
            if set(layer.placement_row.tolist()) != set(range(REC_E)):
                raise RuntimeError(f"layer {i}: an expert has no slot")
            hot = (np.arange(REC_E) + 3 * (t // 15)) % REC_E  # drifting hot experts
            p = np.where(np.isin(np.arange(REC_E), hot[:3]), 6.0, 1.0)
            ids = torch.as_tensor(np.stack([rng.choice(REC_E, REC_K, replace=False, p=p / p.sum())
                                            for _ in range(REC_N)]))
            wts = torch.rand(REC_N, REC_K)
            out = layer(hidden, ids, wts)
            torch.testing.assert_close(out, reference_moe(hidden, ids, wts, w13[i], w2[i]), rtol=1e-5, atol=1e-5)
        if first is None:
            first = time.time()
        tmp = d / f"w{restart}.r{rank}.tmp"
        tmp.write_text(json.dumps({"step": t, "first_step_t": first, "t_start": t_start, "world": world,
                                   "restart": restart, "resumed": resumed, "plan_s": t_plan,
                                   "rows": bal.placement.phy2log.tolist(), "plans": len(bal.history),
                                   "pid": os.getpid()}))
        os.replace(tmp, d / f"w{restart}.r{rank}.json")
        time.sleep(0.05)
    bal.close()
    dist.destroy_process_group()


def recovery_bench(a: argparse.Namespace) -> str:
    import json
    import signal
    import subprocess
    import tempfile

    from eplb.runtime.testing import free_port

    def read(p: Path) -> dict[str, Any] | None:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    with tempfile.TemporaryDirectory(prefix="eplb-recovery-") as tmp:
        tmp = os.environ.get("EPLB_RECOVERY_DIR", tmp)
        d = Path(tmp)
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2:3", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "eplb-recovery",
               "--rdzv-conf", "last_call_timeout=2,join_timeout=60,keep_alive_interval=1,keep_alive_max_attempt=3", "--max-restarts", "3",
               "--monitor-interval", "0.2", str(Path(__file__).resolve()), "--device", "cpu",
               "--recovery-worker", str(d)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "LOGLEVEL": os.environ.get("LOGLEVEL", "WARNING"),
               # a fresh store per restart round (pytorch/pytorch#135712: with the shared rendezvous store,
               # restarted workers may read the previous round's addresses and fail to connect)
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        agents = []
        for i in range(3):
            agents.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(d / f"agent{i}.log", "w"),
                                           start_new_session=True))
            if i == 0:
                time.sleep(2.0)  # agent 0 hosts the c10d store; it must not be the one that dies
        try:
            end = time.time() + 180
            while time.time() < end:
                st = [read(d / f"w0.r{r}.json") for r in range(3)]
                if all(x is not None and x["step"] >= 15 for x in st) and (d / "eplb.native.json").exists():
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("recovery: the 3-rank world did not reach step 15 (see agent logs)")
            victim = max(range(3), key=lambda r: r)  # kill the worker of rank 2 and its agent
            pid = st[victim]["pid"]  # type: ignore[index]
            victim_agent = next(ag for ag in agents[1:] if _child_of(pid, ag.pid))
            prerec = json.loads((d / "eplb.native.json").read_text())
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)  # the node dies: its worker (torchrun gives workers their own session) ...
            os.killpg(victim_agent.pid, signal.SIGKILL)  # ... and its agent
            end = time.time() + 180
            while time.time() < end:
                rounds = sorted({int(f.name[1:].split(".")[0]) for f in d.glob("w*.r*.json")} - {0})
                st2 = [read(d / f"w{rounds[-1]}.r{r}.json") for r in range(2)] if rounds else [None, None]
                if all(x is not None and x["step"] >= 19 for x in st2):
                    break
                if any(ag.poll() not in (None, 0) for ag in agents if ag is not victim_agent):
                    raise SystemExit("recovery: a surviving agent failed: " + (d / "agent0.log").read_text()[-3000:])
                time.sleep(0.1)
            else:
                raise SystemExit("recovery: survivors did not resume: " + (d / "agent0.log").read_text()[-3000:])
            for ag in agents:
                if ag is not victim_agent:
                    ag.wait(timeout=60)
        finally:
            for ag in agents:
                if ag.poll() is None:
                    os.killpg(ag.pid, signal.SIGKILL)
            for f in d.glob("w*.r*.json"):  # workers run in their own sessions: never leave one behind
                info = read(f)
                if info is not None:
                    try:
                        os.kill(int(info["pid"]), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        assert all(x is not None for x in st2)
        first = max(x["first_step_t"] for x in st2)  # type: ignore[index]
        restart_s = max(x["first_step_t"] - x["t_start"] for x in st2)  # type: ignore[index]
        rows = st2[0]["rows"]  # type: ignore[index]
        served = all(sorted(set(r)) == list(range(REC_E)) for r in rows)
        cmdline = "python bench/online.py --recovery"
        lines = [
            "# online: recovery from a hard rank loss under torchrun elastic (CPU, gloo)", "",
            f"- device: {device_name(torch.device('cpu'))}, 3 torchrun agents x 1 process, c10d rendezvous, "
            "--nnodes 2:3, --max-restarts 3, --monitor-interval 0.2, last_call_timeout=2",
            f"- date: {_dt.date.today().isoformat()}",
            f"- command: `{cmdline}`",
            f"- model: {REC_L} EP layers x {REC_E} experts, {REC_SPR} slots per rank (3 ranks: {3 * REC_SPR} slots, "
            f"2 ranks: {2 * REC_SPR}), hidden {REC_H}, intermediate {REC_I}, fp32; online balancer with "
            "expert_map_record_path; outputs checked against the single-process reference MoE every step",
            "", "| what | value |", "|---|---|",
            f"| placement recorded before the loss | {prerec['num_ranks']} ranks x {prerec['num_slots'] // prerec['num_ranks']} "
            "slots |",
            f"| survivors resumed with | {st2[0]['world']} ranks x {len(rows[0]) // st2[0]['world']} slots, "  # type: ignore[index]
            f"placement from the record: {all(x['resumed'] for x in st2)}, every expert served: {served} |",  # type: ignore[index]
            f"| worker restarts until the 2-rank world served (torchrun restart rounds) | {rounds[-1]} |",
            f"| time to recover: kill -> first step served by the 2 survivors | {first - t_kill:.2f} s |",
            f"| of which: restarted worker, after its module imports -> first step (group init, placement, layer "
            f"build, first step) | {restart_s:.2f} s |",
            f"| placement for the survivors (resume_placement) | {max(x['plan_s'] for x in st2) * 1e3:.1f} ms |",  # type: ignore[index]
            f"| steps served after the restart | {min(x['step'] for x in st2) + 1} per rank, outputs equal to the "  # type: ignore[index]
            "reference |",
            "",
            "The rest of the time to recover is torchrun's: detecting the failed workers (--monitor-interval), "
            "the new rendezvous round (last_call_timeout) and starting the new worker processes.", ""]
        return "\n".join(lines)


def _child_of(pid: int, parent: int) -> bool:
    """Whether process ``pid`` descends from ``parent`` (Linux /proc)."""
    p = pid
    for _ in range(10):
        if p == parent:
            return True
        try:
            with open(f"/proc/{p}/stat") as f:
                p = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if p <= 1:
            return False
    return False


def _worker(rank: int, world: int, argv: list[str]) -> str | None:
    a = parse_args(argv)
    torch.set_num_threads(1)
    return bench(a, rank, world)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.recovery_worker is not None:
        recovery_worker(a.recovery_worker)
        return
    if a.recovery:
        text = recovery_bench(a)
        out = Path(a.out) if a.out else REPO / "bench" / "results" / "online_recovery_cpu.md"
        print(text)
        atomic_write(out, text.encode())
        print(f"\nwrote {out}")
        return
    out = Path(a.out) if a.out else REPO / "bench" / "results" / ("online.md" if a.device == "cuda" else "online_cpu.md")
    if "WORLD_SIZE" in os.environ:
        from eplb.runtime.distributed import init_from_env

        info = init_from_env(device=a.device)
        text = bench(a, info.rank, info.size)
        dist.barrier()
        dist.destroy_process_group()
    else:
        if a.device == "cuda":
            raise SystemExit("launch the GPU benchmark with: torchrun --nproc-per-node 2 bench/online.py --device cuda")
        from eplb.runtime.testing import run_distributed

        text = run_distributed(_worker, 2, argv, timeout_s=3600)[0]
    if text is not None:
        print(text)
        atomic_write(out, text.encode())
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
