"""ExpertParallelMoE: equals the single-process MoE for any placement / strategy / chunking (gloo, 2 and 4
processes), counters, commit, and bad input raising on every rank without a hang."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.placement import Placement, PlacementError
from eplb.runtime.compute import expert_ffn, resolve_impl
from eplb.runtime.layer import ExpertParallelMoE, _round_plan, reference_moe
from eplb.runtime.testing import run_distributed

E, H, INTER = 6, 16, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(E: int = E, H: int = H, inter: int = INTER, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


def _inputs(N: int, k: int, E: int, seed: int, dtype: torch.dtype = torch.float32, H: int = H):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]) if N else torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(N, k, generator=g)
    return x, ids, w


def _random_placement(rng: np.random.Generator, E: int, R: int, spr: int, nodes: int = 1) -> Placement:
    """Every expert at least once, the rest random (replicas, some colocated on one rank), shuffled."""
    S = R * spr
    row = np.concatenate([np.arange(E), rng.integers(0, E, S - E)])
    rng.shuffle(row)
    return Placement(row[None], E, R, nodes)


# ----------------------------------------------------------------------------- single process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_grouped_and_loop_equal_reference(dtype):
    w13, w2 = _weights(E, dtype=dtype)
    counts = torch.tensor([3, 0, 5, 1, 0, 2])
    x = torch.randn(int(counts.sum()), H).to(dtype)
    slot = torch.repeat_interleave(torch.arange(E), counts)
    ref = reference_moe(x, slot[:, None], torch.ones(len(slot), 1), w13, w2).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for impl in ("loop", resolve_impl("auto", w13, w2)):
        y = expert_ffn(x, counts, w13, w2, impl=impl).float()
        assert torch.allclose(y, ref, atol=tol, rtol=tol), impl
    assert expert_ffn(x[:0], torch.zeros(E, dtype=torch.int64), w13, w2, impl="loop").shape == (0, H)


def test_single_rank_layer_without_torch_distributed():
    w13, w2 = _weights()
    p = Placement(np.array([[0, 1, 2, 3, 4, 5, 2, 2]]), E, 1)
    layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy="round-robin", max_num_tokens=3)
    x, ids, w = _inputs(7, 2, E, seed=1)
    y = layer(x, ids, w)
    assert torch.allclose(y, reference_moe(x, ids, w, w13, w2), atol=1e-5)
    counts = layer.take_counts()
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=E).tolist()
    assert layer.take_counts().sum() == 0  # zeroed
    sent, done = layer.take_slot_counts()
    assert int(sent.sum()) == int(done.sum()) == 14
    assert sent[[2, 6, 7]].sum() == counts[2]  # expert 2's pairs went to its three replicas
    with pytest.raises(ValueError, match="topk_ids outside"):
        layer(x, ids + E, w)
    with pytest.raises(ValueError, match="hidden must be"):
        layer(x[:, :3], ids, w)


def test_constructor_errors_single_process():
    w13, w2 = _weights()
    p = Placement(np.arange(E)[None], E, 1)
    with pytest.raises(PlacementError, match="ep_size=2"):
        ExpertParallelMoE.from_full_weights(w13, w2, Placement(np.arange(E)[None], E, 2), 0)
    with pytest.raises(ValueError, match="strategy"):
        ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy="random")
    with pytest.raises(ValueError, match="max_num_tokens"):
        ExpertParallelMoE.from_full_weights(w13, w2, p, 0, max_num_tokens=0)
    with pytest.raises(ValueError, match="local slots"):
        ExpertParallelMoE(w13[:3], w2[:3], p, 0)
    with pytest.raises(PlacementError, match="experts"):
        ExpertParallelMoE.from_full_weights(w13[:4], w2[:4], p, 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), spr=st.integers(6, 10), strategy=st.sampled_from(["local-first", "round-robin",
                                                                                       "balanced"]),
       chunk=st.sampled_from([None, 1, 4, 7]))
def test_single_rank_any_placement_matches_reference(seed, spr, strategy, chunk):
    rng = np.random.default_rng(seed)
    p = _random_placement(rng, E, 1, spr)
    w13, w2 = _weights(seed=seed)
    layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy, max_num_tokens=chunk)
    x, ids, w = _inputs(int(rng.integers(0, 12)), 3, E, seed)
    assert torch.allclose(layer(x, ids, w), reference_moe(x, ids, w, w13, w2), atol=1e-5)
    rows = layer.round_recv_rows
    assert sum(rows) == ids.numel()
    if chunk is None:
        assert rows == [ids.numel()]
    else:
        assert max(rows, default=0) <= chunk and len(rows) == -(-ids.numel() // chunk)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), R=st.integers(1, 5), M=st.integers(1, 9))
def test_round_plan_partitions_every_incoming_order_into_windows(seed, R, M):
    """Brute force: simulate every rank's plan; senders and receivers agree, windows are exact, <= M rows."""
    rng = np.random.default_rng(seed)
    C = rng.integers(0, 12, (R, R)) * (rng.random((R, R)) < 0.7)
    C[:, 0] *= int(rng.integers(1, 6))  # a hot destination
    plans = [_round_plan(C[r], C[:, r], C, r, M) for r in range(R)]
    n_rounds = -(-int(C.sum(0).max()) // M)
    assert all(len(pl) == n_rounds for pl in plans)
    for d in range(R):
        got = []  # positions in d's incoming order (source-major), round by round
        offs = np.concatenate([[0], np.cumsum(C[:, d])])
        for j in range(n_rounds):
            lo_s = np.array([plans[s][j][0][d] for s in range(R)])
            len_s = np.array([plans[s][j][1][d] for s in range(R)])
            assert np.array_equal(plans[d][j][2], len_s)  # the receiver expects what each sender sends
            assert len_s.sum() <= M
            pos = np.concatenate([offs[s] + lo_s[s] + np.arange(len_s[s]) for s in range(R)])
            assert np.array_equal(pos, np.arange(j * M, min((j + 1) * M, int(C[:, d].sum()))))
            got.append(pos)
        assert np.array_equal(np.concatenate(got) if got else np.zeros(0), np.arange(int(C[:, d].sum())))
    one = _round_plan(C[0], C[:, 0], None, 0, None)
    assert len(one) == 1 and one[0][0] is None


# ----------------------------------------------------------------------------- multi-process workers
def _equivalence_worker(rank: int, world: int, nodes: int, cases: int) -> dict:
    """Many random placements x strategies x chunkings x dtypes in one process group."""
    rng = np.random.default_rng(1234)  # same on every rank: same placements
    worst = {}
    for case in range(cases):
        spr = int(rng.integers(2, 5))
        if world * spr < E:
            spr = -(-E // world)
        p = _random_placement(rng, E, world, spr, nodes)
        strategy = ["local-first", "round-robin", "balanced"][case % 3]
        chunk = [None, 1, 3, 8][case % 4]
        dtype = torch.bfloat16 if case % 5 == 4 else torch.float32
        compute = "loop" if case % 2 else "auto"
        w13, w2 = _weights(seed=case, dtype=dtype)
        layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy, max_num_tokens=chunk,
                                                    compute=compute)
        N = int(np.random.default_rng(case * 100 + rank).integers(0, 10))  # uneven, sometimes 0
        x, ids, w = _inputs(N, 2, E, seed=case * 100 + rank, dtype=dtype)
        for _ in range(2):  # two steps: counters accumulate
            y = layer(x, ids, w)
        ref = reference_moe(x, ids, w, w13, w2)
        err = float((y.float() - ref.float()).abs().max()) if N else 0.0
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert err <= tol, (case, strategy, chunk, dtype, p.phy2log.tolist(), err)
        # counters: per-expert counts are this rank's own routing; computed pairs per slot sum over ranks
        assert layer.take_counts().tolist() == (2 * torch.bincount(ids.reshape(-1), minlength=E)).tolist()
        sent, done = layer.take_slot_counts()
        assert int(sent.sum()) == 2 * ids.numel()
        # the pairs sent to each slot went to a replica of the right expert
        per_expert = torch.zeros(E, dtype=torch.int64).index_add_(0, layer.placement_row, sent)
        assert per_expert.tolist() == (2 * torch.bincount(ids.reshape(-1), minlength=E)).tolist()
        done_all = [torch.empty_like(done) for _ in range(world)]
        torch.distributed.all_gather(done_all, done)
        sent_all = [torch.empty_like(sent) for _ in range(world)]
        torch.distributed.all_gather(sent_all, sent)
        assert torch.equal(torch.cat(done_all), torch.stack(sent_all).sum(0))  # received == sent, slot by slot
        # rounds: every rank ran the same number; each received at most `chunk` rows per round
        rows = layer.round_recv_rows
        assert sum(rows) == int(done.sum()) // 2
        n_rounds = [None] * world
        torch.distributed.all_gather_object(n_rounds, len(rows))
        assert len(set(n_rounds)) == 1
        if chunk is None:
            assert len(rows) == 1
        else:
            assert layer.max_round_recv_rows <= chunk and max(rows, default=0) <= chunk
            total = torch.tensor([sum(rows)])
            totals = [torch.empty_like(total) for _ in range(world)]
            torch.distributed.all_gather(totals, total)
            assert len(rows) == -(-max(int(t) for t in totals) // chunk)
        worst[strategy] = max(worst.get(strategy, 0.0), err)
    return worst


def _commit_worker(rank: int, world: int) -> None:
    rng = np.random.default_rng(7)
    p1 = _random_placement(rng, E, world, 4)
    p2 = _random_placement(rng, E, world, 4)
    w13, w2 = _weights(seed=3)
    layer = ExpertParallelMoE.from_full_weights(w13, w2, p1, 0, strategy="balanced")
    x, ids, w = _inputs(9, 2, E, seed=rank)
    assert torch.allclose(layer(x, ids, w), reference_moe(x, ids, w, w13, w2), atol=1e-5)
    experts = p2.rank_experts()[0, rank]
    w13_param = layer.w13
    layer.commit(torch.as_tensor(p2.phy2log[0]), {"w13": w13[experts], "w2": w2[experts]})
    assert layer.w13 is w13_param and layer.placement_row.tolist() == p2.phy2log[0].tolist()
    layer.verify()  # all ranks committed the same row
    assert torch.allclose(layer(x, ids, w), reference_moe(x, ids, w, w13, w2), atol=1e-5)
    with pytest.raises(PlacementError, match="slots"):
        layer.commit([0, 1], {"w13": w13[experts], "w2": w2[experts]})
    with pytest.raises(ValueError, match="keys"):
        layer.commit(p2.phy2log[0], {"w13": w13[experts]})


def _bad_input_worker(rank: int, world: int) -> list[str]:
    """Every failure below must raise on *every* rank (and never hang)."""
    seen = []
    w13, w2 = _weights()
    p = Placement(np.array([[0, 1, 2, 3, 4, 5, 0, 1]]), E, world)

    def expect(fn, exc=ValueError):
        with pytest.raises(exc) as info:
            fn()
        seen.append(str(info.value))

    for strategy in ("local-first", "balanced"):
        layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy=strategy)
        x, ids, w = _inputs(5, 2, E, seed=rank)
        # an out-of-range expert id on rank 1 only
        expect(lambda layer=layer, x=x, ids=ids, w=w: layer(x, ids + (E if rank == 1 else 0), w))
        # a malformed hidden on rank 0 only
        expect(lambda layer=layer, x=x, ids=ids, w=w: layer(x[:, :5] if rank == 0 else x, ids, w))
        # weights/ids shape mismatch on the last rank
        expect(lambda layer=layer, x=x, ids=ids, w=w: layer(x, ids, w[:, :1] if rank == world - 1 else w))
        # the layer still works afterwards (no desynchronised collective)
        assert torch.allclose(layer(x, ids, w), reference_moe(x, ids, w, w13, w2), atol=1e-5)
    # ranks hold different placements
    other = Placement(np.array([[0, 1, 2, 3, 4, 5, 2, 3]]), E, world)
    expect(lambda: ExpertParallelMoE.from_full_weights(w13, w2, other if rank == 1 else p, 0))
    # placement for another ep size (on every rank) and on one rank only
    wrong = Placement(np.array([[0, 1, 2, 3, 4, 5, 0, 1]]), E, 1)
    expect(lambda: ExpertParallelMoE.from_full_weights(w13, w2, wrong, 0))
    expect(lambda: ExpertParallelMoE.from_full_weights(w13, w2, wrong if rank == 0 else p, 0))
    # weights of another expert count on one rank
    expect(lambda: ExpertParallelMoE.from_full_weights(w13[:5] if rank == 1 else w13, w2, p, 0))
    # ranks disagree on the strategy
    expect(lambda: ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy="balanced" if rank else "local-first"))
    return seen


