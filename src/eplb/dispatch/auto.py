"""``strategy="auto"``: per layer, balanced dispatch only where a cost model predicts a net gain.

For every layer of a placement and a counts history ``[T, L, E]`` (the same on every rank: a trace, or the
balancer's counters after their all-reduce), :func:`auto_strategies` predicts the hottest rank's expert compute
under ``local-first`` and under ``balanced`` (:func:`~eplb.dispatch.split_rank_loads`, the same splits the
runtime uses), averaged over the steps, through a compute-time function (e.g. the simulator's
``CostModel.compute_ms``), and takes ``balanced`` only when that predicted gain exceeds the balanced dispatch
cost (:func:`balanced_dispatch_cost_ms`, measured). Plain float64 arithmetic on identical inputs, so every rank
reaches the same choice (the EP layer also folds the choice into its cross-rank agreement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from eplb._checks import ArrayLike
from eplb._counts import evenly_spaced
from eplb.dispatch.split import split_rank_loads
from eplb.dispatch.table import DispatchTable, layer_tables
from eplb.errors import InputError
from eplb.placement import Placement

__all__ = ["AutoDecision", "auto_line", "auto_strategies", "auto_summary", "balanced_dispatch_cost_ms",
           "calibrate_dispatch_cost_ms", "solver_sweeps"]

#: Balanced minus local-first ``assign_slots`` per layer in a CUDA graph (one call) on one H200 (fused Triton
#: path), in microseconds, by the table's size:
#: ``base + per_sweep16 * solver_sweeps * BLOCK_K / 16 + per_chunk * ceil(pairs / 2048)``, where ``solver_sweeps``
#: counts the plan kernel's water-filling updates (one with a single colour, else at most ``(6 + 2) * colours``),
#: ``BLOCK_K`` is the fluid experts' rank count ``Kd`` padded to a power of two (the width each update sorts) and a
#: token chunk is 2048 (token, expert) pairs of this rank, scanned by every expert's program. Least-squares fit
#: (rounded; base raised to 5 so that one-colour 256-token layers stay local-first) to the 26 balanced-minus-
#: local-first points of bench/results/dispatch_gpu.md and the assign_slots parts of bench/results/critical_path.md
#: (2026-12-02 18:07 UTC, H200): Llama-4 16 ranks, DeepSeek-V3 shape at 36 / 72 ranks, 256-8192 tokens per rank.
_COST_US = {"base": 5.0, "per_sweep16": 3.0, "per_chunk": 4.7}


def solver_sweeps(num_colors: int, sweeps: int = 6, int_sweeps: int = 2) -> int:
    """Water-filling updates of the balanced plan kernel (an upper bound: it stops early at a fixed point)."""
    if num_colors <= 0:
        return 0
    return 1 if num_colors == 1 and int_sweeps >= 1 else (sweeps + int_sweeps) * num_colors


def balanced_dispatch_cost_ms(pairs_per_rank: float, num_ranks: int | None = None, *, num_colors: int = 1,
                              fluid_ranks: int = 16) -> float:
    """Predicted extra time (ms) of balanced over local-first dispatch for one layer (H200, CUDA graph) from the
    table's size: this rank's (token, expert) pairs, the layer's colour count (``DispatchTable.num_colors``) and
    its fluid experts' rank count (``DispatchTable.fl_rank.shape[1]``). ``num_ranks`` is accepted for older
    callers; the measured cost depends on it only through the table."""
    chunks = -(-max(int(round(float(pairs_per_rank))), 0) // 2048)
    width = 1 << max(int(fluid_ranks) - 1, 0).bit_length()
    us = (_COST_US["base"] + _COST_US["per_sweep16"] * solver_sweeps(int(num_colors)) * width / 16
          + _COST_US["per_chunk"] * chunks)
    return float(us) / 1000.0


def calibrate_dispatch_cost_ms(table: DispatchTable, tokens_per_rank: int, top_k: int, *, iters: int = 20,
                               seed: int = 0) -> float:
    """Measure balanced minus local-first ``assign_slots`` (ms per call) on ``table``'s device for
    ``tokens_per_rank`` tokens of ``top_k`` (SYNTHETIC uniform routing, every rank with the same counts): CUDA
    graph replays on CUDA, plain calls elsewhere; the median of ``iters``. A once-per-table calibration for
    :func:`auto_strategies`' ``dispatch_cost_ms`` (agree on it across ranks, e.g. the max of an all-reduce)."""
    import statistics
    import time

    import torch

    from eplb.dispatch.assign import assign_slots

    dev = table.log2phy.device
    gen = torch.Generator().manual_seed(seed)
    E, R = table.num_experts, table.num_ranks
    ids = torch.randint(0, E, (int(tokens_per_rank), int(top_k)), generator=gen).to(dev)
    g = torch.bincount(ids.reshape(-1), minlength=E).expand(R, E).contiguous()
    times = {}
    for strat in ("local-first", "balanced"):
        def run(strat: str = strat) -> torch.Tensor:
            return assign_slots(ids, table, strat, rank=0, global_counts=g)

        fn = run
        if dev.type == "cuda":
            run()
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            fn = graph.replay
        fn()
        samples = []
        for _ in range(max(int(iters), 1)):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        times[strat] = statistics.median(samples)
    return max(times["balanced"] - times["local-first"], 0.0)


