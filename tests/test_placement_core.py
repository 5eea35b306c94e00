import numpy as np
import pytest
import torch

import eplb
from eplb import Placement, PlacementError, rebalance_experts

README_W = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_P = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_deepseek_readme_example_exact():
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor(README_W), 16, 4, 2, 8)
    assert phy2log.tolist() == README_P
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert log2phy.shape == (2, 12, int(logcnt.max()))
    # log2phy lists exactly the slots of each expert, padded with -1
    for layer in range(2):
        for e in range(12):
            slots = sorted(s for s in log2phy[layer, e].tolist() if s >= 0)
            assert slots == [s for s in range(16) if README_P[layer][s] == e]
            assert len(slots) == logcnt[layer, e]


def test_rebalance_numpy_in_numpy_out():
    p, _, _ = rebalance_experts(np.array(README_W), 16, 4, 2, 8)
    assert isinstance(p, np.ndarray) and p.tolist() == README_P


def test_global_policy_when_groups_not_divisible_by_nodes():
    p, _, c = rebalance_experts(np.array(README_W, dtype=float), 16, 3, 2, 8)
    pl = Placement(p, 12, 8, 2)
    assert c.sum(1).tolist() == [16, 16]
    assert np.array_equal(pl.logcnt, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_replicas=18, num_groups=4, num_nodes=2, num_gpus=8), "not divisible by num_gpus"),
        (dict(num_replicas=8, num_groups=4, num_nodes=2, num_gpus=8), "cannot serve 12 logical experts"),
        (dict(num_replicas=16, num_groups=5, num_nodes=1, num_gpus=8), "num_groups"),
        (dict(num_replicas=16, num_groups=4, num_nodes=3, num_gpus=8), "num_gpus"),
    ],
)
def test_rebalance_bad_layout(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(np.array(README_W), **kwargs)


@pytest.mark.parametrize("bad, match", [([[1.0, float("nan")]], "NaN"), ([[1.0, -2.0]], "negative"), ([1.0, 2.0], "layers, experts")])
def test_rebalance_bad_weight(bad, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(np.array(bad), 2, 1, 1, 1)


def test_placement_forms_roundtrip():
    pl = Placement(README_P, 12, 8, 2)
    assert pl.slots_per_rank == 2 and pl.ranks_per_node == 4
    back = Placement.from_log2phy(pl.log2phy, 8, 2)
    assert back == pl
    assert Placement.from_dict(pl.to_dict()) == pl
    assert pl.logcnt.sum(1).tolist() == [16, 16]


def test_placement_validation_messages():
    with pytest.raises(PlacementError, match="layer 0: expert 3 has no slot"):
        Placement([[0, 1, 2, 2]], 4, 2)
    with pytest.raises(PlacementError, match="not divisible by num_ranks=3"):
        Placement([[0, 1, 2, 3]], 4, 3)
    with pytest.raises(PlacementError, match="slot 1 holds expert 7"):
        Placement([[0, 7, 2, 3]], 4, 2)


def test_diff_and_moves():
    a = Placement([[0, 1, 2, 3]], 4, 2)
    b = Placement([[1, 0, 2, 3]], 4, 2)  # swap within rank 0: no transfer needed
    c = Placement([[2, 1, 0, 3]], 4, 2)  # 0 and 2 swap across ranks: two transfers
    assert a.diff(b).sum() == 2 and a.moves(b).tolist() == [0]
    assert a.moves(c).tolist() == [2]


def test_plan_returns_valid_placement():
    pl = eplb.plan(np.array(README_W), 16, 8, num_nodes=2, num_groups=4, policy="deepseek")
    assert pl.phy2log.tolist() == README_P and pl.meta["policy"] == "deepseek"


def test_placement_does_not_freeze_callers_array():
    row = np.array([[0, 1, 2, 3]], dtype=np.int64)
    pl = Placement(row, 4, 2)
    row[0, 0] = 1  # the caller's array stays writable and the placement keeps its own copy
    assert pl.phy2log[0, 0] == 0
    assert not pl.phy2log.flags.writeable


def test_deepseek_static_reproduces_issue_table_on_real_trace():
    """DeepSeek placement + static dispatch on the real Llama-4 trace (plan on steps 0-63, evaluate 64-127).

    The figures are those measured with DeepSeek's own eplb.py (issue 7's table); they depend on its
    tie order (torch's sort), which this implementation follows.
    """
    from eplb.datasets import load_builtin
    from eplb.metrics import imbalance_ratio, rank_loads

    counts = load_builtin("llama4_maverick_mmlu_decode").counts
    got = {}
    for ranks, slots in ((8, 136), (16, 144), (16, 160), (32, 192)):
        pl = eplb.plan(counts[:64], slots, ranks, policy="deepseek")
        got[(ranks, slots)] = round(float(imbalance_ratio(rank_loads(counts[64:], pl)).mean()), 3)
    assert got == {(8, 136): 0.368, (16, 144): 0.561, (16, 160): 0.506, (32, 192): 0.750}


def test_for_layers_is_the_one_layer_matching_rule():
    rows = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]])
    keyed = Placement(rows, 4, 2, layer_ids=(3, 5, 7))
    assert keyed.for_layers([7, 3]).phy2log.tolist() == [rows[2].tolist(), rows[0].tolist()]
    assert keyed.for_layers([3, 5, 7]) is keyed
    with pytest.raises(PlacementError, match=r"no row for model layer\(s\) \[4\]"):
        keyed.for_layers([3, 4], of="model")
    # default ids: rows keyed by model layer index when all are there, else positions when the counts agree
    pos = Placement(rows, 4, 2)
    assert pos.for_layers([3, 5, 7]).layer_ids == (3, 5, 7)
    assert pos.for_layers([1, 2]).phy2log.tolist() == rows[1:].tolist()  # e.g. an SGLang map of every layer
    with pytest.raises(PlacementError, match="3 MoE layers, but 2 layer ids given"):
        pos.for_layers([1, 2], positional=True)  # rows are MoE-layer positions: never a silent subset
    with pytest.raises(PlacementError, match="3 MoE layers, but 2 layer ids given"):
        keyed.for_layers([1, 2], positional=True, what="f.json")
    # the asker is positional (a trace without model layer ids)
    assert keyed.for_layers([0, 1, 2], wanted_positional=True).phy2log.tolist() == rows.tolist()
