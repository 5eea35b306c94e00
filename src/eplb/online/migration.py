"""What to move: the per-layer migration plan (which expert goes from which rank to which slots).

One rule counts "moves" everywhere: a transfer per (destination rank, expert) that the rank does
not hold yet -- what the executor sends (:attr:`LayerMigration.num_transfers`,
:meth:`eplb.Placement.moves`, :func:`eplb.policies.incremental.moves_rows` agree). Staging memory
(:func:`staging_need`) and the chunking under a per-step byte cap (:func:`chunk_size`) are defined
here too, so the runtime's executor and the simulator use the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eplb._checks import ArrayLike, to_numpy
from eplb.errors import InputError

__all__ = ["LayerMigration", "Transfer", "chunk_size", "max_staging_need", "plan_migration", "staging_need"]


@dataclass(frozen=True)
class Transfer:
    """One expert's weights sent from rank ``src`` (its old slot ``src_slot``) to rank ``dst``,
    landing in the global slots ``dst_slots`` (all on ``dst``)."""

    src: int
    dst: int
    expert: int
    src_slot: int
    dst_slots: tuple[int, ...]


@dataclass(frozen=True)
class LayerMigration:
    """How to go from ``old_row`` to ``new_row`` ``[S]`` of one layer.

    ``transfers``: cross-rank copies (one per (destination rank, expert) not already on that rank),
    ordered by ``(dst, expert)``; every rank enumerates them in this order, so sends and receives of a
    rank pair match. ``local_copies``: ``(dst_slot, src_slot)`` pairs on the same rank (the expert is
    already there in another slot). Slots in neither keep their weights.
    """

    layer: int
    old_row: np.ndarray
    new_row: np.ndarray
    num_ranks: int
    transfers: tuple[Transfer, ...]
    local_copies: tuple[tuple[int, int], ...]

    @property
    def slots_per_rank(self) -> int:
        return int(self.new_row.shape[0]) // self.num_ranks

    @property
    def changed_slots(self) -> np.ndarray:
        """``[k]`` global slots whose expert changes."""
        return np.flatnonzero(self.old_row != self.new_row)

    @property
    def num_transfers(self) -> int:
        """Experts sent across ranks (each costs one expert's weight bytes)."""
        return len(self.transfers)

    def bytes_moved(self, bytes_per_expert: int) -> int:
        """Bytes sent across ranks for this layer."""
        return self.num_transfers * int(bytes_per_expert)

    def sends(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.src == rank]

    def recvs(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst == rank]

    def rank_changes(self, rank: int) -> bool:
        """Whether ``rank``'s local slots change (it must stage and commit new weights)."""
        spr = self.slots_per_rank
        return bool(np.any(self.old_row[rank * spr:(rank + 1) * spr] != self.new_row[rank * spr:(rank + 1) * spr]))


def plan_migration(old_row: ArrayLike, new_row: ArrayLike, num_ranks: int, ranks_per_node: int | None = None,
                   *, layer: int = 0) -> LayerMigration:
    """Plan the weight moves of one layer (deterministic: every rank computes the same plan).

    A destination rank that needs expert ``e`` (not on it under ``old_row``) receives it once, even
    for several slots; the source is a rank holding ``e`` under ``old_row``, preferring the
    destination's node, then the rank with the fewest sends so far in this layer (spreading load),
    then the nearest rank id after the destination.
    """
    old = to_numpy(old_row).astype(np.int64).ravel()
    new = to_numpy(new_row).astype(np.int64).ravel()
    if old.shape != new.shape:
        raise InputError(f"new_row: {new.shape[0]} slots, old_row has {old.shape[0]}")
    S, R = old.shape[0], int(num_ranks)
    if R < 1 or S % R:
        raise InputError(f"num_ranks: {S} slots are not divisible by {R} ranks")
    spr = S // R
    rpn = int(ranks_per_node) if ranks_per_node else R
    if R % rpn:
        raise InputError(f"ranks_per_node: {R} ranks are not divisible by {rpn}")
    holders: dict[int, list[int]] = {}
    first_slot: dict[tuple[int, int], int] = {}
    for s, e in enumerate(old.tolist()):
        r = s // spr
        if (e, r) not in first_slot:
            first_slot[(e, r)] = s
            holders.setdefault(e, []).append(r)
    missing = sorted(set(new.tolist()) - set(holders))
    if missing:
        raise InputError(f"new_row: experts {missing[:8]} are not held by any rank under old_row (cannot be sourced)")
    sends = [0] * R
    transfers: list[Transfer] = []
    local: list[tuple[int, int]] = []
    for d in range(R):
        sl = slice(d * spr, (d + 1) * spr)
        old_d, new_d = old[sl], new[sl]
        need: dict[int, list[int]] = {}
        for j in range(spr):
            e = int(new_d[j])
            if e == old_d[j]:
                continue
            s = d * spr + j
            if (e, d) in first_slot:
                local.append((s, first_slot[(e, d)]))
            else:
                need.setdefault(e, []).append(s)
        for e in sorted(need):
            cands = holders[e]
            same = [c for c in cands if c // rpn == d // rpn]
            pool = same if same else cands
            src = min(pool, key=lambda c: (sends[c], (c - d) % R))
            sends[src] += 1
            transfers.append(Transfer(src, d, e, first_slot[(e, src)], tuple(need[e])))
    return LayerMigration(int(layer), old, new, R, tuple(transfers), tuple(local))



def staging_need(mig: LayerMigration, rank: int, bytes_per_expert: int) -> int:
    """Staging bytes ``rank`` needs for ``mig``: experts it receives plus experts it moves between its
    own slots (gathered before any slot is overwritten)."""
    spr = mig.slots_per_rank
    n_local = sum(1 for d, _ in mig.local_copies if d // spr == rank)
    return (len(mig.recvs(rank)) + n_local) * int(bytes_per_expert)


def max_staging_need(migs: Sequence[LayerMigration], bytes_per_expert: int) -> int:
    """The largest staging any rank needs for ``migs`` in flight together (the same on every rank)."""
    if not migs:
        return 0
    R = migs[0].num_ranks
    return max(sum(staging_need(m, r, bytes_per_expert) for m in migs) for r in range(R))


def chunk_size(todo: int, max_bytes: int | None, bytes_per_expert: int) -> int:
    """Transfers posted in one step out of ``todo`` left: all of them without a cap, else as many as
    ``max_bytes`` (all ranks together) allows, at least one."""
    if todo <= 0:
        return 0
    if max_bytes is None:
        return int(todo)
    return max(1, min(int(todo), int(max_bytes) // max(1, int(bytes_per_expert))))
