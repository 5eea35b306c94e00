"""Communication-aware placement (issue 21 item 4): cross-node co-activated pairs vs imbalance, eplb vs eplb-cooc.

REAL routing: ESFT-vanilla-lite (DeepSeek-V2-Lite architecture, 26 MoE layers x 64 experts, top-6), four domains,
256 tokens per step (bench/_traces.py). Per domain: plan on the first half of the steps (counts and the tokens' top-k
ids), measure on the second half (held-out) and on the first (in-sample). 8 ranks / 80 slots over 2, 4 nodes and
6 ranks / 66 slots over 3 nodes (8 ranks cannot be split over 3 nodes). Metrics (eplb.metrics.comm_stats):
per-step imbalance (max/mean - 1, averaged), cross-node pairs per token per layer (uniform replica choice),
nodes per token.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import _common
import _traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/placement_cooccurrence.md")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()
    from eplb.metrics import comm_stats, step_imbalance
    from eplb.policies import plan

    ids, counts = _traces.esft_topk(), _traces.esft_domains()
    layouts = [(2, 8, 80), (3, 6, 66), (4, 8, 80)]
    rows, summary = [], {}
    for N, R, S in layouts:
        for dom in sorted(ids):
            c, tk = counts[dom], ids[dom]
            h = c.shape[0] // 2
            fp, fe = tk[:h].reshape(-1, 26, 6), tk[h:].reshape(-1, 26, 6)
            t = time.perf_counter()
            p0 = plan(c[:h], S, R, num_nodes=N)
            t0 = time.perf_counter() - t
            t = time.perf_counter()
            p1 = plan(c[:h], S, R, num_nodes=N, policy="eplb-cooc", topk_ids=fp, imbalance_tolerance=args.tolerance)
            t1 = time.perf_counter() - t
            r = {}
            for name, p in (("eplb", p0), ("cooc", p1)):
                for win, cc, ii in (("in", c[:h], fp), ("out", c[h:], fe)):
                    st = comm_stats(p, topk_ids=ii)
                    r[name, win] = (float(step_imbalance(cc, p).mean()), st["mean_cross_node_pairs"], st["mean_nodes"])
            rows.append((N, R, S, dom, r, t0, t1))
            for win in ("in", "out"):
                summary.setdefault((N, win), []).append(r)
    lines = ["# Communication-aware placement: cross-node pairs vs imbalance (issue 21 item 4)", "",
             f"- date: {_common.utc_minute()}",
             f"- device: CPU {_common.cpu_name()} (numpy; the 2-core machine is shared, times are upper bounds)",
             f"- command: `{_common.command_line()}`",
             "- data: REAL ESFT-vanilla-lite routing (DeepSeek-V2-Lite architecture, 26 x 64, top-6), 4 domains, "
             "256 tokens per step; planned on the first half of the steps, measured in-sample and on the second half",
             f"- eplb-cooc: `imbalance_tolerance={args.tolerance}`, pairs from the planning half's top-k ids; "
             "cross-node pairs = co-activated expert pairs of a token on different nodes, per token per layer "
             "(15 pairs per token in all), uniform replica choice", "",
             "## Summary (mean over the 4 domains)", "",
             "| nodes | window | imbalance eplb | imbalance cooc | change | cross-node pairs eplb | cooc | change | nodes/token eplb | cooc |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (N, win), rs in summary.items():
        m = {k: np.mean([r[k, win] for r in rs], axis=0) for k in ("eplb", "cooc")}
        lines.append(f"| {N} | {'in-sample' if win == 'in' else 'held-out'} | {m['eplb'][0]:.4f} | {m['cooc'][0]:.4f} | "
                     f"{m['cooc'][0] / m['eplb'][0] - 1:+.1%} | {m['eplb'][1]:.3f} | {m['cooc'][1]:.3f} | "
                     f"{m['cooc'][1] / m['eplb'][1] - 1:+.1%} | {m['eplb'][2]:.3f} | {m['cooc'][2]:.3f} |")
    lines += ["", "## Per domain (held-out)", "",
              "| nodes | ranks / slots | domain | imbalance eplb | cooc | change | cross-node pairs eplb | cooc | change | plan s eplb | cooc |",
              "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for N, R, S, dom, r, t0, t1 in rows:
        a, b = r["eplb", "out"], r["cooc", "out"]
        lines.append(f"| {N} | {R} / {S} | {dom} | {a[0]:.4f} | {b[0]:.4f} | {b[0] / a[0] - 1:+.1%} | {a[1]:.3f} | "
                     f"{b[1]:.3f} | {b[1] / a[1] - 1:+.1%} | {t0:.2f} | {t1:.2f} |")
    _common.write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
