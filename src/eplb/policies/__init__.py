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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_layout, check_load, check_positive_int
from eplb.placement import Placement
from eplb.policies.deepseek import rebalance_experts, rebalance_experts_hierarchical, to_float32

__all__ = ["DEFAULT_POLICY", "POLICIES", "POLICY_OPTIONS", "PolicyFn", "check_options", "load_policy_plugins", "plan",
           "rebalance_experts", "register_policy"]

PolicyFn = Callable[..., np.ndarray]
POLICIES: dict[str, PolicyFn] = {}
#: The options (``plan(..., **options)`` / ``-O KEY=VALUE``) each policy takes, where it declared them.
POLICY_OPTIONS: dict[str, tuple[str, ...]] = {}

DEFAULT_POLICY = "eplb"
"""The policy every entry point uses when none is named (``plan``, ``evaluate``, ``simulate``, ``capacity``, the
runtime manager and the engine plug-ins): :func:`eplb.policies.eplb_policy.eplb_policy`, which plans ``[T, L, E]``
windows on the per-step objective with a per-layer DeepSeek fallback."""


def register_policy(name: str, options: Sequence[str] | None = None) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator registering a policy function under ``name`` (see the module docstring).

    ``options``: the option names it takes; :func:`plan` then refuses any other option with an error
    listing these (``None``: not declared, options are passed through unchecked).
    """

    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        if options is not None:
            POLICY_OPTIONS[name] = tuple(options)
        else:
            POLICY_OPTIONS.pop(name, None)
        return fn

    return deco


def check_options(policy: str, options: Mapping[str, Any]) -> None:
    """Refuse options ``policy`` does not take; the error names the option and lists the valid ones.

    ``current`` (the placement in service, handed by the online manager and the engine
    integrations) is a hint every policy may ignore, so it is always accepted.
    """
    valid = POLICY_OPTIONS.get(policy)
    if valid is None:
        return
    for key in options:
        if key not in valid and key != "current":
            listed = ", ".join(valid) if valid else "none"
            raise ValueError(f"{key}: policy {policy!r} has no option {key!r}; its options: {listed}")


@register_policy("deepseek", options=())
def _deepseek(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
              **options: Any) -> np.ndarray:
    """DeepSeek's ``rebalance_experts``: hierarchical when ``num_groups % num_nodes == 0``, else global."""
    phy2log, _, _ = rebalance_experts(to_float32(loads.sum(0)), num_slots, num_groups, num_nodes, num_ranks)
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
        raise ValueError(f"num_groups: hierarchical policy needs num_groups ({num_groups}) divisible by num_nodes ({num_nodes})")
    phy2log, _, _ = rebalance_experts_hierarchical(to_float32(loads.sum(0)), num_slots, num_groups, num_nodes, num_ranks)
    return phy2log


# Modules *above* policies that register policies of their own (e.g. "eplb-dispatch", which plans for
# balanced dispatch). They are imported on demand, so ``import eplb`` stays light (no torch import).
_PLUGIN_MODULES = ("eplb.dispatch",)


def load_policy_plugins() -> dict[str, PolicyFn]:
    """Import the modules that register further policies; returns the full registry."""
    import importlib

    for mod in _PLUGIN_MODULES:
        importlib.import_module(mod)
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
        policy: a name in :data:`POLICIES`.
        layer_ids: model layer index of each MoE layer.
        options: policy-specific options (e.g. ``current=`` for incremental policies).

    Returns:
        A validated :class:`Placement` whose ``meta`` records the policy and parameters.
    """
    if policy not in POLICIES:
        load_policy_plugins()
    if policy not in POLICIES:
        raise ValueError(f"policy: unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    arr = check_load(loads, "loads", ndim=(2, 3))
    if arr.ndim == 2:
        arr = arr[None]
    E = arr.shape[2]
    check_positive_int(num_groups, "num_groups")
    check_layout(E, num_slots, num_ranks, num_nodes)
    if E % num_groups:
        raise ValueError(f"num_groups: {E} experts cannot be split into {num_groups} equal groups")
    check_options(policy, options)
    tot = arr.sum(axis=(0, 2), keepdims=True)  # [1, L, 1]
    if float(tot.max()) > _SAFE_TOTAL:  # only ratios matter to a policy: keep its arithmetic finite
        arr = np.where(tot > _SAFE_TOTAL, arr * (_SAFE_TOTAL / np.maximum(tot, 1.0)), arr)
    phy2log = POLICIES[policy](arr, num_slots=int(num_slots), num_ranks=int(num_ranks), num_nodes=int(num_nodes),
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


# eplb's own policies register themselves on import (they import ``register_policy`` from here).
from eplb.policies import eplb_policy as _eplb_policy  # noqa: E402,F401
from eplb.policies import robust as _robust  # noqa: E402,F401
