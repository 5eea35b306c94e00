"""Excluded (drained / failing) ranks in dispatch: no tokens for experts served elsewhere, soft otherwise."""

import numpy as np
import torch

from eplb import Placement
from eplb.dispatch import DispatchTable, assign_slots, split_counts
from eplb.dispatch.table import served_replicas


def _placement(excluded=()):
    # 3 ranks x 2 slots; expert 0 on ranks 0 and 2, expert 3 only on rank 2 (not yet migrated)
    return Placement([[0, 1, 2, 1, 0, 3]], 4, 3, meta={"excluded_ranks": list(excluded)})


def test_served_replicas_drops_excluded_slots_only_where_served_elsewhere():
    log2phy, cnt = served_replicas(_placement([2]))
    assert cnt.tolist() == [[1, 2, 1, 1]]
    assert log2phy[0, 0].tolist()[:1] == [0] and log2phy[0, 3].tolist()[:1] == [5]  # expert 3 keeps rank 2
    full, full_cnt = served_replicas(_placement())
    assert full_cnt.tolist() == [[2, 2, 1, 1]] and full[0, 0].tolist() == [0, 4]


def test_no_token_reaches_an_excluded_replica_for_any_strategy():
    pl = _placement([2])
    table = DispatchTable.from_placement(pl, 0)
    ids = torch.tensor([[0], [0], [0], [1], [3], [0]])
    gc = torch.tensor([[4, 1, 0, 1], [4, 1, 0, 1], [4, 1, 0, 1]])
    for strategy in ("local-first", "round-robin", "balanced"):
        for rank in range(3):
            slots = assign_slots(ids, table, strategy, rank=rank, global_counts=gc)
            got = slots.view(-1).tolist()
            assert 4 not in got, (strategy, rank, got)  # slot 4 = expert 0's replica on the drained rank 2
            assert got[4] == 5  # expert 3 is still served by rank 2, its only holder


def test_split_counts_gives_excluded_replicas_no_load():
    pl = _placement([2])
    counts = np.array([[8.0, 2.0, 2.0, 0.0]])
    for strategy in ("uniform", "balanced"):
        s = split_counts(counts, pl, strategy)
        assert s[0, 4] == 0 and s.sum() == counts.sum(), strategy
