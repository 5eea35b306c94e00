"""Engine map formats: read, write, detect and validate expert placements of every engine.

=============== ======================================================= ===============
name            file                                                    suffixes
=============== ======================================================= ===============
``trtllm``      TensorRT-LLM ``moe_load_balancer.yaml``                 .yaml .yml
``vllm-ascend`` vllm-ascend expert-map JSON (``expert_map_path``)        .json
``sglang``      SGLang ``--init-expert-location`` (mapping or counts)    .json .pt
``vllm``        vLLM ``EplbState`` maps (``physical_to_logical_map``)    .json .pt
``native``      eplb's Placement with provenance                        .json
=============== ======================================================= ===============

Every reader validates the whole file before returning (every expert served in every layer, ids
in range, equal slots per device, consistent layer ids) and raises :class:`MapFormatError`
(a ``ValueError``) naming the file and the exact problem, e.g. ``"map.json: layer 3: expert 17
has no slot"``. Every writer builds the whole file in memory and writes it atomically
(:func:`eplb.stats.trace.atomic_write`): an output is complete or absent.

What a format does not record is inferred or taken from the arguments: ``num_experts`` = max id
+ 1 unless given; ``ep_size`` from the file where it has one (TensorRT-LLM ``ep_size``,
vllm-ascend ``device_count``, native, vLLM), else it must be given.

Layer ids: TensorRT-LLM and native files key rows by model layer index; SGLang rows are model
layers ``0..num_hidden_layers-1``; vllm-ascend (``layer_id``) and vLLM rows are MoE-layer
positions ``0..L-1`` (our vLLM file also stores the model ids). ``read_placement(...,
layer_ids=...)`` selects those model layers (or, for positional files, labels the rows with them).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eplb._io import atomic_write
from eplb._safe_read import reading
from eplb.formats import native, sglang, trtllm, vllm, vllm_ascend
from eplb.formats._common import Decoded, MapFormatError, load_pt, parse_json, parse_yaml, read_bytes
from eplb.placement import Placement, PlacementError

__all__ = [
    "FORMATS",
    "EPSizeMissing",
    "FormatInfo",
    "MapFormatError",
    "UnknownMapFormat",
    "default_policy",
    "detect_map_format",
    "group_limited",
    "format_for_path",
    "read_placement",
    "write_placement",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class FormatInfo:
    """What a map format is and what it records.

    Attributes:
        name: the format's name (``--format``).
        description: one line.
        suffixes: file name suffixes it is written with (the first is the default).
        records_ep_size: the file says how many ranks it is for.
        layer_axis: ``"model"`` (rows keyed by model layer index) or ``"moe"`` (rows = MoE layer positions).
    """

    name: str
    description: str
    suffixes: tuple[str, ...]
    records_ep_size: bool
    layer_axis: str


FORMATS: dict[str, FormatInfo] = {
    "trtllm": FormatInfo("trtllm", "TensorRT-LLM moe_load_balancer.yaml (initial_global_assignments)",
                         (".yaml", ".yml"), True, "model"),
    "vllm-ascend": FormatInfo("vllm-ascend", "vllm-ascend expert-map JSON (expert_map_path / expert_map_record_path)",
                              (".json",), True, "moe"),
    "sglang": FormatInfo("sglang", "SGLang --init-expert-location (physical_to_logical_map, or logical_count)",
                         (".json", ".pt"), False, "model"),
    "vllm": FormatInfo("vllm", "vLLM EplbState maps (physical_to_logical_map [moe layers, physical])",
                       (".pt", ".json"), True, "moe"),
    "native": FormatInfo("native", "eplb placement JSON with provenance", (".json",), True, "model"),
}

TRACE_SUFFIXES = (".safetensors", ".npz", ".npy", ".csv")


def group_limited(num_groups: int, num_nodes: int) -> bool:
    """The layout of group-limited routing: expert groups that divide evenly over several nodes.

    Then the default policy keeps every group (and its replicas) on one node, as vLLM's and
    DeepSeek's default policies do, so a token routed to ``topk_group`` groups (DeepSeek-V3: 4) is
    sent to at most that many nodes. Spreading groups (``--policy eplb``) balances tokens better
    but breaks that node bound.
    """
    return int(num_groups) > 1 and int(num_nodes) > 1 and int(num_groups) % int(num_nodes) == 0


def default_policy(num_groups: int = 1, num_nodes: int = 1) -> str:
    """The best registered policy for the layout: ``"eplb-hierarchical"`` for a group-limited layout
    (:func:`group_limited`), else ``"eplb"``; ``"deepseek"`` when eplb's policies are not registered."""
    from eplb.policies import POLICIES

    if "eplb" not in POLICIES:
        return "deepseek"
    return "eplb-hierarchical" if group_limited(num_groups, num_nodes) and "eplb-hierarchical" in POLICIES else "eplb"


