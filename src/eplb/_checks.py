"""Input checks shared by every public entry point.

Every check raises :class:`ValueError` (or a subclass) whose message names the
argument and says what was expected, so a user sees *what* is wrong and *where*.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.errors import InputError

ArrayLike = Any  # numpy array, torch tensor, or nested lists


def to_numpy(x: ArrayLike, *, dtype: Any = None) -> np.ndarray:
    """Convert a torch tensor (any device), numpy array or nested list to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if dtype is None and str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def check_load(
    x: ArrayLike,
    name: str = "weight",
    *,
    ndim: int | tuple[int, ...] = 2,
    num_experts: int | None = None,
    dtype: Any = np.float64,
) -> np.ndarray:
    """Validate an expert-load array and return it as numpy ``dtype``.

    Loads must be finite and non-negative. ``ndim`` may be a tuple of accepted
    ranks (e.g. ``(2, 3)`` for ``[L, E]`` sums or ``[T, L, E]`` windows).
    """
    arr = to_numpy(x)
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in ndims:
        shapes = " or ".join({2: "[layers, experts]", 3: "[steps, layers, experts]", 1: "[experts]"}.get(d, f"{d}-D") for d in ndims)
        raise InputError(f"{name}: expected a {shapes} array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected numeric loads, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    if arr.shape[-1] == 0 or (arr.ndim >= 2 and arr.shape[-2] == 0):
        raise InputError(f"{name}: empty array of shape {tuple(arr.shape)}; need at least one layer and one expert")
    if num_experts is not None and arr.shape[-1] != num_experts:
        raise InputError(f"{name}: expected {num_experts} experts in the last dimension, got {arr.shape[-1]}")
    _finite_nonnegative(arr, name)
    return arr


#: Largest token count eplb accepts: every count, and every sum of counts a trace holds, is an exact
#: float64 integer (planners work in float64), so nothing is ever rounded or wrapped.
MAX_COUNT = 2**53
_INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


_IS_BOOL = np.frompyfunc(lambda v: isinstance(v, bool), 1, 1)


def exact_counts(x: ArrayLike, name: str = "counts", *, ndim: int | tuple[int, ...] = (2, 3),
                 compact: bool = False) -> np.ndarray:
    """Token counts as an exact ``int64`` array, or a ValueError naming ``name`` and the first bad index.

    ``compact``: an integer array of at most 32 bits whose counts fit in ``int32`` comes back as ``int32``
    (no copy when it already is one), so a long trace is never widened to ``int64`` in memory; the values are
    the same, and numpy's sums of ``int32`` arrays accumulate in ``int64``.

    Unlike :func:`check_load` nothing goes through float64 on the way: integer arrays are range-checked
    before the cast (a ``uint64`` of 2**63 or more never wraps to a negative value), float arrays must
    hold integers of at most :data:`MAX_COUNT` (larger floats are not exact), and Python ints (JSON
    numbers past int64, mixed lists) are checked one by one. Counts above :data:`MAX_COUNT` are refused.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        x = t.numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name}: expected a rectangular array of counts ({str(exc).splitlines()[0]})") from None
    if isinstance(x, (list, tuple)) and arr.dtype.kind in "iuf" and arr.size:
        # numpy turns true / false among numbers into 1 / 0: a JSON boolean is no count
        is_bool = _IS_BOOL(np.asarray(x, dtype=object)).astype(bool)
        if is_bool.any():
            bad = np.argwhere(is_bool)[0].tolist()
            raise InputError(f"{name}: expected a count at index {bad}, got a boolean")
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in ndims:
        shapes = " or ".join({2: "[layers, experts]", 3: "[steps, layers, experts]", 1: "[experts]",
                              4: "[steps, layers, experts, experts]"}.get(d, f"{d}-D") for d in ndims)
        raise InputError(f"{name}: expected a {shapes} array, got shape {tuple(arr.shape)}")
    if arr.size == 0 or arr.shape[-1] == 0:
        raise InputError(f"{name}: empty array of shape {tuple(arr.shape)}; need at least one layer and one expert")
    kind = arr.dtype.kind
    if kind == "O":
        out = np.empty(arr.shape, dtype=np.int64)
        flat = out.reshape(-1)
        for i, v in enumerate(arr.reshape(-1)):
            flat[i] = _exact_count(v, name, np.unravel_index(i, arr.shape))
        return out
    if kind == "b":
        raise InputError(f"{name}: expected integer token counts, got booleans (dtype {arr.dtype})")
    if kind in "iu":
        if kind == "i" and arr.min() < 0:
            bad = np.argwhere(arr < 0)[0].tolist()
            raise InputError(f"{name}: contains negative loads (first at index {bad}, value {arr[tuple(bad)]})")
        mx = int(arr.max())
        if mx > MAX_COUNT:
            bad = np.argwhere(arr > MAX_COUNT)[0].tolist()
            raise InputError(f"{name}: count {int(arr[tuple(bad)])} at index {bad} is larger than 2**53 "
                             "(eplb keeps counts and their sums exact)")
        if compact and arr.dtype.itemsize <= 4 and mx <= _INT32_MAX:
            return arr.astype(np.int32, copy=False)
        return arr.astype(np.int64)
    if kind == "f":
        _finite_nonnegative(arr, name)
        if np.any(arr > MAX_COUNT):
            bad = np.argwhere(arr > MAX_COUNT)[0].tolist()
            raise InputError(f"{name}: count {float(arr[tuple(bad)])!r} at index {bad} is larger than 2**53 "
                             "and not exactly representable")
        if np.any(arr != np.floor(arr)):
            bad = np.argwhere(arr != np.floor(arr))[0].tolist()
            raise InputError(f"{name}: expected integer token counts, got {float(arr[tuple(bad)])!r} at index {bad}")
        return arr.astype(np.int64)
    raise InputError(f"{name}: expected numeric counts, got dtype {arr.dtype}")


def exact_ints(x: ArrayLike, name: str, *, ndim: int = 1, minimum: int = -INT64_MAX - 1) -> np.ndarray:
    """Integer ids (step ids, layer ids, offsets) as ``int64``: no bools, no fractional or inexact floats,
    nothing outside ``[minimum, 2**63)``; a ValueError names ``name`` and the first bad index."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and any(isinstance(v, (list, tuple, dict)) for v in x) and ndim == 1:
        raise InputError(f"{name}: expected a flat list of integers")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name}: expected a rectangular array of integers ({str(exc).splitlines()[0]})") from None
    if arr.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D array of integers, got shape {tuple(arr.shape)}")
    kind = arr.dtype.kind
    if kind == "O" or kind == "f":
        vals = arr.reshape(-1).tolist()
        out = []
        for i, v in enumerate(vals):
            if isinstance(v, float) and np.isfinite(v) and v == int(v) and abs(v) <= MAX_COUNT:
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"{name}[{i}]: expected an integer, got {str(v)[:40]!r}")
            if not minimum <= v <= INT64_MAX:
                raise InputError(f"{name}[{i}]: {v} is outside [{minimum}, 2**63)")
            out.append(v)
        return np.asarray(out, dtype=np.int64).reshape(arr.shape)
    if kind not in "iu":
        raise InputError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.size:
        if kind == "u" and int(arr.max()) > INT64_MAX:
            i = int(np.argmax(arr > INT64_MAX))
            raise InputError(f"{name}[{i}]: {int(arr.reshape(-1)[i])} is outside [{minimum}, 2**63)")
        if int(arr.min()) < minimum:
            i = int(np.argmax(arr.reshape(-1) < minimum))
            raise InputError(f"{name}[{i}]: {int(arr.reshape(-1)[i])} is below {minimum}")
    return arr.astype(np.int64)


