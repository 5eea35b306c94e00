"""Compatibility module: the online balancer's decisions moved to :mod:`eplb.online`.

The names importable from here before the split still are; new code imports :mod:`eplb.online`
(and :class:`eplb.runtime.worker.PolicyWorker`).
"""

from eplb.online import (
    ALIASES,
    DISPATCH_STRATEGIES,
    IGNORED,
    BalancerConfig,
    LayerMigration,
    LoadWindow,
    PlanRequest,
    PlanResult,
    RebalanceTrigger,
    Transfer,
    TriggerDecision,
    compute_plan,
    cosine_similarity,
    drain_placement,
    layer_balancedness,
    plan_excluding,
    plan_migration,
    read_map,
    recover_placement,
    window_balancedness,
)
from eplb.policies.keep import keep_in_place
from eplb.runtime.worker import PolicyWorker

__all__ = [
    "ALIASES", "BalancerConfig", "DISPATCH_STRATEGIES", "IGNORED", "LayerMigration", "LoadWindow", "PlanRequest",
    "PlanResult", "PolicyWorker", "RebalanceTrigger", "Transfer", "TriggerDecision", "compute_plan",
    "cosine_similarity", "drain_placement", "keep_in_place", "layer_balancedness", "plan_excluding",
    "plan_migration", "read_map", "recover_placement", "window_balancedness",
]
