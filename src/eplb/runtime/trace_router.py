"""Trace-driven routing: each step's expert ids drawn from a recorded trace's per-expert counts.

Models built from a config have random router weights and route almost uniformly; a benchmark of
load balancing needs the real skew and drift. :class:`TraceRouter` replays a trace ``[T, L, E]``:
at step ``t`` and MoE layer ``l`` the whole EP group's ``G = R * N`` tokens (``N`` per rank) get
``G * k`` expert choices whose per-expert counts are the trace's counts of step ``t % T`` and
trace layer ``l % L`` scaled to ``G * k`` (largest remainders; no expert above ``G`` since a token
picks an expert at most once). Ids are laid out so every token's ``k`` ids are distinct, tokens
are shuffled (seeded by step and layer, identical on every rank) and rank ``r`` takes tokens
``r*N .. (r+1)*N - 1``. When ``G * k`` equals the trace's tokens, the counts are the trace's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_load, check_positive_int
from eplb._counts import StepCounts
from eplb.errors import InputError

__all__ = ["TraceRouter", "scale_counts", "topk_from_counts"]


def scale_counts(counts: ArrayLike, total: int, cap: int) -> np.ndarray:
    """``[E]`` integer counts proportional to ``counts`` summing to ``total`` with every entry ``<= cap``.

    Largest-remainder rounding; the excess over ``cap`` is redistributed proportionally (water filling).
    Raises ``ValueError`` if ``total > cap * E`` or all counts are zero while ``total > 0``.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    E = c.size
    total = int(total)
    if total > cap * E:
        raise InputError(f"scale_counts: cannot place {total} choices on {E} experts with at most {cap} each")
    if total == 0:
        return np.zeros(E, dtype=np.int64)
    if c.sum() <= 0:
        c = np.ones(E)
    out = np.zeros(E, dtype=np.int64)
    free = np.ones(E, dtype=bool)
    remaining = total
    while remaining > 0:
        w = np.where(free, c, 0.0)
        if w.sum() <= 0:  # the rest have zero weight: spread evenly over the free experts
            w = free.astype(np.float64)
        share = w / w.sum() * remaining
        base = np.floor(share).astype(np.int64)
        rem = remaining - int(base.sum())
        frac = share - base
        order = np.lexsort((np.arange(E), -frac))  # largest remainder, ties by id
        base[order[:rem]] += 1
        new = out + base
        over = new > cap
        if not over.any():
            out = new
            break
        # fix the saturated experts at cap and redistribute what they would have taken beyond it
        out = np.where(over, cap, out)
        free &= ~over
        remaining = total - int(out.sum())
    return out


