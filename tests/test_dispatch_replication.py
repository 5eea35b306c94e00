"""Per-step replication planner: exact small cases, invariants under hypothesis, vectorised == per-row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement
from eplb.dispatch import split_rank_loads
from eplb.dispatch.replication import (
    copies_within,
    plan_replication,
    replicated_rank_loads,
    slot_tables,
    slot_tokens,
    static_holdings,
    uniform_start,
)

CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False


def random_placement(rng: np.random.Generator, R: int, spr: int, E: int, L: int = 1) -> Placement:
    rows = []
    for _ in range(L):
        row = np.concatenate([np.arange(E), rng.integers(0, E, R * spr - E)])
        rng.shuffle(row)
        rows.append(row)
    return Placement(np.array(rows), num_experts=E, num_ranks=R)


def test_exact_two_ranks_one_copy() -> None:
    pl = Placement([[0, 1, 2, 3]], num_experts=4, num_ranks=2)
    mult = static_holdings(pl)
    assert mult[0].tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    p = plan_replication(np.array([[10, 0, 2, 0]]), mult, 1)
    # rank 0 holds 10 tokens of expert 0; a copy of expert 0 on rank 1 takes (10 - 2) // 2 = 4 of them
    assert p.rank_loads.tolist() == [[6, 6]]
    assert p.dyn_expert.tolist() == [[[-1], [0]]]
    assert p.dyn_source.tolist() == [[[-1], [0]]]
    assert p.rank_tokens[0].tolist() == [[6, 4], [0, 0], [0, 2], [0, 0]]
    assert p.copies.tolist() == [1] and p.iterations.tolist() == [1]
    assert slot_tokens(p, pl).tolist() == [[[6, 0, 0], [2, 0, 4]]]
    # no copy budget: nothing can move (expert 0 has one replica)
    p0 = plan_replication(np.array([[10, 0, 2, 0]]), mult, 1, max_copies=0)
    assert p0.rank_loads.tolist() == [[10, 2]] and p0.copies.tolist() == [0]


def test_exact_free_moves_and_copy_preference() -> None:
    # expert 0 on ranks 0 and 1 (slots 0, 2); rank 1 also holds expert 1 with 6 tokens
    pl = Placement([[0, 2, 0, 1, 3, 4]], num_experts=5, num_ranks=3)
    mult = static_holdings(pl)
    c = np.array([[12, 6, 0, 0, 0]])
    assert uniform_start(c, mult)[0, 0].tolist() == [6, 6, 0]
    # no dynamic slots: a free move between the static replicas of expert 0 only
    p = plan_replication(c, mult, 0)
    assert p.rank_loads.tolist() == [[9, 9, 0]]
    # one dynamic slot per rank: rank 2 (empty) gets a copy of expert 0 from rank 0
    p = plan_replication(c, mult, 1)
    assert p.rank_loads.max() == 6 and p.rank_tokens.sum(-1)[0].tolist() == [12, 6, 0, 0, 0]
    assert p.dyn_expert[0, 2, 0] == 0 and p.dyn_source[0, 2, 0] == 0
    assert p.copies[0] == 1


def test_send_cap_and_total_cap() -> None:
    # one hot expert on rank 0 only, 4 ranks, D = 1: with max_send = 1 only one copy can leave rank 0
    pl = Placement([[0, 1, 2, 3]], num_experts=4, num_ranks=4)
    mult = static_holdings(pl)
    c = np.array([[40, 0, 0, 0]])
    assert plan_replication(c, mult, 1, max_send=1).rank_loads.tolist() == [[20, 20, 0, 0]]
    p = plan_replication(c, mult, 1, max_send=3)
    assert p.rank_loads.tolist() == [[10, 10, 10, 10]] and p.copies[0] == 3 and p.max_send[0] == 3
    assert plan_replication(c, mult, 1, max_send=3, max_copies=2).rank_loads.max() == 14  # 40 -> 20 -> 14 / 13 / 13
    assert copies_within(2.4, 0.463) == 5 and copies_within(0.926, 0.463) == 2


def test_bad_input() -> None:
    pl = Placement([[0, 1, 2, 3]], num_experts=4, num_ranks=2)
    mult = static_holdings(pl)
    with pytest.raises(ValueError, match="whole token"):
        plan_replication(np.array([0.5, 0, 0, 0]), mult[0], 1)
    with pytest.raises(ValueError, match="mult"):
        plan_replication(np.array([1, 0, 0]), mult[0], 1)
    with pytest.raises(ValueError, match="dynamic_slots"):
        plan_replication(np.array([1, 0, 0, 0]), mult[0], -1)
    with pytest.raises(ValueError, match="start"):
        plan_replication(np.array([1, 0, 0, 0]), mult[0], 1, start=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="budget_ms"):
        copies_within(-1.0, 0.4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), R=st.integers(2, 6), spr=st.integers(1, 3), D=st.integers(0, 3),
       recv=st.integers(0, 3), send=st.integers(0, 4), total=st.one_of(st.none(), st.integers(0, 6)),
       top=st.integers(0, 60))
def test_invariants(seed: int, R: int, spr: int, D: int, recv: int, send: int, total: int | None, top: int) -> None:
    rng = np.random.default_rng(seed)
    E = max(2, R * spr - rng.integers(0, R))
    if E > R * spr:
        E = R * spr
    pl = random_placement(rng, R, spr, E, L=2)
    if rng.random() < 0.3:
        pl = pl.with_meta(excluded_ranks=[int(rng.integers(0, R))])
    counts = rng.integers(0, top + 1, (3, 2, E)) * (rng.random((3, 2, E)) < 0.6)
    mult = static_holdings(pl)
    accept = slot_tables(pl)["accept"].astype(bool)  # [L, R]
    p = plan_replication(counts, mult, D, max_recv=recv, max_send=send, max_copies=total, accept=accept)
    assert not (p.dyn_expert >= 0)[..., ~accept[0], :].any() or not (~accept).any()
    Q, de, ds = p.rank_tokens, p.dyn_expert, p.dyn_source
    assert (Q >= 0).all()
    assert (Q.sum(-1) == counts).all()                       # token conservation
    assert (Q.sum(-2) == p.rank_loads).all()                  # loads consistent
    start = uniform_start(counts, mult)
    assert (p.rank_loads.max(-1) <= start.sum(-2).max(-1)).all()  # never worse than the static split
    p0 = plan_replication(counts, mult, 0)
    assert (p0.copies == 0).all() and (p0.dyn_expert.size == 0)
    # budget respected
    used = (de >= 0).sum(-1)
    assert (used <= min(recv, D)).all()
    assert (p.max_send <= send).all() if D else True
    if total is not None:
        assert (p.copies <= total).all()
    assert (p.copies == used.sum(-1)).all()
    # dynamic slots: filled in order, an expert not held statically there, copied from a static holder
    assert ((de >= 0) == (ds >= 0)).all()
    assert (np.diff((de >= 0).astype(int), axis=-1) <= 0).all()
    held = mult[None] > 0  # [1, L, E, R]
    for t, layer, r, d in zip(*np.nonzero(de >= 0), strict=True):
        e, s = de[t, layer, r, d], ds[t, layer, r, d]
        assert not held[0, layer, e, r] and held[0, layer, e, s]
    dyn_held = np.zeros_like(Q, dtype=bool)
    t_, l_, r_, d_ = np.nonzero(de >= 0)
    dyn_held[t_, l_, de[t_, l_, r_, d_], r_] = True
    assert ((Q == 0) | held | dyn_held).all()                 # tokens only where a replica is
    # slot view sums back to the rank loads and to the counts
    sl = slot_tokens(p, pl)
    assert (sl.sum(-1) == p.rank_loads).all()
    # vectorised == one problem at a time, and deterministic
    for t in range(3):
        for layer in range(2):
            one = plan_replication(counts[t, layer], mult[layer], D, max_recv=recv, max_send=send, max_copies=total,
                                   accept=accept[layer])
            assert (one.rank_tokens == Q[t, layer]).all() and (one.dyn_expert == de[t, layer]).all()
            assert (one.dyn_source == ds[t, layer]).all()


def test_balanced_start_never_worse_than_balanced_dispatch() -> None:
    rng = np.random.default_rng(3)
    pl = random_placement(rng, 4, 3, 9, L=3)
    counts = rng.integers(0, 30, (5, 3, 9))
    bal = split_rank_loads(counts, pl, "balanced").max(-1)
    for D in (0, 1, 2):
        loads, plan = replicated_rank_loads(counts, pl, D, start="balanced")
        assert (loads.max(-1) <= bal).all()
        assert (plan.rank_tokens.sum(-1) == counts).all()
    loads2, _ = replicated_rank_loads(counts, pl, 2, start="uniform")
    assert (loads2.sum(-1) == counts.sum(-1)).all()


def test_excluded_ranks_get_no_copies_and_slot_view_skips_unserved() -> None:
    # expert 0 on both ranks, rank 1 drained: it gets no tokens of expert 0 and no dynamic copies
    pl = Placement([[0, 1, 0, 2]], num_experts=3, num_ranks=2).with_meta(excluded_ranks=[1])
    loads, plan = replicated_rank_loads(np.array([[30, 0, 2]]), pl, 2, start="uniform")
    assert loads.tolist() == [[30, 2]] and plan.copies.tolist() == [0]
    assert slot_tokens(plan, pl).tolist() == [[[30, 0, 0, 0], [0, 2, 0, 0]]]
    # without the drain, rank 1 shares expert 0 (a free move) and nothing is copied
    loads, plan = replicated_rank_loads(np.array([[30, 0, 2]]), pl.with_meta(excluded_ranks=[]), 2, start="uniform")
    assert loads.tolist() == [[16, 16]] and plan.copies.tolist() == [0]


def _kernel_cases(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        R, spr = int(rng.integers(2, 9)), int(rng.integers(1, 4))
        E = max(1, R * spr - int(rng.integers(0, R)))
        pl = random_placement(rng, R, spr, E, L=2)
        if i % 3 == 0:
            pl = pl.with_meta(excluded_ranks=[int(rng.integers(0, R))])
        counts = rng.integers(0, 60, (3, 2, E)) * (rng.random((3, 2, E)) < 0.7)
        kw = {"max_recv": int(rng.integers(0, 3)), "max_send": int(rng.integers(0, 4)),
              "min_copy_gain": int(rng.integers(1, 4))}
        if i % 2:
            kw["max_copies"] = int(rng.integers(0, 5))
        if i % 4 == 3:
            kw["max_iters"] = int(rng.integers(0, 3))
        if i % 5 == 1:
            kw["tolerance"] = float(rng.choice([0.0, 0.05, 0.2]))
        cases.append({"phy2log": pl.phy2log.tolist(), "E": E, "R": R, "excluded": pl.meta.get("excluded_ranks", []),
                      "counts": counts.tolist(), "D": int(rng.integers(0, 3)), "kw": kw})
    return cases


def _check_kernel_cases(cases: list[dict], device: str) -> list[bool]:
    from eplb.dispatch.replication_kernel import plan_replication_gpu

    ok = []
    for i, cs in enumerate(cases):
        pl = Placement(np.array(cs["phy2log"]), num_experts=cs["E"], num_ranks=cs["R"]).with_meta(
            excluded_ranks=cs["excluded"])
        counts = np.array(cs["counts"])
        tabs = slot_tables(pl)
        ref = plan_replication(counts, static_holdings(pl), cs["D"], accept=tabs["accept"].astype(bool), **cs["kw"])
        dev_tabs = {k: torch.tensor(v, device=device) for k, v in tabs.items()}
        if i % 3 == 2:  # tables without the holder masks: the wrapper derives them from the slot experts
            del dev_tabs["holders"]
        # alternate the kernel's warps per program (layouts): every one gives the reference plan
        got = plan_replication_gpu(torch.tensor(counts, device=device), dev_tabs, cs["D"], num_warps=(1, 4, 2, 8)[i % 4],
                                   **cs["kw"])
        want = {"slot_tokens": slot_tokens(ref, pl), "dyn_expert": ref.dyn_expert, "dyn_source": ref.dyn_source,
                "rank_loads": ref.rank_loads, "copies": ref.copies, "iterations": ref.iterations}
        ok.append(all(np.array_equal(got[k].cpu().numpy(), v) for k, v in want.items()))
    return ok


def test_slot_tables_holder_masks() -> None:
    rng = np.random.default_rng(3)
    for R in (2, 5, 64):
        E = R
        p2l = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, size=2 * R)]) for _ in range(2)])
        pl = Placement(p2l, num_experts=E, num_ranks=R).with_meta(excluded_ranks=[1])
        tabs, hold = slot_tables(pl), static_holdings(pl) > 0  # [L, E, R]
        bits = (tabs["holders"][..., None].view(np.uint64) >> np.arange(R, dtype=np.uint64)) & np.uint64(1)
        ex = pl.rank_experts()
        want = hold[np.arange(2)[:, None, None], ex] & (tabs["expert"] >= 0)[..., None]
        assert np.array_equal(bits.astype(bool), want)


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_kernel_equals_reference_in_triton_interpreter() -> None:
    """The Triton kernel's program, run by Triton's CPU interpreter, equals the numpy reference (runs without a GPU)."""
    cases = _kernel_cases(11, 8)
    # more than 32 ranks: the kernel keeps rank bit masks as two int32 halves
    rng = np.random.default_rng(12)
    pl = random_placement(rng, 40, 2, 60, L=1)
    counts = rng.multinomial(4000, rng.dirichlet(np.full(60, 0.3)), size=(2, 1))
    cases.append({"phy2log": pl.phy2log.tolist(), "E": 60, "R": 40, "excluded": [3], "counts": counts.tolist(),
                  "D": 2, "kw": {"max_send": 1, "tolerance": 0.0}})
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_dispatch_replication as t; "
            "print(json.dumps(t._check_kernel_cases(json.loads(sys.stdin.read()), 'cpu')))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], input=json.dumps(cases),
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True] * len(cases)


@pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs CUDA and Triton")
def test_kernel_equals_reference_on_cuda() -> None:
    assert all(_check_kernel_cases(_kernel_cases(5, 40), "cuda"))
    # a DeepSeek-V3-sized problem: 256 experts, 64 ranks x 5 slots, D = 2, one launch over 4 layers x 2 steps
    rng = np.random.default_rng(0)
    pl = random_placement(rng, 64, 5, 256, L=4)
    counts = rng.multinomial(2048 * 64 * 8, rng.dirichlet(np.full(256, 0.3)), size=(2, 4))
    cs = [{"phy2log": pl.phy2log.tolist(), "E": 256, "R": 64, "excluded": [], "counts": counts.tolist(), "D": 2,
           "kw": {}}]
    assert _check_kernel_cases(cs, "cuda") == [True]


def test_kernel_graph_capturable_and_input_checks() -> None:
    if not (CUDA and HAVE_TRITON):
        pytest.skip("needs CUDA and Triton")
    from eplb.dispatch.replication_kernel import plan_replication_gpu

    rng = np.random.default_rng(1)
    pl = random_placement(rng, 8, 3, 20, L=1)
    tabs = {k: torch.tensor(v, device="cuda") for k, v in slot_tables(pl).items()}
    c = torch.zeros((1, 20), dtype=torch.int64, device="cuda")
    res = plan_replication_gpu(c, tabs, 2)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan_replication_gpu(c, tabs, 2, out=res["_out"])
    for _ in range(3):
        counts = rng.integers(0, 100, (1, 20))
        c.copy_(torch.tensor(counts))
        g.replay()
        ref = plan_replication(counts, static_holdings(pl), 2)
        assert np.array_equal(res["slot_tokens"].cpu().numpy(), slot_tokens(ref, pl))
    with pytest.raises(ValueError, match="multiple"):
        plan_replication_gpu(torch.zeros((3, 20), dtype=torch.int64, device="cuda"),
                             {k: v.expand(2, *v.shape[1:]) for k, v in tabs.items()}, 2)
