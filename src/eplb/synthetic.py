"""Synthetic expert-load generators (SYNTHETIC data: never present these as measurements).

All return int64 counts ``[T, L, E]`` (tokens per step, layer, expert) drawn with a seeded
``numpy.random.Generator``; each token picks ``top_k`` distinct experts.
"""

from __future__ import annotations

import numpy as np

__all__ = ["deepseek_v3_like", "drifting_hot_set", "zipf_counts", "zipf_popularity"]


def zipf_popularity(num_layers: int, num_experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """``[L, E]`` expert probabilities ``~ 1 / rank**skew`` with a random expert order per layer."""
    base = 1.0 / np.arange(1, num_experts + 1) ** skew
    base /= base.sum()
    return np.stack([base[rng.permutation(num_experts)] for _ in range(num_layers)])


def _sample_topk(probs: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Counts ``[L, E]`` of ``tokens`` tokens each choosing ``top_k`` distinct experts (Gumbel top-k)."""
    L, E = probs.shape
    if top_k == 1:
        return np.stack([rng.multinomial(tokens, p) for p in probs]).astype(np.int64)
    g = np.log(probs + 1e-30)[:, None, :] - np.log(-np.log(rng.random((L, tokens, E))))
    choice = np.argpartition(-g, top_k - 1, axis=-1)[..., :top_k]  # [L, tokens, k]
    out = np.zeros((L, E), dtype=np.int64)
    np.add.at(out, (np.repeat(np.arange(L), tokens * top_k), choice.ravel()), 1)
    return out


def zipf_counts(num_steps: int, num_layers: int, num_experts: int, *, tokens_per_step: int = 256, top_k: int = 8,
                skew: float = 1.0, seed: int = 0) -> np.ndarray:
    """Stationary Zipf-skewed routing: ``[T, L, E]``."""
    rng = np.random.default_rng(seed)
    probs = zipf_popularity(num_layers, num_experts, skew, rng)
    return np.stack([_sample_topk(probs, tokens_per_step, top_k, rng) for _ in range(num_steps)])


def drifting_hot_set(num_steps: int, num_layers: int, num_experts: int, *, tokens_per_step: int = 256, top_k: int = 8,
                     skew: float = 1.0, period: int = 200, seed: int = 0) -> np.ndarray:
    """Zipf routing whose expert popularity order is re-drawn every ``period`` steps (a drifting hot set)."""
    rng = np.random.default_rng(seed)
    out = []
    probs = zipf_popularity(num_layers, num_experts, skew, rng)
    for t in range(num_steps):
        if t and t % period == 0:
            probs = zipf_popularity(num_layers, num_experts, skew, rng)
        out.append(_sample_topk(probs, tokens_per_step, top_k, rng))
    return np.stack(out)


def deepseek_v3_like(num_steps: int = 16, *, tokens_per_step: int = 4096, skew: float = 1.0, num_layers: int = 58,
                     seed: int = 0) -> np.ndarray:
    """DeepSeek-V3 shape (58 MoE layers x 256 experts, top-8, 8 groups of 32): Zipf-skewed ``[T, 58, 256]``."""
    return zipf_counts(num_steps, num_layers, 256, tokens_per_step=tokens_per_step, top_k=8, skew=skew, seed=seed)
