"""Cross-rank agreement on the online balancer's configuration.

Every rank of an EP group must run the balancer with the same options: the trigger, the policy and
the migration schedule are decided from all-reduced data on every rank independently, so two ranks
with different ``layer_updates_per_iter`` or staging caps post different transfers and hang or serve
wrong outputs. :func:`check_balancer_agreement` exchanges one fingerprint of every option that steers
those decisions (plus the placement's digest) at construction and raises
:class:`~eplb.runtime.distributed.AgreementError` on every rank, naming the ranks that differ and
the first option that does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from eplb.runtime.distributed import AgreementError, GroupInfo, agree

__all__ = ["LOCAL_FIELDS", "check_balancer_agreement", "config_fingerprint"]

#: BalancerConfig fields that may differ between ranks (reporting only; rank 0 serves the metrics).
LOCAL_FIELDS = frozenset({"log_interval", "metrics_port", "metrics_addr", "policy_backend"})


def _canon(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def config_fields(config: Any) -> dict[str, Any]:
    """The options of ``config`` (a dataclass) that every rank must share, canonicalised."""
    return {f.name: _canon(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name not in LOCAL_FIELDS}


def config_fingerprint(config: Any) -> bytes:
    """SHA-256 of :func:`config_fields` (stable across processes)."""
    return hashlib.sha256(json.dumps(config_fields(config), sort_keys=True, default=repr).encode()).digest()


def check_balancer_agreement(info: GroupInfo, config: Any, placement_digest: str, *, watchdog: Any = None,
                             device: Any = None) -> None:
    """Raise :class:`AgreementError` on every rank unless all hold the same configuration and placement.

    Two exchanges: the fingerprints, then (only when they differ) every rank's option values, so the
    message names the first option that differs and its values on the ranks.
    """
    digest = hashlib.sha256(config_fingerprint(config) + placement_digest.encode()).digest()
    try:
        agree(info, "OnlineBalancer", digest, device=device, watchdog=watchdog)
    except AgreementError as exc:
        if "disagree" not in str(exc):
            raise
        # say which option: one more fixed-size exchange of a hash per option
        fields = config_fields(config)
        names = sorted(fields)
        mine = b"".join(hashlib.sha256(json.dumps(fields[n], default=repr).encode()).digest()[:4] for n in names)
        mine += hashlib.sha256(placement_digest.encode()).digest()[:4]
        recs = _gather(info, mine, device, watchdog)
        diff = [i for i in range(len(names) + 1) if len({r[4 * i: 4 * i + 4] for r in recs}) > 1]
        what = [names[i] if i < len(names) else "placement" for i in diff]
        ranks = sorted({r for r, rec in enumerate(recs) if rec != recs[0]})
        raise AgreementError(
            f"OnlineBalancer: ranks disagree on the configuration: ranks {ranks} differ from rank 0 in "
            f"{', '.join(what) or 'the configuration'} (this rank {info.rank}: "
            + ", ".join(f"{n}={fields[n]!r}" for n in what if n in fields)[:400]
            + "); every rank must construct the balancer with the same BalancerConfig and placement") from None


def _gather(info: GroupInfo, rec: bytes, device: Any, watchdog: Any) -> list[bytes]:
    import torch
    import torch.distributed as dist

    from eplb.runtime.distributed import comm_device

    t = torch.frombuffer(bytearray(rec), dtype=torch.uint8).to(comm_device(info, device))
    out = [torch.empty_like(t) for _ in range(info.size)]
    work = dist.all_gather(out, t, group=info.group, async_op=True)
    if watchdog is not None:
        watchdog.wait(work, "configuration agreement", watchdog.next_seq())
    else:
        work.wait()
    return [bytes(o.cpu().tolist()) for o in out]
