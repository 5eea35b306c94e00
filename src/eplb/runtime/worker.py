"""The policy worker: runs :func:`eplb.online.planning.compute_plan` off the serving loop's critical path."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

from eplb.errors import InputError
from eplb.online.config import POLICY_BACKENDS
from eplb.online.planning import PlanRequest, PlanResult, compute_plan

__all__ = ["PolicyWorker"]


def _warm_up(strategy: str | None) -> None:
    """Imports a policy run needs (run once in the worker at start)."""
    import scipy.optimize  # noqa: F401

    import eplb.policies  # noqa: F401

    if strategy not in (None, "uniform", "round-robin"):  # these two split without eplb.dispatch
        import eplb.dispatch  # noqa: F401


class PolicyWorker:
    """Runs :func:`compute_plan` off the critical path: ``"thread"`` (a daemon thread), ``"process"``
    (a spawned process: no GIL contention with the step loop) or ``"inline"`` (synchronous).

    ``submit`` never blocks on the computation; ``poll`` returns the finished result once (or None)
    and re-raises the policy's exception.
    """

    def __init__(self, backend: str = "thread") -> None:
        if backend not in POLICY_BACKENDS:
            raise InputError(f"policy_backend: expected one of {list(POLICY_BACKENDS)}, got {backend!r}")
        self.backend = backend
        self._pool: cf.Executor | None = None
        self._future: cf.Future[PlanResult] | None = None
        self._inline: PlanResult | None = None
        self._inline_exc: BaseException | None = None
        self._warm: cf.Future[None] | None = None

    @property
    def busy(self) -> bool:
        """A submitted plan has not been collected by :meth:`poll` yet."""
        return self._future is not None or self._inline is not None or self._inline_exc is not None

    def start(self, strategy: str | None = None) -> None:
        """Start the worker now (a process pays its start-up and imports here, not at the first plan)."""
        if self.backend == "inline" or self._pool is not None:
            return
        self._ensure_pool()
        assert self._pool is not None
        self._warm = self._pool.submit(_warm_up, strategy)

    def ready(self, timeout: float | None = None) -> bool:
        """Block until :meth:`start`'s warm-up finished (benchmarks: keep process start-up out of timed steps)."""
        if self._warm is None:
            return True
        cf.wait([self._warm], timeout=timeout)
        if self._warm.done():
            self._warm.result()  # re-raise a failed start
            return True
        return False

    def _ensure_pool(self) -> None:
        if self._pool is None:
            if self.backend == "thread":
                self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-policy")
            else:
                self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))

    def submit(self, req: PlanRequest) -> None:
        if self.busy:
            raise RuntimeError("PolicyWorker: a plan is already in progress")
        if self.backend == "inline":
            try:
                self._inline = compute_plan(req)
            except Exception as exc:  # noqa: BLE001 - re-raised by poll()
                self._inline_exc = exc
            return
        self._ensure_pool()
        assert self._pool is not None
        self._future = self._pool.submit(compute_plan, req)

    def done(self) -> bool:
        """Whether the submitted plan finished (never blocks)."""
        if self._inline is not None or self._inline_exc is not None:
            return True
        return self._future is not None and self._future.done()

    def poll(self) -> PlanResult | None:
        """The finished result (once), ``None`` while running or idle; re-raises a policy failure."""
        if self._inline_exc is not None:
            exc, self._inline_exc = self._inline_exc, None
            raise exc
        if self._inline is not None:
            res, self._inline = self._inline, None
            return res
        if self._future is None or not self._future.done():
            return None
        fut, self._future = self._future, None
        return fut.result()

    def wait(self, timeout: float | None = None) -> PlanResult | None:
        """Block until the submitted plan finishes (tests and shutdown only)."""
        if self._future is not None:
            cf.wait([self._future], timeout=timeout)
        return self.poll()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._future = None
