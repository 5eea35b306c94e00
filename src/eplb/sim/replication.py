"""Replay of per-step replication: a static placement plus ``D`` dynamic slots per rank, re-planned every step.

Every step and layer, :func:`eplb.dispatch.replication.plan_replication` chooses the copies and the split (the
same code the GPU kernel reproduces bit for bit). The copies are priced with the cost model's point-to-point time
of one expert (``copy_ms = expert_bytes / p2p_gbps``, 0.464 ms for a bf16 DeepSeek-V3 expert at 190 GB/s on the
H200 model): a layer's copy time is its busiest rank's ``max(copies received, copies sent) * copy_ms``.

* ``transfer_budget_ms`` caps each rank's copies per layer at ``floor(budget / copy_ms)`` in each direction, so a
  plan never needs more link time than the budget (``None``: ``D`` caps receives, ``R * D`` sends);
* ``hide_ms`` is the time the copies of a layer can overlap with (default: the budget, else the layer's own
  dispatch all-to-all); copy time beyond it is **exposed** and added to that layer's time, and the run reports
  how many layers could not hide their copies;
* the compute time of a rank uses ``slots_per_rank`` plus the dynamic slots it filled (part of its grouped GEMM);
* ``lookahead=True`` chooses the copies from the previous step's counts of the same layer (so they can move
  during the previous step) and splits the exact counts of this step over the static + dynamic replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from eplb.dispatch.replication import (
    copies_within,
    plan_replication,
    slot_tables,
    static_holdings,
)
from eplb.errors import InputError
from eplb.metrics import imbalance_ratio
from eplb.placement import Placement
from eplb.sim.cost import CostModel
from eplb.sim.engine import SimInput, SimResult, as_sim_input, check_fits, step_chunk
from eplb.stats.trace import Trace

__all__ = ["copy_ms", "replay_replicated", "replication_caps"]


def copy_ms(cost: CostModel) -> float:
    """Point-to-point time of one expert's weights under ``cost`` (ms, no latency)."""
    return float(cost.expert_bytes / (cost.p2p_gbps * 1e6))


def replication_caps(cost: CostModel, dynamic_slots: int, num_ranks: int,
                     transfer_budget_ms: float | None) -> tuple[int, int]:
    """``(max_recv, max_send)`` copies per rank and layer that fit ``transfer_budget_ms`` (``None``: ``D`` and
    ``R * D``)."""
    D = int(dynamic_slots)
    if transfer_budget_ms is None:
        return D, num_ranks * D
    n = copies_within(float(transfer_budget_ms), copy_ms(cost))
    return min(D, n), n


