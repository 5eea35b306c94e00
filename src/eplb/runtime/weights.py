"""Expert weight sets: every per-expert tensor of a layer, moved and checked as one unit.

An :class:`ExpertWeightSet` maps names to tensors that all have the slot (or expert) as their
leading dimension: ``{"w13", "w2"}`` for dense experts, ``{"w13", "w13_scale_inv", "w2",
"w2_scale_inv"}`` for FP8 block-scaled ones (:mod:`eplb.runtime.fp8`), and any other per-expert tensor
(biases, zero points) a layer lists in ``expert_weight_names``. Slicing a layer's slots out of the full
expert tensors, replication, staging, the P2P transfers of the online balancer
(:class:`~eplb.runtime.executor.MigrationExecutor`), the bytes-moved accounting and the transfer
fingerprints all go through it, so no tensor of an expert can be left behind.

Fingerprints (:meth:`ExpertWeightSet.fingerprints`) are computed on the tensors' device from their raw
bytes (read as int16 words ``x_i``): ``(sum x_i, sum x_i * (i mod 65521 + 1))`` per tensor and slot,
exact int64 arithmetic. Any change of one word changes the first sum; the two together catch the
usual corruptions (a flipped bit, a stale or shifted block, a swapped scale tensor). They are a
transfer check, not a cryptographic hash.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ExpertWeightSet", "wire_view"]

_FP_MOD = 65521
_FP_CHUNK = 1 << 22


def wire_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor every ``torch.distributed`` backend can send bit-exactly: float8 (and other
    1-byte float) tensors are viewed as ``uint8``; others are returned as they are."""
    if t.dtype.is_floating_point and t.element_size() == 1:
        return t.view(torch.uint8)
    return t


def _words(t: torch.Tensor) -> torch.Tensor:
    """``[n, w]`` int16 words of each leading-dim row of ``t`` (uint8 bytes when a row has an odd byte count)."""
    n = int(t.shape[0])
    flat = t.contiguous().view(torch.uint8).reshape(n, -1)
    if flat.shape[1] % 2 == 0:
        return flat.view(torch.int16)
    return flat


