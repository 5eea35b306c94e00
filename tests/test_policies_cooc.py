"""eplb-cooc: fewer cross-node co-activated pairs, never beyond the imbalance tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.errors import InputError
from eplb.metrics import cross_pairs, pair_counts, step_imbalance
from eplb.policies import plan, policy_info


def _ids(rng: np.random.Generator, N: int, L: int, E: int, k: int, blocks: int) -> np.ndarray:
    """Tokens choosing k experts inside one random block of E / blocks experts (strong co-activation)."""
    bs = E // blocks
    out = np.empty((N, L, k), dtype=np.int64)
    for n in range(N):
        for ly in range(L):
            b = rng.integers(blocks)
            out[n, ly] = b * bs + rng.choice(bs, k, replace=False)
    return out


def _counts(ids: np.ndarray, E: int, T: int) -> np.ndarray:
    N, L, _ = ids.shape
    c = np.zeros((T, L, E))
    t = np.repeat(np.arange(N) * T // N, L * ids.shape[2])
    la = np.tile(np.repeat(np.arange(L), ids.shape[2]), N)
    np.add.at(c, (t, la, ids.ravel()), 1.0)
    return c


def test_registered_with_capabilities() -> None:
    info = policy_info("eplb-cooc")
    assert info.hierarchical and info.per_step and "topk_ids" in info.options and "cooccurrence" in info.options


def test_provably_lowers_cross_node_pairs() -> None:
    # 8 experts, 2 nodes x 1 rank; tokens pick pairs inside {0..3} or {4..7} with equal loads: the block split
    # has no cross-node pair at the same (perfect) balance; an interleaved start has many
    E = 8
    ids = np.array([[[a, b]] for a in range(4) for b in range(4) if a < b] +
                   [[[a + 4, b + 4]] for a in range(4) for b in range(4) if a < b])  # [12, 1, 2]
    loads = _counts(ids, E, 1)  # 3 tokens per expert: every 4 / 4 split is perfectly balanced
    pl = plan(loads, 8, 2, num_nodes=2, policy="eplb-cooc", topk_ids=ids, imbalance_tolerance=0.0)
    assert cross_pairs(pl, pair_counts(ids, E)).tolist() == [0.0]
    assert step_imbalance(loads, pl).max() <= step_imbalance(loads, plan(loads, 8, 2, num_nodes=2)).max() + 1e-12
    # co-occurrence input gives the same
    co = np.zeros((1, 1, E, E))
    for a, b in ids[:, 0]:
        co[0, 0, a, b] += 1
        co[0, 0, b, a] += 1
    pc = plan(loads, 8, 2, num_nodes=2, policy="eplb-cooc", cooccurrence=co, imbalance_tolerance=0.0)
    assert cross_pairs(pc, pair_counts(ids, E)).tolist() == [0.0]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([(4, 2), (4, 4), (8, 2)]), st.sampled_from([0, 8, 16]),
       st.sampled_from([0.0, 0.05, 0.5]), st.sampled_from(["node", "rank"]))
def test_never_exceeds_the_imbalance_tolerance(seed: int, rn: tuple[int, int], extra: int, tol: float,
                                               level: str) -> None:
    rng = np.random.default_rng(seed)
    E, L, k, T = 16, 2, 3, 4
    R, N = rn
    S = E + extra
    ids = _ids(rng, 60, L, E, k, 4)
    loads = _counts(ids, E, T)
    base = plan(loads, S, R, num_nodes=N)
    pl = plan(loads, S, R, num_nodes=N, policy="eplb-cooc", topk_ids=ids, imbalance_tolerance=tol, level=level)
    imb0, imb = step_imbalance(loads, base), step_imbalance(loads, pl)
    assert np.all(imb <= (1 + tol) * imb0 + 1e-9)  # every step has load: obj - 1 is the per-step imbalance
    assert np.array_equal(pl.logcnt, base.logcnt)  # replica counts of the balanced plan
    pairs = pair_counts(ids, E)
    assert np.all(cross_pairs(pl, pairs, level=level) <= cross_pairs(base, pairs, level=level) + 1e-9)
    assert not pl.colocated_duplicates().any() or base.colocated_duplicates().sum() >= pl.colocated_duplicates().sum()


def test_group_limited_routing_keeps_groups_on_nodes() -> None:
    rng = np.random.default_rng(1)
    E, L, G, N, R, S = 16, 2, 4, 2, 4, 20
    ids = _ids(rng, 80, L, E, 3, 2)
    loads = _counts(ids, E, 4)
    pl = plan(loads, S, R, num_nodes=N, num_groups=G, policy="eplb-cooc", topk_ids=ids, imbalance_tolerance=0.5)
    node = pl.slot_node()
    for ly in range(L):
        for g in range(G):
            assert len(set(node[(pl.phy2log[ly] // (E // G)) == g])) == 1
    base = plan(loads, S, R, num_nodes=N, num_groups=G, policy="eplb-hierarchical")
    pairs = pair_counts(ids, E)
    assert np.all(cross_pairs(pl, pairs) <= cross_pairs(base, pairs) + 1e-9)


def test_needs_pairs_and_valid_options() -> None:
    loads = np.ones((1, 8))
    with pytest.raises(InputError, match="topk_ids"):
        plan(loads, 8, 2, num_nodes=2, policy="eplb-cooc")
    with pytest.raises(InputError, match="level"):
        plan(loads, 8, 2, num_nodes=2, policy="eplb-cooc", topk_ids=np.zeros((1, 1, 2), np.int64), level="gpu")


def test_cli_plan_evaluate_report_show_cross_node_pairs(tmp_path) -> None:
    """A trace with top-k ids: `plan --policy eplb-cooc` takes its pairs; evaluate / report print the pairs."""
    import re

    from typer.testing import CliRunner

    from eplb.cli import app
    from eplb.stats.trace import Trace

    rng = np.random.default_rng(3)
    E, L, k, T = 16, 2, 3, 4
    ids = _ids(rng, 64, L, E, k, 4)
    tr = Trace(_counts(ids, E, T).astype(np.int64), top_k=k, topk_ids=ids,
               topk_offsets=np.arange(T + 1, dtype=np.int64) * 16)
    tr.save(tmp_path / "t.safetensors")
    run = CliRunner()
    res = run.invoke(app, ["plan", str(tmp_path / "t.safetensors"), "--ep-size", "4", "--num-slots", "16",
                           "--num-nodes", "2", "--policy", "eplb-cooc", "--format", "native", "-o", str(tmp_path / "a.json")])
    assert res.exit_code == 0, (res.output, res.exception)
    for cmd in ("evaluate", "report"):
        res = run.invoke(app, [cmd, str(tmp_path / "t.safetensors"), "--placement", str(tmp_path / "a.json")])
        assert res.exit_code == 0, (res.output, res.exception)
        text = " ".join(res.output.split())  # rich wraps long lines
        assert re.search(r"[\d.]+ cross-node co-activated pairs per token and layer \([\d.]+% of all pairs", text)
        assert re.search(r"[\d.]+ ranks and [\d.]+ nodes per token \(exact from", text)
