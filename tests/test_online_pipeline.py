"""One pipeline, two drivers: the simulator and the runtime OnlineBalancer (2 gloo processes) make the
same decisions on the same trace -- including staging bounds, per-step byte caps and a drain -- count
moves by the executor's rule and give the same rank loads under exclusion."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement
from eplb.metrics import rank_loads, step_imbalance
from eplb.online import BalancerConfig, Pipeline, plan_migration
from eplb.policies.incremental import moves_rows
from eplb.sim import replay_online
from eplb.sim.cost import CostModel
from eplb.sim.engine import replay_static, strategy_rank_loads

L, E, R, S = 3, 8, 2, 16
BPE = 24  # FakeLayer: two [spr, 3] float32 tensors per slot; cost model: 3 x 2 x 2 x 2 bytes


def _trace(T=80, seed=3):
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.5, 1.0, size=(L, E)) + 0.05
    out = np.zeros((T, L, E), dtype=np.int64)
    for t in range(T):
        p = base if t < 40 else base[:, ::-1]
        for li in range(L):
            out[t, li] = rng.multinomial(400, p[li] / p[li].sum())
    return out


class FakeLayer:
    """Interface 2 with tiny weights (value = expert id), recording the exclusions it is given."""

    expert_weight_names = ("w13", "w2")

    def __init__(self, row, rank, spr, layer_id):
        import torch

        self.placement_row = torch.as_tensor(np.asarray(row), dtype=torch.int64)
        vals = self.placement_row[rank * spr:(rank + 1) * spr].to(torch.float32)
        self.w13 = vals[:, None].repeat(1, 3).contiguous()
        self.w2 = self.w13.clone()
        self.num_experts = E
        self.layer_id = layer_id
        self.pending = torch.zeros(E, dtype=torch.int64)
        self.excluded: list[int] = []

    def take_counts(self):
        import torch

        c, self.pending = self.pending, torch.zeros(E, dtype=torch.int64)
        return c

    def exclude_ranks(self, ranks):
        self.excluded = list(ranks)

    def commit(self, row, weights):
        import torch

        self.placement_row = torch.as_tensor(np.asarray(row), dtype=torch.int64)
        for k, v in weights.items():
            setattr(self, k, v)


def _worker(rank, world, counts, phy2log, cfg_dict, clock, drains):
    import torch

    from eplb.runtime.balancer import OnlineBalancer

    pl = Placement(phy2log, E, world)
    spr = pl.slots_per_rank
    layers = [FakeLayer(pl.phy2log[i], rank, spr, i) for i in range(pl.num_layers)]
    now = [0.0]
    bal = OnlineBalancer(layers, BalancerConfig.from_dict(cfg_dict), placement=pl, metrics=False, clock=lambda: now[0])
    launched = []
    for t in range(counts.shape[0]):
        now[0] = float(clock[t])
        for r in drains.get(t, ()):
            bal.drain(r)
        bal.step()
        launched.append(list(bal.last_launched))
        for i, layer in enumerate(layers):
            c = torch.as_tensor(counts[t, i])
            layer.pending = c - c // 2 if rank == 0 else c // 2
    for i, layer in enumerate(layers):  # every slot holds its expert's weights after the moves
        row = layer.placement_row.numpy()[rank * spr:(rank + 1) * spr]
        assert np.array_equal(layer.w13[:, 0].numpy(), row.astype(np.float32)), i
    keys = ("plan_id", "step", "stats_step", "decided_step", "decided_stats_step", "layers", "migrating",
            "transfers", "bytes")
    out = {"history": [{k: h[k] for k in keys} for h in bal.history], "commits": [[c[0], list(c[1])] for c in bal.commits],
           "final": bal.placement.phy2log.copy(), "excluded": sorted(bal.excluded_ranks), "launched": launched,
           "sent": bal.executor.bytes_sent, "bpe": bal.bytes_per_expert, "layer_excluded": layers[0].excluded,
           "peak_staging": bal.executor.peak_staging_bytes}
    bal.close(record=False)
    return out


def _cost():
    return CostModel(device="t", date="t", source="t", hidden_size=2, moe_intermediate_size=2, dtype_bytes=2,
                     compute_kind="roofline", roofline_ms_per_token=0.01, a2a_latency_ms=0.01)


def test_simulator_and_runtime_agree_with_staging_byte_caps_and_a_drain():
    from eplb.runtime.testing import run_distributed

    counts = _trace()
    initial = eplb.plan(counts[:10], S, R, policy="deepseek")
    cfg = BalancerConfig(num_slots=S, warmup_steps=2, check_every_steps=6, similarity_threshold=0.98,
                         layers_per_step=2, window_size=8, policy="deepseek", policy_backend="inline",
                         max_staging_bytes=8 * BPE, max_migration_bytes_per_step=2 * BPE)
    drains = {50: [1]}
    cm = _cost()
    assert cm.expert_bytes == BPE
    sim = replay_online(counts, initial, cfg, cost=cm, drains=drains)
    clock = np.concatenate([[0.0], np.cumsum(sim.step_ms) / 1e3])
    res = run_distributed(_worker, 2, counts, initial.phy2log, cfg.to_dict(), clock, drains, timeout_s=180)
    run = res[0]
    assert run["bpe"] == BPE
    for k in ("history", "commits", "excluded", "launched"):
        assert res[1][k] == run[k], k  # the ranks agree
    keys = list(run["history"][0])
    assert [{k: e[k] for k in keys} for e in sim.events] == run["history"]  # same decisions
    assert sim.meta["commits"] == run["commits"]
    assert np.array_equal(sim.final_placement.phy2log, run["final"])
    # the same steps post transfers (byte caps spread a batch over several steps) ...
    sim_posting = [t for t in range(len(counts)) if sim.bytes_moved[t] > 0]
    assert sim_posting == [t for t, layers in enumerate(run["launched"]) if layers]
    assert max(sim.bytes_moved) <= 2 * BPE
    assert any(len(e["commits"]) > 1 or e["transfers"] > 2 for e in sim.events)  # caps and staging were binding
    # ... and the same moves: what the executor sent is what the simulator charged and the history counts
    sent = sum(r["sent"] for r in res)
    assert sent == sim.bytes_moved.sum() == sum(e["bytes"] for e in sim.events)
    # the drain happened in both: rank 1 excluded, every expert served by rank 0, layers told
    assert run["excluded"] == [1] == sim.meta["excluded_ranks"] and run["layer_excluded"] == [1]
    final = sim.final_placement
    assert all(set(final.phy2log[i, :S // R]) == set(range(E)) for i in range(L))
    assert run["peak_staging"] <= 8 * BPE
    # loads under exclusion: the simulator's last steps equal eplb.metrics on the served placement
    tail = counts[-5:]
    assert np.allclose(sim.imbalance[-5:], np.stack([step_imbalance(tail[i], final) for i in range(5)]))
    assert np.allclose(strategy_rank_loads(tail, final), rank_loads(tail, final))
    assert np.all(rank_loads(tail, final)[..., 1] == 0)


def test_sim_rank_loads_follow_excluded_ranks():
    # the example: rank 3 drained; its experts are held elsewhere, so it gets no load
    pl = Placement(np.array([[0, 1, 2, 3, 4, 5, 0, 1]]), 6, 4, meta={"excluded_ranks": [3]})
    counts = np.array([[[31, 20, 60, 79.5, 40, 56.5]]])
    want = rank_loads(counts, pl)
    assert want.tolist() == [[[51, 139.5, 96.5, 0]]]  # experts 0 and 1 only on rank 0; rank 3 serves nothing
    assert np.allclose(strategy_rank_loads(counts, pl), want)
    assert np.allclose(strategy_rank_loads(counts, pl, "round-robin").sum(-1), want.sum(-1))
    # the simulator's replay gives the same loads; its imbalance is max / mean - 1 over the 3 serving ranks
    assert np.isclose(replay_static(counts, pl).imbalance[0, 0], 139.5 / (287 / 3) - 1)


def test_moves_are_counted_by_the_executors_rule():
    # one rank receives expert 2 into two slots: one transfer, not two
    a = Placement(np.array([[0, 1, 2, 3, 0, 1]]), 4, 2)
    b = Placement(np.array([[0, 1, 3, 3, 2, 2]]), 4, 2)
    assert plan_migration(a.phy2log[0], b.phy2log[0], 2).num_transfers == 2
    assert a.moves(b).tolist() == [2]  # was 3 (one per slot)
    assert moves_rows(a.phy2log, b.phy2log, 2, 4).tolist() == [2]
    assert eplb.metrics.experts_moved(a, b).tolist() == [2]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(4, 8, 2), (6, 12, 3), (5, 10, 5)]))
def test_moves_equal_executor_transfers(seed, shape):
    E_, S_, R_ = shape
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([rng.permutation(E_), rng.integers(0, E_, S_ - E_)]) for _ in range(4)]
    a = Placement(np.stack(rows[:2]), E_, R_)
    b = Placement(np.stack(rows[2:]), E_, R_)
    want = [plan_migration(a.phy2log[i], b.phy2log[i], R_).num_transfers for i in range(2)]
    assert a.moves(b).tolist() == want
    assert moves_rows(a.phy2log, b.phy2log, R_, E_).tolist() == want


def test_pipeline_is_torch_free_and_checks_its_config():
    import subprocess
    import sys

    code = ("import sys, numpy as np; import eplb.online as o; from eplb import Placement;"
            "p = o.Pipeline(o.BalancerConfig(warmup_steps=0, check_every_steps=1), Placement.contiguous(1, 4, 2, 4),"
            " bytes_per_expert=1); p.start(0); p.consume(0, np.ones((1, 4)));"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    try:
        Pipeline({"policy": "eplb"}, Placement.contiguous(1, 4, 2, 4), bytes_per_expert=1)  # type: ignore[arg-type]
    except ValueError as exc:
        assert "config: expected a BalancerConfig" in str(exc)
    else:
        raise AssertionError("expected a ValueError")
