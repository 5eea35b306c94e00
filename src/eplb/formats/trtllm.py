"""TensorRT-LLM ``moe_load_balancer.yaml`` (wide-EP load balancer config).

Schema (TensorRT-LLM ``examples/wide_ep/ep_load_balancer``, ``MoeLoadBalancerConfig``)::

    initial_global_assignments:       # block-style mapping: model layer index -> expert id of slot 0..S-1
      3: [138, 81, 60, ...]           # flow-style list, length num_slots; successive S/ep_size slots = one rank
      4: [24, 243, 72, ...]
    layer_updates_per_iter: 0         # 0 = static (offline) balancer
    num_slots: 288

Written like TensorRT-LLM's ``save_eplb_config``: ``yaml.dump`` with flow-style lists, infinite
line width, sorted keys. The reader also accepts a whole ``extra_llm_api_options`` YAML with a
``moe_config.load_balancer`` mapping or path.

The serving loader builds ``MoeLoadBalancerConfig(**yaml.safe_load(f))``; that class (a pydantic
model with ``extra="forbid"``, or in older versions a dataclass whose ``ep_rank`` / ``ep_size`` are
``field(init=False)``) accepts exactly :data:`SERVING_KEYS`. So :func:`encode` writes only those by
default; ``ep_size`` (read by the co-occurrence generator and by ``report_load_statistics.py
--projection_eplb_config_path``) is written only on request (``with_ep_size=True``). The reader
accepts both. The default file still records the EP size for eplb, in a leading YAML comment
(``# ep_size: 36 ...``) that ``yaml.safe_load`` ignores.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from eplb.formats._common import (
    MAX_FILE_BYTES,
    Decoded,
    MapFormatError,
    as_int,
    as_int_list,
    parse_yaml,
    read_bytes,
)
from eplb.placement import Placement

__all__ = ["KEYS", "SERVING_KEYS", "decode", "encode"]

#: The keys TensorRT-LLM's serving loader (``MoeLoadBalancerConfig``) accepts: exactly these.
SERVING_KEYS = ("initial_global_assignments", "layer_updates_per_iter", "num_slots")
#: The keys eplb reads: the serving keys plus ``ep_size`` (report projection / co-occurrence generator files).
KEYS = ("ep_size", *SERVING_KEYS)


def _layer_key(key: Any, path: os.PathLike[str] | str) -> int:
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    return as_int(key, f"{path}: initial_global_assignments key {key!r} (a model layer index)", minimum=0)


#: Largest load-balancer YAML an options file may point to.
MAX_INDIRECT_BYTES = 64 << 20


def _indirection(p: Path, lb: str) -> Path:
    """The file ``moe_config.load_balancer: PATH`` names: a regular file of bounded size in the options
    file's directory (or below it); never a device, a FIFO, or a path outside that directory."""
    base = p.parent.resolve()
    target = (Path(lb) if Path(lb).is_absolute() else p.parent / lb).resolve()
    if target != base and base not in target.parents:
        raise MapFormatError(f"{p}: moe_config.load_balancer: {lb!r} is outside the options file's directory {base} "
                             "(only files next to the config are read)")
    if not target.is_file():
        what = "no such file" if not target.exists() else "not a regular file"
        raise MapFormatError(f"{p}: moe_config.load_balancer: {lb!r}: {what}")
    if target.stat().st_size > MAX_INDIRECT_BYTES:
        raise MapFormatError(f"{p}: moe_config.load_balancer: {lb!r} is larger than {MAX_INDIRECT_BYTES} bytes")
    return target


