"""Mutation fuzzing of every eplb reader and of the plan path (used by ``tests/test_fuzz_*.py`` and
``bench/fuzz.py``).

A case writes a valid small file with eplb's own writer (a SYNTHETIC placement or trace), mutates it
(a leaf replaced by an adversarial value, a key dropped or added, a list made ragged, deep nesting,
a dtype changed to ``uint64`` past ``2**63`` or to floats past ``2**53``, truncated or flipped bytes),
reads it back and classifies the outcome:

* ``clear``: an eplb error (:class:`~eplb.stats.trace.TraceError`, :class:`~eplb.placement.PlacementError`)
  whose message names the file (for the plan path: a ``ValueError`` naming the argument);
* ``valid``: accepted, and the result equals the exact values of the mutated input (an oracle that
  reads them with Python ints, never through a float or a fixed-width cast);
* ``silent-wrong``: accepted, but the result differs from the input's exact values, or the input holds
  no exact valid values at all (a wrapped, rounded or negative count);
* ``unclear``: any other exception type, or an eplb error that does not name the file;
* ``hang``: no answer within the time limit.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAP_FORMATS", "OUTCOMES", "TRACE_FORMATS", "Outcome", "map_case", "plan_case", "trace_case"]

OUTCOMES = ("clear", "valid", "silent-wrong", "unclear", "hang")
MAP_FORMATS = ("trtllm", "vllm-ascend", "sglang-json", "sglang-pt", "sglang-count", "vllm-json", "vllm-pt",
               "native", "trtllm-options")
TRACE_FORMATS = ("npy", "npz", "csv", "json", "eplb", "trtllm", "sglang", "vllm-ascend")

ADVERSARIAL: tuple[Any, ...] = (2**63, 2**64 - 1, 2**63 - 1, -1, -(2**63) - 1, 1e19, 1.5, 2**53 + 1,
                                float(2**53 + 2), None, "x", "7", [], {}, True, [1, 2], 1e308, 10**400, -0.0,
                                float("nan"), 0, 3)


class Hang(Exception):
    pass


@dataclass
class Outcome:
    kind: str
    fmt: str
    mutation: str
    detail: str = ""
    reader: str = ""  # "map:<format>", "trace:<format>" or "plan" (set by run_cases)


#: Paths a TensorRT-LLM options file's ``load_balancer`` is pointed at (``bench/fuzz.py --before`` drops
#: ``/dev/zero``: an unbounded reader would read it until memory runs out).
INDIRECT_TARGETS = ["/dev/zero", "../../etc/passwd", "lb.yaml", "fifo", "missing.yaml", "/etc/hostname"]


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def boom(*_: Any) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- exact oracles
def _exact_int(v: Any, minimum: int = 0, maximum: int = 2**53) -> int | None:
    """``v`` as an exact int in range, or None (bools, fractions, inexact floats, out of range)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f) or f != int(f) or abs(f) > 2**53:
            return None
        v = int(f)
    if isinstance(v, (int, np.integer)):
        iv = int(v)
        return iv if minimum <= iv <= maximum else None
    return None


