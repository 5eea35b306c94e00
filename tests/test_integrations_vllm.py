"""eplb as a vLLM EPLB policy: signature, semantics, migration-awareness, plug-in registration.

Runs without vLLM. The invariants of vLLM's own tests/distributed/test_eplb_algo.py are reproduced
on vLLM-style inputs. Tests marked ``vllm`` need vLLM importable and are skipped otherwise; the
plug-in mechanics are also checked against a stand-in ``vllm.distributed.eplb.policy`` module.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import itertools
import logging
import sys
import types
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement
from eplb.integrations import _core
from eplb.integrations import vllm as ev
from eplb.integrations.vllm import EngineLayoutError, EplbPolicy, make_policy
from eplb.stats.trace import Trace

README_W = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_P2L = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def logical_maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's compute_logical_maps semantics (slots ascending, -1 slots skipped), written for the test."""
    p = phy2log.numpy()
    L, _ = p.shape
    cnt = np.zeros((L, num_experts), dtype=np.int64)
    for layer in range(L):
        for e in p[layer]:
            if e >= 0:
                cnt[layer, e] += 1
    width = max(1, int(cnt.max()))
    l2p = np.full((L, num_experts, width), -1, dtype=np.int64)
    fill = np.zeros((L, num_experts), dtype=np.int64)
    for layer in range(L):
        for s, e in enumerate(p[layer]):
            if e >= 0:
                l2p[layer, e, fill[layer, e]] = s
                fill[layer, e] += 1
    return torch.from_numpy(l2p), torch.from_numpy(cnt)


def check_map(phy2log: torch.Tensor, num_layers: int, num_replicas: int, num_experts: int) -> torch.Tensor:
    assert isinstance(phy2log, torch.Tensor)
    assert phy2log.shape == (num_layers, num_replicas)
    assert phy2log.dtype == torch.int64
    assert phy2log.device.type == "cpu"
    assert torch.all(phy2log >= 0) and torch.all(phy2log < num_experts)
    _, logcnt = logical_maps(phy2log, num_experts)
    assert torch.all(logcnt >= 1), "every logical expert must have a slot in every layer"
    assert torch.all(logcnt.sum(1) == num_replicas)
    return logcnt


# ------------------------------------------------------------------------------ signature


def test_signature_matches_vllm_abstract_policy():
    sig = inspect.signature(EplbPolicy.rebalance_experts)
    assert list(sig.parameters) == ["weight", "num_replicas", "num_groups", "num_nodes", "num_ranks",
                                    "old_global_expert_indices"]
    assert sig.parameters["old_global_expert_indices"].default is None
    assert isinstance(inspect.getattr_static(EplbPolicy, "rebalance_experts"), classmethod)


# ------------------------------------------------- vLLM's test_eplb_algo.py invariants, our policy


