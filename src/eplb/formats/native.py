"""eplb's own placement file: the whole :class:`~eplb.placement.Placement` and its provenance.

JSON of :meth:`Placement.to_dict`::

    {"format": "eplb.placement", "version": 1, "num_experts": E, "num_ranks": R, "num_nodes": N,
     "num_slots": S, "layer_ids": [...], "phy2log": [[...], ...],
     "meta": {"policy": ..., "num_groups": ..., "trace_digest": ..., "trace": ..., "iter_range": ...,
              "lower_bound": ..., "optimality_gap": ..., "placement_digest": ..., ...}}

``meta`` is free-form provenance; ``eplb plan`` records the trace hash, policy and parameters,
the lower bound and the gap there. ``placement_digest`` (sha256 of the content) is checked on read
when present, so a hand-edited map is noticed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.formats._common import Decoded, MapFormatError, as_int, as_int_list, as_int_matrix, dump_json
from eplb.placement import Placement

__all__ = ["decode_obj", "encode"]


def decode_obj(path: str, obj: Any) -> Decoded:
    """Validate a parsed native placement dict."""
    if not isinstance(obj, dict):
        raise MapFormatError(f"{path}: expected a JSON object")
    if obj.get("format") != "eplb.placement":
        raise MapFormatError(f"{path}: field 'format' is {obj.get('format')!r}, expected 'eplb.placement'")
    version = as_int(obj.get("version", 1), f"{path}: version")
    if version != 1:
        raise MapFormatError(f"{path}: version {version} is not supported (this eplb reads version 1)")
    for key in ("num_experts", "num_ranks", "phy2log"):
        if key not in obj:
            raise MapFormatError(f"{path}: missing field '{key}'")
    phy = as_int_matrix(obj["phy2log"], f"{path}: phy2log")
    if "num_slots" in obj and as_int(obj["num_slots"], f"{path}: num_slots") != phy.shape[1]:
        raise MapFormatError(f"{path}: num_slots is {obj['num_slots']} but phy2log rows have {phy.shape[1]} slots")
    lids = tuple(as_int_list(obj["layer_ids"], f"{path}: layer_ids")) if obj.get("layer_ids") else tuple(range(phy.shape[0]))
    if len(lids) != phy.shape[0]:
        raise MapFormatError(f"{path}: layer_ids has {len(lids)} entries for {phy.shape[0]} layers")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise MapFormatError(f"{path}: field 'meta' must be an object")
    return Decoded(
        phy, lids,
        num_experts=as_int(obj["num_experts"], f"{path}: num_experts", minimum=1),
        ep_size=as_int(obj["num_ranks"], f"{path}: num_ranks", minimum=1),
        num_nodes=as_int(obj.get("num_nodes", 1), f"{path}: num_nodes", minimum=1),
        meta=dict(meta),
    )


def check_digest(path: str, placement: Placement) -> None:
    """If ``meta["placement_digest"]`` is recorded, it must match the content."""
    want = placement.meta.get("placement_digest")
    if want is not None and want != placement.digest():
        raise MapFormatError(
            f"{path}: placement_digest in meta ({str(want)[:12]}...) does not match the content "
            f"({placement.digest()[:12]}...): the map was edited after it was written"
        )


def encode(placement: Placement) -> bytes:
    """``placement.to_dict()`` as JSON, with ``meta["placement_digest"]`` set."""
    d = placement.to_dict()
    d["meta"] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d["meta"].items()}
    d["meta"]["placement_digest"] = placement.digest()
    return dump_json(d)
