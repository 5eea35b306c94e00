"""Serve transformers MoE models with expert parallelism: swap their ``*Experts`` modules for EP layers.

transformers 5 keeps a MoE layer's routed experts as 3-D tensors in an ``*Experts`` module
(``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ``DeepseekV2Experts``,
``DeepseekV3Experts``, ``OlmoeExperts``, ...), called by its sparse-MoE block as
``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]``, with

* ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first, ``is_concatenated``; ``[E, H, 2I]`` when the class
  is marked ``is_transposed``) and ``down_proj`` ``[E, H, I]`` (``[E, I, H]`` transposed);
* ``act_fn`` applied to the gate half (SwiGLU: ``act(gate) * up``).

:func:`patch_model` replaces each such module by an :class:`~eplb.runtime.ExpertParallelMoE`
holding only this rank's slots of the placement (the router, shared experts and everything else
stay as they are, replicated on every rank). Models are built by :func:`eplb.stats.hf.build_model` (the
one builder, also ``eplb.runtime.build_model``: a config with random weights, or a local checkpoint);
:data:`eplb.stats.hf.TINY_CONFIGS` are small configs of each architecture.

FP8 experts (DeepSeek-V3 layout: ``float8_e4m3fn`` weights + float32 ``weight_scale_inv`` per 128x128
block, :mod:`eplb.runtime.fp8`) come from three sources, all served by the same FP8 EP layer:

* transformers' own ``FP8Experts`` modules (``gate_up_proj`` / ``gate_up_proj_scale_inv`` / ``down_proj`` /
  ``down_proj_scale_inv``, e.g. a model loaded with a ``FineGrainedFP8Config`` on a GPU): served as they are;
* ``patch_model(..., quantize="fp8")``: dense experts quantised blockwise when patching (e.g. a
  :data:`TINY_CONFIGS` ``"tiny-deepseek-v3-fp8"`` model built from its config, random weights; the
  block size comes from the config's ``quantization_config.weight_block_size``);
* ``patch_model(..., fp8_checkpoint=dir)``: each rank reads only its slots' experts from the
  checkpoint's safetensors files (:func:`load_fp8_experts`: DeepSeek-V3 per-expert keys
  ``model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight`` + ``.weight_scale_inv``, or the fused
  ``...mlp.experts.gate_up_proj`` / ``down_proj`` + ``_scale_inv`` keys), bit-exact. On a CPU, transformers
  itself loads such a checkpoint dequantised to bf16; the EP layer keeps the FP8 bytes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eplb.errors import InputError
from eplb.placement import Placement, PlacementError
from eplb.runtime.distributed import agree, fingerprint, group_info
from eplb.runtime.fp8 import DEFAULT_BLOCK, FP8_DTYPE, quantize_blockwise
from eplb.runtime.layer import ExpertParallelMoE, rank_slots
from eplb.runtime.weights import ExpertWeightSet

__all__ = ["ExpertsInfo", "find_experts", "load_fp8_experts", "patch_model"]

class ExpertsInfo:
    """One ``*Experts`` module found in a model: its dotted ``name``, model ``layer_id`` and ``module``."""

    def __init__(self, name: str, layer_id: int, module: nn.Module) -> None:
        self.name = name
        self.layer_id = layer_id
        self.module: Any = module

    @property
    def num_experts(self) -> int:
        return int(self.module.gate_up_proj.shape[0])

    @property
    def is_fp8(self) -> bool:
        """transformers ``FP8Experts``: float8 weights with ``*_scale_inv`` block scales."""
        return self.module.gate_up_proj.dtype == FP8_DTYPE

    def fp8_weights(self) -> ExpertWeightSet:
        """``{w13, w13_scale_inv, w2, w2_scale_inv}`` ``[E, ...]`` of an ``FP8Experts`` module (no copy)."""
        m = self.module
        s13, s2 = getattr(m, "gate_up_proj_scale_inv", None), getattr(m, "down_proj_scale_inv", None)
        if not (isinstance(s13, torch.Tensor) and isinstance(s2, torch.Tensor)):
            raise InputError(f"model: {self.name} has float8 experts without gate_up_proj_scale_inv/down_proj_scale_inv")
        return ExpertWeightSet({"w13": m.gate_up_proj.detach(), "w13_scale_inv": s13.detach(),
                                "w2": m.down_proj.detach(), "w2_scale_inv": s2.detach()})

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13 [E, 2I, H], w2 [E, H, I])`` in the EP layer's layout (transposed back if needed)."""
        m = self.module
        gu, dn = m.gate_up_proj, m.down_proj
        if getattr(m, "is_transposed", False):
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        return gu.detach(), dn.detach()

    def __repr__(self) -> str:
        return f"ExpertsInfo({self.name!r}, layer {self.layer_id}, {type(self.module).__name__})"


