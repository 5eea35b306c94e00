"""Local expert compute of one EP rank: time vs tokens per slot and slots per rank (the simulator's cost model).

Measures :func:`eplb.runtime.compute.expert_ffn` -- what :class:`eplb.runtime.ExpertParallelMoE` runs on the
tokens a rank received: SwiGLU experts (gate+up GEMM, act, down GEMM) over tokens grouped by slot, with
``grouped_mm`` ("grouped") and with a loop of matmuls ("loop"). Default shape: DeepSeek-V3 experts
(hidden 7168, expert intermediate 2048), bf16.

* uniform rows: every slot gets the same number of tokens (tokens per slot x slots per rank grid);
* skewed rows: the same total tokens all in one slot (a hot expert), to show what the table misses.

Writes ``--out`` (markdown: device, date, command, tables, fit) and ``--cost-model-out`` (JSON in the
simulator's ``eplb.cost_model`` format, ``compute.kind = "table"`` on a tokens-per-rank grid, plus the raw
measurements and a least-squares fit; :func:`eplb.sim.cost.load_cost_model` reads it).

GPU:  python bench/runtime_compute.py --device cuda
CPU:  python bench/runtime_compute.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import REPO, command_line, device_name, sample_ms, today, write_text
from eplb.runtime.compute import expert_ffn, resolve_impl


def device_tag(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower()
    for tag in ("h200", "h100", "h20", "b200", "gb200", "a100", "l40s"):
        if tag in name:
            return tag
    return "cuda"


def timeit(fn: Any, dev: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median and min time of ``fn()`` in ms (CUDA events on GPU)."""
    times = sample_ms(fn, dev, warmup, repeats)
    return statistics.median(times), min(times)


