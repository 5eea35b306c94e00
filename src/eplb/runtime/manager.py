"""Online balancer decision logic (torch-free): configuration, rebalance trigger, migration planning.

This module is the *Manager* and the *Policy* half of the online balancer (xLLM's split:
Manager decides *when* and *which layers*, Policy computes *the new table*, Executor moves
weights; the Executor lives in :mod:`eplb.runtime.executor`, the per-step orchestration in
:mod:`eplb.runtime.balancer`). Everything here is pure numpy and deterministic, so

* every rank computes the same decision from the same all-reduced loads, and
* the simulator (:mod:`eplb.sim`) imports and reuses :class:`RebalanceTrigger` and
  :func:`plan_migration` unchanged, so simulated and served decisions are the same code.

Terminology follows :mod:`eplb.placement`: ``L`` layers, ``E`` experts, ``S`` slots per layer,
``R`` ranks, ``spr = S // R`` slots per rank. Loads are tokens routed per logical expert.

Contents:

* :class:`BalancerConfig` -- every engine's option names in one validated object
  (vllm-ascend, xLLM, SGLang, vLLM, TensorRT-LLM YAML via :meth:`BalancerConfig.from_trtllm_yaml`).
* :class:`LoadWindow` -- ring buffer of the last ``window_size`` per-step loads ``[T, L, E]``.
* :class:`RebalanceTrigger` -- decides per layer when to rebalance (step cadence after a warm-up,
  wall-clock interval, cosine similarity to the planned-for load, balancedness floor).
* :func:`keep_in_place` -- migration-aware post-processing (re-exported from
  :mod:`eplb.policies.keep`): permutes nodes, ranks and slots of a new placement (balance
  unchanged) so that the most experts stay where they are.
* :func:`compute_plan` / :class:`PolicyWorker` -- the policy off the critical path (thread or process).
* :func:`plan_migration` -- which expert goes from which rank to which slots (:class:`LayerMigration`).
* :func:`plan_excluding` / :func:`drain_placement` / :func:`recover_placement` -- resilience.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_load, to_numpy
from eplb.metrics import balancedness, rank_loads
from eplb.placement import Placement, PlacementError
from eplb.policies import DEFAULT_POLICY
from eplb.policies.keep import keep_in_place

__all__ = [
    "BalancerConfig",
    "LayerMigration",
    "LoadWindow",
    "PlanRequest",
    "PlanResult",
    "PolicyWorker",
    "RebalanceTrigger",
    "Transfer",
    "TriggerDecision",
    "compute_plan",
    "cosine_similarity",
    "drain_placement",
    "keep_in_place",
    "layer_balancedness",
    "window_balancedness",
    "plan_excluding",
    "plan_migration",
    "recover_placement",
]


# ============================================================================ config
#: Other engines' option names -> our field name. Keys are normalised (lower case, ``-`` -> ``_``,
#: leading ``--`` stripped) before lookup.
ALIASES: dict[str, str] = {
    # vLLM EPLBConfig
    "step_interval": "num_iterations_eplb_update",
    "log_balancedness_interval": "log_interval",
    # SGLang server args
    "eplb_rebalance_num_iterations": "num_iterations_eplb_update",
    "eplb_rebalance_layers_per_chunk": "layer_updates_per_iter",
    "eplb_min_rebalancing_utilization_threshold": "balancedness_floor",
    "ep_num_redundant_experts": "num_redundant_experts",
    "eplb_algorithm": "policy",
    # vllm-ascend
    "init_redundancy_expert": "num_redundant_experts",
    # TensorRT-LLM / xLLM
    "ep": "ep_size",
}

#: Accepted for compatibility and ignored (they configure parts of the engines that have no
#: counterpart here, or only switch the balancer on/off, which :attr:`enabled` covers).
IGNORED: frozenset[str] = frozenset({"gate_eplb", "use_async", "communicator", "enable_migration_batching",
                                     "expert_parallel_degree", "log_balancedness", "enable_eplb_algorithm"})

_POLICY_BACKENDS = ("thread", "process", "inline")
#: How a layer splits an expert's tokens over its replicas (the runtime's replica strategies plus
#: ``"uniform"``, count / replicas); balancedness is judged under it (:func:`window_balancedness`).
DISPATCH_STRATEGIES = ("uniform", "round-robin", "local-first", "balanced")


def _norm_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_").lower()


@dataclass(frozen=True)
class BalancerConfig:
    """Configuration of the online balancer; every engine's option names map onto these fields.

    Cadence (*when* a check happens; a check decides per layer whether to rebalance):

    * ``num_wait_worker_iterations`` (vllm-ascend): warm-up steps, neither recorded nor checked.
    * ``num_iterations_eplb_update`` (vllm-ascend; vLLM ``step_interval``; SGLang
      ``eplb_rebalance_num_iterations``): a check every this many recorded steps (``None``: off).
    * ``eplb_update_interval`` (xLLM, seconds): a check when this much wall time passed since the last
      one (``None``: off). Either due condition starts a check; both timers restart at a check.

    Per-layer condition at a check (a layer is rebalanced when either holds):

    * ``eplb_update_threshold`` (xLLM, 0-1): cosine similarity between the window's load and the load
      the layer's placement was planned for is *below* it (1: nearly always; 0: never).
    * ``balancedness_floor`` (SGLang ``eplb_min_rebalancing_utilization_threshold``, 0-1): the layer's
      balancedness (mean/max rank load) on the window is below it (``None``: off).

    Migration: ``layer_updates_per_iter`` (TensorRT-LLM; SGLang ``eplb_rebalance_layers_per_chunk``)
    layers are committed per step at most; 0 means static (no online update). ``max_staging_bytes``
    bounds the staging memory of layers in flight per rank (``None``: only ``layer_updates_per_iter``
    bounds it). ``max_migration_bytes_per_step`` caps the expert bytes posted per step (all ranks
    together, at least one expert): a layer's transfers are then spread over several steps and it
    commits once all have landed (``None``: a layer's transfers all go out in one step).

    Placement: ``num_slots`` (TensorRT-LLM) or ``num_redundant_experts`` (vLLM / SGLang /
    vllm-ascend ``init_redundancy_expert``) physical slots per layer; the initial placement from
    ``expert_map_path`` (vllm-ascend or any format :mod:`eplb.formats` reads), ``init_expert_location``
    (SGLang: ``"trivial"``, a path, or inline JSON) or ``initial_global_assignments`` (TensorRT-LLM,
    ``{model layer id: [expert of slot 0..S-1]}``), first one set wins.
    ``expert_map_record_path`` (vllm-ascend): the current placement is written there at every
    rebalance and at exit.

    Policy: ``policy`` (a name in :data:`eplb.policies.POLICIES`), ``policy_options`` (passed to it,
    e.g. ``{"num_groups": 8}``), ``policy_backend`` ``"thread"`` | ``"process"`` | ``"inline"``
    (inline = synchronous, for simulation and tests only), ``window_size`` steps of load history
    (vLLM), ``min_balancedness_gain``: a layer only migrates when the new placement's balancedness
    on the window beats the current one by more than this. ``dispatch_strategy``: how the layers split an
    expert's tokens over its replicas (``"uniform"``, ``"round-robin"``, ``"local-first"``,
    ``"balanced"``); balancedness (floor, gain) is judged under it; ``None``: the layers' own strategy in
    the runtime balancer, ``"uniform"`` elsewhere.

    Reporting: ``log_interval`` steps between log lines (0: off), ``metrics_port`` for a Prometheus
    HTTP endpoint (``None``: no server; the registry is still readable), bound to ``metrics_addr``
    (default ``127.0.0.1``: this host only; ``"0.0.0.0"`` to expose it on every interface).

    Robustness: ``collective_timeout_s`` (default 60 s): the deadline of the balancer's collectives;
    a peer that stops answering for that long is reported on every surviving rank
    (:class:`eplb.runtime._watchdog.StalledRankError` naming it) instead of a hang.
    """

    num_slots: int | None = None
    num_redundant_experts: int | None = None
    layer_updates_per_iter: int = 1
    num_iterations_eplb_update: int | None = 400
    num_wait_worker_iterations: int = 30
    eplb_update_interval: float | None = None
    eplb_update_threshold: float = 1.0
    balancedness_floor: float | None = None
    min_balancedness_gain: float = 0.0
    dispatch_strategy: str | None = None
    window_size: int = 1000
    policy: str = DEFAULT_POLICY
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    policy_backend: str = "thread"
    initial_global_assignments: Mapping[int, tuple[int, ...]] | None = None
    expert_map_path: str | None = None
    expert_map_record_path: str | None = None
    init_expert_location: str | None = None
    max_staging_bytes: int | None = None
    max_migration_bytes_per_step: int | None = None
    ep_size: int | None = None
    log_interval: int = 0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    collective_timeout_s: float = 60.0
    enabled: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, want: str, got: Any) -> ValueError:
            return ValueError(f"BalancerConfig.{name}: expected {want}, got {got!r}")

        def int_field(name: str, *, minimum: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                if isinstance(v, float) and v.is_integer():
                    object.__setattr__(self, name, int(v))
                    v = int(v)
                elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
                    object.__setattr__(self, name, int(v))
                    v = int(v)
                else:
                    raise bad(name, f"an integer >= {minimum}" + (" or null" if optional else ""), v)
            if v < minimum:
                raise bad(name, f"an integer >= {minimum}" + (" or null" if optional else ""), v)
            object.__setattr__(self, name, int(v))

        def float_field(name: str, lo: float | None, hi: float | None, optional: bool = False,
                        lo_open: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            try:
                if isinstance(v, bool):
                    raise TypeError
                f = float(v)
            except (TypeError, ValueError):
                raise bad(name, "a number" + (" or null" if optional else ""), v) from None
            rng = f"in [{lo}, {hi}]" if hi is not None else (f"> {lo}" if lo_open else f">= {lo}")
            if not math.isfinite(f) or (lo is not None and (f < lo or (lo_open and f <= lo))) or (hi is not None and f > hi):
                raise bad(name, f"a number {rng}", v)
            object.__setattr__(self, name, f)

        int_field("num_slots", minimum=1, optional=True)
        int_field("num_redundant_experts", minimum=0, optional=True)
        int_field("layer_updates_per_iter", minimum=0)
        int_field("num_iterations_eplb_update", minimum=1, optional=True)
        int_field("num_wait_worker_iterations", minimum=0)
        float_field("eplb_update_interval", 0.0, None, optional=True, lo_open=True)
        float_field("eplb_update_threshold", 0.0, 1.0)
        float_field("balancedness_floor", 0.0, 1.0, optional=True)
        float_field("min_balancedness_gain", 0.0, 1.0)
        int_field("window_size", minimum=1)
        int_field("max_staging_bytes", minimum=1, optional=True)
        int_field("max_migration_bytes_per_step", minimum=1, optional=True)
        int_field("ep_size", minimum=1, optional=True)
        int_field("log_interval", minimum=0)
        int_field("metrics_port", minimum=0, optional=True)
        if self.metrics_port is not None and self.metrics_port > 65535:
            raise bad("metrics_port", "a TCP port in [0, 65535] or null", self.metrics_port)
        if not isinstance(self.metrics_addr, str) or not self.metrics_addr:
            raise bad("metrics_addr", "an address to bind, e.g. '127.0.0.1' or '0.0.0.0'", self.metrics_addr)
        float_field("collective_timeout_s", 0.0, None, lo_open=True)
        if not isinstance(self.policy, str) or not self.policy:
            raise bad("policy", "a policy name (see eplb.POLICIES)", self.policy)
        if self.dispatch_strategy is not None and self.dispatch_strategy not in DISPATCH_STRATEGIES:
            raise bad("dispatch_strategy", f"one of {list(DISPATCH_STRATEGIES)} or null", self.dispatch_strategy)
        if self.policy_backend not in _POLICY_BACKENDS:
            raise bad("policy_backend", f"one of {list(_POLICY_BACKENDS)}", self.policy_backend)
        if not isinstance(self.policy_options, Mapping):
            raise bad("policy_options", "a mapping of option name to value", self.policy_options)
        object.__setattr__(self, "policy_options", dict(self.policy_options))
        if not isinstance(self.enabled, bool):
            raise bad("enabled", "true or false", self.enabled)
        for name in ("expert_map_path", "expert_map_record_path", "init_expert_location"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (str, Path)) or not str(v):
                    raise bad(name, "a non-empty path string or null", v)
                object.__setattr__(self, name, str(v))
        if self.initial_global_assignments is not None:
            object.__setattr__(self, "initial_global_assignments",
                               _check_assignments(self.initial_global_assignments, self.num_slots,
                                                  "BalancerConfig.initial_global_assignments"))

    # ----------------------------------------------------------------- properties
    @property
    def online(self) -> bool:
        """Whether weights are migrated while serving (enabled, ``layer_updates_per_iter > 0`` and a cadence set)."""
        return (self.enabled and self.layer_updates_per_iter > 0
                and (self.num_iterations_eplb_update is not None or self.eplb_update_interval is not None))

    def resolve_num_slots(self, num_experts: int, default: int | None = None) -> int:
        """``S`` for a model of ``num_experts`` experts: ``num_slots``, else ``E + num_redundant_experts``,
        else ``default`` (e.g. the initial placement's), else ``E``."""
        if self.num_slots is not None:
            if self.num_redundant_experts is not None and self.num_slots != num_experts + self.num_redundant_experts:
                raise ValueError(
                    f"BalancerConfig.num_slots: {self.num_slots} disagrees with num_redundant_experts="
                    f"{self.num_redundant_experts} for {num_experts} experts (expected {num_experts + self.num_redundant_experts})")
            if self.num_slots < num_experts:
                raise ValueError(f"BalancerConfig.num_slots: {self.num_slots} slots cannot hold {num_experts} experts")
            return self.num_slots
        if self.num_redundant_experts is not None:
            return num_experts + self.num_redundant_experts
        return int(default) if default is not None else int(num_experts)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> BalancerConfig:
        """Build from a mapping using our names or any engine's (see :data:`ALIASES`).

        vllm-ascend's ``dynamic_eplb: false`` and xLLM's ``enable_eplb: false`` switch online updates off.
        vllm-ascend's options are read at the top level (up to v0.13) and under ``eplb_config`` (v0.18 on).
        Unknown keys raise a ValueError naming ``source`` and the key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a mapping of option names, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        out: dict[str, Any] = {}
        items = list(d.items())
        nested = d.get("eplb_config")
        if isinstance(nested, Mapping):  # vllm-ascend >= v0.18: additional_config["eplb_config"]
            items = [(k, v) for k, v in items if k != "eplb_config"] + list(nested.items())
        for raw_key, value in items:
            key = _norm_key(str(raw_key))
            key = ALIASES.get(key, key)
            if key in ("dynamic_eplb", "enable_eplb"):
                if not isinstance(value, bool):
                    raise ValueError(f"{source}: field '{raw_key}': expected true or false, got {value!r}")
                out["enabled"] = value
                continue
            if key in IGNORED:
                continue
            if key not in names:
                raise ValueError(f"{source}: unknown field '{raw_key}' (known: {', '.join(sorted(names | set(ALIASES)))})")
            if key in out and out[key] != value:
                raise ValueError(f"{source}: field '{raw_key}' sets {key} again to a different value ({out[key]!r} vs {value!r})")
            out[key] = value
        try:
            return cls(**out)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_trtllm_yaml(cls, path: str | Path, **overrides: Any) -> BalancerConfig:
        """Read TensorRT-LLM's ``moe_load_balancer.yaml`` (``num_slots``, ``layer_updates_per_iter``,
        optional ``initial_global_assignments`` and ``ep_size``); ``overrides`` set further fields."""
        import yaml

        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ValueError(f"{p}: cannot read the load balancer YAML ({exc.strerror or exc})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{p}: expected a YAML mapping with num_slots / layer_updates_per_iter, got {type(data).__name__}")
        if "num_slots" not in data:
            raise ValueError(f"{p}: missing field 'num_slots'")
        merged = dict(data)
        merged.update(overrides)
        return cls.from_dict(merged, source=str(p))

    def replace(self, **changes: Any) -> BalancerConfig:
        """A copy with fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (our field names)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "initial_global_assignments" and v is not None:
                v = {int(k): list(r) for k, r in v.items()}
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    # -------------------------------------------------------- initial placement
    def initial_placement(self, num_experts: int, num_ranks: int, *, num_layers: int | None = None,
                          layer_ids: Sequence[int] = (), num_nodes: int = 1) -> Placement | None:
        """The configured starting placement, or ``None`` when none is configured.

        Source, first one set: ``expert_map_path``, ``init_expert_location``, ``initial_global_assignments``.
        The result is checked against ``num_experts``, ``num_ranks`` and the layer count / ids.
        """
        pl: Placement | None = None
        if self.expert_map_path is not None:
            pl = read_map(self.expert_map_path, num_experts=num_experts, num_ranks=num_ranks,
                          num_nodes=num_nodes if num_nodes > 1 else None, what="expert_map_path")
        elif self.init_expert_location is not None:
            pl = _init_expert_location(self.init_expert_location, num_experts, num_ranks, num_nodes,
                                       num_layers, layer_ids, self, what="init_expert_location")
        elif self.initial_global_assignments is not None:
            ga = self.initial_global_assignments
            ids = [int(i) for i in layer_ids] if len(layer_ids) else sorted(ga)
            missing = [i for i in ids if i not in ga]
            if missing:
                raise ValueError(f"initial_global_assignments: no assignment for MoE layer ids {missing} "
                                 f"(it has {sorted(ga)})")
            try:
                pl = Placement(np.array([ga[i] for i in ids], dtype=np.int64), num_experts, num_ranks, num_nodes,
                               tuple(ids), {"source": "initial_global_assignments"})
            except PlacementError as exc:
                raise ValueError(f"initial_global_assignments: {exc}") from None
        if pl is None:
            return None
        if num_layers is not None and pl.num_layers != num_layers:
            raise ValueError(f"initial placement: {pl.num_layers} layers, but the model has {num_layers} MoE layers")
        if len(layer_ids) and pl.num_layers == len(layer_ids) and tuple(int(i) for i in layer_ids) != pl.layer_ids:
            pl = Placement(pl.phy2log, pl.num_experts, pl.num_ranks, pl.num_nodes, tuple(int(i) for i in layer_ids),
                           pl.meta)
        if pl.num_ranks != num_ranks:
            raise ValueError(f"initial placement: laid out for {pl.num_ranks} ranks, but the EP group has {num_ranks}")
        if self.num_slots is not None and pl.num_slots != self.num_slots:
            raise ValueError(f"initial placement: {pl.num_slots} slots per layer, but num_slots is {self.num_slots}")
        return pl


