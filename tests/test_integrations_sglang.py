"""eplb behind SGLang's ``rebalance_experts`` shape, and ``--init-expert-location`` files (no SGLang needed)."""

from __future__ import annotations

import enum
import json

import numpy as np
import pytest
import torch

import eplb
from eplb import Placement
from eplb.integrations._core import EngineLayoutError
from eplb.integrations.sglang import algorithm_to_planner, rebalance_experts, write_init_expert_location

README_W = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_P2L = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


class EplbAlgorithm(enum.Enum):  # the names of SGLang's enum (its values are auto())
    deepseek = enum.auto()
    deepseek_hierarchical = enum.auto()
    deepseek_vec = enum.auto()
    deepseek_vec_hierarchical = enum.auto()
    elasticity_aware = enum.auto()


def check_triple(out, L, S, E):
    phy2log, log2phy, logcnt = out
    for t in out:
        assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == "cpu"
    assert phy2log.shape == (L, S) and logcnt.shape == (L, E) and log2phy.shape[:2] == (L, E)
    assert log2phy.shape[2] == int(logcnt.max())
    assert torch.all(logcnt >= 1) and torch.all(logcnt.sum(1) == S)
    for layer in range(L):
        for e in range(E):
            slots = [s for s in log2phy[layer, e].tolist() if s >= 0]
            assert len(slots) == logcnt[layer, e]
            assert all(phy2log[layer, s] == e for s in slots)
            assert all(v == -1 for v in log2phy[layer, e, len(slots):].tolist())  # padding at the end


