"""Dispatch: which replica (physical slot) each token's expert choice goes to.

* :class:`DispatchTable` -- one layer's device tables, from a :class:`~eplb.Placement`.
* :func:`assign_slots` -- token -> slot on one rank: ``"local-first"``, ``"round-robin"``, ``"balanced"``.
* :func:`plan_quotas` / :func:`source_shares` -- the balanced global plan every rank computes identically.
* :func:`send_matrix` -- every rank's per-slot rows of a step from the gathered ``[R, E]`` counts alone.
* :func:`split_counts` -- slot loads ``[..., L, S]`` of counts ``[..., L, E]`` under a strategy (evaluate/simulate).
* :func:`per_step_lower_bound` -- LP bound of a fixed placement with perfect dispatch.
* :func:`plan_replication` / :func:`replicated_rank_loads` -- per-step replication into dynamic slots
  (:mod:`eplb.dispatch.replication`; its GPU kernel in :mod:`eplb.dispatch.replication_kernel`).
* policy ``"eplb-dispatch"`` -- a placement designed for balanced dispatch (registered on import).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eplb.dispatch.assign import (
        STRATEGIES,
        assign_slots,
        occurrence,
        plan_quotas,
        send_matrix,
        source_shares,
    )
    from eplb.dispatch.policy import dispatch_aware_placement
    from eplb.dispatch.replication import plan_replication, replicated_rank_loads
    from eplb.dispatch.solver import balanced_quotas, lp_max_load, waterfill
    from eplb.dispatch.split import SPLIT_STRATEGIES, per_step_lower_bound, split_counts, split_rank_loads
    from eplb.dispatch.table import DispatchTable, layer_tables

#: Where each name lives; each is imported on first use (PEP 562), so ``from eplb.dispatch.split import ...``
#: (the simulator's balanced split) does not pull in the Triton kernels of :mod:`eplb.dispatch.kernel` (~80 MB)
#: or the placement search of :mod:`eplb.dispatch.policy` (scipy, ~0.7 s).
_WHERE = {
    **dict.fromkeys(("STRATEGIES", "assign_slots", "occurrence", "plan_quotas", "send_matrix", "source_shares"),
                    "assign"),
    "dispatch_aware_placement": "policy",
    **dict.fromkeys(("plan_replication", "replicated_rank_loads"), "replication"),
    **dict.fromkeys(("balanced_quotas", "lp_max_load", "waterfill"), "solver"),
    **dict.fromkeys(("SPLIT_STRATEGIES", "per_step_lower_bound", "split_counts", "split_rank_loads"), "split"),
    **dict.fromkeys(("DispatchTable", "layer_tables"), "table"),
}


def __getattr__(name: str) -> object:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "SPLIT_STRATEGIES",
    "STRATEGIES",
    "DispatchTable",
    "assign_slots",
    "balanced_quotas",
    "dispatch_aware_placement",
    "layer_tables",
    "lp_max_load",
    "occurrence",
    "per_step_lower_bound",
    "plan_quotas",
    "plan_replication",
    "replicated_rank_loads",
    "send_matrix",
    "source_shares",
    "split_counts",
    "split_rank_loads",
    "waterfill",
]
