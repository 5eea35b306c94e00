"""eplb.online: the online balancer's decisions, torch-free and without I/O (sans-I/O).

* :mod:`eplb.online.config` -- :class:`BalancerConfig` (eplb's names; every engine's names as aliases);
* :mod:`eplb.online.trigger` -- :class:`LoadWindow`, :class:`RebalanceTrigger` (when, which layers);
* :mod:`eplb.online.planning` -- :func:`compute_plan` (one migration-aware policy run),
  :func:`plan_excluding` / :func:`drain_placement` / :func:`recover_placement`;
* :mod:`eplb.online.migration` -- :func:`plan_migration` (what moves; the one "moves" rule),
  staging and per-step byte caps;
* :mod:`eplb.online.pipeline` -- :class:`Pipeline`, the step state machine both drivers run:
  :class:`eplb.runtime.balancer.OnlineBalancer` (collectives, executor) and
  :func:`eplb.sim.online.replay_online` (cost model).
"""

from eplb.online.config import (
    ALIASES,
    DISPATCH_STRATEGIES,
    IGNORED,
    POLICY_BACKENDS,
    BalancerConfig,
    read_map,
)
from eplb.online.migration import (
    LayerMigration,
    Transfer,
    chunk_size,
    max_staging_need,
    plan_migration,
    staging_need,
)
from eplb.online.pipeline import Batch, Launch, Pipeline
from eplb.online.planning import (
    PlanRequest,
    PlanResult,
    compute_plan,
    drain_placement,
    plan_excluding,
    recover_placement,
)
from eplb.online.trigger import (
    LoadWindow,
    RebalanceTrigger,
    TriggerDecision,
    cosine_similarity,
    layer_balancedness,
    window_balancedness,
)

__all__ = [
    "ALIASES", "Batch", "BalancerConfig", "DISPATCH_STRATEGIES", "IGNORED", "Launch", "LayerMigration", "LoadWindow",
    "POLICY_BACKENDS", "Pipeline", "PlanRequest", "PlanResult", "RebalanceTrigger", "Transfer", "TriggerDecision",
    "chunk_size", "compute_plan", "cosine_similarity", "drain_placement", "layer_balancedness", "max_staging_need",
    "plan_excluding", "plan_migration", "read_map", "recover_placement", "staging_need", "window_balancedness",
]