def _plan_chunk(counts: np.ndarray, mult: np.ndarray, accept: np.ndarray, D: int, recv: int, send: int,
                prev_dyn: np.ndarray | None, lookahead: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """Rank loads ``[c, L, R]``, copies per rank ``[c, L, R]`` (max of received and sent), used dynamic slots
    ``[c, L, R]``, and the chunk's last dynamic experts ``[L, R, D]`` (the next chunk's first copies, lookahead)."""
    c = counts.astype(np.int64)
    if not lookahead:
        p = plan_replication(c, mult, D, max_recv=recv, max_send=send, accept=accept)
        de, ds = p.dyn_expert, p.dyn_source
        used = (de >= 0).sum(-1)
        R = mult.shape[-1]
        sent = (ds[..., None] == np.arange(R)).sum((-3, -2)) if D else np.zeros_like(used)
        return p.rank_loads, np.maximum(used, sent), used, de[-1] if len(de) else prev_dyn
    # lookahead: copies chosen on the previous step's counts; exact split over static + those copies
    choose = plan_replication(c, mult, D, max_recv=recv, max_send=send, accept=accept)
    first = prev_dyn[None] if prev_dyn is not None else np.full_like(choose.dyn_expert[:1], -1)
    de_all = np.concatenate([first, choose.dyn_expert[:-1]])  # step t uses the copies chosen on step t - 1
    aug = np.broadcast_to(mult, (de_all.shape[0],) + mult.shape).copy()
    ti, li, ri, di = np.nonzero(de_all >= 0)
    np.add.at(aug, (ti, li, de_all[ti, li, ri, di], ri), 1)
    p = plan_replication(c, aug, 0)  # exact split over static + dynamic replicas, no new copies
    used = (de_all >= 0).sum(-1)
    return p.rank_loads, used, used, choose.dyn_expert[-1]


def replay_replicated(trace: Trace | Any | SimInput, placement: Placement, *, dynamic_slots: int,
                      transfer_budget_ms: float | None = None, hide_ms: float | None = None,
                      cost: CostModel | None = None, lookahead: bool = False, label: str | None = None,
                      chunk_steps: int | None = None, progress: Callable[[int], None] | None = None,
                      meta: Mapping[str, Any] | None = None) -> SimResult:
    """Replay ``trace`` with per-step replication on top of ``placement`` (see the module docstring).

    Returns a :class:`~eplb.sim.engine.SimResult` with ``mode="replicated"``: ``migration_ms`` is the exposed copy
    time of each step, ``bytes_moved`` the copied bytes, and ``meta["replication"]`` the copy statistics
    (copies per layer, copy time per layer, layers whose copies could not hide).
    """
    from eplb.sim.cost import default_cost_model

    data = as_sim_input(trace)
    check_fits(placement, data)
    cm = cost or default_cost_model()
    D = int(dynamic_slots)
    if D < 0:
        raise InputError(f"dynamic-slots: expected an integer >= 0, got {dynamic_slots!r}")
    if transfer_budget_ms is not None and (not np.isfinite(transfer_budget_ms) or transfer_budget_ms < 0):
        raise InputError(f"transfer-budget: expected a time in ms >= 0, got {transfer_budget_ms!r}")
    if np.any(np.asarray(data.counts) != np.round(data.counts)):
        raise InputError("trace: per-step replication needs whole token counts")
    R, N, spr = placement.num_ranks, placement.num_nodes, placement.slots_per_rank
    recv, send = replication_caps(cm, D, R, transfer_budget_ms)
    one = copy_ms(cm)
    if hide_ms is None:
        hide = float(transfer_budget_ms) if transfer_budget_ms is not None else None
    else:
        hide = float(hide_ms)
    mult = static_holdings(placement)
    accept = slot_tables(placement)["accept"].astype(bool)
    T, L = data.num_steps, data.num_layers
    chunk = int(chunk_steps) if chunk_steps else max(1, step_chunk(L, data.num_experts * R) // 4)
    comp, comm, mig, tok = np.empty(T), np.empty(T), np.empty(T), np.empty(T)
    nbytes = np.zeros(T, dtype=np.int64)
    imb = np.empty((T, L))
    layer_sum = np.zeros(L)
    copies_layer = np.empty((T, L))
    copy_layer_ms = np.empty((T, L))
    exposed_layers = 0
    prev = None
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        loads, per_rank, used, prev = _plan_chunk(np.asarray(data.counts[a:b]), mult, accept, D, recv, send, prev,
                                                  lookahead)
        mx = loads.max(-1)
        imb[a:b] = imbalance_ratio(loads, axis=-1)
        # a rank's grouped GEMM covers its static slots and the dynamic slots it filled this step
        cp = np.zeros(loads.shape)
        for u in range(D + 1):
            cp = np.where(used == u, cm.compute_ms(loads, spr + u), cp)
        cp = cp.max(-1)
        cmm = 2.0 * cm.a2a_ms(mx, R, N)
        ctime = per_rank.max(-1) * one  # [c, L]
        window = hide if hide is not None else cm.a2a_ms(mx, R, N)
        exposed = np.maximum(ctime - window, 0.0) if not lookahead else np.zeros_like(ctime)
        exposed_layers += int((exposed > 1e-12).sum())
        layer = cp + cmm + cm.other_ms_per_layer + exposed
        comp[a:b], comm[a:b], mig[a:b] = cp.sum(1), cmm.sum(1), exposed.sum(1)
        tok[a:b] = loads.sum((1, 2))
        copies_layer[a:b] = used.sum(-1)
        copy_layer_ms[a:b] = ctime
        nbytes[a:b] = (used.sum((1, 2)) * cm.expert_bytes).astype(np.int64)
        layer_sum += layer.sum(0)
        if progress is not None:
            progress(b)
    step = comp + comm + cm.other_ms_per_layer * L + mig
    policy = str(placement.meta.get("policy", "?"))
    rep = {
        "dynamic_slots": D, "transfer_budget_ms": transfer_budget_ms, "hide_ms": hide, "lookahead": lookahead,
        "max_recv": recv, "max_send": send, "copy_ms": one,
        "copies_per_layer_mean": float(copies_layer.mean()), "copy_ms_per_layer_mean": float(copy_layer_ms.mean()),
        "copy_ms_per_layer_max": float(copy_layer_ms.max()), "exposed_layers": exposed_layers,
        "exposed_layers_frac": exposed_layers / max(T * L, 1), "exposed_ms_per_step": float(mig.mean()),
    }
    return SimResult(
        label=label or f"{policy}+D{D}", policy=policy, mode="replicated", strategy="replicated", num_ranks=R,
        num_slots=placement.num_slots, num_nodes=N, step_ids=np.asarray(data.step_ids), step_ms=step,
        compute_ms=comp, comm_ms=comm, migration_ms=mig, bytes_moved=nbytes, layer_updates=np.zeros(T, dtype=np.int64),
        imbalance=imb, layer_ms=layer_sum / T, tokens=tok, events=[], final_placement=placement,
        meta={**dict(meta or {}), "replication": rep},
    )
