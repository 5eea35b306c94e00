"""Communication metrics: ranks / nodes per token and cross-node co-activated pairs (exact small cases)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement
from eplb.errors import InputError
from eplb.metrics import (
    comm_stats,
    cooccurrence_pairs,
    cross_pairs,
    fanout_per_token,
    pair_counts,
    replica_share,
)


def _co_from_ids(ids: np.ndarray, E: int) -> np.ndarray:
    """[1, L, E, E] co-occurrence with the counts on the diagonal, by a plain loop (the reference)."""
    N, L, k = ids.shape
    co = np.zeros((1, L, E, E), dtype=np.int64)
    for n, ly in itertools.product(range(N), range(L)):
        for a in range(k):
            for b in range(k):
                co[0, ly, ids[n, ly, a], ids[n, ly, b]] += 1
    return co


def test_no_replicas_exact() -> None:
    # 4 experts, 2 ranks on 2 nodes: rank/node 0 holds {0, 1}, rank/node 1 holds {2, 3}
    pl = Placement([[0, 1, 2, 3]], 4, 2, 2)
    ids = np.array([[[0, 1]], [[0, 2]], [[2, 3]], [[1, 3]]])  # [N=4, L=1, k=2]
    pairs = pair_counts(ids, 4)
    assert pairs[0].tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]]
    assert cross_pairs(pl, pairs).tolist() == [2.0]  # {0, 2} and {1, 3} cross
    assert cross_pairs(pl, pairs, rule="colocated").tolist() == [2.0]  # no replicas: the rules agree
    st_ = comm_stats(pl, topk_ids=ids)
    assert st_["method"] == "topk_ids"
    assert st_["nodes"].tolist() == [1.5] and st_["ranks"].tolist() == [1.5]
    assert st_["cross_node_pairs"].tolist() == [0.5] and st_["pairs_per_token"].tolist() == [1.0]
    assert st_["cross_node_fraction"] == 0.5
    # one node: nothing crosses nodes, ranks still do
    one = Placement([[0, 1, 2, 3]], 4, 2, 1)
    s1 = comm_stats(one, topk_ids=ids)
    assert s1["cross_node_pairs"].tolist() == [0.0] and s1["cross_rank_pairs"].tolist() == [0.5]
    assert s1["nodes"].tolist() == [1.0]


def test_replicas_uniform_and_colocated_rules() -> None:
    # 2 ranks on 2 nodes, 3 slots each: node 0 = {0, 1, 2}, node 1 = {0, 3, 2}; experts 0 and 2 on both nodes
    pl = Placement([[0, 1, 2, 0, 3, 2]], 4, 2, 2)
    assert replica_share(pl)[0].tolist() == [[0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    ids = np.array([[[0, 1]], [[1, 2]], [[3, 2]]])
    pairs = pair_counts(ids, 4)
    # each pair has one expert with a replica on both nodes: it crosses with probability 1/2
    assert cross_pairs(pl, pairs).tolist() == [1.5]
    # but some node holds both experts of every pair
    assert cross_pairs(pl, pairs, rule="colocated").tolist() == [0.0]
    assert comm_stats(pl, topk_ids=ids)["cross_node_pairs"].tolist() == [0.5]
    # a pair of two replicated experts: 0 and 2 both 1/2 on each node -> together with probability 1/2
    assert cross_pairs(pl, pair_counts(np.array([[[0, 2]]]), 4)).tolist() == [0.5]


def test_cooccurrence_path_matches_topk_ids_and_infers_tokens() -> None:
    rng = np.random.default_rng(0)
    E, L, k, N = 8, 3, 3, 50
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(N)])  # [N, L, k]
    co = _co_from_ids(ids, E)
    assert np.array_equal(cooccurrence_pairs(co), pair_counts(ids, E))
    pl = Placement(np.stack([rng.permutation(E) for _ in range(L)]), E, 4, 2)
    a = comm_stats(pl, topk_ids=ids)
    b = comm_stats(pl, cooccurrence=co)  # k inferred from the co-occurrence (3 distinct experts per token)
    c = comm_stats(pl, cooccurrence=co, top_k=k)
    assert b["method"] == "cooccurrence"
    for key in ("cross_node_pairs", "cross_rank_pairs", "pairs_per_token", "cross_node_pairs_colocated"):
        assert np.allclose(a[key], b[key]) and np.allclose(a[key], c[key]), key
    assert np.allclose(a["pairs_per_token"], k * (k - 1) / 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 3), st.sampled_from([(2, 1), (4, 2), (4, 4)]), st.integers(0, 4))
def test_matches_brute_force_per_token(seed: int, k: int, rn: tuple[int, int], extra: int) -> None:
    """Per token: expected distinct units and crossing pairs, by enumerating every replica choice."""
    rng = np.random.default_rng(seed)
    E, L, N = 6, 2, 7
    R, Nn = rn
    S = ((E + extra + R - 1) // R) * R
    rows = [np.concatenate([rng.permutation(E), rng.integers(0, E, S - E)]) for _ in range(L)]
    pl = Placement(np.stack([rng.permutation(r) for r in rows]), E, R, Nn)
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(N)])
    node_of, rank_of = pl.slot_node(), pl.slot_rank()
    want = {"ranks": np.zeros(L), "nodes": np.zeros(L), "cross": np.zeros(L), "coloc": np.zeros(L)}
    for ly in range(L):
        slots = [np.flatnonzero(pl.phy2log[ly] == e) for e in range(E)]
        for n in range(N):
            choice = [slots[e] for e in ids[n, ly]]
            combos = list(itertools.product(*choice))
            for combo in combos:
                want["ranks"][ly] += len({rank_of[s] for s in combo}) / len(combos) / N
                want["nodes"][ly] += len({node_of[s] for s in combo}) / len(combos) / N
                want["cross"][ly] += sum(node_of[a] != node_of[b] for a, b in itertools.combinations(combo, 2)) \
                    / len(combos) / N
            for x, y in itertools.combinations(ids[n, ly], 2):
                nx, ny = set(node_of[slots[x]]), set(node_of[slots[y]])
                want["coloc"][ly] += (not nx & ny) / N
    got = comm_stats(pl, topk_ids=ids)
    assert np.allclose(got["ranks"], want["ranks"]) and np.allclose(got["nodes"], want["nodes"])
    assert np.allclose(got["cross_node_pairs"], want["cross"])
    assert np.allclose(got["cross_node_pairs_colocated"], want["coloc"])
    # chunking does not change the fan-out
    small = fanout_per_token(pl, topk_ids=ids, chunk=1)
    assert np.allclose(small["ranks"], got["ranks"]) and np.allclose(small["nodes"], got["nodes"])


def test_counts_fallback_and_errors() -> None:
    pl = Placement([[0, 1, 2, 3]], 4, 2, 2)
    out = comm_stats(pl, counts=np.array([[[2, 2, 2, 2]]]), top_k=2)
    assert out["method"] == "counts" and "cross_node_pairs" not in out
    # each choice is on node 0 w.p. 1/2: 2 - 2 * (1/2)^2 = 1.5 nodes expected
    assert out["nodes"].tolist() == [1.5]
    with pytest.raises(InputError):
        cross_pairs(pl, np.zeros((1, 3, 3)))
    with pytest.raises(InputError):
        cross_pairs(pl, np.zeros((1, 4, 4)), rule="best")
    with pytest.raises(InputError):
        pair_counts(np.array([[[0, 4]]]), 4)
