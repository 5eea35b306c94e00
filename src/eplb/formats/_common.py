"""Shared pieces of the map-format readers and writers: parsing with precise errors, typed checks.

Every error is a :class:`MapFormatError` (a :class:`~eplb.placement.PlacementError`, hence a
``ValueError``) whose message starts with the file name and says exactly what is wrong.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplb import _safe_read as _safe
from eplb._safe_read import MAX_FILE_BYTES
from eplb.placement import PlacementError

__all__ = [
    "Decoded",
    "MapFormatError",
    "as_int",
    "as_int_list",
    "as_int_matrix",
    "dump_json",
    "load_pt",
    "parse_json",
    "parse_yaml",
    "read_bytes",
    "torch_bytes",
]

PathLike = str | os.PathLike[str]


class MapFormatError(PlacementError):
    """A map file is missing, unreadable or malformed; the message names the file and the problem."""


@dataclass
class Decoded:
    """What a reader found in a file, before sizes are inferred and the Placement is built.

    Attributes:
        phy2log: ``[L, S]`` expert of each slot (None for a load-only file, see ``loads``).
        layer_ids: model layer index of each row, or None when the rows are MoE-layer positions
            ``0..L-1`` (vllm-ascend's ``layer_id``, vLLM's MoE-layer axis).
        num_experts / ep_size / num_nodes: sizes the file records (None when it does not).
        meta: provenance and format-specific fields (e.g. TensorRT-LLM's ``layer_updates_per_iter``).
        loads: ``[T, L, E]`` or ``[L, E]`` token counts for formats that carry loads instead of a
            map (SGLang's ``logical_count``); the placement is then planned on read.
    """

    phy2log: np.ndarray | None
    layer_ids: tuple[int, ...] | None = None
    num_experts: int | None = None
    ep_size: int | None = None
    num_nodes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    loads: np.ndarray | None = None


def read_bytes(path: PathLike, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is a :class:`MapFormatError`."""
    return _safe.read_bytes(path, max_bytes=max_bytes, error=MapFormatError)


def parse_json(path: PathLike, data: bytes) -> Any:
    """Parse JSON (bounded depth); a truncated or malformed document names the line and column."""
    return _safe.parse_json(path, data, error=MapFormatError)


def parse_yaml(path: PathLike, data: bytes) -> Any:
    """Parse YAML (safe loader, bounded depth); errors name the line and column."""
    return _safe.parse_yaml(path, data, error=MapFormatError)


def load_pt(path: PathLike, data: bytes) -> Any:
    """Load a torch ``.pt`` file safely (``weights_only=True``) on the CPU."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, RuntimeError)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MapFormatError(f"{path}: not a readable torch .pt file (truncated or corrupt?): {msg}") from None


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` into bytes (so the caller can write them atomically)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


_INT_MAX = 2**31 - 1  # ids and sizes of maps: far below, and safe for every engine's int32 tensors


def _exact_float(v: Any) -> Any:
    if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer() and abs(v) <= 2**53:
        return int(v)
    return v


def as_int(value: Any, where: str, *, minimum: int | None = None, maximum: int = _INT_MAX) -> int:
    """``value`` as an int (no bools, no fractional or inexact floats, at most ``maximum``) or a
    MapFormatError naming ``where``."""
    value = _exact_float(value)
    if not _is_int(value):
        raise MapFormatError(f"{where}: expected an integer, got {str(value)[:60]!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise MapFormatError(f"{where}: expected an integer >= {minimum}, got {v}")
    if not -maximum - 1 <= v <= maximum:
        raise MapFormatError(f"{where}: {str(v)[:40]} is out of range (expected at most {maximum})")
    return v


def as_int_list(value: Any, where: str) -> list[int]:
    """A list of ints; names the first bad element."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise MapFormatError(f"{where}: expected a list of expert ids, got {type(value).__name__}")
    out = []
    for j, v in enumerate(value):
        v = _exact_float(v)
        if not _is_int(v):
            raise MapFormatError(f"{where}[{j}]: expected an integer expert id, got {str(v)[:60]!r}")
        if not -_INT_MAX - 1 <= int(v) <= _INT_MAX:
            raise MapFormatError(f"{where}[{j}]: expert id {str(int(v))[:40]} is out of range")
        out.append(int(v))
    return out


def as_int_matrix(value: Any, where: str) -> np.ndarray:
    """A rectangular ``[rows, cols]`` int64 matrix from nested lists, a numpy array or a torch tensor."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim != 2:
            raise MapFormatError(f"{where}: expected a [layers, slots] matrix, got shape {tuple(value.shape)}")
        if value.dtype.kind not in "iu":
            if value.dtype.kind == "f" and np.all(np.isfinite(value)) and np.all(value == np.round(value)) \
                    and np.all(np.abs(value) <= _INT_MAX):
                return value.astype(np.int64)
            raise MapFormatError(f"{where}: expected integer expert ids, got dtype {value.dtype}")
        if value.size and (int(value.max()) > _INT_MAX or int(value.min()) < -_INT_MAX - 1):
            bad = np.argwhere((value > _INT_MAX) | (value < -_INT_MAX - 1))[0].tolist() if value.dtype.kind == "i" \
                else np.argwhere(value > _INT_MAX)[0].tolist()
            raise MapFormatError(f"{where}: expert id {int(value[tuple(bad)])} at index {bad} is out of range")
        return value.astype(np.int64)
    if not isinstance(value, (list, tuple)) or not value:
        raise MapFormatError(f"{where}: expected a non-empty [layers, slots] list of lists")
    rows = [as_int_list(r, f"{where}[{i}]") for i, r in enumerate(value)]
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise MapFormatError(f"{where}: row {i} has {len(r)} slots, expected {width} (the length of row 0)")
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), width)


def _dump(obj: Any, indent: int, level: int) -> str:
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(obj, Mapping):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {_dump(v, indent, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in obj):
            return json.dumps(list(obj))  # scalars inline: one matrix row per line
        return "[\n" + ",\n".join(pad + _dump(v, indent, level + 1) for v in obj) + "\n" + end + "]"
    if isinstance(obj, np.generic):
        obj = obj.item()
    return json.dumps(obj)


def dump_json(obj: Any, indent: int = 2) -> bytes:
    """JSON with nested containers indented and lists of scalars on one line (one row per line)."""
    return (_dump(obj, indent, 0) + "\n").encode("utf-8")


def check_known_keys(path: PathLike, obj: Mapping[str, Any], known: Sequence[str], what: str) -> None:
    """Reject keys a format does not define (typos would otherwise be silently ignored)."""
    extra = [k for k in obj if k not in known]
    if extra:
        raise MapFormatError(f"{path}: unknown field(s) {extra} in {what}; expected only {list(known)}")
