"""Read and write expert-load traces in every engine's format.

Formats (which one a path holds is decided by :func:`eplb.stats.io.detect_trace_format`, the one dispatcher):

* ``eplb``: one safetensors file (:meth:`Trace.save`); ``eplb-dir``: a chunked recording directory
  (:class:`eplb.stats.store.TraceWriter`; ranks summed when read).
* ``trtllm``: TensorRT-LLM's ``EXPERT_STATISTIC_PATH`` dump directory: ``meta_info.json``
  (``num_experts``, ``num_experts_per_token``) and ``rank{R}.safetensors`` with one ``[num_experts]``
  tensor per key ``"{iter}_{layer}"`` (summed over ranks; iterations contiguous; every
  ``(iter, layer)`` present); optional ``cooccurrence_rank{R}.safetensors`` (``[E, E]`` per key) and
  ``rank{R}_raw.safetensors`` (per-token top-k ids ``[tokens, k]`` per key).
* ``sglang``: SGLang's expert-distribution ``stat`` dump, a ``.pt`` dict with ``logical_count``
  ``[steps, layers, experts]`` (also accepted as ``--init-expert-location``).
* ``vllm-ascend``: vllm-ascend's gathered per-layer load array ``moe_load`` ``[L, D, slots per device]``
  (or ``[T, L, D, spr]``; ``.npy``/``.pt``/``.json``): physical loads per device-local slot, mapped to
  logical experts with the expert-map JSON (``expert_map=``), or identity when no map is given.
* ``npy`` / ``npz`` / ``csv`` / ``json``: plain ``[T, L, E]`` or ``[L, E]`` arrays.

Every writer is atomic (a file via :func:`atomic_write`; a directory is built under a temporary
name and renamed), and every reader error names the file and the key/field at fault.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import exact_counts
from eplb._io import atomic_dir, atomic_write
from eplb._safe_read import parse_json, read_bytes
from eplb.placement import Placement
from eplb.stats.trace import Trace, TraceError

__all__ = ["clean_sglang_dump", "read_sglang", "read_trtllm", "read_vllm_ascend", "write_sglang", "write_trtllm",
           "write_vllm_ascend"]

_RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
_COOC_FILE = re.compile(r"^cooccurrence_rank(\d+)\.safetensors$")
_RAW_FILE = re.compile(r"^rank(\d+)_raw\.safetensors$")
_KEY = re.compile(r"^(\d+)_(\d+)$")


def _eplb_info(trace: Trace) -> dict[str, Any]:
    return {"model": trace.model, "source": trace.source, "ep_size": trace.ep_size, "meta": trace.meta,
            "layer_ids": list(trace.layer_ids), "top_k": trace.top_k}


def _apply_info(trace: Trace, info: Any) -> Trace:
    if isinstance(info, dict):
        trace.model = str(info.get("model", trace.model))
        trace.source = str(info.get("source", trace.source))
        trace.meta = {**dict(info.get("meta", {}) or {}), **trace.meta}
        if not trace.ep_size:
            trace.ep_size = int(info.get("ep_size", 0) or 0)
        if not trace.top_k:
            trace.top_k = int(info.get("top_k", 0) or 0)
    return trace


# =========================================================================== TensorRT-LLM
def _load_st(f: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(f))
    except Exception as exc:
        if "bf16" in str(exc).lower() or "bfloat16" in str(exc).lower():
            from safetensors.torch import load_file as load_torch

            try:
                return {k: v.float().numpy() for k, v in load_torch(str(f)).items()}
            except Exception:  # noqa: BLE001 - not a bf16 file after all: a corrupt header
                pass
        raise TraceError(f"{f}: not a readable safetensors file ({str(exc)[:200]})") from None


def _parse_keyed(f: Path, data: dict[str, np.ndarray], shape: tuple[int, ...] | None, what: str,
                 out: dict[tuple[int, int], np.ndarray]) -> None:
    for key, arr in data.items():
        m = _KEY.match(key)
        if m is None:
            raise TraceError(f"{f}: key {key!r} is not '{{iter}}_{{layer}}'")
        if shape is not None and tuple(arr.shape) != shape:
            raise TraceError(f"{f}: key {key!r}: {what} of shape {tuple(arr.shape)}, expected {shape}")
        if arr.dtype.kind not in "biuf":
            raise TraceError(f"{f}: key {key!r}: expected numeric counts, got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
            raise TraceError(f"{f}: key {key!r}: counts must be finite integers")
        if np.any(arr < 0):
            raise TraceError(f"{f}: key {key!r}: negative count {arr[arr < 0].flat[0]} (expert {int(np.argmax(arr < 0))})")
        try:
            a = exact_counts(arr, f"key {key!r}", ndim=arr.ndim) if arr.size else arr.astype(np.int64)
        except ValueError as exc:
            raise TraceError(f"{f}: {exc}") from None
        k = (int(m.group(1)), int(m.group(2)))
        out[k] = out[k] + a if k in out else a


def _grid(path: Path, keys: set[tuple[int, int]], what: str) -> tuple[list[int], list[int]]:
    if not keys:
        raise TraceError(f"{path}: no {what} keys in the rank files")
    iters = sorted({i for i, _ in keys})
    layers = sorted({ly for _, ly in keys})
    gaps = sorted(set(range(iters[0], iters[-1] + 1)) - set(iters))
    if gaps:
        raise TraceError(f"{path}: iterations are not contiguous: missing iteration(s) {gaps[:10]} "
                         f"between {iters[0]} and {iters[-1]}")
    missing = [f"{i}_{ly}" for i in iters for ly in layers if (i, ly) not in keys]
    if missing:
        raise TraceError(f"{path}: missing {what} key(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                         f"(every (iter, layer) must be present)")
    return iters, layers


def read_trtllm(path: str | os.PathLike[str], *, raw: bool = False) -> Trace:
    """Read a TensorRT-LLM ``EXPERT_STATISTIC_PATH`` dump (ranks summed, like ``load_expert_statistic``).

    ``ep_size`` = number of rank files; ``top_k`` = ``num_experts_per_token``; layer ids = the model
    layer indices of the keys; co-occurrence is read when present; raw top-k ids when ``raw``.
    """
    p = Path(path)
    mf = p / "meta_info.json"
    if not mf.is_file():
        raise TraceError(f"{mf}: missing (a TensorRT-LLM dump needs meta_info.json)")
    meta_info = _json_file(mf)
    if not isinstance(meta_info, dict):
        raise TraceError(f"{mf}: expected a JSON object")
    for key in ("num_experts", "num_experts_per_token"):
        if key not in meta_info:
            raise TraceError(f"{mf}: missing field '{key}'")
    E = _int_field(mf, meta_info, "num_experts", 1)
    k = _int_field(mf, meta_info, "num_experts_per_token", 0)
    files = sorted((int(m.group(1)), f) for f in p.iterdir() if (m := _RANK_FILE.match(f.name)))
    if not files:
        raise TraceError(f"{p}: no rank{{R}}.safetensors files")
    stat: dict[tuple[int, int], np.ndarray] = {}
    for _, f in files:
        _parse_keyed(f, _load_st(f), (E,), "counts", stat)
    iters, layers = _grid(p, set(stat), "count")
    counts = np.stack([np.stack([stat[(i, ly)] for ly in layers]) for i in iters])
    co = None
    cfiles = sorted((int(m.group(1)), f) for f in p.iterdir() if (m := _COOC_FILE.match(f.name)))
    if cfiles:
        cstat: dict[tuple[int, int], np.ndarray] = {}
        for _, f in cfiles:
            _parse_keyed(f, _load_st(f), (E, E), "co-occurrence", cstat)
        if set(cstat) != set(stat):
            raise TraceError(f"{p}: co-occurrence keys differ from the count keys")
        co = np.stack([np.stack([cstat[(i, ly)] for ly in layers]) for i in iters])
    ids = off = None
    if raw:
        ids, off = _read_trtllm_raw(p, iters, layers, E)
    tr = Trace(counts, tuple(layers), np.asarray(iters), k, source=f"trtllm:{p}", ep_size=len(files),
               cooccurrence=co, topk_ids=ids, topk_offsets=off)
    return _apply_info(tr, meta_info.get("eplb_trace"))


def _read_trtllm_raw(p: Path, iters: list[int], layers: list[int], E: int) -> tuple[np.ndarray, np.ndarray]:
    rfiles = sorted((int(m.group(1)), f) for f in p.iterdir() if (m := _RAW_FILE.match(f.name)))
    if not rfiles:
        raise TraceError(f"{p}: no rank{{R}}_raw.safetensors files (raw top-k ids were requested)")
    pieces: list[np.ndarray] = []
    lens = np.zeros(len(iters), dtype=np.int64)
    per_rank = [(f, _load_st(f)) for _, f in rfiles]
    for si, it in enumerate(iters):
        for f, data in per_rank:
            rows = []
            for ly in layers:
                key = f"{it}_{ly}"
                if key not in data:
                    raise TraceError(f"{f}: missing raw key {key!r}")
                a = data[key]
                if a.ndim != 2:
                    raise TraceError(f"{f}: key {key!r}: expected [tokens, k] ids, got shape {tuple(a.shape)}")
                rows.append(a)
            n = {r.shape[0] for r in rows}
            if len(n) != 1:
                raise TraceError(f"{f}: iteration {it}: layers have different token counts {sorted(n)}")
            pieces.append(np.stack(rows, axis=1).astype(np.int64))
            lens[si] += rows[0].shape[0]
    return np.concatenate(pieces), np.concatenate([[0], np.cumsum(lens)])


def write_trtllm(trace: Trace, path: str | os.PathLike[str], *, ep_size: int | None = None,
                 shards: Sequence[Trace] | None = None) -> None:
    """Write TensorRT-LLM's dump layout (readable by its ``report_load_statistics.py``/``generate_eplb_config.py``).

    With ``shards`` (per-rank traces) each becomes ``rank{R}.safetensors``. Otherwise the counts go to
    ``rank0.safetensors`` and ``rank1..ep_size-1`` hold zeros, so the ranks still sum to the trace
    and TensorRT-LLM infers the right ``ep_size`` from the number of files (default ``trace.ep_size`` or 1).
    Co-occurrence goes to ``cooccurrence_rank{R}.safetensors``; raw ids to ``rank{R}_raw.safetensors``
    (only for ``shards``-less traces, all in rank 0; note old TensorRT-LLM loaders glob those as rank files).
    """
    from safetensors.numpy import save

    p = Path(path)
    parts = list(shards) if shards is not None else [trace]
    R = len(parts) if shards is not None else int(ep_size or trace.ep_size or 1)
    if R <= 0:
        raise TraceError(f"ep_size: expected a positive integer, got {R}")
    assert trace.step_ids is not None
    steps = trace.step_ids
    if trace.num_steps > 1 and np.any(np.diff(steps) != 1):
        raise TraceError("trtllm: TensorRT-LLM needs contiguous iteration ids; the trace has gaps "
                         f"(steps {int(steps[0])}..{int(steps[-1])} with {trace.num_steps} steps)")
    mx = int(trace.counts.max()) if trace.counts.size else 0
    dt = np.int32 if mx < 2**31 else np.int64

    def keyed(arr: np.ndarray) -> dict[str, np.ndarray]:  # [T, L, ...] -> {"{iter}_{layer}": ...}
        return {f"{int(s)}_{lid}": np.ascontiguousarray(arr[t, j], dtype=dt)
                for t, s in enumerate(steps) for j, lid in enumerate(trace.layer_ids)}

    def build(tmp: Path) -> None:
        info = {"num_experts": trace.num_experts, "num_experts_per_token": trace.top_k, "eplb_trace": _eplb_info(trace)}
        (tmp / "meta_info.json").write_text(json.dumps(info))
        for r in range(R):
            part = parts[r] if shards is not None else None
            if part is not None and (part.layer_ids != trace.layer_ids or not np.array_equal(np.asarray(part.step_ids), steps)):
                raise TraceError(f"shards: shard {r} has other layers/steps than the trace")
            c = part.counts if part is not None else (trace.counts if r == 0 else np.zeros_like(trace.counts))
            (tmp / f"rank{r}.safetensors").write_bytes(save(keyed(c)))
            co_src = part if part is not None else trace
            if co_src.cooccurrence is not None:
                co = co_src.cooccurrence if (part is not None or r == 0) else np.zeros_like(co_src.cooccurrence)
                (tmp / f"cooccurrence_rank{r}.safetensors").write_bytes(save(keyed(co)))
        if shards is None and trace.topk_ids is not None and trace.topk_offsets is not None:
            off = trace.topk_offsets
            raw = {f"{int(s)}_{lid}": np.ascontiguousarray(trace.topk_ids[off[t]:off[t + 1], j], dtype=np.int32)
                   for t, s in enumerate(steps) for j, lid in enumerate(trace.layer_ids)}
            (tmp / "rank0_raw.safetensors").write_bytes(save(raw))

    atomic_dir(p, build)


# =========================================================================== SGLang
def read_sglang(path: str | os.PathLike[str]) -> Trace:
    """Read SGLang's expert-distribution ``stat`` dump (``.pt`` dict with ``logical_count`` ``[T, L, E]``)."""
    import torch

    p = Path(path)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TraceError(f"{p}: not a readable torch file ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"logical_count": obj}
    if not isinstance(obj, dict):
        raise TraceError(f"{p}: expected a dict with key 'logical_count', got {type(obj).__name__}")
    if "logical_count" not in obj:
        raise TraceError(f"{p}: missing key 'logical_count' (keys: {sorted(map(str, obj))})")
    lc = obj["logical_count"]
    arr = lc.detach().cpu().numpy() if isinstance(lc, torch.Tensor) else np.asarray(lc)
    if arr.ndim not in (2, 3):
        raise TraceError(f"{p}: key 'logical_count': expected [steps, layers, experts], got shape {tuple(arr.shape)}")
    info = obj.get("eplb_trace")
    try:
        info = parse_json(p, info.encode(), error=TraceError) if isinstance(info, str) else None
    except TraceError:
        info = None
    lids = tuple(info.get("layer_ids", ())) if isinstance(info, dict) else ()
    steps = np.asarray(info["step_ids"]) if isinstance(info, dict) and "step_ids" in info else None
    top_k = int(info.get("top_k", 0)) if isinstance(info, dict) else 0
    try:
        tr = Trace(arr, lids, steps, top_k, source=f"sglang:{p}")
    except ValueError as exc:
        raise TraceError(f"{p}: key 'logical_count': {exc}") from None
    if not isinstance(info, dict):  # SGLang's own dump (eplb's files carry their layer ids and steps)
        return clean_sglang_dump(tr, buffer_size=obj.get("buffer_size") if isinstance(obj.get("buffer_size"), int)
                                 else None)
    return _apply_info(tr, info)


def clean_sglang_dump(trace: Trace, *, source: str | None = None, buffer_size: int | None = None) -> Trace:
    """SGLang's ``stat`` dump without the rows and layers that hold no data.

    SGLang's ``logical_count`` is ``[ring-buffer passes, model layers, E]``: a dense layer is an
    all-zero column and an unused pass an all-zero row. Both are dropped; ``layer_ids`` keep the
    model layer index of the MoE layers (DeepSeek-V2-Lite: ``1..26``) and ``step_ids`` the buffer
    row of each pass. A full buffer (``buffer_size`` rows, default 1000) may have wrapped: SGLang does not record where it
    was writing, so the pass order may be rotated; ``meta["sglang_buffer_wrapped"]`` says so (with
    a warning). Raises :class:`TraceError` when nothing was routed at all.
    """
    import warnings

    counts = trace.counts
    src = source or trace.source
    passes = counts.sum(axis=(1, 2)) > 0
    layers = counts.sum(axis=(0, 2)) > 0
    if not passes.any():
        raise TraceError(f"{src}: logical_count is all zero: no tokens were routed while recording "
                         "(send traffic to the server during the recording window)")
    info: dict[str, Any] = dict(trace.meta)
    info.update({"sglang_buffer_rows": int(counts.shape[0]), "sglang_num_layers": int(counts.shape[1]),
                 "dropped_empty_passes": int((~passes).sum()),
                 "dropped_dense_layers": [int(i) for i in np.asarray(trace.layer_ids)[~layers]]})
    if bool(passes.all()) and counts.shape[0] == (buffer_size or 1000):  # full buffer (default size 1000)
        info["sglang_buffer_wrapped"] = True
        warnings.warn(f"{src}: every one of the {counts.shape[0]} ring-buffer passes holds data: the buffer may "
                      "have wrapped, so older passes were overwritten and the pass order may be rotated (per-step "
                      "ranges such as --held-out are then not chronological); record with "
                      "--expert-distribution-recorder-buffer-size -1", stacklevel=3)
    lids = np.asarray(trace.layer_ids)[layers]
    assert trace.step_ids is not None
    return Trace(counts[passes][:, layers], tuple(int(i) for i in lids), trace.step_ids[passes], trace.top_k,
                 trace.model, src, trace.ep_size, info)


def write_sglang(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Write an SGLang-style ``.pt`` dump (``logical_count`` int32/int64 ``[T, L, E]``, ``rank`` 0)."""
    import torch

    assert trace.step_ids is not None
    mx = int(trace.counts.max()) if trace.counts.size else 0
    info = {**_eplb_info(trace), "step_ids": trace.step_ids.tolist()}
    obj = {"rank": 0, "logical_count": torch.from_numpy(trace.counts.astype(np.int32 if mx < 2**31 else np.int64)),
           "average_utilization_rate_over_window": None, "eplb_trace": json.dumps(info)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


# =========================================================================== vllm-ascend
def _ascend_phy2log(expert_map: str | os.PathLike[str] | Placement, L: int, D: int, spr: int) -> tuple[np.ndarray, int]:
    """``[L, D*spr]`` phy2log and ``E`` from a vllm-ascend expert-map JSON (or a Placement)."""
    if isinstance(expert_map, Placement):
        pl = expert_map
        if pl.num_slots != D * spr or pl.num_layers != L:
            raise TraceError(f"expert_map: placement has {pl.num_layers} layers x {pl.num_slots} slots, "
                             f"the load array {L} x {D * spr}")
        return pl.phy2log, pl.num_experts
    f = Path(expert_map)
    d = _json_file(f)
    if not isinstance(d, dict) or "layer_list" not in d:
        raise TraceError(f"{f}: missing field 'layer_list'")
    layers = sorted(d["layer_list"], key=lambda x: int(x.get("layer_id", 0)))
    if len(layers) < L:
        raise TraceError(f"{f}: {len(layers)} layers in 'layer_list', the load array has {L}")
    rows = []
    for ly in layers[:L]:
        devs = sorted(ly.get("device_list", []), key=lambda x: int(x.get("device_id", 0)))
        if len(devs) != D or any(len(dv.get("device_expert", [])) != spr for dv in devs):
            raise TraceError(f"{f}: layer_id {ly.get('layer_id')}: expected {D} devices with {spr} experts each")
        rows.append([int(e) for dv in devs for e in dv["device_expert"]])
    phy = np.asarray(rows, dtype=np.int64)
    return phy, int(phy.max()) + 1


def _load_array(p: Path, key: str) -> np.ndarray:
    suf = p.suffix.lower()
    try:
        if suf == ".npy":
            _regular(p)
            return np.load(p, allow_pickle=False)
        if suf in (".pt", ".pth"):
            import torch

            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if key not in obj:
                    raise TraceError(f"{p}: missing key {key!r} (keys: {sorted(map(str, obj))})")
                obj = obj[key]
            return obj.detach().cpu().numpy() if hasattr(obj, "detach") else np.asarray(obj)
        if suf == ".json":
            obj = _json_file(p)
            if isinstance(obj, dict):
                if key not in obj:
                    raise TraceError(f"{p}: missing key {key!r}")
                obj = obj[key]
            return np.asarray(obj)
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"{p}: cannot read array ({str(exc).splitlines()[0]})") from None
    raise TraceError(f"{p}: unknown file type {suf!r} for a load array (.npy, .pt, .json)")


def read_vllm_ascend(path: str | os.PathLike[str], expert_map: str | os.PathLike[str] | Placement | None = None
                     ) -> Trace:
    """Read a vllm-ascend ``moe_load`` array ``[L, D, spr]`` / ``[T, L, D, spr]`` into logical counts ``[T, L, E]``.

    Physical loads are summed into their logical expert through ``expert_map`` (vllm-ascend's
    expert-map JSON: ``layer_list[i].device_list[d].device_expert[j]`` = expert at local slot ``j``,
    or a Placement). The array alone does not say which expert a slot holds, so a map is required;
    ``expert_map="identity"`` states that slot ``d*spr + j`` is expert ``d*spr + j`` (no redundant
    experts, default layout).
    """
    p = Path(path)
    if expert_map is None:
        raise TraceError(f"{p}: a vllm-ascend moe_load array counts tokens per physical slot, not per expert: pass "
                         "the expert map it was recorded with (--expert-map expert_map.json, vllm-ascend's "
                         "expert_map_path / expert_map_record_path), or --expert-map identity when every device "
                         "holds its experts in the default order without redundant experts")
    arr = _load_array(p, "moe_load")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise TraceError(f"{p}: expected moe_load of shape [layers, devices, slots per device] "
                         f"(or [steps, ...]), got {tuple(arr.shape)}")
    T, L, D, spr = arr.shape
    if arr.dtype.kind not in "iuf" or np.any(arr < 0):
        raise TraceError(f"{p}: moe_load must hold non-negative numbers (got dtype {arr.dtype})")
    if arr.size == 0:
        raise TraceError(f"{p}: moe_load is empty (shape {tuple(arr.shape)})")
    big = ~np.isfinite(arr) | (arr > 2**53) if arr.dtype.kind == "f" else arr > 2**53
    if np.any(big):  # per-slot loads may be fractional (a split count), but must stay exact in float64
        bad = np.argwhere(big)[0].tolist()
        raise TraceError(f"{p}: moe_load: load {arr[tuple(bad)]} at index {bad} is not finite or larger than 2**53")
    phys = arr.reshape(T, L, D * spr).astype(np.float64)
    if isinstance(expert_map, str) and expert_map == "identity":
        phy2log, E = np.tile(np.arange(D * spr), (L, 1)), D * spr
    else:
        phy2log, E = _ascend_phy2log(expert_map, L, D, spr)
    counts = np.zeros((T, L, E))
    np.add.at(counts, (slice(None), np.arange(L)[:, None], phy2log), phys)  # type: ignore[arg-type]
    rounded = np.round(counts)
    if np.any(np.abs(counts - rounded) > 1e-6):
        raise TraceError(f"{p}: moe_load holds non-integer loads")
    return Trace(rounded.astype(np.int64), (), None, 0, source=f"vllm-ascend:{p}", ep_size=D)


def write_vllm_ascend(trace: Trace, path: str | os.PathLike[str], *, ep_size: int | None = None,
                      placement: Placement | None = None) -> None:
    """Write ``moe_load`` ``[T, L, D, spr]`` (``[L, D, spr]`` for one step) as ``.npy``/``.pt``/``.json``.

    Slots follow ``placement`` (a slot's load = its expert's count / replicas, uniform split), else the
    identity layout over ``ep_size`` devices (``E`` divisible by it).
    """
    from eplb.metrics import slot_loads

    p = Path(path)
    if placement is not None:
        from eplb.stats.report import align_placement

        pl = align_placement(placement, trace.layer_ids, trace.num_experts)
        loads = slot_loads(trace.counts, pl)
        D = pl.num_ranks
    else:
        D = int(ep_size or trace.ep_size or 0)
        if D <= 0 or trace.num_experts % D:
            raise TraceError(f"ep_size: need a device count dividing {trace.num_experts} experts, got {D or 'none'}")
        loads = trace.counts.astype(np.float64)
    T, L, S = loads.shape
    out = loads.reshape(T, L, D, S // D)
    if np.all(out == np.round(out)):
        out = out.astype(np.int64)
    if T == 1:
        out = out[0]
    suf = p.suffix.lower()
    if suf == ".npy":
        buf = io.BytesIO()
        np.save(buf, out)
        atomic_write(p, buf.getvalue())
    elif suf in (".pt", ".pth"):
        import torch

        buf = io.BytesIO()
        torch.save({"moe_load": torch.from_numpy(np.ascontiguousarray(out))}, buf)
        atomic_write(p, buf.getvalue())
    elif suf == ".json":
        atomic_write(p, json.dumps({"moe_load": out.tolist()}).encode())
    else:
        raise TraceError(f"{p}: vllm-ascend loads are written as .npy, .pt or .json, not {suf or '(no extension)'!r}")


# =========================================================================== shared helpers
def _json_file(p: Path) -> Any:
    """A JSON file, bounded in size and depth; errors name the file."""
    return parse_json(p, read_bytes(p, error=TraceError), error=TraceError)


def _regular(p: Path) -> None:
    if not p.is_file():
        raise TraceError(f"{p}: not a regular file")


def _int_field(p: Path, obj: Any, key: str, minimum: int, default: int | None = None) -> int:
    """``obj[key]`` as an int in ``[minimum, 2**31)`` (no bools, no fractions) or a TraceError naming it."""
    if not isinstance(obj, dict):
        raise TraceError(f"{p}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if default is None:
            raise TraceError(f"{p}: missing field '{key}'")
        return default
    v = obj[key]
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**31:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not minimum <= int(v) < 2**31:
        raise TraceError(f"{p}: field '{key}': expected an integer in [{minimum}, 2**31), got {str(v)[:40]!r}")
    return int(v)