def _hot_rank_worker(rank: int, world: int) -> dict:
    """Rank 0 holds the only copies of the hot experts 0 and 1: it receives far more rows than any other rank."""
    E_hot = 2 * world
    row = np.arange(2 * world)  # 2 slots per rank, no replica: rank 0 serves experts 0 and 1
    p = Placement(row[None], E_hot, world)
    w13, w2 = _weights(E=E_hot, seed=5)
    g = torch.Generator().manual_seed(50 + rank)
    N, k = 30 + 7 * rank, 2
    x = torch.randn(N, H, generator=g)
    hot = torch.rand(N, generator=g) < 0.85
    other = torch.randint(2, E_hot, (N,), generator=g)  # experts of the other ranks
    ids = torch.stack([torch.zeros_like(other), torch.where(hot, torch.ones_like(other), other)], dim=1)
    w = torch.rand(N, k, generator=g)
    ref = reference_moe(x, ids, w, w13, w2)
    res: dict = {}
    calls = {"a2a": 0, "hdr": 0}
    for chunk in (None, 1, 3, 8):
        layer = ExpertParallelMoE.from_full_weights(w13, w2, p, 0, strategy="local-first", max_num_tokens=chunk,
                                                    compute="loop" if chunk == 3 else "auto")
        a2a, hdr = layer._all_to_all, layer._all_gather_counts

        def count_a2a(*a, _f=a2a):
            calls["a2a"] += 1
            return _f(*a)

        def count_hdr(h, _f=hdr):
            calls["hdr"] += 1
            calls["width"] = int(h.shape[0])
            return _f(h)

        layer._all_to_all, layer._all_gather_counts = count_a2a, count_hdr
        calls.update(a2a=0, hdr=0)
        y = layer(x, ids, w)
        assert torch.allclose(y, ref, atol=1e-5), (chunk, float((y - ref).abs().max()))
        rows = layer.round_recv_rows
        assert calls["hdr"] == 1 and calls["a2a"] == 2 * len(rows)  # one count exchange, two all-to-alls a round
        assert calls["width"] == E_hot + 1  # the [E] expert counts + error flag, also with max_num_tokens
        if chunk is None:
            assert len(rows) == 1
        else:
            assert max(rows) <= chunk and layer.max_round_recv_rows <= chunk
        _, done = layer.take_slot_counts()
        res[chunk] = (sum(rows), len(rows), done.tolist())
    return res


