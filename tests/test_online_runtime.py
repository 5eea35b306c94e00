"""Online balancer on real EP layers over gloo (2-4 processes): triggers, migration, drain, non-blocking policy."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from eplb import Placement, register_policy
from eplb.online import BalancerConfig
from eplb.runtime.balancer import OnlineBalancer, native_record_path
from eplb.runtime.layer import ExpertParallelMoE, reference_moe
from eplb.runtime.testing import run_distributed
from eplb.runtime.trace_router import topk_from_counts

H, INTER, K, N_TOK = 8, 4, 2, 16


@register_policy("online-test-fail")
def _failing_policy(loads, **kw):  # noqa: ANN001 - test policy
    raise RuntimeError("deliberate policy failure")


def _weights(L, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, E, 2 * INTER, H, generator=g) * 0.3, torch.randn(L, E, H, INTER, generator=g) * 0.3)


def _layers(w13, w2, pl):
    return [ExpertParallelMoE.from_full_weights(w13[i], w2[i], pl, i) for i in range(pl.num_layers)]


def _serve(layers, w13, w2, patterns, rank, step):
    """One forward of every layer on this rank's tokens routed exactly by ``patterns [L, E]``; checks each
    output against the single-process reference MoE and returns the max abs error."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    hidden = torch.randn(N_TOK, H, generator=g)
    err = 0.0
    for i, layer in enumerate(layers):
        ids = torch.as_tensor(topk_from_counts(patterns[i], N_TOK, K))
        wts = torch.rand(N_TOK, K, generator=g)
        out = layer(hidden, ids, wts)
        ref = reference_moe(hidden, ids, wts, w13[i], w2[i])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        err = max(err, float((out - ref).abs().max()))
    return err


def _check_bits(layers, w13, w2, rank):
    """Every local slot holds a bit-exact copy of its expert's weights; returns slots checked."""
    n = 0
    for i, layer in enumerate(layers):
        spr = layer.slots_per_rank
        row = layer.placement_row.numpy()
        for j in range(spr):
            e = int(row[rank * spr + j])
            assert torch.equal(layer.w13[j], w13[i][e]) and torch.equal(layer.w2[j], w2[i][e]), (i, j, e)
            n += 1
    return n


BASE = np.array([10, 8, 4, 3, 3, 2, 1, 1])  # per rank and step: 16 tokens x top-2
SHIFTED_LAYERS = (1, 3)


