"""vllm-ascend expert-map JSON (``expert_map_path`` input, ``expert_map_record_path`` output).

Schema::

    {"moe_layer_count": L,
     "layer_list": [{"layer_id": i,                       # 0-based MoE layer index
                     "device_count": D,
                     "device_list": [{"device_id": d,
                                      "device_expert": [expert at local slot 0, 1, ...]}, ...]}, ...]}

Device ``d`` is EP rank ``d``; its ``device_expert`` list is the rank's slots in order, so the
global slot of local slot ``j`` is ``d * spr + j``. Written like vllm-ascend's
``_export_tensor_to_file`` (``json.dump(record, indent=4)``).

vllm-ascend keeps, per layer and device, one local slot index per expert (``expert_map [L, D, E]``),
so an expert cannot occupy two slots of one device: such files are rejected on read, and such
placements on write (use a policy that avoids co-located replicas).

A ``layer_id`` equal to ``moe_layer_count`` is vllm-ascend's MTP layer; it is skipped (noted in
``meta``). Newer optional top-level keys (``pool_mode``, ``pool_size``, ``strategy_version``) are
kept in ``meta``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np

from eplb.formats._common import Decoded, MapFormatError, as_int, as_int_list, parse_json
from eplb.placement import Placement

__all__ = ["SERVING_VERSIONS", "decode", "decode_obj", "encode", "serving_hint", "serving_options"]

OPTIONAL_KEYS = ("pool_mode", "pool_size", "strategy_version")


def _device_rows(path: str, li: int, lid: int, layer: Any, device_count: int | None) -> list[list[int]]:
    where = f"{path}: layer_list[{li}]"
    if not isinstance(layer, dict):
        raise MapFormatError(f"{where}: expected an object with layer_id, device_count, device_list")
    for key in ("device_count", "device_list"):
        if key not in layer:
            raise MapFormatError(f"{where} (layer {lid}): missing field '{key}'")
    dc = as_int(layer["device_count"], f"{where} (layer {lid}): device_count", minimum=1)
    if device_count is not None and dc != device_count:
        raise MapFormatError(f"{path}: layer {lid}: device_count is {dc}, expected {device_count} (as in the first layer)")
    dl = layer["device_list"]
    if not isinstance(dl, list):
        raise MapFormatError(f"{where} (layer {lid}): device_list must be a list")
    if len(dl) != dc:
        raise MapFormatError(f"{path}: layer {lid}: device_list has {len(dl)} devices, expected device_count={dc}")
    rows: dict[int, list[int]] = {}
    for k, dev in enumerate(dl):
        dwhere = f"{path}: layer {lid}: device_list[{k}]"
        if not isinstance(dev, dict) or "device_expert" not in dev:
            raise MapFormatError(f"{dwhere}: expected an object with 'device_expert'")
        did = as_int(dev.get("device_id", k), f"{dwhere}: device_id", minimum=0)
        if did >= dc:
            raise MapFormatError(f"{dwhere}: device_id {did} out of range [0, {dc})")
        if did in rows:
            raise MapFormatError(f"{path}: layer {lid}: device {did} listed twice")
        rows[did] = as_int_list(dev["device_expert"], f"{dwhere}.device_expert")
    lengths = Counter(len(r) for r in rows.values())
    expected = lengths.most_common(1)[0][0]
    for did in sorted(rows):
        if len(rows[did]) != expected:
            raise MapFormatError(f"{path}: layer {lid}: device {did} has {len(rows[did])} slots, expected {expected}")
        dup = [e for e, n in Counter(rows[did]).items() if n > 1]
        if dup:
            raise MapFormatError(
                f"{path}: layer {lid}: device {did} holds expert {dup[0]} in {Counter(rows[did])[dup[0]]} slots; "
                "vllm-ascend allows one slot per expert per device"
            )
    return [rows[d] for d in range(dc)]


def decode_obj(path: str, obj: Any) -> Decoded:
    """Validate a parsed expert-map object and turn it into ``[L, D * spr]`` rows."""
    if not isinstance(obj, dict):
        raise MapFormatError(f"{path}: expected a JSON object with 'moe_layer_count' and 'layer_list'")
    for key in ("moe_layer_count", "layer_list"):
        if key not in obj:
            raise MapFormatError(f"{path}: missing field '{key}'")
    L = as_int(obj["moe_layer_count"], f"{path}: moe_layer_count", minimum=1)
    layers = obj["layer_list"]
    if not isinstance(layers, list):
        raise MapFormatError(f"{path}: layer_list must be a list")
    found: dict[int, list[list[int]]] = {}
    device_count: int | None = None
    meta: dict[str, Any] = {k: obj[k] for k in OPTIONAL_KEYS if k in obj}
    for li, layer in enumerate(layers):
        if not isinstance(layer, dict) or "layer_id" not in layer:
            raise MapFormatError(f"{path}: layer_list[{li}]: missing field 'layer_id'")
        lid = as_int(layer["layer_id"], f"{path}: layer_list[{li}].layer_id", minimum=0)
        if lid > L:
            raise MapFormatError(f"{path}: layer_list[{li}]: layer_id {lid} exceeds moe_layer_count={L} (Invalid EPLB Table)")
        if lid == L:
            meta["mtp_layer_skipped"] = True  # vllm-ascend: layer_id == moe_layer_count is the MTP layer
            continue
        if lid in found:
            raise MapFormatError(f"{path}: layer {lid} is listed twice in layer_list")
        rows = _device_rows(path, li, lid, layer, device_count)
        device_count = len(rows)
        found[lid] = rows
    missing = [i for i in range(L) if i not in found]
    if missing:
        raise MapFormatError(f"{path}: layer(s) {missing[:8]} missing from layer_list (moe_layer_count={L})")
    spr = {len(found[i][0]) for i in range(L)}
    if len(spr) > 1:
        first = len(found[0][0])
        bad = next(i for i in range(L) if len(found[i][0]) != first)
        raise MapFormatError(
            f"{path}: layer {bad}: devices have {len(found[bad][0])} slots, expected {first} (as in layer 0)"
        )
    assert device_count is not None
    phy2log = np.asarray([[e for row in found[i] for e in row] for i in range(L)], dtype=np.int64)
    return Decoded(phy2log.reshape(L, -1), None, ep_size=device_count, meta=meta)


def decode(path: os.PathLike[str] | str, data: bytes) -> Decoded:
    """Read an expert-map JSON file."""
    return decode_obj(str(path), parse_json(path, data))


def encode(placement: Placement) -> bytes:
    """The expert-map JSON of ``placement`` (``layer_id`` = MoE layer position ``0..L-1``)."""
    erc = placement.expert_rank_count()  # [L, E, R]
    if np.any(erc > 1):
        pos, e, r = (int(v) for v in np.argwhere(erc > 1)[0])
        raise MapFormatError(
            f"vllm-ascend: layer {placement.layer_ids[pos]}: rank {r} holds expert {e} in {int(erc[pos, e, r])} slots; "
            "vllm-ascend's expert map allows one slot per expert per device "
            f"({int(placement.colocated_duplicates().sum())} co-located replicas in all); "
            "plan with a policy that avoids co-located replicas"
        )
    re = placement.rank_experts()  # [L, R, spr]
    record: dict[str, Any] = {"moe_layer_count": placement.num_layers, "layer_list": []}
    for i in range(placement.num_layers):
        record["layer_list"].append({
            "layer_id": i,
            "device_count": placement.num_ranks,
            "device_list": [{"device_id": d, "device_expert": re[i, d].tolist()} for d in range(placement.num_ranks)],
        })
    return json.dumps(record, indent=4).encode("utf-8")


#: vllm-ascend versions and where they read the expert-map options (vllm_ascend/ascend_config.py):
#: up to v0.13 top-level keys of ``--additional-config``; from v0.18 only ``additional_config["eplb_config"]``
#: (a top-level ``expert_map_path`` is silently ignored there). Versions in between: check their docs.
SERVING_VERSIONS = ("<= v0.13", ">= v0.18")


def serving_options(path: str, placement: Placement) -> dict[str, dict[str, Any]]:
    """``{vllm-ascend version range: --additional-config JSON}`` to serve the map written to ``path``.

    The redundant-expert count ``S - E`` must match the file (vllm-ascend sizes its slots from it;
    >= v0.18 fails at start-up with "EPLB local expert capacity mismatch" otherwise).
    """
    red = int(placement.num_slots - placement.num_experts)
    return {
        "<= v0.13": {"expert_map_path": str(path), "init_redundancy_expert": red},
        ">= v0.18": {"eplb_config": {"expert_map_path": str(path), "num_redundant_experts": red}},
    }


def serving_hint(path: str, placement: Placement) -> str:
    """Lines telling how to serve ``path`` with each vllm-ascend version (printed by ``eplb plan`` / ``convert``)."""
    lines = [f"serve with vllm-ascend {ver}: --additional-config '{json.dumps(cfg)}'"
             for ver, cfg in serving_options(path, placement).items()]
    return "\n".join(lines)
