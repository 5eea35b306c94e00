"""Shared pieces of the fuzz engine (:mod:`eplb._fuzz`): outcomes, exact oracles, mutations, valid
SYNTHETIC inputs and the outcome classifier."""

from __future__ import annotations

import json
import math
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ADVERSARIAL", "INDIRECT_TARGETS", "MAP_FORMATS", "OUTCOMES", "TRACE_FORMATS", "Hang", "Outcome"]

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


def _deep_text(doc: Any, suffix: str) -> bytes:
    try:
        return (json.dumps(doc) if suffix == ".json" else __import__("yaml").safe_dump(doc)).encode()
    except RecursionError:
        return b"[" * 5000 + b"]" * 5000
