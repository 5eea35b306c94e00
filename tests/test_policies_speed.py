"""The fast paths of the eplb policies (issue 21 item 3) agree with their plain definitions."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement
from eplb.metrics import max_rank_load
from eplb.policies.packing import (
    colocated_dups,
    expert_pack_count,
    pack_loads,
    phy2log_counts,
    replica_counts,
    replica_weights,
    swap_search,
)
from eplb.policies.search import robust_rows, step_max_mean


def _greedy_counts(w: np.ndarray, S: int, cap: int | None) -> np.ndarray:
    """The documented rule, one replica at a time, one row at a time."""
    out = []
    for row in w:
        c = np.ones(row.size, dtype=np.int64)
        for _ in range(S - row.size):
            val = [(-np.inf if cap is not None and c[e] >= cap else row[e] / c[e]) for e in range(row.size)]
            top = max(val)
            pick = min((c[e], e) for e in range(row.size) if val[e] >= top)[1]
            c[pick] += 1
        out.append(c)
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 24), st.integers(0, 80), st.sampled_from(["real", "int", "flat"]),
       st.booleans())
def test_replica_counts_jump_equals_plain_greedy(seed, E, extra, kind, capped):
    rng = np.random.default_rng(seed)
    w = {"real": rng.random((3, E)) * 50, "int": rng.integers(0, 5, (3, E)).astype(float),
         "flat": np.full((3, E), 7.0)}[kind]
    S = E + extra
    cap = int(np.ceil(S / E)) + int(rng.integers(0, 3)) if capped else None
    assert np.array_equal(replica_counts(w, S, cap), _greedy_counts(w, S, cap))


def test_colocated_dups_and_step_max_mean_match_definitions():
    rng = np.random.default_rng(3)
    p2l = rng.integers(0, 10, (5, 24))
    want = np.clip(expert_pack_count(p2l, 10, 4) - 1, 0, None).sum(axis=(1, 2))
    assert np.array_equal(colocated_dups(p2l, 4), want)
    p2l[:, :10] = np.arange(10)  # every expert served
    loads = rng.poisson(5.0, (7, 5, 10)).astype(float)
    got = step_max_mean(loads, p2l, 4)
    assert np.allclose(got, max_rank_load(loads, Placement(p2l, 10, 4)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(16, 32, 8), (24, 48, 12), (12, 24, 6)]), st.integers(1, 4))
def test_restricted_partner_searches_never_worsen(seed, shape, q):
    E, S, P = shape
    rng = np.random.default_rng(seed)
    loads = rng.poisson(rng.gamma(0.5, 20, (1, 3, E)), (10, 3, E)).astype(float)
    w = loads.sum(0)
    start = np.array(eplb.plan(w, S, P, policy="deepseek").phy2log)
    c = phy2log_counts(start, E)
    before = pack_loads(replica_weights(w, c, start), P).max(axis=1)
    sw = swap_search(w, start, P, partner_packs=q)
    assert np.array_equal(phy2log_counts(sw, E), c)
    assert np.all(pack_loads(replica_weights(w, c, sw), P).max(axis=1) <= before * (1 + 1e-12))
    rb = robust_rows(loads, start, P, partner_ranks=q, cand=16)
    assert np.array_equal(phy2log_counts(rb, E), c)
    assert np.all(step_max_mean(loads, rb, P) <= step_max_mean(loads, start, P) * (1 + 1e-12))
