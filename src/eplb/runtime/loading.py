"""Placement loading for the runtime: a Placement object, any engine map file, or TensorRT-LLM's YAML.

Map files are read by :func:`eplb.formats.read_placement` (TensorRT-LLM ``load_balancer`` YAML
with ``num_slots`` / ``initial_global_assignments`` / ``layer_updates_per_iter``, vllm-ascend,
SGLang, vLLM, native JSON). One case is the runtime's own: a TensorRT-LLM online-only config
(``num_slots`` and ``layer_updates_per_iter`` but no ``initial_global_assignments``) starts from
the contiguous placement with ``num_slots`` slots (slot ``s`` holds expert ``s % E``), as TensorRT-LLM
does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eplb.placement import Placement, PlacementError

__all__ = ["load_placement"]


def _online_only_trtllm(path: Path) -> dict[str, Any] | None:
    """The load_balancer mapping of a TensorRT-LLM YAML without initial assignments, else None."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        return None
    from eplb._safe_read import parse_yaml, read_bytes

    try:
        obj = parse_yaml(path, read_bytes(path, max_bytes=64 << 20))
    except (OSError, ValueError):
        return None  # read_placement then says what is wrong with the file
    if isinstance(obj, dict) and isinstance(obj.get("moe_config"), dict):
        lb = obj["moe_config"].get("load_balancer")
        obj = lb if isinstance(lb, dict) else obj
    if isinstance(obj, dict) and "num_slots" in obj and obj.get("initial_global_assignments") is None:
        return obj
    return None


def load_placement(
    source: Placement | str | os.PathLike[str] | None,
    *,
    num_experts: int,
    ep_size: int,
    layer_ids: Sequence[int],
    num_slots: int | None = None,
    num_nodes: int | None = None,
) -> Placement:
    """The placement of a model's MoE layers ``layer_ids`` (model layer indices) for ``ep_size`` ranks.

    Args:
        source: a :class:`~eplb.Placement`, a map file path (any format), or ``None`` for the contiguous
            placement with ``num_slots`` slots (default ``num_experts``: identity, no redundancy).
        num_experts: the model's experts per layer (checked against the map).
        ep_size: EP ranks (checked against the map where it records one).
        layer_ids: the model's MoE layer ids; rows keyed by model layer are selected, positional
            rows are labelled with them.
        num_slots: slots per layer for ``source=None`` (checked against a TensorRT-LLM online config).

    Raises:
        PlacementError (a ValueError) naming the file and the mismatch.
    """
    lids = [int(i) for i in layer_ids]
    if isinstance(source, Placement):
        source.check_compatible(num_experts=num_experts, num_ranks=ep_size)
        return source
    if source is None:
        S = num_experts if num_slots is None else int(num_slots)
        try:
            return Placement.contiguous(len(lids), num_experts, ep_size, S, num_nodes or 1, layer_ids=lids)
        except PlacementError as exc:
            raise PlacementError(f"contiguous placement ({num_experts} experts, {S} slots, ep_size {ep_size}): "
                                 f"{exc}") from None
    p = Path(source)
    if not p.is_file():
        raise PlacementError(f"{p}: placement file not found")
    online = _online_only_trtllm(p)
    if online is not None:
        try:
            S = int(online["num_slots"])
        except (TypeError, ValueError):
            raise PlacementError(f"{p}: num_slots must be an integer, got {online['num_slots']!r}") from None
        if num_slots is not None and num_slots != S:
            raise PlacementError(f"{p}: num_slots is {S} in the file, expected {num_slots}")
        rec = online.get("ep_size")
        if rec is not None and int(rec) != ep_size:
            raise PlacementError(f"{p}: ep_size is {rec} in the file but the process group has {ep_size} ranks")
        try:
            pl = Placement.contiguous(len(lids), num_experts, ep_size, S, num_nodes or 1, layer_ids=lids)
        except PlacementError as exc:
            raise PlacementError(f"{p}: {exc}") from None
        return pl.with_meta(source_format="trtllm", layer_updates_per_iter=int(online.get("layer_updates_per_iter", 0)),
                            note="online-only config: contiguous initial placement")
    from eplb.formats import read_placement

    return read_placement(p, num_experts=num_experts, ep_size=ep_size, num_nodes=num_nodes, layer_ids=lids)
