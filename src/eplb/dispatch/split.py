"""Slot loads of per-step counts under a dispatch strategy, vectorised over steps and layers.

:func:`split_counts` is what evaluate / simulate / benchmarks call so that every number comes
from the same code as the runtime's :func:`~eplb.dispatch.assign_slots`.
:func:`per_step_lower_bound` is the LP bound of a fixed placement with perfect dispatch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplb._checks import ArrayLike, check_load
from eplb.dispatch.solver import balanced_quotas, lp_max_load, slot_quotas
from eplb.dispatch.table import layer_tables
from eplb.metrics import slot_loads
from eplb.placement import Placement

__all__ = ["SPLIT_STRATEGIES", "expert_ranks", "per_step_lower_bound", "split_counts", "split_rank_loads"]

SPLIT_STRATEGIES = ("uniform", "balanced", "local-first", "round-robin")


def _check_counts(counts: ArrayLike, placement: Placement) -> np.ndarray:
    if not isinstance(placement, Placement):
        raise TypeError(f"placement: expected an eplb.Placement, got {type(placement).__name__}")
    c = check_load(counts, "counts", ndim=(2, 3, 4), num_experts=placement.num_experts)
    if c.shape[-2] != placement.num_layers:
        raise ValueError(f"counts: {c.shape[-2]} layers, but the placement has {placement.num_layers}")
    return c


def split_counts(counts: ArrayLike, placement: Placement, strategy: str = "balanced", **solver_options: int) -> Any:
    """Tokens each physical slot receives, ``[..., L, S]`` (float64), for counts ``[..., L, E]``.

    Strategies:

    * ``"uniform"``: ``count / replicas`` per replica (the static plan; expected load of ``"round-robin"``);
    * ``"round-robin"``: same expected loads as ``"uniform"``;
    * ``"local-first"``: expected loads of the static local-first map when every source rank routes an equal
      share of each expert's tokens (``count * (#ranks mapped to the slot) / R``);
    * ``"balanced"``: the per-step balanced split (integer tokens; counts must be whole numbers), exactly the
      quotas :func:`~eplb.dispatch.plan_quotas` gives the runtime.

    Returns a numpy array, or a float64 torch tensor on the input's device when ``counts`` is a tensor.
    """
    if strategy not in SPLIT_STRATEGIES:
        raise ValueError(f"strategy: unknown split strategy {strategy!r}; expected one of {list(SPLIT_STRATEGIES)}")
    is_torch = isinstance(counts, torch.Tensor)
    device = counts.device if isinstance(counts, torch.Tensor) else None
    c = _check_counts(counts, placement)
    if strategy in ("uniform", "round-robin"):
        out = slot_loads(c, placement)
    elif strategy == "local-first":
        t = layer_tables(placement)
        R = placement.num_ranks
        sm = t["static_map"]  # [L, R, E]
        hits = np.zeros((placement.num_layers, placement.num_slots), dtype=np.float64)
        np.add.at(hits, (np.repeat(np.arange(placement.num_layers), R * placement.num_experts), sm.ravel()), 1.0)
        w = hits / R  # fraction of source ranks mapped to each slot
        out = np.take_along_axis(c, np.broadcast_to(placement.phy2log, c.shape[:-1] + (placement.num_slots,)), -1) * w
    else:
        if np.any(c != np.round(c)):
            raise ValueError("counts: the balanced split needs whole token counts")
        out = _balanced_slots(torch.as_tensor(c.astype(np.int64)), placement, **solver_options).numpy().astype(np.float64)
    if is_torch:
        return torch.as_tensor(out, dtype=torch.float64, device=device)
    return out


def _buckets(placement: Placement) -> list[np.ndarray]:
    """Layer positions grouped by table width (``ceil(log2(max replicas - 1))``): at most ~``log2(R)`` buckets,
    so the widest layer does not pad every layer."""
    width = (np.maximum(placement.logcnt.max(1), 2) - 1).astype(np.int64)
    bucket = np.ceil(np.log2(width)).astype(np.int64)
    return [np.nonzero(bucket == b)[0] for b in np.unique(bucket)]


def _balanced_slots(c: torch.Tensor, placement: Placement, **solver_options: int) -> torch.Tensor:
    """``[..., L, S]`` balanced slot quotas, solved per bucket of layers (:func:`_buckets`), each bucket batched
    over steps and its layers."""
    out = torch.zeros(c.shape[:-1] + (placement.num_slots,), dtype=torch.int64)
    for pos in _buckets(placement):
        t = layer_tables(placement.select_layers(pos.tolist()), static_map=False)
        tt = {k: torch.as_tensor(v) for k, v in t.items() if isinstance(v, np.ndarray)}
        cb = c[..., torch.as_tensor(pos), :]
        q = balanced_quotas(cb, tt["fl_expert"], tt["fl_rank"], tt["color_members"], tt["single_rank"],
                            placement.num_ranks, **solver_options)
        valid = tt["log2phy"] >= 0
        qs = slot_quotas(q, cb, tt["slot_f"], tt["rep_kd"], tt["rep_mult"], tt["rep_pos"], valid)  # [..., Lb, E, K]
        idx = tt["log2phy"].clamp(min=0).flatten(-2).expand(qs.shape[:-2] + (-1,))
        part = torch.zeros(qs.shape[:-2] + (placement.num_slots,), dtype=torch.int64).scatter_add_(-1, idx, qs.flatten(-2))
        out[..., torch.as_tensor(pos), :] = part
    return out


def _balanced_ranks(c: torch.Tensor, placement: Placement, **solver_options: int) -> torch.Tensor:
    """``[..., L, R]`` rank loads of the balanced split, straight from the fluid quotas (no per-slot quotas and
    no static map are built): a rank's load is its single-replica experts' tokens plus its fluid quotas.
    Equal to summing :func:`_balanced_slots` over each rank's slots."""
    R = placement.num_ranks
    out = torch.zeros(c.shape[:-1] + (R,), dtype=torch.int64)
    for pos in _buckets(placement):
        t = layer_tables(placement.select_layers(pos.tolist()), static_map=False)
        fe, fr, cm, sr = (torch.as_tensor(t[k]) for k in ("fl_expert", "fl_rank", "color_members", "single_rank"))
        cb = c[..., torch.as_tensor(pos), :]
        q = balanced_quotas(cb, fe, fr, cm, sr, R, **solver_options)  # [..., Lb, F, Kd]
        lead = q.shape[:-2]
        loads = torch.zeros(lead + (R,), dtype=torch.int64)
        loads.scatter_add_(-1, sr.clamp(min=0).expand(lead + sr.shape[-1:]), cb * (sr >= 0))
        loads.scatter_add_(-1, fr.clamp(min=0).flatten(-2).expand(lead + (-1,)), (q * (fr >= 0)).flatten(-2))
        out[..., torch.as_tensor(pos), :] = loads
    return out


