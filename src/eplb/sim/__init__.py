"""Trace-driven simulator and capacity planner.

* :func:`simulate` -- replay a trace ``[T, L, E]`` under several policies (static and online), side by side;
* :func:`replay_static` / :func:`replay_online` -- one run under a fixed placement / the online balancer;
* :func:`capacity` -- the fewest redundant slots meeting an imbalance target on held-out steps;
* :class:`CostModel` -- step time from per-rank token counts (JSON; :func:`default_cost_model`).

The online decisions come from :mod:`eplb.runtime.manager` (imported, not copied).
"""

from eplb.sim.capacity import CapacityResult, capacity
from eplb.sim.cost import CostModel, CostModelError, default_cost_model, load_cost_model, reference_cost_model
from eplb.sim.engine import STRATEGIES, SimInput, SimResult, as_sim_input, replay_static, strategy_rank_loads
from eplb.sim.online import parse_online_spec, replay_online
from eplb.sim.report import SimReport
from eplb.sim.simulate import simulate

__all__ = [
    "STRATEGIES",
    "CapacityResult",
    "CostModel",
    "CostModelError",
    "SimInput",
    "SimReport",
    "SimResult",
    "as_sim_input",
    "capacity",
    "default_cost_model",
    "load_cost_model",
    "parse_online_spec",
    "reference_cost_model",
    "replay_online",
    "replay_static",
    "simulate",
    "strategy_rank_loads",
]