def decode(path: os.PathLike[str] | str, data: bytes | None = None, _depth: int = 0) -> Decoded:
    """Read a TensorRT-LLM load-balancer YAML into rows keyed by model layer index."""
    p = Path(path)
    obj = parse_yaml(p, read_bytes(p, max_bytes=MAX_INDIRECT_BYTES if _depth else MAX_FILE_BYTES) if data is None else data)
    if not isinstance(obj, dict):
        raise MapFormatError(f"{p}: expected a YAML mapping with {list(KEYS)}, got {type(obj).__name__}")
    inline = False
    if "moe_config" in obj and "initial_global_assignments" not in obj:  # an extra_llm_api_options file
        lb = obj["moe_config"].get("load_balancer") if isinstance(obj["moe_config"], dict) else None
        if lb is None:
            raise MapFormatError(f"{p}: moe_config has no 'load_balancer' entry")
        if isinstance(lb, str):
            if _depth:
                raise MapFormatError(f"{p}: moe_config.load_balancer points to another options file")
            return decode(_indirection(p, lb), None, _depth + 1)
        if not isinstance(lb, dict):
            raise MapFormatError(f"{p}: moe_config.load_balancer must be a mapping or a path, got {lb!r}")
        obj, inline = lb, True
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        raise MapFormatError(
            f"{p}: unknown field(s) {unknown}; a TensorRT-LLM load-balancer config has only {list(KEYS)} "
            "(TensorRT-LLM rejects other keys)"
        )
    if "num_slots" not in obj:
        raise MapFormatError(f"{p}: missing field 'num_slots'")
    num_slots = as_int(obj["num_slots"], f"{p}: num_slots", minimum=1)
    lupi = as_int(obj.get("layer_updates_per_iter", 0), f"{p}: layer_updates_per_iter", minimum=0)
    ep_size = as_int(obj["ep_size"], f"{p}: ep_size", minimum=1) if obj.get("ep_size") is not None else None
    if ep_size is None and not inline:
        ep_size = _comment_ep_size(read_bytes(p) if data is None else data)
    iga = obj.get("initial_global_assignments")
    if iga is None:
        raise MapFormatError(
            f"{p}: no 'initial_global_assignments' (an online-only config with layer_updates_per_iter="
            f"{lupi}); there is no placement to read"
        )
    if not isinstance(iga, dict) or not iga:
        raise MapFormatError(f"{p}: initial_global_assignments must be a non-empty mapping layer -> [expert per slot]")
    rows: dict[int, list[int]] = {}
    for key, row in iga.items():
        lid = _layer_key(key, p)
        if lid in rows:
            raise MapFormatError(f"{p}: initial_global_assignments lists layer {lid} twice")
        vals = as_int_list(row, f"{p}: initial_global_assignments[{lid}]")
        if len(vals) != num_slots:
            raise MapFormatError(f"{p}: layer {lid}: {len(vals)} slots, expected num_slots={num_slots}")
        rows[lid] = vals
    lids = tuple(sorted(rows))
    phy2log = np.asarray([rows[i] for i in lids], dtype=np.int64).reshape(len(lids), num_slots)
    return Decoded(phy2log, lids, ep_size=ep_size, meta={"layer_updates_per_iter": lupi})


_EP_COMMENT = re.compile(rb"\A(?:#[^\n]*\n)*?# ep_size: (\d+)\b")


def _comment_ep_size(data: bytes) -> int | None:
    """The EP size recorded in eplb's leading ``# ep_size: N`` comment, if any."""
    m = _EP_COMMENT.match(data.lstrip(b"\xef\xbb\xbf"))
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


class _FlowListDumper:
    """A SafeDumper subclass built on first use (flow-style lists, block-style mappings)."""

    cls: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.cls is None:
            import yaml

            base = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when available: 10x faster

            class Dumper(base):  # type: ignore[valid-type,misc]
                pass

            def _flow_list(dumper: Any, data: Any) -> Any:
                return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)

            Dumper.add_representer(list, _flow_list)
            cls.cls = Dumper
        return cls.cls


def encode(placement: Placement, *, layer_updates_per_iter: int | None = None, with_ep_size: bool = False) -> bytes:
    """The YAML bytes of ``placement``.

    Args:
        layer_updates_per_iter: layers updated online per iteration (default: the placement's
            ``meta["layer_updates_per_iter"]``, else 0 = static).
        with_ep_size: also write ``ep_size`` (for ``report_load_statistics.py
            --projection_eplb_config_path``). Such a file is NOT loadable by TensorRT-LLM's serving
            loader, which rejects every key but :data:`SERVING_KEYS`; default False.
    """
    import yaml

    if any(i < 0 for i in placement.layer_ids):
        raise MapFormatError(f"trtllm: layer ids must be model layer indices >= 0, got {list(placement.layer_ids)}")
    lupi = layer_updates_per_iter if layer_updates_per_iter is not None else placement.meta.get("layer_updates_per_iter", 0)
    lupi = as_int(lupi, "layer_updates_per_iter", minimum=0)
    cfg: dict[str, Any] = {
        "num_slots": placement.num_slots,
        "initial_global_assignments": {int(lid): placement.phy2log[i].tolist() for i, lid in enumerate(placement.layer_ids)},
        "layer_updates_per_iter": lupi,
    }
    if with_ep_size:
        cfg["ep_size"] = placement.num_ranks
    text = yaml.dump(cfg, Dumper=_FlowListDumper.get(), width=2**30, sort_keys=True, default_flow_style=False)
    if not with_ep_size:  # for eplb only: a comment, which TensorRT-LLM's yaml.safe_load ignores
        text = f"# ep_size: {placement.num_ranks} (eplb; TensorRT-LLM reads only the keys below)\n" + text
    return text.encode("utf-8")
