"""Step-by-step replay of a trace under a placement: rank loads, imbalance, step time.

The replay is vectorised over steps and layers: steps are processed in chunks (bounded memory),
and a chunk's rank loads are one batched product ``counts[c, L, E] @ share[L, E, R]`` where
``share[l, e, r]`` is the fraction of expert ``e``'s tokens that rank ``r`` computes. For the
``uniform`` strategy that fraction is (replicas of ``e`` on ``r``) / (replicas of ``e``), exactly
:func:`eplb.metrics.slot_loads` summed per rank; any other replica-choice strategy is delegated to
:func:`eplb.dispatch.split_counts` (the same code the runtime and the evaluate command use).

Per step and layer (see :mod:`eplb.sim.cost` for the time model):

* ``imbalance = max_r load / mean_r load - 1`` (:func:`eplb.metrics.imbalance_ratio`);
* ``layer_ms = 2 * a2a_ms(max_r load) + compute_ms(max_r load) + other_ms_per_layer``;
* ``step_ms = sum over layers of layer_ms`` (+ exposed migration time for online runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, to_numpy
from eplb._counts import StepCounts
from eplb.errors import InputError
from eplb.metrics import imbalance_ratio, slot_share, uniform_rank_loads
from eplb.placement import Placement
from eplb.sim.cost import CostModel
from eplb.stats.trace import Trace
from eplb.strategies import SPLIT_STRATEGIES, check_strategy

__all__ = [
    "STRATEGIES",
    "SimInput",
    "SimResult",
    "as_sim_input",
    "compact_counts",
    "strategy_rank_loads",
    "replay_static",
    "step_chunk",
]

#: Replica-choice strategies the simulator knows. ``uniform`` is computed here (exactly
#: :func:`eplb.metrics.slot_loads`); the others are delegated to :func:`eplb.dispatch.split_counts`.
STRATEGIES = SPLIT_STRATEGIES

_CHUNK_BYTES = 48 * 2**20  # bound on one chunk's largest float64 array


@dataclass(frozen=True)
class SimInput(StepCounts):
    """Validated replay input.

    Kept apart from :class:`~eplb.stats.trace.Trace`: the simulator also replays float counts (e.g.
    expected loads, scaled or averaged traces), which a ``Trace`` (exact integer counts) refuses, and a
    ``Trace``'s checks (exact integers, totals) would cost a full pass over every large array passed in.

    Attributes:
        counts: ``[T, L, E]`` integer (or float) token-expert pairs per step, layer, expert.
        step_ids: ``[T]`` step ids.
        layer_ids: ``[L]`` model layer ids.
        name: a label of the input (file name, ``builtin:NAME``, "array").
        top_k: experts per token (0 if unknown).
        synthetic: True when the data is synthetic (labelled in every output).
        model: the trace's model name ("" if unknown).
        meta: the trace's metadata (e.g. ``hidden_size`` / ``moe_intermediate_size`` of the model).
    """

    counts: np.ndarray
    step_ids: np.ndarray
    layer_ids: tuple[int, ...]
    name: str = "array"
    top_k: int = 0
    synthetic: bool = False
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def slice_steps(self, start: int, stop: int) -> SimInput:
        """Steps at positions ``[start, stop)``."""
        return SimInput(self.counts[start:stop], self.step_ids[start:stop], self.layer_ids, self.name,
                        self.top_k, self.synthetic)


def compact_counts(counts: np.ndarray) -> np.ndarray:
    """Whole, non-negative integer counts in ``uint16`` when every count fits (else unchanged): the simulator's
    in-memory copy of a long trace at half the size of ``int32``. Every consumer widens what it reads (chunk
    by chunk, to float64 or int64), so the replay's numbers are the same; float arrays are returned as they are.
    """
    if counts.dtype.kind not in "iu" or counts.dtype.itemsize <= 2 or counts.size == 0:
        return counts
    if int(counts.max()) > np.iinfo(np.uint16).max or (counts.dtype.kind == "i" and int(counts.min()) < 0):
        return counts
    return counts.astype(np.uint16)


def as_sim_input(trace: Trace | ArrayLike | SimInput, name: str | None = None) -> SimInput:
    """Validate a :class:`~eplb.stats.trace.Trace`, a ``[T, L, E]`` array (``[L, E]`` = one step)
    or a :class:`SimInput`. Raises ``ValueError`` naming ``trace`` on bad input.

    Arrays are checked without a float copy (the replay converts chunk by chunk), so large
    integer traces stay cheap to pass in.
    """
    if isinstance(trace, SimInput):
        return trace
    if isinstance(trace, Trace):
        src = trace.source or ""
        synthetic = "synthetic" in src.lower() or "synthetic" in str(trace.meta.get("kind", "")).lower()
        assert trace.step_ids is not None
        return SimInput(trace.counts, np.asarray(trace.step_ids), tuple(trace.layer_ids),
                        name or trace.model or "trace", int(trace.top_k), synthetic, trace.model, dict(trace.meta))
    arr = to_numpy(trace)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"trace: expected numeric token counts, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"trace: expected a [steps, layers, experts] array, got shape {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise InputError(f"trace: empty array of shape {tuple(arr.shape)}; need at least one step, layer and expert")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InputError(f"trace: contains NaN or infinity (first at index {bad})")
    if arr.min() < 0:
        bad = np.argwhere(arr < 0)[0].tolist()
        raise InputError(f"trace: contains negative counts (first at index {bad}, value {arr[tuple(bad)]})")
    T, L, _ = arr.shape
    return SimInput(arr, np.arange(T, dtype=np.int64), tuple(range(L)), name or "array", 0, False)


@dataclass
class SimResult:
    """One simulated run (one policy, static or online) over ``T`` steps of ``L`` layers.

    Attributes:
        label: column name in reports (e.g. ``"deepseek"``, ``"deepseek+online"``).
        policy: placement policy name.
        mode: ``"static"`` or ``"online"``.
        strategy: replica-choice strategy.
        num_ranks, num_slots, num_nodes: layout.
        step_ids: ``[T]``.
        step_ms: ``[T]`` simulated MoE time of each step (ms), including exposed migration time.
        compute_ms: ``[T]`` sum over layers of the slowest rank's expert compute (ms).
        comm_ms: ``[T]`` sum over layers of dispatch + combine all-to-all time (ms).
        migration_ms: ``[T]`` time of the weight transfers running during each step (ms; the exposed
            fraction of it is part of ``step_ms``).
        bytes_moved: ``[T]`` expert-weight bytes transferred during each step.
        layer_updates: ``[T]`` layers whose transfers run during each step (committed at the next boundary).
        imbalance: ``[T, L]`` ``max / mean - 1`` of rank loads per step and layer.
        layer_ms: ``[L]`` mean simulated time per layer (ms, without migration).
        tokens: ``[T]`` token-expert pairs per step (summed over layers).
        events: accepted online plans (see :func:`eplb.sim.online.replay_online`); a plan with
            ``migrating`` layers is a rebalance.
        final_placement: the placement at the end of the run.
        meta: provenance (trace, cost model, options).
    """

    label: str
    policy: str
    mode: str
    strategy: str
    num_ranks: int
    num_slots: int
    num_nodes: int
    step_ids: np.ndarray
    step_ms: np.ndarray
    compute_ms: np.ndarray
    comm_ms: np.ndarray
    migration_ms: np.ndarray
    bytes_moved: np.ndarray
    layer_updates: np.ndarray
    imbalance: np.ndarray
    layer_ms: np.ndarray
    tokens: np.ndarray
    events: list[dict[str, Any]] = field(default_factory=list)
    final_placement: Placement | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.step_ms.shape[0])

    def summary(self) -> dict[str, Any]:
        """Scalar summary: step time mean/p50/p99 (ms), imbalance mean/p99, bytes moved, rebalances."""
        st = self.step_ms
        imb_step = self.imbalance.mean(axis=1)
        return {
            "label": self.label, "policy": self.policy, "mode": self.mode, "strategy": self.strategy,
            "num_ranks": self.num_ranks, "num_slots": self.num_slots, "num_nodes": self.num_nodes,
            "steps": self.num_steps,
            "step_ms_mean": float(st.mean()), "step_ms_p50": float(np.percentile(st, 50)),
            "step_ms_p99": float(np.percentile(st, 99)), "step_ms_max": float(st.max()),
            "compute_ms_mean": float(self.compute_ms.mean()), "comm_ms_mean": float(self.comm_ms.mean()),
            "imbalance_mean": float(self.imbalance.mean()), "imbalance_p99": float(np.percentile(imb_step, 99)),
            "bytes_moved": int(self.bytes_moved.sum()), "migration_ms": float(self.migration_ms.sum()),
            "rebalances": sum(1 for e in self.events if e.get("migrating")),
            "plans": len(self.events), "layer_updates": int(self.layer_updates.sum()),
        }

    def series(self) -> dict[str, list[Any]]:
        """The per-step time series as JSON-ready lists."""
        return {
            "step_id": self.step_ids.tolist(), "step_ms": self.step_ms.round(6).tolist(),
            "compute_ms": self.compute_ms.round(6).tolist(), "comm_ms": self.comm_ms.round(6).tolist(),
            "migration_ms": self.migration_ms.round(6).tolist(), "bytes_moved": self.bytes_moved.tolist(),
            "layer_updates": self.layer_updates.tolist(), "imbalance": self.imbalance.mean(axis=1).round(6).tolist(),
        }


# --------------------------------------------------------------------------- rank loads
def strategy_rank_loads(counts: np.ndarray, placement: Placement, strategy: str = "uniform",
                        share: np.ndarray | None = None) -> np.ndarray:
    """``[c, L, R]`` rank loads of ``counts`` ``[c, L, E]`` under a replica-choice ``strategy``: ``uniform`` is
    :func:`eplb.metrics.rank_loads` without re-validating the replay's counts (``share``: its
    :func:`~eplb.metrics.slot_share`, to reuse), any other :func:`eplb.dispatch.split_rank_loads` (the runtime's
    dispatch code)."""
    if strategy == "uniform":
        return uniform_rank_loads(counts, placement, share)
    check_strategy(strategy)
    from eplb.dispatch import split_rank_loads

    return np.asarray(to_numpy(split_rank_loads(counts, placement, strategy)), dtype=np.float64)


def step_chunk(num_layers: int, width: int) -> int:
    """Steps per chunk so one ``[chunk, L, width]`` float64 array stays under ~48 MiB."""
    return max(1, _CHUNK_BYTES // (8 * num_layers * max(width, 1)))


@dataclass
class _Block:
    """Per-step outputs of a contiguous block of ``c`` steps: ``compute_ms``, ``comm_ms``, ``tokens`` ``[c]``;
    ``imbalance``, ``layer_ms`` (without migration) ``[c, L]``."""

    compute_ms: np.ndarray
    comm_ms: np.ndarray
    imbalance: np.ndarray
    layer_ms: np.ndarray
    tokens: np.ndarray


def evaluate_block(counts: np.ndarray, placement: Placement, cost: CostModel, strategy: str,
                   share: np.ndarray | None = None) -> _Block:
    """Times and imbalance of the steps in ``counts`` ``[c, L, E]`` under a fixed placement."""
    R, N, spr = placement.num_ranks, placement.num_nodes, placement.slots_per_rank
    loads = strategy_rank_loads(counts, placement, strategy, share)  # [c, L, R]
    mx = loads.max(axis=-1)  # [c, L]
    ex = placement.meta.get("excluded_ranks") or ()
    keep = np.setdiff1d(np.arange(R), np.asarray(list(ex), dtype=np.int64)) if len(ex) else None
    imb = imbalance_ratio(loads if keep is None else loads[..., keep], axis=-1)  # over serving ranks
    if cost.compute_is_monotone(spr):
        comp = cost.compute_ms(mx, spr)
    else:
        comp = cost.compute_ms(loads, spr).max(axis=-1)
    comm = 2.0 * cost.a2a_ms(mx, R, N)
    layer = comp + comm + cost.other_ms_per_layer
    return _Block(comp.sum(axis=1), comm.sum(axis=1), imb, layer, loads.sum(axis=(1, 2)))


def check_fits(placement: Placement, data: SimInput, what: str = "placement") -> None:
    """Raise ``ValueError`` unless ``placement`` has the trace's layers and experts."""
    placement.check_compatible(num_experts=data.num_experts, num_layers=data.num_layers, what=what)


