"""MoE critical path of one layer on one GPU: does per-step balanced dispatch pay once its GPU cost is counted?

For sampled (step, layer) problems it builds every rank's per-slot token counts under each (placement, strategy)
(:func:`eplb.dispatch.send_matrix`, the exact split the runtime makes), takes the hottest rank (most rows to
compute) and runs its actual work on the GPU: its ``assign_slots`` on its own tokens (a CUDA graph replay of
one call, the fused Triton path for balanced) and the grouped GEMM + SwiGLU of its slots with their real
per-slot row counts (bf16, DeepSeek-V3 expert shape: hidden 7168, intermediate 2048, random weights). The
dispatch and combine all-to-alls are MODELLED, not run: 2 x the one-GPU-pair all_to_all_single times of
shared/reference/gpu.md (0.086 / 0.109 / 0.270 ms at 256 / 2048 / 8192 rows per rank, piecewise linear in the
hottest rank's received rows, linear beyond).

    critical path = assign_slots(hot rank) + grouped GEMM(hot rank) + 2 x all-to-all(hot rank's rows, modelled)

Rows:

* Llama-4 Maverick decode (the shipped trace ``llama4_maverick_mmlu_decode``: real per-(step, layer) expert
  counts, 128 experts, top-1), 16 ranks x 144 slots (identity: 128 slots); each sampled step's counts are
  scaled to 256 / 2048 / 8192 tokens per rank and split over the source ranks by multinomial draws (the trace
  has no per-rank counts: that split is SYNTHETIC);
* SYNTHETIC DeepSeek-V3-shape steps (256 experts, top-8, 288 slots, Zipf popularity per layer) at 36 and 72 ranks.

Columns: identity (no redundancy), DeepSeek + local-first, eplb + local-first, eplb-dispatch + local-first,
eplb-dispatch + balanced, auto (:func:`eplb.dispatch.auto.auto_strategies` on the planning half with the H200
cost model, per layer, on the eplb-dispatch placement), the ideal (eplb-dispatch's balanced loads at zero
dispatch cost), and the ideal gain captured by balanced / auto relative to DeepSeek + local-first.
Placements are planned on the first half of the steps, the samples come from the second half.

    python bench/critical_path.py --device cuda
    python bench/critical_path.py --device cpu --quick     # small check of the script (CPU timings)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import numpy as np
import torch

import eplb
import eplb.dispatch  # registers the "eplb-dispatch" policy
from _common import REPO, command_line, cuda_graphed, device_name, sample_ms, utc_minute, write_text
from eplb.dispatch import DispatchTable, assign_slots, send_matrix
from eplb.dispatch.auto import auto_strategies, calibrate_dispatch_cost_ms
from eplb.placement import Placement
from eplb.runtime.compute import expert_ffn, resolve_impl
from eplb.sim.cost import load_cost_model, reference_cost_model
from eplb.synthetic import zipf_popularity

HIDDEN, INTER = 7168, 2048
A2A_ROWS = np.array([256.0, 2048.0, 8192.0])  # shared/reference/gpu.md, all_to_all_single per rank, 2 x H200
A2A_MS = np.array([0.086, 0.109, 0.270])
CONFIGS = ("identity", "deepseek+lf", "eplb+lf", "eplb-dispatch+lf", "eplb-dispatch+balanced")


def a2a_ms(rows: float) -> float:
    """One all-to-all (MODELLED from gpu.md) for a rank receiving ``rows`` rows."""
    if rows >= A2A_ROWS[-1]:
        slope = (A2A_MS[-1] - A2A_MS[-2]) / (A2A_ROWS[-1] - A2A_ROWS[-2])
        return float(A2A_MS[-1] + slope * (rows - A2A_ROWS[-1]))
    return float(np.interp(rows, A2A_ROWS, A2A_MS))


def scale_counts(c: np.ndarray, total: int) -> np.ndarray:
    """Integer counts with the proportions of ``c`` [E] summing to ``total`` (largest remainders)."""
    x = c.astype(np.float64) / max(c.sum(), 1) * total
    out = np.floor(x).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:
        out[np.argsort(-(x - out), kind="stable")[:rest]] += 1
    return out


def split_ranks(c: np.ndarray, R: int, pairs_per_rank: int, rng: np.random.Generator) -> np.ndarray:
    """``[R, E]``: each source rank draws its pairs from the step's expert distribution (SYNTHETIC split)."""
    p = c / c.sum()
    return np.stack([rng.multinomial(pairs_per_rank, p) for _ in range(R)]).astype(np.int64)


