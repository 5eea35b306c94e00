"""Input checks shared by every public entry point.

Every check raises :class:`ValueError` (or a subclass) whose message names the
argument and says what was expected, so a user sees *what* is wrong and *where*.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
        raise ValueError(f"{name}: expected a {shapes} array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected numeric loads, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    if arr.shape[-1] == 0 or (arr.ndim >= 2 and arr.shape[-2] == 0):
        raise ValueError(f"{name}: empty array of shape {tuple(arr.shape)}; need at least one layer and one expert")
    if num_experts is not None and arr.shape[-1] != num_experts:
        raise ValueError(f"{name}: expected {num_experts} experts in the last dimension, got {arr.shape[-1]}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{name}: contains NaN or infinity (first at index {bad})")
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0].tolist()
        raise ValueError(f"{name}: contains negative loads (first at index {bad}, value {arr[tuple(bad)]})")
    return arr


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a positive ``int`` or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return int(value)


def check_layout(num_experts: int, num_slots: int, num_ranks: int, num_nodes: int = 1) -> None:
    """Check that ``num_slots`` slots can be laid out over ranks and nodes for ``num_experts`` experts."""
    check_positive_int(num_slots, "num_replicas")
    check_positive_int(num_ranks, "num_gpus")
    check_positive_int(num_nodes, "num_nodes")
    if num_slots < num_experts:
        raise ValueError(
            f"num_replicas: {num_slots} physical slots cannot serve {num_experts} logical experts "
            f"(need num_replicas >= num_experts)"
        )
    if num_slots % num_ranks:
        raise ValueError(
            f"num_replicas: {num_slots} slots are not divisible by num_gpus={num_ranks} "
            f"(every rank must hold the same number of slots)"
        )
    if num_ranks % num_nodes:
        raise ValueError(f"num_gpus: {num_ranks} ranks are not divisible by num_nodes={num_nodes}")
