"""Per-step replication in the EP layer: ``D`` dynamic slots per rank, filled by point-to-point copies each step.

A :class:`DynamicSlots` pool holds one set of ``D`` weight buffers per rank (``w13`` ``[D, 2I, H]``, ``w2``
``[D, H, I]``) shared by every layer that uses it: each layer's forward re-plans and refills them, so the memory
is ``D`` experts per rank whatever the number of layers. Attach it with ``layer.dynamic = pool``
(:meth:`eplb.runtime.ExpertParallelMoE.forward` then runs :func:`replicated_forward`). A forward step:

1. every rank counts its (token, expert) pairs, ``all_gather`` -> ``[R, E]``; every rank runs the same
   deterministic planner (:func:`eplb.dispatch.replication.plan_replication`, or its one-launch GPU kernel on CUDA)
   on the totals: which expert goes into which dynamic slot, from which rank, and every slot's token quota;
2. the copies start at once (``isend``/``irecv`` of the source's static slot into the destination's buffer; on
   CUDA on a side stream), and overlap with the token assignment and the dispatch all-to-all;
3. every source rank's share of every replica's quota (:func:`eplb.dispatch.source_shares` on the augmented slot
   space: rank ``r``'s static slots then its dynamic slots) gives the whole send matrix on every rank (no count
   exchange); this rank's shares assign its tokens (:func:`eplb.dispatch.assign.balanced_token_slots`);
4. tokens travel (``all_to_all_single``); the rank then **waits for its copies** (CUDA: the compute stream waits
   on the side stream's event; CPU: the requests' ``wait``) before computing any dynamic slot, so no token reaches
   a slot before its weights land; static slots and dynamic slots run as two grouped GEMMs; outputs go back.

One round (``max_num_tokens`` chunking and static-capacity mode are not supported in this mode; the layer's
``strategy`` is not used: the split is the planner's). The layer's ``expert_counts`` keep counting
this rank's pairs per expert; ``slot_counts`` / ``local_slot_counts`` (static slot space) are not updated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.dispatch.assign import balanced_token_slots, source_shares
from eplb.dispatch.replication import plan_replication, slot_tables, slot_tokens, static_holdings
from eplb.errors import InputError
from eplb.runtime._layer_checks import check_inputs
from eplb.runtime.compute import expert_ffn

if TYPE_CHECKING:
    from eplb.runtime.layer import ExpertParallelMoE

__all__ = ["DynamicSlots", "replicated_forward"]


@dataclass
class DynamicSlots:
    """``D`` dynamic slots per rank, one buffer set for every layer that uses this pool.

    Args:
        dynamic_slots: ``D``.
        w13_shape, w2_shape: one expert's ``[2I, H]`` and ``[H, I]``.
        dtype, device: of the buffers (the layers' weights').
        max_recv, max_send, max_copies, min_copy_gain: the planner's per-step copy budget
            (:func:`eplb.dispatch.replication.plan_replication`); must be the same on every rank.
        backend: ``"auto"`` (the Triton kernel on CUDA when available, else numpy), ``"numpy"`` or ``"triton"``.

    Attributes:
        last_plan: the last forward's plan (``dyn_expert`` / ``dyn_source`` ``[R, D]``, ``slot_tokens`` ``[R, P + D]``
            as numpy), for inspection and tests.
        copies: expert copies this rank received since construction.
    """

    dynamic_slots: int
    w13_shape: tuple[int, ...]
    w2_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: Any = "cpu"
    max_recv: int | None = None
    max_send: int | None = None
    max_copies: int | None = None
    min_copy_gain: int = 1
    backend: str = "auto"
    last_plan: dict[str, np.ndarray] | None = field(default=None, init=False)
    copies: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        D = int(self.dynamic_slots)
        if D < 1:
            raise InputError(f"dynamic_slots: expected an integer >= 1, got {self.dynamic_slots!r}")
        if self.backend not in ("auto", "numpy", "triton"):
            raise InputError(f"backend: expected 'auto', 'numpy' or 'triton', got {self.backend!r}")
        dev = torch.device(self.device)
        self.w13 = torch.empty((D, *self.w13_shape), dtype=self.dtype, device=dev)
        self.w2 = torch.empty((D, *self.w2_shape), dtype=self.dtype, device=dev)
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self._tables: dict[int, Any] = {}

    @classmethod
    def like(cls, layer: ExpertParallelMoE, dynamic_slots: int, **kwargs: Any) -> DynamicSlots:
        """A pool with buffers shaped like ``layer``'s slots (same dtype and device)."""
        return cls(dynamic_slots, tuple(layer.w13.shape[1:]), tuple(layer.w2.shape[1:]), dtype=layer.w13.dtype,
                   device=layer.w13.device, **kwargs)

    def forward(self, layer: ExpertParallelMoE, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """``layer``'s forward step with this pool (:func:`replicated_forward`; the layer calls it, so the
        layer module does not import this one)."""
        return replicated_forward(layer, self, hidden, topk_ids, topk_weights)

    def tables(self, layer: ExpertParallelMoE) -> Any:
        """Static tables of ``layer``'s placement row (cached per layer object, placement row and excluded ranks)."""
        key = id(layer)
        row = layer.placement_row.cpu().numpy()
        pl = layer._table_placement
        excluded = tuple(pl.meta.get("excluded_ranks", ()))
        t = self._tables.get(key)
        if t is None or not np.array_equal(t.row, row) or t.excluded != excluded:
            if not np.array_equal(pl.phy2log[0], row):  # committed since construction
                pl = type(pl)(row[None], pl.num_experts, pl.num_ranks, pl.num_nodes, pl.layer_ids, dict(pl.meta))
            st = slot_tables(pl)
            t = SimpleNamespace(row=row, excluded=excluded, placement=pl, mult=static_holdings(pl)[0], accept=st["accept"][0] > 0,
                                gpu={k: torch.as_tensor(v[:1], device=layer.w13.device) for k, v in st.items()})
            self._tables[key] = t
        return t


def _plan(pool: DynamicSlots, layer: ExpertParallelMoE, totals: torch.Tensor) -> dict[str, np.ndarray]:
    t = pool.tables(layer)
    D = pool.dynamic_slots
    kw = {"max_recv": pool.max_recv, "max_send": pool.max_send, "max_copies": pool.max_copies,
          "min_copy_gain": pool.min_copy_gain}
    use_gpu = pool.backend == "triton" or (pool.backend == "auto" and totals.is_cuda)
    if use_gpu:
        from eplb.dispatch.replication_kernel import HAVE_TRITON, plan_replication_gpu

        use_gpu = HAVE_TRITON
    if use_gpu:
        res = plan_replication_gpu(totals.view(1, -1), t.gpu, D, **kw)
        host = {k: res[k][0].cpu().numpy().astype(np.int64) for k in ("slot_tokens", "dyn_expert", "dyn_source")}
        return host
    c = totals.cpu().numpy()
    plan = plan_replication(c[None, :], t.mult, D, accept=t.accept, **kw)
    return {"slot_tokens": slot_tokens(plan, t.placement)[0], "dyn_expert": plan.dyn_expert[0],
            "dyn_source": plan.dyn_source[0]}


def _start_copies(pool: DynamicSlots, layer: ExpertParallelMoE, dyn_e: np.ndarray, dyn_s: np.ndarray) -> Any:
    """Post this rank's sends and receives of the plan's copies; returns a handle for :func:`_wait_copies`."""
    info = layer._info
    rank, P = layer.rank, layer.slots_per_rank
    row = layer.placement_row.cpu().numpy()
    mine = row[rank * P:(rank + 1) * P]
    ops: list[tuple[str, torch.Tensor, int]] = []
    R, D = dyn_e.shape
    for r in range(R):
        for d in range(D):
            e, s = int(dyn_e[r, d]), int(dyn_s[r, d])
            if e < 0:
                continue
            if rank == s:
                j = int(np.nonzero(mine == e)[0][0])  # the planner copies only from static holders
                ops += [("send", layer.w13[j], r), ("send", layer.w2[j], r)]
            if rank == r:
                ops += [("recv", pool.w13[d], s), ("recv", pool.w2[d], s)]
                pool.copies += 1
    if not ops:
        return None
    if not info.distributed:  # pragma: no cover - a one-rank placement never copies (every expert is local)
        raise RuntimeError("dynamic slots: a copy was planned without a process group")
    if pool.stream is not None:
        pool.stream.wait_stream(torch.cuda.current_stream(pool.w13.device))
        with torch.cuda.stream(pool.stream):
            p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, group=info.group)
                   for kind, t, peer in ops]
            reqs = dist.batch_isend_irecv(p2p)
            for q in reqs:
                q.wait()
            ev = torch.cuda.Event()
            ev.record(pool.stream)
        return ("cuda", ev, reqs)
    reqs = [(dist.isend if kind == "send" else dist.irecv)(t, peer, group=info.group) for kind, t, peer in ops]
    return ("cpu", None, reqs)