class ExpertWeightSet:
    """Named per-expert tensors sharing their leading (slot) dimension, on one device.

    Args:
        tensors: ``{name: tensor [n, ...]}`` in a fixed order (the order is the wire order of transfers).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("ExpertWeightSet: expected at least one tensor")
        self._t: dict[str, torch.Tensor] = dict(tensors)
        first = next(iter(self._t.values()))
        for name, t in self._t.items():
            if not isinstance(t, torch.Tensor) or t.ndim < 1:
                raise ValueError(f"ExpertWeightSet: {name!r} must be a tensor with a leading slot dimension")
            if t.shape[0] != first.shape[0]:
                raise ValueError(f"ExpertWeightSet: {name!r} has {t.shape[0]} slots, {next(iter(self._t))!r} has "
                                 f"{first.shape[0]}")
            if t.device != first.device:
                raise ValueError(f"ExpertWeightSet: {name!r} is on {t.device}, the others on {first.device}")

    @classmethod
    def of(cls, layer: Any) -> ExpertWeightSet:
        """The live tensors of ``layer`` named by its ``expert_weight_names`` (no copy)."""
        return cls({n: getattr(layer, n) for n in layer.expert_weight_names})

    # ---------------------------------------------------------------- access
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._t)

    @property
    def num_slots(self) -> int:
        return int(next(iter(self._t.values())).shape[0])

    @property
    def device(self) -> torch.device:
        return next(iter(self._t.values())).device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._t[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._t.items())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._t)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: the sum over every tensor of its per-slot bytes (weights, scales, ...)."""
        return sum(int(np.prod(t.shape[1:], dtype=np.int64)) * int(t.element_size()) for t in self._t.values())

    def slot(self, i: int) -> dict[str, torch.Tensor]:
        """``{name: tensor[i]}`` views of one slot."""
        return {n: t[i] for n, t in self._t.items()}

    # -------------------------------------------------------------- building
    def select(self, idx: Sequence[int] | torch.Tensor, *, device: Any = None,
               dtypes: Mapping[str, torch.dtype] | None = None) -> ExpertWeightSet:
        """Copies of slots ``idx`` (repeats give independent copies), optionally moved / cast per name."""
        ix = torch.as_tensor(np.asarray(idx, dtype=np.int64) if not isinstance(idx, torch.Tensor) else idx,
                             dtype=torch.int64, device=self.device)
        out = {}
        for n, t in self._t.items():
            s = wire_view(t.detach()).index_select(0, ix).view(t.dtype)
            dt = (dtypes or {}).get(n)
            if device is not None or dt is not None:
                s = s.to(device=device, dtype=dt)
            out[n] = s.contiguous()
        return ExpertWeightSet(out)

    def new_empty(self, n: int) -> ExpertWeightSet:
        """Uninitialised ``[n, ...]`` tensors of the same shapes / dtypes / device (staging)."""
        return ExpertWeightSet({k: t.new_empty((int(n), *t.shape[1:])) for k, t in self._t.items()})

    def copy_slots_(self, dst: torch.Tensor, src: ExpertWeightSet, src_idx: torch.Tensor | None = None) -> None:
        """``self[name][dst] = src[name][src_idx]`` for every name (``src_idx`` None: all of ``src`` in order)."""
        self._check_same_layout(src)
        for n, t in self._t.items():  # byte views: index_copy_ has no float8 kernel on every device
            s = wire_view(src[n]) if src_idx is None else wire_view(src[n]).index_select(0, src_idx)
            wire_view(t).index_copy_(0, dst, s)

    def _check_same_layout(self, other: ExpertWeightSet) -> None:
        if other.names != self.names:
            raise ValueError(f"ExpertWeightSet: names {list(other.names)} differ from {list(self.names)}")
        for n, t in self._t.items():
            o = other[n]
            if tuple(o.shape[1:]) != tuple(t.shape[1:]) or o.dtype != t.dtype:
                raise ValueError(f"ExpertWeightSet: {n!r} is {o.dtype}{list(o.shape[1:])} per slot, expected "
                                 f"{t.dtype}{list(t.shape[1:])}")

    # ---------------------------------------------------------- fingerprints
    def fingerprints(self, idx: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """``int64 [n, len(names), 2]`` fingerprints of slots ``idx`` (default all), on the device."""
        rows = []
        for t in self._t.values():
            if idx is not None:
                ix = torch.as_tensor(idx, dtype=torch.int64, device=t.device)
                t = t.index_select(0, ix)
            rows.append(_fingerprint_rows(t))
        return torch.stack(rows, dim=1)

    def equal(self, other: ExpertWeightSet) -> bool:
        """Bit-exact equality of every tensor (byte comparison: NaN payloads and -0.0 included)."""
        if other.names != self.names:
            return False
        for n, t in self._t.items():
            o = other[n]
            if o.shape != t.shape or o.dtype != t.dtype:
                return False
            if not torch.equal(t.contiguous().view(torch.uint8), o.to(t.device).contiguous().view(torch.uint8)):
                return False
        return True

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {t.dtype}{list(t.shape)}" for n, t in self._t.items())
        return f"ExpertWeightSet({parts}; {self.slot_bytes} bytes/slot)"


def _fingerprint_rows(t: torch.Tensor) -> torch.Tensor:
    """``int64 [n, 2]``: per leading row, the two word sums of the module doc (chunked, bounded memory)."""
    n = int(t.shape[0])
    out = torch.zeros(n, 2, dtype=torch.int64, device=t.device)
    if n == 0 or t[0].numel() == 0:
        return out
    w = _words(t)
    width = int(w.shape[1])
    for lo in range(0, width, _FP_CHUNK):
        x = w[:, lo:lo + _FP_CHUNK].to(torch.int64)
        pos = (torch.arange(lo, lo + int(x.shape[1]), dtype=torch.int64, device=t.device) % _FP_MOD) + 1
        out[:, 0] += x.sum(1)
        out[:, 1] += (x * pos).sum(1)
    return out
