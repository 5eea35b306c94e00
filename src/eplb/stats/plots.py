"""Report figures (matplotlib, Agg backend) and a self-contained HTML page.

:func:`plot_report` writes three PNGs:

* ``expert_load_heatmap.png``: per MoE layer, the load of every expert over the steps
  (tokens, one small panel per layer; at most ``max_layers`` layers, evenly chosen);
* ``rank_load.png``: per placement, the mean per-rank load of every layer relative to the
  layer's mean (1.0 = balanced), side by side ("before/after");
* ``imbalance_per_layer.png``: per placement, the per-step-averaged imbalance ratio of every layer.

:func:`html_report` embeds the tables and PNGs (base64) in one page.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import ArrayLike
from eplb._counts import evenly_spaced
from eplb._io import atomic_write
from eplb.placement import Placement
from eplb.stats.report import LoadTable, load_table, unit_loads
from eplb.stats.trace import Trace, as_counts

__all__ = ["html_report", "plot_report"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    atomic_write(path, buf.getvalue())
    return path


def plot_report(
    counts: Trace | ArrayLike,
    placements: Mapping[str, Placement | None],
    ep_size: int,
    out_dir: str | os.PathLike[str],
    *,
    layer_ids: Sequence[int] | None = None,
    max_layers: int = 24,
) -> list[Path]:
    """Write the report PNGs into ``out_dir`` and return their paths.

    Args:
        counts: ``[T, L, E]`` (or ``[L, E]``) token counts, or a :class:`Trace`.
        placements: label -> placement to project the counts on (``None`` = the contiguous
            identity layout, slot ``s`` holds expert ``s``), e.g. ``{"before": None, "after": p}``.
        ep_size: ranks used for ``None`` placements (placements use their own ``num_ranks``).
        out_dir: output directory (created).
        layer_ids: model layer id of each layer (default: the trace's, else ``0..L-1``).
        max_layers: at most this many heatmap panels.
    """
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lids = tuple(layer_ids) if layer_ids is not None else (counts.layer_ids if isinstance(counts, Trace) else ())
    c = as_counts(counts).astype(np.float64)
    T, L, E = c.shape
    if not lids:
        lids = tuple(range(L))
    if not placements:
        placements = {"contiguous": None}
    paths: list[Path] = []

    # 1. per-layer expert-load heatmaps over time
    pick = evenly_spaced(L, max_layers)
    ncol = min(6, len(pick))
    nrow = -(-len(pick) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.4 * nrow), squeeze=False)
    vmax = float(np.percentile(c[:, pick], 99.5)) or 1.0
    im = None
    for ax in axes.flat:
        ax.axis("off")
    for ax, j in zip(axes.flat, pick, strict=False):
        ax.axis("on")
        im = ax.imshow(c[:, j].T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       vmin=0, vmax=vmax)
        ax.set_title(f"layer {lids[j]}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("expert", fontsize=7)
    for ax in axes[-1, :]:
        ax.set_xlabel("step", fontsize=7)
    fig.subplots_adjust(hspace=0.45)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="tokens per step")
    shown = "" if len(pick) == L else f" ({len(pick)} of {L} layers)"
    fig.suptitle(f"Expert load per layer over {T} steps{shown}", fontsize=10)
    paths.append(_save(fig, out / "expert_load_heatmap.png"))

    # 2. per-rank load (relative to the layer mean), one panel per placement
    tables: dict[str, LoadTable] = {}
    rel: dict[str, np.ndarray] = {}
    for label, pl in placements.items():
        ep = pl.num_ranks if pl is not None else ep_size
        r = unit_loads(c, ep, pl, lids).mean(0)  # [L, R] mean per step
        m = r.mean(-1, keepdims=True)
        rel[label] = np.divide(r, m, out=np.ones_like(r), where=m > 0)
        tables[label] = load_table(c, ep, pl, lids)
    n = len(rel)
    fig, axes = plt.subplots(1, n, figsize=(min(5.0 * n, 18), max(3.0, 0.12 * L + 1.5)), squeeze=False)
    from matplotlib.colors import TwoSlopeNorm

    hi = max(float(v.max()) for v in rel.values())
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, hi))  # white = balanced
    for ax, (label, v) in zip(axes[0], rel.items(), strict=True):
        im = ax.imshow(v, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(f"{label}: avg imbalance {tables[label].average[2]:.3f}", fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylabel("layer")
        step = max(1, L // 12)
        ax.set_yticks(range(0, L, step), [str(lids[i]) for i in range(0, L, step)], fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="rank load / layer mean")
    fig.suptitle("Mean per-rank load per layer", fontsize=10)
    paths.append(_save(fig, out / "rank_load.png"))

    # 3. imbalance ratio per layer
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * L + 2), 3.5))
    x = np.arange(L)
    width = 0.8 / n
    for i, (label, tab) in enumerate(tables.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, tab.imbalance, width, label=f"{label} (avg {tab.average[2]:.3f})")
    step = max(1, L // 20)
    ax.set_xticks(x[::step], [str(lids[i]) for i in range(0, L, step)], fontsize=7)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("imbalance ratio (max/mean - 1)")
    ax.set_title("Imbalance per layer (per step, averaged)", fontsize=10)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "imbalance_per_layer.png"))
    return paths


def html_report(
    tables: Mapping[str, LoadTable],
    images: Sequence[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    *,
    title: str = "eplb load report",
    notes: Sequence[str] = (),
) -> Path:
    """Write one self-contained HTML page: the tables and the PNGs (embedded as base64)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}tr.avg{font-weight:bold}"
             "img{max-width:100%;margin:1em 0}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for label, tab in tables.items():
        unit = "slot" if tab.per_expert else "rank"
        parts.append(f"<h2>{html.escape(label)}</h2><p>per {unit}, ep_size={tab.ep_size}, {tab.num_steps} steps</p>")
        parts.append("<table><tr><th>layer</th><th>mean</th><th>std</th><th>imbalance-ratio</th></tr>")
        for lab, m, s, r in tab.rows():
            cls = " class='avg'" if lab == "average" else ""
            parts.append(f"<tr{cls}><td>{lab}</td><td>{m:.2f}</td><td>{s:.4f}</td><td>{r:.4f}</td></tr>")
        parts.append("</table>")
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode()
        parts.append(f"<h3>{html.escape(Path(img).stem.replace('_', ' '))}</h3>"
                     f"<img alt='{html.escape(Path(img).name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    out = Path(path)
    atomic_write(out, "\n".join(parts).encode())
    return out
