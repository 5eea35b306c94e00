"""Ranks that disagree or stall: a clear error on every (surviving) rank within seconds, never a hang.

gloo, 2-3 processes. A rank with a different BalancerConfig makes OnlineBalancer raise AgreementError
on every rank at construction; a rank that stops calling the balancer's collectives makes the others
raise StalledRankError naming it within ``collective_timeout_s`` (+ a grace of at most 2 s).
"""

from __future__ import annotations

import time

import pytest
import torch

from eplb import Placement
from eplb.runtime._watchdog import CollectiveWatchdog, StalledRankError
from eplb.runtime.balancer import OnlineBalancer
from eplb.runtime.distributed import AgreementError
from eplb.runtime.layer import ExpertParallelMoE
from eplb.runtime.manager import BalancerConfig
from eplb.runtime.testing import run_distributed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
H, INTER, L, E = 8, 4, 2, 4


def _layers(world: int) -> list[ExpertParallelMoE]:
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(L, E, 2 * INTER, H, generator=g)
    w2 = torch.randn(L, E, H, INTER, generator=g)
    pl = Placement.contiguous(L, E, world, 2 * world)
    return [ExpertParallelMoE.from_full_weights(w13[i], w2[i], pl, i) for i in range(L)]


def _config(**kw: object) -> BalancerConfig:
    base = dict(num_wait_worker_iterations=0, num_iterations_eplb_update=4, window_size=4, policy="eplb",
                policy_backend="inline", collective_timeout_s=2.0)
    base.update(kw)
    return BalancerConfig(**base)  # type: ignore[arg-type]


def _mismatch_worker(rank: int, world: int, field: str, values: list[object]) -> dict[str, object]:
    t0 = time.monotonic()
    try:
        OnlineBalancer(_layers(world), _config(**{field: values[rank]}), metrics=False)
    except AgreementError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


@pytest.mark.parametrize(("field", "values"), [("layer_updates_per_iter", [1, 2]),
                                               ("max_staging_bytes", [None, 1 << 20])])
def test_mismatched_config_raises_on_every_rank(field: str, values: list[object]) -> None:
    res = run_distributed(_mismatch_worker, 2, field, values, timeout_s=60)
    for rank, r in enumerate(res):
        assert r["error"] is not None, f"rank {rank} accepted a configuration rank {1 - rank} does not share"
        assert field in r["error"] and "ranks [1]" in r["error"]
        assert r["seconds"] < 10


def test_same_config_is_accepted_and_local_fields_may_differ() -> None:
    res = run_distributed(_mismatch_worker, 2, "log_interval", [0, 5], timeout_s=60)
    assert [r["error"] for r in res] == [None, None]


def _stall_worker(rank: int, world: int, stall_rank: int, deadline: float) -> dict[str, object]:
    bal = OnlineBalancer(_layers(world), _config(collective_timeout_s=deadline), metrics=False)
    t_last = time.monotonic()
    for step in range(40):
        if rank == stall_rank and step == 3:
            time.sleep(deadline + 3)  # alive, but not calling the balancer's collectives
            return {"stalled": True}
        try:
            bal.step()
        except StalledRankError as exc:
            return {"error": str(exc), "ranks": list(exc.ranks), "after": time.monotonic() - t_last}
        t_last = time.monotonic()
    return {"error": None}


@pytest.mark.parametrize("world", [2, 3])
def test_stalled_rank_is_named_on_every_survivor_within_the_deadline(world: int) -> None:
    deadline = 2.0
    stall = world - 1
    res = run_distributed(_stall_worker, world, stall, deadline, timeout_s=90)
    for rank, r in enumerate(res):
        if rank == stall:
            assert r == {"stalled": True}
            continue
        assert r["error"] is not None, f"rank {rank} never noticed the stalled rank"
        assert r["ranks"] == [stall] and f"rank {stall} stopped answering" in r["error"]
        assert r["after"] < deadline + 3.0  # deadline + grace (<= 2 s) + one step


def test_watchdog_rejects_a_bad_deadline_and_config_field() -> None:
    with pytest.raises(ValueError, match="deadline_s"):
        CollectiveWatchdog(0, 2, 0.0)
    with pytest.raises(ValueError, match="collective_timeout_s"):
        BalancerConfig(collective_timeout_s=0)
    with pytest.raises(ValueError, match="metrics_addr"):
        BalancerConfig(metrics_addr="")


def test_metrics_bind_localhost_by_default() -> None:
    from eplb.runtime.metrics_export import BalancerMetrics

    assert BalancerConfig().metrics_addr == "127.0.0.1"
    m = BalancerMetrics((0,))
    m.serve(0)
    try:
        srv = m._server[0] if isinstance(m._server, tuple) else m._server
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        m.close()