def _shift_worker(rank, world, record_path):
    L, E, S = 4, 8, 10
    w13, w2 = _weights(L, E)
    pl = Placement.contiguous(L, E, world, S)
    layers = _layers(w13, w2, pl)
    bpe = (2 * INTER * H + H * INTER) * 4
    cfg = BalancerConfig(num_wait_worker_iterations=2, num_iterations_eplb_update=6, window_size=6,
                         eplb_update_threshold=0.95, layer_updates_per_iter=2, policy="eplb", policy_backend="inline",
                         policy_options={"max_replicas": 2},  # vllm-ascend maps cannot co-locate replicas
                         max_staging_bytes=(S // world) * bpe, expert_map_record_path=record_path, log_interval=5)
    bal = OnlineBalancer(layers, cfg)
    checked = 0
    rows_seen = []
    for t in range(24):
        committed = bal.step()
        if committed:
            checked += _check_bits(layers, w13, w2, rank)
        rows_seen.append(bal.placement.phy2log.copy())
        pat = np.tile(BASE, (L, 1))
        if t >= 7:  # forward 7 on: the hot set of layers 1 and 3 moves to the cold experts
            pat[list(SHIFTED_LAYERS)] = BASE[::-1]
        _serve(layers, w13, w2, pat, rank, t)
    checked += _check_bits(layers, w13, w2, rank)
    text = bal.metrics.render().decode() if bal.metrics is not None else ""
    line = bal.metrics.log_line(bal.step_idx) if bal.metrics is not None else ""
    bal.close()
    return {"history": [(d.step, d.layers) for d in bal.trigger.history], "plans": bal.history,
            "stats": bal.stats(), "checked": checked, "final": bal.placement.phy2log.tolist(),
            "bpe": bal.bytes_per_expert, "metrics": text, "log": line, "commits": bal.commits,
            "budget": cfg.max_staging_bytes, "first": pl.phy2log.tolist()}


def test_load_shift_triggers_expected_layers_and_migration_is_exact(tmp_path):
    record = str(tmp_path / "eplb.json")
    res = run_distributed(_shift_worker, 2, record, timeout_s=120)
    r0, r1 = res
    # every rank decided the same, and exactly: all layers at the first check, then the shifted ones
    assert r0["history"] == r1["history"] == [(7, (0, 1, 2, 3)), (13, SHIFTED_LAYERS), (19, ())]
    assert r0["final"] == r1["final"] and r0["commits"] == r1["commits"]
    assert [p["migrating"] for p in r0["plans"]] == [[0, 1, 2, 3], [1, 3]]
    # at most layer_updates_per_iter layers per boundary, within the staging budget
    assert all(len(c[1]) <= 2 for c in r0["commits"])
    for r in res:
        assert 0 < r["stats"]["peak_staging_bytes"] <= r["budget"]
        assert r["checked"] > 0
    # bytes: transfers x expert bytes; what ranks sent equals what they received
    total = sum(p["bytes"] for p in r0["plans"])
    assert total == sum(p["transfers"] for p in r0["plans"]) * r0["bpe"] > 0
    assert r0["stats"]["bytes_sent_by_rank"] + r1["stats"]["bytes_sent_by_rank"] == total
    assert r0["stats"]["bytes_received_by_rank"] + r1["stats"]["bytes_received_by_rank"] == total
    assert all(p["balancedness_after"] > p["balancedness_before"] for p in r0["plans"])
    # Prometheus exposition and the log line
    m = r0["metrics"]
    for name in ('eplb_layer_balancedness{layer="3"}', 'eplb_layer_imbalance_ratio{layer="0"}',
                 "eplb_rebalances_total 2.0", "eplb_bytes_moved_total", "eplb_migration_seconds_count 2.0",
                 'eplb_step_time_seconds{quantile="0.99"}', "eplb_staging_bytes_peak"):
        assert name in m, name
    assert "rebalances=2" in r0["log"] and "balancedness=" in r0["log"]
    # expert_map_record_path: vllm-ascend JSON + native, and a restart from it (expert_map_path)
    from eplb.formats import read_placement

    final = np.array(r0["final"])
    assert np.array_equal(read_placement(record).phy2log, final)
    nat = read_placement(native_record_path(record))
    assert np.array_equal(nat.phy2log, final) and nat.meta["source"] == "eplb.online"
    start = BalancerConfig(expert_map_path=record).initial_placement(8, 2, num_layers=4)
    assert start is not None and np.array_equal(start.phy2log, final)
    assert not np.array_equal(final, np.array(r0["first"]))


def _drain_worker(rank, world, drained_rank):
    L, E, S = 2, 6, 8
    w13, w2 = _weights(L, E, seed=1)
    pl = Placement.contiguous(L, E, world, S)
    layers = _layers(w13, w2, pl)
    bpe = (2 * INTER * H + H * INTER) * 4
    cfg = BalancerConfig(num_iterations_eplb_update=1000, num_wait_worker_iterations=0, layer_updates_per_iter=1,
                         policy="eplb", policy_backend="inline", max_migration_bytes_per_step=bpe)
    bal = OnlineBalancer(layers, cfg)
    pat = np.tile(np.array([6, 6, 6, 6, 4, 4]), (L, 1))
    served, sent = [], []
    for t in range(18):
        before = bal.executor.bytes_sent
        bal.step()
        sent.append(bal.executor.bytes_sent - before)
        if t == 3 and rank == drained_rank:  # requested on one rank only; the all-reduce tells the others
            bal.drain(drained_rank)
        for layer in layers:  # every expert has a slot in the map the step is served with
            served.append(set(layer.placement_row.tolist()) == set(range(E)))
        for layer in layers:
            layer.take_slot_counts()
        _serve(layers, w13, w2, pat, rank, t)
        _check_bits(layers, w13, w2, rank)
    # once drained, the drained rank computes nothing: every expert it still holds is served elsewhere
    _serve(layers, w13, w2, pat, rank, 18)
    computed_after = int(sum(int(layer.take_slot_counts()[1].sum()) for layer in layers))
    out = {"drained": bal.drained, "final": bal.placement.phy2log.tolist(), "served": all(served), "sent": sent,
           "bpe": bpe, "computed_after": computed_after,
           "received": bal.executor.bytes_received, "excluded": sorted(bal.excluded_ranks)}
    bal.close()
    return out


def test_drain_keeps_every_expert_served():
    res = run_distributed(_drain_worker, 4, 2, timeout_s=150)
    spr = 2
    for r in res:
        assert r["drained"] and r["served"] and r["excluded"] == [2]
        assert r["final"] == res[0]["final"]
    for row in res[0]["final"]:
        survivors = row[:2 * spr] + row[3 * spr:]
        assert sorted(set(survivors)) == list(range(6))  # the drained rank can go: nothing is lost
    assert res[2]["received"] == 0  # nothing was sent to the drained rank
    assert res[2]["computed_after"] == 0 and all(r["computed_after"] > 0 for i, r in enumerate(res) if i != 2)
    # max_migration_bytes_per_step = one expert: transfers spread over steps, one expert per step at most
    per_step = np.sum([r["sent"] for r in res], axis=0)
    assert per_step.max() == res[0]["bpe"] and (per_step > 0).sum() >= 2


def test_drain_without_redundancy_says_how_many_slots_are_missing():
    w13, w2 = _weights(1, 4)
    pl = Placement.contiguous(1, 4, 1, 4)
    bal = OnlineBalancer(_layers(w13, w2, pl), BalancerConfig(policy="deepseek"), metrics=False)
    with pytest.raises(ValueError, match="drain\\(0\\): the remaining 0 ranks have 0 slots per layer but 4 experts "
                                         "must stay served: 4 slots are missing"):
        bal.drain(0)
    with pytest.raises(ValueError, match="out of range"):
        bal.drain(3)
    bal.close()


def _slow_worker(rank, world, delay):
    L, E, S = 2, 4, 6
    w13, w2 = _weights(L, E, seed=2)
    pl = Placement.contiguous(L, E, world, S)
    layers = _layers(w13, w2, pl)
    cfg = BalancerConfig(num_wait_worker_iterations=0, num_iterations_eplb_update=2, window_size=4,
                         layer_updates_per_iter=1, policy="eplb", policy_backend="thread")
    bal = OnlineBalancer(layers, cfg, policy_delay_s=delay, metrics=False)
    pat = np.tile(np.array([2, 14, 14, 2]), (L, 1))  # both hot experts on rank 0 (local-first: 44 vs 20 pairs)
    step_s, submitted, accepted, t_sub, t_acc = [], None, None, None, None
    t = 0
    while t < 400 and (accepted is None or t < accepted + 4):
        t0 = time.perf_counter()
        bal.step()
        step_s.append(time.perf_counter() - t0)
        if submitted is None and bal.pipeline.plan_layers:
            submitted, t_sub = t, time.perf_counter()
        if accepted is None and bal.history:
            accepted, t_acc = t, time.perf_counter()
        _serve(layers, w13, w2, pat, rank, t)
        t += 1
    _check_bits(layers, w13, w2, rank)
    # then a policy that fails: every rank raises at the same boundary, nobody hangs
    bal.config = bal.config.replace(policy="online-test-fail")
    bal.policy_delay_s = 0.0
    bal.trigger.planned_loads = None  # forget the plan so the next check triggers
    failed_at, msg = None, ""
    for u in range(t, t + 60):
        try:
            bal.step()
        except RuntimeError as exc:
            failed_at, msg = u, str(exc)
            break
        _serve(layers, w13, w2, pat, rank, u)
    bal.worker.close()
    return {"submitted": submitted, "accepted": accepted, "wait_s": (t_acc or 0) - (t_sub or 0),
            "max_step_s": max(step_s), "slowest": sorted(range(len(step_s)), key=lambda i: -step_s[i])[:3],
            "step_s": step_s, "layers": bal.commits, "failed_at": failed_at, "msg": msg}


def test_slow_policy_never_blocks_the_step_loop():
    delay = 1.5
    res = run_distributed(_slow_worker, 2, delay, timeout_s=120)
    for r in res:
        assert r["submitted"] is not None and r["accepted"] is not None
        assert r["wait_s"] >= delay  # the plan took the policy's time ...
        assert r["accepted"] - r["submitted"] >= 5  # ... while the loop kept serving steps
        assert r["max_step_s"] < delay / 3, (r["slowest"], [r["step_s"][i] for i in r["slowest"]], r["submitted"])
        assert r["layers"]  # the plan was then migrated
    assert res[0]["accepted"] == res[1]["accepted"]  # accepted at the same step on every rank
    assert res[0]["failed_at"] == res[1]["failed_at"] is not None
    assert "the placement policy failed on" in res[0]["msg"] and "deliberate policy failure" in res[0]["msg"]
