"""``"eplb-robust"``: minimise the expected per-step max rank load over a window of steps.

A serving step waits for its slowest rank, so the cost of a static placement on a window of
per-step loads ``[T, L, E]`` is ``mean_t max_r load_t(r)`` (per layer), not the max of the summed
loads. The policy starts from ``eplb``'s plan of the summed loads and runs a local search on that
objective: each iteration, per layer, it takes the rank that is the per-step maximum most often
(weighted by its load there), ranks the swaps of one of its slots with a slot on one of the
``PARTNER_RANKS`` (8) ranks lightest on the window mean (no new colocated duplicate), evaluates the
best 256 of them on every step of the window, and applies the swap that lowers the mean
per-step maximum the most. Replica counts come from the summed loads.

Options: those of ``eplb`` except ``current``; ``max_steps`` (default 64): windows longer than this
are searched on ``max_steps`` evenly spaced steps (the result is still checked on all of them);
``max_iters`` (default ``2 * S``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb._counts import evenly_spaced
from eplb.errors import InputError
from eplb.policies import register_policy
from eplb.policies.eplb_policy import _check_cap, _deepseek_start, _embed, eplb_rows, excluded_layout
from eplb.policies.search import robust_rows, step_max_mean

__all__ = ["robust_rows", "step_max_mean"]

PARTNER_RANKS: int | None = 8
"""Swap partners of the window search: the ranks lightest on the window mean (``None``: every rank)."""


@register_policy("eplb-robust", options=("max_replicas", "excluded_ranks", "max_steps", "max_iters", "current"))
def eplb_robust_policy(loads: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int,
                       max_replicas: Any = None, excluded_ranks: Any = None, max_steps: int = 64,
                       max_iters: int | None = None, **options: Any) -> np.ndarray:
    """Robust eplb on a window ``[T, L, E]`` (module docstring). Returns ``phy2log [L, S]``."""
    if options.get("current") is not None:
        raise InputError("current: policy 'eplb-robust' is not migration-aware; use 'eplb' or 'eplb-incremental'")
    T, L, E = loads.shape
    w = loads.sum(axis=0)
    cap = _check_cap(max_replicas, E, num_slots)
    ex, alive = excluded_layout(excluded_ranks, E, num_slots, num_ranks)
    spr = num_slots // num_ranks
    S, R = (alive.size * spr, alive.size) if ex else (num_slots, num_ranks)
    start = eplb_rows(w, S, R, max_replicas=cap,
                      start=None if (cap or ex) else _deepseek_start(w, S, R, num_nodes, num_groups),
                      max_iters=max_iters)
    if T > 1:
        steps = evenly_spaced(T, max_steps)
        out = robust_rows(loads[steps], start, R, max_iters=max_iters, partner_ranks=PARTNER_RANKS)
        # keep the search result only where it is at least as good on the whole window
        better = step_max_mean(loads, out, R) <= step_max_mean(loads, start, R) * (1 + 1e-12)
        out = np.where(better[:, None], out, start)
    else:
        out = start
    return _embed(out, w, alive, num_slots, num_ranks) if ex else out
