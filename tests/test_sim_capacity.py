"""Capacity planner: brute-force agreement, held-out split, bad input."""

import numpy as np
import pytest

import eplb
from eplb.metrics import imbalance_ratio, rank_loads
from eplb.sim import capacity
from eplb.sim.capacity import split_steps


def skewed(T=40, L=2, E=16, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.gamma(0.4, 1.0, size=(L, E)) + 0.01
    return np.stack([np.stack([rng.multinomial(300, p[li] / p[li].sum()) for li in range(L)]) for _ in range(T)])


def test_capacity_equals_brute_force():
    counts = skewed()
    R = 4
    res = capacity(counts, ep_size=R, target_imbalance=0.15, held_out=0.25, policies=["deepseek", "none"],
                   max_slots_per_rank=10)
    assert res.slots_per_rank == list(range(4, 11))
    train, test = counts[:30], counts[30:]
    for pol in ("deepseek", "none"):
        want = []
        for spr in res.slots_per_rank:
            S = spr * R
            # "none" is the identity layout (S = E) at every slot count, as in `eplb evaluate`
            pl = eplb.plan(train, S, R, policy="deepseek") if pol == "deepseek" else \
                eplb.Placement.contiguous(2, 16, R)
            want.append(imbalance_ratio(rank_loads(test, pl)).mean())
        assert np.allclose(res.imbalance[pol], want)
        if pol == "none":
            assert len(set(res.imbalance[pol])) == 1  # the baseline does not wrap around as slots grow
        first = next((s for s, v in zip(res.slots_per_rank, want, strict=True) if v <= 0.15), None)
        best = res.best(pol)
        assert (best["slots_per_rank"] if best else None) == first
        if best:
            assert best["num_slots"] == first * R and best["redundant_total"] == first * R - 16
            assert best["redundant_per_rank"] == pytest.approx((first * R - 16) / R)
    d = res.to_dict()
    assert d["num_slots"] == [s * R for s in res.slots_per_rank] and set(d["best"]) == {"deepseek", "none"}


def test_capacity_more_slots_helps_and_outputs(tmp_path):
    counts = skewed(T=30, seed=3)
    res = capacity(counts, ep_size=4, target_imbalance=0.05, policies=["deepseek"])
    ys = res.imbalance["deepseek"]
    assert ys[-1] < ys[0]  # doubling the slots must help on a skewed trace
    files = res.save(tmp_path)
    assert {p.name for p in files} == {"capacity.json", "capacity.png"}
    assert (tmp_path / "capacity.png").read_bytes()[:4] == b"\x89PNG"


def test_split_steps():
    assert split_steps(10, 0.5) == (slice(0, 5), slice(5, 10), False)
    assert split_steps(10, 0.0) == (slice(0, 10), slice(0, 10), True)
    assert split_steps(1, 0.5) == (slice(0, 1), slice(0, 1), True)
    assert split_steps(3, 0.9)[0] == slice(0, 1)  # at least one training step


@pytest.mark.parametrize("kw, match", [
    (dict(ep_size=0), "ep-size"),
    (dict(ep_size=4, target_imbalance=-1), "target-imbalance"),
    (dict(ep_size=4, held_out=1.0), "held-out"),
    (dict(ep_size=4, policies=["nope"]), "unknown policy"),
    (dict(ep_size=4, policies=[]), "at least one policy"),
    (dict(ep_size=4, max_slots_per_rank=2), "below the minimum"),
    (dict(ep_size=4, num_nodes=3), "num-nodes"),
    (dict(ep_size=4, strategy="x"), "strategy"),
])
def test_capacity_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        capacity(skewed(T=4), **kw)