def test_deepseek_hierarchical_reproduces_deepseek_exactly():
    steps = torch.tensor(README_W)[None].repeat(3, 1, 1)  # [steps, layers, E]; summed like SGLang
    out = rebalance_experts(steps, 16, 2, 4, 2, EplbAlgorithm.deepseek_hierarchical)
    check_triple(out, 2, 16, 12)
    assert out[0].tolist() == README_P2L
    ref = eplb.rebalance_experts(np.array(README_W) * 3, 16, 4, 2, 8)
    for got, want in zip(out, ref, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(ValueError, match="vectorised variant"):  # SGLang's own algorithm: refused, not faked
        rebalance_experts(steps, 16, 2, 4, 2, "deepseek_vec_hierarchical")


def test_deepseek_global_is_the_global_policy():
    w = torch.tensor(README_W)
    out = rebalance_experts(w, 16, 2, 4, 2, EplbAlgorithm.deepseek)
    ref = eplb.rebalance_experts(np.array(README_W), 16, 1, 1, 8)
    np.testing.assert_array_equal(out[0].numpy(), ref[0])
    assert out[0].tolist() != README_P2L
    with pytest.raises(EngineLayoutError, match="hierarchical"):
        rebalance_experts(w, 16, 2, None, 2, EplbAlgorithm.deepseek_hierarchical)


@pytest.mark.parametrize("algorithm", ["auto", "eplb", None, "eplb-robust", "deepseek-global"])
def test_eplb_planner_in_sglang_shape(algorithm):
    rng = np.random.default_rng(5)
    tpe = torch.from_numpy(rng.poisson(rng.gamma(0.5, 40.0, (1, 4, 32)), (6, 4, 32)))
    out = rebalance_experts(tpe, 40, 5, None, 1, algorithm)
    check_triple(out, 4, 40, 32)
    # the result is the planner's placement on these loads (steps kept for robust policies)
    planner = algorithm_to_planner(algorithm)
    want = eplb.plan(tpe.numpy(), 40, 8, policy=planner).phy2log
    np.testing.assert_array_equal(out[0].numpy(), want)


def test_two_dimensional_input_and_current_map():
    rng = np.random.default_rng(8)
    w = rng.integers(0, 900, (3, 16))
    first = rebalance_experts(w, 24, 6, 4, 2, "auto")
    check_triple(first, 3, 24, 16)
    again = rebalance_experts(w, 24, 6, 4, 2, "auto", current_physical_to_logical_map=first[0])
    assert torch.equal(again[0], first[0])  # unchanged loads: nothing moves


def test_algorithm_names_and_bad_input():
    assert algorithm_to_planner(EplbAlgorithm.deepseek) == "deepseek-global"
    for vec in ("deepseek_vec", EplbAlgorithm.deepseek_vec_hierarchical):
        with pytest.raises(ValueError, match=r"supported SGLang names: auto, deepseek, deepseek_hierarchical, "
                                             r"elasticity_aware"):
            algorithm_to_planner(vec)
    assert algorithm_to_planner("auto") == algorithm_to_planner(None) == "eplb"
    assert algorithm_to_planner(EplbAlgorithm.elasticity_aware) == "eplb"
    with pytest.raises(ValueError, match="algorithm"):
        algorithm_to_planner(3)
    w = torch.ones(2, 8)
    with pytest.raises(EngineLayoutError, match="num_local_physical_experts"):
        rebalance_experts(w, 12, 5, None, 1)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        rebalance_experts(torch.ones(8), 8, 4, None, 1)
    with pytest.raises(ValueError, match="negative"):
        rebalance_experts(-w, 8, 4, None, 1)


def test_write_init_expert_location_json_and_pt(tmp_path):
    p = eplb.plan(np.array(README_W), 16, 8, num_nodes=2, num_groups=4, policy="deepseek", layer_ids=(1, 3))
    out = write_init_expert_location(p, tmp_path / "init.json", num_layers=5)
    obj = json.loads(out.read_text())
    assert list(obj) == ["physical_to_logical_map"]  # SGLang passes the dict as keyword arguments
    rows = np.array(obj["physical_to_logical_map"])
    assert rows.shape == (5, 16)
    np.testing.assert_array_equal(rows[[1, 3]], p.phy2log)
    np.testing.assert_array_equal(rows[[0, 2, 4]], np.tile(np.arange(16) % 12, (3, 1)))  # dense layers: trivial
    pt = write_init_expert_location(p.with_meta(), tmp_path / "init.pt")
    loaded = torch.load(pt, weights_only=True)
    assert list(loaded) == ["physical_to_logical_map"]
    assert loaded["physical_to_logical_map"].shape == (4, 16)
    np.testing.assert_array_equal(loaded["physical_to_logical_map"][[1, 3]].numpy(), p.phy2log)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp files left
    with pytest.raises(ValueError, match="num_layers"):
        write_init_expert_location(p, tmp_path / "bad.json", num_layers=3)
    assert not (tmp_path / "bad.json").exists()


def test_sglang_map_round_trip_through_placement():
    out = rebalance_experts(torch.tensor(README_W), 16, 2, 4, 2, "auto")
    pl = Placement(out[0].numpy().copy(), 12, 8)
    np.testing.assert_array_equal(pl.log2phy, out[1].numpy())
    np.testing.assert_array_equal(pl.logcnt, out[2].numpy())


def test_elasticity_aware_plans_over_the_active_ranks():
    """SGLang's elasticity_aware contract: only active ranks' slots serve tokens (int64 outputs)."""
    rng = np.random.default_rng(3)
    tpe = torch.from_numpy(rng.integers(0, 500, (2, 3, 8)))
    alive = torch.tensor([True, True, False, True])
    p2l, l2p, cnt = rebalance_experts(tpe, 16, 4, None, 1, EplbAlgorithm.elasticity_aware, active_ranks=alive)
    assert p2l.dtype == l2p.dtype == cnt.dtype == torch.int64
    assert p2l.shape == (3, 16) and cnt.sum(-1).tolist() == [12, 12, 12]  # 3 active ranks x 4 slots
    dead_slots = set(range(8, 12))
    for layer in range(3):
        for e in range(8):
            slots = [int(s) for s in l2p[layer, e] if s >= 0]
            assert len(slots) == cnt[layer, e] >= 1 and not dead_slots & set(slots)
            assert all(int(p2l[layer, s]) == e for s in slots)
    # the active ranks' part is eplb's plan with the dead rank excluded
    want = eplb.plan(tpe.numpy(), 16, 4, policy="eplb", excluded_ranks=[2]).phy2log
    np.testing.assert_array_equal(p2l.numpy(), want)
    # all ranks active: the ordinary plan
    full = rebalance_experts(tpe, 16, 4, None, 1, "elasticity_aware")
    np.testing.assert_array_equal(full[0].numpy(), eplb.plan(tpe.numpy(), 16, 4, policy="eplb").phy2log)