def test_deepseek_planner_reproduces_vllm_basic_rebalance_exactly():
    pol = make_policy("deepseek")
    w = torch.tensor(README_W)
    p = pol.rebalance_experts(w, 16, 4, 2, 8)
    assert torch.equal(p, torch.tensor(README_P2L))
    _, logcnt = logical_maps(p, 12)
    assert torch.equal(logcnt, torch.tensor([[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]))


def max_rank_load(phy2log: np.ndarray, w: np.ndarray, ranks: int) -> float:
    """Max over ranks of the load with each expert's tokens split evenly over its replicas (one layer)."""
    cnt = np.bincount(phy2log[0], minlength=w.shape[1])
    per_slot = w[0][phy2log[0]] / cnt[phy2log[0]]
    return float(per_slot.reshape(ranks, -1).sum(-1).max())


@pytest.mark.parametrize("planner", [None, "deepseek"])
def test_vllm_algo_invariants(planner):
    pol = make_policy(planner)
    # basic rebalance: shapes, ranges, counts
    check_map(pol.rebalance_experts(torch.tensor(README_W), 16, 4, 2, 8), 2, 16, 12)
    # single GPU
    p = pol.rebalance_experts(torch.tensor([[10, 20, 30, 40]]), 4, 1, 1, 1)
    check_map(p, 1, 4, 4)
    assert set(p[0].tolist()) == {0, 1, 2, 3}
    # equal weights, no redundancy: one replica each
    c = check_map(pol.rebalance_experts(torch.tensor([[50] * 8]), 8, 2, 2, 4), 1, 8, 8)
    assert torch.all(c == 1)
    # extreme imbalance: the hot expert gets more replicas
    hot = torch.tensor([[1000, 1, 1, 1, 1, 1, 1, 1]])
    p = pol.rebalance_experts(hot, 12, 2, 2, 4)
    c = check_map(p, 1, 12, 8)
    # 2 groups on 2 nodes: group-limited, so the hot expert's node has 2 spare slots: >= 2 replicas, and
    # the max rank load is no worse than vLLM's default (DeepSeek hierarchical) gives
    assert c[0, 0] >= 2 and c[0, 0] >= c[0, 1]
    ref, _, _ = eplb.rebalance_experts(hot.numpy(), 12, 2, 2, 4)
    assert max_rank_load(p.numpy(), hot.numpy(), 4) <= max_rank_load(ref, hot.numpy(), 4) + 1e-9
    # multiple layers
    w = torch.tensor([[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10], [25] * 6])
    check_map(pol.rebalance_experts(w, 8, 2, 2, 4), 3, 8, 6)
    # groups not divisible by nodes / experts: falls back to the global policy without error
    check_map(pol.rebalance_experts(torch.tensor([[10, 20, 30, 40]]), 8, 3, 2, 4), 1, 8, 4)
    check_map(pol.rebalance_experts(torch.tensor([[10, 20, 30, 40, 50, 60]]), 8, 3, 2, 4), 1, 8, 6)
    # small hierarchical: the heaviest expert is replicated
    w = torch.tensor([[100, 50, 200, 75, 150, 25, 300, 80]])
    c = check_map(pol.rebalance_experts(w, 12, 4, 2, 4), 1, 12, 8)
    assert c[0, int(torch.argmax(w[0]))] >= 2
    # additional cases
    w1 = torch.tensor([[50, 100, 75, 120, 90, 60, 80, 110, 40, 70, 95, 85, 65, 55, 45, 35]])
    check_map(pol.rebalance_experts(w1, 24, 8, 4, 8), 1, 24, 16)
    w2 = torch.tensor([[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]])
    c = check_map(pol.rebalance_experts(w2, 10, 3, 1, 2), 2, 10, 6)
    for layer in range(2):
        assert c[layer, int(torch.argmax(w2[layer]))] >= 2


def test_num_groups_zero_and_window_input():
    w = torch.tensor([[5, 1, 1, 1, 9, 2]])
    check_map(EplbPolicy.rebalance_experts(w, 8, 0, 1, 2), 1, 8, 6)  # vLLM may pass 0 groups
    win = torch.stack([w, 2 * w, w])  # [window, layers, E] is accepted (summed / robust)
    check_map(EplbPolicy.rebalance_experts(win, 8, 1, 1, 2), 1, 8, 6)


def test_bad_layout_raises_value_and_assertion_error():
    w = torch.tensor([[10, 20, 30, 40]])
    with pytest.raises(AssertionError):  # what vLLM's test expects of its policy
        EplbPolicy.rebalance_experts(w, 7, 2, 2, 4)
    with pytest.raises(ValueError, match="num_replicas: 7 slots are not divisible by num_ranks=4"):
        EplbPolicy.rebalance_experts(w, 7, 2, 2, 4)
    with pytest.raises(EngineLayoutError, match="cannot serve 4 logical experts"):
        EplbPolicy.rebalance_experts(w, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="negative"):
        EplbPolicy.rebalance_experts(torch.tensor([[1, -2, 3, 4]]), 4, 1, 1, 2)
    with pytest.raises(ValueError, match="NaN"):
        EplbPolicy.rebalance_experts(torch.tensor([[1.0, float("nan"), 3, 4]]), 4, 1, 1, 2)
    with pytest.raises(ValueError, match="old_global_expert_indices: 2 layers"):
        EplbPolicy.rebalance_experts(w, 4, 1, 1, 2, torch.zeros((2, 4), dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_weight_gives_cpu_map():
    p = EplbPolicy.rebalance_experts(torch.tensor([[10, 20, 30, 40]], device="cuda"), 6, 2, 1, 2)
    check_map(p, 1, 6, 4)


# -------------------------------------------------------------------------- migration-awareness


def moves(old: torch.Tensor, new: torch.Tensor, num_ranks: int, num_experts: int) -> int:
    a = Placement(old.numpy().copy(), num_experts, num_ranks)
    b = Placement(new.numpy().copy(), num_experts, num_ranks)
    return int(a.moves(b).sum())


layouts = st.sampled_from([(8, 8, 2, 1, 1), (8, 12, 4, 2, 2), (16, 24, 4, 4, 2), (12, 16, 4, 1, 1), (6, 9, 3, 3, 1)])


@settings(max_examples=30, deadline=None)
@given(layout=layouts, seed=st.integers(0, 2**31 - 1), planner=st.sampled_from([None, "deepseek"]))
def test_unchanged_loads_nothing_moves(layout, seed, planner):
    E, S, R, G, N = layout
    rng = np.random.default_rng(seed)
    L = 3
    w = torch.from_numpy(rng.integers(0, 1000, (L, E)))
    pol = make_policy(planner)
    first = pol.rebalance_experts(w, S, G, N, R)
    check_map(first, L, S, E)
    again = pol.rebalance_experts(w, S, G, N, R, first.clone())
    assert torch.equal(again, first)
    # the same placement with its ranks relabelled (within nodes) and slots shuffled in each rank:
    # balance is identical, so the engine's current map is kept exactly. For the DeepSeek planner
    # this holds without the min-gain rule too (relabelling and slot restoration alone); eplb's
    # planner, handed the current map, may search past the fresh plan, which the rule keeps in check.
    rpn = R // N
    perm = np.concatenate([n * rpn + rng.permutation(rpn) for n in rng.permutation(N)])
    blocks = first.numpy().reshape(L, R, S // R)[:, perm]
    blocks = np.stack([np.stack([b[rng.permutation(S // R)] for b in lay]) for lay in blocks])
    shuffled = torch.from_numpy(blocks.reshape(L, S).copy())
    if planner == "deepseek":
        assert torch.equal(make_policy(planner, None).rebalance_experts(w, S, G, N, R, shuffled), shuffled)
    assert torch.equal(pol.rebalance_experts(w, S, G, N, R, shuffled), shuffled)


def _package_policies() -> list[str]:
    """Every policy eplb itself registers (not the ones other test modules register for their own tests)."""
    return sorted(n for n, fn in eplb.policies.load_policy_plugins().items() if fn.__module__.startswith("eplb."))


@pytest.mark.parametrize("planner", _package_policies())
def test_every_registered_policy_as_vllm_planner(planner):
    """Policies that refuse current= (robust) or need it (incremental, with an incomplete map) still work."""
    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.integers(0, 300, (3, 16)))
    pol = make_policy(planner)
    first = pol.rebalance_experts(w, 24, 4, 2, 4)
    check_map(first, 3, 24, 16)
    assert torch.equal(pol.rebalance_experts(w, 24, 4, 2, 4, first.clone()), first)
    holes = first.clone()
    holes[:, 18:] = -1  # an incomplete current map: never handed to the planner as the placement
    check_map(pol.rebalance_experts(w, 24, 4, 2, 4, holes), 3, 24, 16)


def test_min_gain_keeps_current_map_unless_it_is_worse():
    w = torch.tensor([[100, 100, 100, 100, 100, 100, 100, 100]])
    contiguous = torch.arange(8).reshape(1, 8)
    # perfectly balanced already: kept although a fresh plan could lay it out differently
    assert torch.equal(EplbPolicy.rebalance_experts(w, 8, 1, 1, 4, contiguous), contiguous)
    hot = torch.tensor([[800, 1, 1, 1, 1, 1, 1, 1]])
    cur = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])  # expert 0 has 2 of 12 slots
    new = EplbPolicy.rebalance_experts(hot, 12, 1, 1, 4, cur)
    _, c = logical_maps(new, 8)
    assert c[0, 0] >= 4  # the current map is much worse: re-planned


def test_rank_alignment_is_optimal_by_brute_force():
    rng = np.random.default_rng(7)
    E, S, R = 8, 12, 4
    for _ in range(20):
        new = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, S - E)])) for _ in range(2)])
        old = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, S - E)])) for _ in range(2)])
        have = _core._counts_per_rank(old, R, E)
        got = _core.align_ranks(new, have, R, 1)
        for layer in range(2):
            nb = new[layer].reshape(R, S // R)
            # result is a rank permutation of the new plan
            assert sorted(map(tuple, np.sort(got[layer].reshape(R, -1), 1))) == sorted(map(tuple, np.sort(nb, 1)))

            def overlap(blocks, layer=layer, have=have):
                cnt = _core._counts_per_rank(blocks.reshape(1, S), R, E)[0]
                return int(np.minimum(cnt, have[layer]).sum())

            best = max(overlap(nb[list(p)]) for p in itertools.permutations(range(R)))
            assert overlap(got[layer]) == best


def test_alignment_respects_nodes():
    # 2 nodes x 2 ranks; old node 0 holds experts 4..7 -> the new node holding 4..7 becomes node 0
    old = np.array([[4, 5, 6, 7, 0, 1, 2, 3]])
    new = np.array([[0, 1, 2, 3, 5, 4, 7, 6]])
    have = _core._counts_per_rank(old, 4, 8)
    got = _core.align_ranks(new, have, 4, 2)
    assert got.tolist() == [[5, 4, 7, 6, 0, 1, 2, 3]]


@pytest.mark.parametrize(
    "num_ranks, old, new",
    [  # the cases of vLLM's test_preserve_intragpu_slots
        (2, [0, 1, 2, 3, 4, 5, 6, 7], [1, 5, 0, 4, 6, 2, 7, 3]),
        (2, [0, 1, 0, 2, 3, 4, 5, 6, 1, 2], [0, 5, 4, 0, 1, 6, 2, 3, 2, 1]),
        (3, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0]),
        (2, [0, -1, 2, -1, 3, 1, -1, 0], [2, 1, 3, 0, 0, 3, 1, 2]),  # -1 = empty slots
    ],
)
def test_preserve_slots_like_vllm(num_ranks, old, new):
    o, n = np.array([old]), np.array([new])
    E = int(n.max()) + 1
    post = _core.preserve_slots(n, o, num_ranks, E)
    spr = n.shape[1] // num_ranks
    for r in range(num_ranks):
        seg = slice(r * spr, (r + 1) * spr)
        assert sorted(post[0, seg].tolist()) == sorted(n[0, seg].tolist())  # nothing lost per rank
        old_l, new_l, post_l = o[0, seg].tolist(), n[0, seg].tolist(), post[0, seg].tolist()
        for e in (set(old_l) & set(new_l)) - {-1}:
            assert post_l[old_l.index(e)] == e  # an expert staying on the rank keeps its old slot
        # every old slot whose expert keeps as many copies on the rank stays untouched
        for j, e in enumerate(old_l):
            if e >= 0 and new_l.count(e) >= old_l.count(e):
                assert post_l[j] == e


