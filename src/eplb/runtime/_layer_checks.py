"""Checks and host-side helpers of :class:`eplb.runtime.layer.ExpertParallelMoE` (argument and FP8-scale
validation, the all-to-all round plan, the single-process reference and the per-rank weight slices)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eplb.errors import InputError
from eplb.placement import Placement, PlacementError
from eplb.runtime.compute import Activation, resolve_activation
from eplb.runtime.distributed import GroupInfo
from eplb.runtime.fp8 import FP8_DTYPE, scale_shape
from eplb.runtime.weights import ExpertWeightSet
from eplb.strategies import LAYER_STRATEGIES as STRATEGIES

# error bits carried in the count exchange
_ERR_IDS = 1  # topk_ids outside [0, E)
_ERR_SHAPE = 2  # shapes / dtypes of the inputs


def reference_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: str | Activation | None = "silu",
) -> torch.Tensor:
    """The single-process MoE the EP layer must equal: ``sum_j w[n,j] * expert_{ids[n,j]}(hidden[n])``.

    Args: ``hidden`` ``[N, H]``, ``topk_ids`` ``[N, k]``, ``topk_weights`` ``[N, k]``, full
    ``w13`` ``[E, 2I, H]`` and ``w2`` ``[E, H, I]``. Returns ``[N, H]`` in ``hidden``'s dtype
    (fp32 accumulation).
    """
    fn = resolve_activation(act)
    inter = w2.shape[2]
    out = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for e in torch.unique(topk_ids).tolist():
            tok, pos = torch.nonzero(topk_ids == e, as_tuple=True)
            x = hidden[tok].to(w13.dtype)
            h = x @ w13[e].t()
            y = (fn(h[:, :inter]) * h[:, inter:]) @ w2[e].t()
            out.index_add_(0, tok, y.float() * topk_weights[tok, pos].float()[:, None])
    return out.to(hidden.dtype)



def validate_args(info: GroupInfo, w13: torch.Tensor, w2: torch.Tensor, placement: Placement, layer_pos: int,
               strategy: str, max_num_tokens: Any) -> None:
    if not isinstance(placement, Placement):
        raise InputError(f"placement: expected an eplb.Placement, got {type(placement).__name__}")
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")
    if not 0 <= int(layer_pos) < placement.num_layers:
        raise InputError(f"layer_pos: {layer_pos} is outside the placement's {placement.num_layers} layers")
    if placement.num_ranks != info.size:
        raise PlacementError(
            f"placement is for ep_size={placement.num_ranks} ranks but the process group has {info.size} ranks"
        )
    if max_num_tokens is not None and (isinstance(max_num_tokens, bool) or not isinstance(max_num_tokens, int)
                                       or max_num_tokens <= 0):
        raise InputError(f"max_num_tokens: expected a positive integer or None, got {max_num_tokens!r}")
    spr = placement.slots_per_rank
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor):
        raise InputError("w13/w2: expected torch tensors")
    if w13.ndim != 3 or w2.ndim != 3:
        raise InputError(f"w13/w2: expected 3-D [slots, 2I, H] and [slots, H, I], got {tuple(w13.shape)} and "
                         f"{tuple(w2.shape)}")
    if w13.shape[0] != spr or w2.shape[0] != spr:
        raise InputError(f"w13/w2: expected {spr} local slots (num_slots {placement.num_slots} / ep_size "
                         f"{placement.num_ranks}), got {w13.shape[0]} and {w2.shape[0]}")
    if w13.shape[1] != 2 * w2.shape[2] or w13.shape[2] != w2.shape[1]:
        raise InputError(f"w13/w2: shapes {tuple(w13.shape)} and {tuple(w2.shape)} are not [spr, 2I, H] and "
                         f"[spr, H, I]")
    if w13.dtype != w2.dtype or w13.device != w2.device:
        raise InputError(f"w13/w2: dtype/device differ ({w13.dtype}@{w13.device} vs {w2.dtype}@{w2.device})")
    if not w13.is_floating_point():
        raise InputError(f"w13/w2: expected floating-point weights, got {w13.dtype}")


def validate_fp8(block_size: tuple[int, ...], w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None, s2: torch.Tensor | None,
                  compute_dtype: torch.dtype | None) -> None:
    if w13.dtype != FP8_DTYPE:
        if s13 is not None or s2 is not None:
            raise InputError(f"w13_scale_inv/w2_scale_inv: given, but the weights are {w13.dtype}, not "
                             f"float8_e4m3fn")
        return
    if len(block_size) != 2 or min(block_size) <= 0:
        raise InputError(f"block_size: expected two positive integers (bn, bk), got {block_size}")
    if s13 is None or s2 is None:
        raise InputError("w13_scale_inv/w2_scale_inv: float8_e4m3fn experts need both block scales")
    spr, two_i, H = (int(v) for v in w13.shape)
    inter = two_i // 2
    bn = block_size[0]
    if inter % bn:
        raise InputError(f"block_size: the expert intermediate size {inter} is not a multiple of the scale block "
                         f"rows {bn} (gate and up are stacked in w13)")
    for name, s, rows, cols in (("w13_scale_inv", s13, two_i, H), ("w2_scale_inv", s2, H, inter)):
        want = (spr, *scale_shape(rows, cols, block_size))
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != want or s.dtype != torch.float32:
            got = f"{s.dtype}{list(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise InputError(f"{name}: expected float32{list(want)} for block {block_size}, got {got}")
        if s.device != w13.device:
            raise InputError(f"{name}: on {s.device}, the weights on {w13.device}")
    if compute_dtype is not None and not compute_dtype.is_floating_point:
        raise InputError(f"compute_dtype: expected a floating-point dtype, got {compute_dtype}")


def rank_slots(full: ExpertWeightSet, placement: Placement, layer_pos: int, rank: int, *, device: Any = None,
               dtypes: Mapping[str, torch.dtype | None] | None = None) -> ExpertWeightSet:
    """Copies of every tensor of the experts in ``rank``'s slots of one layer (``full``: ``[E, ...]`` each)."""
    experts = placement.rank_experts()[layer_pos, rank]
    dts = {n: d for n, d in (dtypes or {}).items() if d is not None}
    return full.select(np.array(experts), device=device, dtypes=dts or None)