def _check_assignments(ga: Any, num_slots: int | None, what: str) -> dict[int, tuple[int, ...]]:
    if not isinstance(ga, Mapping):
        raise ValueError(f"{what}: expected a mapping of layer id to a list of expert ids, got {type(ga).__name__}")
    out: dict[int, tuple[int, ...]] = {}
    for k, row in ga.items():
        try:
            lid = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: layer key {k!r} is not an integer") from None
        if not isinstance(row, (list, tuple)) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                         for v in row):
            raise ValueError(f"{what}: layer {lid}: expected a list of integer expert ids")
        if num_slots is not None and len(row) != num_slots:
            raise ValueError(f"{what}: layer {lid} lists {len(row)} slots, expected num_slots={num_slots}")
        if any(int(v) < 0 for v in row):
            raise ValueError(f"{what}: layer {lid}: negative expert id")
        out[lid] = tuple(int(v) for v in row)
    lengths = {len(r) for r in out.values()}
    if len(lengths) > 1:
        raise ValueError(f"{what}: layers list different slot counts {sorted(lengths)}")
    return out


def read_map(path: str | Path, *, num_experts: int | None = None, num_ranks: int | None = None,
             num_nodes: int | None = None, what: str = "expert_map_path", num_slots: int | None = None,
             policy: str | None = None, num_groups: int = 1) -> Placement:
    """Read a placement file of any format :func:`eplb.formats.read_placement` knows (vllm-ascend, native,
    TensorRT-LLM, SGLang, vLLM; SGLang ``logical_count`` files are planned with ``policy`` for
    ``num_slots``); errors name ``what`` and the file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist (record one first with expert_map_record_path)")
    from eplb.formats import read_placement

    try:
        return read_placement(p, num_experts=num_experts, ep_size=num_ranks, num_nodes=num_nodes,
                              num_slots=num_slots, policy=policy, num_groups=num_groups)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _init_expert_location(spec: str, num_experts: int, num_ranks: int, num_nodes: int, num_layers: int | None,
                          layer_ids: Sequence[int], cfg: BalancerConfig, what: str) -> Placement | None:
    """SGLang's ``--init-expert-location``: ``"trivial"``, a path (any map format, incl. SGLang ``.pt`` /
    ``.json`` with ``physical_to_logical_map`` or ``logical_count``), or inline JSON of those two forms
    (``logical_count`` is planned with ``cfg.policy`` for ``cfg``'s slot count)."""
    s = spec.strip()
    if s == "trivial":
        return None
    S = cfg.resolve_num_slots(num_experts)
    opts = dict(cfg.policy_options)
    groups = int(opts.pop("num_groups", 1))
    if not s.startswith("{"):
        return read_map(s, num_experts=num_experts, num_ranks=num_ranks, num_nodes=num_nodes if num_nodes > 1 else None, what=what,
                        num_slots=S, policy=cfg.policy, num_groups=groups)
    try:
        data = json.loads(s)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: inline JSON is malformed ({exc})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a mapping with physical_to_logical_map or logical_count")
    ids = tuple(int(i) for i in layer_ids)
    if "physical_to_logical_map" in data:
        arr = to_numpy(data["physical_to_logical_map"]).astype(np.int64)
        try:
            return Placement(arr, num_experts, num_ranks, num_nodes, ids if len(ids) == len(arr) else (),
                             {"source": "init_expert_location"})
        except PlacementError as exc:
            raise ValueError(f"{what}: physical_to_logical_map: {exc}") from None
    if "logical_count" in data:
        counts = check_load(data["logical_count"], f"{what}: logical_count", ndim=(2, 3), num_experts=num_experts)
        from eplb.policies import plan

        return plan(counts, S, num_ranks, num_nodes=num_nodes, num_groups=groups, policy=cfg.policy,
                    layer_ids=ids, **opts)
    raise ValueError(f"{what}: expected key 'physical_to_logical_map' or 'logical_count', got {sorted(data)}")


# ============================================================================ window
class LoadWindow:
    """Ring buffer of the last ``size`` per-step loads ``[L, E]`` (int64 tokens) with a running sum.

    Memory: ``size * L * E * 8`` bytes (1000 x 58 x 256 -> 119 MB).
    """

    def __init__(self, size: int, num_layers: int, num_experts: int) -> None:
        if size < 1:
            raise ValueError(f"window_size: expected a positive integer, got {size}")
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
        raise ValueError(f"strategy: expected one of {list(DISPATCH_STRATEGIES)}, got {strategy!r}")
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

    * Steps ``< num_wait_worker_iterations`` are warm-up: ignored.
    * A *check* is due when ``num_iterations_eplb_update`` recorded steps passed since the last check
      (first at step ``wait + n - 1``), or when ``eplb_update_interval`` seconds of ``now_s`` passed since
      the last check (or since the first recorded step).
    * At a check, layer ``l`` is returned when ``cos(window_sum[l], planned_loads[l]) <
      eplb_update_threshold`` or (with a floor) its balancedness under ``placement`` on the window is
      below ``balancedness_floor``. Layers in ``busy`` (being planned or migrated) are left out.

    ``planned_loads`` ``[L, E]``: the load each layer's current placement was planned for; if omitted,
    the trigger's own record (:meth:`mark_planned`) is used; unknown (zero) rows count as similarity 0.
    """

    def __init__(self, config: BalancerConfig, num_layers: int, num_experts: int | None = None) -> None:
        if not isinstance(config, BalancerConfig):
            raise ValueError(f"config: expected a BalancerConfig, got {type(config).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive integer, got {num_layers!r}")
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
                raise ValueError(f"loads: expected {self.num_experts} experts, got {E}")
            self.num_experts = E
            self.window = LoadWindow(self.config.window_size, self.num_layers, E)

    def mark_planned(self, layers: Iterable[int], loads: ArrayLike | None = None) -> None:
        """Record that ``layers`` were (re)planned for ``loads`` ``[len(layers), E]`` (default: the
        current window sum of those layers)."""
        if self.window is None:
            raise ValueError("mark_planned: no loads observed yet")
        pos = [int(p) for p in layers]
        if self.planned_loads is None:
            self.planned_loads = np.zeros(self.window.shape, dtype=np.float64)
        src = self.window.sum()[pos] if loads is None else np.asarray(loads, dtype=np.float64).reshape(len(pos), -1)
        self.planned_loads[pos] = src

    def due(self, step: int, now_s: float | None) -> str:
        """The reason a check is due at ``step`` ("" if none): "iterations", "interval" or both."""
        c = self.config
        if not c.online or step < c.num_wait_worker_iterations:
            return ""
        reasons = []
        if c.num_iterations_eplb_update is not None:
            last = self._last_check_step if self._last_check_step is not None else c.num_wait_worker_iterations - 1
            if step - last >= c.num_iterations_eplb_update:
                reasons.append("iterations")
        if c.eplb_update_interval is not None:
            if now_s is None:
                raise ValueError("now_s: eplb_update_interval is set, so observe() needs the time in seconds")
            if self._last_check_time is not None and now_s - self._last_check_time >= c.eplb_update_interval:
                reasons.append("interval")
        return "+".join(reasons)

    # --------------------------------------------------------------- observe
    def observe(self, step: int, loads: ArrayLike, now_s: float | None = None,
                planned_loads: ArrayLike | None = None, *, placement: Placement | None = None,
                busy: Iterable[int] = ()) -> list[int]:
        """Record one step's loads ``[L, E]`` and return the layer positions to rebalance now (sorted)."""
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step: steps must increase (got {step} after {self._last_step})")
        x = check_load(loads, "loads", ndim=2)
        if x.shape[0] != self.num_layers:
            raise ValueError(f"loads: expected {self.num_layers} layers, got {x.shape[0]}")
        self._ensure(x.shape[1])
        assert self.window is not None
        self._last_step = step
        c = self.config
        L = self.num_layers
        nan = np.full(L, np.nan)
        if step < c.num_wait_worker_iterations:
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
                raise ValueError(f"planned_loads: expected {L} layers, got {planned.shape[0]}")
        else:
            planned = self.planned_loads if self.planned_loads is not None else np.zeros_like(wsum)
        sim = cosine_similarity(wsum, planned)
        hit = sim < c.eplb_update_threshold
        bal = nan
        if c.balancedness_floor is not None:
            if placement is None:
                raise ValueError("placement: balancedness_floor is set, so observe() needs the current placement")
            if placement.num_layers != L or placement.num_experts != x.shape[1]:
                raise ValueError(f"placement: {placement.num_layers} layers x {placement.num_experts} experts, "
                                 f"loads are {L} x {x.shape[1]}")
            bal = layer_balancedness(wsum, placement, c.dispatch_strategy)
            hit |= bal < c.balancedness_floor
        hit &= wsum.sum(-1) > 0  # nothing to plan from
        busy_set = {int(b) for b in busy}
        layers = tuple(int(i) for i in np.flatnonzero(hit) if int(i) not in busy_set)
        self.last = TriggerDecision(step, True, reason, layers, sim, bal)
        self.history.append(self.last)
        return list(layers)


# ============================================================================ migration plan
@dataclass(frozen=True)
class Transfer:
    """One expert's weights sent from rank ``src`` (its old slot ``src_slot``) to rank ``dst``,
    landing in the global slots ``dst_slots`` (all on ``dst``)."""

    src: int
    dst: int
    expert: int
    src_slot: int
    dst_slots: tuple[int, ...]


@dataclass(frozen=True)
class LayerMigration:
    """How to go from ``old_row`` to ``new_row`` ``[S]`` of one layer.

    ``transfers``: cross-rank copies (one per (destination rank, expert) not already on that rank),
    ordered by ``(dst, expert)``; every rank enumerates them in this order, so sends and receives of a
    rank pair match. ``local_copies``: ``(dst_slot, src_slot)`` pairs on the same rank (the expert is
    already there in another slot). Slots in neither keep their weights.
    """

    layer: int
    old_row: np.ndarray
    new_row: np.ndarray
    num_ranks: int
    transfers: tuple[Transfer, ...]
    local_copies: tuple[tuple[int, int], ...]

    @property
    def slots_per_rank(self) -> int:
        return int(self.new_row.shape[0]) // self.num_ranks

    @property
    def changed_slots(self) -> np.ndarray:
        """``[k]`` global slots whose expert changes."""
        return np.flatnonzero(self.old_row != self.new_row)

    @property
    def num_transfers(self) -> int:
        """Experts sent across ranks (each costs one expert's weight bytes)."""
        return len(self.transfers)

    def bytes_moved(self, bytes_per_expert: int) -> int:
        """Bytes sent across ranks for this layer."""
        return self.num_transfers * int(bytes_per_expert)

    def sends(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.src == rank]

    def recvs(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst == rank]

    def rank_changes(self, rank: int) -> bool:
        """Whether ``rank``'s local slots change (it must stage and commit new weights)."""
        spr = self.slots_per_rank
        return bool(np.any(self.old_row[rank * spr:(rank + 1) * spr] != self.new_row[rank * spr:(rank + 1) * spr]))


def plan_migration(old_row: ArrayLike, new_row: ArrayLike, num_ranks: int, ranks_per_node: int | None = None,
                   *, layer: int = 0) -> LayerMigration:
    """Plan the weight moves of one layer (deterministic: every rank computes the same plan).

    A destination rank that needs expert ``e`` (not on it under ``old_row``) receives it once, even
    for several slots; the source is a rank holding ``e`` under ``old_row``, preferring the
    destination's node, then the rank with the fewest sends so far in this layer (spreading load),
    then the nearest rank id after the destination.
    """
    old = to_numpy(old_row).astype(np.int64).ravel()
    new = to_numpy(new_row).astype(np.int64).ravel()
    if old.shape != new.shape:
        raise ValueError(f"new_row: {new.shape[0]} slots, old_row has {old.shape[0]}")
    S, R = old.shape[0], int(num_ranks)
    if R < 1 or S % R:
        raise ValueError(f"num_ranks: {S} slots are not divisible by {R} ranks")
    spr = S // R
    rpn = int(ranks_per_node) if ranks_per_node else R
    if R % rpn:
        raise ValueError(f"ranks_per_node: {R} ranks are not divisible by {rpn}")
    holders: dict[int, list[int]] = {}
    first_slot: dict[tuple[int, int], int] = {}
    for s, e in enumerate(old.tolist()):
        r = s // spr
        if (e, r) not in first_slot:
            first_slot[(e, r)] = s
            holders.setdefault(e, []).append(r)
    missing = sorted(set(new.tolist()) - set(holders))
    if missing:
        raise ValueError(f"new_row: experts {missing[:8]} are not held by any rank under old_row (cannot be sourced)")
    sends = [0] * R
    transfers: list[Transfer] = []
    local: list[tuple[int, int]] = []
    for d in range(R):
        sl = slice(d * spr, (d + 1) * spr)
        old_d, new_d = old[sl], new[sl]
        need: dict[int, list[int]] = {}
        for j in range(spr):
            e = int(new_d[j])
            if e == old_d[j]:
                continue
            s = d * spr + j
            if (e, d) in first_slot:
                local.append((s, first_slot[(e, d)]))
            else:
                need.setdefault(e, []).append(s)
        for e in sorted(need):
            cands = holders[e]
            same = [c for c in cands if c // rpn == d // rpn]
            pool = same if same else cands
            src = min(pool, key=lambda c: (sends[c], (c - d) % R))
            sends[src] += 1
            transfers.append(Transfer(src, d, e, first_slot[(e, src)], tuple(need[e])))
    return LayerMigration(int(layer), old, new, R, tuple(transfers), tuple(local))


# ============================================================================ policy
def _checksum(layers: Sequence[int], rows: np.ndarray) -> int:
    """A 48-bit digest of a plan (the sum over <= 2**15 ranks still fits int64)."""
    h = hashlib.sha256(np.asarray(layers, dtype=np.int64).tobytes() + np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest()[:6], "little") + 1


@dataclass
class PlanRequest:
    """Input of one policy run: layer positions, their window ``[T, L', E]`` and current rows ``[L', S]``."""

    plan_id: int
    layers: tuple[int, ...]
    window: np.ndarray
    current: Placement  # the selected layers only
    policy: str
    options: dict[str, Any]
    excluded_ranks: tuple[int, ...] = ()
    min_gain: float = 0.0
    delay_s: float = 0.0  # artificial slowness (tests of the non-blocking property)
    strategy: str | None = "uniform"  # dispatch strategy balancedness is judged under


@dataclass
class PlanResult:
    """Output of one policy run (rows of the selected layers; unchanged rows equal the current ones).

    ``planned_loads`` ``[L', E]``: the window sum the plan was made for. ``balancedness_before/after``
    ``[L']`` on the window (mean per-step, under the request's strategy). ``changed`` ``[L']``: layers that will migrate. ``transfers`` ``[L']``:
    cross-rank expert copies per layer. ``checksum``: identical on every rank for identical plans.
    """

    plan_id: int
    layers: tuple[int, ...]
    rows: np.ndarray
    planned_loads: np.ndarray
    balancedness_before: np.ndarray
    balancedness_after: np.ndarray
    changed: np.ndarray
    transfers: np.ndarray
    seconds: float
    checksum: int


def plan_excluding(loads: ArrayLike, current: Placement, excluded_ranks: Sequence[int], *, policy: str,
                   options: Mapping[str, Any] | None = None) -> Placement:
    """A placement of ``current``'s shape in which the ranks ``excluded_ranks`` hold no expert that is
    not also served by another rank: the survivors' slots are planned with ``policy`` as a smaller
    cluster (``R - k`` ranks, ``S - k*spr`` slots, one node), the excluded ranks keep their old
    experts (no weights move there) and can leave without losing any expert.

    Raises ValueError saying how many slots are missing when the survivors cannot hold every expert.
    """
    from eplb.policies import plan

    R, E, spr = current.num_ranks, current.num_experts, current.slots_per_rank
    ex = sorted({int(r) for r in excluded_ranks})
    bad = [r for r in ex if not 0 <= r < R]
    if bad:
        raise ValueError(f"excluded_ranks: ranks {bad} out of range [0, {R})")
    keep = [r for r in range(R) if r not in ex]
    S2 = len(keep) * spr
    if S2 < E:
        raise ValueError(
            f"excluded_ranks: the remaining {len(keep)} ranks have {S2} slots per layer but {E} experts must be "
            f"served: {E - S2} slots are missing (add redundant slots: at least {-(-E // max(1, len(keep)))} "
            f"slots per rank, num_slots >= {R * -(-E // max(1, len(keep)))})")
    x = check_load(loads, "loads", ndim=(2, 3), num_experts=E)
    slot_idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
    sub_cur = Placement(current.phy2log[:, slot_idx], E, len(keep), 1, current.layer_ids) \
        if np.all(current.logcnt > 0) and _serves_all(current.phy2log[:, slot_idx], E) else None
    opts = dict(options or {})
    opts.pop("num_nodes", None)
    num_groups = int(opts.pop("num_groups", 1))
    if E % num_groups:
        num_groups = 1
    if sub_cur is not None:
        opts["current"] = sub_cur
    sub = plan(x, S2, len(keep), num_nodes=1, num_groups=num_groups, policy=policy, layer_ids=current.layer_ids,
               **opts)
    sub = keep_in_place(current.phy2log[:, slot_idx], sub)
    rows = current.phy2log.copy()
    rows[:, slot_idx] = sub.phy2log
    return Placement(rows, E, R, current.num_nodes, current.layer_ids,
                     {**sub.meta, "excluded_ranks": ex, "policy": policy})


def _serves_all(rows: np.ndarray, E: int) -> bool:
    return all(len(np.unique(r)) == E for r in rows)


def drain_placement(current: Placement, rank: int | Sequence[int], loads: ArrayLike, *, policy: str = "eplb",
                    options: Mapping[str, Any] | None = None) -> Placement:
    """The placement after draining ``rank`` (or several): see :func:`plan_excluding`."""
    ranks = [rank] if isinstance(rank, (int, np.integer)) else list(rank)
    return plan_excluding(loads, current, ranks, policy=policy, options=options)


def recover_placement(previous: Placement, lost_ranks: Sequence[int], loads: ArrayLike | None = None, *,
                      policy: str = "eplb", options: Mapping[str, Any] | None = None) -> Placement:
    """The placement for the survivors of a hard rank loss: ``R - k`` ranks, ``S - k*spr`` slots.

    Survivor ``i`` (in old rank order) becomes new rank ``i``; the new layout keeps each survivor's old
    experts where the balance allows (:func:`keep_in_place`), so restarted workers can reuse cached
    weights. ``loads`` ``[L, E]`` or ``[T, L, E]`` (default: the previous placement's ``logcnt``, i.e.
    its replica counts as a load proxy). Raises ValueError with the number of missing slots when the
    survivors cannot hold every expert.
    """
    from eplb.policies import plan

    R, E, spr = previous.num_ranks, previous.num_experts, previous.slots_per_rank
    lost = sorted({int(r) for r in lost_ranks})
    if any(not 0 <= r < R for r in lost):
        raise ValueError(f"lost_ranks: expected ranks in [0, {R}), got {lost}")
    keep = [r for r in range(R) if r not in lost]
    if not keep:
        raise ValueError("lost_ranks: every rank is lost; nothing to recover")
    S2 = len(keep) * spr
    if S2 < E:
        raise ValueError(f"lost_ranks: the {len(keep)} surviving ranks have {S2} slots per layer but {E} experts "
                         f"must be served: {E - S2} slots are missing (restart with more slots per rank: "
                         f"at least {-(-E // len(keep))})")
    x = previous.logcnt.astype(np.float64) if loads is None else check_load(loads, "loads", ndim=(2, 3), num_experts=E)
    rpn = previous.ranks_per_node
    lost_nodes = {r // rpn for r in lost}
    whole = all(all(q in lost for q in range(n * rpn, (n + 1) * rpn)) for n in lost_nodes)
    N2 = previous.num_nodes - len(lost_nodes) if whole and previous.num_nodes > 1 else 1
    opts = dict(options or {})
    num_groups = int(opts.pop("num_groups", 1))
    if E % num_groups or num_groups % N2:
        num_groups = max(1, N2) if E % max(1, N2) == 0 else 1
    new = plan(x, S2, len(keep), num_nodes=N2, num_groups=num_groups, policy=policy, layer_ids=previous.layer_ids,
               **opts)
    slot_idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
    out = keep_in_place(previous.phy2log[:, slot_idx], new)
    return out.with_meta(recovered_from=previous.digest(), lost_ranks=lost, policy=policy)


def compute_plan(req: PlanRequest) -> PlanResult:
    """Run the policy for ``req`` (module-level so a process pool can pickle it).

    Migration-aware: the policy gets ``current=`` (incremental policies use it), the result is
    post-processed by :func:`keep_in_place`, and a layer only changes when its balancedness on the
    window (mean of per-step balancedness under ``req.strategy``) improves by more than ``min_gain``
    (or when it must, to drain ``excluded_ranks``).
    """
    from eplb.policies import plan

    t0 = time.perf_counter()
    if req.delay_s > 0:
        time.sleep(req.delay_s)
    cur = req.current
    window = np.asarray(req.window, dtype=np.float64)
    wsum = window.sum(0)
    if req.excluded_ranks:
        new = plan_excluding(window, cur, req.excluded_ranks, policy=req.policy, options=req.options)
    else:
        opts = dict(req.options)
        num_groups = int(opts.pop("num_groups", 1))
        if cur.num_experts % num_groups:
            num_groups = 1
        new = plan(window, cur.num_slots, cur.num_ranks, num_nodes=cur.num_nodes, num_groups=num_groups,
                   policy=req.policy, layer_ids=cur.layer_ids, current=cur, **opts)
        new = keep_in_place(cur, new)
    before = window_balancedness(window, cur, req.strategy)
    after = window_balancedness(window, new, req.strategy)
    changed = np.any(new.phy2log != cur.phy2log, axis=1) & (after > before + req.min_gain)
    if req.excluded_ranks:  # layers whose excluded ranks still hold an expert served nowhere else must change
        spr = cur.slots_per_rank
        keep = [r for r in range(cur.num_ranks) if r not in set(req.excluded_ranks)]
        idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
        must = np.array([len(np.unique(row[idx])) < cur.num_experts for row in cur.phy2log])
        changed |= must & np.any(new.phy2log != cur.phy2log, axis=1)
    rows = np.where(changed[:, None], new.phy2log, cur.phy2log)
    transfers = np.array([plan_migration(cur.phy2log[i], rows[i], cur.num_ranks, cur.ranks_per_node).num_transfers
                          for i in range(len(rows))], dtype=np.int64)
    return PlanResult(req.plan_id, tuple(req.layers), rows, wsum, before,
                      np.where(changed, after, before), changed, transfers, time.perf_counter() - t0,
                      _checksum(req.layers, rows))


def _warm_up(strategy: str | None) -> None:
    """Imports a policy run needs (run once in the worker at start)."""
    import scipy.optimize  # noqa: F401

    import eplb.policies  # noqa: F401

    if strategy in ("local-first", "balanced"):
        import eplb.dispatch  # noqa: F401


class PolicyWorker:
    """Runs :func:`compute_plan` off the critical path: ``"thread"`` (a daemon thread), ``"process"``
    (a spawned process: no GIL contention with the step loop) or ``"inline"`` (synchronous).

    ``submit`` never blocks on the computation; ``poll`` returns the finished result once (or None)
    and re-raises the policy's exception.
    """

    def __init__(self, backend: str = "thread") -> None:
        if backend not in _POLICY_BACKENDS:
            raise ValueError(f"policy_backend: expected one of {list(_POLICY_BACKENDS)}, got {backend!r}")
        self.backend = backend
        self._pool: cf.Executor | None = None
        self._future: cf.Future[PlanResult] | None = None
        self._inline: PlanResult | None = None
        self._inline_exc: BaseException | None = None
        self._warm: cf.Future[None] | None = None

    @property
    def busy(self) -> bool:
        """A submitted plan has not been collected by :meth:`poll` yet."""
        return self._future is not None or self._inline is not None or self._inline_exc is not None

    def start(self, strategy: str | None = None) -> None:
        """Start the worker now (a process pays its start-up and imports here, not at the first plan)."""
        if self.backend == "inline" or self._pool is not None:
            return
        self._ensure_pool()
        assert self._pool is not None
        self._warm = self._pool.submit(_warm_up, strategy)

    def ready(self, timeout: float | None = None) -> bool:
        """Block until :meth:`start`'s warm-up finished (benchmarks: keep process start-up out of timed steps)."""
        if self._warm is None:
            return True
        cf.wait([self._warm], timeout=timeout)
        if self._warm.done():
            self._warm.result()  # re-raise a failed start
            return True
        return False

    def _ensure_pool(self) -> None:
        if self._pool is None:
            if self.backend == "thread":
                self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-policy")
            else:
                self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))

    def submit(self, req: PlanRequest) -> None:
        if self.busy:
            raise RuntimeError("PolicyWorker: a plan is already in progress")
        if self.backend == "inline":
            try:
                self._inline = compute_plan(req)
            except Exception as exc:  # noqa: BLE001 - re-raised by poll()
                self._inline_exc = exc
            return
        self._ensure_pool()
        assert self._pool is not None
        self._future = self._pool.submit(compute_plan, req)

    def done(self) -> bool:
        """Whether the submitted plan finished (never blocks)."""
        if self._inline is not None or self._inline_exc is not None:
            return True
        return self._future is not None and self._future.done()

    def poll(self) -> PlanResult | None:
        """The finished result (once), ``None`` while running or idle; re-raises a policy failure."""
        if self._inline_exc is not None:
            exc, self._inline_exc = self._inline_exc, None
            raise exc
        if self._inline is not None:
            res, self._inline = self._inline, None
            return res
        if self._future is None or not self._future.done():
            return None
        fut, self._future = self._future, None
        return fut.result()

    def wait(self, timeout: float | None = None) -> PlanResult | None:
        """Block until the submitted plan finishes (tests and shutdown only)."""
        if self._future is not None:
            cf.wait([self._future], timeout=timeout)
        return self.poll()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._future = None