def _wait_copies(handle: Any) -> None:
    if handle is None:
        return
    kind, ev, reqs = handle
    if kind == "cuda":
        torch.cuda.current_stream().wait_event(ev)  # compute waits for the copies; the host does not
    else:
        for q in reqs:
            q.wait()


def _augmented_table(row: np.ndarray, dyn_e: np.ndarray, R: int, P: int, E: int, device: Any) -> SimpleNamespace:
    """The slot tables of static + dynamic slots, rank-major ``[R, P + D]`` slot ids, for :func:`source_shares`
    and :func:`balanced_token_slots` (``log2phy``, ``logcnt``, ``slot_rank``, ``num_experts``)."""
    D = dyn_e.shape[1]
    SP = P + D
    ex = np.concatenate([row.reshape(R, P), dyn_e], 1).reshape(-1)  # [R * SP], -1 for empty dynamic slots
    valid = ex >= 0
    order = np.argsort(np.where(valid, ex, E), kind="stable")
    cnt = np.bincount(ex[valid], minlength=E)
    K = int(cnt.max())
    log2phy = np.full((E, K), -1, dtype=np.int64)
    start = np.cumsum(cnt) - cnt
    srt = order[: int(valid.sum())]
    e_of = ex[srt]
    pos = np.arange(srt.size) - start[e_of]
    log2phy[e_of, pos] = srt
    return SimpleNamespace(
        log2phy=torch.as_tensor(log2phy, device=device), logcnt=torch.as_tensor(cnt, device=device),
        slot_rank=torch.as_tensor(np.arange(R * SP) // SP, device=device), num_experts=E, num_ranks=R,
        slots_per_rank=SP,
    )


def replicated_forward(layer: ExpertParallelMoE, pool: DynamicSlots, hidden: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor:
    """One forward of ``layer`` with per-step replication through ``pool`` (see the module docstring).

    Collective: every rank of the layer's group calls it. Inputs as :meth:`ExpertParallelMoE.forward`.
    """
    E, R, P, H = layer.num_experts, layer.num_ranks, layer.slots_per_rank, layer.hidden_size
    D = pool.dynamic_slots
    SP = P + D
    dev = layer.w13.device
    if layer.max_num_tokens is not None or getattr(layer, "capacity", None) is not None:
        raise InputError("dynamic slots: max_num_tokens chunking and static-capacity mode are not supported with "
                         "per-step replication")
    if tuple(layer.expert_weight_names) != ("w13", "w2"):
        raise InputError(f"dynamic slots: only dense w13/w2 experts are supported, this layer has "
                         f"{list(layer.expert_weight_names)}")
    err = check_inputs(hidden, topk_ids, topk_weights, layer.hidden_size, dev)
    if err is not None:
        raise InputError(f"ExpertParallelMoE(layer {layer.layer_pos}): {err}")
    if tuple(pool.w13.shape[1:]) != tuple(layer.w13.shape[1:]) or pool.w13.dtype != layer.w13.dtype:
        raise InputError(f"dynamic slots: buffers {tuple(pool.w13.shape[1:])} {pool.w13.dtype} do not match the "
                         f"layer's slots {tuple(layer.w13.shape[1:])} {layer.w13.dtype}")
    N, k = int(topk_ids.shape[0]), int(topk_ids.shape[1])
    ids = topk_ids.to(device=dev, dtype=torch.int64)
    if N and (int(ids.min()) < 0 or int(ids.max()) >= E):
        raise InputError(f"ExpertParallelMoE(layer {layer.layer_pos}): topk_ids outside [0, {E})")
    flat_ids = ids.reshape(-1)
    local = torch.zeros(E, dtype=torch.int64, device=dev).index_add_(0, flat_ids, torch.ones_like(flat_ids))
    layer.expert_counts += local
    g = layer._all_gather_counts(local)  # [R, E]
    plan = _plan(pool, layer, g.sum(0))
    pool.last_plan = plan
    handle = _start_copies(pool, layer, plan["dyn_expert"], plan["dyn_source"])
    row = layer.placement_row.cpu().numpy()
    tab = _augmented_table(row, plan["dyn_expert"], R, P, E, dev)
    per_slot = torch.as_tensor(plan["slot_tokens"].reshape(-1), device=dev)
    quotas = torch.where(tab.log2phy >= 0, per_slot[tab.log2phy.clamp(min=0)], torch.zeros_like(tab.log2phy))
    # every source rank's share of every replica: the whole [R, R * SP] send matrix, known to every rank without
    # a header exchange (the same deterministic arithmetic everywhere)
    shares = source_shares(g, quotas, tab)  # type: ignore[arg-type]  # [R, E, K]
    idx = tab.log2phy.clamp(min=0).reshape(1, -1).expand(R, -1)
    matrix = torch.zeros(R, R * SP, dtype=torch.int64, device=dev).scatter_add_(
        1, idx, (shares * (tab.log2phy >= 0)).reshape(R, -1))
    cum_e = torch.cumsum(shares[layer.rank], -1)
    slots = balanced_token_slots(ids, tab, layer.rank, cum_e).reshape(-1)  # type: ignore[arg-type]
    order = torch.argsort(slots, stable=True)
    sent = torch.zeros(R * SP, dtype=torch.int64, device=dev).index_add_(0, slots, torch.ones_like(slots))
    recv_hdr = matrix[:, layer.rank * SP:(layer.rank + 1) * SP]  # [R sources, SP local slots]
    host = torch.cat([recv_hdr.reshape(-1), sent, matrix[layer.rank]]).cpu().numpy()
    recv_counts = host[: R * SP].reshape(R, SP)
    if not np.array_equal(host[R * SP:2 * R * SP], host[2 * R * SP:]):  # pragma: no cover - counts are this rank's own
        raise RuntimeError("dynamic slots: this rank's token assignment disagrees with the planned send matrix")
    send_split = [int(v) for v in host[R * SP:2 * R * SP].reshape(R, SP).sum(1)]
    recv_split = [int(v) for v in recv_counts.sum(1)]
    tok = order // k
    w = topk_weights.reshape(-1).to(dev)[order].float()
    recv_x = layer._all_to_all(hidden[tok], send_split, recv_split)
    n_in = int(recv_x.shape[0])
    lsid = torch.repeat_interleave(torch.arange(SP, device=dev).repeat(R), recv_hdr.reshape(-1), output_size=n_in)
    _wait_copies(handle)  # no token reaches a dynamic slot before its weights have landed
    y = torch.empty(n_in, H, dtype=layer.w13.dtype, device=dev)
    impl = layer.compute_impl
    for lo, hi, w13, w2 in ((0, P, layer.w13, layer.w2), (P, SP, pool.w13, pool.w2)):
        sel = torch.nonzero((lsid >= lo) & (lsid < hi)).view(-1)
        if sel.numel() == 0:
            continue
        ls = lsid[sel] - lo
        perm = torch.argsort(ls, stable=True)
        counts = torch.zeros(hi - lo, dtype=torch.int64, device=dev).index_add_(0, ls, torch.ones_like(ls))
        host_counts = [int(v) for v in counts.cpu()] if impl == "loop" else None
        y[sel[perm]] = expert_ffn(recv_x[sel[perm]], counts, w13, w2, act=layer.act, impl=impl,
                                  counts_host=host_counts)
    back = layer._all_to_all(y.to(hidden.dtype), recv_split, send_split)
    out = torch.zeros(N, H, dtype=torch.float32, device=dev)
    out.index_add_(0, tok, back.float() * w[:, None])
    layer.steps += 1
    return out.to(hidden.dtype)
