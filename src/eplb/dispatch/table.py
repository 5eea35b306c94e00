"""Per-layer dispatch tables derived from a :class:`~eplb.Placement` (built once per placement, off the hot path).

:func:`layer_tables` computes every table for all layers at once (numpy, vectorised over layers;
Python loops only over experts/items). :class:`DispatchTable` holds one layer's tables as torch
tensors on a device, ready for :func:`eplb.dispatch.assign_slots`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from eplb.metrics import served_slots
from eplb.placement import Placement

__all__ = ["DispatchTable", "layer_tables", "served_replicas"]


def served_replicas(placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """``log2phy`` ``[L, E, K]`` and ``logcnt`` ``[L, E]`` of the replicas that receive tokens.

    Ranks in ``placement.meta["excluded_ranks"]`` (drained or failing ranks) get no tokens for an expert
    that has a replica on another rank; an expert served *only* by excluded ranks keeps them (soft
    exclusion, :func:`eplb.metrics.served_slots`), so a drain can be announced before every layer has
    migrated: tokens leave a rank layer by layer as its experts find new homes.
    """
    log2phy, logcnt = placement.log2phy, placement.logcnt
    if not placement.meta.get("excluded_ranks"):
        return log2phy, logcnt
    served = served_slots(placement)  # [L, S]
    valid = log2phy >= 0
    keep = valid & np.take_along_axis(served, np.clip(log2phy, 0, None).reshape(log2phy.shape[0], -1), 1).reshape(
        log2phy.shape)
    order = np.argsort(~keep, axis=-1, kind="stable")  # kept replicas first, ascending slot order preserved
    out = np.where(np.take_along_axis(keep, order, -1), np.take_along_axis(log2phy, order, -1), -1)
    cnt = keep.sum(-1)
    return out[..., : int(cnt.max())], cnt


def layer_tables(placement: Placement, *, static_map: bool = True) -> dict[str, Any]:
    """All dispatch tables of every layer (numpy ``int64``; ``L`` layers, ``K`` = max replicas).

    ``static_map=False`` skips the ``[L, R, E]`` local-first map (the largest table, ``O(L R E K)`` to build;
    the balanced solver and the rank-load scoring of placements never read it).

    Returns a dict with:

    * ``log2phy`` ``[L, E, K]``: slots of each expert that receive tokens (ascending, ``-1`` padded; see
      :func:`served_replicas` for ranks excluded by ``placement.meta["excluded_ranks"]``);
    * ``logcnt`` ``[L, E]``: replica counts; ``slot_rank`` ``[S]``: rank of each slot;
    * the balanced solver's compact view of the ``F`` experts with replicas on two or more ranks ("fluid"):
      ``fl_expert`` ``[L, F]`` (expert id, ``-1`` padded), ``fl_rank`` ``[L, F, Kd]`` (their distinct ranks,
      ``-1`` padded), ``fl_color`` ``[L, F]`` (a colouring: fluid experts of one colour share no rank),
      ``num_colors`` (int, max over layers), ``color_members`` ``[L, C, Fc]`` (fluid indices of each colour, padded
      with ``F - 1``, always a padding row); ``single_rank`` ``[L, E]`` (the one rank of a non-fluid expert, else
      ``-1``);
    * back to slots: ``slot_f`` ``[L, E]`` (fluid index of the expert or ``-1``), ``rep_kd`` ``[L, E, K]`` (distinct-rank
      index of replica ``k``), ``rep_mult``/``rep_pos`` ``[L, E, K]`` (the expert's replicas on that rank and this
      one's position among them: a rank's quota is split evenly over its local replicas);
    * ``static_map`` ``[L, R, E]``: the local-first slot of each (source rank, expert): a replica on the rank
      itself, else one on its node, else any; ties spread deterministically by ``(rank + expert) % candidates``
      (SGLang's static dispatch, without the random draw).
    """
    log2phy, logcnt = served_replicas(placement)
    L, E, K = log2phy.shape
    R = placement.num_ranks
    spr = placement.slots_per_rank
    rpn = placement.ranks_per_node
    slot_rank = placement.slot_rank()
    valid = log2phy >= 0
    rank = np.where(valid, slot_rank[np.clip(log2phy, 0, None)], -1)  # [L, E, K]
    kk = np.arange(K)
    # replicas of one expert on one rank: slots are ascending, so a rank's replicas are consecutive
    new_rank = valid & np.concatenate([np.ones((L, E, 1), dtype=bool), rank[..., 1:] != rank[..., :-1]], axis=-1)
    rep_kd = np.cumsum(new_rank, axis=-1) - 1  # index of the replica's rank among the expert's distinct ranks
    first_k = np.maximum.accumulate(np.where(new_rank, kk, 0), axis=-1)
    rep_pos = np.where(valid, kk - first_k, 0)
    mult = np.zeros((L, E, K + 1), dtype=np.int64)
    np.add.at(mult, (*np.nonzero(valid)[:2], rep_kd[valid]), 1)
    rep_mult = np.where(valid, np.take_along_axis(mult, np.clip(rep_kd, 0, None), -1), 1)
    n_ranks = new_rank.sum(-1)  # distinct ranks per expert
    fluid = n_ranks > 1

    # compact solver view: fluid experts only, their distinct ranks
    F = int(fluid.sum(1).max()) + 1  # at least one padding row (a harmless target for padded colour members)
    Kd = max(int(n_ranks.max()), 1)
    fl_order = np.argsort(~fluid, axis=1, kind="stable")  # fluid experts first, ascending id
    fl_ok = np.take_along_axis(fluid, fl_order, 1)
    pad = max(F - E, 0)
    fl_order = np.pad(fl_order, ((0, 0), (0, pad)))[:, :F]
    fl_ok = np.pad(fl_ok, ((0, 0), (0, pad)))[:, :F]
    fl_expert = np.where(fl_ok, fl_order, -1)
    slot_f = np.full((L, E), -1, dtype=np.int64)
    li, fi = np.nonzero(fl_ok)
    slot_f[li, fl_expert[li, fi]] = fi
    fl_rank = np.full((L, F, Kd), -1, dtype=np.int64)
    li, ei, ki = np.nonzero(new_rank & fluid[..., None])
    fl_rank[li, slot_f[li, ei], rep_kd[li, ei, ki]] = rank[li, ei, ki]
    single_rank = np.where(fluid, -1, rank[..., 0])

    # greedy colouring of fluid experts (experts of one colour share no rank), item by item, all layers at once
    cmax = Kd * spr + 1
    used = np.zeros((L, R + 1, cmax), dtype=bool)  # row R is a sink for padding
    fl_color = np.full((L, F), -1, dtype=np.int64)
    lidx = np.arange(L)[:, None]
    for f in range(F):
        rr = np.where(fl_rank[:, f] >= 0, fl_rank[:, f], R)  # [L, Kd]
        taken = used[lidx, rr].any(axis=1)  # [L, cmax]
        col = np.argmin(taken, axis=1)
        ok = fl_ok[:, f]
        fl_color[ok, f] = col[ok]
        mark = (fl_rank[:, f] >= 0) & ok[:, None]
        used[np.broadcast_to(lidx, (L, Kd))[mark], rr[mark], np.broadcast_to(col[:, None], (L, Kd))[mark]] = True
    num_colors = int(fl_color.max()) + 1 if fluid.any() else 0
    # members of each colour: [L, C, Fc] fluid indices, padded with the padding row F - 1
    per_color = (fl_color[:, None, :] == np.arange(num_colors)[None, :, None])  # [L, C, F]
    Fc = max(int(per_color.sum(-1).max()), 1) if num_colors else 1
    srt = np.argsort(~per_color, axis=-1, kind="stable")[..., :Fc]
    color_members = np.where(np.take_along_axis(per_color, srt, -1), srt, F - 1)

    out = {
        "log2phy": log2phy,
        "logcnt": logcnt,
        "slot_rank": slot_rank,
        "fl_expert": fl_expert,
        "fl_rank": fl_rank,
        "fl_color": fl_color,
        "num_colors": num_colors,
        "color_members": color_members,
        "single_rank": single_rank,
        "slot_f": slot_f,
        "rep_kd": np.where(valid, rep_kd, 0),
        "rep_mult": rep_mult,
        "rep_pos": rep_pos,
    }
    if not static_map:
        return out
    # local-first static map
    r = np.arange(R)
    e = np.arange(E)
    cand_rank = rank[:, None, :, :]  # [L, 1, E, K]
    on_rank = cand_rank == r[None, :, None, None]  # [L, R, E, K]
    on_node = (cand_rank >= 0) & (cand_rank // rpn == (r // rpn)[None, :, None, None])
    anywhere = np.broadcast_to(valid[:, None], on_node.shape)
    choose = np.where(on_rank.any(-1, keepdims=True), on_rank, np.where(on_node.any(-1, keepdims=True), on_node, anywhere))
    n_c = choose.sum(-1)  # [L, R, E] >= 1
    pick = (r[:, None] + e[None, :])[None] % n_c  # which candidate (in slot order)
    order = np.cumsum(choose, axis=-1) - 1
    hit = choose & (order == pick[..., None])
    k_sel = np.argmax(hit, axis=-1)
    smap = np.take_along_axis(np.broadcast_to(log2phy[:, None], hit.shape), k_sel[..., None], axis=-1)[..., 0]
    out["static_map"] = smap.astype(np.int64)
    return out


@dataclass(frozen=True)
class DispatchTable:
    """One layer's device tables for :func:`eplb.dispatch.assign_slots`.

    Tensors (``int64``): ``phy2log [S]``, ``log2phy [E, K]`` (``-1`` padded), ``logcnt [E]``,
    ``slot_rank [S]``, and the balanced solver's view (``fl_expert [F]``, ``fl_rank [F, Kd]``, ``fl_color [F]``, ``color_members [C, Fc]``,
    ``single_rank [E]``, ``slot_f [E]``, ``rep_kd``/``rep_mult``/``rep_pos`` ``[E, K]``; see :func:`layer_tables`), ``static_map [R, E]`` (local-first slot of each
    source rank and expert). Ints: ``num_ranks``, ``slots_per_rank``, ``ranks_per_node``, ``num_colors``.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    slot_rank: torch.Tensor
    fl_expert: torch.Tensor
    fl_rank: torch.Tensor
    fl_color: torch.Tensor
    color_members: torch.Tensor
    single_rank: torch.Tensor
    slot_f: torch.Tensor
    rep_kd: torch.Tensor
    rep_mult: torch.Tensor
    rep_pos: torch.Tensor
    static_map: torch.Tensor
    num_ranks: int
    slots_per_rank: int
    ranks_per_node: int
    num_colors: int

    @property
    def num_experts(self) -> int:
        """``E``."""
        return int(self.log2phy.shape[0])

    @property
    def num_slots(self) -> int:
        """``S``."""
        return int(self.phy2log.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.log2phy.device

    @classmethod
    def from_placement(cls, placement: Placement, layer_pos: int, device: Any = None) -> DispatchTable:
        """Tables of layer position ``layer_pos`` (0-based row of ``placement.phy2log``) on ``device``."""
        if not isinstance(placement, Placement):
            raise TypeError(f"placement: expected an eplb.Placement, got {type(placement).__name__}")
        if isinstance(layer_pos, bool) or not isinstance(layer_pos, (int, np.integer)) or not (
            0 <= layer_pos < placement.num_layers
        ):
            raise ValueError(f"layer_pos: expected an integer in [0, {placement.num_layers}), got {layer_pos!r}")
        pos = int(layer_pos)
        t = layer_tables(placement.select_layers([pos]))
        def tt(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(np.array(a, dtype=np.int64), device=device)

        return cls(
            phy2log=tt(placement.phy2log[pos]),
            log2phy=tt(t["log2phy"][0]),
            logcnt=tt(t["logcnt"][0]),
            slot_rank=tt(t["slot_rank"]),
            fl_expert=tt(t["fl_expert"][0]),
            fl_rank=tt(t["fl_rank"][0]),
            fl_color=tt(t["fl_color"][0]),
            color_members=tt(t["color_members"][0]),
            single_rank=tt(t["single_rank"][0]),
            slot_f=tt(t["slot_f"][0]),
            rep_kd=tt(t["rep_kd"][0]),
            rep_mult=tt(t["rep_mult"][0]),
            rep_pos=tt(t["rep_pos"][0]),
            static_map=tt(t["static_map"][0]),
            num_ranks=placement.num_ranks,
            slots_per_rank=placement.slots_per_rank,
            ranks_per_node=placement.ranks_per_node,
            num_colors=int(t["num_colors"]),
        )

    def to(self, device: Any) -> DispatchTable:
        """A copy with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})
