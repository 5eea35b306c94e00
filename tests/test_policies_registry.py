"""The lazy policy registry: every entry point sees every policy, capabilities decide (not error text)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import eplb
from eplb import Placement
from eplb.errors import InputError
from eplb.policies import POLICIES, check_serves, policy_info, register_policy


def _loads(L=2, E=8, T=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 100, size=(T, L, E)).astype(np.float64)


def test_registry_lists_every_policy_without_importing_torch():
    code = ("import sys; from eplb.policies import POLICIES, policy_info; "
            "print('eplb-dispatch' in POLICIES, policy_info('eplb').migration, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "optional", "False"]
    assert {"deepseek", "eplb", "eplb-incremental", "eplb-robust", "eplb-dispatch"} <= set(POLICIES)


def test_capabilities_are_declared():
    assert policy_info("eplb-incremental").migration == "required"
    assert not policy_info("deepseek").migration_aware and policy_info("eplb").migration_aware
    assert policy_info("eplb-robust").per_step and policy_info("eplb-dispatch").per_step
    assert policy_info("deepseek-hierarchical").hierarchical and not policy_info("deepseek-global").hierarchical


def test_plan_says_why_a_policy_cannot_serve():
    w = _loads()
    cur = eplb.plan(w, 12, 4, policy="deepseek")
    with pytest.raises(InputError, match="current: policy 'deepseek' is not migration-aware"):
        eplb.plan(w, 12, 4, policy="deepseek", current=cur)
    with pytest.raises(InputError, match="current: policy 'eplb-incremental' needs current="):
        eplb.plan(w, 12, 4, policy="eplb-incremental")
    with pytest.raises(InputError, match="excluded_ranks: policy 'deepseek' cannot exclude ranks"):
        eplb.plan(w, 12, 4, policy="deepseek", excluded_ranks=[1])
    with pytest.raises(InputError, match="unknown policy 'nope'"):
        check_serves("nope")


def test_every_entry_point_accepts_eplb_dispatch_and_robust():
    from eplb.integrations._core import plan_for_engine, resolve_planner
    from eplb.online import BalancerConfig
    from eplb.policies.eplb_policy import best_placement_for
    from eplb.sim import replay_online, simulate

    w = _loads()
    assert resolve_planner("eplb-dispatch") == "eplb-dispatch"
    best = best_placement_for(w, 12, 4, policies=("eplb-dispatch", "eplb"))
    assert best.num_slots == 12
    old = eplb.plan(w, 12, 4, policy="deepseek").phy2log
    for pol in ("eplb-robust", "eplb-dispatch", "eplb-incremental", "deepseek"):
        new = plan_for_engine(w, 12, 4, old=old, planner=pol)  # current= only where the policy takes it
        assert Placement(new, 8, 4).logcnt.min() >= 1
    rep = simulate(w, ep_size=4, num_slots=12, policies=["eplb-dispatch", "eplb-robust"])
    assert rep.labels == ["eplb-dispatch", "eplb-robust"]
    # the online balancer with a policy that is not migration-aware (it used to be handed current=)
    cfg = BalancerConfig(num_slots=12, warmup_steps=0, check_every_steps=2, policy="eplb-robust",
                         policy_backend="inline")
    sim = replay_online(np.repeat(w, 3, axis=0), Placement.contiguous(2, 8, 4, 12), cfg)
    assert sim.events and sim.events[0]["layers"] == [0, 1]
    with pytest.raises(ValueError, match="BalancerConfig.policy: policy: unknown policy 'nope'"):
        replay_online(w, Placement.contiguous(2, 8, 4, 12), cfg.replace(policy="nope"))


def test_register_policy_with_capabilities():
    @register_policy("test-registry-copy", migration="optional")
    def _copy(loads, *, num_slots, num_ranks, num_nodes, num_groups, current=None, **kw):  # noqa: ANN001
        base = eplb.plan(loads, num_slots, num_ranks, policy="deepseek").phy2log
        return base if current is None else current.phy2log

    w = _loads()
    cur = eplb.plan(w, 12, 4, policy="eplb")
    assert np.array_equal(eplb.plan(w, 12, 4, policy="test-registry-copy", current=cur).phy2log, cur.phy2log)
    assert policy_info("test-registry-copy").migration_aware
    with pytest.raises(InputError, match="migration: expected one of"):
        register_policy("bad", migration="sometimes")
