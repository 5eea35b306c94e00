"""SGLang ``--init-expert-location`` files (JSON or ``.pt``).

Two forms, told apart by their key (SGLang ``compute_initial_expert_location_metadata``):

* ``{"physical_to_logical_map": [layers, num_physical]}`` (``init_by_mapping``): the expert of
  every physical slot. SGLang passes the dict as keyword arguments, so the file holds exactly this
  one key. The layer axis is SGLang's ``num_layers`` = the model's ``num_hidden_layers`` (dense
  layers included), so row ``i`` is model layer ``i``; physical slot ``s`` lives on rank
  ``s // (num_physical / ep_size)``.
* ``{"logical_count": [..., layers, num_logical]}`` (``init_by_eplb``, also SGLang's ``stat``
  expert-distribution dump): token counts, from which SGLang runs its EPLB algorithm at start-up.
  Reading it plans a placement (policy, slots and EP size must be given).

On write, a placement whose layer ids are not ``0..L-1`` gets one row per model layer
``0..num_layers-1``; rows of layers it does not cover (dense layers) hold SGLang's trivial map
``slot % num_experts``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb._checks import exact_counts
from eplb.formats._common import Decoded, MapFormatError, as_int_matrix, dump_json, torch_bytes
from eplb.placement import Placement

__all__ = ["decode_obj", "encode"]


def decode_obj(path: str, obj: Any) -> Decoded:
    """Validate a parsed SGLang dict (from JSON or ``.pt``)."""
    if not isinstance(obj, dict):
        raise MapFormatError(f"{path}: expected a dict with 'physical_to_logical_map' or 'logical_count', got {type(obj).__name__}")
    if "physical_to_logical_map" in obj:
        extra = [k for k in obj if k != "physical_to_logical_map"]
        if extra:
            raise MapFormatError(
                f"{path}: unexpected key(s) {extra} next to 'physical_to_logical_map'; SGLang passes the dict as "
                "keyword arguments to init_by_mapping and fails on any other key"
            )
        arr = as_int_matrix(obj["physical_to_logical_map"], f"{path}: physical_to_logical_map")
        return Decoded(arr, tuple(range(arr.shape[0])), meta={"sglang_form": "physical_to_logical_map"})
    if "logical_count" in obj:
        try:  # exact: no uint64 wrap, no rounding past 2**53, no strings or bools taken for numbers
            counts = exact_counts(obj["logical_count"], f"{path}: logical_count", ndim=(1, 2, 3, 4)).astype(np.float64)
        except ValueError as exc:
            raise MapFormatError(str(exc)) from None
        if counts.ndim not in (2, 3):
            raise MapFormatError(f"{path}: logical_count: expected [layers, experts] or [steps, layers, experts], got shape {counts.shape}")
        if counts.size == 0:
            raise MapFormatError(f"{path}: logical_count is empty (shape {counts.shape})")
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            bad = np.argwhere(~np.isfinite(counts) | (counts < 0))[0].tolist()
            raise MapFormatError(f"{path}: logical_count: negative or non-finite count at index {bad}")
        L = counts.shape[-2]
        return Decoded(None, tuple(range(L)), num_experts=int(counts.shape[-1]), loads=counts,
                       meta={"sglang_form": "logical_count"})
    raise MapFormatError(f"{path}: no 'physical_to_logical_map' or 'logical_count' key (found {list(obj)[:6]})")


def full_rows(placement: Placement, num_layers: int | None) -> np.ndarray:
    """``[num_layers, S]`` rows indexed by model layer (trivial rows for layers the placement lacks)."""
    lids = placement.layer_ids
    if min(lids) < 0:
        raise MapFormatError(f"sglang: layer ids must be model layer indices >= 0, got {list(lids)}")
    n = max(lids) + 1 if num_layers is None else int(num_layers)
    if n <= max(lids):
        raise MapFormatError(f"sglang: num_layers={n} but the placement has layer {max(lids)}")
    rows = np.tile(np.arange(placement.num_slots, dtype=np.int64) % placement.num_experts, (n, 1))
    rows[list(lids)] = placement.phy2log
    return rows


def encode(placement: Placement, *, container: str = "json", num_layers: int | None = None) -> bytes:
    """``{"physical_to_logical_map": [num_layers, S]}`` as JSON or a torch ``.pt`` dict (int64 tensor)."""
    rows = full_rows(placement, num_layers)
    if container == "pt":
        import torch

        return torch_bytes({"physical_to_logical_map": torch.from_numpy(rows)})
    if container != "json":
        raise MapFormatError(f"sglang: container must be 'json' or 'pt', got {container!r}")
    return dump_json({"physical_to_logical_map": rows.tolist()})
