"""Fused Triton token -> slot kernels (balanced, round-robin) == the torch reference of assign_slots.

On CUDA the kernels run natively (hypothesis + adversarial cases); on a CPU-only machine one test runs
the same kernels in Triton's interpreter (``TRITON_INTERPRET=1``, a subprocess) on small cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb import Placement
from eplb.dispatch import DispatchTable, assign_slots

CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False


def _placement(rng: np.random.Generator, R: int, spr: int, E: int, N: int = 1, hot: int | None = None) -> Placement:
    S = R * spr
    extra = rng.integers(0, E, S - E) if hot is None else np.full(S - E, hot)
    row = np.concatenate([np.arange(E), extra])
    rng.shuffle(row)
    return Placement(row[None], E, R, N)


def _consistent_ids(g: np.ndarray, rank: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """This rank's [n, k] ids whose per-expert counts are exactly g[rank] (padded with a repeated expert)."""
    ids = np.repeat(np.arange(g.shape[1]), g[rank])
    rng.shuffle(ids)
    n = -(-ids.size // k) if ids.size else 0
    pad = n * k - ids.size
    return torch.as_tensor(np.concatenate([ids, np.zeros(pad, dtype=np.int64)]).reshape(n, k))


def check_case(rng: np.random.Generator, R: int, spr: int, E: int, k: int, n_tok: int, mode: str,
               device: str) -> None:
    hot = int(rng.integers(0, E)) if mode == "hot" else None
    p = _placement(rng, R, spr, E, N=2 if R % 2 == 0 else 1, hot=hot)
    cpu = DispatchTable.from_placement(p, 0)
    dev = cpu.to(device)
    if mode == "one-expert":  # every entry of every rank to one (replicated) expert
        e = int(np.bincount(p.phy2log[0], minlength=E).argmax())
        ids_all = [torch.full((n_tok, k), e, dtype=torch.int64) for _ in range(R)]
    else:
        ids_all = [torch.as_tensor(rng.integers(0, E, (n_tok, k))) for _ in range(R)]
        if mode == "hot":
            for t in ids_all:
                t[rng.random(t.shape) < 0.6] = hot
    g = torch.stack([torch.bincount(t.reshape(-1), minlength=E) for t in ids_all])
    if mode == "inconsistent":  # counts that do not match the ids: entries past the shares fall back
        g = torch.as_tensor(rng.integers(0, 3, (R, E)))
    for r in range(R):
        for strat in ("balanced", "round-robin"):
            ref = assign_slots(ids_all[r], cpu, strat, rank=r, global_counts=g, backend="torch")
            got = assign_slots(ids_all[r].to(device), dev, strat, rank=r, global_counts=g.to(device),
                               backend="triton")
            assert torch.equal(ref, got.cpu()), (strat, r, mode)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs CUDA and Triton")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(R=st.integers(1, 9), spr=st.integers(1, 5), k=st.integers(1, 8), n_tok=st.integers(0, 700),
       mode=st.sampled_from(["random", "hot", "one-expert", "inconsistent"]), seed=st.integers(0, 2**31 - 1))
