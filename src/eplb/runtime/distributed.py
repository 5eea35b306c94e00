"""Small ``torch.distributed`` helpers of the runtime: group info, cross-rank agreement, init from torchrun.

Everything here is collective-safe: a check that can fail on one rank first exchanges a fixed-size
record with every rank (one ``all_gather``) and then raises the *same* error on *every* rank, so a
bad input never leaves the other ranks waiting in the next collective.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from eplb.placement import PlacementError

__all__ = ["AgreementError", "GroupInfo", "agree", "comm_device", "fingerprint", "group_info", "init_from_env"]

_MSG_BYTES = 240


class AgreementError(PlacementError):
    """Ranks disagree (placement digest, shapes, sizes) or one of them reported a bad construction input.

    A :class:`~eplb.PlacementError` (hence a ``ValueError``), raised on every rank of the group."""


@dataclass(frozen=True)
class GroupInfo:
    """Rank and size of this process in an EP group (``group is None`` with size 1: no collectives)."""

    group: Any
    rank: int
    size: int
    backend: str

    @property
    def distributed(self) -> bool:
        return self.group is not None


def group_info(group: Any = None) -> GroupInfo:
    """``GroupInfo`` of ``group`` (default: WORLD when initialised, else a single local rank)."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group: a process group was given but torch.distributed is not initialised")
        return GroupInfo(None, 0, 1, "none")
    g = group if group is not None else dist.group.WORLD
    return GroupInfo(g, dist.get_rank(g), dist.get_world_size(g), str(dist.get_backend(g)))


def comm_device(info: GroupInfo, fallback: torch.device | None = None) -> torch.device:
    """Device for collective buffers: the current CUDA device for NCCL, else CPU (gloo) or ``fallback``."""
    if info.backend == "nccl":
        if fallback is not None and fallback.type == "cuda":
            return fallback
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fingerprint(*parts: Any) -> bytes:
    """SHA-256 over the ``repr`` of ``parts`` (strings, ints, tuples, placement digests)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return h.digest()


def agree(info: GroupInfo, what: str, digest: bytes, error: str | None = None,
          device: torch.device | None = None, watchdog: Any = None) -> None:
    """Check on every rank that all ranks hold the same ``digest`` and none reported ``error``.

    One ``all_gather`` of ``32 + 1 + 240`` bytes. Raises :class:`AgreementError` on *every* rank when
    any rank reported an error (the message of the lowest such rank is shown everywhere) or when the
    digests differ (the message lists which ranks differ from rank 0). No-op without a group.
    """
    if not info.distributed:
        if error is not None:
            raise AgreementError(f"{what}: {error}")
        return
    if len(digest) != 32:
        digest = hashlib.sha256(digest).digest()
    msg = (error or "").encode("utf-8")[:_MSG_BYTES]
    rec = bytes(digest) + bytes([1 if error is not None else 0]) + msg.ljust(_MSG_BYTES, b"\x00")
    dev = comm_device(info, device)
    t = torch.frombuffer(bytearray(rec), dtype=torch.uint8).to(dev)
    out = [torch.empty_like(t) for _ in range(info.size)]
    work = dist.all_gather(out, t, group=info.group, async_op=True)
    if watchdog is not None:  # a deadline: a stalled peer is named instead of a hang (eplb.runtime._watchdog)
        watchdog.wait(work, what, watchdog.next_seq())
    else:
        work.wait()
    recs = [bytes(o.cpu().tolist()) for o in out]
    failed = [r for r, b in enumerate(recs) if b[32] == 1]
    if failed:
        first = recs[failed[0]][33:].rstrip(b"\x00").decode("utf-8", errors="replace")
        mine = f" (this rank, {info.rank}: {error})" if error is not None and info.rank != failed[0] else ""
        raise AgreementError(f"{what}: rank {failed[0]} of {info.size} reported: {first}"
                             + (f"; ranks with errors: {failed}" if len(failed) > 1 else "") + mine)
    differ = [r for r, b in enumerate(recs) if b[:32] != recs[0][:32]]
    if differ:
        raise AgreementError(
            f"{what}: ranks disagree: ranks {differ} hold a different placement/configuration than rank 0 "
            f"(digests {recs[0][:6].hex()} vs {recs[differ[0]][:6].hex()}); every rank must load the same placement"
        )


def init_from_env(backend: str | None = None, *, timeout_s: float = 600.0,
                  device: str = "cpu") -> GroupInfo:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Backend: ``nccl`` for ``device="cuda"`` (sets the CUDA device to ``LOCAL_RANK``), else ``gloo``.
    Keeps ``NCCL_NVLS_ENABLE=0`` unless the caller set it. Without torchrun's variables, returns a
    single-rank :class:`GroupInfo` with no group.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return GroupInfo(None, 0, 1, "none")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if backend is None:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return group_info(None)