def _exact_grid(obj: Any, ndim: tuple[int, ...], minimum: int = 0, maximum: int = 2**53) -> list[Any] | None:
    """Nested lists of exact ints of a rectangular array with one of ``ndim`` dimensions, or None."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().tolist()

    def walk(o: Any, d: int) -> tuple[Any, tuple[int, ...]] | None:
        if d == 0:
            v = _exact_int(o, minimum, maximum)
            return None if v is None else (v, ())
        if not isinstance(o, (list, tuple)) or not o:
            return None
        kids = [walk(k, d - 1) for k in o]
        if any(k is None for k in kids):
            return None
        shapes = {k[1] for k in kids if k is not None}
        if len(shapes) != 1:
            return None
        return [k[0] for k in kids if k is not None], (len(o), *shapes.pop())

    for d in ndim:
        r = walk(obj, d)
        if r is not None:
            return r[0]
    return None


def _as3(grid: list[Any]) -> list[Any]:
    return grid if isinstance(grid[0][0], list) else [grid]


# ----------------------------------------------------------------------------- tree mutations
def _paths(obj: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    out = [prefix]
    if depth > 6:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            out += _paths(v, (*prefix, i), depth + 1)
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def mutate_tree(obj: Any, rng: random.Random) -> tuple[Any, str]:
    """One structural or value mutation of a parsed JSON / YAML document."""
    obj = json.loads(json.dumps(obj))  # deep copy (documents are JSON-compatible)
    paths = _paths(obj)
    path = rng.choice(paths)
    op = rng.choice(("leaf", "leaf", "leaf", "drop", "add", "ragged", "nest", "swap-type", "dup-row"))
    target = _get(obj, path)
    if op == "leaf" or (op in ("drop", "ragged", "dup-row") and not isinstance(target, (dict, list))):
        v = rng.choice(ADVERSARIAL)
        return _set(obj, path, json.loads(json.dumps(v)) if not isinstance(v, float) or math.isfinite(v) else v), \
            f"leaf={str(v)[:12]}"
    if op == "drop":
        if isinstance(target, dict) and target:
            del target[rng.choice(list(target))]
        elif isinstance(target, list) and target:
            target.pop(rng.randrange(len(target)))
        return obj, "drop"
    if op == "add":
        if isinstance(target, dict):
            target[rng.choice(("extra", "0", "-1", "99999999999999999999"))] = rng.choice(ADVERSARIAL)
            return obj, "add-key"
        if isinstance(target, list):
            target.append(rng.choice(ADVERSARIAL))
            return obj, "append"
        return _set(obj, path, [target, target]), "wrap"
    if op == "ragged":
        if isinstance(target, list) and target and isinstance(target[0], list) and target[0]:
            target[rng.randrange(len(target))].pop()
            return obj, "ragged"
        return obj, "noop"
    if op == "nest":
        v: Any = target
        for _ in range(rng.choice((40, 200, 5000))):
            v = [v]
        return _set(obj, path, v), "deep-nest"
    if op == "dup-row":
        if isinstance(target, list) and target:
            target.append(target[0])
        return obj, "dup-row"
    return _set(obj, path, str(target) if not isinstance(target, str) else [target]), "swap-type"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return data, "noop"
    op = rng.choice(("truncate", "flip", "insert"))
    i = rng.randrange(len(data))
    if op == "truncate":
        return data[:i], "truncate"
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:], "flip"
    return data[:i] + bytes([rng.randrange(256)]) + data[i:], "insert"


def mutate_array(arr: np.ndarray, rng: random.Random) -> tuple[np.ndarray, str]:
    """Change a numeric array's dtype / values / shape adversarially."""
    a = np.array(arr)
    op = rng.choice(("uint64-big", "uint64-ok", "float-big", "float-frac", "neg", "shape", "int8", "nan",
                     "bool", "float-exact", "uint64-max"))
    flat = a.reshape(-1)
    j = rng.randrange(max(flat.size, 1))
    if op == "uint64-big":
        b = a.astype(np.uint64)
        b.reshape(-1)[j] = np.uint64(2**63 + rng.randrange(1000))
        return b, op
    if op == "uint64-max":
        b = a.astype(np.uint64)
        b.reshape(-1)[j] = np.uint64(2**64 - 1)
        return b, op
    if op == "uint64-ok":
        return a.astype(np.uint64), op
    if op == "float-big":
        b = a.astype(np.float64)
        b.reshape(-1)[j] = rng.choice((1e19, float(2**53 + 2), 1e300))
        return b, op
    if op == "float-frac":
        b = a.astype(np.float64)
        b.reshape(-1)[j] += 0.5
        return b, op
    if op == "float-exact":
        return a.astype(np.float64), op
    if op == "neg":
        b = a.astype(np.int64)
        b.reshape(-1)[j] = -rng.randrange(1, 5)
        return b, op
    if op == "shape":
        return (a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1, 1, 1)), op
    if op == "int8":
        return a.astype(np.int8), op  # wraps values > 127 *here*; the oracle sees the int8 values
    if op == "nan":
        b = a.astype(np.float64)
        b.reshape(-1)[j] = np.nan
        return b, op
    return a.astype(bool), op