def find_experts(model: nn.Module) -> list[ExpertsInfo]:
    """Every transformers ``*Experts`` module with 3-D ``gate_up_proj``/``down_proj``, in model order.

    Raises ``ValueError`` for layouts the EP layer cannot serve (biases, interleaved gate/up, no gate).
    """
    found: list[ExpertsInfo] = []
    for name, mod in model.named_modules():
        gu = getattr(mod, "gate_up_proj", None)
        dn = getattr(mod, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3):
            continue
        cls = type(mod).__name__
        if getattr(mod, "has_bias", False) or getattr(mod, "gate_up_proj_bias", None) is not None:
            raise InputError(f"model: {name} ({cls}) has expert biases; the EP layer serves bias-free experts only")
        if getattr(mod, "has_gate", True) is False or getattr(mod, "is_concatenated", True) is False:
            raise InputError(f"model: {name} ({cls}) does not store experts as concatenated [gate; up]; unsupported")
        m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
        layer_id = int(m.group(1)) if m else len(found)
        found.append(ExpertsInfo(name, layer_id, mod))
    return found


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def patch_model(
    model: nn.Module,
    placement: Placement | str | os.PathLike[str] | None = None,
    group: Any = None,
    *,
    strategy: str = "local-first",
    max_num_tokens: int | None = None,
    compute: str = "auto",
    num_slots: int | None = None,
    quantize: str | None = None,
    fp8_checkpoint: str | os.PathLike[str] | None = None,
    block_size: Sequence[int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[ExpertParallelMoE]:
    """Replace every ``*Experts`` module of ``model`` by an :class:`ExpertParallelMoE` (in place).

    Args:
        model: a transformers MoE model (or any module holding ``*Experts`` modules).
        placement: a :class:`~eplb.Placement` (rows keyed by model layer id, or positional over the MoE
            layers), a map file of any format :func:`eplb.runtime.load_placement` reads, or ``None``
            for the contiguous placement with ``num_slots`` slots (default ``E``: no redundancy).
        group: the EP process group (``None``: WORLD; no ``torch.distributed``: a one-rank placement).
        strategy, max_num_tokens, compute: passed to every layer.
        quantize: ``"fp8"``: quantise dense experts to FP8 with ``block_size`` block scales when patching.
        fp8_checkpoint: a checkpoint directory whose safetensors hold the FP8 experts (:func:`load_fp8_experts`);
            each rank reads only its slots' experts.
        block_size: FP8 scale block ``(bn, bk)``; default: the config's ``quantization_config.weight_block_size``,
            else ``(128, 128)`` (transformers ``FP8Experts`` use their own ``block_size``).
        compute_dtype: FP8 layers' activation/output dtype (default: the model's dtype).

    Returns:
        The new layers in model order (handy for counters and :class:`~eplb.runtime.TraceRouter`).

    Collective: one ``all_gather`` checks that every rank patches the same model with the same
    placement; any error (placement/model mismatch, wrong world size) is raised on every rank.
    """
    info = group_info(group)
    error: str | None = None
    plan: list[tuple[ExpertsInfo, int]] = []
    pl: Placement | None = None
    dig: Any = b""
    try:
        done = [n for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]
        if done:
            raise InputError(f"model: module {done[0]!r} is already an ExpertParallelMoE (patched twice?)")
        experts = find_experts(model)
        if not experts:
            raise InputError(f"model: no transformers *Experts modules (3-D gate_up_proj/down_proj) found in "
                             f"{type(model).__name__}")
        E = experts[0].num_experts
        if any(x.num_experts != E for x in experts):
            raise InputError("model: MoE layers have different expert counts")
        lids = [x.layer_id for x in experts]
        if placement is None or isinstance(placement, (str, os.PathLike)):
            from eplb.runtime.loading import load_placement

            pl = load_placement(placement, num_experts=E, ep_size=info.size, layer_ids=lids, num_slots=num_slots)
        elif isinstance(placement, Placement):
            pl = placement
        else:
            raise InputError(f"placement: expected a Placement, a path or None, got {type(placement).__name__}")
        if pl.num_experts != E:
            raise PlacementError(f"placement has {pl.num_experts} experts per layer but the model has {E}")
        if pl.num_ranks != info.size:
            raise PlacementError(f"placement is for ep_size={pl.num_ranks} but the process group has {info.size} "
                                 f"ranks (world size must equal ep_size)")
        # rows keyed by model layer id; a placement with the default ids 0..L-1 is positional over the MoE layers
        pl = pl.for_layers(lids, positional=True if pl.layer_ids == tuple(range(pl.num_layers)) else None, of="model")
        rows = list(range(len(lids)))
        plan = list(zip(experts, rows, strict=True))
        if quantize not in (None, "fp8"):
            raise InputError(f"quantize: expected None or 'fp8', got {quantize!r}")
        if fp8_checkpoint is not None and not Path(fp8_checkpoint).is_dir():
            raise InputError(f"fp8_checkpoint: {fp8_checkpoint} is not a directory")
        block = _block_size(model, experts[0], block_size)
        shapes = tuple(tuple(x.module.gate_up_proj.shape) for x in experts)
        dig = fingerprint(pl.digest(), strategy, tuple(rows), shapes, str(experts[0].module.gate_up_proj.dtype),
                          quantize, fp8_checkpoint is not None, block)
    except ValueError as exc:
        error = str(exc)
    dev: torch.device | None = None
    if plan:
        dev = plan[0][0].module.gate_up_proj.device
    agree(info, "patch_model", dig if error is None else b"\x00" * 32, error, device=dev)
    assert pl is not None
    layers = []
    for x, row in plan:
        dev = x.module.gate_up_proj.device
        dense_dtype = x.module.gate_up_proj.dtype
        if fp8_checkpoint is not None:
            experts_here = [int(e) for e in pl.rank_experts()[row, info.rank]]
            local = load_fp8_experts(fp8_checkpoint, x.layer_id, experts_here, device=dev)
        elif x.is_fp8:
            local = rank_slots(x.fp8_weights(), pl, row, info.rank)
        else:
            w13_full, w2_full = x.weights()
            local = rank_slots(ExpertWeightSet({"w13": w13_full, "w2": w2_full}), pl, row, info.rank)
            if quantize == "fp8":
                q13, s13 = quantize_blockwise(local["w13"], block)
                q2, s2 = quantize_blockwise(local["w2"], block)
                local = ExpertWeightSet({"w13": q13, "w13_scale_inv": s13, "w2": q2, "w2_scale_inv": s2})
        fp8_kw: dict[str, Any] = {}
        if local["w13"].dtype == FP8_DTYPE:
            fp8_kw = {"w13_scale_inv": local["w13_scale_inv"], "w2_scale_inv": local["w2_scale_inv"],
                      "block_size": block,
                      "compute_dtype": compute_dtype or _act_dtype(model, dense_dtype)}
        layer = ExpertParallelMoE(local["w13"], local["w2"], pl, row, group=group, strategy=strategy,
                                  max_num_tokens=max_num_tokens, compute=compute,
                                  activation=getattr(x.module, "act_fn", "silu"), verify=False, **fp8_kw)
        parent, child = _get_parent(model, x.name)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def _act_dtype(model: nn.Module, experts_dtype: torch.dtype) -> torch.dtype:
    """The dtype FP8 layers compute in by default: the dense experts' dtype, else the model's, else bf16."""
    for dt in (experts_dtype, getattr(model, "dtype", None)):
        if isinstance(dt, torch.dtype) and dt.is_floating_point and dt.itemsize > 1:
            return dt
    return torch.bfloat16


def _block_size(model: nn.Module, first: ExpertsInfo, block_size: Sequence[int] | None) -> tuple[int, int]:
    if block_size is not None:
        b = tuple(int(v) for v in block_size)
    elif first.is_fp8 and getattr(first.module, "block_size", None) is not None:
        b = tuple(int(v) for v in first.module.block_size)
    else:
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        wbs = qc.get("weight_block_size") if isinstance(qc, Mapping) else getattr(qc, "weight_block_size", None)
        b = tuple(int(v) for v in wbs) if wbs is not None else DEFAULT_BLOCK
    if len(b) != 2 or min(b) <= 0:
        raise InputError(f"block_size: expected two positive integers (bn, bk), got {b}")
    return (b[0], b[1])


# ------------------------------------------------------------------------------- FP8 checkpoints
def _safetensors_index(ckpt: Path) -> dict[str, Path]:
    """tensor name -> file, from ``model.safetensors.index.json`` or by listing every ``*.safetensors`` file."""
    idx = ckpt / "model.safetensors.index.json"
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{idx}: cannot read the weight_map: {exc}") from None
        return {str(k): ckpt / str(v) for k, v in wm.items()}
    from safetensors import safe_open

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise InputError(f"fp8_checkpoint: {ckpt} has no *.safetensors files")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                out[k] = f
    return out


def load_fp8_experts(checkpoint: str | os.PathLike[str], layer_id: int, experts: Sequence[int], *,
                     device: Any = None, prefix: str = "model.layers.{layer}.mlp.experts") -> ExpertWeightSet:
    """FP8 weights and block scales of ``experts`` (repeats allowed) of one MoE layer, read from a checkpoint.

    Per-expert keys (DeepSeek-V3): ``{prefix}.{e}.gate_proj.weight`` ``float8_e4m3fn [I, H]`` +
    ``.weight_scale_inv`` ``float32 [I/bn, ceil(H/bk)]``, same for ``up_proj``, and ``down_proj`` ``[H, I]``;
    or fused (transformers 5): ``{prefix}.gate_up_proj`` ``[E, 2I, H]`` + ``gate_up_proj_scale_inv``,
    ``{prefix}.down_proj`` + ``down_proj_scale_inv``. Only the requested experts are read.

    Returns ``{w13 [n, 2I, H], w13_scale_inv, w2 [n, H, I], w2_scale_inv}`` in the EP layer's layout.
    Raises ``ValueError`` naming the file and tensor on a missing key, a wrong dtype or shape.
    """
    from safetensors import safe_open

    ckpt = Path(checkpoint)
    where = _safetensors_index(ckpt)
    pre = prefix.format(layer=int(layer_id))
    handles: dict[Path, Any] = {}

    def get(key: str, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
        f = where.get(key)
        if f is None:
            raise InputError(f"fp8_checkpoint: {ckpt} has no tensor {key!r}")
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        t = handles[f].get_tensor(key) if index is None else handles[f].get_slice(key)[index:index + 1][0]
        if t.dtype != dtype:
            raise InputError(f"fp8_checkpoint: {f.name}: {key} is {t.dtype}, expected {dtype}")
        return t

    uniq = sorted({int(e) for e in experts})
    fused = f"{pre}.gate_up_proj" in where
    per: dict[int, dict[str, torch.Tensor]] = {}
    for e in uniq:
        if fused:
            per[e] = {"w13": get(f"{pre}.gate_up_proj", FP8_DTYPE, e),
                      "w13_scale_inv": get(f"{pre}.gate_up_proj_scale_inv", torch.float32, e),
                      "w2": get(f"{pre}.down_proj", FP8_DTYPE, e),
                      "w2_scale_inv": get(f"{pre}.down_proj_scale_inv", torch.float32, e)}
            continue
        g, u, d = (f"{pre}.{e}.{p}_proj" for p in ("gate", "up", "down"))
        gw, uw, dw = (get(k + ".weight", FP8_DTYPE) for k in (g, u, d))
        gs, us, ds = (get(k + ".weight_scale_inv", torch.float32) for k in (g, u, d))
        if gw.shape != uw.shape or gs.shape != us.shape or dw.shape != (gw.shape[1], gw.shape[0]):
            raise InputError(f"fp8_checkpoint: layer {layer_id} expert {e}: gate {tuple(gw.shape)}, up "
                             f"{tuple(uw.shape)}, down {tuple(dw.shape)} are not [I, H], [I, H], [H, I]")
        per[e] = {"w13": torch.cat([gw, uw]), "w13_scale_inv": torch.cat([gs, us]), "w2": dw, "w2_scale_inv": ds}
    for e in uniq:
        for n, t in per[e].items():
            ref = per[uniq[0]][n]
            if t.shape != ref.shape:
                raise InputError(f"fp8_checkpoint: layer {layer_id}: expert {e}'s {n} is {tuple(t.shape)}, expert "
                                 f"{uniq[0]}'s {tuple(ref.shape)}")
    stacked = ExpertWeightSet({n: torch.stack([per[e][n] for e in uniq]) for n in per[uniq[0]]})
    pos = {e: i for i, e in enumerate(uniq)}
    return stacked.select([pos[int(e)] for e in experts], device=device)
