"""Static-capacity token exchange of :class:`~eplb.runtime.ExpertParallelMoE` (``capacity=...``): fixed-size
buffers, fixed all-to-all splits, no host sync, so the whole MoE forward can be captured in a CUDA graph.

Like DeepEP's low-latency mode, sizes are fixed by a per-rank token bound ``T = max_tokens_per_rank`` and a
per-(source, destination) row capacity ``C`` per round. Every rank sends every rank exactly ``C`` rows a round
(padding rows are zeros), and runs ``rounds = ceil(T * min(k, spr) / C)`` rounds: a source's rows for one
destination are at most ``N * min(k, spr) <= T * min(k, spr)``, so no row is ever dropped (a step whose rows
exceed ``C`` simply uses the later rounds). ``N > T`` raises a ``ValueError`` naming the capacity and rows
(``N`` is a host shape, no sync).

The receiver needs no per-row metadata: from the gathered ``[R, E]`` counts it derives the ``[R, S]`` send
matrix (:func:`eplb.dispatch.send_matrix`); a source's rows for it arrive ordered by local slot, so the local
slot of received position ``p`` of source ``s`` is the number of slot prefix sums ``<= p``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["capacity_rounds", "static_exchange_forward"]


def capacity_rounds(max_tokens_per_rank: int, top_k: int, slots_per_rank: int, capacity: int) -> int:
    """Rounds of ``capacity`` rows per (source, destination) pair that carry any step of ``<= max_tokens_per_rank``
    tokens with ``top_k`` choices (at most ``min(top_k, slots_per_rank)`` rows per token go to one rank)."""
    worst = max_tokens_per_rank * min(top_k, slots_per_rank)
    return max(1, -(-worst // capacity))


def static_exchange_forward(layer: Any, hidden: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor,
                            send_all: torch.Tensor, weights: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
    """One forward's exchange, expert compute and combine with fixed splits (device tensors only).

    ``ids`` ``[N, k]`` (clamped) expert ids, ``slots`` ``[N, k]`` their physical slots, ``send_all`` ``[R, S]``
    rows of every (source, slot) (:func:`eplb.dispatch.send_matrix`), ``weights`` ``[N, k]``; ``poison`` a
    0-d bool (input error on some rank): the output is all NaN then. Returns ``[N, H]`` fp32.
    """
    R, spr, H = layer.num_ranks, layer.slots_per_rank, layer.hidden_size
    C = int(layer.capacity)
    N, k = int(ids.shape[0]), int(ids.shape[1])
    dev = hidden.device
    rounds = capacity_rounds(int(layer.max_tokens_per_rank), k, spr, C)
    flat = slots.reshape(-1)
    M = int(flat.shape[0])
    order = torch.argsort(flat, stable=True)  # by destination, then local slot
    w_sorted = weights.reshape(-1)[order].float()
    dest = torch.div(flat[order], spr, rounding_mode="floor")  # [M]
    send_rows = send_all[layer.rank].view(R, spr).sum(1)  # [R]
    start = torch.cumsum(send_rows, 0) - send_rows
    pos = torch.arange(M, device=dev) - start[dest]  # position of each sorted row in its destination's stream
    tok = torch.div(order, k, rounding_mode="floor")
    # what this rank receives: per source, rows per local slot (in local-slot order)
    mine = send_all[:, layer.rank * spr:(layer.rank + 1) * spr]  # [R, spr]
    slot_end = torch.cumsum(mine, 1)  # [R, spr]
    ii = torch.arange(C, device=dev)
    out = torch.zeros(N, H, dtype=torch.float32, device=dev)
    x_pad = hidden.new_zeros(1, H)
    hidden_ext = torch.cat([hidden, x_pad])  # row N: the zero padding row
    for j in range(rounds):
        # send buffer [R * C, H]: destination d's window [j*C, (j+1)*C) of its stream
        q = start.view(R, 1) + j * C + ii.view(1, C)  # [R, C] index into the sorted rows
        valid = (j * C + ii.view(1, C)) < send_rows.view(R, 1)
        src_tok = torch.where(valid, tok[q.clamp(max=max(M - 1, 0))] if M else torch.zeros_like(q), N)
        send_x = hidden_ext[src_tok.reshape(-1)]
        recv_x = layer._all_to_all(send_x, [C] * R, [C] * R)  # [R * C, H], source-major
        p = j * C + ii.view(1, C, 1)  # [1, C, 1] position in each source's stream
        lsid = (slot_end.view(R, 1, spr) <= p).sum(-1).reshape(-1)  # [R * C] in [0, spr]; spr = padding
        y = _local_compute_fixed(layer, recv_x, lsid)
        back = layer._all_to_all(y.to(hidden.dtype), [C] * R, [C] * R)  # [R * C, H]: my rows, per destination
        # combine: sorted row m went out in round pos // C at place dest * C + pos % C
        here = (pos >= j * C) & (pos < (j + 1) * C)
        place = torch.where(here, dest * C + (pos - j * C), 0)
        contrib = torch.where(here.view(-1, 1), back[place].float() * w_sorted.view(-1, 1), 0.0)
        out.index_add_(0, tok, contrib)
    return torch.where(poison, torch.full_like(out, float("nan")), out)


def _local_compute_fixed(layer: Any, recv_x: torch.Tensor, lsid: torch.Tensor) -> torch.Tensor:
    """Expert compute on a fixed-size receive buffer: rows sorted by local slot, padding (``lsid == spr``) last
    and not computed (grouped GEMM offsets end at the real rows); same order out (padding rows undefined)."""
    spr = layer.slots_per_rank
    dev = recv_x.device
    perm = torch.argsort(lsid, stable=True)
    cnt = torch.zeros(spr + 1, dtype=torch.int64, device=dev).index_add_(0, lsid, torch.ones_like(lsid))
    counts = cnt[:spr]
    layer.local_slot_counts += counts
    x = recv_x[perm]
    if not layer._needs_host_counts:  # grouped GEMM (dense or FP8): padding rows lie past the offsets
        y = layer._expert_ffn(x, counts)
    else:  # the loop needs the counts on the host (one sync: not capturable)
        host = [int(v) for v in counts.tolist()]
        n = sum(host)
        y = torch.zeros(x.shape[0], layer.hidden_size, dtype=layer.compute_dtype, device=dev)
        y[:n] = layer._expert_ffn(x[:n], counts, host)
    out = torch.empty_like(y)
    out[perm] = y
    return out