@dataclass(frozen=True)
class AutoDecision:
    """The strategy chosen for one layer, with the prediction behind it (ms per step)."""

    strategy: str
    predicted_gain_ms: float
    cost_ms: float

    def as_dict(self) -> dict[str, float | str]:
        return {"strategy": self.strategy, "predicted_gain_ms": self.predicted_gain_ms, "cost_ms": self.cost_ms}


def table_sizes(placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """``(num_colors [L], fluid_ranks [L])``: each layer's :attr:`DispatchTable.num_colors` and
    ``DispatchTable.fl_rank.shape[-1]`` (the most distinct ranks of one expert, at least 1), from one
    :func:`~eplb.dispatch.table.layer_tables` call for every layer (no per-layer tables, no local-first map).
    The colouring is greedy per layer and independent of the other layers' padding, so the values are those of
    ``DispatchTable.from_placement(placement, layer)``."""
    t = layer_tables(placement, static_map=False)
    fl_color, fl_rank = t["fl_color"], t["fl_rank"]
    colors = np.where((fl_color >= 0).any(axis=1), fl_color.max(axis=1) + 1, 0)
    return colors.astype(np.int64), np.maximum((fl_rank >= 0).sum(axis=-1).max(axis=1), 1).astype(np.int64)


def auto_strategies(counts: ArrayLike, placement: Placement, compute_ms: Callable[[np.ndarray, int], np.ndarray],
                    *, dispatch_cost_ms: float | Sequence[float | None] | None = None,
                    balanced_loads: np.ndarray | None = None, max_steps: int | None = 256) -> list[AutoDecision]:
    """One :class:`AutoDecision` per layer of ``placement``.

    Args:
        counts: ``[T, L, E]`` (token, expert) pairs per step, layer and expert (``[L, E]``: one step).
        placement: the placement the layers run.
        compute_ms: ``fn(tokens [..], slots_per_rank) -> ms [..]`` expert-compute time of a rank (e.g.
            ``CostModel.compute_ms``).
        dispatch_cost_ms: balanced's extra dispatch time, one for every layer or one per layer (``None`` entries:
            the default), e.g. from :func:`calibrate_dispatch_cost_ms`; default :func:`balanced_dispatch_cost_ms`
            from the layer's table size (mean pairs per rank of the counts, its colour count).
        balanced_loads: ``[T, L, R]`` balanced rank loads of these counts if already computed (reused).
        max_steps: predict from at most this many evenly spaced steps (``None``: every step); the prediction is a
            mean over steps, so a long trace need not be split in full (the balanced split costs ``O(steps)``).
    """
    c = np.asarray(counts)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3 or c.shape[1:] != (placement.num_layers, placement.num_experts):
        raise InputError(f"counts: expected [steps, {placement.num_layers}, {placement.num_experts}], got {list(c.shape)}")
    if max_steps is not None and c.shape[0] > int(max_steps):
        pick = evenly_spaced(c.shape[0], max_steps)
        c = c[pick]
        if balanced_loads is not None:
            balanced_loads = np.asarray(balanced_loads)[pick]
    c = np.round(np.asarray(c, dtype=np.float64))
    R, spr = placement.num_ranks, placement.slots_per_rank
    lf = split_rank_loads(c, placement, "local-first").max(-1)  # [T, L]
    bal = (np.asarray(balanced_loads, dtype=np.float64) if balanced_loads is not None
           else split_rank_loads(c, placement, "balanced")).max(-1)
    t_lf = np.asarray(compute_ms(lf, spr), dtype=np.float64).mean(0)  # [L]
    t_bal = np.asarray(compute_ms(bal, spr), dtype=np.float64).mean(0)
    per_layer = (list(dispatch_cost_ms) if dispatch_cost_ms is not None and not np.isscalar(dispatch_cost_ms)
                 else [dispatch_cost_ms] * placement.num_layers)
    if len(per_layer) != placement.num_layers:
        raise ValueError(f"dispatch_cost_ms: expected one value or {placement.num_layers} (one per layer), "
                         f"got {len(per_layer)}")
    colors, fluid_ranks = (table_sizes(placement) if any(g is None for g in per_layer) else (None, None))
    out = []
    for layer in range(placement.num_layers):
        gain = float(t_lf[layer] - t_bal[layer])
        given = per_layer[layer]
        if given is None:
            assert colors is not None and fluid_ranks is not None
            cost = balanced_dispatch_cost_ms(float(c[:, layer].sum(-1).mean()) / R, R, num_colors=int(colors[layer]),
                                             fluid_ranks=int(fluid_ranks[layer]))
        else:
            cost = float(given)
        out.append(AutoDecision("balanced" if gain > cost else "local-first", gain, cost))
    return out


def auto_summary(decisions: list[AutoDecision]) -> dict[str, object]:
    """What ``strategy="auto"`` chose over a model's layers: ``balanced_layers`` (positions), and the predicted
    gain and dispatch cost summed over the layers that run balanced (ms per step), plus every layer's decision."""
    bal = [i for i, d in enumerate(decisions) if d.strategy == "balanced"]
    best = max(range(len(decisions)), key=lambda i: decisions[i].predicted_gain_ms - decisions[i].cost_ms, default=None)
    return {"balanced_layers": bal, "num_layers": len(decisions),
            "best_layer": best,
            "best_layer_gain_ms": None if best is None else float(decisions[best].predicted_gain_ms),
            "best_layer_cost_ms": None if best is None else float(decisions[best].cost_ms),
            "predicted_gain_ms": float(sum(decisions[i].predicted_gain_ms for i in bal)),
            "cost_ms": float(sum(decisions[i].cost_ms for i in bal)),
            "per_layer": [d.as_dict() for d in decisions]}


def auto_line(summary: dict[str, object]) -> str:
    """One line for the CLI: ``auto dispatch: balanced on 3/24 layers, predicted gain 0.120 ms, cost 0.050 ms``."""
    bal = summary["balanced_layers"]
    assert isinstance(bal, list)
    return (f"auto dispatch: balanced on {len(bal)}/{summary['num_layers']} layers"
            + (f" {bal}" if 0 < len(bal) <= 16 else "")
            + f", predicted gain {float(summary['predicted_gain_ms']):.3f} ms/step, "  # type: ignore[arg-type]
              f"dispatch cost {float(summary['cost_ms']):.3f} ms/step"  # type: ignore[arg-type]
            + ("" if summary["best_layer"] is None else
               f" (best layer {summary['best_layer']}: gain {float(summary['best_layer_gain_ms']):.3f} vs cost "  # type: ignore[arg-type]
               f"{float(summary['best_layer_cost_ms']):.3f} ms)"))  # type: ignore[arg-type]