# ----------------------------------------------------------------------------- valid inputs (SYNTHETIC)
def _placement(rng: random.Random, no_colocation: bool = False) -> Any:
    from eplb.placement import Placement

    L, E, R = rng.randint(1, 3), rng.randint(2, 5), rng.randint(1, 3)
    spr = -(-E // R) + (0 if no_colocation else rng.randint(0, 1))
    if no_colocation:
        spr = -(-E // R)
    S = R * spr
    rows = []
    for _ in range(L):
        if no_colocation:
            order = list(range(E)) + list(range(S - E))  # extras 0.. on the last rank(s): distinct per rank
            rows.append(order)
        else:
            extra = [rng.randrange(E) for _ in range(S - E)]
            row = list(range(E)) + extra
            rng.shuffle(row)
            rows.append(row)
    lids = tuple(sorted(rng.sample(range(0, 8), L)))
    try:
        return Placement(np.asarray(rows), E, R, 1, lids, {})
    except ValueError:
        return Placement.contiguous(L, E, R, R * -(-E // R))


def _trace(rng: random.Random) -> Any:
    from eplb.stats.trace import Trace

    T, L, E = rng.randint(1, 3), rng.randint(1, 3), rng.randint(2, 5)
    big = rng.choice((10, 1000, 2**31, 2**40))
    counts = np.asarray([[[rng.randrange(big) for _ in range(E)] for _ in range(L)] for _ in range(T)], dtype=np.int64)
    return Trace(counts, tuple(range(1, 2 * L, 2)), np.arange(T, dtype=np.int64) + 3, top_k=2, ep_size=1)


def _clear(exc: BaseException, path: Path) -> bool:
    from eplb.placement import PlacementError
    from eplb.stats.trace import TraceError

    return isinstance(exc, (TraceError, PlacementError)) and (str(path) in str(exc) or path.name in str(exc))


def _classify(fmt: str, mutation: str, path: Path, read: Callable[[], Any], check: Callable[[Any], str | None],
              limit_s: float) -> Outcome:
    try:
        with _time_limit(limit_s):
            result = read()
    except Hang:
        return Outcome("hang", fmt, mutation)
    except Exception as exc:  # noqa: BLE001 - classified
        if _clear(exc, path):
            return Outcome("clear", fmt, mutation)
        return Outcome("unclear", fmt, mutation, f"{type(exc).__name__}: {str(exc)[:160]}")
    why = check(result)
    return Outcome("valid" if why is None else "silent-wrong", fmt, mutation, why or "")


# ----------------------------------------------------------------------------- map cases
def _map_oracle(fmt: str, obj: Any) -> list[list[int]] | None:
    """Exact ``[L, S]`` rows (file order of the reader) of a mutated map document, or None."""
    try:
        if fmt in ("trtllm", "trtllm-options"):
            if fmt == "trtllm-options":
                obj = obj["moe_config"]["load_balancer"]
            iga = obj["initial_global_assignments"]
            keys = {}
            for k in iga:
                kk = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else _exact_int(k, 0, 2**31 - 1)
                if kk is None or kk < 0:
                    return None
                keys[kk] = iga[k]
            return _exact_grid([keys[k] for k in sorted(keys)], (2,), 0, 2**31 - 1)
        if fmt == "native":
            return _exact_grid(obj["phy2log"], (2,), 0, 2**31 - 1)
        if fmt in ("sglang-json", "sglang-pt"):
            return _exact_grid(obj["physical_to_logical_map"], (2,), 0, 2**31 - 1)
        if fmt in ("vllm-json", "vllm-pt"):
            return _exact_grid(obj["physical_to_logical_map"], (2,), 0, 2**31 - 1)
        if fmt == "vllm-ascend":
            rows = []
            n = obj["moe_layer_count"]
            layers = [ly for ly in obj["layer_list"] if _exact_int(ly["layer_id"]) != n]  # layer n: MTP, skipped
            for ly in sorted(layers, key=lambda x: int(x["layer_id"])):
                devs = sorted(enumerate(ly["device_list"]), key=lambda kx: int(kx[1].get("device_id", kx[0])))
                rows.append([e for _, d in devs for e in d["device_expert"]])
            return _exact_grid(rows, (2,), 0, 2**31 - 1)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None
    return None


def map_case(rng: random.Random, fmt: str, tmp: Path, limit_s: float = 10.0) -> Outcome:
    """One mutated map file of ``fmt`` read with :func:`eplb.formats.read_placement`."""
    import yaml

    from eplb.formats import encode_placement, read_placement

    pl = _placement(rng, no_colocation=fmt == "vllm-ascend")
    base_fmt = {"sglang-json": "sglang", "sglang-pt": "sglang", "sglang-count": "sglang", "vllm-json": "vllm",
                "vllm-pt": "vllm", "trtllm-options": "trtllm"}.get(fmt, fmt)
    suffix = {"trtllm": ".yaml", "trtllm-options": ".yaml", "sglang-pt": ".pt", "vllm-pt": ".pt"}.get(fmt, ".json")
    path = tmp / f"map{suffix}"
    kw: dict[str, Any] = {"ep_size": pl.num_ranks}  # checked against the file where it records one
    if fmt == "sglang-count":
        doc: Any = {"logical_count": _trace(rng).counts.tolist()}
        kw = {"ep_size": 1}
    elif suffix == ".pt":
        doc = None
    else:
        data = encode_placement(pl, base_fmt, container="json")
        doc = yaml.safe_load(data) if suffix == ".yaml" else json.loads(data)
        if fmt == "trtllm-options":
            (tmp / "lb.yaml").write_bytes(data)
            doc = {"moe_config": {"backend": "WideEP", "load_balancer": doc}}
    mutation = "none"
    r = rng.random()
    if suffix == ".pt":
        import torch

        key = "physical_to_logical_map"
        arr, mutation = mutate_array(pl.phy2log, rng) if r < 0.8 else (pl.phy2log, "none")
        payload: dict[str, Any] = {key: torch.from_numpy(np.ascontiguousarray(arr))}
        if fmt == "vllm-pt":
            payload["ep_size"] = pl.num_ranks
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        if 0.8 <= r < 0.95:
            data, mutation = mutate_bytes(data, rng)
        doc = {key: arr, "ep_size": pl.num_ranks}
    else:
        if r < 0.1 and fmt == "trtllm-options":
            doc["moe_config"]["load_balancer"] = rng.choice(INDIRECT_TARGETS)
            mutation = f"indirect={doc['moe_config']['load_balancer']}"
            if doc["moe_config"]["load_balancer"] == "fifo" and not (tmp / "fifo").exists() and hasattr(os, "mkfifo"):
                os.mkfifo(tmp / "fifo")
        elif r < 0.85:
            doc, mutation = mutate_tree(doc, rng)
        text = (yaml.safe_dump(doc, default_flow_style=None) if suffix == ".yaml" else json.dumps(doc)).encode() \
            if not mutation.startswith("deep") else _deep_text(doc, suffix)
        data = text
        if r >= 0.85:
            data, mutation = mutate_bytes(data, rng)
    path.write_bytes(data)
    fixed_text = None if mutation.startswith(("truncate", "flip", "insert")) else doc

    def check(got: Any) -> str | None:
        if fmt == "sglang-count":
            return None if _exact_grid(fixed_text and fixed_text.get("logical_count") if isinstance(fixed_text, dict)
                                       else None, (2, 3)) is not None or fixed_text is None else \
                "accepted logical_count without exact non-negative counts"
        if fixed_text is None:  # byte-level damage: re-derive the document the reader saw
            want = _reparse(fmt, path)
        else:
            want = _map_oracle(fmt, fixed_text) if not (fmt == "trtllm-options" and mutation.startswith("indirect")) \
                else _map_oracle("trtllm", yaml.safe_load((tmp / "lb.yaml").read_bytes()))
        if want is None:
            return "accepted a map without exact integer expert ids"
        if got.phy2log.tolist() != want:
            return "rows differ from the file's exact ids"
        return None

    return _classify(fmt, mutation, path, lambda: read_placement(path, base_fmt, **kw), check, limit_s)


def _deep_text(doc: Any, suffix: str) -> bytes:
    try:
        return (json.dumps(doc) if suffix == ".json" else __import__("yaml").safe_dump(doc)).encode()
    except RecursionError:
        return b"[" * 5000 + b"]" * 5000


def _reparse(fmt: str, path: Path) -> list[list[int]] | None:
    """The exact ids of a byte-damaged file as Python reads it (None if it no longer parses)."""
    import yaml

    try:
        if path.suffix == ".pt":
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".yaml":
            obj = yaml.safe_load(path.read_bytes())
        else:
            obj = json.loads(path.read_bytes())
    except Exception:  # noqa: BLE001
        return None
    return _map_oracle(fmt, obj)


# ----------------------------------------------------------------------------- trace cases
def trace_case(rng: random.Random, fmt: str, tmp: Path, limit_s: float = 10.0) -> Outcome:
    """One mutated trace of ``fmt`` read with :func:`eplb.stats.importers.read_trace`."""
    from eplb.stats.importers import read_trace, write_trace

    tr = _trace(rng)
    suffix = {"npy": ".npy", "npz": ".npz", "csv": ".csv", "json": ".json", "eplb": ".safetensors",
              "sglang": ".pt", "vllm-ascend": ".npy"}.get(fmt, "")
    path = tmp / f"trace{suffix}" if fmt != "trtllm" else tmp / "dump"
    want: list[Any] | None
    mutation = "none"
    r = rng.random()
    if fmt in ("json",):
        write_trace(tr, path, fmt)
        doc = json.loads(path.read_bytes())
        if r < 0.85:
            doc, mutation = mutate_tree(doc, rng)
            path.write_bytes(json.dumps(doc).encode() if not mutation.startswith("deep") else _deep_text(doc, ".json"))
        else:
            data, mutation = mutate_bytes(path.read_bytes(), rng)
            path.write_bytes(data)
        want = _json_counts(path)
    elif fmt == "csv":
        write_trace(tr, path, fmt)
        lines = path.read_text().splitlines()
        if r < 0.85 and len(lines) > 1:
            i = rng.randrange(1, len(lines))
            cells = lines[i].split(",")
            j = rng.randrange(len(cells))
            v = rng.choice(("18446744073709551615", "9223372036854775808", "1e19", "9007199254740993", "-1", "1.5",
                            "x", "", "nan", "inf", "3", "1e3", "9" * 400))
            op = rng.choice(("cell", "drop-cell", "extra-cell"))
            if op == "cell":
                cells[j] = v
            elif op == "drop-cell":
                cells.pop(j)
            else:
                cells.append(v)
            lines[i] = ",".join(cells)
            mutation = f"{op}={v[:12]}"
            path.write_text("\n".join(lines) + "\n")
        elif r >= 0.85:
            data, mutation = mutate_bytes(path.read_bytes(), rng)
            path.write_bytes(data)
        want = _csv_counts(path)
    elif fmt in ("npy", "vllm-ascend"):
        arr = tr.counts if fmt == "npy" else tr.counts.reshape(tr.num_steps, tr.num_layers, 1, tr.num_experts)
        if r < 0.85:
            arr, mutation = mutate_array(arr, rng)
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
        if r >= 0.85:
            data, mutation = mutate_bytes(data, rng)
        path.write_bytes(data)
        want = _exact_grid(arr, (2, 3)) if fmt == "npy" and mutation not in ("truncate", "flip", "insert") else \
            _exact_grid(arr.reshape(arr.shape[0], arr.shape[1], -1) if arr.ndim == 4 else arr, (3,)) \
            if mutation not in ("truncate", "flip", "insert") else _npy_counts(path, fmt)
    elif fmt in ("npz", "eplb", "sglang"):
        arr = tr.counts
        if r < 0.85:
            arr, mutation = mutate_array(arr, rng)
        data = _binary_trace(fmt, arr, tr)
        if r >= 0.85:
            data, mutation = mutate_bytes(data, rng)
        path.write_bytes(data)
        want = _exact_grid(arr, (2, 3)) if mutation not in ("truncate", "flip", "insert") else None
        if mutation in ("truncate", "flip", "insert"):
            want = _binary_counts(fmt, path)
    else:  # trtllm dump directory
        write_trace(tr, path, "trtllm", ep_size=2)
        f = path / "rank1.safetensors"
        from safetensors.numpy import load_file, save_file

        d = load_file(str(f))
        key = rng.choice(sorted(d))
        if r < 0.85:
            d[key], mutation = mutate_array(d[key], rng)
            save_file({k: np.ascontiguousarray(v) for k, v in d.items()}, str(f))
        else:
            data, mutation = mutate_bytes(f.read_bytes(), rng)
            f.write_bytes(data)
        want = _trtllm_counts(path)
    emap = "identity" if fmt == "vllm-ascend" else None  # its per-slot loads need a map (identity layout here)
    return _classify(fmt, mutation, path, lambda: read_trace(path, fmt if fmt != "eplb" else None, expert_map=emap),
                     lambda got: _check_counts(got, want), limit_s)


def _check_counts(got: Any, want: list[Any] | None) -> str | None:
    if want is None:
        return "accepted a trace without exact non-negative integer counts"
    w = _as3(want)
    if got.counts.tolist() != w:
        return "counts differ from the file's exact values"
    return None


def _json_counts(path: Path) -> list[Any] | None:
    try:
        obj = json.loads(path.read_bytes())
    except Exception:  # noqa: BLE001
        return None
    if isinstance(obj, dict):
        key = next((k for k in ("counts", "logical_count", "load", "loads") if k in obj), None)
        obj = obj.get(key) if key else None
    return _exact_grid(obj, (2, 3))


def _csv_counts(path: Path) -> list[Any] | None:
    """Exact counts of a CSV trace as the format defines it (optional header naming 'layer' / 'step')."""
    import csv

    try:
        rows = [r for r in csv.reader(path.read_bytes().decode("utf-8").splitlines()) if r and any(c.strip() for c in r)]
    except Exception:  # noqa: BLE001
        return None
    if not rows:
        return None

    def isnum(c: str) -> bool:
        try:
            float(c)
            return True
        except ValueError:
            return False

    if all(isnum(c) for c in rows[0]):
        return _exact_grid([[_exact_csv(c) for c in r] for r in rows], (2,))
    header = [c.strip().lower() for c in rows[0]]
    body = rows[1:]
    if "layer" not in header or not body or any(len(r) != len(header) for r in body):
        return None
    lc = header.index("layer")
    sc = header.index("step") if "step" in header else None
    ecols = [j for j in range(len(header)) if j not in (lc, sc)]
    vals: dict[tuple[int, int], list[int | None]] = {}
    for r in body:
        ly = _exact_csv(r[lc], 2**63 - 1)
        st = _exact_csv(r[sc], 2**63 - 1) if sc is not None else 0
        cs = [_exact_csv(r[j]) for j in ecols]
        if ly is None or st is None or any(c is None for c in cs) or (st, ly) in vals or not cs:
            return None
        vals[(st, ly)] = cs
    steps = sorted({k[0] for k in vals})
    layers = sorted({k[1] for k in vals})
    if len(vals) != len(steps) * len(layers):
        return None
    return [[vals[(st, ly)] for ly in layers] for st in steps]


def _exact_csv(c: str, maximum: int = 2**53) -> int | None:
    c = c.strip()
    try:
        return _exact_int(int(c), 0, maximum)
    except ValueError:
        pass
    try:
        return _exact_int(float(c), 0, maximum)
    except ValueError:
        return None


def _npy_counts(path: Path, fmt: str) -> list[Any] | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001
        return None
    if fmt == "vllm-ascend":
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            return None
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return _exact_grid(arr, (2, 3))


def _binary_trace(fmt: str, arr: np.ndarray, tr: Any) -> bytes:
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, counts=arr, step_ids=tr.step_ids, layer_ids=np.asarray(tr.layer_ids))
        return buf.getvalue()
    if fmt == "eplb":
        from safetensors.numpy import save

        return bytes(save({"counts": np.ascontiguousarray(arr), "step_ids": tr.step_ids},
                          metadata={"eplb.trace": json.dumps(tr.metadata())}))
    import torch

    buf = io.BytesIO()
    t = torch.from_numpy(np.ascontiguousarray(arr)) if arr.dtype != np.uint64 or True else None
    torch.save({"logical_count": t}, buf)
    return buf.getvalue()


def _binary_counts(fmt: str, path: Path) -> list[Any] | None:
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                arr = z["counts"]
        elif fmt == "eplb":
            from safetensors.numpy import load_file

            arr = load_file(str(path))["counts"]
        else:
            import torch

            arr = torch.load(path, map_location="cpu", weights_only=True)["logical_count"]
    except Exception:  # noqa: BLE001
        return None
    return _exact_grid(arr, (2, 3))


def _trtllm_counts(path: Path) -> list[Any] | None:
    from safetensors.numpy import load_file

    tot: dict[tuple[int, int], list[int]] = {}
    try:
        meta = json.loads((path / "meta_info.json").read_bytes())
        E = meta["num_experts"]
        for f in sorted(path.glob("rank*.safetensors")):
            for k, v in load_file(str(f)).items():
                it, ly = (int(x) for x in k.split("_"))
                g = _exact_grid(v, (1,))
                if g is None or len(g) != E:
                    return None
                tot[(it, ly)] = [a + b for a, b in zip(tot.get((it, ly), [0] * E), g, strict=True)]
    except Exception:  # noqa: BLE001
        return None
    if any(max(v) > 2**53 for v in tot.values()):
        return None
    its = sorted({k[0] for k in tot})
    lys = sorted({k[1] for k in tot})
    return [[tot[(i, ly)] for ly in lys] for i in its]


# ----------------------------------------------------------------------------- plan path
def plan_case(rng: random.Random, limit_s: float = 20.0) -> Outcome:
    """``eplb.plan`` on adversarial loads and sizes; a valid answer is a Placement of the asked shape."""
    import eplb
    import eplb.dispatch  # noqa: F401 - registers eplb-dispatch
    from eplb.policies import POLICIES

    # eplb's own policies (not test or plug-in ones); incremental needs current=
    policy = rng.choice(sorted(p for p, fn in POLICIES.items()
                               if p != "eplb-incremental" and getattr(fn, "__module__", "").startswith("eplb.")))
    T, L, E = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 6)
    R = rng.randint(1, 4)
    S = R * rng.randint(max(1, -(-E // R)), -(-E // R) + 3)
    kind = rng.choice(("ordinary", "zeros", "huge", "tiny", "int64max", "uint64", "nan", "neg", "inf", "one-hot",
                       "bad-shape", "bad-size", "bool", "float32max", "mixed"))
    base = np.asarray([[[rng.random() * 100 for _ in range(E)] for _ in range(L)] for _ in range(T)])
    loads: Any = base
    num_slots, num_ranks = S, R
    if kind == "zeros":
        loads = np.zeros_like(base)
    elif kind == "huge":
        loads = base * 1e300
    elif kind == "tiny":
        loads = base * 1e-300
    elif kind == "int64max":
        loads = np.full(base.shape, 2**63 - 1, dtype=np.int64)
    elif kind == "uint64":
        loads = np.full(base.shape, 2**64 - 1, dtype=np.uint64)
    elif kind == "nan":
        loads = base.copy()
        loads.reshape(-1)[0] = np.nan
    elif kind == "neg":
        loads = base - 50
    elif kind == "inf":
        loads = base.copy()
        loads.reshape(-1)[-1] = np.inf
    elif kind == "one-hot":
        loads = np.zeros_like(base)
        loads[..., 0] = 1e38
    elif kind == "bad-shape":
        loads = base.reshape(-1)
    elif kind == "bad-size":
        num_slots, num_ranks = rng.choice(((E - 1, 1), (S + 1, R), (S, 0), (-S, R), (2**63, R), (S, R + 10**6)))
    elif kind == "bool":
        loads = base > 50
    elif kind == "float32max":
        loads = np.full(base.shape, 3.4e38)
    elif kind == "mixed":
        loads = base.astype(object)
        loads.reshape(-1)[0] = "x"
    bad_loads = kind in ("nan", "inf", "bad-shape", "mixed") or (kind == "neg" and bool(np.any(loads < 0)))

    def read() -> Any:
        return eplb.plan(loads, num_slots, num_ranks, policy=policy)

    try:
        with _time_limit(limit_s):
            got = read()
    except Hang:
        return Outcome("hang", policy, kind)
    except ValueError as exc:
        first = str(exc).split(":", 1)[0]
        return Outcome("clear" if first and " " not in first.strip() else "unclear", policy, kind, str(exc)[:160])
    except Exception as exc:  # noqa: BLE001
        return Outcome("unclear", policy, kind, f"{type(exc).__name__}: {str(exc)[:160]}")
    if bad_loads:
        return Outcome("silent-wrong", policy, kind, "accepted invalid loads")
    ok = got.num_slots == num_slots and got.num_ranks == num_ranks and got.num_experts == E
    return Outcome("valid" if ok else "silent-wrong", policy, kind, "" if ok else "wrong shape")


def run_cases(n: int, seed: int, *, limit_s: float = 10.0, kinds: tuple[str, ...] = ("map", "trace", "plan"),
              on_case: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """``n`` cases round-robin over readers / formats / the plan path, from ``random.Random(seed)``."""
    rng = random.Random(seed)
    jobs: list[tuple[str, str]] = []
    if "map" in kinds:
        jobs += [("map", f) for f in MAP_FORMATS]
    if "trace" in kinds:
        jobs += [("trace", f) for f in TRACE_FORMATS]
    if "plan" in kinds:
        jobs += [("plan", "plan")]
    out = []
    with tempfile.TemporaryDirectory(prefix="eplb-fuzz-") as d:
        for i in range(n):
            kind, fmt = jobs[i % len(jobs)]
            case_dir = Path(d) / str(i)
            case_dir.mkdir()
            if kind == "map":
                o = map_case(rng, fmt, case_dir, limit_s)
            elif kind == "trace":
                o = trace_case(rng, fmt, case_dir, limit_s)
            else:
                o = plan_case(rng, limit_s)
            o.reader = f"{kind}:{fmt}" if kind != "plan" else "plan"
            out.append(o)
            if on_case is not None:
                on_case(o)
            import shutil

            shutil.rmtree(case_dir, ignore_errors=True)
    return out
