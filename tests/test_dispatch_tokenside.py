"""The token side of assign_slots (occurrence ranks, replica lookup) against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement
from eplb.dispatch import DispatchTable, assign_slots, plan_quotas, source_shares
from eplb.dispatch.assign import balanced_replica, balanced_token_slots, occurrence, token_occurrence

CUDA = torch.cuda.is_available()


def ref_occurrence(flat: list[int]) -> list[int]:
    """How many earlier entries chose the same expert, by counting."""
    seen: dict[int, int] = {}
    out = []
    for e in flat:
        out.append(seen.get(e, 0))
        seen[e] = seen.get(e, 0) + 1
    return out


def ref_token_slots(ids: np.ndarray, table: DispatchTable, rank: int, cum_e: np.ndarray) -> np.ndarray:
    """Token by token: the m-th entry of expert e goes to the first replica j with m < cum_e[e, j]; beyond this
    rank's shares, replica (m + rank) % replicas."""
    log2phy, logcnt = table.log2phy.numpy(), table.logcnt.numpy()
    flat = ids.reshape(-1).tolist()
    out = []
    for e, m in zip(flat, ref_occurrence(flat), strict=True):
        j = 0
        while j < cum_e.shape[1] and cum_e[e, j] <= m:
            j += 1
        if j >= logcnt[e]:
            j = (m + rank) % logcnt[e]
        out.append(int(log2phy[e, j]))
    return np.array(out, dtype=np.int64).reshape(ids.shape)


@st.composite
def problems(draw: st.DrawFn) -> tuple[Placement, np.ndarray, list[np.ndarray], bool]:
    """A placement, global counts [R, E] and every rank's [N_r, k] ids (some ranks with 0 tokens, many
    experts with 0 tokens); ``consistent``: the counts are the ranks' real counts (else random)."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    R, spr = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    E = draw(st.integers(max(1, R * spr // 2), R * spr))
    row = np.concatenate([np.arange(E), rng.integers(0, E, R * spr - E)])
    rng.shuffle(row)
    p = Placement(row[None], E, R, 2 if R % 2 == 0 else 1)
    k = draw(st.integers(1, min(4, E)))
    hot = rng.choice(E, size=max(1, E // 2), replace=False)  # the other experts get no tokens
    distinct = draw(st.booleans())
    ids = []
    for _ in range(R):
        n = int(rng.integers(0, 12)) * int(rng.random() < 0.8)  # some ranks route nothing
        if distinct and k <= hot.size:
            x = np.stack([rng.choice(hot, k, replace=False) for _ in range(n)]) if n else np.zeros((0, k), np.int64)
        else:
            x = rng.choice(hot, (n, k))  # repeated experts within a token too
        ids.append(x.astype(np.int64))
    consistent = draw(st.booleans())
    g = (np.stack([np.bincount(x.reshape(-1), minlength=E) for x in ids]) if consistent
         else rng.integers(0, 6, (R, E)) * (rng.random((R, E)) < 0.5))
    return p, g, ids, consistent


@settings(max_examples=50, deadline=None)
@given(problems())
def test_token_side_equals_reference(prob: tuple[Placement, np.ndarray, list[np.ndarray], bool]) -> None:
    p, g, ids, consistent = prob
    table = DispatchTable.from_placement(p, 0)
    gt = torch.as_tensor(g, dtype=torch.int64)
    quotas = plan_quotas(gt, table)
    total = torch.zeros(table.num_slots, dtype=torch.int64)
    for r, x in enumerate(ids):
        xt = torch.as_tensor(x)
        flat = xt.reshape(-1)
        want_occ = torch.tensor(ref_occurrence(flat.tolist()), dtype=torch.int64)
        assert torch.equal(occurrence(flat, p.num_experts), want_occ)
        for method in ("auto", "sort", "dense"):
            assert torch.equal(token_occurrence(xt, p.num_experts, method), want_occ)
        cum = torch.cumsum(source_shares(gt, quotas, table, r), -1)
        want_rep = (cum[flat] <= want_occ.unsqueeze(-1)).sum(-1)
        for method in ("auto", "search", "count"):
            assert torch.equal(balanced_replica(flat, want_occ, cum, method), want_rep)
        want = torch.as_tensor(ref_token_slots(x, table, r, cum.numpy()))
        assert torch.equal(balanced_token_slots(xt, table, r, cum), want)
        got = assign_slots(xt, table, "balanced", rank=r, global_counts=gt)
        assert torch.equal(got, want) and got.dtype == torch.int64
        total += torch.bincount(got.view(-1), minlength=table.num_slots)
        # round-robin from the same occurrence ranks
        rr = table.log2phy[flat, torch.remainder(want_occ + r, table.logcnt[flat])].view(xt.shape)
        assert torch.equal(assign_slots(xt, table, "round-robin", rank=r), rr)
    if consistent:  # every rank's tokens together fill the planned quotas exactly
        planned = torch.zeros(table.num_slots, dtype=torch.int64).scatter_add_(
            0, table.log2phy.clamp(min=0).view(-1), quotas.view(-1))
        assert torch.equal(total, planned)


def test_token_side_methods_reject_unknown_names() -> None:
    ids = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="method"):
        token_occurrence(ids, 3, "radix")
    with pytest.raises(ValueError, match="method"):
        balanced_replica(ids.view(-1), ids.view(-1), torch.zeros(3, 2, dtype=torch.int64), "bisect")


def test_large_cumulative_shares_and_negative_entries_keep_comparisons() -> None:
    # cum_e far above the token count (inconsistent global counts) and below zero: clamping must not change results
    ids = torch.tensor([0, 1, 1, 0, 2, 1])
    occ = occurrence(ids, 3)
    cum = torch.tensor([[-5, 1, 10**12], [0, 0, 2], [3, 3, 3]])
    want = (cum[ids] <= occ.unsqueeze(-1)).sum(-1)
    for method in ("search", "count"):
        assert torch.equal(balanced_replica(ids, occ, cum, method), want)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_token_side_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(5)
    for N, k, E, K in ((0, 8, 256, 13), (1, 1, 3, 2), (256, 8, 256, 13), (2048, 8, 256, 13), (300, 4, 7, 3)):
        ids = torch.as_tensor(rng.integers(0, E, (N, k)))
        occ = token_occurrence(ids, E)
        cum = torch.cumsum(torch.as_tensor(rng.integers(0, 4 * k, (E, K))), -1)
        for method in ("sort", "dense"):
            assert torch.equal(token_occurrence(ids.cuda(), E, method).cpu(), occ)
        for method in ("search", "count"):
            assert torch.equal(balanced_replica(ids.view(-1).cuda(), occ.cuda(), cum.cuda(), method).cpu(),
                               balanced_replica(ids.view(-1), occ, cum, "count"))
