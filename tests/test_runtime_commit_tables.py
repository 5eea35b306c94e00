"""The dispatch table is built at commit / exclusion time, off the forward (single process)."""

from __future__ import annotations

import numpy as np
import torch

import eplb.runtime.layer as layer_mod
from eplb import Placement
from eplb.runtime.layer import ExpertParallelMoE, reference_moe


def test_commit_builds_the_table_so_the_forward_does_not(monkeypatch):
    E, H, INTER = 4, 8, 4
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * INTER, H, generator=g), torch.randn(E, H, INTER, generator=g)
    pl = Placement(np.array([[0, 1, 2, 3, 0, 1]]), E, 1)
    layer = ExpertParallelMoE.from_full_weights(w13, w2, pl, 0)
    hidden = torch.randn(5, H, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 0]])
    wts = torch.rand(5, 2, generator=g)
    layer(hidden, ids, wts)
    new_row = np.array([0, 1, 2, 3, 2, 3])
    layer.commit(new_row, {"w13": w13[new_row], "w2": w2[new_row]})
    built = []
    real = layer_mod.DispatchTable.from_placement
    monkeypatch.setattr(layer_mod.DispatchTable, "from_placement",
                        staticmethod(lambda *a, **k: built.append(1) or real(*a, **k)))
    out = layer(hidden, ids, wts)
    torch.testing.assert_close(out, reference_moe(hidden, ids, wts, w13, w2), rtol=1e-5, atol=1e-5)
    assert built == []  # the forward after a commit found the table ready
    layer.exclude_ranks([])
    assert built == [1]  # exclusion rebuilds it at once (between steps)
    layer(hidden, ids, wts)
    assert built == [1]
