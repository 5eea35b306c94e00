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
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InputError(f"{name}: contains NaN or infinity (first at index {bad})")
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0].tolist()
        raise InputError(f"{name}: contains negative loads (first at index {bad}, value {arr[tuple(bad)]})")
    return arr


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a positive ``int`` or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise InputError(f"{name}: expected a positive integer, got {value}")
    return int(value)


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
