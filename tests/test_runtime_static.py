"""Static-capacity ExpertParallelMoE (fixed splits, no host sync) == the eager layer (gloo, 2-4 ranks, steps
over capacity), the same collectives for balanced and local-first, and CUDA-graph capture on one GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from eplb.placement import Placement
from eplb.runtime.layer import ExpertParallelMoE, reference_moe
from eplb.runtime.static_exchange import capacity_rounds
from eplb.runtime.testing import run_distributed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

E, H, INTER = 6, 16, 8


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * INTER, H, generator=g) / H**0.5, torch.randn(E, H, INTER, generator=g) / INTER**0.5


def _step(rank: int, step: int, N: int, k: int = 2, hot: bool = False):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(N, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]) if N else torch.zeros(0, k, dtype=torch.int64)
    if hot and N:
        ids[:, 0] = 0  # every token to expert 0: its ranks get far more rows than the capacity
    w = torch.rand(N, k, generator=g)
    return x, ids, w


def _placement(world: int) -> Placement:
    rng = np.random.default_rng(world)
    S = 5 * world
    row = np.concatenate([np.arange(E), [0, 0, 1], rng.integers(0, E, S - E - 3)])[:S]
    rng.shuffle(row)
    return Placement(row[None], E, world, 2 if world == 4 else 1)


def _static_worker(rank: int, world: int, strategy: str) -> list[float]:
    w13, w2 = _weights()
    p = _placement(world)
    eager = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy)
    errs = []
    for capacity in (2, 5, 64):
        eager.take_slot_counts()  # 64: one round; 2 and 5: steps over capacity use later rounds
        static = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy, capacity=capacity,
                                                     max_tokens_per_rank=12)
        assert capacity_rounds(12, 2, 5, capacity) == -(-24 // capacity)
        for step in range(3):
            N = (5 + 3 * rank + step) % 13  # differs per rank, 0 included
            x, ids, w = _step(rank, step, N, hot=step == 1)
            y_e = eager(x, ids, w)
            y_s = static(x, ids, w)
            assert torch.allclose(y_s, y_e, atol=1e-5), (capacity, step, float((y_s - y_e).abs().max()))
            assert torch.allclose(y_s, reference_moe(x, ids, w, w13, w2), atol=1e-5)
            errs.append(float((y_s - y_e).abs().max()) if N else 0.0)
        # counters: the same pairs sent per slot and computed per local slot as the eager layer
        sent_e, done_e = eager.take_slot_counts()
        sent_s, done_s = static.take_slot_counts()
        assert torch.equal(sent_e, sent_s) and torch.equal(done_e, done_s) and int(done_s.sum()) > 0
    return errs


@pytest.mark.parametrize("world,strategy", [(2, "balanced"), (3, "local-first"), (4, "round-robin"), (4, "balanced")])
def test_static_capacity_equals_eager(world: int, strategy: str) -> None:
    run_distributed(_static_worker, world, strategy, timeout_s=120)


def _over_worker(rank: int, world: int) -> str:
    w13, w2 = _weights()
    layer = ExpertParallelMoE.from_full_weights(w13, w2, _placement(world), 0, capacity=4, max_tokens_per_rank=5)
    x, ids, w = _step(rank, 0, 9 if rank == 1 else 3)
    try:
        y = layer(x, ids, w)
    except ValueError as exc:
        return str(exc)
    return "nan" if bool(torch.isnan(y).all()) or y.numel() == 0 else "values"


def test_static_capacity_too_many_tokens_raises_naming_capacity_and_rows() -> None:
    res = run_distributed(_over_worker, 2, timeout_s=60)
    assert "9 tokens (18 rows) exceed max_tokens_per_rank=5" in res[1] and "capacity=4" in res[1]
    assert res[0] == "nan"  # the other rank cannot raise without a host sync: its output is poisoned


def _collectives_worker(rank: int, world: int) -> dict[str, dict[str, int]]:
    w13, w2 = _weights()
    p = _placement(world)
    names = ("all_gather", "all_gather_into_tensor", "all_to_all_single", "all_reduce", "broadcast", "send", "recv",
             "all_to_all", "gather", "scatter")
    counts: dict[str, int] = {}
    orig = {n: getattr(dist, n) for n in names}

    def wrap(n):
        def f(*a, **kw):
            counts[n] = counts.get(n, 0) + 1
            return orig[n](*a, **kw)
        return f

    res = {}
    for strategy in ("local-first", "balanced", "round-robin"):
        for mode in ("eager", "static"):
            kw = {"capacity": 64, "max_tokens_per_rank": 16} if mode == "static" else {}
            layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy, **kw)
            x, ids, w = _step(rank, 0, 7 + rank)
            counts.clear()
            for n in names:
                setattr(dist, n, wrap(n))
            try:
                layer(x, ids, w)
            finally:
                for n in names:
                    setattr(dist, n, orig[n])
            res[f"{strategy}/{mode}"] = dict(counts)
    return res


def test_balanced_makes_the_same_collective_calls_as_local_first() -> None:
    res = run_distributed(_collectives_worker, 2, timeout_s=60)
    for r in res:
        assert r["local-first/eager"] == {"all_gather": 1, "all_to_all_single": 2}
        for key, calls in r.items():
            assert calls == r["local-first/eager"], key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["balanced", "local-first", "round-robin"])
def test_static_capacity_layer_cuda_graph_replay_equals_eager(strategy: str) -> None:
    E2, H2, I2, spr = 16, 256, 128, 24
    g = torch.Generator().manual_seed(3)
    w13 = (torch.randn(E2, 2 * I2, H2, generator=g) / H2**0.5).cuda().bfloat16()
    w2 = (torch.randn(E2, H2, I2, generator=g) / I2**0.5).cuda().bfloat16()
    row = np.concatenate([np.arange(E2), [0, 0, 1, 1, 2, 3, 4, 5]])
    p = Placement(row[None], E2, 1)
    eager = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy)
    static = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy, capacity=160, max_tokens_per_rank=64)
    assert spr == p.slots_per_rank and static.compute_impl == "grouped"
    N, k = 64, 4

    def inputs(seed):
        gg = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(E2, generator=gg)[:k] for _ in range(N)])
        ids[: N // 2, 0] = 0  # a hot expert
        return torch.randn(N, H2, generator=gg).bfloat16().cuda(), ids.cuda(), torch.rand(N, k, generator=gg).cuda()

    x, ids, w = inputs(0)
    static(x, ids, w)  # warm-up (compiles kernels, builds tables) on a side stream as graphs need
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        static(x, ids, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = static(x, ids, w)
    for seed in (1, 2, 3):
        x2, ids2, w2_ = inputs(seed)
        x.copy_(x2)
        ids.copy_(ids2)
        w.copy_(w2_)
        graph.replay()
        torch.cuda.synchronize()
        ref = eager(x2, ids2, w2_)
        assert torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2), (seed, float((y - ref).abs().max()))


def _plan_count_worker(rank: int, world: int) -> dict[str, int]:
    import eplb.dispatch.assign as assign_mod

    w13, w2 = _weights()
    p = _placement(world)
    calls = {"n": 0}
    orig = assign_mod.plan_quotas

    def counting(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)

    res = {}
    for mode in ("eager", "static"):
        kw = {"capacity": 64, "max_tokens_per_rank": 16} if mode == "static" else {}
        layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy="balanced", **kw)
        x, ids, w = _step(rank, 0, 7 + rank)
        assign_mod.plan_quotas = counting
        try:
            calls["n"] = 0
            y = layer(x, ids, w)
        finally:
            assign_mod.plan_quotas = orig
        assert torch.allclose(y, reference_moe(x, ids, w, w13, w2), atol=1e-5)
        res[mode] = calls["n"]
    return res


def test_balanced_layer_solves_one_plan_per_forward() -> None:
    for r in run_distributed(_plan_count_worker, 2, timeout_s=60):
        assert r == {"eager": 1, "static": 1}, r
