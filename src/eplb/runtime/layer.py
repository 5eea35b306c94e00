"""The expert-parallel MoE layer: redundant expert slots served over ``torch.distributed``.

Each of the ``R`` ranks of an EP group holds ``spr = S / R`` physical slots of one MoE layer
(rank ``r`` owns slots ``r*spr .. (r+1)*spr - 1``), each slot a copy of one logical expert's weights:

* ``w13`` ``[spr, 2*I, H]`` gate and up projections stacked (gate rows first),
* ``w2`` ``[spr, H, I]`` down projection,

with ``H`` the hidden size and ``I`` the expert intermediate size (transformers' ``gate_up_proj`` /
``down_proj`` layout). FP8 experts (DeepSeek-V3 layout, :mod:`eplb.runtime.fp8`) add ``w13_scale_inv``
and ``w2_scale_inv`` (float32 per-block scales); every per-expert tensor of the layer is listed in
``expert_weight_names`` and handled as one :class:`~eplb.runtime.weights.ExpertWeightSet` (slicing,
commit, the balancer's transfers, bytes and fingerprints). A forward step on every rank:

1. counts its (token, expert) pairs per logical expert and exchanges them: one ``all_gather`` of
   ``E + 1`` ints per rank, for every strategy (the extra int is an input-error flag, so a bad input
   on one rank raises on every rank);
2. maps each pair to a physical slot (:func:`eplb.dispatch.assign_slots`: ``local-first``,
   ``round-robin`` or ``balanced``; balanced plans from the gathered ``[R, E]`` counts);
3. derives from the same counts the whole ``[R, S]`` send matrix (:func:`eplb.dispatch.send_matrix`):
   what it receives from every source for each local slot, and (``max_num_tokens``) the ``[R, R]``
   rows of every (source, destination) pair -- one host sync for the split sizes; so ``balanced`` and
   ``local-first`` make the same collectives (1 count exchange + 2 all-to-alls per round);
4. in each round: sends the tokens (``all_to_all_single`` with uneven splits), computes its slots
   with a grouped GEMM + SwiGLU, and returns the outputs (second ``all_to_all_single``), weighted by
   ``topk_weights`` and summed per token (fp32 accumulation). Without ``max_num_tokens`` there is
   exactly one round. With ``M = max_num_tokens``, round ``j`` carries, for every destination, the
   rows at positions ``[j*M, (j+1)*M)`` of its incoming order (source rank, then local slot), so
   no rank receives (or computes) more than ``M`` rows at once; every rank derives the same
   ``max_d ceil(received_d / M)`` rounds from the send matrix.

Device-side counters (no host sync) accumulate every step: ``expert_counts`` ``[E]`` (pairs of this
rank's tokens per logical expert), ``slot_counts`` ``[S]`` (pairs this rank sent to each physical slot)
and ``local_slot_counts`` ``[spr]`` (pairs this rank computed per local slot).

The layer is for inference (forward runs under ``torch.no_grad``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from eplb.dispatch import DispatchTable, assign_slots, send_matrix
from eplb.errors import InputError
from eplb.placement import Placement, PlacementError
from eplb.runtime._layer_checks import (  # noqa: F401  (rank_slots, local_slice, _round_plan, reference_moe: public here)
    _ERR_IDS,
    _ERR_SHAPE,
    _device_of,
    _effective,
    _round_plan,
    _validate_auto,
    _validate_capacity,
    check_inputs,
    full_weights_slice,
    local_slice,
    raise_input_error,
    rank_slots,
    reference_moe,
    validate_args,
    validate_fp8,
)
from eplb.runtime.compute import Activation, expert_ffn, resolve_activation, resolve_impl
from eplb.runtime.distributed import AgreementError, GroupInfo, agree, fingerprint, group_info
from eplb.runtime.fp8 import DEFAULT_BLOCK, FP8_DTYPE, fp8_expert_ffn, resolve_fp8_impl
from eplb.runtime.static_exchange import static_exchange_forward
from eplb.runtime.weights import ExpertWeightSet
from eplb.strategies import LAYER_STRATEGIES

__all__ = ["STRATEGIES", "ExpertParallelMoE", "rank_slots", "reference_moe"]

STRATEGIES = LAYER_STRATEGIES

# error bits carried in the count exchange


class ExpertParallelMoE(nn.Module):
    """One MoE layer's experts, expert-parallel over a process group, with redundant slots.

    Args:
        w13: ``[spr, 2I, H]`` this rank's slots' gate+up weights (any float dtype, incl. bf16, or
            ``float8_e4m3fn`` with ``w13_scale_inv``).
        w2: ``[spr, H, I]`` this rank's slots' down weights (same dtype and device).
        placement: the model's :class:`~eplb.Placement` (``num_ranks`` must equal the group size).
        layer_pos: row of ``placement`` this layer serves (0-based position, not the model layer id).
        group: the EP process group (``None``: WORLD if initialised; without ``torch.distributed``
            only a one-rank placement is accepted and no collective runs).
        strategy: replica choice, one of :data:`STRATEGIES`; must be the same on every rank. ``"auto"``:
            the strategy of ``auto_decision`` (balanced only where a cost model predicts a net gain).
        auto_decision: with ``strategy="auto"``, this layer's :class:`eplb.dispatch.auto.AutoDecision` (from
            :func:`eplb.dispatch.auto.auto_strategies`; its strategy is part of the cross-rank agreement).
        max_num_tokens: largest number of (token, expert) rows any rank receives and computes per
            all-to-all round (TensorRT-LLM's ``moe max_num_tokens``: a hot rank's receive buffer and
            expert compute stay bounded; the forward runs as many rounds as the most loaded rank
            needs, every rank taking part in each); ``None``: one round with everything. Must be the
            same on every rank (checked by ``verify``).
        compute: ``"auto"`` (grouped GEMM where supported), ``"grouped"`` or ``"loop"``; FP8 experts also
            take ``"fp8-triton"`` and ``"dequant"`` (:func:`eplb.runtime.fp8.resolve_fp8_impl`).
        activation: ``"silu"`` (SwiGLU, default) or a callable applied to the gate half.
        capacity: static-capacity mode (with ``max_tokens_per_rank``): every rank sends every rank exactly
            ``capacity`` rows per round, in ``ceil(max_tokens_per_rank * min(k, spr) / capacity)`` rounds, with no
            host sync (the forward can be captured in a CUDA graph; :mod:`eplb.runtime.static_exchange`).
            A step over capacity uses the later rounds; ``N > max_tokens_per_rank`` raises ``ValueError`` on that
            rank after the collectives (the others get NaN outputs); bad expert ids on any rank make every
            rank's output NaN and count in ``error_steps`` (no host sync to raise).
        max_tokens_per_rank: the most tokens any rank passes to one forward (static-capacity mode).
        verify: check across ranks at construction (one ``all_gather``) that every rank holds the
            same placement row, sizes and strategy; a mismatch raises on every rank.
        w13_scale_inv, w2_scale_inv: FP8 experts only: ``float32 [spr, 2I/bn, ceil(H/bk)]`` and
            ``[spr, ceil(H/bn), ceil(I/bk)]`` block scales (``W = weight * scale_inv`` per block).
        block_size: ``(bn, bk)`` of the FP8 scales (default ``(128, 128)``).
        compute_dtype: FP8 experts: dtype of the activations and outputs (default bfloat16).

    Attributes:
        placement_row: ``int64 [S]`` (buffer) phy2log of this layer.
        expert_counts: ``int64 [E]`` (buffer) pairs of this rank's tokens per logical expert,
            cumulative since the last :meth:`take_counts`.
        slot_counts: ``int64 [S]`` pairs this rank sent to each physical slot (since :meth:`take_slot_counts`).
        local_slot_counts: ``int64 [spr]`` pairs this rank computed per local slot (idem).
        round_recv_rows: rows this rank received in each round of the last forward (host ints).
        max_round_recv_rows: the most rows this rank received in one round since construction
            (``<= max_num_tokens`` when set).
        route_override: optional ``fn(num_tokens, top_k) -> topk_ids`` replacing the router's expert ids
            (trace-driven routing, :class:`eplb.runtime.TraceRouter`).
    """

    expert_weight_names: tuple[str, ...] = ("w13", "w2")
    placement_row: torch.Tensor
    expert_counts: torch.Tensor
    slot_counts: torch.Tensor
    local_slot_counts: torch.Tensor

    def __init__(
        self,
        w13: torch.Tensor,
        w2: torch.Tensor,
        placement: Placement,
        layer_pos: int = 0,
        *,
        group: Any = None,
        strategy: str = "local-first",
        max_num_tokens: int | None = None,
        capacity: int | None = None,
        max_tokens_per_rank: int | None = None,
        auto_decision: Any = None,
        compute: str = "auto",
        activation: str | Activation | None = "silu",
        verify: bool = True,
        w13_scale_inv: torch.Tensor | None = None,
        w2_scale_inv: torch.Tensor | None = None,
        block_size: Sequence[int] = DEFAULT_BLOCK,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._info: GroupInfo = group_info(group)
        info = self._info
        error: str | None = None
        try:
            self.block_size: tuple[int, ...] = tuple(int(v) for v in block_size)
        except (TypeError, ValueError):
            self.block_size = ()
        try:
            validate_args(self._info, w13, w2, placement, layer_pos, strategy, max_num_tokens)
            validate_fp8(self.block_size, w13, w2, w13_scale_inv, w2_scale_inv, compute_dtype)
            _validate_capacity(capacity, max_tokens_per_rank, max_num_tokens)
            _validate_auto(strategy, auto_decision)
        except ValueError as exc:
            error = str(exc)
        if verify:
            digest = self._digest(placement, layer_pos, _effective(strategy, auto_decision), w13, w2,
                                  (max_num_tokens, capacity, max_tokens_per_rank)) if error is None else b"\x00" * 32
            agree(info, f"ExpertParallelMoE(layer {layer_pos})", digest, error, device=_device_of(w13))
        elif error is not None:
            raise PlacementError(f"ExpertParallelMoE(layer {layer_pos}): {error}")

        self.layer_pos = int(layer_pos)
        self.layer_id = int(placement.layer_ids[layer_pos])
        self.num_experts = placement.num_experts
        self.num_slots = placement.num_slots
        self.num_ranks = placement.num_ranks
        self.num_nodes = placement.num_nodes
        self.slots_per_rank = placement.slots_per_rank
        self.rank = info.rank
        self.strategy = strategy
        self.auto_decision = auto_decision if strategy == "auto" else None
        self.dispatch_strategy = _effective(strategy, auto_decision)  # what assign_slots runs
        self.max_num_tokens = max_num_tokens
        self.capacity = capacity
        self.max_tokens_per_rank = max_tokens_per_rank
        self.hidden_size = int(w13.shape[2])
        self.intermediate_size = int(w2.shape[2])
        self.act = resolve_activation(activation)
        self.w13 = nn.Parameter(w13.detach(), requires_grad=False)
        self.w2 = nn.Parameter(w2.detach(), requires_grad=False)
        self.fp8 = w13.dtype == FP8_DTYPE
        if self.fp8:
            assert w13_scale_inv is not None and w2_scale_inv is not None
            self.w13_scale_inv = nn.Parameter(w13_scale_inv.detach(), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(w2_scale_inv.detach(), requires_grad=False)
            self.expert_weight_names = ("w13", "w13_scale_inv", "w2", "w2_scale_inv")
        self.compute_dtype: torch.dtype = (compute_dtype or torch.bfloat16) if self.fp8 else w13.dtype
        dev = w13.device
        self.register_buffer("placement_row", torch.as_tensor(np.array(placement.phy2log[layer_pos]), dtype=torch.int64,
                                                              device=dev).clone(), persistent=False)
        self.register_buffer("expert_counts", torch.zeros(self.num_experts, dtype=torch.int64, device=dev),
                             persistent=False)
        self.register_buffer("slot_counts", torch.zeros(self.num_slots, dtype=torch.int64, device=dev),
                             persistent=False)
        self.register_buffer("local_slot_counts", torch.zeros(self.slots_per_rank, dtype=torch.int64, device=dev),
                             persistent=False)
        self.register_buffer("error_steps", torch.zeros((), dtype=torch.int64, device=dev), persistent=False)
        self._compute_req = compute
        self._impl: str | None = None
        self._table: Any = None
        self._table_placement = placement.select_layers([layer_pos])
        self.route_override: Callable[[int, int], torch.Tensor] | None = None
        self.dynamic: Any = None  # a DynamicSlots pool: per-step replication (eplb.runtime.dynamic)
        self.steps = 0
        self.round_recv_rows: list[int] = []
        self.max_round_recv_rows = 0

    # ------------------------------------------------------------------ checks
    def _digest(self, placement: Placement, layer_pos: int, strategy: str, w13: torch.Tensor,
                w2: torch.Tensor, max_num_tokens: Any) -> bytes:
        return fingerprint(placement.phy2log[layer_pos].tobytes(), placement.num_experts, placement.num_ranks,
                           placement.num_nodes, strategy, tuple(w13.shape[1:]), tuple(w2.shape[1:]), str(w13.dtype),
                           max_num_tokens, self.block_size if w13.dtype == FP8_DTYPE else None)

    def verify(self) -> None:
        """Collective: raise on every rank unless all ranks hold the same placement row, sizes and chunking."""
        agree(self._info, f"ExpertParallelMoE(layer {self.layer_pos})",
              self._digest(self._table_placement, 0, self.dispatch_strategy, self.w13, self.w2,
                           (self.max_num_tokens, self.capacity, self.max_tokens_per_rank)), None,
              device=self.w13.device)

    # ------------------------------------------------------------------ tables
    def _build_table(self) -> Any:
        """The dispatch table of the current placement, on the layer's device (built on the host)."""
        return DispatchTable.from_placement(self._table_placement, 0, device=self.placement_row.device)

    def _dispatch_table(self) -> Any:

        dev = self.placement_row.device
        if self._table is None:
            self._table = self._build_table()
        elif self._table.log2phy.device != dev:
            self._table = self._table.to(dev)
        return self._table

    @property
    def placement(self) -> Placement:
        """This layer's current placement as a one-layer :class:`~eplb.Placement` (host copy)."""
        return self._table_placement

    @property
    def expert_weights(self) -> ExpertWeightSet:
        """The live per-slot tensors of ``expert_weight_names`` as one set (no copy)."""
        return ExpertWeightSet.of(self)

    @property
    def compute_impl(self) -> str:
        """``"grouped"`` or ``"loop"``; FP8 experts: ``"fp8-triton"``, ``"dequant+grouped"`` or
        ``"dequant+loop"`` (resolved on first use)."""
        if self._impl is None:
            if not self.fp8:
                self._impl = resolve_impl(self._compute_req, self.w13, self.w2)
            else:
                impl = resolve_fp8_impl(self._compute_req, self.w13, self.block_size)
                if impl != "fp8-triton":
                    n = min(2, self.slots_per_rank)
                    probe13 = torch.zeros(n, *self.w13.shape[1:], dtype=self.compute_dtype, device=self.w13.device)
                    probe2 = torch.zeros(n, *self.w2.shape[1:], dtype=self.compute_dtype, device=self.w2.device)
                    dense = resolve_impl("auto" if impl == "dequant" else impl, probe13, probe2)
                    impl = f"dequant+{dense}"
                self._impl = impl
        return self._impl

    # ---------------------------------------------------------------- counters
    def dispatch_info(self) -> dict[str, Any]:
        """The dispatch strategy this layer runs and, for ``"auto"``, the choice's predicted gain and cost (ms)."""
        info: dict[str, Any] = {"strategy": self.strategy, "dispatch_strategy": self.dispatch_strategy}
        if self.auto_decision is not None:
            info.update(predicted_gain_ms=float(self.auto_decision.predicted_gain_ms),
                        cost_ms=float(self.auto_decision.cost_ms))
        return info

    def take_counts(self) -> torch.Tensor:
        """``int64 [E]`` pairs per logical expert since the last call; zeroes the counter (no host sync)."""
        out = self.expert_counts.clone()
        self.expert_counts.zero_()
        return out

    def take_slot_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sent [S], computed [spr])`` int64 pair counters since the last call; zeroes them (no host sync)."""
        sent = self.slot_counts.clone()
        done = self.local_slot_counts.clone()
        self.slot_counts.zero_()
        self.local_slot_counts.zero_()
        return sent, done

    # ------------------------------------------------------------------ commit
    def commit(self, new_phy2log_row: Any, new_local_weights: Mapping[str, torch.Tensor]) -> None:
        """Swap this layer's placement row and local weights together (call between steps).

        Args:
            new_phy2log_row: ``[S]`` the layer's new phy2log (same on every rank).
            new_local_weights: ``{"w13": [spr, 2I, H], "w2": [spr, H, I]}`` this rank's new slot
                weights (copied in place; the parameters keep their identity).
        """
        row = np.asarray(new_phy2log_row.detach().cpu() if isinstance(new_phy2log_row, torch.Tensor)
                         else new_phy2log_row, dtype=np.int64).reshape(-1)
        if row.shape != (self.num_slots,):
            raise PlacementError(f"commit: new_phy2log_row must have {self.num_slots} slots, got shape {row.shape}")
        p = self._table_placement
        newp = Placement(row[None], p.num_experts, p.num_ranks, p.num_nodes, p.layer_ids, p.meta)
        missing = set(self.expert_weight_names) - set(new_local_weights)
        extra = set(new_local_weights) - set(self.expert_weight_names)
        if missing or extra:
            raise InputError(f"commit: new_local_weights must have keys {list(self.expert_weight_names)}, "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in self.expert_weight_names:
            cur = getattr(self, name)
            new = new_local_weights[name]
            if tuple(new.shape) != tuple(cur.shape) or new.dtype != cur.dtype:
                raise InputError(f"commit: {name} must be {cur.dtype}{list(cur.shape)}, got "
                                 f"{new.dtype}{list(new.shape)}")
        for name in self.expert_weight_names:
            cur, new = getattr(self, name), new_local_weights[name]
            if new.data_ptr() != cur.data_ptr():  # the live tensors themselves (updated in place): no copy
                cur.data.copy_(new)
        self.placement_row.copy_(torch.from_numpy(np.array(row, dtype=np.int64)).to(self.placement_row.device))
        self._table_placement = newp
        self._table = self._build_table()  # at the commit, off the forward

    def exclude_ranks(self, ranks: Sequence[int]) -> None:
        """Stop sending tokens to ``ranks`` for every expert that has a replica elsewhere (call between steps).

        Used while draining a rank: an expert still held only by an excluded rank keeps being served
        there until a later :meth:`commit` gives it a new home (see
        :func:`eplb.dispatch.table.served_replicas`). An empty sequence clears the exclusion. Every rank
        must call it with the same ranks at the same step boundary.
        """
        ex = sorted({int(r) for r in ranks})
        bad = [r for r in ex if not 0 <= r < self.num_ranks]
        if bad:
            raise InputError(f"exclude_ranks: ranks {bad} out of range [0, {self.num_ranks})")
        self._table_placement = self._table_placement.with_meta(excluded_ranks=ex)
        self._table = self._build_table()  # between steps, off the forward

    # ----------------------------------------------------------------- forward
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` = sum over the ``k`` chosen experts of ``topk_weights * expert(hidden)``.

        Collective: every rank of the group must call it (``N`` may differ per rank, even be 0).
        Bad input on any rank raises ``ValueError`` on every rank after the count exchange.
        A :class:`~eplb.runtime.dynamic.DynamicSlots` pool in ``self.dynamic`` runs it with per-step replication.
        """
        with torch.no_grad():
            if self.dynamic is not None:
                return self.dynamic.forward(self, hidden, topk_ids, topk_weights)
            return self._forward(hidden, topk_ids, topk_weights)

    def _forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        E, R, spr, H = self.num_experts, self.num_ranks, self.slots_per_rank, self.hidden_size
        dev = self.w13.device
        local_err = check_inputs(hidden, topk_ids, topk_weights, self.hidden_size, self.w13.device)
        if local_err is None and self.route_override is not None:
            topk_ids = self.route_override(int(hidden.shape[0]), int(topk_ids.shape[1])).to(dev)
            if tuple(topk_ids.shape) != tuple(topk_weights.shape):
                local_err = f"route_override returned shape {tuple(topk_ids.shape)}, expected {tuple(topk_weights.shape)}"
        if local_err is not None:  # take part in the collectives with no tokens, then raise everywhere
            hidden = torch.zeros(0, H, dtype=self.compute_dtype, device=dev)
            topk_ids = torch.zeros(0, 1, dtype=torch.int64, device=dev)
            topk_weights = torch.zeros(0, 1, dtype=torch.float32, device=dev)
        static = self.capacity is not None
        if static and local_err is None and int(topk_ids.shape[0]) > int(self.max_tokens_per_rank):  # host shapes
            local_err = (f"{int(topk_ids.shape[0])} tokens ({int(topk_ids.shape[0]) * int(topk_ids.shape[1])} rows) "
                         f"exceed max_tokens_per_rank={self.max_tokens_per_rank} of the static capacity "
                         f"(capacity={self.capacity} rows per rank pair and round)")
            k_in = int(topk_ids.shape[1])
            hidden = torch.zeros(0, H, dtype=self.compute_dtype, device=dev)
            topk_ids = torch.zeros(0, k_in, dtype=torch.int64, device=dev)
            topk_weights = torch.zeros(0, k_in, dtype=torch.float32, device=dev)
        N, k = int(topk_ids.shape[0]), int(topk_ids.shape[1])
        ids = topk_ids.to(torch.int64)
        bad_ids = ((ids < 0) | (ids >= E)).any()
        ids = ids.clamp(0, E - 1)
        flat_ids = ids.reshape(-1)
        err_code = bad_ids.to(torch.int64) * _ERR_IDS + (_ERR_SHAPE if local_err is not None else 0)

        table = self._dispatch_table()
        # the one count exchange (every strategy): all_gather of this rank's [E] expert counts + error flag;
        # from the [R, E] counts every rank derives the whole [R, S] send matrix (eplb.dispatch.send_matrix),
        # so balanced needs no collective of its own
        local = torch.zeros(E + 1, dtype=torch.int64, device=dev)
        local[:E].index_add_(0, flat_ids, torch.ones_like(flat_ids))
        local[E] = err_code
        gathered = self._all_gather_counts(local)  # [R, E + 1]
        global_counts = gathered[:, :E]
        # balanced: one plan per step, solved inside assign_slots and reused by send_matrix
        quotas = (torch.empty(table.log2phy.shape, dtype=torch.int64, device=dev)
                  if self.dispatch_strategy == "balanced" else None)
        slots = assign_slots(ids, table, self.dispatch_strategy, rank=self.rank, global_counts=global_counts,
                             quotas_out=quotas)
        flat = slots.reshape(-1).to(torch.int64)
        order = torch.argsort(flat, stable=True)
        send_all = send_matrix(global_counts, table, self.dispatch_strategy, quotas=quotas)  # [R, S] source -> slot
        sent = send_all[self.rank]
        self.slot_counts += sent
        self.expert_counts += local[:E]
        if static:  # fixed splits, no host sync (CUDA-graph capturable)
            poison = (gathered[:, E] != 0).any()
            self.error_steps += poison.to(torch.int64)
            y = static_exchange_forward(self, hidden, ids, slots, send_all, topk_weights, poison)
            self.steps += 1
            if local_err is not None:  # this rank knows on the host: raise after taking part
                raise InputError(f"ExpertParallelMoE(layer {self.layer_pos}): {local_err}")
            return y.to(hidden.dtype)

        chunked = self.max_num_tokens is not None
        mine = send_all[:, self.rank * spr:(self.rank + 1) * spr]  # [R, spr] rows each source sends here
        send_rows = sent.view(R, spr).sum(1)  # [R] rows this rank sends to each rank
        parts = [mine.reshape(-1), gathered[:, E], send_rows]
        if chunked:
            parts.append(send_all.view(R, R, spr).sum(-1).reshape(-1))  # [R, R] source -> destination rows
        host = torch.cat(parts).cpu().numpy()  # the one host sync
        recv_counts_np = host[: R * spr].reshape(R, spr)
        codes = host[R * spr: R * spr + R]
        if np.any(codes != 0):
            raise_input_error(codes, local_err, self.num_experts, self.rank, self.layer_pos)
        send_tot = host[R * spr + R: R * spr + 2 * R].astype(np.int64)
        recv_tot = recv_counts_np.sum(1).astype(np.int64)
        matrix = host[R * spr + 2 * R:].reshape(R, R).astype(np.int64) if chunked else None
        plan = _round_plan(send_tot, recv_tot, matrix, self.rank, self.max_num_tokens)

        w_all = topk_weights.reshape(-1)[order].float()
        out = torch.zeros(N, H, dtype=torch.float32, device=dev)
        # local slot of every row this rank receives, in the incoming order (source-major, then local slot)
        total_in = int(recv_tot.sum())
        lsid = torch.repeat_interleave(torch.arange(spr, device=dev).repeat(R), mine.reshape(-1),
                                       output_size=total_in)
        block_end = np.cumsum(recv_counts_np.reshape(-1))
        block_start = block_end - recv_counts_np.reshape(-1)
        send_start = np.cumsum(send_tot) - send_tot  # where this rank's rows for each destination start in `order`
        pos = 0
        round_rows: list[int] = []
        for send_lo, send_len, recv_len in plan:
            if send_lo is None:  # one round: everything
                rows = order
                w = w_all
            else:
                first = send_start + send_lo
                n_send = int(send_len.sum())
                sel = np.repeat(first - (np.cumsum(send_len) - send_len), send_len) + np.arange(n_send)
                sel_t = torch.from_numpy(sel).to(dev)
                rows = order[sel_t]
                w = w_all[sel_t]
            send_split = [int(v) for v in send_len]
            recv_split = [int(v) for v in recv_len]
            tok = rows // k
            recv_x = self._all_to_all(hidden[tok], send_split, recv_split)
            n_in = int(recv_x.shape[0])
            y = self._local_compute(recv_x, lsid[pos:pos + n_in], pos, block_start, block_end)
            pos += n_in
            round_rows.append(n_in)
            back = self._all_to_all(y.to(hidden.dtype), recv_split, send_split)
            out.index_add_(0, tok, back.float() * w[:, None])
        self.round_recv_rows = round_rows
        self.max_round_recv_rows = max([self.max_round_recv_rows, *round_rows])
        self.steps += 1
        return out.to(hidden.dtype)

    # ------------------------------------------------------------ collectives
    def _all_gather_counts(self, local: torch.Tensor) -> torch.Tensor:
        info = self._info
        if not info.distributed:
            return local.view(1, -1)
        parts = [torch.empty_like(local) for _ in range(info.size)]
        dist.all_gather(parts, local.contiguous(), group=info.group)
        return torch.stack(parts)

    def _all_to_all(self, x: torch.Tensor, send_split: list[int], recv_split: list[int]) -> torch.Tensor:
        info = self._info
        if not info.distributed:
            return x
        out = x.new_empty(sum(recv_split), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_split, input_split_sizes=send_split,
                               group=info.group)
        return out

    # ---------------------------------------------------------- local compute
    def _local_compute(self, recv_x: torch.Tensor, lsid: torch.Tensor, first: int, block_start: np.ndarray,
                       block_end: np.ndarray) -> torch.Tensor:
        """Experts on one round's received rows (ordered by source rank, then local slot); same order out.

        Args:
            recv_x: ``[n, H]`` rows at positions ``first .. first + n - 1`` of this rank's incoming order.
            lsid: ``int64 [n]`` their local slots.
            block_start, block_end: ``[R * spr]`` host positions of each (source, local slot) block in the
                incoming order (the loop implementation's per-slot counts come from them, no host sync).
        """
        spr = self.slots_per_rank
        n = int(recv_x.shape[0])
        dev = recv_x.device
        out = torch.empty(n, self.hidden_size, dtype=self.compute_dtype, device=dev)
        if n == 0:
            return out
        impl = self.compute_impl.removeprefix("dequant+")
        perm = torch.argsort(lsid, stable=True)
        counts = torch.zeros(spr, dtype=torch.int64, device=dev).index_add_(0, lsid, torch.ones_like(lsid))
        host = None
        if impl == "loop":
            a, b = first, first + n
            ov = np.clip(np.minimum(block_end, b) - np.maximum(block_start, a), 0, None).reshape(-1, spr).sum(0)
            host = [int(v) for v in ov]
        y = self._expert_ffn(recv_x[perm], counts, host)
        out[perm] = y
        self.local_slot_counts += counts
        return out

    @property
    def _needs_host_counts(self) -> bool:
        """Whether the expert compute needs the per-slot counts on the host (the loop implementation)."""
        return self.compute_impl.removeprefix("dequant+") == "loop"

    def _expert_ffn(self, x: torch.Tensor, counts: torch.Tensor, counts_host: Sequence[int] | None = None
                    ) -> torch.Tensor:
        """The local slots' experts on rows sorted by slot (dense or FP8 weights): ``[M, H]`` in ``compute_dtype``."""
        impl = self.compute_impl.removeprefix("dequant+")
        if self.fp8:
            return fp8_expert_ffn(x, counts, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv,
                                  block=self.block_size, act=self.act, impl=impl, compute_dtype=self.compute_dtype,
                                  counts_host=counts_host)
        return expert_ffn(x, counts, self.w13, self.w2, act=self.act, impl=impl, counts_host=counts_host)

    def extra_repr(self) -> str:
        return (f"layer_pos={self.layer_pos}, experts={self.num_experts}, slots={self.num_slots}, "
                f"ranks={self.num_ranks}, rank={self.rank}, slots_per_rank={self.slots_per_rank}, "
                f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, strategy={self.strategy!r}"
                f"{'' if self.auto_decision is None else ' -> ' + repr(self.auto_decision.as_dict())}, "
                f"max_num_tokens={self.max_num_tokens}, capacity={self.capacity}, "
                f"max_tokens_per_rank={self.max_tokens_per_rank}"
                + (f", fp8 block={self.block_size}, compute_dtype={self.compute_dtype}" if self.fp8 else ""))

    # ------------------------------------------------------------ factories
    @classmethod
    def from_full_weights(
        cls,
        w13_full: torch.Tensor,
        w2_full: torch.Tensor,
        placement: Placement,
        layer_pos: int = 0,
        *,
        group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        w13_scale_inv: torch.Tensor | None = None,
        w2_scale_inv: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ExpertParallelMoE:
        """Build from all ``E`` experts' weights (``[E, 2I, H]``, ``[E, H, I]``): keeps this rank's slots only.

        Replicated experts become independent copies. ``device``/``dtype`` convert the local slice
        (``dtype`` applies to dense weights; FP8 weights and their scales keep their dtypes). FP8 experts:
        pass ``w13_scale_inv`` ``[E, 2I/bn, ceil(H/bk)]`` and ``w2_scale_inv`` ``[E, ceil(H/bn), ceil(I/bk)]``;
        the scales are sliced with their weights.
        """
        info = group_info(group)
        error = None
        w13 = w2 = None
        scales: dict[str, torch.Tensor] = {}
        try:
            w13, w2, scales = full_weights_slice(info, w13_full, w2_full, placement, layer_pos, device=device,
                                                 dtype=dtype, w13_scale_inv=w13_scale_inv, w2_scale_inv=w2_scale_inv)
        except ValueError as exc:
            error = str(exc)
        if error is not None:
            if not kwargs.get("verify", True):
                raise PlacementError(f"ExpertParallelMoE(layer {layer_pos}): {error}")
            # take part in the construction agreement so the other ranks raise too
            agree(info, f"ExpertParallelMoE(layer {layer_pos})", b"\x00" * 32, error,
                  device=torch.device(device) if device is not None else None)
            raise AssertionError("unreachable")  # agree raised
        assert w13 is not None and w2 is not None
        return cls(w13, w2, placement, layer_pos, group=group, **scales, **kwargs)



_ = AgreementError  # re-exported through eplb.runtime