def expert_ranks(placement: Placement) -> np.ndarray:
    """``[L, E, Kd]`` distinct ranks holding each expert (``-1`` padded)."""
    t = layer_tables(placement, static_map=False)
    L, E = t["single_rank"].shape
    Kd = t["fl_rank"].shape[-1]
    out = np.full((L, E, Kd), -1, dtype=np.int64)
    out[..., 0] = t["single_rank"]
    li, ei = np.nonzero(t["slot_f"] >= 0)
    out[li, ei] = t["fl_rank"][li, t["slot_f"][li, ei]]
    return out


def split_rank_loads(counts: ArrayLike, placement: Placement, strategy: str = "balanced", **solver_options: int) -> Any:
    """``[..., L, R]`` rank loads under ``strategy`` (sums of :func:`split_counts` over each rank's slots; the
    balanced strategy sums the fluid quotas per rank directly, without building per-slot quotas)."""
    if strategy == "balanced":
        is_torch = isinstance(counts, torch.Tensor)
        device = counts.device if isinstance(counts, torch.Tensor) else None
        c = _check_counts(counts, placement)
        if np.any(c != np.round(c)):
            raise ValueError("counts: the balanced split needs whole token counts")
        out = _balanced_ranks(torch.as_tensor(c.astype(np.int64)), placement, **solver_options).numpy().astype(np.float64)
        return torch.as_tensor(out, dtype=torch.float64, device=device) if is_torch else out
    s = split_counts(counts, placement, strategy, **solver_options)
    return s.reshape(tuple(s.shape[:-1]) + (placement.num_ranks, placement.slots_per_rank)).sum(-1)


def per_step_lower_bound(counts: ArrayLike, placement: Placement) -> np.ndarray:
    """``[..., L]`` the smallest possible max rank load (tokens, fractional) of each step and layer for this
    placement with perfect dispatch: the LP relaxation of the balanced split (HiGHS). The whole-token
    optimum is its ceiling."""
    c = _check_counts(counts, placement)
    rr = expert_ranks(placement)
    lead = c.shape[:-2]
    L, E = placement.num_layers, placement.num_experts
    flat = c.reshape(-1, L, E)
    out = np.stack([lp_max_load(flat[i], rr, placement.num_ranks) for i in range(flat.shape[0])])  # steps; layers batched
    return out.reshape(lead + (L,))