def fit_linear(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares ``t = a + b*slots + c*tokens`` (ms) and the roofline ``fixed + max(ms_per_slot*slots,
    ms_per_token*tokens)``; with their max relative errors."""
    from scipy.optimize import least_squares

    s = np.array([r["slots"] for r in rows], dtype=float)
    n = np.array([r["tokens"] for r in rows], dtype=float)
    t = np.array([r["ms"] for r in rows], dtype=float)
    A = np.stack([np.ones_like(s), s, n], axis=1)
    coef, *_ = np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)  # relative-error weighting
    lin = A @ coef

    def roof(p: np.ndarray) -> np.ndarray:
        return p[0] + np.maximum(p[1] * s, p[2] * n)

    p0 = np.array([max(1e-4, t.min() * 0.5), max(1e-6, (t / s).min()), max(1e-9, (t / n).min())])
    sol = least_squares(lambda p: (roof(p) - t) / t, p0, bounds=([0, 0, 1e-12], [np.inf, np.inf, np.inf]))
    return {
        "linear": {"formula": "ms = a + b*slots_per_rank + c*tokens_per_rank", "a_ms": float(coef[0]),
                   "b_ms_per_slot": float(coef[1]), "c_ms_per_token": float(coef[2]),
                   "max_rel_err": float(np.max(np.abs(lin - t) / t))},
        "roofline": {"formula": "ms = fixed + max(ms_per_slot*slots_per_rank, ms_per_token*tokens_per_rank)",
                     "fixed_ms": float(sol.x[0]), "ms_per_slot": float(sol.x[1]), "ms_per_token": float(sol.x[2]),
                     "max_rel_err": float(np.max(np.abs(roof(sol.x) - t) / t))},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes and grid (CPU check)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 7168; --quick 256)")
    ap.add_argument("--intermediate", type=int, default=None, help="expert intermediate size (default 2048; --quick 128)")
    ap.add_argument("--slots", default=None, help="slots per rank, comma list (default 1,2,4,8,16,32)")
    ap.add_argument("--tokens-per-slot", default=None, help="comma list (default 1,2,4,...,1024)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="markdown result (default bench/results/runtime_compute[_cpu].md)")
    ap.add_argument("--cost-model-out", default=None,
                    help="cost-model JSON (default src/eplb/data/cost_model_<device>.json on GPU, "
                         "bench/results/runtime_compute_cost_model_cpu.json on CPU)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (use --device cpu --quick)", file=sys.stderr)
        return 2
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, a.dtype)
    H = a.hidden or (256 if a.quick else 7168)
    inter = a.intermediate or (128 if a.quick else 2048)
    slots = [int(v) for v in (a.slots or ("1,2,4" if a.quick else "1,2,4,8,16,32")).split(",")]
    tps = [int(v) for v in (a.tokens_per_slot or ("1,4,16" if a.quick else "1,2,4,8,16,32,64,128,256,512,1024"))
           .split(",")]
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 10)
    repeats = a.repeats if a.repeats is not None else (3 if a.quick else 50)
    tag = device_tag(dev)
    out_md = Path(a.out) if a.out else REPO / "bench/results" / ("runtime_compute_cpu.md" if tag == "cpu"
                                                                  else "runtime_compute.md")
    out_cm = Path(a.cost_model_out) if a.cost_model_out else (
        REPO / "bench/results/runtime_compute_cost_model_cpu.json" if tag == "cpu"
        else REPO / f"src/eplb/data/cost_model_{tag}.json")
    torch.manual_seed(0)
    smax = max(slots)
    w13 = (torch.randn(smax, 2 * inter, H, device=dev) / H**0.5).to(dtype)
    w2 = (torch.randn(smax, H, inter, device=dev) / inter**0.5).to(dtype)
    grouped_ok = resolve_impl("auto", w13, w2) == "grouped"
    impls = ["grouped", "loop"] if grouped_ok else ["loop"]
    print(f"device: {device_name(dev)}; shape H={H} I={inter} {a.dtype}; impls {impls}")
    rows: list[dict[str, Any]] = []
    xbuf = torch.randn(smax * max(tps), H, device=dev).to(dtype)
    for s in slots:
        for n_per in tps:
            for skew in (False, True):
                if skew and (s == 1 or n_per not in (tps[0], tps[len(tps) // 2], tps[-1])):
                    continue
                counts_l = [n_per * s] + [0] * (s - 1) if skew else [n_per] * s
                counts = torch.tensor(counts_l, dtype=torch.int64, device=dev)
                M = n_per * s
                x = xbuf[:M]
                for impl in impls:
                    def run(impl: str = impl, x: torch.Tensor = x, counts: torch.Tensor = counts,
                            s: int = s, counts_l: list[int] = counts_l) -> torch.Tensor:
                        return expert_ffn(x, counts, w13[:s], w2[:s], impl=impl, counts_host=counts_l)
                    med, mn = timeit(run, dev, warmup, repeats)
                    flops = 2.0 * M * 3 * H * inter
                    rows.append({"impl": impl, "slots": s, "tokens_per_slot": n_per, "tokens": M, "skewed": skew,
                                 "ms": med, "min_ms": mn, "tflops": flops / (med * 1e-3) / 1e12})
                    print(f"{impl:>7} slots {s:>3} tokens/slot {n_per:>5} {'skewed' if skew else 'uniform':>7} "
                          f"tokens {M:>6}: {med:8.3f} ms ({rows[-1]['tflops']:.1f} TFLOP/s)")
    best = "grouped" if grouped_ok else "loop"
    uni = [r for r in rows if r["impl"] == best and not r["skewed"]]
    fit = fit_linear(uni)
    # table on a common tokens-per-rank grid (the simulator's columns): measured rows resampled
    tok_grid = sorted({r["tokens"] for r in uni})
    table = []
    for s in slots:
        pts = sorted((r["tokens"], r["ms"]) for r in uni if r["slots"] == s)
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        vals = np.interp(tok_grid, xs, ys)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        vals = np.where(np.array(tok_grid) > xs[-1], ys[-1] + slope * (np.array(tok_grid) - xs[-1]), vals)
        table.append([round(float(v), 6) for v in vals])
    date = today()
    cmd = command_line(argv or None)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    cm = {
        "format": "eplb.cost_model", "version": 1, "device": device_name(dev), "date": date,
        "source": f"bench/runtime_compute.py ({cmd}); local expert compute only ({best})",
        "shape": {"hidden_size": H, "moe_intermediate_size": inter, "dtype_bytes": dtype_bytes},
        "compute": {"kind": "table", "slots_per_rank": slots, "tokens_per_rank": [float(t) for t in tok_grid],
                    "time_ms": table},
        "notes": {"compute": f"median of {repeats} runs after {warmup} warm-ups, expert_ffn impl={best}, tokens spread "
                             "evenly over the slots; rows resampled (piecewise linear) onto the union of token counts",
                  "all_to_all": "not measured here: the loader's defaults / base model apply",
                  "migration": "not measured here"},
        "fit": fit,
        "raw": rows,
    }
    write_text(out_cm, json.dumps(cm, indent=1) + "\n")
    # ------------------------------------------------------------------ markdown
    lines = [f"# runtime_compute: local expert compute time ({'QUICK CPU CHECK' if tag == 'cpu' else tag})", "",
             f"- device: {device_name(dev)}", f"- date: {date}", f"- command: `{cmd}`",
             f"- shape: hidden {H}, expert intermediate {inter}, {a.dtype}; median of {repeats} after {warmup} warm-ups"
             + (" (CUDA events)" if dev.type == "cuda" else " (perf_counter)"),
             f"- cost model written to `{out_cm.relative_to(REPO) if out_cm.is_relative_to(REPO) else out_cm}`", "",
             f"## Time (ms) of `{best}`, tokens spread evenly over the slots", "",
             "| slots \\ tokens/slot | " + " | ".join(str(v) for v in tps) + " |",
             "|---|" + "---|" * len(tps)]
    for s in slots:
        cells = [next(r["ms"] for r in uni if r["slots"] == s and r["tokens_per_slot"] == n) for n in tps]
        lines.append(f"| {s} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    if len(impls) == 2:
        lines += ["", "## loop / grouped time ratio (uniform)", "",
                  "| slots \\ tokens/slot | " + " | ".join(str(v) for v in tps) + " |", "|---|" + "---|" * len(tps)]
        for s in slots:
            cells = []
            for n in tps:
                g = next(r["ms"] for r in rows if r["impl"] == "grouped" and not r["skewed"] and r["slots"] == s
                         and r["tokens_per_slot"] == n)
                lp = next(r["ms"] for r in rows if r["impl"] == "loop" and not r["skewed"] and r["slots"] == s
                          and r["tokens_per_slot"] == n)
                cells.append(f"{lp / g:.2f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    sk = [r for r in rows if r["skewed"] and r["impl"] == best]
    if sk:
        lines += ["", "## Skewed: all tokens in one slot vs spread evenly (same total)", "",
                  "| slots | tokens | uniform ms | one-hot-slot ms | ratio |", "|---|---|---|---|---|"]
        for r in sk:
            u = next(q["ms"] for q in uni if q["slots"] == r["slots"] and q["tokens"] == r["tokens"])
            lines.append(f"| {r['slots']} | {r['tokens']} | {u:.3f} | {r['ms']:.3f} | {r['ms'] / u:.2f} |")
    lin, roof = fit["linear"], fit["roofline"]
    lines += ["", "## Fits (uniform rows)", "",
              f"- linear: ms = {lin['a_ms']:.4g} + {lin['b_ms_per_slot']:.4g} * slots + {lin['c_ms_per_token']:.4g} * "
              f"tokens (max relative error {lin['max_rel_err']:.1%})",
              f"- roofline: ms = {roof['fixed_ms']:.4g} + max({roof['ms_per_slot']:.4g} * slots, "
              f"{roof['ms_per_token']:.4g} * tokens) (max relative error {roof['max_rel_err']:.1%})", "",
              "The simulator uses the measured table (piecewise linear in tokens per rank, per slots-per-rank row); "
              "the fits are for reading.",
              "",
              "`grouped_mm` skips the weights of empty groups: at decode-sized token counts the time follows the "
              "number of slots that received tokens (each costs about one read of its expert's weights), so the "
              "skewed rows (one busy slot) are cheaper than the uniform rows with the same total; the table "
              "(uniform spread) is the conservative case of a rank whose slots are all active."]
    if tag == "cpu":
        lines += ["", "This is the CPU check of the script at a toy size; its numbers say nothing about GPUs."]
    write_text(out_md, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
