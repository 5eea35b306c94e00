"""eplb: the Expert Parallelism Load Balancer for Mixture-of-Experts inference.

Public API (small on purpose):

* :class:`Placement` -- which expert sits in which slot, per layer; validation, forms, diffs.
* :func:`rebalance_experts` -- DeepSeek-compatible ``(phy2log, log2phy, logcnt)``.
* :func:`plan` -- any registered policy (``"deepseek"``, ``"eplb"``, ...) to a :class:`Placement`;
  :func:`plan_multi` -- one placement for several workloads, minimising the worst of them.
* :class:`Trace` -- per-step expert loads ``[T, L, E]`` with metadata.
* :mod:`eplb.metrics` -- rank loads, imbalance ratio, balancedness, lower bounds.
* :func:`read_placement` / :func:`write_placement` -- every engine's map format (validated on read).
* :func:`read_trace` / :func:`write_trace` -- every engine's statistics format.

Larger areas are subpackages: :mod:`eplb.dispatch`, :mod:`eplb.runtime`, :mod:`eplb.sim`,
:mod:`eplb.integrations`. Names from them are imported lazily (``import eplb`` does not import torch).
"""

from eplb.placement import Placement, PlacementError
from eplb.policies import DEFAULT_POLICY, POLICIES, plan, rebalance_experts, register_policy
from eplb.stats.trace import Trace, TraceError

_LAZY = {
    "read_placement": "eplb.formats",
    "write_placement": "eplb.formats",
    "read_trace": "eplb.stats.io",
    "plan_multi": "eplb.policies.multi",
    "write_trace": "eplb.stats.io",
}


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'eplb' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Placement",
    "PlacementError",
    "Trace",
    "TraceError",
    "__version__",
    "plan",
    "plan_multi",
    "read_placement",
    "read_trace",
    "rebalance_experts",
    "register_policy",
    "write_placement",
    "write_trace",
]
__version__ = "0.1.0"
