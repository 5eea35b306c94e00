"""Load metrics of placements: rank loads, imbalance ratio, balancedness.

Pure functions on arrays. Counts are ``[..., L, E]`` (any leading step dimensions); a slot's
load is its expert's count divided by the expert's replica count (uniform split), unless a
per-slot split is given.

* imbalance ratio = ``max / mean - 1`` of rank load (TensorRT-LLM), computed per step, then averaged;
* balancedness = ``mean / max`` of rank load (vLLM, SGLang).
"""

from __future__ import annotations

import numpy as np

from eplb._checks import ArrayLike, check_load
from eplb.placement import Placement

__all__ = ["balancedness", "imbalance_ratio", "rank_loads", "slot_loads"]


def slot_loads(counts: ArrayLike, placement: Placement) -> np.ndarray:
    """``[..., L, S]`` load of each slot: count of its expert / replicas of that expert."""
    c = check_load(counts, "counts", ndim=(2, 3, 4), num_experts=placement.num_experts)
    if c.shape[-2] != placement.num_layers:
        raise ValueError(f"counts: {c.shape[-2]} layers, but the placement has {placement.num_layers}")
    per_replica = c / placement.logcnt  # [..., L, E]
    idx = np.broadcast_to(placement.phy2log, c.shape[:-1] + (placement.num_slots,)) if c.ndim > 2 else placement.phy2log
    return np.take_along_axis(per_replica, idx, axis=-1)


def rank_loads(counts: ArrayLike, placement: Placement) -> np.ndarray:
    """``[..., L, R]`` load of each rank under uniform splitting over replicas."""
    s = slot_loads(counts, placement)
    return s.reshape(s.shape[:-1] + (placement.num_ranks, placement.slots_per_rank)).sum(-1)


def imbalance_ratio(loads: ArrayLike, axis: int = -1) -> np.ndarray:
    """``max / mean - 1`` over ``axis`` (ranks); 0 where the mean is 0."""
    x = np.asarray(loads, dtype=np.float64)
    mean = x.mean(axis=axis)
    mx = x.max(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, mx / np.where(mean > 0, mean, 1.0) - 1.0, 0.0)


def balancedness(loads: ArrayLike, axis: int = -1) -> np.ndarray:
    """``mean / max`` over ``axis`` (ranks); 1 where the max is 0."""
    x = np.asarray(loads, dtype=np.float64)
    mx = x.max(axis=axis)
    return np.where(mx > 0, x.mean(axis=axis) / np.where(mx > 0, mx, 1.0), 1.0)
