"""The :class:`Placement`: which logical expert sits in which physical slot, per MoE layer.

Terminology (shared by the whole package):

* ``L`` MoE layers, ``E`` logical experts per layer, ``S`` physical slots per layer,
  ``R`` ranks (EP size, GPUs), ``N`` nodes.
* Slots are laid out rank-major: rank ``r`` owns slots ``r*spr .. (r+1)*spr-1`` with
  ``spr = S // R`` slots per rank; node ``n`` owns ranks ``n*(R//N) .. (n+1)*(R//N)-1``.
  This is the layout of DeepSeek's ``eplb.py``, TensorRT-LLM's ``initial_global_assignments``,
  SGLang's and vLLM's ``physical_to_logical_map`` and vllm-ascend's ``device_expert`` lists.

Three equivalent forms (all ``int64``):

* ``phy2log`` ``[L, S]``: the logical expert held by each physical slot (the canonical form);
* ``log2phy`` ``[L, E, max_replicas]``: the slots of each expert, ascending, padded with ``-1``;
* ``logcnt`` ``[L, E]``: the replica count of each expert.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_positive_int, to_numpy
from eplb.errors import PlacementError

__all__ = ["Placement", "PlacementError"]




@dataclass(frozen=True, eq=False)
class Placement:
    """An expert placement for every MoE layer of a model.

    Args:
        phy2log: ``[L, S]`` logical expert id of each physical slot.
        num_experts: ``E``, logical experts per layer.
        num_ranks: ``R``, ranks (EP size); must divide ``S``.
        num_nodes: ``N``, nodes; must divide ``R``.
        layer_ids: model layer index of each of the ``L`` MoE layers (default ``0..L-1``).
        meta: provenance (policy, parameters, trace hash, bound, ...); JSON-serialisable.

    The object is immutable; construction validates it (see :meth:`validate`).
    """

    phy2log: np.ndarray
    num_experts: int
    num_ranks: int
    num_nodes: int = 1
    layer_ids: tuple[int, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = to_numpy(self.phy2log)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise PlacementError(f"phy2log: expected a [layers, slots] array, got shape {tuple(arr.shape)}")
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            elif arr.size:
                raise PlacementError(f"phy2log: expected integer expert ids, got dtype {arr.dtype}")
        arr = np.array(arr, dtype=np.int64, order="C", copy=True)  # own copy: never freeze the caller's array
        arr.setflags(write=False)
        object.__setattr__(self, "phy2log", arr)
        object.__setattr__(self, "num_experts", check_positive_int(self.num_experts, "num_experts"))
        object.__setattr__(self, "num_ranks", check_positive_int(self.num_ranks, "num_ranks"))
        object.__setattr__(self, "num_nodes", check_positive_int(self.num_nodes, "num_nodes"))
        ids = tuple(int(i) for i in self.layer_ids) if len(self.layer_ids) else tuple(range(arr.shape[0]))
        object.__setattr__(self, "layer_ids", ids)
        object.__setattr__(self, "meta", dict(self.meta))
        self.validate()

    # ------------------------------------------------------------------ sizes
    @property
    def num_layers(self) -> int:
        """``L``."""
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        """``S``, physical slots per layer."""
        return int(self.phy2log.shape[1])

    @property
    def slots_per_rank(self) -> int:
        """``S // R``."""
        return self.num_slots // self.num_ranks

    @property
    def ranks_per_node(self) -> int:
        """``R // N``."""
        return self.num_ranks // self.num_nodes

    @property
    def num_redundant(self) -> int:
        """``S - E``, redundant slots per layer."""
        return self.num_slots - self.num_experts

    # ------------------------------------------------------------------ forms
    @property
    def logcnt(self) -> np.ndarray:
        """``[L, E]`` replica count of each expert."""
        L, E = self.num_layers, self.num_experts
        cnt = np.zeros((L, E), dtype=np.int64)
        np.add.at(cnt, (np.repeat(np.arange(L), self.num_slots), self.phy2log.ravel()), 1)
        return cnt

    @property
    def max_replicas(self) -> int:
        """Largest replica count of any expert in any layer."""
        return int(self.logcnt.max())

    @property
    def log2phy(self) -> np.ndarray:
        """``[L, E, max_replicas]`` slots of each expert in ascending slot order, padded with ``-1``."""
        L, S, E = self.num_layers, self.num_slots, self.num_experts
        cnt = self.logcnt
        width = int(cnt.max())
        out = np.full((L, E, width), -1, dtype=np.int64)
        order = np.argsort(self.phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending
        sorted_exp = np.take_along_axis(self.phy2log, order, axis=1)
        starts = np.cumsum(cnt, axis=1) - cnt  # first position of each expert in the sorted list
        rank_in_expert = np.arange(S)[None, :] - np.take_along_axis(starts, sorted_exp, axis=1)
        out[np.arange(L)[:, None], sorted_exp, rank_in_expert] = order
        return out

    def slot_rank(self) -> np.ndarray:
        """``[S]`` rank that owns each slot."""
        return np.arange(self.num_slots) // self.slots_per_rank

    def slot_node(self) -> np.ndarray:
        """``[S]`` node that owns each slot."""
        return self.slot_rank() // self.ranks_per_node

    def rank_experts(self) -> np.ndarray:
        """``[L, R, S//R]`` logical expert at each local slot of each rank."""
        return self.phy2log.reshape(self.num_layers, self.num_ranks, self.slots_per_rank)

    def expert_rank_count(self) -> np.ndarray:
        """``[L, E, R]`` replicas of expert ``e`` on rank ``r``."""
        L, E, R = self.num_layers, self.num_experts, self.num_ranks
        out = np.zeros((L, E, R), dtype=np.int64)
        np.add.at(out, (np.repeat(np.arange(L), self.num_slots), self.phy2log.ravel(), np.tile(self.slot_rank(), L)), 1)
        return out

    def colocated_duplicates(self) -> np.ndarray:
        """``[L]`` number of surplus replicas that share a rank with another replica of the same expert."""
        erc = self.expert_rank_count()
        return np.clip(erc - 1, 0, None).sum(axis=(1, 2))

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_log2phy(
        cls,
        log2phy: ArrayLike,
        num_ranks: int,
        num_nodes: int = 1,
        *,
        num_slots: int | None = None,
        layer_ids: Sequence[int] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> Placement:
        """Build from a ``[L, E, K]`` ``log2phy`` table padded with ``-1``."""
        arr = to_numpy(log2phy).astype(np.int64)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise PlacementError(f"log2phy: expected a [layers, experts, max_replicas] array, got shape {arr.shape}")
        L, E, _ = arr.shape
        valid = arr >= 0
        S = int(num_slots) if num_slots is not None else int(arr.max()) + 1
        counts = valid.sum(axis=(1, 2))
        if np.any(counts != S):
            layer = int(np.argmax(counts != S))
            raise PlacementError(f"log2phy: layer {layer} lists {counts[layer]} slots, expected {S}")
        if np.any(arr >= S):
            raise PlacementError(f"log2phy: slot ids must be < num_slots={S}, found {int(arr.max())}")
        phy2log = np.full((L, S), -1, dtype=np.int64)
        li, ei, _ = np.nonzero(valid)
        slots = arr[valid]
        seen = np.zeros((L, S), dtype=np.int64)
        np.add.at(seen, (li, slots), 1)
        if np.any(seen != 1):
            layer, slot = (int(v) for v in np.argwhere(seen != 1)[0])
            raise PlacementError(f"log2phy: layer {layer}: slot {slot} is listed {seen[layer, slot]} times, expected once")
        phy2log[li, slots] = ei
        return cls(phy2log, E, num_ranks, num_nodes, tuple(layer_ids), dict(meta or {}))

    @classmethod
    def contiguous(
        cls,
        num_layers: int,
        num_experts: int,
        num_ranks: int,
        num_slots: int | None = None,
        num_nodes: int = 1,
        *,
        layer_ids: Sequence[int] = (),
    ) -> Placement:
        """The placement with no balancing: slot ``s`` holds expert ``s % E`` (identity when ``S == E``)."""
        S = num_experts if num_slots is None else int(num_slots)
        row = np.arange(S, dtype=np.int64) % num_experts
        return cls(
            np.tile(row, (num_layers, 1)), num_experts, num_ranks, num_nodes, tuple(layer_ids), {"policy": "contiguous"}
        )

    # ------------------------------------------------------------- validation
    def validate(self) -> Placement:
        """Check every invariant; raise :class:`PlacementError` naming the first violation. Returns ``self``."""
        L, S = self.phy2log.shape
        E, R, N = self.num_experts, self.num_ranks, self.num_nodes
        if L == 0:
            raise PlacementError("phy2log: no layers")
        if len(self.layer_ids) != L:
            raise PlacementError(f"layer_ids: {len(self.layer_ids)} layer ids for {L} layers")
        if len(set(self.layer_ids)) != L:
            raise PlacementError(f"layer_ids: duplicate layer ids in {list(self.layer_ids)}")
        if S < E:
            raise PlacementError(f"phy2log: {S} slots per layer cannot hold {E} experts (need at least {E})")
        if S % R:
            raise PlacementError(f"phy2log: {S} slots are not divisible by num_ranks={R} (each rank needs equal slots)")
        if R % N:
            raise PlacementError(f"num_nodes: {R} ranks are not divisible by num_nodes={N}")
        if np.any((self.phy2log < 0) | (self.phy2log >= E)):
            layer, slot = (int(v) for v in np.argwhere((self.phy2log < 0) | (self.phy2log >= E))[0])
            raise PlacementError(
                f"layer {self.layer_ids[layer]}: slot {slot} holds expert {self.phy2log[layer, slot]}, "
                f"expected an id in [0, {E})"
            )
        cnt = self.logcnt
        if np.any(cnt == 0):
            layer, expert = (int(v) for v in np.argwhere(cnt == 0)[0])
            raise PlacementError(f"layer {self.layer_ids[layer]}: expert {expert} has no slot")
        return self

    def check_compatible(self, *, num_experts: int | None = None, num_layers: int | None = None,
                         num_ranks: int | None = None, what: str = "placement") -> None:
        """Raise :class:`PlacementError` if this placement does not fit a model/trace of the given sizes."""
        for name, want, have in (("num_experts", num_experts, self.num_experts),
                                 ("num_layers", num_layers, self.num_layers),
                                 ("num_ranks", num_ranks, self.num_ranks)):
            if want is not None and want != have:
                raise PlacementError(f"{what}: {name} is {have}, expected {want}")

    # ------------------------------------------------------------- comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self.phy2log.shape == other.phy2log.shape
            and self.num_experts == other.num_experts
            and self.num_ranks == other.num_ranks
            and self.num_nodes == other.num_nodes
            and self.layer_ids == other.layer_ids
            and bool(np.array_equal(self.phy2log, other.phy2log))
        )

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, experts={self.num_experts}, slots={self.num_slots}, "
            f"ranks={self.num_ranks}, nodes={self.num_nodes}, policy={self.meta.get('policy', '?')!r})"
        )

    def _check_same_shape(self, other: Placement) -> None:
        if self.phy2log.shape != other.phy2log.shape or self.num_ranks != other.num_ranks:
            raise PlacementError(
                f"cannot compare placements of shape {self.phy2log.shape} over {self.num_ranks} ranks and "
                f"{other.phy2log.shape} over {other.num_ranks} ranks"
            )

    def diff(self, other: Placement) -> np.ndarray:
        """``[L, S]`` bool: slots whose expert differs between ``self`` and ``other``.

        These are the slots a migration from ``self`` to ``other`` must fill with new weights.
        """
        self._check_same_shape(other)
        return self.phy2log != other.phy2log

    def moves(self, other: Placement) -> np.ndarray:
        """``[L]`` expert weight copies that must cross ranks to go from ``self`` to ``other``.

        One copy per (rank, expert) that ``other`` puts on a rank not holding that expert under
        ``self`` -- the migration executor's rule (:attr:`eplb.online.LayerMigration.num_transfers`):
        a rank receives an expert once even when it fills several slots with it, and a changed slot
        whose new expert already sits on its rank is a local copy.
        """
        self._check_same_shape(other)
        have = self.expert_rank_count() > 0  # [L, E, R]
        need = other.expert_rank_count() > 0
        return (need & ~have).sum(axis=(1, 2))

    # ------------------------------------------------------------ derivation
    def with_layers(self, phy2log_rows: Mapping[int, ArrayLike]) -> Placement:
        """A copy with the rows of the given layer *positions* (0-based) replaced."""
        arr = self.phy2log.copy()
        for pos, row in phy2log_rows.items():
            arr[int(pos)] = to_numpy(row).astype(np.int64)
        return Placement(arr, self.num_experts, self.num_ranks, self.num_nodes, self.layer_ids, self.meta)

    def select_layers(self, positions: Sequence[int]) -> Placement:
        """A placement of the given layer positions only."""
        pos = [int(p) for p in positions]
        return Placement(
            self.phy2log[pos], self.num_experts, self.num_ranks, self.num_nodes,
            tuple(self.layer_ids[p] for p in pos), self.meta,
        )

    def for_layers(self, layer_ids: Sequence[int], *, positional: bool | None = None, wanted_positional: bool = False,
                   what: str = "placement", of: str = "") -> Placement:
        """The rows for the layers ``layer_ids`` (model layer ids), labelled with them: the one layer-matching rule.

        * Rows keyed by model layer id (every wanted id is in :attr:`layer_ids`) are selected in the
          order asked, unless ``positional=True`` (the rows are MoE-layer positions, not ids).
        * Otherwise, when the counts agree and one side is positional -- this placement's rows
          (``positional=True``, or ``None`` and its ids are the default ``0..L-1``), or
          ``wanted_positional`` (the asker's ids are positions, e.g. a trace without model layer ids) --
          rows are matched by position.
        * Anything else raises :class:`PlacementError` naming ``what`` and the missing layers (``of``:
          whose layers, e.g. ``"trace"`` or ``"model"``).
        """
        want = tuple(int(i) for i in layer_ids)
        L = self.num_layers
        if want == self.layer_ids:
            return self
        default = tuple(range(L))
        if not positional:
            pos = {lid: i for i, lid in enumerate(self.layer_ids)}
            if all(lid in pos for lid in want) and len(set(want)) == len(want) and want:
                return self.select_layers([pos[lid] for lid in want])
        by_position = (self.layer_ids == default if positional is None else positional) or wanted_positional
        if by_position and len(want) == L:
            return Placement(self.phy2log, self.num_experts, self.num_ranks, self.num_nodes, want, self.meta)
        if positional:
            raise PlacementError(f"{what}: {L} MoE layers, but {len(want)} layer ids given")
        missing = [lid for lid in want if lid not in set(self.layer_ids)]
        more = " ..." if len(missing) > 8 else ""
        raise PlacementError(
            f"{what}: no row for {of + ' ' if of else ''}layer(s) {missing[:8]}{more} (it covers layers "
            f"{list(self.layer_ids)[:8]}{' ...' if L > 8 else ''}: {L} layers, {len(want)} wanted)")

    def with_meta(self, **meta: Any) -> Placement:
        """A copy with ``meta`` updated."""
        return Placement(self.phy2log, self.num_experts, self.num_ranks, self.num_nodes, self.layer_ids,
                         {**self.meta, **meta})

    # ---------------------------------------------------------------- export
    def digest(self) -> str:
        """SHA-256 of the placement's content (shape, sizes, layer ids, ``phy2log``); equal placements agree."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.phy2log.shape), self.num_experts, self.num_ranks, self.num_nodes,
                             list(self.layer_ids)]).encode())
        h.update(self.phy2log.tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the ``native`` form)."""
        return {
            "format": "eplb.placement",
            "version": 1,
            "num_experts": self.num_experts,
            "num_ranks": self.num_ranks,
            "num_nodes": self.num_nodes,
            "num_slots": self.num_slots,
            "layer_ids": list(self.layer_ids),
            "phy2log": self.phy2log.tolist(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "placement") -> Placement:
        """Inverse of :meth:`to_dict`; errors name ``source`` and the missing/bad field."""
        for key in ("num_experts", "num_ranks", "phy2log"):
            if key not in d:
                raise PlacementError(f"{source}: missing field '{key}'")
        try:
            phy2log = np.asarray(d["phy2log"], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise PlacementError(f"{source}: field 'phy2log' must be a rectangular [layers, slots] integer list ({exc})") from None
        if "num_slots" in d and phy2log.ndim == 2 and phy2log.shape[1] != int(d["num_slots"]):
            raise PlacementError(f"{source}: field 'num_slots' is {d['num_slots']} but phy2log rows have {phy2log.shape[1]} slots")
        try:
            return cls(phy2log, int(d["num_experts"]), int(d["num_ranks"]), int(d.get("num_nodes", 1)),
                       tuple(d.get("layer_ids", ())), dict(d.get("meta", {})))
        except PlacementError as exc:
            raise PlacementError(f"{source}: {exc}") from None