def _check_format_name(format: str) -> str:
    if format not in FORMATS:
        raise MapFormatError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return format


class UnknownMapFormat(MapFormatError):
    """The file parses, but its content matches none of the map formats."""


class EPSizeMissing(MapFormatError):
    """The map format does not record the EP size and none was given."""


def _detect_obj(path: Path, obj: Any) -> str:
    if hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        return "vllm"
    if isinstance(obj, dict):
        keys = set(obj)
        if obj.get("format") == "eplb.placement":
            return "native"
        if keys & {"layer_list", "moe_layer_count"}:
            return "vllm-ascend"
        if "physical_to_logical_map" in keys and keys & {"logical_to_physical_map", "logical_replica_count",
                                                           "num_logical_experts", "layer_ids", "ep_size"}:
            return "vllm"
        if keys & {"physical_to_logical_map", "logical_count"}:
            return "sglang"
        if keys & {"initial_global_assignments", "num_slots", "moe_config"}:
            return "trtllm"
        shown = sorted(str(k) for k in keys)[:8]
        raise UnknownMapFormat(
            f"{path}: unknown map format: keys {shown} match none of {', '.join(FORMATS)} "
            "(expected e.g. initial_global_assignments, layer_list, physical_to_logical_map, logical_count, "
            "or format: eplb.placement)"
        )
    raise UnknownMapFormat(f"{path}: unknown map format: top level is a {type(obj).__name__}, expected a mapping")


def _parse(path: Path, data: bytes) -> tuple[str, Any]:
    """(detected format, parsed object) of a map file."""
    suffix = path.suffix.lower()
    if suffix in TRACE_SUFFIXES:
        raise MapFormatError(
            f"{path}: a {suffix} file is a load trace, not a placement map (plan one with `eplb plan {path} ...`)"
        )
    if suffix in (".yaml", ".yml"):
        return "trtllm", parse_yaml(path, data)
    if suffix == ".pt" or data[:4] == b"PK\x03\x04":
        obj = load_pt(path, data)
        return _detect_obj(path, obj), obj
    head = data.lstrip()[:1]
    if suffix == ".json" or head in (b"{", b"["):
        obj = parse_json(path, data)
        return _detect_obj(path, obj), obj
    obj = parse_yaml(path, data)  # no telling suffix: YAML is a superset of JSON
    return _detect_obj(path, obj), obj


def detect_map_format(path: PathLike) -> str:
    """The map format of an existing file, from its suffix and content.

    Raises :class:`MapFormatError` for a missing, empty, truncated or unrecognised file.
    """
    p = Path(path)
    with reading(p, MapFormatError):
        return _parse(p, read_bytes(p))[0]


