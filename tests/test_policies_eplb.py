"""eplb's own policies: invariants (hypothesis), never worse than DeepSeek, constraints, incremental mode."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement
from eplb.datasets import load_builtin
from eplb.metrics import lower_bound, max_rank_load, rank_loads
from eplb.policies import POLICIES
from eplb.policies.eplb_policy import best_of, best_placement_for
from eplb.synthetic import zipf_counts

OWN = ("eplb", "eplb-robust", "eplb-hierarchical")


def check_invariants(p: Placement, w: np.ndarray, S: int, R: int, ds: Placement | None = None) -> None:
    L, E = w.shape
    assert p.phy2log.shape == (L, S) and p.phy2log.dtype == np.int64
    cnt = p.logcnt
    assert np.all(cnt >= 1) and np.all(cnt.sum(1) == S)  # every expert served, counts sum to S
    assert np.all(np.bincount(p.slot_rank(), minlength=R) == S // R)  # equal slots per rank
    # log2phy / phy2log consistency
    l2p = p.log2phy
    for layer in range(L):
        for e in range(E):
            slots = [s for s in l2p[layer, e] if s >= 0]
            assert slots == sorted(slots) and all(p.phy2log[layer, s] == e for s in slots) and len(slots) == cnt[layer, e]
    # counts conserved
    assert np.allclose(rank_loads(w, p).sum(-1), w.sum(-1))
    # no colocated duplicate when every expert has at most R replicas, unless DeepSeek's placement (which
    # eplb must never be worse than) uses one and no duplicate-free placement eplb found matches it
    avoidable = cnt.max(axis=1) <= R
    if ds is not None:
        avoidable &= ds.colocated_duplicates() == 0
    assert np.all(p.colocated_duplicates()[avoidable] == 0)


layouts = st.tuples(st.integers(2, 12), st.integers(1, 6), st.integers(0, 3), st.integers(1, 3)).map(
    lambda t: (t[0], t[1], ((t[0] + t[2] * t[1] + t[1] - 1) // t[1]) * t[1], t[3])
)


@settings(max_examples=40, deadline=None)
@given(layouts, st.integers(0, 2**31 - 1), st.sampled_from(["pareto", "zero", "equal", "one-hot"]))
def test_eplb_invariants_and_never_worse_than_deepseek(layout, seed, kind):
    E, R, S, L = layout
    rng = np.random.default_rng(seed)
    w = {"pareto": np.floor(rng.pareto(1.0, (L, E)) * 50), "zero": np.zeros((L, E)), "equal": np.full((L, E), 7.0),
         "one-hot": np.eye(E)[rng.integers(0, E, L)] * 1000}[kind]
    ds = eplb.plan(w, S, R, policy="deepseek")
    lb = lower_bound(w, S, R)
    for pol in ("eplb", "eplb-robust"):
        p = eplb.plan(w, S, R, policy=pol)
        check_invariants(p, w, S, R, ds)
        got = max_rank_load(w, p)
        assert np.all(got <= max_rank_load(w, ds) * (1 + 1e-9) + 1e-9)
        assert np.all(lb <= got * (1 + 1e-9) + 1e-12)


@settings(max_examples=25, deadline=None)
@given(layouts, st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_excluded_ranks_hold_nothing(layout, seed, n_ex):
    E, R, S, L = layout
    spr = S // R
    rng = np.random.default_rng(seed)
    w = np.floor(rng.pareto(1.0, (L, E)) * 50)
    ex = sorted(set(rng.integers(0, R, n_ex).tolist()))
    if (R - len(ex)) * spr < E:
        with pytest.raises(ValueError, match=r"excluded_ranks: .* slots are missing"):
            eplb.plan(w, S, R, policy="eplb", excluded_ranks=ex)
        return
    for pol in ("eplb", "eplb-robust"):
        p = eplb.plan(w, S, R, policy=pol, excluded_ranks=ex)
        assert p.meta["excluded_ranks"] == ex
        rl = rank_loads(w, p)
        assert np.all(rl[:, ex] == 0)
        assert np.allclose(rl.sum(-1), w.sum(-1))
        # every expert still served by a surviving rank
        alive = np.setdiff1d(np.arange(R), ex)
        assert np.all(p.expert_rank_count()[:, :, alive].sum(-1) >= 1)


def test_excluded_ranks_error_says_how_many_slots_missing():
    w = np.ones((1, 8))
    with pytest.raises(ValueError, match="remaining 2 ranks have 4 slots per layer .* 4 slots are missing"):
        eplb.plan(w, 8, 4, policy="eplb", excluded_ranks=[0, 3])
    with pytest.raises(ValueError, match=r"rank ids \[9\] are out of range"):
        eplb.plan(w, 8, 4, policy="eplb", excluded_ranks=[9])


def test_max_replicas_cap():
    w = np.array([[1000.0, 1, 1, 1, 1, 1, 1, 1]])
    p = eplb.plan(w, 16, 4, policy="eplb", max_replicas=3)
    assert p.logcnt.max() == 3
    assert eplb.plan(w, 16, 4, policy="eplb").logcnt.max() == 4  # uncapped: one replica per rank
    with pytest.raises(ValueError, match="max_replicas: 8 experts x at most 1 replicas = 8 < 16"):
        eplb.plan(w, 16, 4, policy="eplb", max_replicas=1)
    with pytest.raises(ValueError, match="max_replicas: expected a positive integer"):
        eplb.plan(w, 16, 4, policy="eplb", max_replicas=0)


def test_hot_expert_not_duplicated_on_a_rank():
    # one expert takes everything and there are R + 1 redundant slots: greedy replication would give it
    # R + 2 replicas (two on one rank); eplb keeps one per rank and balances perfectly
    w = np.array([[1600.0] + [0.0] * 15])
    p = eplb.plan(w, 32, 16, policy="eplb")
    assert p.colocated_duplicates().tolist() == [0]
    assert max_rank_load(w, p)[0] == pytest.approx(100.0)
    ds = eplb.plan(w, 32, 16, policy="deepseek")
    assert max_rank_load(w, ds)[0] > 100.0


def test_eplb_beats_deepseek_on_real_trace():
    w = load_builtin("qwen3_235b_sglang").counts.sum(0)[:16]
    ds = max_rank_load(w, eplb.plan(w, 160, 32, policy="deepseek"))
    ours = max_rank_load(w, eplb.plan(w, 160, 32, policy="eplb"))
    lb = lower_bound(w, 160, 32)
    assert np.all(ours <= ds * (1 + 1e-12))
    assert (ours - lb).sum() <= 0.5 * (ds - lb).sum()  # closes at least half of DeepSeek's gap


def test_hierarchical_keeps_groups_on_nodes():
    w = zipf_counts(2, 3, 32, tokens_per_step=512, seed=1).sum(0)
    S, R, N, G = 48, 8, 2, 4
    p = eplb.plan(w, S, R, num_nodes=N, num_groups=G, policy="eplb-hierarchical")
    check_invariants(p, w, S, R)
    node_of_slot = p.slot_node()
    for layer in range(3):
        for g in range(G):
            nodes = {int(node_of_slot[s]) for s in range(S) if p.phy2log[layer, s] // (32 // G) == g}
            assert len(nodes) == 1  # a group and all replicas of its experts live on one node
    ds = eplb.plan(w, S, R, num_nodes=N, num_groups=G, policy="deepseek-hierarchical")
    assert np.all(max_rank_load(w, p) <= max_rank_load(w, ds) * (1 + 1e-12))
    with pytest.raises(ValueError, match="num_groups"):
        eplb.plan(w, S, R, num_nodes=N, num_groups=1, policy="eplb-hierarchical")


def test_incremental_unchanged_loads_move_nothing():
    w = zipf_counts(2, 4, 64, tokens_per_step=1024, seed=2).sum(0)
    cur = eplb.plan(w, 80, 16, policy="eplb")
    for pol in ("eplb", "eplb-incremental"):
        again = eplb.plan(w, 80, 16, policy=pol, current=cur)
        assert cur.moves(again).tolist() == [0, 0, 0, 0]
        assert again == cur


def test_incremental_moves_far_less_at_near_fresh_balance():
    c = load_builtin("llama4_maverick_mmlu_decode").counts
    old, new = c[:64].sum(0), c[64:].sum(0)
    cur = eplb.plan(old, 144, 16, policy="eplb")
    fresh = eplb.plan(new, 144, 16, policy="eplb")
    inc = eplb.plan(new, 144, 16, policy="eplb-incremental", current=cur, tolerance=0.01)
    assert np.all(max_rank_load(new, inc) <= max_rank_load(new, fresh) * 1.01 * (1 + 1e-9))
    assert cur.moves(inc).sum() < 0.5 * cur.moves(fresh).sum()
    with pytest.raises(ValueError, match="current"):
        eplb.plan(new, 144, 16, policy="eplb-incremental")
    with pytest.raises(ValueError, match="current: placement has"):
        eplb.plan(new, 144, 16, policy="eplb", current=Placement.contiguous(24, 128, 8, 144))


def test_incremental_drains_a_rank():
    w = zipf_counts(2, 3, 32, tokens_per_step=512, seed=4).sum(0)
    cur = eplb.plan(w, 48, 8, policy="eplb")
    p = eplb.plan(w, 48, 8, policy="eplb", current=cur, excluded_ranks=[5])
    assert np.all(rank_loads(w, p)[:, 5] == 0)
    # experts on surviving ranks mostly stay: at most the drained rank's 6 slots plus a few more per layer
    assert np.all(cur.moves(p) <= 6 + 6)


def test_zero_and_equal_loads():
    for w in (np.zeros((2, 16)), np.full((2, 16), 3.0)):
        for pol in ("eplb", "eplb-robust", "eplb-hierarchical"):
            p = eplb.plan(w, 32, 8, num_nodes=2, num_groups=4, policy=pol)
            check_invariants(p, w, 32, 8)
            assert np.allclose(rank_loads(w, p), w.sum(1, keepdims=True) / 8)


def test_best_of_and_best_placement_for():
    w = zipf_counts(1, 3, 32, tokens_per_step=256, seed=5).sum(0)
    a = eplb.plan(w, 40, 8, policy="deepseek")
    b = eplb.plan(w, 40, 8, policy="eplb")
    best = best_of(w, [a, b])
    assert np.all(max_rank_load(w, best) <= np.minimum(max_rank_load(w, a), max_rank_load(w, b)) + 1e-9)
    bp = best_placement_for(w, 40, 8, policies=("deepseek", "eplb"))
    assert np.allclose(max_rank_load(w, bp), max_rank_load(w, best))
    with pytest.raises(ValueError, match="unknown policies"):
        best_placement_for(w, 40, 8, policies=("nope",))


@pytest.mark.parametrize("pol", OWN)
def test_bad_input(pol):
    with pytest.raises(ValueError, match="NaN"):
        eplb.plan(np.array([[1.0, np.nan]]), 2, 1, policy=pol)
    with pytest.raises(ValueError, match="negative"):
        eplb.plan(np.array([[1.0, -1.0]]), 2, 1, policy=pol)
    with pytest.raises(ValueError, match="num_slots: 9 slots are not divisible by num_ranks=2"):
        eplb.plan(np.ones((1, 8)), 9, 2, policy=pol)
    with pytest.raises(ValueError, match="cannot serve 8 logical experts"):
        eplb.plan(np.ones((1, 8)), 6, 2, policy=pol)
    assert pol in POLICIES


def test_effort_levels():
    w = zipf_counts(1, 4, 64, tokens_per_step=2048, seed=6).sum(0)
    ds = max_rank_load(w, eplb.plan(w, 80, 16, policy="deepseek"))
    res = {}
    for ef in ("fast", "default", "high"):
        p = eplb.plan(w, 80, 16, policy="eplb", effort=ef)
        assert p.meta["effort"] == ef
        res[ef] = max_rank_load(w, p)
        assert np.all(res[ef] <= ds * (1 + 1e-12))
    assert res["high"].sum() <= res["fast"].sum() * (1 + 1e-12)
    with pytest.raises(ValueError, match="effort: expected one of"):
        eplb.plan(w, 80, 16, policy="eplb", effort="max")


def groups_on_one_node(p: Placement, G: int) -> bool:
    gs = p.num_experts // G
    sn = p.slot_node()
    grp = p.phy2log // gs  # [L, S]
    for g in range(G):
        nodes = np.where(grp == g, sn[None, :], -1)
        for row in nodes:
            if len(set(row[row >= 0].tolist())) != 1:
                return False
    return True


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(8, 10, 2, 2, 4), (16, 18, 2, 2, 2), (32, 36, 4, 2, 8),
                                                      (16, 24, 4, 4, 4), (32, 48, 8, 2, 4)]),
       st.sampled_from(["pareto", "zero-layer"]))
def test_hierarchical_node_property_and_bound(seed, layout, kind):
    from eplb.metrics import hierarchical_lower_bound

    E, S, R, N, G = layout
    rng = np.random.default_rng(seed)
    w = np.floor(rng.pareto(rng.uniform(0.5, 2.0), (3, E)) * 50)
    if kind == "zero-layer":
        w[1] = 0
    p = eplb.plan(w, S, R, num_nodes=N, num_groups=G, policy="eplb-hierarchical")
    check_invariants(p, w, S, R, eplb.plan(w, S, R, num_nodes=N, num_groups=G, policy="deepseek-hierarchical"))
    assert groups_on_one_node(p, G)
    got = max_rank_load(w, p)
    ds = max_rank_load(w, eplb.plan(w, S, R, num_nodes=N, num_groups=G, policy="deepseek-hierarchical"))
    assert np.all(got <= ds * (1 + 1e-9) + 1e-9)
    assert np.all(hierarchical_lower_bound(w, S, R, N, G) <= got * (1 + 1e-9) + 1e-12)


def test_long_window_checks_on_evenly_spaced_steps(monkeypatch):
    """A window longer than CHECK_STEPS is scored on CHECK_STEPS evenly spaced steps: the plan still never has a
    higher mean per-step max than DeepSeek's on those steps."""
    import eplb.policies.eplb_policy as ep
    from eplb.policies.search import step_max_mean

    rng = np.random.default_rng(3)
    block = rng.poisson(rng.gamma(0.5, 40.0, size=(1, 3, 16)), size=(4, 3, 16)).astype(np.float64)
    window = np.tile(block, (6, 1, 1))  # 24 steps
    monkeypatch.setattr(ep, "CHECK_STEPS", 8)
    got = eplb.plan(window, num_slots=24, num_ranks=4, policy="eplb")
    ds = eplb.plan(window, num_slots=24, num_ranks=4, policy="deepseek")
    pick = np.unique(np.linspace(0, 23, 8).round().astype(np.int64))
    o_got = step_max_mean(window[pick], got.phy2log, 4)
    o_ds = step_max_mean(window[pick], ds.phy2log, 4)
    assert np.all(o_got <= o_ds * (1 + 1e-12))
