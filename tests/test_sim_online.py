"""Online replay: decisions equal the runtime OnlineBalancer's (2 gloo processes) on the same load sequence;
migration accounting; schedule; bad input."""

import numpy as np
import pytest

import eplb
from eplb import Placement
from eplb.runtime.manager import BalancerConfig, RebalanceTrigger, plan_migration
from eplb.sim import parse_online_spec, replay_online, replay_static, simulate
from eplb.sim.cost import CostModel

L, E, R, S = 3, 8, 2, 10


def shifting_trace(T=70, shift=30, seed=0):
    """Layer 1's hot experts change at step ``shift``; layers 0 and 2 keep their (skewed) popularity."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=(L, E)) + 0.05
    after = base.copy()
    after[1] = base[1][::-1]
    out = np.zeros((T, L, E), dtype=np.int64)
    for t in range(T):
        p = base if t < shift else after
        for li in range(L):
            out[t, li] = rng.multinomial(400, p[li] / p[li].sum())
    return out


def config(**kw):
    base = dict(num_slots=S, num_wait_worker_iterations=3, num_iterations_eplb_update=6, eplb_update_threshold=0.97,
                layer_updates_per_iter=1, window_size=8, policy="deepseek", policy_backend="inline")
    base.update(kw)
    return BalancerConfig(**base)


class FakeLayer:
    """Interface 2 of the brief with tiny weights; take_counts returns this rank's share of the scripted loads."""

    expert_weight_names = ("w13", "w2")

    def __init__(self, row, rank, spr, layer_id):
        import torch

        self.placement_row = torch.as_tensor(np.asarray(row), dtype=torch.int64)
        self.w13 = self.placement_row.reshape(-1)[rank * spr:(rank + 1) * spr].to(torch.float32).reshape(spr, 1, 1)
        self.w2 = self.w13.clone()
        self.num_experts = E
        self.layer_id = layer_id
        self.pending = torch.zeros(E, dtype=torch.int64)

    def take_counts(self):
        import torch

        c, self.pending = self.pending, torch.zeros(E, dtype=torch.int64)
        return c

    def commit(self, row, weights):
        import torch

        self.placement_row = torch.as_tensor(np.asarray(row), dtype=torch.int64)
        for k, v in weights.items():
            setattr(self, k, v)


def _balancer_worker(rank, world, counts, phy2log, cfg_dict, clock):
    import torch

    from eplb.runtime.balancer import OnlineBalancer

    pl = Placement(phy2log, E, world)
    spr = pl.slots_per_rank
    layers = [FakeLayer(pl.phy2log[i], rank, spr, i) for i in range(pl.num_layers)]
    now = [0.0]
    bal = OnlineBalancer(layers, BalancerConfig.from_dict(cfg_dict), placement=pl, metrics=False, clock=lambda: now[0])
    for t in range(counts.shape[0]):
        now[0] = float(clock[t])
        bal.step()
        for i, layer in enumerate(layers):  # forward step t routes counts[t]; this rank saw part of it
            c = torch.as_tensor(counts[t, i])
            layer.pending = c - c // 2 if rank == 0 else c // 2
    keys = ("plan_id", "step", "stats_step", "layers", "migrating", "transfers", "bytes")
    hist = [{k: h[k] for k in keys} for h in bal.history]
    out = hist, [[c[0], list(c[1])] for c in bal.commits], bal.placement.phy2log.copy(), bal.bytes_per_expert
    bal.close(record=False)
    return out