def format_for_path(path: PathLike, format: str | None = None) -> str:
    """The format to write ``path`` in: ``format`` if given (checked against the suffix), else from the suffix.

    Only ``.yaml``/``.yml`` (TensorRT-LLM) is unambiguous; ``.json`` and ``.pt`` need ``format``.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if format is not None:
        info = FORMATS[_check_format_name(format)]
        if suffix not in info.suffixes:
            raise MapFormatError(
                f"{p}: the {format} format is written as {' or '.join(info.suffixes)}, not {suffix or 'a file without suffix'}"
            )
        return format
    candidates = [name for name, info in FORMATS.items() if suffix in info.suffixes]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise MapFormatError(
            f"{p}: cannot tell the map format from the suffix {suffix or '(none)'}; pass a format "
            f"(one of {', '.join(FORMATS)})"
        )
    raise MapFormatError(
        f"{p}: {suffix} is used by several formats ({', '.join(candidates)}); pass the format (--format)"
    )


def _decode(p: Path, fmt: str, data: bytes) -> Decoded:
    if fmt == "trtllm":
        return trtllm.decode(p, data)
    if fmt == "vllm-ascend":
        return vllm_ascend.decode(p, data)
    _, obj = _parse(p, data)
    decoders: dict[str, Callable[[str, Any], Decoded]] = {
        "sglang": sglang.decode_obj, "vllm": vllm.decode_obj, "native": native.decode_obj,
    }
    return decoders[fmt](str(p), obj)


def _same(path: Path, name: str, recorded: int | None, given: int | None) -> int | None:
    if recorded is not None and given is not None and recorded != given:
        raise MapFormatError(f"{path}: {name} is {recorded} in the file, expected {given}")
    return recorded if recorded is not None else given


def _plan_loads(p: Path, d: Decoded, num_experts: int | None, ep_size: int | None, num_nodes: int | None,
                num_slots: int | None, policy: str | None, num_groups: int) -> Placement:
    from eplb.policies import plan

    assert d.loads is not None
    E = d.loads.shape[-1]
    _same(p, "num_experts", E, num_experts)
    if ep_size is None:
        raise EPSizeMissing(f"{p}: holds load counts (logical_count), not a map; planning needs the EP size (ep_size= / --ep-size)")
    pol = policy or default_policy(num_groups, int(num_nodes or 1))
    S = int(num_slots) if num_slots is not None else E
    try:
        pl = plan(d.loads, S, int(ep_size), num_nodes=int(num_nodes or 1), num_groups=int(num_groups), policy=pol,
                  layer_ids=d.layer_ids or (), meta={"planned_from": str(p), **d.meta})
    except ValueError as exc:
        raise MapFormatError(f"{p}: planning from logical_count failed: {exc}") from None
    return pl


def read_placement(
    path: PathLike,
    format: str | None = None,
    *,
    num_experts: int | None = None,
    ep_size: int | None = None,
    num_nodes: int | None = None,
    layer_ids: Sequence[int] | None = None,
    num_slots: int | None = None,
    policy: str | None = None,
    num_groups: int = 1,
) -> Placement:
    """Read and validate a map file of any format.

    Args:
        path: the file.
        format: one of :data:`FORMATS` (default: detected from suffix and content).
        num_experts: ``E``; checked against the file (default: recorded, else max expert id + 1).
        ep_size: ranks; checked against the file where it records one, required where it does not.
        num_nodes: nodes (divides ``ep_size``; default: recorded, else 1).
        layer_ids: model layer ids wanted: rows keyed by model layer are selected (missing ones are
            an error); positional files (vllm-ascend, vLLM without ids) get their rows labelled.
        num_slots, policy, num_groups: only for SGLang's ``logical_count`` form, which is planned on
            read (default ``num_slots = E``, the best registered policy).

    Returns:
        A validated :class:`Placement`; ``meta`` holds the file's provenance, ``source_format`` and
        ``layer_ids_positional`` (True when the rows are MoE-layer positions ``0..L-1``, not model ids).
    """
    p = Path(path)
    with reading(p, MapFormatError):
        return _read_placement(p, format, num_experts=num_experts, ep_size=ep_size, num_nodes=num_nodes,
                               layer_ids=layer_ids, num_slots=num_slots, policy=policy, num_groups=num_groups)


def _read_placement(p: Path, format: str | None, *, num_experts: int | None, ep_size: int | None,
                    num_nodes: int | None, layer_ids: Sequence[int] | None, num_slots: int | None,
                    policy: str | None, num_groups: int) -> Placement:
    data = read_bytes(p)
    fmt = _check_format_name(format) if format is not None else _parse(p, data)[0]
    d = _decode(p, fmt, data)
    if d.loads is not None:
        pl = _plan_loads(p, d, num_experts, ep_size, num_nodes, num_slots, policy, num_groups)
    else:
        assert d.phy2log is not None
        E = _same(p, "num_experts", d.num_experts, num_experts)
        if E is None:
            E = int(d.phy2log.max()) + 1 if d.phy2log.size else 0
            if E <= 0:
                raise MapFormatError(f"{p}: no expert ids >= 0 in the map")
            if E > d.phy2log.shape[1]:
                i, s = (int(v) for v in np.argwhere(d.phy2log == E - 1)[0])
                lid = d.layer_ids[i] if d.layer_ids is not None else (
                    int(layer_ids[i]) if layer_ids is not None and len(layer_ids) == d.phy2log.shape[0] else i)
                raise MapFormatError(
                    f"{p}: layer {lid}: slot {s} holds expert {E - 1}, but {d.phy2log.shape[1]} slots per layer can "
                    f"serve at most {d.phy2log.shape[1]} experts (pass num_experts / --num-experts to check ids)"
                )
        R = _same(p, "ep_size", d.ep_size, ep_size)
        if R is None:
            raise EPSizeMissing(f"{p}: the file does not record the EP size; pass it (ep_size= / --ep-size)")
        N = _same(p, "num_nodes", d.num_nodes, num_nodes) or 1
        S = d.phy2log.shape[1]
        if S % R:
            raise MapFormatError(f"{p}: {S} slots per layer are not divisible by ep_size={R} "
                                 "(every device needs the same number of slots)")
        labels = d.layer_ids or ()
        if d.layer_ids is None and layer_ids is not None and len(layer_ids) == d.phy2log.shape[0]:
            labels = tuple(int(i) for i in layer_ids)  # positional rows: errors name the model layer
        try:
            pl = Placement(d.phy2log, E, R, N, labels, {**d.meta})
        except PlacementError as exc:  # "phy2log" is our name for the file's map: drop it
            raise MapFormatError(f"{p}: {str(exc).removeprefix('phy2log: ')}") from None
        if fmt == "native":
            native.check_digest(str(p), pl)
    if layer_ids is not None:
        try:
            pl = pl.for_layers(layer_ids, positional=d.layer_ids is None, what=str(p))
        except PlacementError as exc:
            raise MapFormatError(str(exc)) from None
    positional = d.layer_ids is None and layer_ids is None
    if pl.meta.get("source_format") != fmt or bool(pl.meta.get("layer_ids_positional")) != positional:
        pl = pl.with_meta(source_format=fmt, layer_ids_positional=positional)
    return pl


def encode_placement(placement: Placement, format: str, *, container: str = "json", **opts: Any) -> bytes:
    """The bytes of ``placement`` in ``format`` (``container`` = ``"json"`` or ``"pt"`` for sglang / vllm)."""
    encoders: dict[str, Callable[..., bytes]] = {
        "trtllm": trtllm.encode, "vllm-ascend": vllm_ascend.encode, "sglang": sglang.encode,
        "vllm": vllm.encode, "native": native.encode,
    }
    fn = encoders[_check_format_name(format)]
    if format in ("sglang", "vllm"):
        opts["container"] = container
    params = inspect.signature(fn).parameters
    unknown = [k for k in opts if k not in params]
    if unknown:
        accepted = [k for k in params if k not in ("placement", "container")]
        raise MapFormatError(f"{format}: unknown option(s) {unknown}; accepted: {accepted or 'none'}")
    return fn(placement, **opts)


def write_placement(placement: Placement, path: PathLike, format: str | None = None, **opts: Any) -> str:
    """Write ``placement`` to ``path`` atomically; returns the format written.

    Args:
        format: one of :data:`FORMATS`; default from the suffix (only ``.yaml``/``.yml`` is unambiguous).
        opts: format options: trtllm ``layer_updates_per_iter``, ``with_ep_size``; sglang ``num_layers``
            (pad to the model's layer count). ``.pt`` or ``.json`` picks the container of sglang / vllm.
    """
    if not isinstance(placement, Placement):
        raise MapFormatError(f"placement: expected an eplb.Placement, got {type(placement).__name__}")
    p = Path(path)
    fmt = format_for_path(p, format)
    container = "pt" if p.suffix.lower() == ".pt" else "json"
    data = encode_placement(placement, fmt, container=container, **opts)
    atomic_write(p, data)
    return fmt
