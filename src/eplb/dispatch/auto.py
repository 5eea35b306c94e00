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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from eplb._checks import ArrayLike
from eplb.dispatch.split import split_rank_loads
from eplb.placement import Placement

__all__ = ["AutoDecision", "auto_line", "auto_strategies", "auto_summary", "balanced_dispatch_cost_ms"]

#: Balanced minus local-first ``assign_slots`` per layer in a CUDA graph on one H200 (fused Triton path),
#: ``a + b * pairs`` ms for a rank's (token, expert) pairs, ``a`` by EP size; fitted to
#: bench/results/dispatch_budget_h200_first.md (deepseek and eplb-dispatch placements, E=256, S=288). A coarse line,
#: conservative for the current token kernel (bench/results/dispatch_gpu.md measures 67-133 us) and far too high
#: for small tables (Llama-4 at 16 ranks: 13-34 us in bench/results/critical_path.md): pass dispatch_cost_ms then.
_COST_FIT = {36: (0.095, 5.8e-6), 72: (0.070, 4.7e-6)}


def balanced_dispatch_cost_ms(pairs_per_rank: float, num_ranks: int) -> float:
    """Predicted extra time (ms) of balanced over local-first dispatch for one layer (H200, CUDA graph)."""
    keys = sorted(_COST_FIT)
    a, b = _COST_FIT[min(keys, key=lambda r: abs(r - num_ranks))]
    return float(a + b * max(float(pairs_per_rank), 0.0))


@dataclass(frozen=True)
class AutoDecision:
    """The strategy chosen for one layer, with the prediction behind it (ms per step)."""

    strategy: str
    predicted_gain_ms: float
    cost_ms: float

    def as_dict(self) -> dict[str, float | str]:
        return {"strategy": self.strategy, "predicted_gain_ms": self.predicted_gain_ms, "cost_ms": self.cost_ms}


def auto_strategies(counts: ArrayLike, placement: Placement, compute_ms: Callable[[np.ndarray, int], np.ndarray],
                    *, dispatch_cost_ms: float | None = None,
                    balanced_loads: np.ndarray | None = None) -> list[AutoDecision]:
    """One :class:`AutoDecision` per layer of ``placement``.

    Args:
        counts: ``[T, L, E]`` (token, expert) pairs per step, layer and expert (``[L, E]``: one step).
        placement: the placement the layers run.
        compute_ms: ``fn(tokens [..], slots_per_rank) -> ms [..]`` expert-compute time of a rank (e.g.
            ``CostModel.compute_ms``).
        dispatch_cost_ms: balanced's extra dispatch time per layer; default :func:`balanced_dispatch_cost_ms`
            at the mean pairs per rank of the counts.
        balanced_loads: ``[T, L, R]`` balanced rank loads of these counts if already computed (reused).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3 or c.shape[1:] != (placement.num_layers, placement.num_experts):
        raise ValueError(f"counts: expected [steps, {placement.num_layers}, {placement.num_experts}], got {list(c.shape)}")
    c = np.round(c)
    R, spr = placement.num_ranks, placement.slots_per_rank
    lf = split_rank_loads(c, placement, "local-first").max(-1)  # [T, L]
    bal = (np.asarray(balanced_loads, dtype=np.float64) if balanced_loads is not None
           else split_rank_loads(c, placement, "balanced")).max(-1)
    t_lf = np.asarray(compute_ms(lf, spr), dtype=np.float64).mean(0)  # [L]
    t_bal = np.asarray(compute_ms(bal, spr), dtype=np.float64).mean(0)
    out = []
    for layer in range(placement.num_layers):
        gain = float(t_lf[layer] - t_bal[layer])
        cost = float(dispatch_cost_ms) if dispatch_cost_ms is not None else balanced_dispatch_cost_ms(
            float(c[:, layer].sum(-1).mean()) / R, R)
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
