"""The simulator's cost model: MoE layer time from per-rank token counts.

A :class:`CostModel` is plain data (loaded from / saved to JSON) with the device it was
measured on, the date and the source of its numbers. For one MoE layer of one step::

    layer_ms = dispatch_ms + max_r compute_ms(tokens_r, slots_per_rank) + combine_ms + other_ms_per_layer
    dispatch_ms = combine_ms = a2a_latency_ms + max_r(bytes crossing links into rank r) / bandwidth
    step_ms  = sum over MoE layers of layer_ms (+ exposed migration time, see below)

* ``tokens_r`` is the number of (token, expert) pairs rank ``r`` computes (its rank load);
* compute time comes from a measured table (``kind: "table"``: time vs tokens per rank, one row
  per slots-per-rank value, made non-decreasing in tokens, piecewise-linear in tokens, linear
  beyond the last point, clamped below the first) or from a roofline (``kind: "roofline"``: ``fixed + max(ms_per_slot*spr,
  ms_per_token*tokens)``);
* all-to-all: tokens are assumed to come uniformly from all ranks (data-parallel attention), so
  rank ``r`` receives ``tokens_r * (R/N - 1)/R`` pairs over intra-node links and
  ``tokens_r * (R - R/N)/R`` over inter-node links, each ``hidden_size * dtype_bytes`` bytes; the
  two link kinds run in parallel; the combine all-to-all moves the same bytes back;
* migration: one expert's weights are ``3 * hidden * intermediate * dtype_bytes`` bytes (``weight_format
  "fp8-block"``: 1 byte per weight plus a float32 scale per ``weight_block x weight_block`` block of
  ``w13 [2I, H]`` and ``w2 [H, I]``, the DeepSeek-V3 layout -- 44,050,944 bytes for a DeepSeek-V3
  expert against 88,080,384 in bf16; activations keep ``dtype_bytes``); a
  rebalance's time is the largest number of expert copies any rank receives times that size over
  the point-to-point bandwidth (plus a latency); ``migration_exposed`` (0-1) of it is added to the
  step time of the step in which it is committed (1 = fully on the critical path, 0 = hidden).

Units: milliseconds, bytes, GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CostModel",
    "CostModelError",
    "default_cost_model",
    "load_cost_model",
    "reference_cost_model",
]

_FORMAT = "eplb.cost_model"
WEIGHT_FORMATS = ("dense", "fp8-block")


class CostModelError(ValueError):
    """A cost-model file or dict is malformed; the message names the source and field."""


@dataclass(frozen=True)
class CostModel:
    """Parameters of the simulator's time model (see the module docstring for the formulas).

    Attributes:
        device: the hardware the numbers were measured on (e.g. ``"2x NVIDIA H200, NVLink"``).
        date: measurement date (ISO ``YYYY-MM-DD``).
        source: where the numbers come from (benchmark file, reference document, "user").
        hidden_size: model hidden size (elements per token on the wire).
        moe_intermediate_size: expert intermediate size (an expert is ``3*hidden*intermediate`` weights).
        dtype_bytes: bytes per element of activations (and of expert weights when ``weight_format`` is dense).
        weight_format: ``"dense"`` (weights in ``dtype_bytes``) or ``"fp8-block"`` (FP8 weights with float32
            block scales, the layout of :mod:`eplb.runtime.fp8`).
        weight_block: scale block edge of ``"fp8-block"`` weights (128 for DeepSeek-V3).
        compute_kind: ``"table"`` or ``"roofline"``.
        compute_slots_per_rank: table rows: slots per rank of each measured row (ascending).
        compute_tokens: table columns: (token, expert) pairs per rank (ascending, > 0).
        compute_time_ms: ``[rows, cols]`` measured expert-compute time in ms.
        roofline_fixed_ms, roofline_ms_per_slot, roofline_ms_per_token: roofline parameters.
        a2a_latency_ms: fixed cost of one all-to-all.
        intra_node_gbps: effective all-to-all bandwidth into one rank over intra-node links (GB/s).
        inter_node_gbps: the same over inter-node links (GB/s).
        p2p_gbps: point-to-point bandwidth for expert-weight migration (GB/s, per direction).
        migration_latency_ms: fixed cost of one migration (per rebalance event).
        migration_exposed: fraction (0-1) of migration time added to the step that commits it.
        other_ms_per_layer: fixed non-MoE time per MoE layer (attention etc.; 0 = MoE only).
        notes: free-text provenance of each parameter.
    """

    device: str
    date: str
    source: str
    hidden_size: int = 7168
    moe_intermediate_size: int = 2048
    dtype_bytes: int = 2
    weight_format: str = "dense"
    weight_block: int = 128
    compute_kind: str = "table"
    compute_slots_per_rank: tuple[int, ...] = (8,)
    compute_tokens: tuple[float, ...] = (256.0, 2048.0, 8192.0, 32768.0)
    compute_time_ms: tuple[tuple[float, ...], ...] = ((0.307, 0.356, 1.100, 4.559),)
    roofline_fixed_ms: float = 0.0
    roofline_ms_per_slot: float = 0.0
    roofline_ms_per_token: float = 0.0
    a2a_latency_ms: float = 0.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 50.0
    p2p_gbps: float = 190.0
    migration_latency_ms: float = 0.0
    migration_exposed: float = 1.0
    other_ms_per_layer: float = 0.0
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self, source: str = "cost model") -> CostModel:
        """Raise :class:`CostModelError` naming the first bad field; returns ``self``."""
        if self.weight_format not in WEIGHT_FORMATS:
            raise CostModelError(f"{source}: field 'weight_format' must be one of {list(WEIGHT_FORMATS)}, got "
                                 f"{self.weight_format!r}")
        for name in ("hidden_size", "moe_intermediate_size", "dtype_bytes", "weight_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise CostModelError(f"{source}: field '{name}' must be a positive integer, got {v!r}")
        for name in ("roofline_fixed_ms", "roofline_ms_per_slot", "roofline_ms_per_token", "a2a_latency_ms",
                     "migration_latency_ms", "other_ms_per_layer"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise CostModelError(f"{source}: field '{name}' must be a finite number >= 0, got {v!r}")
        for name in ("intra_node_gbps", "inter_node_gbps", "p2p_gbps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise CostModelError(f"{source}: field '{name}' must be a bandwidth > 0 (GB/s), got {v!r}")
        if not 0.0 <= float(self.migration_exposed) <= 1.0:
            raise CostModelError(f"{source}: field 'migration_exposed' must lie in [0, 1], got {self.migration_exposed!r}")
        if self.compute_kind == "roofline":
            if self.roofline_ms_per_token <= 0:
                raise CostModelError(f"{source}: roofline compute needs 'ms_per_token' > 0")
        elif self.compute_kind == "table":
            spr = np.asarray(self.compute_slots_per_rank, dtype=np.float64)
            tok = np.asarray(self.compute_tokens, dtype=np.float64)
            tms = np.asarray(self.compute_time_ms, dtype=np.float64)
            if spr.ndim != 1 or spr.size == 0 or np.any(spr <= 0) or np.any(np.diff(spr) <= 0):
                raise CostModelError(f"{source}: compute 'slots_per_rank' must be a non-empty ascending list of "
                                     f"positive integers, got {list(self.compute_slots_per_rank)}")
            if tok.ndim != 1 or tok.size < 2 or np.any(tok <= 0) or np.any(np.diff(tok) <= 0):
                raise CostModelError(f"{source}: compute 'tokens_per_rank' must be an ascending list of at least 2 "
                                     f"positive numbers, got {list(self.compute_tokens)}")
            if tms.shape != (spr.size, tok.size):
                raise CostModelError(f"{source}: compute 'time_ms' must be [{spr.size} rows (slots_per_rank), "
                                     f"{tok.size} columns (tokens)], got shape {list(tms.shape)}")
            if not np.all(np.isfinite(tms)) or np.any(tms < 0):
                raise CostModelError(f"{source}: compute 'time_ms' must be finite and >= 0")
        else:
            raise CostModelError(f"{source}: compute 'kind' must be 'table' or 'roofline', got {self.compute_kind!r}")
        return self

    # ------------------------------------------------------------------ sizes
    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire."""
        return self.hidden_size * self.dtype_bytes

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate, up and down projections; FP8: plus their block scales)."""
        H, inter = self.hidden_size, self.moe_intermediate_size
        if self.weight_format == "fp8-block":
            b = self.weight_block
            blocks = -(-2 * inter // b) * -(-H // b) + -(-H // b) * -(-inter // b)
            return 3 * H * inter + 4 * blocks
        return 3 * H * inter * self.dtype_bytes

    # ------------------------------------------------------------- functions
    def compute_curve(self, slots_per_rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Breakpoints ``(tokens, ms)`` of the compute time of a rank with ``slots_per_rank`` slots.

        Table rows are used as measured, made non-decreasing in tokens (running maximum: a rank
        never gets faster with more tokens; measured dips are timing noise); between two rows the
        times are interpolated linearly in slots per rank; outside the measured rows, a row is scaled as ``spr`` experts at the
        same tokens per expert: ``t(spr, n) = spr/s0 * t_s0(n * s0/spr)``.
        A roofline is returned as its exact piecewise-linear breakpoints.
        """
        spr = int(slots_per_rank)
        if spr <= 0:
            raise ValueError(f"slots_per_rank: expected a positive integer, got {slots_per_rank}")
        if self.compute_kind == "roofline":
            floor = self.roofline_ms_per_slot * spr
            knee = floor / self.roofline_ms_per_token
            pts = np.array([0.0, knee, knee + 1.0]) if knee > 0 else np.array([0.0, 1.0])
            return pts, self.roofline_fixed_ms + np.maximum(floor, self.roofline_ms_per_token * pts)
        rows = np.asarray(self.compute_slots_per_rank, dtype=np.float64)
        tok = np.asarray(self.compute_tokens, dtype=np.float64)
        tms = np.asarray(self.compute_time_ms, dtype=np.float64)
        tms = np.maximum.accumulate(tms, axis=1)  # non-decreasing in tokens: measured dips are timing noise
        hit = np.nonzero(rows == spr)[0]
        if hit.size:
            return tok.copy(), tms[hit[0]].copy()
        if spr < rows[0] or spr > rows[-1]:
            i = 0 if spr < rows[0] else rows.size - 1
            scale = spr / rows[i]
            return tok * scale, tms[i] * scale
        j = int(np.searchsorted(rows, spr))
        w = (spr - rows[j - 1]) / (rows[j] - rows[j - 1])
        return tok.copy(), (1 - w) * tms[j - 1] + w * tms[j]

    def compute_ms(self, tokens: Any, slots_per_rank: int) -> np.ndarray:
        """Expert-compute time (ms) of ranks holding ``tokens`` (token, expert) pairs; any shape.

        Piecewise-linear through the curve's breakpoints, clamped below the first point (a rank
        always reads its weights), extrapolated linearly beyond the last one.
        """
        x = np.asarray(tokens, dtype=np.float64)
        bx, by = self.compute_curve(slots_per_rank)
        out = np.interp(x, bx, by)
        slope = (by[-1] - by[-2]) / (bx[-1] - bx[-2])
        over = x > bx[-1]
        if np.any(over):
            out = np.where(over, by[-1] + slope * (x - bx[-1]), out)
        return out

    def compute_is_monotone(self, slots_per_rank: int) -> bool:
        """True when compute time never decreases with tokens (then ``max`` commutes with it)."""
        bx, by = self.compute_curve(slots_per_rank)
        return bool(np.all(np.diff(by) >= 0))

    def a2a_ms(self, max_tokens: Any, num_ranks: int, num_nodes: int = 1) -> np.ndarray:
        """Time (ms) of ONE all-to-all whose busiest rank receives ``max_tokens`` pairs; any shape.

        With ``R`` ranks over ``N`` nodes and tokens coming uniformly from every rank, the
        busiest rank receives ``(R/N - 1)/R`` of its pairs from node peers and ``(R - R/N)/R``
        from other nodes; the two link kinds run in parallel. One rank: no communication.
        """
        R, N = int(num_ranks), int(num_nodes)
        x = np.asarray(max_tokens, dtype=np.float64)
        if R == 1:
            return np.zeros_like(x)
        rpn = R // N
        intra = x * (rpn - 1) / R * self.token_bytes / (self.intra_node_gbps * 1e6)  # bytes / (GB/s) -> ms
        inter = x * (R - rpn) / R * self.token_bytes / (self.inter_node_gbps * 1e6)
        return self.a2a_latency_ms + np.maximum(intra, inter)

    def migration_ms(self, max_copies_per_rank: Any) -> np.ndarray:
        """Time (ms) of a migration whose busiest receiving rank gets ``max_copies_per_rank`` experts."""
        x = np.asarray(max_copies_per_rank, dtype=np.float64)
        t = x * self.expert_bytes / (self.p2p_gbps * 1e6)
        return np.where(x > 0, self.migration_latency_ms + t, 0.0)

    # -------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see :func:`load_cost_model` for the schema)."""
        d = asdict(self)
        compute: dict[str, Any] = {"kind": self.compute_kind}
        if self.compute_kind == "table":
            compute.update(slots_per_rank=list(self.compute_slots_per_rank), tokens_per_rank=list(self.compute_tokens),
                           time_ms=[list(r) for r in self.compute_time_ms])
        else:
            compute.update(fixed_ms=self.roofline_fixed_ms, ms_per_slot=self.roofline_ms_per_slot,
                           ms_per_token=self.roofline_ms_per_token)
        return {
            "format": _FORMAT, "version": 1, "device": self.device, "date": self.date, "source": self.source,
            "shape": {"hidden_size": self.hidden_size, "moe_intermediate_size": self.moe_intermediate_size,
                      "dtype_bytes": self.dtype_bytes, "weight_format": self.weight_format,
                      "weight_block": self.weight_block},
            "compute": compute,
            "all_to_all": {"latency_ms": self.a2a_latency_ms, "intra_node_gbps": self.intra_node_gbps,
                           "inter_node_gbps": self.inter_node_gbps},
            "migration": {"p2p_gbps": self.p2p_gbps, "latency_ms": self.migration_latency_ms,
                          "exposed": self.migration_exposed},
            "other_ms_per_layer": self.other_ms_per_layer,
            "notes": dict(d["notes"]),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON form atomically."""
        from eplb.stats.trace import atomic_write

        atomic_write(path, self.to_json().encode())

    def with_(self, **changes: Any) -> CostModel:
        """A copy with fields replaced (validated)."""
        return replace(self, **changes)


# ------------------------------------------------------------------------ expert size
#: Public config values (hidden_size, expert intermediate size) of models whose traces eplb meets,
#: matched by a case-insensitive substring of the trace's model name (longest match wins).
MODEL_SHAPES: dict[str, tuple[int, int]] = {
    "deepseek-v3": (7168, 2048), "deepseek-r1": (7168, 2048), "deepseek-v2-lite": (2048, 1408),
    "esft-vanilla-lite": (2048, 1408), "deepseek-v2": (5120, 1536), "qwen3-30b-a3b": (2048, 768),
    "qwen3-235b-a22b": (4096, 1536), "llama-4-maverick": (5120, 8192), "llama-4-scout": (5120, 8192),
    "mixtral-8x7b": (4096, 14336), "mixtral-8x22b": (6144, 16384), "olmoe-1b-7b": (2048, 1024),
}
SHAPE_KEYS = ("hidden_size", "moe_intermediate_size", "dtype_bytes")


def expert_shape(model: str = "", meta: Mapping[str, Any] | None = None, **given: int | None) -> tuple[dict[str, int], str]:
    """``({hidden_size, moe_intermediate_size, dtype_bytes} to apply, where they came from)``.

    First the values given (``--hidden-size`` ...), then the trace's ``meta`` (``eplb record``
    stores the model's), then :data:`MODEL_SHAPES` by model name; what none of them knows stays the
    cost model's (an empty dict: the cost model's shape, DeepSeek-V3's by default).
    """
    out: dict[str, int] = {}
    where: list[str] = []
    for k in SHAPE_KEYS:
        v = given.get(k)
        if v is not None:
            if int(v) <= 0:
                raise ValueError(f"{k.replace('_', '-')}: expected a positive integer, got {v}")
            out[k] = int(v)
    if out:
        where.append("options")
    m = dict(meta or {})
    from_meta = {k: int(m[k]) for k in SHAPE_KEYS if k not in out and isinstance(m.get(k), int) and m[k] > 0}
    if from_meta:
        out.update(from_meta)
        where.append("trace metadata")
    name = (model or "").lower()
    hits = [key for key in MODEL_SHAPES if key in name]
    if hits and ("hidden_size" not in out or "moe_intermediate_size" not in out):
        h, i = MODEL_SHAPES[max(hits, key=len)]
        out.setdefault("hidden_size", h)
        out.setdefault("moe_intermediate_size", i)
        where.append(f"the public config of {model}")
    return out, ", ".join(where)


# ---------------------------------------------------------------------------- loading
def _num(d: Mapping[str, Any], key: str, source: str, default: Any = None) -> Any:
    if key not in d:
        if default is None:
            raise CostModelError(f"{source}: missing field '{key}'")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CostModelError(f"{source}: field '{key}' must be a number, got {v!r}")
    return v


def _from_dict(d: Mapping[str, Any], source: str, base: CostModel | None) -> CostModel:
    if not isinstance(d, Mapping):
        raise CostModelError(f"{source}: expected a JSON object, got {type(d).__name__}")
    fmt = d.get("format", _FORMAT)
    if fmt != _FORMAT:
        raise CostModelError(f"{source}: field 'format' is {fmt!r}, expected {_FORMAT!r}")
    b = base
    kw: dict[str, Any] = {}
    for key in ("device", "date", "source"):
        if key not in d:
            raise CostModelError(f"{source}: missing field '{key}' (every cost model names its device, date and source)")
        if not isinstance(d[key], str) or not d[key].strip():
            raise CostModelError(f"{source}: field '{key}' must be a non-empty string")
        kw[key] = d[key]
    shape = d.get("shape", {})
    if not isinstance(shape, Mapping):
        raise CostModelError(f"{source}: field 'shape' must be an object")
    for key in ("hidden_size", "moe_intermediate_size", "dtype_bytes", "weight_format", "weight_block"):
        if key in shape:
            kw[key] = shape[key]
    comp = d.get("compute")
    if comp is not None:
        if not isinstance(comp, Mapping):
            raise CostModelError(f"{source}: field 'compute' must be an object")
        kind = comp.get("kind", "table")
        kw["compute_kind"] = kind
        if kind == "table":
            rows = comp.get("slots_per_rank")
            if rows is None:
                raise CostModelError(f"{source}: compute: missing field 'slots_per_rank'")
            rows = [rows] if isinstance(rows, (int, float)) else list(rows)
            times = comp.get("time_ms")
            if times is None:
                raise CostModelError(f"{source}: compute: missing field 'time_ms'")
            try:
                tarr = np.asarray(times, dtype=np.float64)
            except (TypeError, ValueError):
                raise CostModelError(f"{source}: compute: field 'time_ms' must be a numeric [rows, tokens] list") from None
            if tarr.ndim == 1:
                tarr = tarr[None]
            if "tokens_per_rank" in comp:
                tok = np.asarray(comp["tokens_per_rank"], dtype=np.float64)
            elif "tokens_per_slot" in comp:
                # a grid in tokens per slot: rows share the columns only after scaling by slots per rank, so
                # resample every row on the union of token counts (piecewise-linear in tokens).
                tps = np.asarray(comp["tokens_per_slot"], dtype=np.float64)
                if tps.ndim != 1 or tarr.shape != (len(rows), tps.size):
                    raise CostModelError(f"{source}: compute: 'time_ms' must be [{len(rows)}, {tps.size}] for "
                                         f"'tokens_per_slot', got {list(tarr.shape)}")
                per_row = [tps * float(s) for s in rows]
                tok = np.unique(np.concatenate(per_row))
                tarr = np.stack([_interp_extrap(tok, x, y) for x, y in zip(per_row, tarr, strict=True)])
            else:
                raise CostModelError(f"{source}: compute: missing field 'tokens_per_rank' (or 'tokens_per_slot')")
            kw["compute_slots_per_rank"] = tuple(int(r) for r in rows)
            kw["compute_tokens"] = tuple(float(t) for t in np.atleast_1d(tok))
            kw["compute_time_ms"] = tuple(tuple(float(v) for v in r) for r in tarr)
        elif kind == "roofline":
            kw["roofline_fixed_ms"] = float(_num(comp, "fixed_ms", f"{source}: compute", 0.0))
            kw["roofline_ms_per_slot"] = float(_num(comp, "ms_per_slot", f"{source}: compute", 0.0))
            kw["roofline_ms_per_token"] = float(_num(comp, "ms_per_token", f"{source}: compute"))
        else:
            raise CostModelError(f"{source}: compute 'kind' must be 'table' or 'roofline', got {kind!r}")
    elif b is None:
        raise CostModelError(f"{source}: missing field 'compute'")
    for sect, mapping in (("all_to_all", {"latency_ms": "a2a_latency_ms", "intra_node_gbps": "intra_node_gbps",
                                          "inter_node_gbps": "inter_node_gbps"}),
                          ("migration", {"p2p_gbps": "p2p_gbps", "latency_ms": "migration_latency_ms",
                                         "exposed": "migration_exposed"})):
        sec = d.get(sect, {})
        if not isinstance(sec, Mapping):
            raise CostModelError(f"{source}: field '{sect}' must be an object")
        for k, attr in mapping.items():
            if k in sec:
                kw[attr] = float(_num(sec, k, f"{source}: {sect}"))
    if "other_ms_per_layer" in d:
        kw["other_ms_per_layer"] = float(_num(d, "other_ms_per_layer", source))
    if "notes" in d:
        if not isinstance(d["notes"], Mapping):
            raise CostModelError(f"{source}: field 'notes' must be an object")
        kw["notes"] = {str(k): str(v) for k, v in d["notes"].items()}
    if b is not None:
        notes = dict(kw.get("notes", {}))
        for sect in ("shape", "compute", "all_to_all", "migration"):
            if sect not in d:
                why = f" -- {b.notes[sect]}" if sect in b.notes else ""
                notes[sect] = f"not in {source}; taken from the base cost model ({b.device}, {b.date}; {b.source}){why}"
        kw["notes"] = notes
    try:
        if b is None:
            return CostModel(**kw).validate(source)
        return replace(b, **kw).validate(source)
    except CostModelError as exc:
        msg = str(exc)
        raise CostModelError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except TypeError as exc:
        raise CostModelError(f"{source}: {exc}") from None


def _interp_extrap(xq: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.interp(xq, x, y)
    if x.size >= 2:
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        out = np.where(xq > x[-1], y[-1] + slope * (xq - x[-1]), out)
    return out


def load_cost_model(path_or_dict: str | os.PathLike[str] | Mapping[str, Any], *,
                    base: CostModel | None = None) -> CostModel:
    """Read a cost model from a JSON file (or an already parsed dict).

    Schema (``format: "eplb.cost_model"``)::

        {"device": str, "date": "YYYY-MM-DD", "source": str,
         "shape": {"hidden_size": int, "moe_intermediate_size": int, "dtype_bytes": int,
                   "weight_format": "dense" | "fp8-block", "weight_block": int},    # the last two optional
         "compute": {"kind": "table", "slots_per_rank": [int], "tokens_per_rank": [float],   # or "tokens_per_slot"
                     "time_ms": [[float]]}                                                  # [rows, tokens]
                  | {"kind": "roofline", "fixed_ms": f, "ms_per_slot": f, "ms_per_token": f},
         "all_to_all": {"latency_ms": f, "intra_node_gbps": f, "inter_node_gbps": f},
         "migration": {"p2p_gbps": f, "latency_ms": f, "exposed": 0..1},
         "other_ms_per_layer": f, "notes": {field: text}}

    With ``base``, missing sections are taken from ``base`` (e.g. a compute-only measurement
    completed with the reference all-to-all figures; ``notes`` says which); without it, ``compute``
    is required and other sections use the dataclass defaults. ``device``, ``date`` and ``source``
    are always required.
    """
    if isinstance(path_or_dict, Mapping):
        return _from_dict(path_or_dict, "cost model", base)
    p = Path(path_or_dict)
    if not p.is_file():
        raise CostModelError(f"{p}: no such cost-model file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CostModelError(f"{p}: not valid JSON ({exc})") from None
    return _from_dict(d, str(p), base)


def reference_cost_model() -> CostModel:
    """The cost model calibrated from ``reference/gpu.md`` (2x H200, NVLink; see the JSON's notes)."""
    ref = resources.files("eplb.sim") / "cost_models" / "reference_gpu_md_2xh200.json"
    with resources.as_file(ref) as path:
        return load_cost_model(path)


def _measured_files() -> list[Path]:
    """Measured cost models written by the runtime benchmark (``eplb/data/cost_model_*.json``)."""
    root = resources.files("eplb") / "data"
    try:
        names = sorted(p.name for p in root.iterdir() if p.name.startswith("cost_model_") and p.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n in names:
        with resources.as_file(root / n) as path:
            out.append(Path(path))
    return out


def default_cost_model() -> CostModel:
    """The default: the runtime benchmark's measured model when one ships, else the reference one.

    A measured file may hold only some sections (e.g. compute from the one-GPU benchmark); the
    rest is completed from :func:`reference_cost_model` and said so in ``notes``. With several
    measured files, the one with the newest ``date`` wins.
    """
    ref = reference_cost_model()
    models = [load_cost_model(p, base=ref) for p in _measured_files()]
    if not models:
        return ref
    return max(reversed(models), key=lambda m: m.date)  # the newest measurement (ties: the last file name)