def _chunk_mismatch_worker(rank: int, world: int) -> str:
    w13, w2 = _weights()
    p = Placement(np.array([[0, 1, 2, 3, 4, 5, 0, 1]]), E, world)
    with pytest.raises(ValueError) as info:
        ExpertParallelMoE.from_full_weights(w13, w2, p, 0, max_num_tokens=4 if rank else None)
    return str(info.value)


# ----------------------------------------------------------------------------- multi-process tests
@pytest.mark.parametrize("world", [2, 4])
def test_max_num_tokens_bounds_rows_a_hot_rank_receives(world):
    res = run_distributed(_hot_rank_worker, world, timeout_s=60)
    received = [r[None][0] for r in res]
    assert received[0] > 3 * max(received[1:])  # rank 0 is hot
    for chunk in (1, 3, 8):
        # all ranks ran the hot rank's number of rounds; totals and per-slot computed counts do not change
        assert {r[chunk][1] for r in res} == {-(-received[0] // chunk)}
        assert [r[chunk][0] for r in res] == received
        assert [r[chunk][2] for r in res] == [r[None][2] for r in res]


def test_ranks_disagreeing_on_max_num_tokens_raise_everywhere():
    msgs = run_distributed(_chunk_mismatch_worker, 2, timeout_s=60, collective_timeout_s=30)
    assert all("disagree" in m for m in msgs)


def test_ep_layer_equals_reference_2_ranks():
    worst = run_distributed(_equivalence_worker, 2, 1, 24, timeout_s=60)
    assert set(worst[0]) == {"local-first", "round-robin", "balanced"}


def test_ep_layer_equals_reference_4_ranks_2_nodes():
    run_distributed(_equivalence_worker, 4, 2, 12, timeout_s=60)


def test_commit_swaps_map_and_weights_2_ranks():
    run_distributed(_commit_worker, 2, timeout_s=60)


def test_bad_input_raises_on_every_rank_without_hang():
    msgs = run_distributed(_bad_input_worker, 2, timeout_s=60, collective_timeout_s=30)
    for r in range(2):
        m = msgs[r]
        assert "topk_ids outside [0, 6)" in m[0] and "rank(s) [1]" in m[0]
        assert "rank(s) [0]" in m[1]
        assert "rank(s) [1]" in m[2]
        assert "rank(s) [1]" in m[3] and "rank(s) [0]" in m[4]  # balanced: same checks
        assert "disagree" in m[6]
        assert "ep_size=1" in m[7]
        assert "ep_size=1" in m[8]
        assert "experts" in m[9]
        assert "disagree" in m[10]
        assert len(m) == 11
    assert "this rank (0): hidden must be" in msgs[0][1]