def full_weights_slice(info: GroupInfo, w13_full: torch.Tensor, w2_full: torch.Tensor, placement: Placement,
                       layer_pos: int, *, device: Any = None, dtype: torch.dtype | None = None,
                       w13_scale_inv: torch.Tensor | None = None, w2_scale_inv: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's ``(w13, w2, scales)`` from all ``E`` experts' weights (the checks and slicing of
    :meth:`ExpertParallelMoE.from_full_weights`); raises ``ValueError`` (InputError / PlacementError)."""
    if not isinstance(placement, Placement):
        raise InputError(f"placement: expected an eplb.Placement, got {type(placement).__name__}")
    if not 0 <= int(layer_pos) < placement.num_layers:
        raise InputError(f"layer_pos: {layer_pos} is outside the placement's {placement.num_layers} layers")
    if w13_full.ndim != 3 or w2_full.ndim != 3:
        raise InputError(f"w13_full/w2_full: expected [E, 2I, H] and [E, H, I], got {tuple(w13_full.shape)} "
                         f"and {tuple(w2_full.shape)}")
    if w13_full.shape[0] != placement.num_experts or w2_full.shape[0] != placement.num_experts:
        raise PlacementError(f"placement has {placement.num_experts} experts but the weights hold "
                             f"{w13_full.shape[0]}")
    if placement.num_ranks != info.size:
        raise PlacementError(f"placement is for ep_size={placement.num_ranks} ranks but the process group "
                             f"has {info.size} ranks")
    extra = {n: t for n, t in (("w13_scale_inv", w13_scale_inv), ("w2_scale_inv", w2_scale_inv))
             if t is not None}
    for n, t in extra.items():
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != placement.num_experts:
            raise InputError(f"{n}: expected [E={placement.num_experts}, rows, cols] block scales, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    full = ExpertWeightSet({"w13": w13_full, "w2": w2_full, **extra})
    dense = dtype if w13_full.dtype != FP8_DTYPE else None
    local = rank_slots(full, placement, layer_pos, info.rank, device=device,
                       dtypes={"w13": dense, "w2": dense} if dense is not None else None)
    w13, w2 = local["w13"], local["w2"]
    scales = {n: local[n] for n in extra}
    return w13, w2, scales


def local_slice(w13_full: torch.Tensor, w2_full: torch.Tensor, placement: Placement, layer_pos: int, rank: int,
                *, device: Any = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w13 [spr, 2I, H], w2 [spr, H, I])`` copies of the experts in ``rank``'s slots of one layer."""
    local = rank_slots(ExpertWeightSet({"w13": w13_full, "w2": w2_full}), placement, layer_pos, rank, device=device,
                       dtypes={"w13": dtype, "w2": dtype})
    return local["w13"], local["w2"]


def _round_plan(send_tot: np.ndarray, recv_tot: np.ndarray, matrix: np.ndarray | None, rank: int,
                max_num_tokens: int | None) -> list[tuple[np.ndarray | None, np.ndarray, np.ndarray]]:
    """The all-to-all rounds of one forward, identical on every rank (host-side, no collective).

    Args:
        send_tot: ``int64 [R]`` rows this rank sends to each rank.
        recv_tot: ``int64 [R]`` rows this rank receives from each rank.
        matrix: ``int64 [R, R]`` rows sent from each source (row) to each destination (column), or
            ``None`` (no ``max_num_tokens``): one round with everything.

    Returns:
        per round ``(send_lo [R] | None, send_len [R], recv_len [R])``: this rank sends rows
        ``send_lo[d] .. send_lo[d] + send_len[d] - 1`` of its block for destination ``d`` and receives
        ``recv_len[s]`` rows from source ``s``. In round ``j`` destination ``d`` receives the rows at
        positions ``[j*M, (j+1)*M)`` of its incoming order (source-major, then local slot), so no rank
        receives more than ``M = max_num_tokens`` rows per round; the number of rounds is
        ``max_d ceil(received_d / M)`` (0 when no rows travel at all).
    """
    if matrix is None:
        return [(None, send_tot, recv_tot)]
    if max_num_tokens is None:
        raise InputError("max_num_tokens: needed with a send matrix")
    M = int(max_num_tokens)
    me = int(rank)
    into = matrix.sum(0)  # [R] rows each destination receives
    offset = np.cumsum(matrix, axis=0) - matrix  # [R, R] where source s's rows start in d's incoming order
    n_rounds = int(-(-into.max() // M)) if into.size else 0
    plan: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]] = []
    for j in range(n_rounds):
        lo = np.clip(j * M - offset, 0, matrix)
        hi = np.clip((j + 1) * M - offset, 0, matrix)
        length = hi - lo
        plan.append((lo[me], length[me], length[:, me]))
    return plan


def _effective(strategy: str, auto_decision: Any) -> str:
    return str(auto_decision.strategy) if strategy == "auto" and auto_decision is not None else strategy


def _validate_auto(strategy: str, auto_decision: Any) -> None:
    if strategy != "auto":
        if auto_decision is not None:
            raise InputError(f"auto_decision: only with strategy='auto', got strategy={strategy!r}")
        return
    if auto_decision is None or getattr(auto_decision, "strategy", None) not in ("local-first", "balanced"):
        raise InputError("auto_decision: strategy='auto' needs this layer's eplb.dispatch.auto.AutoDecision "
                         f"(from eplb.dispatch.auto.auto_strategies), got {auto_decision!r}")


def _validate_capacity(capacity: int | None, max_tokens_per_rank: int | None, max_num_tokens: int | None) -> None:
    for name, v in (("capacity", capacity), ("max_tokens_per_rank", max_tokens_per_rank)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise InputError(f"{name}: expected a positive integer or None, got {v!r}")
    if (capacity is None) != (max_tokens_per_rank is None):
        raise InputError("capacity / max_tokens_per_rank: the static-capacity mode needs both (rows per rank pair "
                         f"and round, tokens per rank), got capacity={capacity!r}, "
                         f"max_tokens_per_rank={max_tokens_per_rank!r}")
    if capacity is not None and max_num_tokens is not None:
        raise InputError("capacity and max_num_tokens: choose one (static-capacity rounds or host-planned rounds)")


def _device_of(t: Any) -> torch.device | None:
    return t.device if isinstance(t, torch.Tensor) else None


def check_inputs(hidden: Any, topk_ids: Any, topk_weights: Any, H: int, device: Any) -> str | None:
    """The local input error of one forward (or ``None``): raised on every rank after the count exchange."""
    if not all(isinstance(t, torch.Tensor) for t in (hidden, topk_ids, topk_weights)):
        return "hidden, topk_ids and topk_weights must be torch tensors"
    if hidden.ndim != 2 or hidden.shape[1] != H:
        return f"hidden must be [num_tokens, {H}], got {tuple(hidden.shape)}"
    if topk_ids.ndim != 2 or topk_ids.shape[0] != hidden.shape[0]:
        return f"topk_ids must be [{hidden.shape[0]}, top_k], got {tuple(topk_ids.shape)}"
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        return f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        return f"topk_ids must be an integer tensor, got {topk_ids.dtype}"
    if not hidden.is_floating_point():
        return f"hidden must be floating point, got {hidden.dtype}"
    if hidden.device != device or topk_ids.device != device:
        return f"inputs must be on the layer's device {device}, got {hidden.device}/{topk_ids.device}"
    return None


def raise_input_error(codes: np.ndarray, local_err: str | None, num_experts: int, rank: int, layer_pos: int) -> None:
    bad = [int(r) for r in np.nonzero(codes)[0]]
    what = []
    if np.any(codes & _ERR_IDS):
        what.append(f"topk_ids outside [0, {num_experts})")
    if np.any(codes & _ERR_SHAPE):
        what.append("malformed inputs")
    mine = f"; this rank ({rank}): {local_err}" if local_err else ""
    raise InputError(f"ExpertParallelMoE(layer {layer_pos}): bad input on rank(s) {bad}: "
                     f"{', '.join(what)}{mine}")