def test_fused_equals_reference_cuda(R: int, spr: int, k: int, n_tok: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    E = int(rng.integers(max(1, R * spr // 2), R * spr + 1))
    check_case(rng, R, spr, E, k, n_tok, mode, "cuda")


@pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("R,n_tok", [(72, 256), (36, 2048), (72, 2048)])
def test_fused_equals_reference_deepseek_shape_cuda(R: int, n_tok: int) -> None:
    """DeepSeek-V3 shape (E=256, S=288, top-8) as in the budget; several token blocks per expert program."""
    rng = np.random.default_rng(R + n_tok)
    p = _placement(rng, R, 288 // R, 256)
    cpu = DispatchTable.from_placement(p, 0)
    dev = cpu.to("cuda")
    w = rng.zipf(1.3, 256).astype(float)
    ids = [torch.as_tensor(rng.choice(256, (n_tok, 8), p=w / w.sum())) for _ in range(R)]
    g = torch.stack([torch.bincount(t.reshape(-1), minlength=256) for t in ids])
    for r in (0, R // 2, R - 1):
        for strat in ("balanced", "round-robin"):
            ref = assign_slots(ids[r], cpu, strat, rank=r, global_counts=g, backend="torch")
            for block in (None, 128):
                from eplb.dispatch.kernel import fused_token_slots

                got = fused_token_slots(ids[r].cuda(), dev, strat, r, g.cuda(), token_block=block)
                assert torch.equal(ref, got.cpu()), (strat, r, block)
            for nw in (1, 2, 8):  # the plan kernel's warps change nothing in the result
                from eplb.dispatch.kernel import fused_token_slots

                got = fused_token_slots(ids[r].cuda(), dev, strat, r, g.cuda(), num_warps=nw)
                assert torch.equal(ref, got.cpu()), (strat, r, nw)


@pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs CUDA and Triton")
def test_fused_balanced_captures_in_a_cuda_graph() -> None:
    rng = np.random.default_rng(3)
    p = _placement(rng, 8, 4, 24)
    cpu = DispatchTable.from_placement(p, 0)
    dev = cpu.to("cuda")
    ids = torch.as_tensor(rng.integers(0, 24, (300, 4))).cuda()
    g = torch.as_tensor(rng.integers(0, 200, (8, 24))).cuda()
    g[3] = torch.bincount(ids.reshape(-1), minlength=24)
    out = assign_slots(ids, dev, "balanced", rank=3, global_counts=g)  # compile + warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = assign_slots(ids, dev, "balanced", rank=3, global_counts=g)
    for _ in range(3):
        ids.copy_(torch.as_tensor(rng.integers(0, 24, (300, 4))))
        g.copy_(torch.as_tensor(rng.integers(0, 200, (8, 24))))
        g[3] = torch.bincount(ids.reshape(-1), minlength=24)
        graph.replay()
        ref = assign_slots(ids.cpu(), cpu, "balanced", rank=3, global_counts=g.cpu(), backend="torch")
        assert torch.equal(ref, out.cpu())


@pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs CUDA and Triton")
@settings(max_examples=25, deadline=None)
@given(R=st.integers(1, 72), spr=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), arbitrary=st.booleans())
def test_balanced_send_matrix_kernel_equals_reference_cuda(R: int, spr: int, seed: int, arbitrary: bool) -> None:
    from eplb.dispatch import plan_quotas, send_matrix

    rng = np.random.default_rng(seed)
    E = int(rng.integers(max(1, R * spr // 2), R * spr + 1))
    p = _placement(rng, R, spr, E)
    cpu = DispatchTable.from_placement(p, 0)
    dev = cpu.to("cuda")
    g = torch.as_tensor(rng.integers(0, 3000, (R, E)))
    q = plan_quotas(g, cpu, backend="torch")
    if arbitrary:  # any quotas, not only the plan's (the kernel must follow source_shares for every input)
        q = torch.where(cpu.log2phy >= 0, torch.as_tensor(rng.integers(0, 500, q.shape)), 0)
    ref = send_matrix(g, cpu, "balanced", quotas=q, backend="torch")
    got = send_matrix(g.cuda(), dev, "balanced", quotas=q.cuda())
    assert torch.equal(ref, got.cpu())
    if not arbitrary:
        assert torch.equal(ref, send_matrix(g.cuda(), dev, "balanced").cpu())


# ----------------------------------------------------------------------------- CPU: Triton's interpreter
_INTERP = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_dispatch_fused import _placement, check_case
rng = np.random.default_rng(7)
for R, spr, E, k, n, mode in [(4, 3, 10, 2, 40, "random"), (3, 2, 5, 3, 33, "hot"), (2, 3, 4, 1, 50, "one-expert"),
                              (5, 2, 7, 2, 20, "inconsistent"), (1, 2, 2, 2, 9, "random"), (3, 1, 3, 2, 0, "random"),
                              (6, 4, 12, 2, 30, "random"), (4, 5, 9, 3, 40, "hot")]:  # several colours
    check_case(rng, R, spr, E, k, n, mode, "cpu")
# the plan kernel alone (all experts in one program, every colour count), batched over layers
import torch
from eplb.dispatch import DispatchTable, plan_quotas, source_shares
from eplb.dispatch.kernel import rank_share_cum_triton
colours = set()
for R, spr, E in ((4, 3, 10), (6, 4, 12), (5, 4, 8), (3, 1, 3)):
    for _ in range(2):
        p = _placement(rng, R, spr, E)
        tab = DispatchTable.from_placement(p, 0)
        colours.add(int(tab.num_colors))
        g = torch.as_tensor(rng.integers(0, 30, (R, E)))
        q = plan_quotas(g, tab, backend="torch")
        assert torch.equal(plan_quotas(g, tab, backend="triton"), q), (R, spr, E)
        for r in (0, R - 1):
            q2, cum = rank_share_cum_triton(g, tab, r)
            assert torch.equal(q2, q) and torch.equal(cum, torch.cumsum(source_shares(g, q, tab, r), -1))
assert 1 in colours and max(colours) >= 3, colours
# the balanced send matrix kernel: the plan's quotas and arbitrary quotas (any split of the counts)
from eplb.dispatch import send_matrix
from eplb.dispatch.kernel import balanced_send_matrix_triton
for R, spr, E in ((4, 3, 10), (6, 4, 12), (1, 2, 2), (3, 1, 3)):
    p = _placement(rng, R, spr, E)
    tab = DispatchTable.from_placement(p, 0)
    g = torch.as_tensor(rng.integers(0, 30, (R, E)))
    ref = send_matrix(g, tab, "balanced", backend="torch")
    assert torch.equal(send_matrix(g, tab, "balanced", backend="triton"), ref), (R, spr, E)
    q = plan_quotas(g, tab, backend="torch")
    q = torch.where(tab.log2phy >= 0, torch.as_tensor(rng.integers(0, 20, q.shape)), 0)
    assert torch.equal(balanced_send_matrix_triton(g, tab, q), send_matrix(g, tab, "balanced", quotas=q, backend="torch"))
print("interpreted kernels ok")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
@pytest.mark.skipif(CUDA, reason="CPU check: on a GPU the native tests above cover the kernels (the GPU image's Triton "
                    "interpreter rejects 0-d loop bounds)")
def test_fused_kernels_in_triton_interpreter_equal_reference() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests = str(Path(__file__).parent)
    res = subprocess.run([sys.executable, "-c", _INTERP.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "interpreted kernels ok" in res.stdout


# ----------------------------------------------------------------------------- send matrix (CPU)
@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 7), spr=st.integers(1, 4), k=st.integers(1, 4), n_tok=st.integers(0, 40),
       strategy=st.sampled_from(["local-first", "round-robin", "balanced"]), seed=st.integers(0, 2**31 - 1))
def test_send_matrix_equals_every_ranks_assignment(R: int, spr: int, k: int, n_tok: int, strategy: str,
                                                   seed: int) -> None:
    from eplb.dispatch import send_matrix

    rng = np.random.default_rng(seed)
    E = int(rng.integers(max(1, R * spr // 2), R * spr + 1))
    p = _placement(rng, R, spr, E, N=2 if R % 2 == 0 else 1)
    tab = DispatchTable.from_placement(p, 0)
    ids = [torch.as_tensor(rng.integers(0, E, (int(rng.integers(0, n_tok + 1)), k))) for _ in range(R)]
    g = torch.stack([torch.bincount(t.reshape(-1), minlength=E) for t in ids])
    m = send_matrix(g, tab, strategy)
    for r in range(R):
        slots = assign_slots(ids[r], tab, strategy, rank=r, global_counts=g)
        assert torch.equal(m[r], torch.bincount(slots.reshape(-1), minlength=R * spr)), r


# ----------------------------------------------------------------------------- shared plan, solver shortcut (CPU)
def test_assign_slots_quotas_out_is_the_plan_and_send_matrix_reuses_it() -> None:
    from eplb.dispatch import plan_quotas, send_matrix

    rng = np.random.default_rng(5)
    p = _placement(rng, 4, 3, 9)
    tab = DispatchTable.from_placement(p, 0)
    ids = [torch.as_tensor(rng.integers(0, 9, (int(rng.integers(0, 30)), 2))) for _ in range(4)]
    g = torch.stack([torch.bincount(t.reshape(-1), minlength=9) for t in ids])
    q = torch.full(tab.log2phy.shape, -7, dtype=torch.int64)
    slots = assign_slots(ids[1], tab, "balanced", rank=1, global_counts=g, quotas_out=q)
    assert torch.equal(q, plan_quotas(g, tab))
    assert torch.equal(slots, assign_slots(ids[1], tab, "balanced", rank=1, global_counts=g))
    assert torch.equal(send_matrix(g, tab, "balanced", quotas=q), send_matrix(g, tab, "balanced"))
    with pytest.raises(ValueError, match="quotas_out"):
        assign_slots(ids[1], tab, "round-robin", rank=1, global_counts=g, quotas_out=q)
    with pytest.raises(ValueError, match="quotas_out"):
        assign_slots(ids[1], tab, "balanced", rank=1, global_counts=g, quotas_out=q[:, :1].contiguous())


@settings(max_examples=60, deadline=None)
@given(R=st.integers(2, 12), spr=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([3, 40, 1000]))
def test_one_colour_needs_one_whole_token_sweep(R: int, spr: int, seed: int, scale: int) -> None:
    """The kernels' shortcut (eplb.dispatch.kernel._effective_sweeps): with one colour the full solver settings
    and a single whole-token sweep from the uniform split give the same quotas."""
    from eplb.dispatch.kernel import _effective_sweeps
    from eplb.dispatch.solver import balanced_quotas

    rng = np.random.default_rng(seed)
    E = int(rng.integers(max(1, R * spr // 2), R * spr + 1))
    tab = DispatchTable.from_placement(_placement(rng, R, spr, E), 0)
    c = torch.as_tensor(rng.integers(0, scale, (3, E)))
    args = (c, tab.fl_expert, tab.fl_rank, tab.color_members, tab.single_rank, R)
    fb, sw, isw = _effective_sweeps(tab.num_colors, 8, 6, 2)
    if tab.num_colors != 1:
        assert (fb, sw, isw) == (8, 6, 2)
        return
    assert (fb, sw, isw) == (0, 0, 1)
    assert torch.equal(balanced_quotas(*args), balanced_quotas(*args, frac_bits=fb, sweeps=sw, int_sweeps=isw))
