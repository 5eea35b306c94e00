"""Excluded (drained / failed) ranks: the one survivor check and the one "served only there" test.

Every caller that takes ranks out of service -- the policies' ``excluded_ranks=``, the online
balancer's ``drain``, :func:`eplb.online.planning.plan_excluding` and ``recover_placement`` --
validates with :func:`survivors`, so the error reads the same everywhere and says how many slots
are missing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from eplb.errors import InputError
from eplb.placement import Placement

__all__ = ["serves_all", "survivors", "unsafe_layers"]


def survivors(excluded_ranks: Iterable[int] | None, num_experts: int, slots_per_rank: int, num_ranks: int, *,
              what: str = "excluded_ranks") -> tuple[list[int], np.ndarray]:
    """Validate ranks taken out of service; return ``(sorted excluded ranks, [R'] surviving ranks)``.

    Raises ValueError (naming ``what``) when a rank id is out of range, when no rank survives, or
    when the survivors' slots cannot hold every expert, saying how many slots are missing and how
    many slots per rank would suffice.
    """
    ex = sorted({int(r) for r in (excluded_ranks or ())})
    bad = [r for r in ex if r < 0 or r >= num_ranks]
    if bad:
        raise InputError(f"{what}: rank ids {bad} are out of range [0, {num_ranks})")
    alive = np.array([r for r in range(num_ranks) if r not in set(ex)], dtype=np.int64)
    have = int(alive.size) * int(slots_per_rank)
    if have < num_experts:
        need = -(-num_experts // max(1, int(alive.size)))
        raise InputError(
            f"{what}: the remaining {alive.size} ranks have {have} slots per layer but {num_experts} experts must "
            f"stay served: {num_experts - have} slots are missing (needs redundancy: at least {need} slots per rank, "
            f"num_slots >= {num_ranks * need})")
    return ex, alive


def serves_all(rows: np.ndarray, num_experts: int) -> bool:
    """Whether every row ``[S']`` of ``rows`` holds each of the ``num_experts`` experts at least once."""
    return all(len(np.unique(r)) == num_experts for r in np.atleast_2d(rows))


def unsafe_layers(placement: Placement, excluded_ranks: Iterable[int]) -> list[int]:
    """Layer positions where some expert is held only by ``excluded_ranks`` (they cannot leave yet)."""
    ex = {int(r) for r in excluded_ranks}
    if not ex:
        return []
    spr = placement.slots_per_rank
    keep = [r for r in range(placement.num_ranks) if r not in ex]
    if not keep:
        return list(range(placement.num_layers))
    idx = np.concatenate([np.arange(r * spr, (r + 1) * spr) for r in keep])
    E = placement.num_experts
    return [i for i, row in enumerate(placement.phy2log) if len(np.unique(row[idx])) < E]
