"""The exact MILP optimum (HiGHS) of one layer: brute-force checked; eplb's default within 1% of it."""

import itertools
from collections import Counter

import numpy as np
import pytest

import eplb
from eplb.errors import InputError
from eplb.metrics import lower_bound, max_rank_load
from eplb.policies.exact import exact_layer


def brute_force(w: np.ndarray, S: int, R: int) -> float:
    """Min over every replica-count vector and every assignment of the copies to R ranks of S/R slots."""
    E, spr = len(w), S // R
    best = np.inf
    for comp in itertools.product(range(1, S - E + 2), repeat=E):
        if sum(comp) != S:
            continue
        per = [w[e] / comp[e] for e in range(E)]

        def rec(cnt: Counter, ranks_left: int, cur: float) -> None:
            nonlocal best
            if cur >= best:
                return
            if ranks_left == 0:
                best = cur
                return
            keys = [k for k in cnt if cnt[k] > 0]
            for combo in itertools.combinations_with_replacement(keys, spr):
                c2 = Counter(combo)
                if any(c2[k] > cnt[k] for k in c2):
                    continue
                cnt.subtract(c2)
                rec(cnt, ranks_left - 1, max(cur, sum([per[k] for k in combo])))  # noqa: B023 (called within the loop)
                cnt.update(c2)

        rec(Counter({e: comp[e] for e in range(E)}), R, 0.0)
    return best


@pytest.mark.parametrize("seed", range(24))
def test_milp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    E, R = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    S = ((E + int(rng.integers(0, R + 2)) + R - 1) // R) * R
    w = np.floor(rng.pareto(1.0, E) * 20) + rng.integers(0, 2, E)
    res = exact_layer(w, S, R, mip_rel_gap=1e-9)
    assert res.optimal
    opt = brute_force(w, S, R)
    assert res.max_load == pytest.approx(opt, rel=1e-9, abs=1e-9)
    # the solution is a real placement with that max under eplb.metrics' uniform split
    p = eplb.Placement(res.phy2log[None], E, R)
    assert float(max_rank_load(w[None], p)[0]) == pytest.approx(opt, rel=1e-9, abs=1e-9)
    assert lower_bound(w[None], S, R)[0] <= opt * (1 + 1e-9) + 1e-12


# the protocol (E 8-16, R 3-4, up to 2R extra slots), on the shapes HiGHS proves in well under a second
SHAPES = [(8, 3, 9), (8, 4, 8), (8, 3, 12), (12, 3, 12), (12, 4, 12), (16, 4, 16)]


def test_exact_auto_within_one_percent_of_the_optimum():
    rng = np.random.default_rng(21)
    n = 0
    for E, R, S in SHAPES:
        for _ in range(3):
            w = np.floor(rng.lognormal(0.0, 1.0, E) * 100) + 1
            # a generous exact_time_limit: the default (1 s) can run out on a busy machine
            got = float(max_rank_load(w[None], eplb.plan(w[None], S, R, exact="auto", exact_time_limit=10.0))[0])
            ref = exact_layer(w, S, R, upper=got, time_limit=5.0, mip_rel_gap=1e-3)
            assert ref.phy2log is not None
            opt_lo = ref.bound  # proven: the optimum is >= this
            assert got <= 1.01 * opt_lo, (E, R, S, w, got, ref)
            assert lower_bound(w[None], S, R)[0] <= min(ref.max_load, got) * (1 + 1e-9)
            n += ref.optimal
    assert n >= len(SHAPES) * 2  # most are proven (to 0.1%) outright


def test_exact_option_off_and_bad_value():
    w = np.array([[142.0, 228, 140, 28, 248, 157, 59, 179]])
    off = float(max_rank_load(w, eplb.plan(w, 12, 3, exact="off"))[0])
    on = float(max_rank_load(w, eplb.plan(w, 12, 3, exact="auto"))[0])
    assert on <= off
    assert np.array_equal(eplb.plan(w, 12, 3).phy2log, eplb.plan(w, 12, 3, exact="off").phy2log)  # default off
    with pytest.raises(InputError, match="exact"):
        eplb.plan(w, 12, 3, exact="maybe")
