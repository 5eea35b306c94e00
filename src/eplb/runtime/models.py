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
stay as they are, replicated on every rank). :func:`build_model` makes a model from a config (random
weights) or loads a local checkpoint; :data:`TINY_CONFIGS` are small configs of each architecture.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eplb.errors import InputError
from eplb.placement import Placement, PlacementError
from eplb.runtime.distributed import agree, fingerprint, group_info
from eplb.runtime.layer import ExpertParallelMoE, local_slice

__all__ = ["TINY_CONFIGS", "ExpertsInfo", "build_model", "find_experts", "load_config", "patch_model"]

_SMALL = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "hidden_act": "silu"}

#: tiny configs of every supported MoE architecture (8 experts, top-2), for tests and CPU runs
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-mixtral": {"model_type": "mixtral", **_SMALL, "intermediate_size": 16, "num_local_experts": 8,
                     "num_experts_per_tok": 2},
    "tiny-qwen2-moe": {"model_type": "qwen2_moe", **_SMALL, "intermediate_size": 32, "moe_intermediate_size": 16,
                       "shared_expert_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
                       "norm_topk_prob": True},
    "tiny-qwen3-moe": {"model_type": "qwen3_moe", **_SMALL, "intermediate_size": 32, "moe_intermediate_size": 16,
                       "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True},
    "tiny-deepseek-v2": {"model_type": "deepseek_v2", **_SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4,
                         "intermediate_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 8,
                         "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                         "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                         "v_head_dim": 8, "head_dim": 8, "topk_method": "greedy"},
    "tiny-deepseek-v3": {"model_type": "deepseek_v3", **_SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4,
                         "intermediate_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 8,
                         "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                         "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                         "v_head_dim": 8, "head_dim": 8, "n_group": 2, "topk_group": 1},
    "tiny-olmoe": {"model_type": "olmoe", **_SMALL, "intermediate_size": 16, "num_experts": 8,
                   "num_experts_per_tok": 2, "eos_token_id": 2, "pad_token_id": 1},
}


class ExpertsInfo:
    """One ``*Experts`` module found in a model: its dotted ``name``, model ``layer_id`` and ``module``."""

    def __init__(self, name: str, layer_id: int, module: nn.Module) -> None:
        self.name = name
        self.layer_id = layer_id
        self.module: Any = module

    @property
    def num_experts(self) -> int:
        return int(self.module.gate_up_proj.shape[0])

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
) -> list[ExpertParallelMoE]:
    """Replace every ``*Experts`` module of ``model`` by an :class:`ExpertParallelMoE` (in place).

    Args:
        model: a transformers MoE model (or any module holding ``*Experts`` modules).
        placement: a :class:`~eplb.Placement` (rows keyed by model layer id, or positional over the MoE
            layers), a map file of any format :func:`eplb.runtime.load_placement` reads, or ``None``
            for the contiguous placement with ``num_slots`` slots (default ``E``: no redundancy).
        group: the EP process group (``None``: WORLD; no ``torch.distributed``: a one-rank placement).
        strategy, max_num_tokens, compute: passed to every layer.

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
        shapes = tuple(tuple(x.module.gate_up_proj.shape) for x in experts)
        dig = fingerprint(pl.digest(), strategy, tuple(rows), shapes, str(experts[0].module.gate_up_proj.dtype))
    except ValueError as exc:
        error = str(exc)
    dev: torch.device | None = None
    if plan:
        dev = plan[0][0].module.gate_up_proj.device
    agree(info, "patch_model", dig if error is None else b"\x00" * 32, error, device=dev)
    assert pl is not None
    layers = []
    for x, row in plan:
        w13_full, w2_full = x.weights()
        w13, w2 = local_slice(w13_full, w2_full, pl, row, info.rank)
        layer = ExpertParallelMoE(w13, w2, pl, row, group=group, strategy=strategy, max_num_tokens=max_num_tokens,
                                  compute=compute, activation=getattr(x.module, "act_fn", "silu"), verify=False)
        parent, child = _get_parent(model, x.name)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


# ------------------------------------------------------------------------------- building models
def load_config(spec: str | os.PathLike[str] | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Any:
    """A transformers config from a :data:`TINY_CONFIGS` name, a ``config.json`` path, a checkpoint
    directory, or a dict with ``model_type``; ``overrides`` set attributes (e.g. ``num_hidden_layers``)."""
    from transformers import AutoConfig

    if isinstance(spec, Mapping):
        d = dict(spec)
    elif str(spec) in TINY_CONFIGS:
        d = dict(TINY_CONFIGS[str(spec)])
    else:
        p = Path(spec)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise InputError(f"model: {spec!r} is neither a built-in config ({', '.join(TINY_CONFIGS)}) nor a "
                             f"config.json / checkpoint directory")
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"model: cannot read {p}: {exc}") from None
    if "model_type" not in d:
        raise InputError(f"model: config {spec!r} has no 'model_type'")
    d.update(overrides or {})
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as exc:
        raise InputError(f"model: cannot build a config of type {model_type!r}: {exc}") from None


def build_model(spec: str | os.PathLike[str] | Mapping[str, Any], *, checkpoint: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                device: Any = "cpu", seed: int = 0) -> nn.Module:
    """A causal-LM model: loaded from a local ``checkpoint`` directory (``from_pretrained``, local files
    only), or built from the config ``spec`` with random weights (seeded). In eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if checkpoint is not None:
        ck = Path(checkpoint)
        if not ck.is_dir():
            raise InputError(f"checkpoint: {ck} is not a directory")
        cfg = load_config(ck if spec is None else spec, overrides)
        model = AutoModelForCausalLM.from_pretrained(ck, config=cfg, dtype=dtype, local_files_only=True)
    else:
        cfg = load_config(spec, overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device).eval()
