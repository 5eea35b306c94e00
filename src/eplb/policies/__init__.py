"""Placement policies: pure functions from expert loads to a :class:`~eplb.Placement`.

Every policy is registered under a name and called through :func:`plan`::

    placement = eplb.plan(loads, num_slots=288, num_ranks=36, policy="eplb")

``loads`` is ``[L, E]`` (summed loads) or ``[T, L, E]`` (per-step windows; policies that only
use the sum see ``loads.sum(0)``). A policy function has the signature::

    fn(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
       **options) -> np.ndarray  # phy2log [L, S] int64

where ``loads`` is a validated float64 ``[T, L, E]`` array (``T == 1`` for summed input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_layout, check_load
from eplb.errors import InputError
from eplb.placement import Placement
from eplb.policies.deepseek import rebalance_experts, rebalance_experts_hierarchical, to_float32
from eplb.policies.registry import (
    DEFAULT_POLICY,
    POLICIES,
    POLICY_OPTIONS,
    PolicyFn,
    PolicyInfo,
    check_options,
    check_serves,
    policy_info,
    register_policy,
)

__all__ = ["DEFAULT_POLICY", "POLICIES", "POLICY_OPTIONS", "PolicyFn", "PolicyInfo", "check_options", "check_serves",
           "load_policy_plugins", "plan", "policy_info", "rebalance_experts", "register_policy"]



@register_policy("deepseek", options=())
def _deepseek(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
              **options: Any) -> np.ndarray:
    """DeepSeek's ``rebalance_experts``: hierarchical when ``num_groups % num_nodes == 0``, else global.
    (Inputs are validated by :func:`plan`; the inner function is called, not the checking entry point.)"""
    g, n = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)
    phy2log, _, _ = rebalance_experts_hierarchical(to_float32(loads.sum(0)), num_slots, g, n, num_ranks)
    return np.asarray(phy2log)


@register_policy("deepseek-global", options=())
def _deepseek_global(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                     **options: Any) -> np.ndarray:
    """DeepSeek's global policy (one group, one node) regardless of topology."""
    phy2log, _, _ = rebalance_experts_hierarchical(to_float32(loads.sum(0)), num_slots, 1, 1, num_ranks)
    return phy2log


@register_policy("deepseek-hierarchical", options=())
def _deepseek_hier(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                   **options: Any) -> np.ndarray:
    """DeepSeek's hierarchical policy; requires ``num_groups % num_nodes == 0``."""
    if num_groups % num_nodes:
        raise InputError(f"num_groups: hierarchical policy needs num_groups ({num_groups}) divisible by num_nodes ({num_nodes})")
    phy2log, _, _ = rebalance_experts_hierarchical(to_float32(loads.sum(0)), num_slots, num_groups, num_nodes, num_ranks)
    return phy2log


def load_policy_plugins() -> Mapping[str, PolicyFn]:
    """Every registered policy (compatibility: the registry is lazy, nothing needs loading first)."""
    return POLICIES


#: Largest per-layer total load handed to a policy as is; larger layers are scaled down (ratios kept), so
#: squares and sums stay finite in float64 and DeepSeek's float32 arithmetic does not overflow.
_SAFE_TOTAL = 1e30


def plan(
    loads: ArrayLike,
    num_slots: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str = DEFAULT_POLICY,
    layer_ids: Sequence[int] = (),
    meta: Mapping[str, Any] | None = None,
    **options: Any,
) -> Placement:
    """Compute a placement for every layer.

    Args:
        loads: ``[L, E]`` expert loads (tokens) or ``[T, L, E]`` per-step loads.
        num_slots: ``S`` physical slots per layer (``>= E``, multiple of ``num_ranks``).
        num_ranks: ``R`` EP ranks.
        num_nodes: nodes (divides ``num_ranks``).
        num_groups: expert groups (divides ``E``; used by hierarchical policies).
        policy: a name in :data:`POLICIES`; it must be able to serve the call (:func:`check_serves`:
            ``current=`` only for migration-aware policies, required by ``eplb-incremental``).
        layer_ids: model layer index of each MoE layer.
        options: policy-specific options (e.g. ``current=`` for incremental policies).

    Returns:
        A validated :class:`Placement` whose ``meta`` records the policy and parameters.
    """
    pinfo = check_serves(policy, current=options.get("current") is not None,
                         excluded=bool(options.get("excluded_ranks")))
    arr = check_load(loads, "loads", ndim=(2, 3))
    if arr.ndim == 2:
        arr = arr[None]
    E = arr.shape[2]
    check_layout(E, num_slots, num_ranks, num_nodes, num_groups=num_groups)
    check_options(policy, options)
    assert pinfo.fn is not None
    tot = arr.sum(axis=(0, 2), keepdims=True)  # [1, L, 1]
    if float(tot.max()) > _SAFE_TOTAL:  # only ratios matter to a policy: keep its arithmetic finite
        arr = np.where(tot > _SAFE_TOTAL, arr * (_SAFE_TOTAL / np.maximum(tot, 1.0)), arr)
    phy2log = pinfo.fn(arr, num_slots=int(num_slots), num_ranks=int(num_ranks), num_nodes=int(num_nodes),
                       num_groups=int(num_groups), **options)
    info: dict[str, Any] = {"policy": policy, "num_groups": int(num_groups)}
    for k, v in options.items():
        if isinstance(v, (int, float, str, bool)):
            info[k] = v
        elif k == "excluded_ranks" and v is not None:
            info[k] = sorted({int(r) for r in v})
        elif k == "current" and isinstance(v, Placement):
            info["current_digest"] = v.digest()
    info.update(meta or {})
    return Placement(phy2log, E, int(num_ranks), int(num_nodes), tuple(layer_ids), info)