def replay_static(trace: Trace | ArrayLike | SimInput, placement: Placement, *, cost: CostModel | None = None,
                  strategy: str = "uniform", label: str | None = None, chunk_steps: int | None = None,
                  progress: Callable[[int], None] | None = None, meta: Mapping[str, Any] | None = None) -> SimResult:
    """Replay every step of ``trace`` under a fixed ``placement``.

    Args:
        trace: ``[T, L, E]`` counts (array, :class:`Trace` or :class:`SimInput`).
        placement: the placement (its ``num_ranks`` / ``num_nodes`` are the cluster layout).
        cost: cost model (default :func:`eplb.sim.cost.default_cost_model`).
        strategy: replica-choice strategy (:data:`STRATEGIES`).
        chunk_steps: steps per vectorised chunk (default: bounded memory, see :func:`step_chunk`).
        progress: called with the number of steps finished after each chunk.

    Returns:
        A :class:`SimResult` with no migrations.
    """
    from eplb.sim.cost import default_cost_model

    data = as_sim_input(trace)
    check_fits(placement, data)
    check_strategy(strategy)
    cm = cost or default_cost_model()
    T, L = data.num_steps, data.num_layers
    chunk = int(chunk_steps) if chunk_steps else step_chunk(L, max(data.num_experts, placement.num_slots))
    share = slot_share(placement) if strategy == "uniform" else None
    comp, comm, tok = np.empty(T), np.empty(T), np.empty(T)
    imb = np.empty((T, L))
    layer_sum = np.zeros(L)
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        blk = evaluate_block(data.counts[a:b], placement, cm, strategy, share)
        comp[a:b], comm[a:b], imb[a:b], tok[a:b] = blk.compute_ms, blk.comm_ms, blk.imbalance, blk.tokens
        layer_sum += blk.layer_ms.sum(axis=0)
        if progress is not None:
            progress(b)
    step = comp + comm + cm.other_ms_per_layer * L
    policy = str(placement.meta.get("policy", "?"))
    return SimResult(
        label=label or policy, policy=policy, mode="static", strategy=strategy, num_ranks=placement.num_ranks,
        num_slots=placement.num_slots, num_nodes=placement.num_nodes, step_ids=np.asarray(data.step_ids),
        step_ms=step, compute_ms=comp, comm_ms=comm, migration_ms=np.zeros(T), bytes_moved=np.zeros(T, dtype=np.int64),
        layer_updates=np.zeros(T, dtype=np.int64), imbalance=imb, layer_ms=layer_sum / T, tokens=tok,
        events=[], final_placement=placement, meta=dict(meta or {}),
    )
