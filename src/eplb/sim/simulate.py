"""``simulate``: plan placements with several policies and replay a trace under each, side by side.

For every policy a static run (the policy's placement, planned on the plan window, fixed for the
whole replay) and, with an online configuration, an online run (starting from the same placement,
rebalanced by the runtime Manager's logic with the same policy) are simulated on the simulation
window; user placements can be added by label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_layout, check_positive_int
from eplb.errors import InputError
from eplb.placement import Placement
from eplb.policies import DEFAULT_POLICY
from eplb.sim.capacity import known_policies, plan_placement
from eplb.sim.cost import CostModel, default_cost_model
from eplb.sim.engine import SimInput, SimResult, as_sim_input, check_fits, replay_static
from eplb.sim.online import parse_online_spec, replay_online
from eplb.sim.report import SimReport
from eplb.stats.trace import Trace, parse_range
from eplb.strategies import check_strategy

__all__ = ["select_steps", "simulate"]


def select_steps(data: SimInput, spec: str | Sequence[int] | None, name: str) -> SimInput:
    """Steps whose id lies in the ``"start-stop"`` range (``None``: all)."""
    rng = parse_range(spec, name)
    if rng is None:
        return data
    keep = np.flatnonzero((data.step_ids >= rng[0]) & (data.step_ids < rng[1]))
    if keep.size == 0:
        raise InputError(f"{name}: no steps in {rng[0]}-{rng[1]} (trace has steps "
                         f"{int(data.step_ids.min())}..{int(data.step_ids.max())})")
    return data.slice_steps(int(keep[0]), int(keep[-1]) + 1)


def simulate(
    trace: Trace | ArrayLike | SimInput,
    *,
    ep_size: int,
    num_slots: int | None = None,
    num_nodes: int = 1,
    num_groups: int = 1,
    policies: Sequence[str] = (DEFAULT_POLICY,),
    placements: Mapping[str, Placement] | None = None,
    strategy: str = "uniform",
    online: Any = None,
    cost: CostModel | None = None,
    plan_range: str | Sequence[int] | None = None,
    sim_range: str | Sequence[int] | None = None,
    policy_options: Mapping[str, Mapping[str, Any]] | None = None,
    static: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    replication: Mapping[str, Any] | None = None,
) -> SimReport:
    """Simulate ``trace`` under each policy (and each given placement).

    Args:
        trace: ``[T, L, E]`` counts (array, :class:`Trace` or :class:`SimInput`).
        ep_size: ``R`` ranks.
        num_slots: ``S`` slots per layer (default ``E``, rounded up to a multiple of ``R``).
        num_nodes: nodes (divides ``R``; inter-node all-to-all bytes use the inter-node bandwidth).
        num_groups: expert groups (hierarchical policies).
        policies: policy names; ``"none"`` is the contiguous layout (no balancing).
        placements: extra ``{label: Placement}`` runs (static).
        strategy: replica-choice strategy (:data:`eplb.sim.engine.STRATEGIES`).
        online: ``None`` (static only), a ``BalancerConfig``, a dict or a ``"key=value,..."`` spec
            (:func:`eplb.sim.online.parse_online_spec`); adds one online run per policy, rebalancing
            with that policy (``"none"``: with the config's policy) and starting from the config's
            initial placement (``initial_global_assignments``, ``expert_map_path``, ...) if it has
            one, else from the policy's static placement.
        cost: cost model (default :func:`eplb.sim.cost.default_cost_model`).
        plan_range: ``"start-stop"`` step ids to plan static placements on (default: all steps).
        sim_range: ``"start-stop"`` step ids to replay (default: all steps).
        static: include the static runs (False: online runs only).
        replication: per-step replication runs on each static placement (:func:`eplb.sim.replication.replay_replicated`):
            ``{"dynamic_slots": [D, ...], "transfer_budget_ms": ms or None, "hide_ms": ms or None, "lookahead": bool}``;
            one run ``"<label>+D<D>"`` per ``D``.
        progress: called with ``(label, steps done, steps total)``.

    Returns:
        A :class:`SimReport`.
    """
    data = as_sim_input(trace)
    R = check_positive_int(ep_size, "ep-size")
    N = check_positive_int(num_nodes, "num-nodes")
    E, L = data.num_experts, data.num_layers
    S = int(num_slots) if num_slots is not None else -(-E // R) * R
    check_positive_int(S, "num-slots")
    check_layout(E, S, R, N, names=("num-slots", "ep-size", "num-nodes"))
    check_strategy(strategy)
    POLICIES = known_policies()
    for p in policies:
        if p != "none" and p not in POLICIES:
            raise InputError(f"policy: unknown policy {p!r}; expected 'none' or one of {sorted(POLICIES)}")
    if not policies and not placements:
        raise InputError("policy: give at least one policy or placement")
    cm = cost or default_cost_model()
    plan_data = select_steps(data, plan_range, "plan-range")
    sim_data = select_steps(data, sim_range, "sim-range")
    train = plan_data.counts  # plan_placement sums it for policies that plan on summed loads

    config = None
    if online is not None:
        from eplb.online import BalancerConfig

        if isinstance(online, BalancerConfig):
            config = online
        else:
            config = parse_online_spec(online, num_slots=S)
        if config.num_slots is not None and config.num_slots != S:
            raise InputError(f"online: num_slots={config.num_slots} disagrees with --num-slots {S}")

    def prog(label: str) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda done: progress(label, done, sim_data.num_steps)

    start: Placement | None = None
    if config is not None:
        start = config.initial_placement(E, R, num_layers=L, layer_ids=data.layer_ids, num_nodes=N)
        if start is not None and start.num_slots != S:
            raise InputError(f"online: the configured initial placement has {start.num_slots} slots, --num-slots is {S}")

    results: list[SimResult] = []
    run_meta = {"plan_steps": [int(plan_data.step_ids[0]), int(plan_data.step_ids[-1])]}
    for p in policies:
        opts = dict((policy_options or {}).get(p, {}))
        pl = plan_placement(p, train, num_slots=S, num_ranks=R, num_nodes=N, num_groups=num_groups,
                            layer_ids=data.layer_ids, **opts)
        if static:
            results.append(replay_static(sim_data, pl, cost=cm, strategy=strategy, label=p, progress=prog(p),
                                         meta=run_meta))
        results += _replicated_runs(sim_data, pl, p, replication, cm, prog, run_meta)
        if config is not None:
            pol = p if p != "none" else config.policy
            if p == "none" and pl.num_slots != S:  # the online balancer starts unbalanced but with the slots to use
                pl = Placement.contiguous(L, E, R, S, N, layer_ids=data.layer_ids).with_meta(policy="none")
            cfg = config.replace(policy=pol, policy_options={**dict(config.policy_options), **opts},
                                 policy_backend="inline")
            label = f"{p}+online" if start is None else f"online:{pol}"
            results.append(replay_online(sim_data, start if start is not None else pl, cfg, cost=cm, strategy=strategy,
                                         label=label,
                                         progress=prog(label), meta=run_meta))
    for label, pl in (placements or {}).items():
        check_fits(pl, data, f"placement {label!r}")
        if pl.num_ranks != R or pl.num_nodes != N:
            raise InputError(f"placement {label!r}: laid out for {pl.num_ranks} ranks / {pl.num_nodes} nodes, "
                             f"but --ep-size {R} / --num-nodes {N}")
        results.append(replay_static(sim_data, pl, cost=cm, strategy=strategy, label=label, progress=prog(label)))
        results += _replicated_runs(sim_data, pl, label, replication, cm, prog, {})
    meta = {
        "trace": data.name, "synthetic": data.synthetic, "num_layers": L, "num_experts": E, "num_ranks": R,
        "num_slots": S, "num_nodes": N, "num_groups": num_groups, "strategy": strategy,
        "steps": sim_data.num_steps, "sim_steps": [int(sim_data.step_ids[0]), int(sim_data.step_ids[-1])],
        "plan_steps": run_meta["plan_steps"],
        "in_sample": bool(plan_range is None or (sim_data.step_ids[0] <= plan_data.step_ids[-1]
                                                 and plan_data.step_ids[0] <= sim_data.step_ids[-1])),
        "cost_model": {"device": cm.device, "date": cm.date, "source": cm.source},
        "online": config.to_dict() if config is not None else None,
        "replication": dict(replication) if replication else None,
    }
    return SimReport(results, meta)


def _replicated_runs(data: SimInput, pl: Placement, label: str, replication: Mapping[str, Any] | None, cm: CostModel,
                     prog: Callable[[str], Callable[[int], None] | None], meta: Mapping[str, Any]) -> list[SimResult]:
    """The per-step replication runs of ``replication`` (see :func:`simulate`) on one static placement."""
    if not replication:
        return []
    from eplb.sim.replication import replay_replicated

    unknown = set(replication) - {"dynamic_slots", "transfer_budget_ms", "hide_ms", "lookahead"}
    if unknown:
        raise ValueError(f"replication: unknown option(s) {sorted(unknown)}")
    out = []
    for d in replication.get("dynamic_slots", ()):
        lab = f"{label}+D{int(d)}"
        out.append(replay_replicated(data, pl, dynamic_slots=int(d), transfer_budget_ms=replication.get("transfer_budget_ms"),
                                     hide_ms=replication.get("hide_ms"), lookahead=bool(replication.get("lookahead")),
                                     cost=cm, label=lab, progress=prog(lab), meta=meta))
    return out
