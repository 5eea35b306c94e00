"""The online balancer's configuration: eplb's own field names, every engine's names as aliases.

:class:`BalancerConfig` is a frozen pydantic model. Its fields carry eplb's vocabulary
(``check_every_steps``, ``layers_per_step``, ``num_ranks`` ...); each engine's option name is an
alias of the field it means (:data:`ALIASES`), so a vllm-ascend ``additional_config``, xLLM gflags,
SGLang server args, vLLM's ``EPLBConfig`` or TensorRT-LLM's ``moe_load_balancer.yaml`` all build the
same object. An invalid value raises a ValueError naming the key *the caller used* and what was
expected (``BalancerConfig.eplb_update_threshold: expected a number <= 1, got 1.5``).

Attribute reads by an engine's name (``cfg.num_iterations_eplb_update``) keep working for code
written against those names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from eplb._checks import check_load, to_numpy
from eplb.errors import ConfigError
from eplb.placement import Placement, PlacementError
from eplb.policies.registry import DEFAULT_POLICY
from eplb.strategies import SPLIT_STRATEGIES

__all__ = ["ALIASES", "BalancerConfig", "DISPATCH_STRATEGIES", "IGNORED", "POLICY_BACKENDS", "read_map"]

#: Every engine's option name -> eplb's field name. Keys are normalised (lower case, ``-`` -> ``_``,
#: leading ``--`` stripped) before lookup.
ALIASES: dict[str, str] = {
    # vllm-ascend additional_config
    "num_iterations_eplb_update": "check_every_steps",
    "num_wait_worker_iterations": "warmup_steps",
    "init_redundancy_expert": "num_redundant_experts",
    "expert_map_path": "initial_map_path",
    "expert_map_record_path": "record_path",
    # vLLM EPLBConfig
    "step_interval": "check_every_steps",
    "log_balancedness_interval": "log_interval",
    # SGLang server args
    "eplb_rebalance_num_iterations": "check_every_steps",
    "eplb_rebalance_layers_per_chunk": "layers_per_step",
    "eplb_min_rebalancing_utilization_threshold": "balancedness_floor",
    "ep_num_redundant_experts": "num_redundant_experts",
    "eplb_algorithm": "policy",
    "init_expert_location": "initial_location",
    # TensorRT-LLM moe_load_balancer.yaml
    "layer_updates_per_iter": "layers_per_step",
    "initial_global_assignments": "initial_assignments",
    # xLLM gflags
    "eplb_update_interval": "check_every_seconds",
    "eplb_update_threshold": "similarity_threshold",
    "ep_size": "num_ranks",
    "ep": "num_ranks",
}

#: Accepted for compatibility and ignored (they configure parts of the engines that have no
#: counterpart here, or only switch the balancer on/off, which ``enabled`` covers).
IGNORED: frozenset[str] = frozenset({"gate_eplb", "use_async", "communicator", "enable_migration_batching",
                                     "expert_parallel_degree", "log_balancedness", "enable_eplb_algorithm"})
#: Keys that switch online updates on/off (vllm-ascend ``dynamic_eplb``, xLLM ``enable_eplb``).
_SWITCHES = ("dynamic_eplb", "enable_eplb")

POLICY_BACKENDS = ("thread", "process", "inline")
#: How a layer splits an expert's tokens over its replicas (the runtime's replica strategies plus
#: ``"uniform"``, count / replicas); balancedness is judged under it.
DISPATCH_STRATEGIES = SPLIT_STRATEGIES


def _norm_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_").lower()


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ConfigError("a boolean is not a number")
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _path(v: Any) -> Any:
    if v is None:
        return None
    if not isinstance(v, (str, Path)) or not str(v):
        raise ConfigError("expected a non-empty path string or null")
    return str(v)


Int = Annotated[int, BeforeValidator(_no_bool)]
Num = Annotated[float, BeforeValidator(_no_bool)]
PathStr = Annotated[str | None, BeforeValidator(_path)]


def _f(default: Any, *names: str, **kw: Any) -> Any:
    """A field whose engine aliases are ``names`` (its own name first)."""
    return Field(default, validation_alias=AliasChoices(*names) if len(names) > 1 else None, **kw)


def _aliases_of(field: str) -> tuple[str, ...]:
    return (field, *[k for k, v in ALIASES.items() if v == field])


class BalancerConfig(BaseModel):
    """Configuration of the online balancer (frozen; eplb's names, engines' names as aliases).

    Cadence (*when* a check happens; a check decides per layer whether to rebalance):

    * ``warmup_steps`` (vllm-ascend ``num_wait_worker_iterations``): steps neither recorded nor checked.
    * ``check_every_steps`` (vllm-ascend ``num_iterations_eplb_update``, vLLM ``step_interval``, SGLang
      ``eplb_rebalance_num_iterations``): a check every this many recorded steps (``None``: off).
    * ``check_every_seconds`` (xLLM ``eplb_update_interval``): a check when this much wall time passed
      since the last one (``None``: off). Either due condition starts a check; both timers restart.

    Per-layer condition at a check (a layer is rebalanced when either holds):

    * ``similarity_threshold`` (xLLM ``eplb_update_threshold``, 0-1): cosine similarity between the
      window's load and the load the layer's placement was planned for is *below* it.
    * ``balancedness_floor`` (SGLang ``eplb_min_rebalancing_utilization_threshold``, 0-1): the layer's
      balancedness (mean/max rank load) on the window is below it (``None``: off).

    Migration: ``layers_per_step`` (TensorRT-LLM ``layer_updates_per_iter``, SGLang
    ``eplb_rebalance_layers_per_chunk``) layers committed per step at most; 0 means static.
    ``max_staging_bytes`` bounds the staging memory of layers in flight per rank;
    ``max_migration_bytes_per_step`` caps the expert bytes posted per step (all ranks together, at
    least one expert): a layer's transfers are then spread over several steps.

    Placement: ``num_slots`` or ``num_redundant_experts`` slots per layer; the initial placement from
    ``initial_map_path`` (vllm-ascend ``expert_map_path``; any format :mod:`eplb.formats` reads),
    ``initial_location`` (SGLang ``init_expert_location``: ``"trivial"``, a path, or inline JSON) or
    ``initial_assignments`` (TensorRT-LLM ``initial_global_assignments``), first one set wins.
    ``record_path`` (vllm-ascend ``expert_map_record_path``): the placement is written there at every
    rebalance and at exit. ``num_ranks`` (``ep_size``): the EP size, when known.

    Policy: ``policy`` (a registered policy name), ``policy_options`` (e.g. ``{"num_groups": 8}``),
    ``policy_backend`` ``"thread"`` | ``"process"`` | ``"inline"``, ``window_size`` steps of load
    history, ``min_balancedness_gain`` a layer only migrates when its balancedness on the window
    improves by more than this, ``dispatch_strategy`` the replica split balancedness is judged under
    (``None``: the layers' own strategy in the runtime, ``"uniform"`` elsewhere).

    Reporting: ``log_interval`` steps between log lines (0: off), ``metrics_port`` (0-65535) for a
    Prometheus HTTP endpoint (``None``: no server), bound to ``metrics_addr`` (default ``127.0.0.1``: this
    host only; ``"0.0.0.0"`` to expose it on every interface).

    Robustness: ``collective_timeout_s`` (default 60 s): the deadline of the balancer's collectives; a
    peer that stops answering for that long is reported on every surviving rank
    (:class:`eplb.errors.StalledRankError` naming it) instead of a hang.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid", arbitrary_types_allowed=True)

    num_slots: Int | None = _f(None, "num_slots", ge=1)
    num_redundant_experts: Int | None = _f(None, *_aliases_of("num_redundant_experts"), ge=0)
    layers_per_step: Int = _f(1, *_aliases_of("layers_per_step"), ge=0)
    check_every_steps: Int | None = _f(400, *_aliases_of("check_every_steps"), ge=1)
    warmup_steps: Int = _f(30, *_aliases_of("warmup_steps"), ge=0)
    check_every_seconds: Num | None = _f(None, *_aliases_of("check_every_seconds"), gt=0, allow_inf_nan=False)
    similarity_threshold: Num = _f(1.0, *_aliases_of("similarity_threshold"), ge=0, le=1, allow_inf_nan=False)
    balancedness_floor: Num | None = _f(None, *_aliases_of("balancedness_floor"), ge=0, le=1, allow_inf_nan=False)
    min_balancedness_gain: Num = _f(0.0, "min_balancedness_gain", ge=0, le=1, allow_inf_nan=False)
    dispatch_strategy: str | None = None
    window_size: Int = _f(1000, "window_size", ge=1)
    policy: str = _f(DEFAULT_POLICY, *_aliases_of("policy"), min_length=1)
    policy_options: dict[str, Any] = Field(default_factory=dict)
    policy_backend: str = "thread"
    initial_assignments: dict[int, tuple[int, ...]] | None = _f(None, *_aliases_of("initial_assignments"))
    initial_map_path: PathStr = _f(None, *_aliases_of("initial_map_path"))
    record_path: PathStr = _f(None, *_aliases_of("record_path"))
    initial_location: PathStr = _f(None, *_aliases_of("initial_location"))
    max_staging_bytes: Int | None = _f(None, "max_staging_bytes", ge=1)
    max_migration_bytes_per_step: Int | None = _f(None, "max_migration_bytes_per_step", ge=1)
    num_ranks: Int | None = _f(None, *_aliases_of("num_ranks"), ge=1)
    log_interval: Int = _f(0, *_aliases_of("log_interval"), ge=0)
    metrics_port: Int | None = _f(None, "metrics_port", ge=0, le=65535)
    metrics_addr: str = _f("127.0.0.1", "metrics_addr", min_length=1, strict=True)
    collective_timeout_s: Num = _f(60.0, "collective_timeout_s", gt=0, allow_inf_nan=False)
    enabled: bool = Field(True, strict=True)

    # ---------------------------------------------------------------- validators
    @field_validator("dispatch_strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        if v is not None and v not in DISPATCH_STRATEGIES:
            raise ConfigError(f"expected one of {list(DISPATCH_STRATEGIES)} or null")
        return v

    @field_validator("policy_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in POLICY_BACKENDS:
            raise ConfigError(f"expected one of {list(POLICY_BACKENDS)}")
        return v

    @field_validator("initial_assignments", mode="before")
    @classmethod
    def _assignments(cls, v: Any, info: Any) -> Any:
        if v is None:
            return None
        return _check_assignments(v, info.data.get("num_slots"))

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_message(exc, "BalancerConfig")) from None

    def __getattr__(self, name: str) -> Any:  # reads by an engine's name
        target = ALIASES.get(name)
        if target is not None:
            return getattr(self, target)
        return super().__getattr__(name)  # type: ignore[misc]

    # ---------------------------------------------------------------- properties
    @property
    def online(self) -> bool:
        """Whether weights are migrated while serving (enabled, ``layers_per_step > 0`` and a cadence set)."""
        return (self.enabled and self.layers_per_step > 0
                and (self.check_every_steps is not None or self.check_every_seconds is not None))

    def resolve_num_slots(self, num_experts: int, default: int | None = None) -> int:
        """``S`` for ``num_experts`` experts: ``num_slots``, else ``E + num_redundant_experts``, else
        ``default`` (e.g. the initial placement's), else ``E``."""
        if self.num_slots is not None:
            if self.num_redundant_experts is not None and self.num_slots != num_experts + self.num_redundant_experts:
                raise ConfigError(
                    f"BalancerConfig.num_slots: {self.num_slots} disagrees with num_redundant_experts="
                    f"{self.num_redundant_experts} for {num_experts} experts (expected {num_experts + self.num_redundant_experts})")
            if self.num_slots < num_experts:
                raise ConfigError(f"BalancerConfig.num_slots: {self.num_slots} slots cannot hold {num_experts} experts")
            return self.num_slots
        if self.num_redundant_experts is not None:
            return num_experts + self.num_redundant_experts
        return int(default) if default is not None else int(num_experts)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> BalancerConfig:
        """Build from a mapping using eplb's names or any engine's (:data:`ALIASES`; keys may use
        dashes, capitals and a leading ``--``; vllm-ascend's options at the top level (up to v0.13) or under
        ``eplb_config`` (v0.18 on)). vllm-ascend's ``dynamic_eplb: false`` and xLLM's
        ``enable_eplb: false`` switch online updates off; :data:`IGNORED` keys are skipped. Errors
        name ``source`` and the key as written."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of option names, got {type(d).__name__}")
        names = set(cls.model_fields)
        out: dict[str, Any] = {}
        used: dict[str, str] = {}  # field -> key as written
        items = list(d.items())
        nested = d.get("eplb_config")
        if isinstance(nested, Mapping):  # vllm-ascend >= v0.18: additional_config["eplb_config"]
            items = [(k, v) for k, v in items if k != "eplb_config"] + list(nested.items())
        for raw_key, value in items:
            key = _norm_key(str(raw_key))
            if key in _SWITCHES:
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: field '{raw_key}': expected true or false, got {value!r}")
                key = "enabled"
            key = ALIASES.get(key, key)
            if key in IGNORED:
                continue
            if key not in names:
                raise ConfigError(f"{source}: unknown field '{raw_key}' (known: {', '.join(sorted(names | set(ALIASES)))})")
            if key in out and out[key] != value:
                raise ConfigError(f"{source}: fields '{used[key]}' and '{raw_key}' both set {key}, to different "
                                 f"values ({out[key]!r} vs {value!r})")
            out[key] = value
            used[key] = str(raw_key)
        obj = cls.__new__(cls)
        try:
            BaseModel.__init__(obj, **out)
        except ValidationError as exc:
            raise ConfigError(_message(exc, source, used)) from None
        return obj

    @classmethod
    def from_trtllm_yaml(cls, path: str | Path, **overrides: Any) -> BalancerConfig:
        """Read TensorRT-LLM's ``moe_load_balancer.yaml`` (``num_slots``, ``layer_updates_per_iter``,
        optional ``initial_global_assignments`` and ``ep_size``) with :func:`eplb.formats.trtllm.read_config`;
        ``overrides`` set further fields (any name :meth:`from_dict` takes)."""
        from eplb.formats.trtllm import read_config

        data = read_config(path)
        return cls.from_dict({**data, **overrides}, source=str(path))

    def replace(self, **changes: Any) -> BalancerConfig:
        """A copy with fields changed (validated; engines' names accepted)."""
        named = {ALIASES.get(_norm_key(k), k): v for k, v in changes.items()}
        return type(self).from_dict({**self.model_dump(), **named}, source="BalancerConfig")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (eplb's field names)."""
        out = self.model_dump()
        if out["initial_assignments"] is not None:
            out["initial_assignments"] = {int(k): list(r) for k, r in out["initial_assignments"].items()}
        return out

    # -------------------------------------------------------- initial placement
    def initial_placement(self, num_experts: int, num_ranks: int, *, num_layers: int | None = None,
                          layer_ids: Sequence[int] = (), num_nodes: int = 1) -> Placement | None:
        """The configured starting placement, or ``None`` when none is configured.

        Source, first one set: ``initial_map_path``, ``initial_location``, ``initial_assignments``.
        The result is checked against ``num_experts``, ``num_ranks`` and the layer count / ids.
        """
        pl: Placement | None = None
        if self.initial_map_path is not None:
            pl = read_map(self.initial_map_path, num_experts=num_experts, num_ranks=num_ranks,
                          num_nodes=num_nodes if num_nodes > 1 else None, what="expert_map_path")
        elif self.initial_location is not None:
            pl = _init_expert_location(self.initial_location, num_experts, num_ranks, num_nodes, layer_ids, self,
                                       what="init_expert_location")
        elif self.initial_assignments is not None:
            ga = self.initial_assignments
            ids = [int(i) for i in layer_ids] if len(layer_ids) else sorted(ga)
            missing = [i for i in ids if i not in ga]
            if missing:
                raise ConfigError(f"initial_global_assignments: no assignment for MoE layer ids {missing} "
                                 f"(it has {sorted(ga)})")
            try:
                pl = Placement(np.array([ga[i] for i in ids], dtype=np.int64), num_experts, num_ranks, num_nodes,
                               tuple(ids), {"source": "initial_global_assignments"})
            except PlacementError as exc:
                raise ConfigError(f"initial_global_assignments: {exc}") from None
        if pl is None:
            return None
        if num_layers is not None and pl.num_layers != num_layers:
            raise ConfigError(f"initial placement: {pl.num_layers} layers, but the model has {num_layers} MoE layers")
        if len(layer_ids):
            try:
                pl = pl.for_layers(layer_ids, of="model", what="initial placement")
            except PlacementError as exc:
                raise ConfigError(str(exc)) from None
        if pl.num_ranks != num_ranks:
            raise ConfigError(f"initial placement: laid out for {pl.num_ranks} ranks, but the EP group has {num_ranks}")
        if self.num_slots is not None and pl.num_slots != self.num_slots:
            raise ConfigError(f"initial placement: {pl.num_slots} slots per layer, but num_slots is {self.num_slots}")
        return pl


def _message(exc: ValidationError, source: str, used: Mapping[str, str] | None = None) -> str:
    """One line per invalid field, naming the key as the caller wrote it."""
    lines = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        key = loc[0] if loc else "?"
        key = (used or {}).get(key, key)
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif msg.startswith("Input should be "):
            msg = "expected " + msg[len("Input should be "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        extra = "." + ".".join(loc[1:]) if len(loc) > 1 and err["type"] != "extra_forbidden" else ""
        got = f", got {err['input']!r}" if err["type"] != "missing" and "input" in err else ""
        lines.append(f"{source}.{key}{extra}: {msg}{got}")
    return "; ".join(lines)


def _check_assignments(ga: Any, num_slots: int | None, what: str = "initial_global_assignments"
                       ) -> dict[int, tuple[int, ...]]:
    if not isinstance(ga, Mapping):
        raise ConfigError(f"{what}: expected a mapping of layer id to a list of expert ids, got {type(ga).__name__}")
    out: dict[int, tuple[int, ...]] = {}
    for k, row in ga.items():
        try:
            lid = int(k)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: layer key {k!r} is not an integer") from None
        if not isinstance(row, (list, tuple)) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                         for v in row):
            raise ConfigError(f"{what}: layer {lid}: expected a list of integer expert ids")
        if num_slots is not None and len(row) != num_slots:
            raise ConfigError(f"{what}: layer {lid} lists {len(row)} slots, expected num_slots={num_slots}")
        if any(int(v) < 0 for v in row):
            raise ConfigError(f"{what}: layer {lid}: negative expert id")
        out[lid] = tuple(int(v) for v in row)
    lengths = {len(r) for r in out.values()}
    if len(lengths) > 1:
        raise ConfigError(f"{what}: layers list different slot counts {sorted(lengths)}")
    return out


def read_map(path: str | Path, *, num_experts: int | None = None, num_ranks: int | None = None,
             num_nodes: int | None = None, what: str = "expert_map_path", num_slots: int | None = None,
             policy: str | None = None, num_groups: int = 1) -> Placement:
    """Read a placement file of any format :func:`eplb.formats.read_placement` knows; errors name
    ``what`` and the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what}: {p} does not exist (record one first with expert_map_record_path)")
    from eplb.formats import read_placement

    try:
        return read_placement(p, num_experts=num_experts, ep_size=num_ranks, num_nodes=num_nodes,
                              num_slots=num_slots, policy=policy, num_groups=num_groups)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _init_expert_location(spec: str, num_experts: int, num_ranks: int, num_nodes: int, layer_ids: Sequence[int],
                          cfg: BalancerConfig, what: str) -> Placement | None:
    """SGLang's ``--init-expert-location``: ``"trivial"``, a path (any map format, incl. SGLang ``.pt`` /
    ``.json``), or inline JSON with ``physical_to_logical_map`` or ``logical_count`` (planned with
    ``cfg.policy`` for ``cfg``'s slot count)."""
    s = spec.strip()
    if s == "trivial":
        return None
    S = cfg.resolve_num_slots(num_experts)
    opts = dict(cfg.policy_options)
    groups = int(opts.pop("num_groups", 1))
    if not s.startswith("{"):
        return read_map(s, num_experts=num_experts, num_ranks=num_ranks, num_nodes=num_nodes if num_nodes > 1 else None,
                        what=what, num_slots=S, policy=cfg.policy, num_groups=groups)
    try:
        data = json.loads(s)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: inline JSON is malformed ({exc})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected a mapping with physical_to_logical_map or logical_count")
    ids = tuple(int(i) for i in layer_ids)
    if "physical_to_logical_map" in data:
        arr = to_numpy(data["physical_to_logical_map"]).astype(np.int64)
        try:
            return Placement(arr, num_experts, num_ranks, num_nodes, ids if len(ids) == len(arr) else (),
                             {"source": "init_expert_location"})
        except PlacementError as exc:
            raise ConfigError(f"{what}: physical_to_logical_map: {exc}") from None
    if "logical_count" in data:
        counts = check_load(data["logical_count"], f"{what}: logical_count", ndim=(2, 3), num_experts=num_experts)
        from eplb.policies import plan

        return plan(counts, S, num_ranks, num_nodes=num_nodes, num_groups=groups, policy=cfg.policy,
                    layer_ids=ids, **opts)
    raise ConfigError(f"{what}: expected key 'physical_to_logical_map' or 'logical_count', got {sorted(data)}")


