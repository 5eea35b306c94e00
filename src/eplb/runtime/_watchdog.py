"""A deadline on eplb's own collectives: a stalled peer becomes an error on every surviving rank.

A rank that is alive but stops calling collectives (a hung forward, a debugger, a livelock) makes the
others wait in the next collective until the process group's timeout (30 minutes by default for
``torch.distributed``), and nothing says which rank it was. :class:`CollectiveWatchdog` waits for an
eplb collective by polling ``work.is_completed()`` up to ``deadline_s`` (default 60 s). When the
deadline passes, every waiting rank writes "rank R waits at collective #k" into the process group's
key-value store, waits a short grace period for the other survivors to do the same, and raises
:class:`StalledRankError` naming the ranks that did not: those are the ones that stopped answering.
Every rank counts its eplb collectives the same way (they are called in the same order on every
rank), so ``#k`` identifies the same collective everywhere.

Waiting costs nothing while collectives finish on time: no store traffic, one ``is_completed()`` per
wait (the balancer waits for a collective one step after launching it, when it has long finished).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

__all__ = ["DEFAULT_DEADLINE_S", "CollectiveWatchdog", "StalledRankError"]

DEFAULT_DEADLINE_S = 60.0
_instances = itertools.count()


class StalledRankError(RuntimeError):
    """A peer stopped answering an eplb collective within the watchdog's deadline.

    Attributes:
        ranks: the ranks (in the group) that did not reach the collective (empty when unknown).
        collective: what was waited for.
    """

    def __init__(self, msg: str, ranks: tuple[int, ...] = (), collective: str = "") -> None:
        super().__init__(msg)
        self.ranks = ranks
        self.collective = collective


def _default_store() -> Any:
    try:
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: stalled ranks cannot be named, only detected
        return None


class CollectiveWatchdog:
    """Wait for eplb collectives with a deadline (see the module doc).

    Args:
        rank, world: this process's rank and the group size.
        deadline_s: seconds a collective may take before the peers that did not reach it are reported.
        name: what the collectives belong to (in messages and store keys).
        store: a ``torch.distributed`` store shared by the ranks (default: the default group's).
        grace_s: how long a rank that timed out waits for the other survivors to report (default:
            ``min(2, deadline_s / 4)`` s).
    """

    def __init__(self, rank: int, world: int, deadline_s: float = DEFAULT_DEADLINE_S, *, name: str = "eplb",
                 store: Any = None, grace_s: float | None = None, global_ranks: list[int] | None = None) -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s: expected a positive number of seconds, got {deadline_s!r}")
        self.rank, self.world = int(rank), int(world)
        self.deadline_s = float(deadline_s)
        self.grace_s = float(grace_s) if grace_s is not None else min(2.0, self.deadline_s / 4)
        self.name = name
        self.store = store if store is not None else (_default_store() if world > 1 else None)
        self.global_ranks = global_ranks
        self._prefix = f"eplb-watchdog/{name}/{next(_instances)}"
        self.seq = 0

    def next_seq(self) -> int:
        """Number the next collective (call once per collective, on every rank, in the same order)."""
        self.seq += 1
        return self.seq

    def wait(self, work: Any, what: str, seq: int | str | None = None) -> None:
        """Wait for ``work`` (a ``torch.distributed`` Work) up to the deadline; raise :class:`StalledRankError`
        naming the ranks that did not reach collective ``seq`` (default: the last numbered one)."""
        self.wait_all([work], what, seq)

    def wait_all(self, works: Iterable[Any], what: str, seq: int | str | None = None, *, p2p: bool = False) -> None:
        """Wait for every work of ``works`` within one deadline. ``p2p``: point-to-point works (gloo's
        ``isend`` / ``irecv`` do not report completion before ``wait``), waited with ``wait(timeout)``."""
        works = [w for w in works if w is not None]
        if not works:
            return
        s = self.seq if seq is None else seq
        t0 = time.monotonic()
        deadline = t0 + self.deadline_s
        pause = 0.0002
        for w in works:
            if p2p:
                left = deadline - time.monotonic()
                try:
                    w.wait(timeout=timedelta(seconds=max(left, 0.001)))
                except RuntimeError as exc:
                    if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                        raise
                    self._report(what, s)
                continue
            while not w.is_completed():
                now = time.monotonic()
                if now >= deadline:
                    self._report(what, s)
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
            w.wait()  # re-raises a failed collective (a dead peer: the backend's own error)

    def _report(self, what: str, seq: int | str) -> None:
        who = f"rank {self.rank}" if self.global_ranks is None else f"rank {self.rank} (global {self.global_ranks[self.rank]})"
        base = (f"{self.name}: {what} (collective #{seq}) did not complete within {self.deadline_s:g} s on {who}")
        if self.store is None:
            raise StalledRankError(f"{base}; a peer stopped answering (no store to tell which)", (), what)
        key = f"{self._prefix}/{seq}"
        try:
            self.store.set(f"{key}/{self.rank}", b"1")
            keys = [f"{key}/{r}" for r in range(self.world)]
            end = time.monotonic() + self.grace_s
            while True:
                here = [r for r in range(self.world) if self.store.check([keys[r]])]
                if len(here) == self.world or time.monotonic() >= end:
                    break
                time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - the store itself is gone (rank 0 died)
            raise StalledRankError(f"{base}; a peer stopped answering (store unreachable: {exc})", (), what) from None
        missing = tuple(r for r in range(self.world) if r not in here)
        if not missing:
            raise StalledRankError(f"{base}; every rank reached it, but it did not complete", (), what)
        names = ", ".join(str(r) for r in missing)
        raise StalledRankError(
            f"{base}: rank{'s' if len(missing) > 1 else ''} {names} stopped answering (never reached it; "
            f"{len(here)} of {self.world} ranks did)", missing, what)
