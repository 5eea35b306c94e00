"""When to rebalance: the load window and the per-layer rebalance trigger (pure numpy, deterministic).

Every rank feeds the same all-reduced loads, so every rank decides the same; the simulator feeds
the trace's loads to the same object.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from eplb._checks import ArrayLike, check_load
from eplb.errors import InputError
from eplb.metrics import balancedness, rank_loads
from eplb.online.config import DISPATCH_STRATEGIES, BalancerConfig
from eplb.placement import Placement

__all__ = ["LoadWindow", "RebalanceTrigger", "TriggerDecision", "cosine_similarity", "layer_balancedness",
           "window_balancedness"]


class LoadWindow:
    """Ring buffer of the last ``size`` per-step loads ``[L, E]`` (int64 tokens) with a running sum.

    Memory: ``size * L * E * 8`` bytes (1000 x 58 x 256 -> 119 MB).
    """

    def __init__(self, size: int, num_layers: int, num_experts: int) -> None:
        if size < 1:
            raise InputError(f"window_size: expected a positive integer, got {size}")
        self.size = int(size)
        self._buf = np.zeros((self.size, num_layers, num_experts), dtype=np.int64)
        self._sum = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._n = 0  # total steps pushed
        self.last_step = -1

    def __len__(self) -> int:
        return min(self._n, self.size)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._buf.shape[1]), int(self._buf.shape[2]))

    def push(self, loads: np.ndarray, step: int = -1) -> None:
        """Append one step's ``[L, E]`` loads (rounded to int64 tokens)."""
        i = self._n % self.size
        new = np.rint(loads).astype(np.int64) if loads.dtype.kind == "f" else loads.astype(np.int64, copy=False)
        if self._n >= self.size:
            self._sum -= self._buf[i]
        self._buf[i] = new
        self._sum += new
        self._n += 1
        self.last_step = int(step)

    def sum(self) -> np.ndarray:
        """``[L, E]`` int64 total load over the window."""
        return self._sum.copy()

    def array(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """``[T, L', E]`` loads of the window in step order (oldest first), optionally some layer positions."""
        n = len(self)
        if self._n <= self.size:
            out = self._buf[:n]
        else:
            i = self._n % self.size
            out = np.concatenate([self._buf[i:], self._buf[:i]])
        if layers is not None:
            out = out[:, list(layers)]
        return out.copy()

    def clear(self) -> None:
        self._buf[:] = 0
        self._sum[:] = 0
        self._n = 0


# ============================================================================ trigger
def cosine_similarity(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Row-wise cosine similarity of ``[L, E]`` arrays -> ``[L]``.

    Rows where ``a`` is all zero give 1 (no evidence of change); rows where only ``b`` is zero
    (nothing planned for yet) give 0.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    nx = np.linalg.norm(x, axis=-1)
    ny = np.linalg.norm(y, axis=-1)
    dot = (x * y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where((nx > 0) & (ny > 0), dot / np.where((nx > 0) & (ny > 0), nx * ny, 1.0), 0.0)
    sim = np.where(nx == 0, 1.0, sim)
    return np.clip(sim, 0.0, 1.0)


def layer_balancedness(loads: ArrayLike, placement: Placement, strategy: str | None = "uniform") -> np.ndarray:
    """``[..., L]`` balancedness (mean/max rank load) of ``[..., L, E]`` loads under ``placement``.

    ``strategy`` (see :data:`DISPATCH_STRATEGIES`): ``"uniform"``/``"round-robin"`` split each expert's
    load evenly over its replicas (numpy); ``"local-first"`` and ``"balanced"`` use
    :func:`eplb.dispatch.split_rank_loads` (the runtime's dispatch code; imports torch).
    """
    x = np.asarray(loads, dtype=np.float64)
    if strategy in (None, "uniform", "round-robin"):
        return balancedness(rank_loads(x, placement))
    if strategy not in DISPATCH_STRATEGIES:
        raise InputError(f"strategy: expected one of {list(DISPATCH_STRATEGIES)}, got {strategy!r}")
    from eplb.dispatch import split_rank_loads

    if strategy == "balanced":
        x = np.rint(x)
    return balancedness(np.asarray(split_rank_loads(x, placement, strategy), dtype=np.float64))


def window_balancedness(window: ArrayLike, placement: Placement, strategy: str | None = "uniform") -> np.ndarray:
    """``[L]`` mean over the window's steps of the per-step balancedness of ``window [T, L, E]``
    (what serving steps see: each step waits for its busiest rank)."""
    w = np.asarray(window, dtype=np.float64)
    if w.ndim == 2:
        w = w[None]
    return layer_balancedness(w, placement, strategy).mean(0)


@dataclass(frozen=True)
class TriggerDecision:
    """What :meth:`RebalanceTrigger.observe` decided at one step (for logs, metrics and the simulator).

    ``similarity`` and ``balancedness`` are ``[L]`` (NaN where not computed).
    """

    step: int
    due: bool
    reason: str
    layers: tuple[int, ...]
    similarity: np.ndarray
    balancedness: np.ndarray


class RebalanceTrigger:
    """Decides, step by step, which layers to rebalance (pure numpy, deterministic).

    Feed it every step's ``[L, E]`` loads (all-reduced over ranks, so every rank decides the same)::

        trig = RebalanceTrigger(config, num_layers=L)
        layers = trig.observe(step, loads, now_s, planned_loads)   # [] on most steps

    * Steps ``< warmup_steps`` are warm-up: ignored.
    * A *check* is due when ``check_every_steps`` recorded steps passed since the last check
      (first at step ``wait + n - 1``), or when ``check_every_seconds`` seconds of ``now_s`` passed since
      the last check (or since the first recorded step).
    * At a check, layer ``l`` is returned when ``cos(window_sum[l], planned_loads[l]) <
      similarity_threshold`` or (with a floor) its balancedness under ``placement`` on the window is
      below ``balancedness_floor``. Layers in ``busy`` (being planned or migrated) are left out.

    ``planned_loads`` ``[L, E]``: the load each layer's current placement was planned for; if omitted,
    the trigger's own record (:meth:`mark_planned`) is used; unknown (zero) rows count as similarity 0.
    """

    def __init__(self, config: BalancerConfig, num_layers: int, num_experts: int | None = None) -> None:
        if not isinstance(config, BalancerConfig):
            raise InputError(f"config: expected a BalancerConfig, got {type(config).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
            raise InputError(f"num_layers: expected a positive integer, got {num_layers!r}")
        self.config = config
        self.num_layers = int(num_layers)
        self.num_experts = num_experts
        self.window: LoadWindow | None = None
        self.planned_loads: np.ndarray | None = None
        self._last_step: int | None = None
        self._last_check_step: int | None = None  # step of the last check (or start - 1)
        self._last_check_time: float | None = None
        self.checks = 0
        self.last: TriggerDecision | None = None
        self.history: list[TriggerDecision] = []  # decisions at due checks only

    # ---------------------------------------------------------------- helpers
    def _ensure(self, E: int) -> None:
        if self.window is None:
            if self.num_experts is not None and E != self.num_experts:
                raise InputError(f"loads: expected {self.num_experts} experts, got {E}")
            self.num_experts = E
            self.window = LoadWindow(self.config.window_size, self.num_layers, E)

    def mark_planned(self, layers: Iterable[int], loads: ArrayLike | None = None) -> None:
        """Record that ``layers`` were (re)planned for ``loads`` ``[len(layers), E]`` (default: the
        current window sum of those layers)."""
        if self.window is None:
            raise InputError("mark_planned: no loads observed yet")
        pos = [int(p) for p in layers]
        if self.planned_loads is None:
            self.planned_loads = np.zeros(self.window.shape, dtype=np.float64)
        src = self.window.sum()[pos] if loads is None else np.asarray(loads, dtype=np.float64).reshape(len(pos), -1)
        self.planned_loads[pos] = src

    def due(self, step: int, now_s: float | None) -> str:
        """The reason a check is due at ``step`` ("" if none): "iterations", "interval" or both."""
        c = self.config
        if not c.online or step < c.warmup_steps:
            return ""
        reasons = []
        if c.check_every_steps is not None:
            last = self._last_check_step if self._last_check_step is not None else c.warmup_steps - 1
            if step - last >= c.check_every_steps:
                reasons.append("iterations")
        if c.check_every_seconds is not None:
            if now_s is None:
                raise InputError("now_s: check_every_seconds is set, so observe() needs the time in seconds")
            if self._last_check_time is not None and now_s - self._last_check_time >= c.check_every_seconds:
                reasons.append("interval")
        return "+".join(reasons)

    # --------------------------------------------------------------- observe
    def observe(self, step: int, loads: ArrayLike, now_s: float | None = None,
                planned_loads: ArrayLike | None = None, *, placement: Placement | None = None,
                busy: Iterable[int] = ()) -> list[int]:
        """Record one step's loads ``[L, E]`` and return the layer positions to rebalance now (sorted)."""
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise InputError(f"step: steps must increase (got {step} after {self._last_step})")
        x = check_load(loads, "loads", ndim=2)
        if x.shape[0] != self.num_layers:
            raise InputError(f"loads: expected {self.num_layers} layers, got {x.shape[0]}")
        self._ensure(x.shape[1])
        assert self.window is not None
        self._last_step = step
        c = self.config
        L = self.num_layers
        nan = np.full(L, np.nan)
        if step < c.warmup_steps:
            self.last = TriggerDecision(step, False, "warm-up", (), nan, nan)
            return []
        self.window.push(x, step)
        if self._last_check_time is None and now_s is not None:
            self._last_check_time = float(now_s)
        reason = self.due(step, now_s)
        if not reason:
            self.last = TriggerDecision(step, False, "", (), nan, nan)
            return []
        self.checks += 1
        self._last_check_step = step
        if now_s is not None:
            self._last_check_time = float(now_s)
        wsum = self.window.sum().astype(np.float64)
        if planned_loads is not None:
            planned = check_load(planned_loads, "planned_loads", ndim=2, num_experts=x.shape[1])
            if planned.shape[0] != L:
                raise InputError(f"planned_loads: expected {L} layers, got {planned.shape[0]}")
        else:
            planned = self.planned_loads if self.planned_loads is not None else np.zeros_like(wsum)
        sim = cosine_similarity(wsum, planned)
        hit = sim < c.similarity_threshold
        bal = nan
        if c.balancedness_floor is not None:
            if placement is None:
                raise InputError("placement: balancedness_floor is set, so observe() needs the current placement")
            if placement.num_layers != L or placement.num_experts != x.shape[1]:
                raise InputError(f"placement: {placement.num_layers} layers x {placement.num_experts} experts, "
                                 f"loads are {L} x {x.shape[1]}")
            bal = layer_balancedness(wsum, placement, c.dispatch_strategy)
            hit |= bal < c.balancedness_floor
        hit &= wsum.sum(-1) > 0  # nothing to plan from
        busy_set = {int(b) for b in busy}
        layers = tuple(int(i) for i in np.flatnonzero(hit) if int(i) not in busy_set)
        self.last = TriggerDecision(step, True, reason, layers, sim, bal)
        self.history.append(self.last)
        return list(layers)