def rank_ids(g_row: np.ndarray, top_k: int, rng: np.random.Generator) -> torch.Tensor:
    """``[n, top_k]`` ids whose per-expert counts are ``g_row`` (shuffled)."""
    ids = np.repeat(np.arange(g_row.size), g_row)
    rng.shuffle(ids)
    return torch.as_tensor(ids.reshape(-1, top_k))


class Gemm:
    """The hot rank's grouped GEMM + SwiGLU, timed on the device (weights shared by every call)."""

    def __init__(self, dev: torch.device, max_spr: int, max_rows: int, iters: int, hidden: int, inter: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self.w13 = (torch.randn(max_spr, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dev, dt)
        self.w2 = (torch.randn(max_spr, hidden, inter, generator=gen) / inter**0.5).to(dev, dt)
        self.x = torch.randn(max_rows, hidden, generator=gen).to(dev, dt)
        self.dev, self.iters = dev, iters
        self.cache: dict[tuple[int, ...], float] = {}

    def ms(self, counts: np.ndarray) -> float:
        key = tuple(int(v) for v in counts)
        if key not in self.cache:
            spr = len(key)
            n = sum(key)
            if n > self.x.shape[0]:
                self.x = torch.randn(n, self.x.shape[1], device=self.dev, dtype=self.x.dtype)
            w13, w2 = self.w13[:spr], self.w2[:spr]
            impl = resolve_impl("auto", w13, w2)
            c = torch.as_tensor(np.array(key), device=self.dev)
            x = self.x[:n]

            def run() -> torch.Tensor:
                return expert_ffn(x, c, w13, w2, impl=impl, counts_host=key)

            self.cache[key] = statistics.median(sample_ms(run, self.dev, 2, self.iters))
        return self.cache[key]


def assign_ms(ids: torch.Tensor, tab: DispatchTable, strategy: str, rank: int, g: torch.Tensor,
              dev: torch.device, iters: int) -> float:
    def run() -> torch.Tensor:
        return assign_slots(ids, tab, strategy, rank=rank, global_counts=g)

    fn = cuda_graphed(run, dev) or run
    return statistics.median(sample_ms(fn, dev, 3, iters))


def placements(hist: np.ndarray, E: int, R: int, S: int, groups: int) -> dict[str, Placement]:
    L = hist.shape[1]
    out = {"identity": Placement(np.tile(np.arange(E), (L, 1)), E, R)} if E % R == 0 else {}  # else impossible
    for pol in ("deepseek", "eplb", "eplb-dispatch"):
        out[pol] = eplb.plan(hist, S, R, policy=pol, num_groups=groups)
    return out


def run_rows(name: str, counts: np.ndarray, R: int, S: int, top_k: int, tprs: tuple[int, ...], samples: int,
             groups: int, dev: torch.device, gemm: Gemm, cost: Any, iters: int, seed: int) -> list[dict[str, Any]]:
    """``counts`` ``[T, L, E]`` totals per step; plan on the first half, sample from the second half."""
    rng = np.random.default_rng(seed)
    T, L, E = counts.shape
    half = T // 2
    rows: list[dict[str, Any]] = []
    for tpr in tprs:
        pairs = tpr * top_k
        hist = np.stack([[scale_counts(counts[t, layer], pairs * R) for layer in range(L)] for t in range(half)])
        pls = placements(hist.astype(np.float64), E, R, S, groups)
        picks = [(int(rng.integers(half, T)), int(rng.integers(0, L))) for _ in range(samples)]
        # auto: the table-size cost model (every layer), and a once-per-table calibration on the device
        # (balanced minus local-first assign_slots at this size) for the sampled layers
        model = auto_strategies(hist, pls["eplb-dispatch"], cost.compute_ms)
        cal: list[float | None] = [None] * L
        for _, layer in picks:
            if cal[layer] is None:
                cal[layer] = calibrate_dispatch_cost_ms(DispatchTable.from_placement(pls["eplb-dispatch"], layer, dev),
                                                        tpr, top_k, iters=iters, seed=seed + layer)
        auto = auto_strategies(hist, pls["eplb-dispatch"], cost.compute_ms, dispatch_cost_ms=cal)
        for step, layer in picks:
            c = scale_counts(counts[step, layer], pairs * R)
            g_np = split_ranks(c, R, pairs, rng)
            g_cpu = torch.as_tensor(g_np)
            row: dict[str, Any] = {"name": name, "tpr": tpr, "R": R, "step": step, "layer": layer, "ms": {},
                                   "load": {}, "auto": auto[layer], "model": model[layer],
                                   "colours": DispatchTable.from_placement(pls["eplb-dispatch"], layer).num_colors}
            for cfg in CONFIGS:
                pol, _, strat = cfg.partition("+")
                if pol not in pls:
                    continue
                strat = {"lf": "local-first", "balanced": "balanced", "": "local-first"}[strat]
                tab_cpu = DispatchTable.from_placement(pls[pol], layer)
                m = send_matrix(g_cpu, tab_cpu, strat)  # [R, S] rows source -> slot
                spr = tab_cpu.slots_per_rank
                slot_load = m.sum(0).view(R, spr)
                hot = int(slot_load.sum(1).argmax())
                rows_in = int(slot_load[hot].sum())
                ids = rank_ids(g_np[hot], top_k, rng).to(dev)
                t_assign = assign_ms(ids, tab_cpu.to(dev), strat, hot, g_cpu.to(dev), dev, iters)
                t_gemm = gemm.ms(slot_load[hot].numpy())
                t_a2a = 2 * a2a_ms(rows_in)
                row["ms"][cfg] = {"assign": t_assign, "gemm": t_gemm, "a2a": t_a2a, "total": t_assign + t_gemm + t_a2a}
                row["load"][cfg] = rows_in
            lf = row["ms"]["eplb-dispatch+lf"]
            bal = row["ms"]["eplb-dispatch+balanced"]
            row["ms"]["auto"] = bal if auto[layer].strategy == "balanced" else lf
            row["ms"]["auto (model)"] = bal if model[layer].strategy == "balanced" else lf
            row["ms"]["ideal"] = {"assign": 0.0, "gemm": bal["gemm"], "a2a": bal["a2a"], "total": bal["gemm"] + bal["a2a"]}
            rows.append(row)
            print(f"{name} R={R} {tpr} tok/rank step {step} layer {layer}: " + ", ".join(
                f"{k} {v['total']:.3f}" for k, v in row["ms"].items()) + f"; auto -> {auto[layer].strategy}; "
                f"hot rows {row['load']}")
    return rows


def llama_counts() -> np.ndarray:
    from eplb.datasets import load_builtin

    return np.asarray(load_builtin("llama4_maverick_mmlu_decode").counts, dtype=np.int64)  # [T, L, E]


def synthetic_dsv3(steps: int, layers: int, seed: int) -> np.ndarray:
    """SYNTHETIC [T, L, 256] popularity (Zipf per layer, mild drift across steps) as fractional counts."""
    rng = np.random.default_rng(seed)
    base = zipf_popularity(layers, 256, 1.0, rng)  # [L, E]
    noise = rng.gamma(50.0, 1.0 / 50.0, (steps, layers, 256))
    return np.round(base[None] * noise * 1e6).astype(np.int64)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, dev: torch.device) -> str:
    cols = [*CONFIGS, "auto", "auto (model)", "ideal"]
    lines = [
        "# MoE critical path per layer, one GPU (bench/critical_path.py)", "",
        f"- device: {device_name(dev)}",
        f"- date: {utc_minute()}",
        f"- command: `{command_line()}`",
        "- per row: the hottest rank's measured `assign_slots` (CUDA graph replay, one call) + grouped GEMM + SwiGLU "
        f"with its real per-slot rows (bf16, {HIDDEN}x{INTER} experts), + 2 x all-to-all MODELLED from "
        "shared/reference/gpu.md (not run). Milliseconds. `ideal`: eplb-dispatch's balanced loads at zero dispatch "
        "cost. Llama-4 rows: real per-step expert counts (shipped trace) scaled to the tokens per rank, split over "
        "source ranks by SYNTHETIC multinomial draws; DeepSeek-V3-shape rows are SYNTHETIC.",
        "- `captured`: (DeepSeek + local-first - strategy) / (DeepSeek + local-first - ideal), the share of the ideal "
        "gain a strategy keeps (target: >= 80% at >= 2048 tokens per rank; never slower than DeepSeek + local-first).",
        "",
        "- `auto`: strategy='auto' with the balanced dispatch cost calibrated once per table on the device "
        "(eplb.dispatch.auto.calibrate_dispatch_cost_ms: balanced minus local-first assign_slots, CUDA graph, "
        "SYNTHETIC uniform ids of this size); `auto (model)`: with the table-size cost model "
        "(eplb.dispatch.auto.balanced_dispatch_cost_ms, no measurement).",
        "",
        "| rows | tok/rank | step/layer | " + " | ".join(cols) + " | auto picks (gain / cost ms) | model picks (cost ms; colours) "
        "| captured: balanced | captured: auto | hot-rank rows (ds-lf / ed-lf / ed-bal) |",
        "| --- | --- | --- |" + " --- |" * len(cols) + " --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ms = r["ms"]
        ds = ms["deepseek+lf"]["total"]
        ideal = ms["ideal"]["total"]
        gain = ds - ideal

        def cap(key: str, ds: float = ds, gain: float = gain, ms: dict = ms) -> str:
            return "n/a (no gain)" if gain <= 1e-6 else f"{(ds - ms[key]['total']) / gain:.0%}"

        a = r["auto"]
        lines.append(f"| {r['name']} R={r['R']} | {r['tpr']} | {r['step']}/{r['layer']} | "
                     + " | ".join(f"{ms[c]['total']:.3f}" if c in ms else "n/a" for c in cols)
                     + f" | {a.strategy} ({a.predicted_gain_ms:.3f} / {a.cost_ms:.3f}) | {r['model'].strategy} "
                     f"({r['model'].cost_ms:.3f}; {r['colours']}) | {cap('eplb-dispatch+balanced')} | "
                     f"{cap('auto')} | {r['load']['deepseek+lf']} / {r['load']['eplb-dispatch+lf']} / "
                     f"{r['load']['eplb-dispatch+balanced']} |")
    lines += ["", "## Parts (ms): assign_slots / grouped GEMM / modelled all-to-all x2", "",
              "| rows | tok/rank | step/layer | " + " | ".join(CONFIGS) + " |",
              "| --- | --- | --- |" + " --- |" * len(CONFIGS)]
    for r in rows:
        lines.append(f"| {r['name']} R={r['R']} | {r['tpr']} | {r['step']}/{r['layer']} | " + " | ".join(
            f"{r['ms'][c]['assign']:.3f} / {r['ms'][c]['gemm']:.3f} / {r['ms'][c]['a2a']:.3f}" if c in r["ms"] else "n/a"
            for c in CONFIGS) + " |")
    # target summary
    never_slower = all(min(r["ms"]["eplb-dispatch+balanced"]["total"], r["ms"]["auto"]["total"])
                       <= r["ms"]["deepseek+lf"]["total"] for r in rows)
    big = [r for r in rows if r["tpr"] >= 2048 and r["ms"]["deepseek+lf"]["total"] - r["ms"]["ideal"]["total"] > 1e-6]
    caps = [(r["ms"]["deepseek+lf"]["total"] - min(r["ms"]["eplb-dispatch+balanced"]["total"], r["ms"]["auto"]["total"]))
            / (r["ms"]["deepseek+lf"]["total"] - r["ms"]["ideal"]["total"]) for r in big]
    lines += ["", "## Targets", "",
              f"- balanced or auto never slower than DeepSeek + local-first on any row: **{'yes' if never_slower else 'no'}**",
              f"- share of the ideal gain kept by the better of balanced / auto on rows with >= 2048 tokens per rank "
              f"and a positive ideal gain: min {min(caps):.0%}, median {statistics.median(caps):.0%} over {len(caps)} rows"
              if caps else "- no row with >= 2048 tokens per rank and a positive ideal gain"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU check of the script)")
    ap.add_argument("--samples", type=int, default=2, help="(step, layer) samples per row group")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default="bench/results/critical_path.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    iters = args.iters or (3 if args.quick else 15)
    cost = load_cost_model(REPO / "src/eplb/data/cost_model_h200.json", base=reference_cost_model())
    hidden, inter = (256, 128) if args.quick else (HIDDEN, INTER)
    gemm = Gemm(dev, 9, 4096, iters, hidden, inter)
    tprs = (256,) if args.quick else (256, 2048, 8192)
    rows = run_rows("Llama-4 decode", llama_counts(), 16, 144, 1, tprs, args.samples, 1, dev, gemm, cost, iters, 0)
    write_text(args.out, report(rows, args, dev))
    for R in ((72,) if args.quick else (36, 72)):
        rows += run_rows("SYNTHETIC DSv3", synthetic_dsv3(8, 4, R), R, 288, 8, tprs, args.samples, 8, dev, gemm,
                         cost, iters, R)
        write_text(args.out, report(rows, args, dev))
    print(report(rows, args, dev))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
