"""vLLM's periodic EPLB rearrangement replayed with vLLM's default policy and with eplb's plug-in.

vLLM calls ``policy.rebalance_experts(window_load [L, E], S, groups, nodes, ranks, current_map)``
every ``step_interval`` steps. Here a trace is cut into windows; at the end of window ``k`` each
policy re-plans from window ``k``'s loads and the map it serves, and the new map is judged on
window ``k + 1`` (held out). Reported per policy, averaged over the rearrangements:

* ``imbalance``: per-step ``max / mean - 1`` of rank load on the next window (uniform split over
  replicas, vLLM's token dispatch), averaged over steps and layers;
* ``copies``: expert weight copies that must cross ranks (``Placement.moves``), per rearrangement,
  summed over layers -- what vLLM's ``rearrange_expert_weights_inplace`` sends over the network;
* ``slots changed``: slots whose expert changes (includes local copies);
* ``ms/call``: median wall time of one ``rebalance_experts`` call (one CPU thread).

Baseline: vLLM 0.33's own ``DefaultEplbPolicy`` when ``vllm`` is importable, else an emulation
(DeepSeek's algorithm, ``eplb.rebalance_experts``, plus vLLM's intra-GPU slot preservation) --
the table says which. Cases: the shipped REAL Llama-4-Maverick decode and prefill traces, and a
SYNTHETIC DeepSeek-V3-shaped drifting hot set (58 layers x 256 experts, top-8, 8 groups).

    python bench/integrations_vllm.py            # writes bench/results/integrations_vllm.md
    python bench/integrations_vllm.py --quick    # small synthetic case only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import command_line, cpu_name, today, write_text


def baseline() -> tuple[str, Callable[..., Any]]:
    try:
        import vllm
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

        return f"vLLM {vllm.__version__} DefaultEplbPolicy", DefaultEplbPolicy.rebalance_experts
    except Exception:
        from eplb import rebalance_experts
        from eplb.integrations._core import preserve_slots

        def emulated(weight: Any, S: int, G: int, N: int, R: int, old: Any = None) -> torch.Tensor:
            w = weight.float().numpy()
            E = w.shape[1]
            g, n = (G, N) if G % N == 0 else (1, 1)
            p2l = rebalance_experts(w, S, g, n, R)[0]
            if old is not None:
                p2l = preserve_slots(p2l, old.numpy(), R, E)
            return torch.from_numpy(p2l)

        return "vLLM default (emulated: DeepSeek + intra-GPU slot preservation)", emulated


def vllm_origin() -> str:
    import vllm

    return str(Path(vllm.__file__).parent)


def initial_map(L: int, E: int, S: int) -> torch.Tensor:
    """vLLM's initial physical-to-logical map: experts 0..E-1, then redundant slot i holds i % E."""
    row = list(range(E)) + [i % E for i in range(S - E)]
    return torch.tensor([row] * L, dtype=torch.int64)


def replay(counts: np.ndarray, window: int, S: int, R: int, G: int, N: int,
           policy: Callable[..., Any]) -> dict[str, float]:
    from eplb import Placement
    from eplb.metrics import step_imbalance

    T, L, E = counts.shape
    K = T // window
    cur = initial_map(L, E, S)
    imb, copies, changed, times = [], [], [], []
    for k in range(K - 1):
        w = torch.from_numpy(counts[k * window:(k + 1) * window].sum(0))
        t0 = time.perf_counter()
        new = policy(w, S, G, N, R, cur.clone())
        times.append(time.perf_counter() - t0)
        a = Placement(cur.numpy().copy(), E, R)
        b = Placement(new.numpy().copy(), E, R)
        copies.append(int(a.moves(b).sum()))
        changed.append(int(a.diff(b).sum()))
        imb.append(float(step_imbalance(counts[(k + 1) * window:(k + 2) * window], b).mean()))
        cur = new
    return {"imbalance": float(np.mean(imb)), "copies": float(np.mean(copies)), "changed": float(np.mean(changed)),
            "ms": statistics.median(times) * 1e3, "calls": K - 1}


def cases(quick: bool) -> list[tuple[str, np.ndarray, int, int, int, int, int]]:
    from eplb.datasets import load_builtin
    from eplb.synthetic import drifting_hot_set

    out = []
    if not quick:
        for name in ("llama4_maverick_mmlu_decode", "llama4_maverick_mmlu_prefill"):
            tr = load_builtin(name)
            out.append((f"REAL {name} ({tr.num_steps}x{tr.num_layers}x{tr.num_experts}, top-1)", tr.counts, 16,
                        144, 16, 1, 1))
        c = drifting_hot_set(48, 58, 256, tokens_per_step=512, top_k=8, skew=1.0, period=16, seed=0)
        out.append(("SYNTHETIC DeepSeek-V3 shape drifting hot set (48x58x256, top-8, hot set redrawn every 16 steps)",
                    c, 8, 288, 32, 8, 4))
    else:
        c = drifting_hot_set(16, 6, 64, tokens_per_step=256, top_k=4, skew=1.0, period=8, seed=0)
        out.append(("SYNTHETIC small drifting hot set (16x6x64, top-4)", c, 4, 80, 8, 4, 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small synthetic case")
    ap.add_argument("--out", default="bench/results/integrations_vllm.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from eplb.integrations.vllm import make_policy

    base_name, base = baseline()
    policies = [(base_name, base),
                ("eplb plug-in, planner deepseek", make_policy("deepseek").rebalance_experts),
                ("eplb plug-in, planner eplb (EPLB_VLLM_POLICY=eplb)", make_policy("eplb").rebalance_experts)]
    lines = [
        "# vLLM EPLB rearrangements: vLLM's default policy vs eplb's plug-in",
        "",
        f"- device: {cpu_name()} (CPU, 1 torch thread); python {platform.python_version()}, torch {torch.__version__}",
        f"- date: {today()}",
        f"- command: `{command_line()}`",
        f"- baseline: {base_name}" + (f" (imported from {vllm_origin()})" if "emulated" not in base_name else ""),
        "- replay: at the end of each window the policy re-plans from that window's loads and the current map "
        "(vLLM's call); the new map is judged on the next window (held out). Start: vLLM's initial map.",
        "- imbalance = per-step max/mean - 1 of rank load (uniform split over replicas), averaged; copies = expert "
        "weights crossing ranks per rearrangement (all layers); slots changed includes local copies.",
        "",
    ]
    for title, counts, window, S, R, G, N in cases(args.quick):
        T, L, E = counts.shape
        lines += [f"## {title}", "",
                  f"{R} ranks, {S} slots ({S // R} per rank, {S - E} redundant), {G} groups, {N} nodes; "
                  f"window {window} steps -> {T // window - 1} rearrangements", "",
                  "| policy | held-out imbalance | cross-rank copies / rearrangement | slots changed | ms / call |",
                  "|---|---:|---:|---:|---:|"]
        print(f"\n{title}")
        for name, pol in policies:
            r = replay(counts, window, S, R, G, N, pol)
            row = f"| {name} | {r['imbalance']:.4f} | {r['copies']:.1f} | {r['changed']:.1f} | {r['ms']:.1f} |"
            lines.append(row)
            print(f"  {name:<62} imbalance {r['imbalance']:.4f}  copies {r['copies']:8.1f}  changed "
                  f"{r['changed']:8.1f}  {r['ms']:8.1f} ms/call")
        lines.append("")
    out = Path(args.out)
    write_text(out, "\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
