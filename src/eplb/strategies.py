"""The one list of replica-choice strategies (torch-free; every module takes its names from here).

* :data:`REPLICA_STRATEGIES` -- how a served layer picks, token by token, which replica of an expert
  computes it (:func:`eplb.dispatch.assign_slots`, :class:`eplb.runtime.ExpertParallelMoE`):
  ``local-first`` (a replica on the token's rank, else round-robin), ``round-robin``, ``balanced``
  (per-step quotas that level the ranks).
* :data:`LAYER_STRATEGIES` -- what an EP layer accepts: the replica strategies plus ``auto`` (per
  layer, ``balanced`` only where its predicted gain beats its dispatch cost, :mod:`eplb.dispatch.auto`).
* :data:`SPLIT_STRATEGIES` -- the same plus ``uniform`` (each expert's count split evenly over its
  replicas, the analytic model of :mod:`eplb.metrics`): what :func:`eplb.dispatch.split_counts`, the
  simulator and the online balancer's balancedness accept.
"""

from __future__ import annotations

from eplb.errors import InputError

__all__ = ["LAYER_STRATEGIES", "REPLICA_STRATEGIES", "SPLIT_STRATEGIES", "check_strategy"]

REPLICA_STRATEGIES: tuple[str, ...] = ("local-first", "round-robin", "balanced")
LAYER_STRATEGIES: tuple[str, ...] = (*REPLICA_STRATEGIES, "auto")
SPLIT_STRATEGIES: tuple[str, ...] = ("uniform", "balanced", "local-first", "round-robin")


def check_strategy(value: object, *, allowed: tuple[str, ...] = SPLIT_STRATEGIES, what: str = "strategy") -> str:
    """``value`` if it is one of ``allowed``, else an :class:`~eplb.errors.InputError` naming ``what``."""
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{what}: unknown replica-choice strategy {value!r}; expected one of {list(allowed)}")
    return value
