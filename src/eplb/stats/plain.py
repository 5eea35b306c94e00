"""Plain trace arrays: ``npy`` / ``npz`` / ``csv`` / ``json`` files of token counts ``[T, L, E]``
(or ``[L, E]``), read and written for :mod:`eplb.stats.io`; every reader error names the file and
the key / field at fault.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from eplb._io import atomic_write
from eplb._safe_read import parse_json, read_bytes
from eplb.stats.importers import _eplb_info, _int_field, _json_file, _regular
from eplb.stats.trace import Trace, TraceError

__all__: list[str] = []


def _trace_from_obj(p: Path, obj: Any) -> Trace:
    if isinstance(obj, dict):
        key = next((k for k in ("counts", "logical_count", "load", "loads") if k in obj), None)
        if key is None:
            raise TraceError(f"{p}: missing key 'counts' (keys: {sorted(map(str, obj))[:10]})")
        arr = _rect(p, obj[key], f"key {key!r}")
        lids = obj.get("layer_ids", ())
        if isinstance(lids, np.ndarray):
            lids = lids.tolist()
        if not isinstance(lids, (list, tuple)):
            raise TraceError(f"{p}: field 'layer_ids': expected a list of layer indices, got {type(lids).__name__}")
        meta = obj.get("meta", {}) or {}
        if not isinstance(meta, dict):
            raise TraceError(f"{p}: field 'meta': expected a mapping, got {type(meta).__name__}")
        top_k, ep = _int_field(p, obj, "top_k", 0, default=0), _int_field(p, obj, "ep_size", 0, default=0)
        try:
            return Trace(arr, tuple(lids), obj.get("step_ids"), top_k,
                         str(obj.get("model", "")), str(obj.get("source", "") or f"{p.suffix[1:]}:{p}"),
                         ep, dict(meta))
        except ValueError as exc:
            raise TraceError(f"{p}: key {key!r}: {exc}") from None
    arr = _rect(p, obj, "")
    try:
        return Trace(arr, source=f"{p.suffix[1:]}:{p}")
    except ValueError as exc:
        raise TraceError(f"{p}: {exc}") from None


def _rect(p: Path, obj: Any, what: str) -> np.ndarray:
    """A rectangular array of numbers (lists of Python ints past int64 kept exact as objects)."""
    if isinstance(obj, np.ndarray):
        return obj
    try:
        arr = np.asarray(obj)
    except (ValueError, TypeError, OverflowError):
        raise TraceError(f"{p}: {what + ' is' if what else 'not'} a rectangular array (ragged rows?)") from None
    if arr.dtype == object:
        try:  # rectangular but with odd elements: exact_counts names the first bad one
            np.asarray(obj, dtype=object).reshape(-1)
        except ValueError:
            raise TraceError(f"{p}: {what + ' is' if what else 'not'} a rectangular array (ragged rows?)") from None
        if any(isinstance(v, (list, tuple, dict)) for v in arr.reshape(-1)):
            raise TraceError(f"{p}: {what + ' is' if what else 'not'} a rectangular array (ragged rows?)")
    return obj if isinstance(obj, (list, tuple)) else arr  # lists: exact_counts also refuses booleans in them


def _read_plain(p: Path, fmt: str) -> Trace:
    if fmt == "npy":
        _regular(p)
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise TraceError(f"{p}: not a readable .npy file ({str(exc).splitlines()[0]})") from None
        return _trace_from_obj(p, arr)
    if fmt == "npz":
        _regular(p)
        try:
            with np.load(p, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except Exception as exc:
            raise TraceError(f"{p}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
        if "counts" not in d and len(d) == 1:
            d = {"counts": next(iter(d.values()))}
        if "meta_json" in d:
            info = parse_json(p, str(d.pop("meta_json")).encode(), error=TraceError)
            if not isinstance(info, dict):
                raise TraceError(f"{p}: meta_json: expected a JSON object, got {type(info).__name__}")
            d.update({k: v for k, v in info.items() if k not in d})
        return _trace_from_obj(p, d)
    if fmt == "json":
        return _trace_from_obj(p, _json_file(p))
    if fmt == "csv":
        return _read_csv(p)
    raise TraceError(f"format: {fmt!r} is not a plain array format")


def _read_csv(p: Path) -> Trace:
    try:
        text = read_bytes(p, error=TraceError).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise TraceError(f"{p}: empty CSV")

    def num(v: str, line: int, col: int) -> float | int:
        try:
            return int(v)  # exact: a float would round counts past 2**53
        except ValueError:
            pass
        try:
            return float(v)
        except ValueError:
            raise TraceError(f"{p}: line {line}, column {col + 1}: {v!r} is not a number") from None

    header = None
    if any(not _isnum(c) for c in rows[0]):
        header = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
    width = {len(r) for r in rows}
    if len(width) != 1:
        raise TraceError(f"{p}: rows have different numbers of columns {sorted(width)}")
    vals = [[num(c, i + 1 + (header is not None), j) for j, c in enumerate(r)] for i, r in enumerate(rows)]
    if header is None:
        return _trace_from_obj(p, vals)
    data = np.array(vals, dtype=object)
    if len(header) != data.shape[1]:
        raise TraceError(f"{p}: header has {len(header)} columns, rows have {data.shape[1]}")
    if "layer" not in header:
        raise TraceError(f"{p}: header must name a 'layer' column (and optionally 'step'), got {header[:4]}...")
    lc = header.index("layer")
    sc = header.index("step") if "step" in header else None
    ecols = [j for j in range(len(header)) if j not in (lc, sc)]
    for col in (lc, sc):
        if col is not None:
            for i, v in enumerate(data[:, col]):
                if not isinstance(v, int) or not 0 <= v < 2**63:
                    raise TraceError(f"{p}: line {i + 2}, column {col + 1} ({header[col]}): expected an integer "
                                     f"in [0, 2**63), got {v!r}")
    layers = sorted({int(v) for v in data[:, lc]})
    steps = sorted({int(v) for v in data[:, sc]}) if sc is not None else [0]
    lpos = {v: i for i, v in enumerate(layers)}
    spos = {v: i for i, v in enumerate(steps)}
    out = np.zeros((len(steps), len(layers), len(ecols)), dtype=object)
    seen = np.zeros((len(steps), len(layers)), dtype=bool)
    for i, row in enumerate(data):
        s = spos[int(row[sc])] if sc is not None else 0
        pos = lpos[int(row[lc])]
        if seen[s, pos]:
            raise TraceError(f"{p}: line {i + 2}: duplicate row for step {steps[s]}, layer {layers[pos]}")
        seen[s, pos] = True
        out[s, pos] = row[ecols]
    if not seen.all():
        s, layer_pos = (int(v) for v in np.argwhere(~seen)[0])
        raise TraceError(f"{p}: no row for step {steps[s]}, layer {layers[layer_pos]}")
    try:
        return Trace(out, tuple(layers), np.asarray(steps) if sc is not None else None, source=f"csv:{p}")
    except ValueError as exc:
        raise TraceError(f"{p}: {exc}") from None


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _write_plain(trace: Trace, p: Path, fmt: str) -> None:
    assert trace.step_ids is not None
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, trace.counts)
        atomic_write(p, buf.getvalue())
    elif fmt == "npz":
        buf = io.BytesIO()
        info = {k: v for k, v in _eplb_info(trace).items()}
        np.savez_compressed(buf, counts=trace.counts, step_ids=trace.step_ids,
                            layer_ids=np.asarray(trace.layer_ids, dtype=np.int64), meta_json=np.asarray(json.dumps(info)))
        atomic_write(p, buf.getvalue())
    elif fmt == "json":
        obj = {**_eplb_info(trace), "num_experts": trace.num_experts, "step_ids": trace.step_ids.tolist(),
               "counts": trace.counts.tolist()}
        atomic_write(p, json.dumps(obj).encode())
    elif fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["step", "layer", *range(trace.num_experts)])
        for t, s in enumerate(trace.step_ids):
            for j, lid in enumerate(trace.layer_ids):
                w.writerow([int(s), lid, *trace.counts[t, j].tolist()])
        atomic_write(p, out.getvalue().encode())
    else:
        raise TraceError(f"format: {fmt!r} is not a plain array format")
