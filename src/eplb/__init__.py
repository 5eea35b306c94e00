"""eplb: the Expert Parallelism Load Balancer for Mixture-of-Experts inference.

Public API (small on purpose):

* :class:`Placement` -- which expert sits in which slot, per layer; validation, forms, diffs.
* :func:`rebalance_experts` -- DeepSeek-compatible ``(phy2log, log2phy, logcnt)``.
* :func:`plan` -- any registered policy (``"deepseek"``, ``"eplb"``, ...) to a :class:`Placement`.
* :class:`Trace` -- per-step expert loads ``[T, L, E]`` with metadata.
* :mod:`eplb.metrics` -- rank loads, imbalance ratio, balancedness, lower bounds.
"""

from eplb.placement import Placement, PlacementError
from eplb.policies import POLICIES, plan, rebalance_experts, register_policy
from eplb.stats.trace import Trace, TraceError

__all__ = [
    "POLICIES",
    "Placement",
    "PlacementError",
    "Trace",
    "TraceError",
    "__version__",
    "plan",
    "rebalance_experts",
    "register_policy",
]
__version__ = "0.1.0"
