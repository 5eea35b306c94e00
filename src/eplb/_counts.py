"""The sizes of a ``[steps, layers, experts]`` count array, shared by everything that holds one
(:class:`eplb.stats.trace.Trace`, the simulator's :class:`eplb.sim.engine.SimInput`, the runtime's
:class:`eplb.runtime.trace_router.TraceRouter`)."""

from __future__ import annotations

from typing import Any

__all__ = ["StepCounts"]


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
