"""Outputs of simulations: side-by-side summary table, JSON for tooling, PNG plots.

Every output file is written atomically (:func:`eplb.stats.trace.atomic_write`). Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eplb._io import atomic_write
from eplb.sim.engine import SimResult

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["SUMMARY_ROWS", "SimReport", "save_figure", "summary_table"]

#: (key in :meth:`SimResult.summary`, row label, format) of the side-by-side table.
SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("step_ms_mean", "step ms mean", "{:.3f}"),
    ("step_ms_p50", "step ms p50", "{:.3f}"),
    ("step_ms_p99", "step ms p99", "{:.3f}"),
    ("compute_ms_mean", " compute ms", "{:.3f}"),
    ("comm_ms_mean", " all-to-all ms", "{:.3f}"),
    ("imbalance_mean", "imbalance mean", "{:.4f}"),
    ("imbalance_p99", "imbalance p99", "{:.4f}"),
    ("rebalances", "rebalances", "{:d}"),
    ("plans", "plans", "{:d}"),
    ("layer_updates", "layer updates", "{:d}"),
    ("bytes_moved", "GB moved", "gb"),
    ("migration_ms", "migration ms", "{:.2f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if fmt == "gb":
        return f"{value / 1e9:.2f}"
    return fmt.format(value)


def summary_table(results: Sequence[SimResult], title: str = "simulation") -> Table:
    """A rich table: one column per run, one row per metric of :data:`SUMMARY_ROWS`."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    for r in results:
        t.add_column(r.label, justify="right")
    sums = [r.summary() for r in results]
    for key, name, fmt in SUMMARY_ROWS:
        t.add_row(name, *(_fmt(s[key], fmt) for s in sums))
    return t


def save_figure(fig: Any, path: Path) -> Path:
    """Render a matplotlib figure to PNG and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    return path


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or x.size < w:
        return x
    k = np.ones(w) / w
    return np.convolve(x, k, mode="valid")


@dataclass
class SimReport:
    """The runs of one ``simulate`` call, with provenance.

    Attributes:
        results: runs in display order.
        meta: trace name, synthetic flag, layout, cost model, options.
    """

    results: list[SimResult]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, label: str) -> SimResult:
        for r in self.results:
            if r.label == label:
                return r
        raise KeyError(f"no run labelled {label!r}; runs: {[r.label for r in self.results]}")

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.results]

    def title(self) -> str:
        m = self.meta
        syn = " [SYNTHETIC data]" if m.get("synthetic") else ""
        return (f"simulate {m.get('trace', '?')}{syn}: {m.get('num_ranks', '?')} ranks, {m.get('num_slots', '?')} slots, "
                f"{m.get('num_nodes', 1)} node(s), {m.get('steps', '?')} steps")

    def table(self) -> Table:
        return summary_table(self.results, self.title())

    def to_dict(self, series: bool = True) -> dict[str, Any]:
        """JSON for tooling: ``meta``, ``summary`` (per run), ``events`` and optionally ``series``."""
        out: dict[str, Any] = {
            "format": "eplb.simulation", "version": 1, "meta": self.meta,
            "summary": {r.label: r.summary() for r in self.results},
            "layer_ms": {r.label: r.layer_ms.round(6).tolist() for r in self.results},
            "layer_imbalance": {r.label: r.imbalance.mean(axis=0).round(6).tolist() for r in self.results},
            "events": {r.label: r.events for r in self.results},
        }
        if series:
            out["series"] = {r.label: r.series() for r in self.results}
        return out

    def save(self, out_dir: str | Path, plots: bool = True) -> list[Path]:
        """Write ``simulation.json``, ``summary.md``, final placements of online runs and PNG plots."""
        d = Path(out_dir)
        written = []
        p = d / "simulation.json"
        atomic_write(p, (json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n").encode())
        written.append(p)
        p = d / "summary.md"
        atomic_write(p, self.markdown().encode())
        written.append(p)
        for r in self.results:
            if r.mode == "online" and r.final_placement is not None:
                p = d / f"final_placement_{_safe(r.label)}.json"
                atomic_write(p, (json.dumps(r.final_placement.to_dict()) + "\n").encode())
                written.append(p)
        if plots:
            written += self.plot(d)
        return written

    def markdown(self) -> str:
        """The summary table as Markdown (with the title and the cost model's provenance)."""
        lines = [f"# {self.title()}", ""]
        cm = self.meta.get("cost_model", {})
        if cm:
            lines += [f"Cost model: {cm.get('device', '?')}, {cm.get('date', '?')}, {cm.get('source', '?')}", ""]
        sums = [r.summary() for r in self.results]
        lines.append("| metric | " + " | ".join(r.label for r in self.results) + " |")
        lines.append("| --- |" + " --- |" * len(self.results))
        for key, name, fmt in SUMMARY_ROWS:
            lines.append(f"| {name.strip()} | " + " | ".join(_fmt(s[key], fmt) for s in sums) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, out_dir: str | Path) -> list[Path]:
        """PNG plots: step time and imbalance over steps, per-layer imbalance, cumulative bytes moved."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = Path(out_dir)
        paths = []
        syn = " (SYNTHETIC data)" if self.meta.get("synthetic") else ""
        T = self.results[0].num_steps if self.results else 0
        w = max(1, T // 200)
        fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        for r in self.results:
            x = np.arange(r.num_steps)[: max(1, r.num_steps - w + 1)] + (w - 1) / 2
            axes[0].plot(x, _smooth(r.step_ms, w), label=r.label, lw=1)
            axes[1].plot(x, _smooth(r.imbalance.mean(axis=1), w), label=r.label, lw=1)
            ev = [c[0] for e in r.events for c in e.get("commits", [])]
            if ev:
                axes[1].plot(ev, np.interp(ev, x, _smooth(r.imbalance.mean(axis=1), w)), "v", ms=4,
                             color=axes[1].lines[-1].get_color())
        axes[0].set_ylabel("simulated MoE step time (ms)")
        axes[1].set_ylabel("imbalance ratio (max/mean - 1)")
        axes[1].set_xlabel(f"step (moving average over {w})" if w > 1 else "step")
        axes[0].legend(fontsize=8)
        axes[0].set_title(self.title() + syn, fontsize=9)
        paths.append(save_figure(fig, d / "timeseries.png"))
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(10, 4))
        for r in self.results:
            ax.plot(r.imbalance.mean(axis=0), marker=".", lw=1, label=r.label)
        ax.set_xlabel("MoE layer (position)")
        ax.set_ylabel("mean imbalance ratio")
        ax.legend(fontsize=8)
        ax.set_title("per-layer imbalance" + syn, fontsize=9)
        paths.append(save_figure(fig, d / "layers.png"))
        plt.close(fig)

        if any(r.bytes_moved.any() for r in self.results):
            fig, ax = plt.subplots(figsize=(10, 4))
            for r in self.results:
                ax.step(np.arange(r.num_steps), np.cumsum(r.bytes_moved) / 1e9, where="post", label=r.label)
            ax.set_xlabel("step")
            ax.set_ylabel("cumulative expert bytes moved (GB)")
            ax.legend(fontsize=8)
            ax.set_title("migration" + syn, fontsize=9)
            paths.append(save_figure(fig, d / "migration.png"))
            plt.close(fig)
        return paths


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Mapping):
        return dict(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