def test_scale_up_with_empty_slots_and_scale_down():
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.integers(1, 500, (4, 16)))
    two = EplbPolicy.rebalance_experts(w, 16, 1, 1, 2)  # 2 ranks x 8 slots
    old = torch.full((4, 32), -1, dtype=torch.int64)
    old[:, :16] = two  # elastic EP added 2 ranks: their slots are -1
    up = EplbPolicy.rebalance_experts(w, 32, 1, 1, 4, old)
    check_map(up, 4, 32, 16)
    # replicas that stay on the old ranks keep their old slots
    for layer in range(4):
        for r in range(2):
            seg = slice(r * 8, (r + 1) * 8)
            o, n = old[layer, seg].tolist(), up[layer, seg].tolist()
            for e in set(o) & set(n):
                assert n[o.index(e)] == e
    # scale down back to 2 ranks: old map is wider than num_replicas
    down = EplbPolicy.rebalance_experts(w, 16, 1, 1, 2, up)
    check_map(down, 4, 16, 16)
    # the fresh 2-rank plan is preferable to arbitrary moves: at most the moves of planning from scratch
    fresh = make_policy(None, None).rebalance_experts(w, 16, 1, 1, 2)

    def copies_in(new):  # slots of the 2 surviving ranks whose expert was not on that rank before
        old = up.numpy()
        return sum(int(e not in old[layer, (s // 8) * 8:(s // 8 + 1) * 8])
                   for layer in range(4) for s, e in enumerate(new[layer].tolist()))

    assert copies_in(down) <= copies_in(fresh)


@pytest.mark.parametrize("planner", [None, "deepseek"])
def test_changed_loads_move_no_more_than_a_fresh_plan(planner):
    from eplb.metrics import rank_loads

    rng = np.random.default_rng(11)
    E, S, R = 32, 40, 8
    w0 = rng.gamma(0.6, 100.0, (6, E))
    cur = make_policy(planner).rebalance_experts(torch.from_numpy(w0), S, 1, 1, R)
    w1 = torch.from_numpy(w0 * rng.uniform(0.7, 1.3, w0.shape))
    aware = make_policy(planner, None).rebalance_experts(w1, S, 1, 1, R, cur)
    fresh = make_policy(planner, None).rebalance_experts(w1, S, 1, 1, R)
    assert moves(cur, aware, R, E) <= moves(cur, fresh, R, E)
    la = rank_loads(w1.numpy(), Placement(aware.numpy().copy(), E, R))
    lf = rank_loads(w1.numpy(), Placement(fresh.numpy().copy(), E, R))
    if planner == "deepseek":  # not incremental: only rank relabelling, so exactly the fresh balance
        np.testing.assert_allclose(np.sort(la, 1), np.sort(lf, 1))
    else:  # eplb's incremental mode: within its 1% tolerance of the fresh plan's max rank load
        assert np.all(la.max(1) <= lf.max(1) * 1.01 + 1e-9)


# ---------------------------------------------------------------------------- plug-in / register


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in for vllm.distributed.eplb.policy (AbstractEplbPolicy ABC + EPLB_POLICIES)."""

    class AbstractEplbPolicy(abc.ABC):
        @classmethod
        @abc.abstractmethod
        def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks,
                              old_global_expert_indices=None):
            raise NotImplementedError

    class DefaultEplbPolicy(AbstractEplbPolicy):
        @classmethod
        def rebalance_experts(cls, *a, **k):
            raise NotImplementedError

    mods = {}
    for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb", "vllm.distributed.eplb.policy",
                 "vllm.distributed.eplb.policy.abstract"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["vllm.distributed.eplb.policy.abstract"].AbstractEplbPolicy = AbstractEplbPolicy
    pol = mods["vllm.distributed.eplb.policy"]
    pol.AbstractEplbPolicy = AbstractEplbPolicy
    pol.DefaultEplbPolicy = DefaultEplbPolicy
    pol.EPLB_POLICIES = {"default": DefaultEplbPolicy}
    mods["vllm.distributed.eplb"].policy = pol
    monkeypatch.delenv(ev.ENV_RECORD, raising=False)
    monkeypatch.delenv(ev.ENV_MIN_GAIN, raising=False)
    yield pol
    monkeypatch.setattr(ev, "_recorder", None)


def test_entry_point_declared_and_loads():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "eplb"]
    assert len(eps) == 1 and eps[0].value == "eplb.integrations.vllm:register"
    assert eps[0].load() is ev.register


def test_register_is_opt_in(fake_vllm, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="eplb.integrations.vllm")
    monkeypatch.delenv(ev.ENV_POLICY, raising=False)
    assert ev.register() is None
    assert fake_vllm.EPLB_POLICIES["default"] is fake_vllm.DefaultEplbPolicy
    assert any("not set" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    for off in ("", "0", "off", "default"):
        monkeypatch.setenv(ev.ENV_POLICY, off)
        assert ev.register() is None
    monkeypatch.setenv(ev.ENV_POLICY, "no-such-policy")
    assert ev.register() is None
    assert fake_vllm.EPLB_POLICIES["default"] is fake_vllm.DefaultEplbPolicy


def test_register_installs_policy_and_logs(fake_vllm, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="eplb.integrations.vllm")
    monkeypatch.setenv(ev.ENV_POLICY, "eplb")
    cls = ev.register()
    assert cls is not None and fake_vllm.EPLB_POLICIES["default"] is cls
    assert issubclass(cls, ev.EplbPolicy) and cls.planner == _core.resolve_planner(None)
    line = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("vLLM EPLB policy 'default' -> eplb" in m for m in line)
    assert ev.register() is cls  # idempotent: plug-ins load once per process, maybe more
    p = fake_vllm.EPLB_POLICIES["default"].rebalance_experts(torch.tensor(README_W), 16, 4, 2, 8)
    check_map(p, 2, 16, 12)
    monkeypatch.setenv(ev.ENV_POLICY, "deepseek")
    assert ev.register().planner == "deepseek"
    assert torch.equal(fake_vllm.EPLB_POLICIES["default"].rebalance_experts(torch.tensor(README_W), 16, 4, 2, 8),
                       torch.tensor(README_P2L))
    monkeypatch.setenv(ev.ENV_MIN_GAIN, "-1")
    assert ev.register().min_gain is None


def test_register_records_load_windows(fake_vllm, monkeypatch, tmp_path):
    path = tmp_path / "vllm_loads.safetensors"
    monkeypatch.setenv(ev.ENV_POLICY, "eplb")
    monkeypatch.setenv(ev.ENV_RECORD, str(path))
    cls = ev.register()
    w1, w2 = torch.tensor(README_W), torch.tensor(README_W).flip(1)
    cls.rebalance_experts(w1, 16, 4, 2, 8)
    cls.rebalance_experts(w2, 16, 4, 2, 8)
    tr = Trace.load(path)
    assert tr.counts.shape == (2, 2, 12)
    np.testing.assert_array_equal(tr.counts[0], README_W)
    np.testing.assert_array_equal(tr.counts[1], w2.numpy())
    assert "vllm" in tr.source


def test_policy_subclasses_vllm_abstract_when_importable(fake_vllm, monkeypatch):
    mod = importlib.reload(ev)
    try:
        assert mod.VLLM_AVAILABLE
        assert issubclass(mod.EplbPolicy, fake_vllm.AbstractEplbPolicy)
        mod.EplbPolicy()  # implements the abstract method: instantiable
        check_map(mod.EplbPolicy.rebalance_experts(torch.tensor(README_W), 16, 4, 2, 8), 2, 16, 12)
    finally:
        monkeypatch.undo()  # the real modules (or none) back in sys.modules, then rebuild the class
        importlib.reload(ev)


# ----------------------------------------------------------------------- with the real vLLM


def _have_vllm() -> bool:
    try:
        import vllm.distributed.eplb.policy  # noqa: F401
    except Exception:
        return False
    return True


needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not _have_vllm(), reason="vllm not importable")]


@needs_vllm[0]
@needs_vllm[1]
def test_real_vllm_subclass_and_plugin_loading(monkeypatch):
    from vllm.distributed.eplb import policy as vp
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

    mod = importlib.reload(ev)
    assert issubclass(mod.EplbPolicy, AbstractEplbPolicy)
    saved = dict(vp.EPLB_POLICIES)
    try:
        import vllm.plugins as plugins

        monkeypatch.setenv(mod.ENV_POLICY, "eplb")
        monkeypatch.setattr(plugins, "plugins_loaded", False, raising=False)
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
        plugins.load_general_plugins()
        assert issubclass(vp.EPLB_POLICIES["default"], mod.EplbPolicy)
        p = vp.EPLB_POLICIES["default"].rebalance_experts(torch.tensor(README_W), 16, 4, 2, 8)
        check_map(p, 2, 16, 12)
    finally:
        vp.EPLB_POLICIES.clear()
        vp.EPLB_POLICIES.update(saved)


@needs_vllm[0]
@needs_vllm[1]
def test_real_vllm_default_and_ours_agree_on_deepseek_planner():
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    w = torch.tensor(README_W)
    assert torch.equal(make_policy("deepseek").rebalance_experts(w, 16, 4, 2, 8),
                       DefaultEplbPolicy.rebalance_experts(w, 16, 4, 2, 8))


@needs_vllm[0]
@needs_vllm[1]
def test_real_vllm_logical_maps_accept_our_maps():
    """vLLM's own compute_logical_maps (what EplbState runs on a new map) on our policy's output."""
    from vllm.distributed.eplb.eplb_state import compute_logical_maps

    cases = [(README_W, 16, 4, 2, 8), ([[10, 20, 30, 40]], 4, 1, 1, 1), ([[1000, 1, 1, 1, 1, 1, 1, 1]], 12, 2, 2, 4),
             ([[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10], [25] * 6], 8, 2, 2, 4),
             ([[10, 20, 30, 40]], 8, 3, 2, 4), ([[50, 100, 75, 120, 90, 60, 80, 110, 40, 70, 95, 85, 65, 55, 45, 35]],
                                                 24, 8, 4, 8)]
    for w, S, G, N, R in cases:
        wt = torch.tensor(w)
        p = EplbPolicy.rebalance_experts(wt, S, G, N, R)
        log2phy, logcnt = compute_logical_maps(p, wt.shape[-1])
        assert torch.all(logcnt >= 1) and torch.all(logcnt.sum(1) == S)
        ours, cnt = logical_maps(p, wt.shape[-1])
        assert torch.equal(logcnt, cnt) and torch.equal(log2phy[..., : ours.shape[-1]], ours)


def test_same_map_in_separate_processes(tmp_path):
    """vLLM runs the policy on every EP rank: separate processes must compute identical maps."""
    import subprocess

    code = (
        "import sys, numpy as np, torch\n"
        "from eplb.integrations.vllm import EplbPolicy\n"
        "rng = np.random.default_rng(123)\n"
        "w = torch.from_numpy(rng.gamma(0.5, 100.0, (8, 64)))\n"
        "cur = EplbPolicy.rebalance_experts(w, 80, 8, 2, 8)\n"
        "new = EplbPolicy.rebalance_experts(w * torch.from_numpy(rng.uniform(0.5, 1.5, (8, 64))), 80, 8, 2, 8, cur)\n"
        "np.save(sys.argv[1], np.stack([cur.numpy(), new.numpy()]))\n"
    )
    outs = [tmp_path / f"rank{r}.npy" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(o)]) for o in outs]
    for p in procs:
        assert p.wait(timeout=120) == 0
    a, b = (np.load(o) for o in outs)
    assert np.array_equal(a, b)
