"""eplb.runtime: serve a placement -- an expert-parallel MoE layer with redundant slots on torch.distributed.

* :class:`ExpertParallelMoE` (``eplb.runtime.layer``): one MoE layer's experts spread over an EP
  group, with replica dispatch strategies, device-side load counters and ``commit`` for online moves;
* :func:`patch_model` (``eplb.runtime.models``): transformers MoE models served with EP; :func:`build_model`,
  :func:`load_config` and :data:`TINY_CONFIGS` are the one model builder of ``eplb.stats.hf``;
* :func:`load_placement` (``eplb.runtime.loading``): Placement / map file / TensorRT-LLM YAML;
* :class:`TraceRouter` (``eplb.runtime.trace_router``): expert ids replayed from a recorded trace;
* :func:`run_distributed` (``eplb.runtime.testing``): N local gloo processes with a timeout;
* :class:`OnlineBalancer` (``eplb.runtime.balancer``): the online Manager / Policy / Executor, configured by
  :class:`BalancerConfig` and deciding with :class:`RebalanceTrigger` (``eplb.online``, torch-free).

Names are imported lazily so that torch-free submodules (e.g. ``eplb.online``) stay
importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExpertParallelMoE": "eplb.runtime.layer",
    "reference_moe": "eplb.runtime.layer",
    "local_slice": "eplb.runtime.layer",
    "STRATEGIES": "eplb.runtime.layer",
    "patch_model": "eplb.runtime.models",
    "build_model": "eplb.stats.hf",
    "find_experts": "eplb.runtime.models",
    "load_config": "eplb.stats.hf",
    "TINY_CONFIGS": "eplb.stats.hf",
    "load_placement": "eplb.runtime.loading",
    "TraceRouter": "eplb.runtime.trace_router",
    "AgreementError": "eplb.runtime.distributed",
    "init_from_env": "eplb.runtime.distributed",
    "run_distributed": "eplb.runtime.testing",
    "BalancerConfig": "eplb.online",
    "RebalanceTrigger": "eplb.online",
    "OnlineBalancer": "eplb.runtime.balancer",
    "resume_placement": "eplb.runtime.balancer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'eplb.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
