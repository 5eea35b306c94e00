"""Per-layer load report: mean, std and imbalance ratio of rank (or slot) loads.

The definition is TensorRT-LLM's ``report_load_statistics.py``:

* counts ``[T, L, E]`` are projected onto physical slots: without a placement slot ``s`` holds
  expert ``s`` (``S == E``); with one, slot load = count of its expert / replicas of that expert
  (uniform split, :func:`eplb.metrics.slot_loads`);
* rank load = slot loads reshaped ``[ep_size, S / ep_size]`` and summed (``per_expert=True``
  reports the slots themselves instead of ranks);
* for every step and layer: ``mean`` and unbiased ``std`` (``ddof=1``, torch's default) over ranks,
  ``imbalance = max / mean - 1`` (0 for a step with no tokens at all);
* each is then averaged over the steps; the ``average`` row is the mean over layers.

Units: tokens (routed token-expert pairs) per rank per step; imbalance is dimensionless.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from eplb._checks import ArrayLike, check_positive_int
from eplb.metrics import imbalance_ratio, slot_loads
from eplb.placement import Placement
from eplb.stats.trace import Trace, TraceError, as_counts

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["LoadTable", "align_placement", "load_table", "merge_tables", "render", "unit_loads"]


@dataclass(frozen=True)
class LoadTable:
    """Per-layer load statistics (one row per MoE layer plus the ``average`` row).

    Attributes:
        layer_ids: model layer index of each row (``[L]``).
        mean: ``[L]`` mean load per rank (or slot) per step, averaged over steps (tokens).
        std: ``[L]`` unbiased std of the load over ranks (or slots) per step, averaged over steps (tokens).
        imbalance: ``[L]`` ``max / mean - 1`` per step, averaged over steps.
        ep_size: number of ranks the slots were grouped into.
        num_steps: ``T``, steps averaged over.
        per_expert: statistics over slots instead of ranks.
        placement: a short label of the projected placement (``""`` for the contiguous identity layout).
        meta: free provenance (trace model/source, placement digest, ...).
    """

    layer_ids: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    imbalance: np.ndarray
    ep_size: int
    num_steps: int
    per_expert: bool = False
    placement: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    COLUMNS = ("mean", "std", "imbalance-ratio")

    @property
    def average(self) -> tuple[float, float, float]:
        """``(mean, std, imbalance)`` averaged over layers (the ``average`` row)."""
        return float(self.mean.mean()), float(self.std.mean()), float(self.imbalance.mean())

    def rows(self) -> Iterator[tuple[str, float, float, float]]:
        """``(label, mean, std, imbalance)`` per layer, then ``("average", ...)``."""
        for i, lid in enumerate(self.layer_ids):
            yield str(lid), float(self.mean[i]), float(self.std[i]), float(self.imbalance[i])
        yield ("average", *self.average)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (rows keyed by layer id, plus ``average``)."""
        return {
            "ep_size": self.ep_size, "num_steps": self.num_steps, "per_expert": self.per_expert,
            "placement": self.placement, "meta": dict(self.meta),
            "rows": [{"layer": r[0], "mean": r[1], "std": r[2], "imbalance_ratio": r[3]} for r in self.rows()],
        }

    def to_text(self) -> str:
        """Plain text in the layout of TensorRT-LLM's report (pandas-like columns)."""
        lines = [f"{'':>8} {'mean':>12} {'std':>12} {'imbalance-ratio':>16}"]
        for label, m, s, r in self.rows():
            lines.append(f"{label:>8} {m:12.4f} {s:12.6f} {r:16.6f}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A Markdown table."""
        lines = ["| layer | mean | std | imbalance ratio |", "| --- | --- | --- | --- |"]
        for label, m, s, r in self.rows():
            lines.append(f"| {label} | {m:.4f} | {s:.4f} | {r:.4f} |")
        return "\n".join(lines)


def align_placement(placement: Placement, layer_ids: Sequence[int], num_experts: int) -> Placement:
    """The rows of ``placement`` for the trace layers ``layer_ids`` (matched by model layer id).

    When the ids do not all match but the layer counts agree and either side uses the default
    ids ``0..L-1``, rows are matched by position. Raises ``ValueError`` naming missing layers.
    """
    lids = [int(i) for i in layer_ids]
    if placement.num_experts != num_experts:
        raise ValueError(f"placement: {placement.num_experts} experts, but the trace has {num_experts}")
    pos = {lid: p for p, lid in enumerate(placement.layer_ids)}
    missing = [lid for lid in lids if lid not in pos]
    if not missing:
        return placement.select_layers([pos[lid] for lid in lids])
    default = tuple(range(len(lids)))
    if placement.num_layers == len(lids) and (tuple(lids) == default or placement.layer_ids == default):
        return placement
    raise ValueError(
        f"placement: no row for trace layer(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
        f"(placement layers: {list(placement.layer_ids)[:8]}{' ...' if placement.num_layers > 8 else ''})"
    )


def unit_loads(
    counts: Trace | ArrayLike,
    ep_size: int,
    placement: Placement | None = None,
    layer_ids: Sequence[int] | None = None,
    per_expert: bool = False,
) -> np.ndarray:
    """``[T, L, U]`` loads of the report's units: ranks (``U = ep_size``) or slots (``per_expert``).

    Without a placement slots are the experts themselves (``S = E``). ``ep_size`` must divide ``S``.
    """
    c = as_counts(counts).astype(np.float64)
    T, L, E = c.shape
    ep = check_positive_int(ep_size, "ep_size")
    if placement is not None:
        lids = list(layer_ids) if layer_ids is not None else list(range(L))
        pl = align_placement(placement, lids, E)
        slots = slot_loads(c, pl)  # [T, L, S]
    else:
        slots = c
    S = slots.shape[-1]
    if S % ep:
        what = "slots of the placement" if placement is not None else "experts (no placement: one slot per expert)"
        raise ValueError(f"ep_size: {S} {what} are not divisible by ep_size={ep}")
    if per_expert:
        return slots
    return slots.reshape(T, L, ep, S // ep).sum(-1)


def load_table(
    counts: Trace | ArrayLike,
    ep_size: int,
    placement: Placement | None = None,
    layer_ids: Sequence[int] | None = None,
    per_expert: bool = False,
) -> LoadTable:
    """Per-layer mean / std / imbalance of rank loads, computed per step then averaged (TensorRT-LLM).

    Args:
        counts: ``[T, L, E]`` (or ``[L, E]`` = one step) token counts, or a :class:`Trace`
            (its layer ids are used when ``layer_ids`` is not given).
        ep_size: ranks; must divide the number of slots (``E`` without a placement).
        placement: project the counts onto this placement (slot load = count / replicas); its rows
            are matched to the trace layers by model layer id.
        layer_ids: model layer index of each of the ``L`` layers (default: the trace's, else ``0..L-1``).
        per_expert: statistics over slots instead of ranks.
    """
    if isinstance(counts, Trace):
        lids = tuple(layer_ids) if layer_ids is not None else counts.layer_ids
        meta: dict[str, Any] = {"model": counts.model, "source": counts.source}
    else:
        meta = {}
        lids = tuple(layer_ids) if layer_ids is not None else ()
    c = as_counts(counts)
    T, L, _ = c.shape
    if not lids:
        lids = tuple(range(L))
    if len(lids) != L:
        raise TraceError(f"layer_ids: {len(lids)} ids for {L} layers")
    if not c.any():
        import warnings

        src = meta.get("source") or "the counts"
        warnings.warn(f"{src}: the window ({T} step(s)) holds no routed tokens at all: its imbalance is not a "
                      "measurement (pick a window with traffic)", UserWarning, stacklevel=2)
    u = unit_loads(c, ep_size, placement, lids, per_expert)  # [T, L, U]
    if u.shape[-1] < 2:
        raise ValueError(f"ep_size: need at least 2 {'slots' if per_expert else 'ranks'} for an unbiased std, got 1")
    mean = u.mean(-1)
    std = u.std(-1, ddof=1)
    imb = imbalance_ratio(u, axis=-1)
    label = ""
    if placement is not None:
        label = str(placement.meta.get("policy", "")) or "placement"
        meta["placement_digest"] = placement.digest()
    return LoadTable(
        layer_ids=tuple(int(i) for i in lids), mean=mean.mean(0), std=std.mean(0), imbalance=imb.mean(0),
        ep_size=int(ep_size), num_steps=T, per_expert=per_expert, placement=label, meta=meta,
    )


def merge_tables(tables: Sequence[LoadTable]) -> LoadTable:
    """One table from tables of consecutive step chunks (each row weighted by its number of steps).

    Exact: every statistic is a per-step average, so chunking a trace does not change the result.
    """
    if not tables:
        raise ValueError("tables: nothing to merge")
    first = tables[0]
    for t in tables[1:]:
        if t.layer_ids != first.layer_ids or t.ep_size != first.ep_size or t.per_expert != first.per_expert:
            raise ValueError("tables: chunks disagree on layers, ep_size or per_expert")
    w = np.asarray([t.num_steps for t in tables], dtype=np.float64)
    tot = float(w.sum())

    def avg(name: str) -> np.ndarray:
        return np.sum([getattr(t, name) * wi for t, wi in zip(tables, w, strict=True)], axis=0) / tot

    return LoadTable(first.layer_ids, avg("mean"), avg("std"), avg("imbalance"), first.ep_size, int(tot),
                     first.per_expert, first.placement, dict(first.meta))


def render(table: LoadTable, title: str | None = None) -> Table:
    """A :class:`rich.table.Table` of ``table`` (layers, then a bold ``average`` row)."""
    from rich.table import Table

    unit = "slot" if table.per_expert else "rank"
    if title is None:
        title = f"Load statistics per {unit} (ep_size={table.ep_size}, {table.num_steps} steps)"
        if table.placement:
            title += f", projected onto {table.placement}"
    t = Table(title=title)
    t.add_column("layer", justify="right")
    t.add_column("mean", justify="right")
    t.add_column("std", justify="right")
    t.add_column("imbalance-ratio", justify="right")
    rows = list(table.rows())
    for i, (label, m, s, r) in enumerate(rows):
        last = i == len(rows) - 1
        t.add_row(label, f"{m:.2f}", f"{s:.4f}", f"{r:.4f}", style="bold" if last else None, end_section=i == len(rows) - 2)
    return t
