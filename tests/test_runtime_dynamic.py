"""Per-step replication in the EP layer: dynamic slots filled by P2P copies (2-4 gloo ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb import Placement
from eplb.dispatch.replication import plan_replication, slot_tokens, static_holdings
from eplb.runtime import ExpertParallelMoE
from eplb.runtime.dynamic import DynamicSlots
from eplb.runtime.layer import reference_moe
from eplb.runtime.testing import run_distributed

H, INTER = 16, 8


def _weights(E: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(E, 2 * INTER, H, generator=g) / H**0.5).to(dtype),
            (torch.randn(E, H, INTER, generator=g) / INTER**0.5).to(dtype))


def _hot_inputs(N: int, k: int, E: int, hot: int, seed: int, dtype: torch.dtype = torch.float32):
    """Routing skewed to expert ``hot`` (so the planner copies it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype)
    rows = []
    for _ in range(N):
        perm = torch.randperm(E, generator=g)[:k]
        if torch.rand(1, generator=g).item() < 0.7 and hot not in perm.tolist():
            perm[0] = hot
        rows.append(perm)
    ids = torch.stack(rows) if N else torch.zeros(0, k, dtype=torch.int64)
    return x, ids, torch.rand(N, k, generator=g)


def _worker(rank: int, world: int, D: int, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    E = 3 * world  # no redundant static slot: every expert once, 3 per rank
    results = {"copies": 0, "layers": []}
    rng = np.random.default_rng(7)  # same on every rank
    pool = None
    for layer_pos in range(3):  # three layers share one pool (one buffer set)
        row = rng.permutation(E)
        pl = Placement(row[None], E, world)
        w13, w2 = _weights(E, seed=layer_pos, dtype=dtype)
        layer = ExpertParallelMoE.from_full_weights(w13, w2, pl, 0, strategy="balanced", compute="loop")
        if pool is None:
            pool = DynamicSlots.like(layer, D)
        layer.dynamic = pool
        hot = int(row[0])  # an expert of rank 0
        for step in range(2):
            N = 6 + 3 * rank + step
            x, ids, w = _hot_inputs(N, 2, E, hot, seed=100 * layer_pos + 10 * step + rank, dtype=dtype)
            y = layer(x, ids, w)
            ref = reference_moe(x, ids, w, w13, w2)
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            err = float((y.float() - ref.float()).abs().max()) if N else 0.0
            assert err <= tol, (layer_pos, step, err)
            plan = pool.last_plan
            # the buffers of this rank's dynamic slots hold exactly the source's weights
            for d, e in enumerate(plan["dyn_expert"][rank].tolist()):
                if e >= 0:
                    assert torch.equal(pool.w13[d], w13[e]) and torch.equal(pool.w2[d], w2[e])
            # every rank planned the same, and the plan equals the reference planner on the gathered totals
            gathered = [torch.zeros(E, dtype=torch.int64) for _ in range(world)]
            torch.distributed.all_gather(gathered, torch.bincount(ids.reshape(-1), minlength=E))
            tot = torch.stack(gathered).sum(0).numpy()
            ref_plan = plan_replication(tot[None], static_holdings(pl)[0], D)
            assert np.array_equal(plan["dyn_expert"], ref_plan.dyn_expert[0])
            assert np.array_equal(plan["slot_tokens"], slot_tokens(ref_plan, pl)[0])
            results["layers"].append((layer_pos, step, plan["dyn_expert"].tolist(), int(ref_plan.rank_loads.max()),
                                      int(ref_plan.copies[0])))
    results["copies"] = pool.copies
    assert pool.w13.shape[0] == D  # one buffer set for all layers
    return results


@pytest.mark.parametrize(("world", "D", "dtype"), [(2, 1, "float32"), (3, 2, "bfloat16"), (4, 2, "float32")])
def test_dynamic_slots_equal_reference_moe(world: int, D: int, dtype: str) -> None:
    res = run_distributed(_worker, world, D, dtype, timeout_s=180)
    # the hot expert really was copied somewhere (otherwise the test would not exercise the copies)
    assert sum(r["copies"] for r in res) > 0
    assert all(r["layers"] == res[0]["layers"] for r in res)  # identical plans on every rank


def _excluded_worker(rank: int, world: int) -> dict:
    row = np.array([0, 1, 0, 2, 3, 1] if world == 3 else [0, 1, 0, 2])  # expert 0 on ranks 0 and 1
    E = int(row.max()) + 1
    pl = Placement(row[None], E, world)
    w13, w2 = _weights(E, seed=3)
    layer = ExpertParallelMoE.from_full_weights(w13, w2, pl, 0, strategy="balanced", compute="loop")
    layer.dynamic = DynamicSlots.like(layer, 1)
    x, ids, w = _hot_inputs(12, 1, E, 0, seed=rank)
    out = {}
    for tag, excl in (("all", []), ("drained", [1])):
        layer.exclude_ranks(excl)
        y = layer(x, ids, w)
        assert torch.allclose(y, reference_moe(x, ids, w, w13, w2), atol=1e-5)
        plan = layer.dynamic.last_plan
        out[tag] = (plan["dyn_expert"].tolist(), plan["slot_tokens"].tolist())
    return out


def test_dynamic_slots_respect_excluded_ranks() -> None:
    res = run_distributed(_excluded_worker, 2, timeout_s=120)
    dyn, slots = res[0]["drained"]
    assert dyn[1] == [-1]  # the drained rank receives no copy
    assert slots[1][0] == 0  # nor tokens of expert 0, which rank 0 also holds
    assert res[0] == res[1]


def test_dynamic_pool_checks() -> None:
    with pytest.raises(ValueError, match="dynamic_slots"):
        DynamicSlots(0, (4, 2), (2, 2))
    with pytest.raises(ValueError, match="backend"):
        DynamicSlots(1, (4, 2), (2, 2), backend="cuda")
    # one rank: every expert is local, nothing to copy; output equals the reference
    E = 4
    w13, w2 = _weights(E, 0)
    layer = ExpertParallelMoE.from_full_weights(w13, w2, Placement(np.arange(E)[None], E, 1), 0, compute="loop")
    layer.dynamic = DynamicSlots.like(layer, 1)
    x, ids, w = _hot_inputs(5, 2, E, 0, seed=1)
    assert torch.allclose(layer(x, ids, w), reference_moe(x, ids, w, w13, w2), atol=1e-5)
    with pytest.raises(ValueError, match="topk_ids"):
        layer(x, ids + E, w)
    layer.dynamic = DynamicSlots(1, (4, 2), (2, 2))
    with pytest.raises(ValueError, match="buffers"):
        layer(x, ids, w)
