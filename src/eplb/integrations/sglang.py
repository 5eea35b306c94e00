"""eplb for SGLang: its ``rebalance_experts`` shape, ``--init-expert-location`` files, and stats from a server.

* :func:`rebalance_experts` -- the same signature and return value as SGLang's
  ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` (``tokens_per_expert`` ``[steps, layers, E]``
  or ``[layers, E]``), backed by eplb's planner; SGLang's DeepSeek algorithm names give DeepSeek's
  exact results.
* :func:`write_init_expert_location` -- a ``{"physical_to_logical_map": ...}`` file (JSON or
  ``.pt``) for ``--init-expert-location``, written by :mod:`eplb.formats` (format ``"sglang"``).
* :func:`pull` -- record the expert distribution of a running SGLang server over HTTP
  (``/start_expert_distribution_record``, ``/stop_expert_distribution_record``,
  ``/dump_expert_distribution_record``) and turn the dump into an eplb :class:`~eplb.Trace`.

Facts about SGLang used here (read from its ``expert_distribution.py``, ``http_server.py``,
``server_args.py``, ``environ.py``): the three endpoints accept GET and POST and answer plain text;
the dump is not in the response -- rank 0 writes ``expert_distribution_recorder_<unix time>.pt``
into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (default ``/tmp``) on the server's machine. In the
``stat`` / ``stat_approx`` modes (``--expert-distribution-recorder-mode stat``) the file is a dict
with ``logical_count`` ``[buffer steps, num_hidden_layers, E]`` (int, summed over ranks; one row per
forward pass; dense layers are all-zero rows), ``rank`` and ``average_utilization_rate_over_window``.
The buffer is a ring of ``--expert-distribution-recorder-buffer-size`` passes (default 1000; ``-1``
= unbounded): unused rows are zero, and once it wraps the oldest passes are overwritten.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_load, check_positive_int
from eplb._safe_read import parse_json
from eplb.integrations._core import EngineLayoutError, normalize_layout, plan_for_engine, resolve_planner
from eplb.placement import Placement
from eplb.stats.trace import Trace, TraceError

__all__ = [
    "DUMP_DIR_ENV",
    "DUMP_GLOB",
    "ENDPOINTS",
    "PullResult",
    "SGLangPullError",
    "algorithm_to_planner",
    "read_dump",
    "find_new_dump",
    "pull",
    "rebalance_experts",
    "tidy_dump_trace",
    "write_init_expert_location",
]

log = logging.getLogger("eplb.integrations.sglang")

DUMP_DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
DUMP_GLOB = "expert_distribution_recorder_*.pt"
ENDPOINTS = ("/start_expert_distribution_record", "/stop_expert_distribution_record", "/dump_expert_distribution_record")

_DEEPSEEK_NAMES = {
    "deepseek": "deepseek-global",
    "deepseek_hierarchical": "deepseek-hierarchical",
}
#: SGLang's vectorised variant (per-step scores, chunked replication, int32 maps): its own algorithm, not
#: DeepSeek's; eplb does not reproduce it and refuses the names rather than return different maps.
_UNSUPPORTED_NAMES = ("deepseek_vec", "deepseek_vec_hierarchical")
#: SGLang's elastic-EP algorithm: plans over the active ranks only (eplb: ``excluded_ranks``).
ELASTIC_NAMES = ("elasticity_aware",)
SUPPORTED_ALGORITHMS = ("auto", *_DEEPSEEK_NAMES, *ELASTIC_NAMES)


# ----------------------------------------------------------------------------- the algorithm


def algorithm_to_planner(algorithm: Any) -> str:
    """The eplb policy for an SGLang algorithm value (an ``EplbAlgorithm`` member or a string).

    SGLang's DeepSeek names map to DeepSeek's policies (``deepseek`` -> global,
    ``deepseek_hierarchical`` -> hierarchical: identical maps); ``elasticity_aware`` -> eplb's best
    policy planned over the active ranks (:func:`rebalance_experts` passes ``excluded_ranks``);
    ``"auto"``, ``"eplb"`` and ``None`` -> eplb's best policy; any name registered in
    :data:`eplb.POLICIES` is used as is. ``deepseek_vec*`` (SGLang's own vectorised variant, whose
    maps differ from DeepSeek's) is refused with an error naming the supported names.
    """
    name = getattr(algorithm, "name", algorithm)
    if name is None or name in ("auto", "eplb", *ELASTIC_NAMES):
        return resolve_planner(None)
    if not isinstance(name, str):
        raise ValueError(f"algorithm: expected an SGLang EplbAlgorithm or a policy name, got {algorithm!r}")
    if name in _DEEPSEEK_NAMES:
        return _DEEPSEEK_NAMES[name]
    if name in _UNSUPPORTED_NAMES:
        raise ValueError(
            f"algorithm: {name!r} is SGLang's vectorised variant (its own maps, int32), which eplb does not "
            f"reproduce; supported SGLang names: {', '.join(SUPPORTED_ALGORITHMS)} (or an eplb policy name)"
        )
    try:
        return resolve_planner(name)
    except ValueError:
        raise ValueError(
            f"algorithm: {name!r} is neither a supported SGLang algorithm ({', '.join(SUPPORTED_ALGORITHMS)}) "
            "nor an eplb policy"
        ) from None


def _active_ranks(active_ranks: ArrayLike | None, num_gpus: int) -> np.ndarray:
    """``[num_gpus]`` bool mask of active ranks: given, else SGLang's elastic-EP state, else all."""
    if active_ranks is None:
        try:
            from sglang.srt.elastic_ep.elastic_ep import get_elastic_ep_state  # type: ignore[import-not-found]

            active_ranks = get_elastic_ep_state().active_ranks
        except Exception:
            return np.ones(num_gpus, dtype=bool)
    mask = np.asarray(active_ranks.detach().cpu().numpy() if hasattr(active_ranks, "detach") else active_ranks)
    if mask.shape != (num_gpus,):
        raise EngineLayoutError(f"active_ranks: expected a mask of {num_gpus} ranks, got shape {tuple(mask.shape)}")
    mask = mask.astype(bool)
    if not mask.any():
        raise EngineLayoutError("active_ranks: no active rank")
    return mask


def rebalance_experts(
    tokens_per_expert: ArrayLike,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: Any = "auto",
    *,
    current_physical_to_logical_map: ArrayLike | None = None,
    active_ranks: ArrayLike | None = None,
) -> tuple[Any, Any, Any]:
    """SGLang's ``rebalance_experts`` backed by eplb.

    Args:
        tokens_per_expert: ``[steps, layers, E]`` or ``[layers, E]`` token counts (torch or numpy).
        num_physical_experts: ``S`` slots per layer.
        num_local_physical_experts: slots per GPU (``S`` must be a multiple of it).
        num_groups: expert groups, ``None`` for none.
        num_nodes: nodes.
        algorithm: see :func:`algorithm_to_planner` (default ``"auto"`` = eplb's best policy).
        current_physical_to_logical_map: optional ``[layers, S]`` map served now; when given the
            plan keeps experts where they are when the balance allows (eplb extension).
        active_ranks: ``elasticity_aware`` only: ``[num_gpus]`` mask of the ranks alive (default:
            SGLang's elastic-EP state when importable, else all). The plan uses only their slots;
            ``logical_to_all_physical_map`` / ``expert_count`` list only slots on active ranks
            (slots of inactive ranks hold spare copies that are never dispatched to).

    Returns:
        ``(physical_to_logical_map [L, S], logical_to_all_physical_map [L, E, K] (-1 padded),
        expert_count [L, E])``, int64 CPU torch tensors -- like SGLang's. The DeepSeek algorithms
        reproduce DeepSeek's results exactly (``logical_to_all_physical_map`` in replica order);
        the others list each expert's slots in ascending order (as SGLang's ``init_by_mapping``).
    """
    import torch

    tpe = check_load(tokens_per_expert, "tokens_per_expert", ndim=(2, 3))
    S = check_positive_int(num_physical_experts, "num_physical_experts")
    local = check_positive_int(num_local_physical_experts, "num_local_physical_experts")
    if S % local:
        raise EngineLayoutError(
            f"num_local_physical_experts: {S} physical experts are not a multiple of {local} per GPU"
        )
    num_gpus = S // local
    planner = algorithm_to_planner(algorithm)
    weight = tpe.sum(0) if tpe.ndim == 3 else tpe
    if getattr(algorithm, "name", algorithm) in ELASTIC_NAMES:
        return _elastic(tpe, S, num_gpus, planner, _active_ranks(active_ranks, num_gpus))
    if planner.startswith("deepseek") and current_physical_to_logical_map is None:
        from eplb.policies.deepseek import rebalance_experts as ds

        layout = normalize_layout(weight, S, num_groups, num_nodes, num_gpus)
        hier = planner == "deepseek-hierarchical" or (planner == "deepseek" and layout.num_groups % layout.num_nodes == 0)
        if hier and (num_groups is None or layout.num_groups != int(num_groups)):
            raise EngineLayoutError(
                f"num_groups: hierarchical algorithm needs num_groups dividing {weight.shape[1]} experts and divisible "
                f"by num_nodes={num_nodes}, got {num_groups}"
            )
        groups, nodes = (layout.num_groups, layout.num_nodes) if hier else (1, 1)
        phy2log, log2phy, logcnt = ds(weight.astype(np.float32), S, groups, nodes, num_gpus)
        return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
    new = plan_for_engine(tpe, S, num_gpus, num_nodes=num_nodes, num_groups=num_groups,
                          old=current_physical_to_logical_map, planner=planner, name="tokens_per_expert")
    p = Placement(new, int(tpe.shape[-1]), num_gpus)
    return (torch.from_numpy(np.array(p.phy2log, dtype=np.int64)), torch.from_numpy(p.log2phy),
            torch.from_numpy(p.logcnt))


def _elastic(tpe: np.ndarray, S: int, num_gpus: int, planner: str, alive: np.ndarray) -> tuple[Any, Any, Any]:
    """SGLang's ``elasticity_aware`` contract with eplb's planner: plan over the active ranks only."""
    import torch

    from eplb.policies import plan

    E = int(tpe.shape[-1])
    dead = [int(r) for r in np.flatnonzero(~alive)]
    try:
        pl = plan(tpe, S, num_gpus, policy=planner, excluded_ranks=dead)
    except ValueError as exc:
        raise EngineLayoutError(f"elasticity_aware: {exc}") from None
    L, spr = pl.num_layers, S // num_gpus
    active_slot = np.repeat(alive, spr)  # [S]
    p2l = np.where(active_slot[None], pl.phy2log, -1)
    cnt = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        cnt[layer] = np.bincount(p2l[layer][p2l[layer] >= 0], minlength=E)
    K = int(cnt.max())
    log2phy = np.full((L, E, K), -1, dtype=np.int64)
    for layer in range(L):
        fill = np.zeros(E, dtype=np.int64)
        for slot in np.flatnonzero(p2l[layer] >= 0):
            e = int(p2l[layer, slot])
            log2phy[layer, e, fill[e]] = slot
            fill[e] += 1
    return (torch.from_numpy(np.array(pl.phy2log, dtype=np.int64)), torch.from_numpy(log2phy),
            torch.from_numpy(cnt))


# --------------------------------------------------------------------- --init-expert-location


def write_init_expert_location(
    placement: Placement, path: str | os.PathLike[str], *, num_layers: int | None = None
) -> Path:
    """Write ``placement`` as an SGLang ``--init-expert-location`` file (``.pt`` -> torch, else JSON).

    Rows are model layers: a placement whose ``layer_ids`` skip dense layers gets SGLang's trivial
    row for them (``num_layers`` = the model's ``num_hidden_layers`` when it has trailing dense
    layers). The bytes come from :mod:`eplb.formats` (format ``"sglang"``); the write is atomic.
    """
    from eplb.formats import write_placement

    write_placement(placement, path, "sglang", num_layers=num_layers)
    return Path(path)


# ------------------------------------------------------------------------------- pull (HTTP)


class SGLangPullError(OSError):
    """Talking to the SGLang server or finding its dump failed; the message names the URL or directory."""


@dataclass
class PullResult:
    """What :func:`pull` got: the trace, the server-side dump file it read, and the server's info."""

    trace: Trace
    dump_path: Path
    server_info: dict[str, Any] = field(default_factory=dict)


#: Environment variables read by :func:`pull` when no key is passed (SGLang's ``--api-key`` / ``--admin-api-key``).
API_KEY_ENV = "EPLB_SGLANG_API_KEY"
ADMIN_API_KEY_ENV = "EPLB_SGLANG_ADMIN_API_KEY"
#: Largest answer eplb reads from a server (``/server_info`` and the control endpoints answer a few KB).
MAX_ANSWER_BYTES = 16 << 20


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port (a server answer is untrusted)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise SGLangPullError(f"sglang: {req.full_url} redirected to another host ({newurl}); not following it")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _request(url: str, method: str, timeout: float, key: str | None = None, *,
             max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
    """One HTTP request: at most ``max_bytes`` of answer, within ``timeout`` seconds *in total* (connect,
    headers and every byte of the body), redirects only to the same host; ``key`` goes in
    ``Authorization: Bearer`` and never into a message."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method, headers=headers)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_SameHostRedirects)
    try:
        with opener.open(req, timeout=timeout) as resp:
            chunks, n = [], 0
            sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SGLangPullError(f"sglang: {method} {url}: no complete answer within {timeout:g} s")
                if sock is not None:
                    sock.settimeout(max(left, 0.001))
                chunk = resp.read1(min(1 << 16, max_bytes + 1 - n))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                n += len(chunk)
                if n > max_bytes:
                    raise SGLangPullError(f"sglang: {method} {url}: answer larger than {max_bytes} bytes; not reading it")
    except SGLangPullError:
        raise
    except TimeoutError:
        raise SGLangPullError(f"sglang: {method} {url}: no complete answer within {timeout:g} s") from None
    except urllib.error.HTTPError as exc:
        body = exc.read()[:200].decode("utf-8", "replace").strip()
        if key:
            body = body.replace(key, "***")
        hint = ""
        if exc.code in (401, 403):
            hint = (f" (the server requires an API key: pass --api-key / --admin-api-key or set ${API_KEY_ENV} / "
                    f"${ADMIN_API_KEY_ENV}{'; the key given was refused' if key else ''})")
        raise SGLangPullError(f"sglang: {method} {url} answered HTTP {exc.code} {exc.reason}: {body}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SGLangPullError(f"sglang: {method} {url} failed: {reason}") from None


def _server_info(base: str, timeout: float, key: str | None = None) -> dict[str, Any]:
    """``/server_info`` (newer SGLang) or ``/get_server_info``; ``{}`` when neither answers JSON."""
    for ep in ("/server_info", "/get_server_info"):
        try:
            obj = parse_json(f"sglang: {base + ep}", _request(base + ep, "GET", timeout, key), error=SGLangPullError)
        except SGLangPullError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def _dump_files(d: Path) -> dict[Path, float]:
    try:
        return {f: f.stat().st_mtime for f in d.glob(DUMP_GLOB) if f.is_file()}
    except OSError:
        return {}


def find_new_dump(
    dump_dir: Path,
    before: dict[Path, float],
    *,
    timeout: float,
    poll: float = 0.1,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """The dump file that appeared (or changed) in ``dump_dir`` since ``before``, once its size is stable.

    Raises :class:`SGLangPullError` after ``timeout`` seconds without one.
    """
    deadline = clock() + timeout
    last: tuple[Path, int] | None = None
    while True:
        now = _dump_files(dump_dir)
        fresh = [f for f, m in now.items() if f not in before or m > before[f]]
        if fresh:
            newest = max(fresh, key=lambda f: (now[f], f.name))
            size = newest.stat().st_size
            if size > 0 and last == (newest, size):
                return newest
            last = (newest, size)
        if clock() >= deadline:
            raise SGLangPullError(
                f"sglang: no new {DUMP_GLOB} appeared in {dump_dir} within {timeout:g} s after "
                "/dump_expert_distribution_record. SGLang writes the dump on the server's machine into "
                f"${DUMP_DIR_ENV} (default /tmp): pass that directory (or a shared mount of it) as --dump-dir"
            )
        sleep(poll)


def tidy_dump_trace(trace: Trace, *, source: str | None = None, model: str = "", ep_size: int = 0,
                    meta: dict[str, Any] | None = None) -> Trace:
    """A trace read from an SGLang ``stat`` dump, without the rows and layers that hold no data
    (:func:`eplb.stats.importers.clean_sglang_dump`, which every read of a raw dump applies), with
    the server's model, EP size and ``meta``."""
    from eplb.stats.importers import clean_sglang_dump

    tr = clean_sglang_dump(trace, source=source)
    tr.meta.update(meta or {})
    tr.model = model or tr.model
    tr.ep_size = int(ep_size) or tr.ep_size
    return tr


def read_dump(path: str | os.PathLike[str], **tidy: Any) -> Trace:
    """Read an SGLang expert-distribution dump with :func:`eplb.stats.importers.read_sglang` and tidy it.

    ``tidy`` goes to :func:`tidy_dump_trace` (``source``, ``model``, ``ep_size``, ``meta``).
    """
    from eplb.stats.importers import read_sglang

    try:
        tr = read_sglang(path)
    except TraceError as exc:
        if "records" in str(exc):  # per_pass / per_token dumps hold 'records', not 'logical_count'
            raise TraceError(f"{exc}: a per_pass/per_token dump; start SGLang with "
                             "--expert-distribution-recorder-mode stat") from None
        raise
    if tidy.get("source"):  # read_sglang cleaned the raw dump already
        tr.source = str(tidy["source"])
    tr.meta.update(tidy.get("meta") or {})
    tr.model = str(tidy.get("model") or tr.model)
    tr.ep_size = int(tidy.get("ep_size") or 0) or tr.ep_size
    return tr


def pull(
    url: str,
    seconds: float,
    *,
    dump_dir: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    dump_timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    on_event: Callable[[str], None] | None = None,
    api_key: str | None = None,
    admin_api_key: str | None = None,
) -> PullResult:
    """Record ``seconds`` of expert routing on the SGLang server at ``url`` and read the dump.

    Args:
        url: ``http://host:port`` of the SGLang server.
        seconds: recording window (the server must be serving traffic meanwhile).
        dump_dir: where the server writes dumps (its ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``);
            default: that variable here, else ``/tmp``.
        timeout: per-request HTTP timeout (s).
        dump_timeout: how long to wait for the dump file to appear (s).
        sleep: injectable for tests.
        on_event: called with a short progress line per step.
        api_key: SGLang's ``--api-key`` (default ``$EPLB_SGLANG_API_KEY``), sent as
            ``Authorization: Bearer``; never logged or put in a message.
        admin_api_key: SGLang's ``--admin-api-key`` (default ``$EPLB_SGLANG_ADMIN_API_KEY``), sent
            instead of ``api_key`` to the record/dump routes when given.

    Returns:
        A :class:`PullResult`; ``trace.counts`` is ``[passes, MoE layers, E]``.
    """
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--sglang: expected an http(s)://host:port URL, got {url!r}")
    if not (seconds >= 0 and np.isfinite(seconds)):
        raise ValueError(f"--seconds: expected a non-negative number of seconds, got {seconds!r}")
    d = Path(dump_dir if dump_dir is not None else os.environ.get(DUMP_DIR_ENV, "/tmp"))
    if not d.is_dir():
        raise ValueError(f"--dump-dir: {d} is not a directory (SGLang writes its dumps into ${DUMP_DIR_ENV} on the server)")
    say = on_event or (lambda _msg: None)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    admin = admin_api_key or os.environ.get(ADMIN_API_KEY_ENV) or None
    rec_key = admin or key

    info = _server_info(base, timeout, key or admin)
    mode = info.get("expert_distribution_recorder_mode", "unknown") if info else "unknown"
    if info and mode is None:
        raise SGLangPullError(
            f"sglang: the server at {base} runs without an expert distribution recorder; restart it with "
            "--expert-distribution-recorder-mode stat"
        )
    if mode not in ("stat", "stat_approx", "unknown"):
        raise SGLangPullError(
            f"sglang: the server at {base} records in mode {mode!r}; eplb reads 'stat' dumps: restart it with "
            "--expert-distribution-recorder-mode stat"
        )
    start, stop, dump = (base + ep for ep in ENDPOINTS)
    _request(start, "POST", timeout, rec_key)
    say(f"recording expert distribution on {base} for {seconds:g} s")
    try:
        if seconds > 0:
            sleep(seconds)
    finally:
        _request(stop, "POST", timeout, rec_key)
    before = _dump_files(d)
    _request(dump, "POST", timeout, rec_key)
    path = find_new_dump(d, before, timeout=dump_timeout, sleep=sleep)
    say(f"reading {path}")
    ep_size = info.get("ep_size", 0) if info else 0
    buf = info.get("expert_distribution_recorder_buffer_size") if info else None
    tr = read_dump(path, source=f"sglang: {base} expert distribution ({path.name})",
                   model=str(info.get("model_path", "")) if info else "",
                   ep_size=int(ep_size) if isinstance(ep_size, int) and 0 <= ep_size < 2**31 else 0,
                   meta={"sglang_url": base, "record_seconds": float(seconds), "recorder_mode": mode})
    if isinstance(buf, int) and buf > 0 and tr.num_steps >= buf:
        log.warning("eplb: %d forward passes filled SGLang's ring buffer of %d: older passes were overwritten and "
                    "the pass order may be rotated; start the server with --expert-distribution-recorder-buffer-size "
                    "-1 for an unbounded record", tr.num_steps, buf)
        tr.meta["sglang_buffer_wrapped"] = True
    return PullResult(tr, path, info)
