"""Static replay: hand-computed step times, equality with eplb.metrics / the load report, strategies, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement
from eplb.metrics import imbalance_ratio, rank_loads
from eplb.sim import SimInput, replay_static, simulate
from eplb.sim.cost import CostModel
from eplb.sim.engine import as_sim_input, strategy_rank_loads
from eplb.stats.trace import Trace


def rate_model(ms_per_token=0.01, latency=0.05, gbps=1.0, other=0.0):
    return CostModel(device="test", date="2026-01-01", source="unit test", hidden_size=1000, moe_intermediate_size=500,
                     dtype_bytes=2, compute_kind="roofline", roofline_ms_per_token=ms_per_token, a2a_latency_ms=latency,
                     intra_node_gbps=gbps, inter_node_gbps=gbps / 2, other_ms_per_layer=other)


def test_step_time_is_max_rank_load_over_rate_plus_comm():
    # 4 experts on 2 ranks (identity), one layer; step 0: ranks get 10 and 2 pairs, step 1: 3 and 9
    counts = np.array([[[6, 4, 0, 2]], [[1, 2, 4, 5]]])
    pl = Placement([[0, 1, 2, 3]], 4, 2)
    r = replay_static(counts, pl, cost=rate_model(other=0.5))
    # compute = max load * 0.01 ms; a2a = 0.05 + max load * (1/2) * 2000 B / 1 GB/s, twice (dispatch + combine)
    exp = [10 * 0.01 + 2 * (0.05 + 10 / 2 * 2000 / 1e6) + 0.5, 9 * 0.01 + 2 * (0.05 + 9 / 2 * 2000 / 1e6) + 0.5]
    assert r.step_ms == pytest.approx(exp)
    assert r.compute_ms == pytest.approx([0.1, 0.09])
    assert r.imbalance[:, 0] == pytest.approx([10 / 6 - 1, 9 / 6 - 1])
    assert r.tokens.tolist() == [12, 12]
    assert r.bytes_moved.sum() == 0 and r.events == []


def test_replicas_split_uniformly_and_layers_sum():
    # expert 0 has two replicas (slots 0 and 2, on ranks 0 and 1): its 8 tokens split 4/4
    counts = np.array([[[8, 2, 2], [0, 0, 6]]])  # 2 layers
    pl = Placement([[0, 1, 0, 2], [0, 2, 1, 2]], 3, 2)
    r = replay_static(counts, pl, cost=rate_model(latency=0.0))
    # layer 0: ranks [4 + 2, 4 + 2] = [6, 6]; layer 1: expert 2 in slots 1 and 3 (ranks 0, 1): [3, 3]
    exp = (6 * 0.01 + 2 * 3 * 2000 / 1e6) + (3 * 0.01 + 2 * 1.5 * 2000 / 1e6)
    assert r.step_ms[0] == pytest.approx(exp)
    assert r.imbalance[0] == pytest.approx([0.0, 0.0])
    assert r.layer_ms == pytest.approx([6 * 0.01 + 2 * 3 * 2000 / 1e6, 3 * 0.01 + 2 * 1.5 * 2000 / 1e6])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([(8, 2), (8, 4), (6, 3)]), st.integers(0, 4),
       st.integers(0, 10_000))
def test_static_imbalance_equals_metrics_and_load_report(T, L, er, extra_per_rank, seed):
    E, R = er
    S = E + extra_per_rank * R
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=(T, L, E))
    counts[rng.random((T, L, E)) < 0.2] = 0
    pl = eplb.plan(rng.random((L, E)) + 0.1, S, R, policy="deepseek")
    r = replay_static(counts, pl, chunk_steps=2)  # several chunks
    assert np.allclose(r.imbalance, imbalance_ratio(rank_loads(counts, pl)))
    assert np.allclose(strategy_rank_loads(counts, pl), rank_loads(counts, pl))
    from eplb.stats.report import load_table

    tab = load_table(counts, R, placement=pl)
    assert np.allclose(r.imbalance.mean(axis=0), tab.imbalance)
    assert r.summary()["imbalance_mean"] == pytest.approx(tab.average[2])


def test_strategies_use_dispatch_split_counts():
    from eplb.dispatch import split_rank_loads

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 40, size=(4, 2, 8))
    pl = eplb.plan(counts, 12, 4, policy="deepseek")
    for s in ("uniform", "round-robin", "local-first", "balanced"):
        assert np.allclose(strategy_rank_loads(counts, pl, s), split_rank_loads(counts, pl, s))
    uni = replay_static(counts, pl, strategy="uniform")
    bal = replay_static(counts, pl, strategy="balanced")
    assert np.all(bal.imbalance <= uni.imbalance + 1e-9)  # balanced dispatch is never worse


def test_trace_input_and_step_ids():
    counts = np.arange(2 * 2 * 4).reshape(2, 2, 4)
    tr = Trace(counts, layer_ids=(3, 5), step_ids=np.array([10, 11]), source="synthetic: unit test")
    data = as_sim_input(tr)
    assert isinstance(data, SimInput) and data.synthetic and data.layer_ids == (3, 5)
    r = replay_static(tr, Placement.contiguous(2, 4, 2))
    assert r.step_ids.tolist() == [10, 11]


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 100, size=(37, 3, 16))
    pl = eplb.plan(counts, 24, 4, policy="deepseek")
    a = replay_static(counts, pl, chunk_steps=5)
    b = replay_static(counts, pl)
    assert np.allclose(a.step_ms, b.step_ms) and np.allclose(a.imbalance, b.imbalance)
    assert np.allclose(a.layer_ms, b.layer_ms)


def test_simulate_side_by_side_and_save(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.gamma(0.5, 20, size=(1, 4, 16)), size=(20, 4, 16))
    rep = simulate(counts, ep_size=4, num_slots=24, policies=["none", "deepseek"], plan_range="0-10")
    assert rep.labels == ["none", "deepseek"]
    assert rep["deepseek"].summary()["imbalance_mean"] < rep["none"].summary()["imbalance_mean"]
    assert rep.meta["plan_steps"] == [0, 9] and rep.meta["steps"] == 20
    files = rep.save(tmp_path)
    names = {p.name for p in files}
    assert {"simulation.json", "summary.md", "timeseries.png", "layers.png"} <= names
    import json

    d = json.loads((tmp_path / "simulation.json").read_text())
    assert set(d["summary"]) == {"none", "deepseek"} and len(d["series"]["none"]["step_ms"]) == 20
    assert (tmp_path / "timeseries.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("counts, match", [
    (np.full((2, 1, 4), -1), "negative"),
    (np.full((2, 1, 4), np.nan), "NaN"),
    (np.zeros((2, 1, 1, 4)), r"\[steps, layers, experts\]"),
    (np.array([["a"]]), "numeric"),
    (np.zeros((0, 1, 4)), "empty"),
])
def test_bad_traces(counts, match):
    with pytest.raises(ValueError, match=match):
        replay_static(counts, Placement.contiguous(1, 4, 2))


def test_bad_arguments():
    counts = np.ones((2, 2, 8))
    with pytest.raises(ValueError, match="num_layers is 1, expected 2"):
        replay_static(counts, Placement.contiguous(1, 8, 2))
    with pytest.raises(ValueError, match="num_experts is 4, expected 8"):
        replay_static(counts, Placement.contiguous(2, 4, 2))
    with pytest.raises(ValueError, match="strategy"):
        replay_static(counts, Placement.contiguous(2, 8, 2), strategy="magic")
    with pytest.raises(ValueError, match="not divisible"):
        simulate(counts, ep_size=3, num_slots=8)
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(counts, ep_size=2, policies=["nope"])
    with pytest.raises(ValueError, match="plan-range: no steps"):
        simulate(counts, ep_size=2, plan_range="5-9")
    with pytest.raises(ValueError, match="ep-size"):
        simulate(counts, ep_size=0)


def test_num_nodes_prices_inter_node_bytes():
    counts = np.array([[[8, 0, 0, 0]]])  # one hot expert: rank 0 gets 8 pairs
    cm = rate_model(ms_per_token=1e-12, latency=0.0, gbps=1.0)  # inter-node 0.5 GB/s
    one = replay_static(counts, Placement([[0, 1, 2, 3]], 4, 4, 1), cost=cm)
    two = replay_static(counts, Placement([[0, 1, 2, 3]], 4, 4, 2), cost=cm)
    # 4 ranks: 1 node -> 3/4 of 8 pairs intra; 2 nodes -> 1/4 intra, 2/4 inter at half the bandwidth
    assert one.comm_ms[0] == pytest.approx(2 * 6 * 2000 / 1e6)
    assert two.comm_ms[0] == pytest.approx(2 * max(2 * 2000 / 1e6, 4 * 2000 / 0.5e6))
    rep = simulate(np.repeat(counts, 3, 0), ep_size=4, num_nodes=2, num_groups=2, policies=["deepseek-hierarchical"],
                   cost=cm)
    assert rep.results[0].num_nodes == 2 and rep.meta["num_nodes"] == 2
