"""vLLM's EPLB expert maps, as its ``EplbState`` holds them, in a JSON or ``.pt`` file.

vLLM keeps, per MoE layer (the layer axis counts MoE layers only):

* ``physical_to_logical_map`` ``[num_moe_layers, num_physical_experts]``;
* ``logical_to_physical_map`` ``[num_moe_layers, num_logical_experts, num_redundant_experts + 1]``
  (slots of each expert, ``-1`` padded);
* ``logical_replica_count`` ``[num_moe_layers, num_logical_experts]``.

vLLM has no map-file option of its own; this file carries those three tensors (``.pt``: int64
tensors in a dict; JSON: nested lists) plus ``num_logical_experts``, ``ep_size`` and the model
``layer_ids`` so nothing is lost. Only ``physical_to_logical_map`` is required on read (a bare
``[L, S]`` tensor saved with ``torch.save`` is accepted too); the other two, when present, must
agree with it. Physical slot ``s`` lives on EP rank ``s // (num_physical / ep_size)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb._checks import exact_ints
from eplb.formats._common import (
    Decoded,
    MapFormatError,
    as_int,
    as_int_list,
    as_int_matrix,
    dump_json,
    torch_bytes,
)
from eplb.placement import Placement

__all__ = ["KEYS", "decode_obj", "encode"]

KEYS = ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count", "num_logical_experts",
        "ep_size", "layer_ids")


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def decode_obj(path: str, obj: Any) -> Decoded:
    """Validate a parsed vLLM map (dict or bare tensor)."""
    if hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        obj = {"physical_to_logical_map": obj}
    if not isinstance(obj, dict) or "physical_to_logical_map" not in obj:
        raise MapFormatError(f"{path}: expected a dict with 'physical_to_logical_map' [num_moe_layers, num_physical_experts]")
    phy = as_int_matrix(obj["physical_to_logical_map"], f"{path}: physical_to_logical_map")
    L, S = phy.shape
    E = as_int(obj["num_logical_experts"], f"{path}: num_logical_experts", minimum=1) if "num_logical_experts" in obj else None
    ep = as_int(obj["ep_size"], f"{path}: ep_size", minimum=1) if obj.get("ep_size") is not None else None
    lids: tuple[int, ...] | None = None
    if obj.get("layer_ids") is not None:
        lids = tuple(as_int_list(obj["layer_ids"], f"{path}: layer_ids"))
        if len(lids) != L:
            raise MapFormatError(f"{path}: layer_ids has {len(lids)} entries for {L} layers")
    if "logical_replica_count" in obj:
        cnt = _np(obj["logical_replica_count"])
        if cnt.ndim != 2 or cnt.shape[0] != L:
            raise MapFormatError(f"{path}: logical_replica_count: expected shape [{L}, num_logical_experts], got {cnt.shape}")
        E = E or int(cnt.shape[1])
        if cnt.shape[1] != E:
            raise MapFormatError(f"{path}: logical_replica_count has {cnt.shape[1]} experts, expected {E}")
        if phy.min() >= 0 and phy.max() < E:
            have = np.zeros((L, E), dtype=np.int64)
            np.add.at(have, (np.repeat(np.arange(L), S), phy.ravel()), 1)
            if not np.array_equal(have, cnt):
                i, e = (int(v) for v in np.argwhere(have != cnt)[0])
                raise MapFormatError(
                    f"{path}: layer {i}: logical_replica_count says expert {e} has {int(cnt[i, e])} replicas, "
                    f"physical_to_logical_map gives it {int(have[i, e])}"
                )
    if "logical_to_physical_map" in obj:
        try:  # range-checked before the cast: a uint64 2**64-1 must not become a -1 padding entry
            l2p = exact_ints(obj["logical_to_physical_map"], f"{path}: logical_to_physical_map", ndim=3)
        except ValueError as exc:
            raise MapFormatError(str(exc)) from None
        if l2p.ndim != 3 or l2p.shape[0] != L:
            raise MapFormatError(f"{path}: logical_to_physical_map: expected shape [{L}, experts, max_replicas], got {l2p.shape}")
        E = E or int(l2p.shape[1])
        if l2p.shape[1] != E:
            raise MapFormatError(f"{path}: logical_to_physical_map has {l2p.shape[1]} experts, expected {E}")
        if np.any((l2p < -1) | (l2p >= S)):
            i, e, k = (int(v) for v in np.argwhere((l2p < -1) | (l2p >= S))[0])
            raise MapFormatError(f"{path}: layer {i}: logical_to_physical_map[{e}][{k}] = {int(l2p[i, e, k])}, expected -1 or a slot in [0, {S})")
        if phy.min() >= 0 and phy.max() < E:
            li, ei, ki = np.nonzero(l2p >= 0)
            slots = l2p[li, ei, ki]
            wrong = phy[li, slots] != ei
            listed = np.zeros((L, S), dtype=np.int64)
            np.add.at(listed, (li, slots), 1)
            if np.any(wrong):
                j = int(np.argmax(wrong))
                raise MapFormatError(
                    f"{path}: layer {int(li[j])}: logical_to_physical_map puts expert {int(ei[j])} in slot {int(slots[j])}, "
                    f"but physical_to_logical_map has expert {int(phy[li[j], slots[j]])} there"
                )
            if np.any(listed != 1):
                i, s = (int(v) for v in np.argwhere(listed != 1)[0])
                raise MapFormatError(f"{path}: layer {i}: logical_to_physical_map lists slot {s} {int(listed[i, s])} times, expected once")
    return Decoded(phy, lids, num_experts=E, ep_size=ep)


def encode(placement: Placement, *, container: str = "pt") -> bytes:
    """The three vLLM tensors plus sizes and layer ids, as a ``.pt`` dict or JSON."""
    width = placement.num_slots - placement.num_experts + 1  # vLLM: num_redundant_experts + 1
    l2p = np.full((placement.num_layers, placement.num_experts, width), -1, dtype=np.int64)
    l2p[:, :, : placement.max_replicas] = placement.log2phy
    payload: dict[str, Any] = {
        "physical_to_logical_map": placement.phy2log,
        "logical_to_physical_map": l2p,
        "logical_replica_count": placement.logcnt,
        "num_logical_experts": placement.num_experts,
        "ep_size": placement.num_ranks,
        "layer_ids": list(placement.layer_ids),
    }
    if container == "pt":
        import torch

        return torch_bytes({k: torch.from_numpy(np.array(v, dtype=np.int64)) if isinstance(v, np.ndarray) else v
                            for k, v in payload.items()})
    if container != "json":
        raise MapFormatError(f"vllm: container must be 'json' or 'pt', got {container!r}")
    return dump_json({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in payload.items()})