def topk_from_counts(counts: ArrayLike, num_tokens: int, top_k: int, rng: np.random.Generator | None = None
                     ) -> np.ndarray:
    """``[num_tokens, top_k]`` expert ids whose per-expert counts are exactly ``counts`` (sum ``num_tokens*top_k``).

    Each row's ids are distinct when every count is ``<= num_tokens``. Rows are shuffled with ``rng``.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if int(c.sum()) != num_tokens * top_k:
        raise InputError(f"counts: sum {int(c.sum())} != num_tokens * top_k = {num_tokens * top_k}")
    if np.any(c > num_tokens):
        raise InputError(f"counts: an expert is chosen {int(c.max())} times but there are only {num_tokens} tokens")
    ids = np.repeat(np.arange(c.size, dtype=np.int64), c)  # sorted, each run <= num_tokens long
    mat = ids.reshape(top_k, num_tokens).T.copy()  # token g gets ids[g], ids[g + G], ...: distinct
    if rng is not None:
        mat = mat[rng.permutation(num_tokens)]
        # shuffle the order of the k choices in each row too (routers return them by score)
        mat = np.take_along_axis(mat, rng.random(mat.shape).argsort(axis=1), axis=1)
    return mat


class TraceRouter(StepCounts):
    """Per-step expert ids for the EP layers of one rank, drawn from a trace.

    Args:
        trace: an :class:`eplb.Trace` or counts ``[T, L, E]`` (``[L, E]`` for one step).
        num_ranks: EP size ``R`` (the group's tokens are split over ranks).
        rank: this rank.
        seed: shuffling seed (same on every rank).
        layer_map: trace layer used by each MoE layer position (default ``pos % L``).
        step_offset: first trace step replayed.

    Use :meth:`attach` to install it on a list of :class:`~eplb.runtime.ExpertParallelMoE` layers
    (sets their ``route_override``), and :meth:`next_step` after every model step.
    """

    def __init__(self, trace: Any, *, num_ranks: int = 1, rank: int = 0, seed: int = 0,
                 layer_map: Sequence[int] | None = None, step_offset: int = 0) -> None:
        counts = getattr(trace, "counts", trace)
        arr = check_load(counts, "trace counts", ndim=(2, 3))
        if arr.ndim == 2:
            arr = arr[None]
        self.counts = arr
        self.source = str(getattr(trace, "source", "")) or "counts array"
        self.num_ranks = check_positive_int(num_ranks, "num_ranks")
        if not 0 <= rank < num_ranks:
            raise InputError(f"rank: expected an integer in [0, {num_ranks}), got {rank}")
        self.rank = int(rank)
        self.seed = int(seed)
        self.layer_map = None if layer_map is None else [int(v) for v in layer_map]
        if self.layer_map is not None and any(not 0 <= v < self.num_layers for v in self.layer_map):
            raise InputError(f"layer_map: trace layers must lie in [0, {self.num_layers}), got {self.layer_map}")
        self.step = int(step_offset)
        self._device: Any = None

    def trace_layer(self, layer_pos: int) -> int:
        """Trace layer replayed by MoE layer position ``layer_pos``."""
        if self.layer_map is not None:
            return self.layer_map[layer_pos % len(self.layer_map)]
        return layer_pos % self.num_layers

    def group_counts(self, step: int, layer_pos: int, num_tokens: int, top_k: int) -> np.ndarray:
        """``[E]`` choices per expert over the whole group at ``step`` (``num_tokens`` per rank)."""
        G = num_tokens * self.num_ranks
        c = self.counts[step % self.num_steps, self.trace_layer(layer_pos)]
        return scale_counts(c, G * top_k, G)

    def draw(self, step: int, layer_pos: int, num_tokens: int, top_k: int) -> np.ndarray:
        """``[num_tokens, top_k]`` int64 ids of this rank's tokens at ``step`` for MoE layer ``layer_pos``."""
        G = num_tokens * self.num_ranks
        if top_k > self.num_experts:
            raise InputError(f"top_k: {top_k} exceeds the trace's {self.num_experts} experts")
        c = self.group_counts(step, layer_pos, num_tokens, top_k)
        rng = np.random.default_rng([self.seed, step, layer_pos])
        ids = topk_from_counts(c, G, top_k, rng)
        return ids[self.rank * num_tokens:(self.rank + 1) * num_tokens]

    def ids(self, layer_pos: int, num_tokens: int, top_k: int, device: Any = None) -> Any:
        """:meth:`draw` at the current step as an ``int64`` torch tensor on ``device``."""
        import torch

        return torch.as_tensor(self.draw(self.step, layer_pos, num_tokens, top_k), dtype=torch.int64, device=device)

    def attach(self, layers: Sequence[Any]) -> None:
        """Make each layer (``ExpertParallelMoE``) route with this trace (layer ``i`` replays trace layer ``i``)."""
        for i, layer in enumerate(layers):
            if getattr(layer, "num_experts", self.num_experts) != self.num_experts:
                raise InputError(f"trace has {self.num_experts} experts but layer {i} has {layer.num_experts}")
            dev = layer.w13.device if hasattr(layer, "w13") else None

            def route(n: int, k: int, _pos: int = i, _dev: Any = dev) -> Any:
                return self.ids(_pos, n, k, _dev)

            layer.route_override = route

    def next_step(self) -> None:
        """Advance to the next trace step."""
        self.step += 1
