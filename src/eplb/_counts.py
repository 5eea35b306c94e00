"""The sizes of a ``[steps, layers, experts]`` count array, shared by everything that holds one
(:class:`eplb.stats.trace.Trace`, the simulator's :class:`eplb.sim.engine.SimInput`, the runtime's
:class:`eplb.runtime.trace_router.TraceRouter`), and the one rule for sampling its steps."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["StepCounts", "evenly_spaced"]


def evenly_spaced(total: int, at_most: int) -> np.ndarray:
    """``[n]`` int64 positions of at most ``at_most`` (>= 1) evenly spaced items of ``0 .. total - 1``, first and
    last included, ascending and distinct."""
    return np.unique(np.linspace(0, total - 1, min(int(total), max(int(at_most), 1))).round().astype(np.int64))


class StepCounts:
    """Mixin: ``num_steps`` / ``num_layers`` / ``num_experts`` of ``self.counts`` ``[T, L, E]``."""

    __slots__ = ()
    counts: Any

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])