def _exact_count(v: Any, name: str, idx: tuple[Any, ...]) -> int:
    where = list(int(i) for i in idx)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}: expected a count at index {where}, got {type(v).__name__} {str(v)[:40]!r}")
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not np.isfinite(f) or f != int(f):
            raise InputError(f"{name}: expected an integer count at index {where}, got {f!r}")
        if abs(f) > MAX_COUNT:
            raise InputError(f"{name}: count {f!r} at index {where} is larger than 2**53 and not exactly representable")
        v = int(f)
    iv = int(v)
    if iv < 0:
        raise InputError(f"{name}: contains negative loads (first at index {where}, value {iv})")
    if iv > MAX_COUNT:
        raise InputError(f"{name}: count {iv} at index {where} is larger than 2**53 (eplb keeps counts and their sums exact)")
    return iv


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a positive ``int`` or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise InputError(f"{name}: expected a positive integer, got {value}")
    return int(value)


#: Most slots per layer (and ranks) a placement may have: far above any deployment (DeepSeek-V3: 288-320).
MAX_SLOTS = 1 << 20


def check_layout(num_experts: int, num_slots: int, num_ranks: int, num_nodes: int = 1, *,
                 num_groups: int | None = None,
                 names: tuple[str, ...] = ("num_slots", "num_ranks", "num_nodes", "num_groups")) -> None:
    """Check that ``num_slots`` slots can be laid out over ranks and nodes for ``num_experts`` experts
    (and, when given, that ``num_groups`` divides the experts). The one layout check.

    ``names``: what the caller calls slots, ranks, nodes and groups (e.g. DeepSeek's
    ``("num_replicas", "num_gpus", "num_nodes", "num_groups")``, the CLI's ``("num-slots", "ep-size",
    "num-nodes", "num-groups")``), so the error names the parameter the caller passed.
    """
    s_name, r_name, n_name = names[:3]
    g_name = names[3] if len(names) > 3 else "num_groups"
    check_positive_int(num_slots, s_name)
    check_positive_int(num_ranks, r_name)
    check_positive_int(num_nodes, n_name)
    for name, v in ((s_name, num_slots), (r_name, num_ranks)):
        if v > MAX_SLOTS:
            raise InputError(f"{name}: {v} is larger than the supported maximum {MAX_SLOTS}")
    if num_slots < num_experts:
        raise InputError(
            f"{s_name}: {num_slots} physical slots cannot serve {num_experts} logical experts "
            f"(need {s_name} >= {num_experts})"
        )
    if num_slots % num_ranks:
        raise InputError(
            f"{s_name}: {num_slots} slots are not divisible by {r_name}={num_ranks} "
            f"(every rank must hold the same number of slots; try {-(-num_slots // num_ranks) * num_ranks})"
        )
    if num_ranks % num_nodes:
        raise InputError(f"{r_name}: {num_ranks} ranks are not divisible by {n_name}={num_nodes}")
    if num_groups is not None:
        check_positive_int(num_groups, g_name)
        if num_experts % num_groups:
            raise InputError(f"{g_name}: {num_experts} experts cannot be split into {num_groups} equal groups")


def _finite_nonnegative(arr: np.ndarray, name: str) -> None:
    """Raise :class:`InputError` naming ``name`` and the first bad index for NaN / infinite / negative loads."""
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InputError(f"{name}: contains NaN or infinity (first at index {bad})")
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0].tolist()
        raise InputError(f"{name}: contains negative loads (first at index {bad}, value {arr[tuple(bad)]})")