def _compare_with_balancer(counts, initial, cfg):
    from eplb.runtime.testing import run_distributed

    # the runtime's expert bytes come from the fake weights: 2 float32 values per slot
    cm = CostModel(device="t", date="t", source="t", hidden_size=1, moe_intermediate_size=1, dtype_bytes=1,
                   compute_kind="roofline", roofline_ms_per_token=0.01, a2a_latency_ms=0.01)
    sim = replay_online(counts, initial, cfg, cost=cm)
    clock = np.concatenate([[0.0], np.cumsum(sim.step_ms) / 1e3])
    res = run_distributed(_balancer_worker, 2, counts, initial.phy2log, cfg.to_dict(), clock, timeout_s=120)
    hist, commits, final, bpe = res[0]
    assert res[1][0] == hist and res[1][1] == commits and np.array_equal(res[1][2], final)  # ranks agree
    keys = ("plan_id", "step", "stats_step", "layers", "migrating", "transfers")
    assert [{k: e[k] for k in keys} for e in sim.events] == [{k: h[k] for k in keys} for h in hist]
    assert [h["bytes"] // bpe for h in hist] == [e["bytes"] // cm.expert_bytes for e in sim.events]
    assert sim.meta["commits"] == commits
    assert np.array_equal(sim.final_placement.phy2log, final)
    return sim


def test_online_decisions_equal_runtime_balancer_iterations():
    counts = shifting_trace()
    initial = eplb.plan(counts[:20], S, R, policy="deepseek")
    sim = _compare_with_balancer(counts, initial, config())
    # the balancer starts with no planned-for record: the first check re-plans every layer; layer 1 again
    # after its load shift
    assert sim.events, "expected rebalances"
    assert sim.events[0]["layers"] == [0, 1, 2]
    assert any(e["layers"] == [1] for e in sim.events[1:])


def test_online_decisions_equal_runtime_balancer_interval_and_floor():
    counts = shifting_trace(T=60, shift=25, seed=1)
    initial = Placement.contiguous(L, E, R, S)
    cfg = config(num_iterations_eplb_update=None, eplb_update_interval=0.004, eplb_update_threshold=0.9,
                 balancedness_floor=0.8, layer_updates_per_iter=2)
    sim = _compare_with_balancer(counts, initial, cfg)
    assert len(sim.events) >= 1


def test_schedule_and_migration_accounting_hand_checked():
    counts = shifting_trace(T=11, shift=100)  # stationary; only the first check (tag 4) is consumed in 11 steps
    initial = Placement.contiguous(L, E, R, S)
    cm = CostModel(device="t", date="t", source="t", hidden_size=10, moe_intermediate_size=10, dtype_bytes=1,
                   compute_kind="roofline", roofline_ms_per_token=0.001, p2p_gbps=1.0, migration_exposed=0.5)
    cfg = config(num_iterations_eplb_update=5, num_wait_worker_iterations=0, layer_updates_per_iter=3)
    sim = replay_online(counts, initial, cfg, cost=cm)
    assert len(sim.events) == 1
    ev = sim.events[0]
    # check at tag wait + n - 1 = 4, consumed at boundary 6 (submit, inline), announced with tag 6, accepted at 8;
    # transfers launched at 8 run during step 8 and are committed at boundary 9
    assert (ev["decided_stats_step"], ev["decided_step"], ev["step"], ev["stats_step"]) == (4, 6, 8, 6)
    assert ev["layers"] == [0, 1, 2] and ev["migrating"]
    assert ev["commits"] == [[9, ev["migrating"]]] and sim.meta["commits"] == [[9, ev["migrating"]]]
    final = sim.final_placement
    migs = [plan_migration(initial.phy2log[li], final.phy2log[li], R, layer=li) for li in ev["migrating"]]
    send = np.zeros(R, int)
    recv = np.zeros(R, int)
    for m in migs:
        for t in m.transfers:
            send[t.src] += 1
            recv[t.dst] += 1
    n = sum(m.num_transfers for m in migs)
    assert sim.bytes_moved.tolist() == [0] * 8 + [n * 300, 0, 0]  # expert = 3 x 10 x 10 x 1 B
    assert sim.layer_updates.tolist() == [0] * 8 + [len(migs), 0, 0]
    assert sim.migration_ms[8] == pytest.approx(max(send.max(), recv.max()) * 300 / 1e6)
    assert ev["bytes"] == n * 300 and ev["transfers"] == n and ev["ms"] == pytest.approx(sim.migration_ms[8])
    # bytes never exceed Placement.moves (which counts a copy per slot, the executor one per rank)
    assert n <= initial.moves(final).sum()
    # steps 0-8 run on the initial placement (+ half of the migration time at step 8), 9-10 on the new one
    before = replay_static(counts[:9], initial, cost=cm)
    after = replay_static(counts[9:], final, cost=cm)
    assert sim.step_ms[:9] == pytest.approx(before.step_ms + 0.5 * sim.migration_ms[:9])
    assert sim.step_ms[9:] == pytest.approx(after.step_ms)
    assert np.allclose(sim.imbalance, np.concatenate([before.imbalance, after.imbalance]))


def test_trigger_sees_every_step_like_a_direct_trigger():
    """With planned loads given and no migrations possible (threshold 0), the trigger runs checks only."""
    counts = shifting_trace(T=30)
    initial = eplb.plan(counts, S, R, policy="deepseek")
    cfg = config(eplb_update_threshold=0.0)
    sim = replay_online(counts, initial, cfg, planned_loads=counts.sum(0))
    assert sim.events == [] and sim.bytes_moved.sum() == 0
    static = replay_static(counts, initial)
    assert np.allclose(sim.step_ms, static.step_ms) and np.allclose(sim.imbalance, static.imbalance)
    trig = RebalanceTrigger(cfg, L, E)
    for t in range(30):
        trig.observe(t, counts[t], 0.0, placement=initial)
    assert trig.checks == 4  # steps 8, 14, 20, 26


def test_parse_online_spec_and_simulate_online():
    cfg = parse_online_spec("interval=60, threshold=0.9,layer_updates_per_iter=2,every=none", policy="deepseek")
    assert (cfg.eplb_update_interval, cfg.eplb_update_threshold, cfg.layer_updates_per_iter) == (60.0, 0.9, 2)
    assert cfg.num_iterations_eplb_update is None
    cfg = parse_online_spec("eplb_rebalance_layers_per_chunk=3,wait=0")  # an SGLang alias
    assert cfg.layer_updates_per_iter == 3 and cfg.num_wait_worker_iterations == 0
    counts = shifting_trace(T=50)
    rep = simulate(counts, ep_size=R, num_slots=S, policies=["deepseek"], online="every=6,wait=3,threshold=0.97",
                   plan_range="0-20")
    assert rep.labels == ["deepseek", "deepseek+online"]
    on = rep["deepseek+online"]
    assert on.mode == "online" and on.summary()["plans"] >= 1
    with pytest.raises(ValueError, match="online: unknown field 'bogus'"):
        parse_online_spec("bogus=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_online_spec("threshold")
    with pytest.raises(ValueError, match="eplb_update_threshold"):
        parse_online_spec("threshold=2")
    with pytest.raises(ValueError, match="num_slots=12 disagrees"):
        simulate(counts, ep_size=R, num_slots=S, online="num_slots=12")


def test_bad_online_input():
    counts = shifting_trace(T=10)
    pl = Placement.contiguous(L, E, R, S)
    with pytest.raises(ValueError, match="config: expected a BalancerConfig"):
        replay_online(counts, pl, {"policy": "deepseek"})
    with pytest.raises(ValueError, match="planned_loads"):
        replay_online(counts, pl, config(), planned_loads=np.ones((2, E)))
    with pytest.raises(ValueError, match="unknown policy"):
        replay_online(counts, pl, config(policy="nope"))
    with pytest.raises(ValueError, match="num_layers"):
        replay_online(counts, Placement.contiguous(2, E, R, S), config())
