"""TraceRouter: per-token ids whose per-expert counts are the trace's (scaled), distinct per token, consistent
over ranks; driving EP layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.datasets import load_builtin
from eplb.placement import Placement
from eplb.runtime.layer import ExpertParallelMoE
from eplb.runtime.trace_router import TraceRouter, scale_counts, topk_from_counts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(0, 1000), min_size=2, max_size=40), tokens=st.integers(1, 60),
       k=st.integers(1, 4))
def test_scale_counts_sum_cap_and_proportion(counts, tokens, k):
    E = len(counts)
    k = min(k, E)
    out = scale_counts(counts, tokens * k, tokens)
    assert out.sum() == tokens * k and out.min() >= 0 and out.max() <= tokens
    c = np.asarray(counts, dtype=float)
    if c.sum() > 0:
        ideal = c / c.sum() * tokens * k
        if np.all(ideal <= tokens - 1):  # no capping: largest remainder is within 1 of proportional
            assert np.all(np.abs(out - ideal) < 1.0)
        assert np.all(out[c == 0] <= tokens)  # zero-weight experts only fill what the cap forces
        if np.all(ideal <= tokens):
            assert np.all(out[c == 0] == 0)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 1000), tokens=st.integers(1, 50), k=st.integers(1, 6), E=st.integers(6, 20))
def test_topk_from_counts_exact_and_distinct(seed, tokens, k, E):
    rng = np.random.default_rng(seed)
    counts = scale_counts(rng.pareto(1.0, E), tokens * k, tokens)
    ids = topk_from_counts(counts, tokens, k, rng)
    assert ids.shape == (tokens, k)
    assert np.bincount(ids.ravel(), minlength=E).tolist() == counts.tolist()
    assert all(len(set(row)) == k for row in ids.tolist())


def test_topk_from_counts_rejects_bad_counts():
    with pytest.raises(ValueError, match="sum"):
        topk_from_counts([1, 2], 2, 1)
    with pytest.raises(ValueError, match="only 2 tokens"):
        topk_from_counts([3, 1], 2, 2)


def test_router_replays_real_trace_exactly_over_ranks():
    trace = load_builtin("llama4_maverick_mmlu_decode")  # 235 tokens per step, top-1
    R, N = 5, 47  # 5 * 47 = 235: the group's counts are the trace's exactly
    for step in (0, 17):
        for layer in (0, 23):
            ids = np.concatenate([TraceRouter(trace, num_ranks=R, rank=r).draw(step, layer, N, 1) for r in range(R)])
            assert np.bincount(ids.ravel(), minlength=128).tolist() == trace.counts[step, layer].tolist()
    # top-8 from a top-1 trace: proportional, capped, distinct per token, same on every rank's view
    rt = TraceRouter(trace, num_ranks=2, rank=1, seed=3)
    a = rt.draw(5, 2, 64, 8)
    assert a.shape == (64, 8) and all(len(set(r)) == 8 for r in a.tolist())
    assert np.array_equal(a, TraceRouter(trace, num_ranks=2, rank=1, seed=3).draw(5, 2, 64, 8))
    both = np.concatenate([TraceRouter(trace, num_ranks=2, rank=r, seed=3).draw(5, 2, 64, 8) for r in range(2)])
    assert np.bincount(both.ravel(), minlength=128).tolist() == rt.group_counts(5, 2, 64, 8).tolist()
    with pytest.raises(ValueError, match="rank"):
        TraceRouter(trace, num_ranks=2, rank=2)


def test_router_drives_layer_counters():
    counts = np.zeros((3, 2, 6), dtype=np.int64)
    counts[:, :, 4] = 90  # one hot expert
    counts[:, :, :4] = 10
    w13 = torch.randn(6, 8, 4)
    w2 = torch.randn(6, 4, 4)
    p = Placement(np.array([[0, 1, 2, 3, 4, 5, 4, 4], [0, 1, 2, 3, 4, 5, 4, 4]]), 6, 1)
    layers = [ExpertParallelMoE.from_full_weights(w13, w2, p, i) for i in range(2)]
    router = TraceRouter(counts)
    router.attach(layers)
    x = torch.randn(10, 4)
    dummy = torch.zeros(10, 1, dtype=torch.int64)
    for _ in range(3):
        for layer in layers:
            layer(x, dummy, torch.ones(10, 1))
        router.next_step()
    c = layers[1].take_counts()
    # 10 tokens/step from 10:10:10:10:90:0 -> 0.77 x4, 6.92: floors 0,0,0,0,6, largest remainders 4, 0, 1, 2
    assert c.tolist() == [3, 3, 3, 0, 21, 0]
    with pytest.raises(ValueError, match="experts"):
        TraceRouter(np.ones((1, 1, 5))).attach(layers)
