"""The offline flow as a library: load a trace, plan with provenance, evaluate, and the demo.

What the ``eplb plan`` / ``evaluate`` / ``demo`` commands do, callable without the CLI (the benchmarks
import it): :func:`load_trace` (``builtin:NAME`` or any trace format), :func:`plan_placement` (a policy
run whose ``meta`` records the trace digest, policy, parameters, in-sample imbalance, lower bound and
gap), :func:`evaluate_placement` (before/after tables, balanced dispatch, bound and gap),
:func:`read_placement_for_trace` (a map checked against a trace), :func:`is_trace_input` /
:func:`is_trace_output` / :func:`sglang_loads_file` (map or trace, for ``eplb convert`` / ``validate``),
:func:`replication_rows` (per-step replication of evaluated placements) and :func:`demo` (the whole flow
on a shipped real trace). The CLI (:mod:`eplb.cli.offline`) only parses options, renders tables and
calls these.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eplb._checks import check_layout
from eplb._io import atomic_write
from eplb.errors import InputError
from eplb.placement import Placement
from eplb.stats.trace import Trace, parse_range

if TYPE_CHECKING:
    from eplb.stats.report import LoadTable

__all__ = [
    "BUILTIN_PREFIX", "DEMO_FILES", "DEMO_TRACE", "DemoResult", "Evaluation", "demo", "evaluate_placement",
    "TRACE_ONLY_SUFFIXES", "golden_text", "is_trace_input", "is_trace_output", "load_trace", "parse_held_out", "plan_placement", "read_placement_for_trace", "replication_rows",
    "resolve_policy", "sglang_loads_file",
]

DEMO_TRACE = "llama4_maverick_mmlu_decode"
BUILTIN_PREFIX = "builtin:"


def load_trace(spec: str, iter_range: str | None = None) -> Trace:
    """A trace from ``builtin:NAME`` (shipped real traces) or a file/directory any ``eplb.stats`` reader accepts.

    ``iter_range`` ``"a-b"`` keeps steps with ids in ``[a, b)``.
    """
    if spec.startswith(BUILTIN_PREFIX):
        from eplb.datasets import load_builtin

        tr = load_builtin(spec[len(BUILTIN_PREFIX):])
        return tr.slice(iter_range) if iter_range else tr
    p = Path(spec)
    if not p.exists():
        raise InputError(f"trace: {spec}: no such file or directory (or use builtin:NAME for a shipped trace)")
    from eplb.stats.io import read_trace

    return read_trace(p, iter_range=iter_range)

def parse_held_out(spec: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``"0-64:64-128"`` -> ``((0, 64), (64, 128))``: plan on the first range, evaluate on the second."""
    plan_s, sep, eval_s = spec.partition(":")
    if not sep:
        raise InputError(f"held-out: expected PLAN_RANGE:EVAL_RANGE such as 0-64:64-128, got {spec!r}")
    a = parse_range(plan_s, "held-out plan range")
    b = parse_range(eval_s, "held-out eval range")
    assert a is not None and b is not None
    if b[0] < a[1]:
        raise InputError(f"held-out: the evaluation range {b[0]}-{b[1]} must start at or after the end of the plan "
                         f"range {a[0]}-{a[1]} (held-out means later steps)")
    return a, b


def fmt_range(rng: tuple[int, int] | None, trace: Trace) -> str:
    if rng is not None:
        return f"{rng[0]}-{rng[1]}"
    assert trace.step_ids is not None
    return f"{int(trace.step_ids[0])}-{int(trace.step_ids[-1]) + 1}"

@dataclass
class Evaluation:
    """One placement evaluated on one window of a trace.

    Attributes:
        label: row label.
        window: step range evaluated (``"a-b"``).
        table: per-layer mean / std / imbalance (TensorRT-LLM definition, uniform split over replicas).
        imbalance: average imbalance ratio (max/mean - 1 of rank load per step, averaged).
        max_load: mean over steps and layers of the max rank load (tokens per step).
        mean_load: mean rank load (tokens per step).
        balanced_imbalance / balanced_max_load: the same with per-step balanced dispatch
            (:func:`eplb.dispatch.split_counts`), when computed.
        dispatch_bound: mean per-step LP lower bound of the max rank load of this placement with perfect
            dispatch (:func:`eplb.dispatch.per_step_lower_bound`), when computed.
        lower_bound / gap: the placement-independent lower bound on the mean per-step max rank load for
            this slot and rank count (:func:`eplb.metrics.lower_bound`) and the optimality gap
            ``max rank load / bound - 1`` (:func:`eplb.metrics.optimality_gap`), both averaged over layers.
        balanced_layers: ``[L]`` per-layer imbalance with balanced dispatch (for the per-layer table).
    """

    label: str
    window: str
    table: LoadTable
    imbalance: float
    max_load: float
    mean_load: float
    num_slots: int
    num_ranks: int
    balanced_imbalance: float | None = None
    balanced_max_load: float | None = None
    dispatch_bound: float | None = None
    lower_bound: float | None = None
    gap: float | None = None
    balanced_layers: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("label", "window", "imbalance", "max_load", "mean_load", "num_slots",
                                          "num_ranks", "balanced_imbalance", "balanced_max_load", "dispatch_bound",
                                          "lower_bound", "gap")}
        d["per_layer"] = self.table.to_dict()["rows"]
        if self.balanced_layers is not None:
            d["balanced_imbalance_per_layer"] = [float(v) for v in self.balanced_layers]
        d.update(self.extra)
        return d


def bound_and_gap(counts: np.ndarray, placement: Placement) -> tuple[float, float]:
    """(lower bound, gap), each averaged over layers.

    The bound (:func:`eplb.metrics.lower_bound`) is on the mean per-step max rank load of ANY static
    placement with this slot and rank count; the gap (:func:`eplb.metrics.optimality_gap`) is
    ``max rank load / bound - 1`` per layer.
    """
    from eplb.metrics import lower_bound, optimality_gap

    lb = np.asarray(lower_bound(counts, placement.num_slots, placement.num_ranks), dtype=np.float64)
    gap = np.asarray(optimality_gap(counts, placement, bound=lb), dtype=np.float64)  # the bound computed once
    return float(lb.mean()), float(gap.mean())


def evaluate_placement(
    trace: Trace,
    placement: Placement | None,
    ep_size: int | None = None,
    *,
    label: str = "",
    dispatch: bool = True,
    bound: bool = True,
) -> Evaluation:
    """Evaluate ``placement`` (None = no EPLB: slot ``e`` holds expert ``e``) on every step of ``trace``.

    The placement's rows are matched to the trace's layers by model layer id (positional for
    files that number MoE layers ``0..L-1``). ``ep_size`` is needed only without a placement.
    """
    from eplb.metrics import rank_loads
    from eplb.stats.report import align_placement, load_table

    c = trace.counts
    T, L, E = c.shape
    if placement is None:
        if not ep_size:
            raise InputError("ep-size: needed to evaluate without a placement")
        if E % ep_size:
            raise InputError(f"ep-size: {E} experts (no EPLB: one slot per expert) are not divisible by ep_size={ep_size}")
        pl = Placement.contiguous(L, E, int(ep_size), layer_ids=trace.layer_ids)
    else:
        if ep_size and ep_size != placement.num_ranks:
            raise InputError(f"ep-size: {ep_size} given, but the placement is for {placement.num_ranks} ranks")
        pl = align_placement(placement, trace.layer_ids, E)
    table = load_table(trace, pl.num_ranks, None if placement is None else pl)
    rl = rank_loads(c, pl)  # [T, L, R]
    ev = Evaluation(
        label=label or (str(pl.meta.get("policy", "placement")) if placement is not None else "no EPLB"),
        window=fmt_range(None, trace), table=table, imbalance=table.average[2],
        max_load=float(rl.max(-1).mean()), mean_load=float(rl.mean()), num_slots=pl.num_slots, num_ranks=pl.num_ranks,
    )
    if dispatch and pl.num_slots > E:
        from eplb.dispatch import per_step_lower_bound, split_rank_loads
        from eplb.metrics import imbalance_ratio

        brl = np.asarray(split_rank_loads(c, pl, "balanced"), dtype=np.float64)  # [T, L, R]
        per_layer = imbalance_ratio(brl).mean(0)
        ev.balanced_layers = per_layer
        ev.balanced_imbalance = float(per_layer.mean())
        ev.balanced_max_load = float(brl.max(-1).mean())
        if bound:
            ev.dispatch_bound = float(np.asarray(per_step_lower_bound(c, pl)).mean())
        ev.extra["auto_dispatch"] = auto_dispatch(c, pl, brl)
    elif dispatch:  # no replicas: every token has one slot, balanced dispatch is the static split
        ev.balanced_layers = table.imbalance
        ev.balanced_imbalance, ev.balanced_max_load = ev.imbalance, ev.max_load
    if bound:
        ev.lower_bound, ev.gap = bound_and_gap(c, pl)
    if trace.topk_ids is not None or trace.top_k or trace.cooccurrence is not None:
        from eplb.metrics import comm_stats

        fan = comm_stats(pl, topk_ids=trace.topk_ids, cooccurrence=trace.cooccurrence, counts=c, top_k=trace.top_k)
        if "mean_ranks" in fan:
            ev.extra.update(ranks_per_token=round(fan["mean_ranks"], 4), nodes_per_token=round(fan["mean_nodes"], 4),
                            fanout_method=fan["method"])
        if "mean_cross_node_pairs" in fan:
            ev.extra.update(cross_node_pairs=round(fan["mean_cross_node_pairs"], 4),
                            cross_node_fraction=round(fan["cross_node_fraction"], 4))
    return ev

def read_placement_for_trace(path: Path, fmt: str | None, tr: Trace, trace_spec: str, **kw: Any) -> Placement:
    """Read the map at ``path`` aligned to ``tr`` (its experts and layers, :func:`eplb.stats.report.align_placement`).

    A map that does not fit raises :class:`~eplb.errors.InputError` naming ``trace_spec``; a bad file
    raises its own problem. ``kw`` goes to :func:`eplb.formats.read_placement`.
    """
    from eplb.formats import FORMATS, MapFormatError, detect_map_format, read_placement
    from eplb.stats.report import align_placement

    if FORMATS[fmt or detect_map_format(path)].layer_axis == "moe" and "layer_ids" not in kw:
        # rows numbered by MoE layer: label them with the trace's model layer ids, so that every
        # message (an out-of-range expert id, a missing expert) names the model layer
        try:
            read_placement(path, fmt, **kw, layer_ids=tr.layer_ids)
            kw["layer_ids"] = tr.layer_ids
        except MapFormatError as exc:
            if "layer ids given" not in str(exc) and "no row for layer" not in str(exc):
                kw["layer_ids"] = tr.layer_ids
    try:
        pl = read_placement(path, fmt, num_experts=tr.num_experts, **kw)
    except MapFormatError as exc:
        alone = read_placement(path, fmt, **kw)  # raises the file's own problem, if it has one
        msg = str(exc).removeprefix(f"{path}: ")
        raise InputError(f"{path}: does not fit trace {trace_spec} ({tr.num_experts} experts, {alone.num_experts} in the "
                         f"map): {msg}") from None
    try:
        return align_placement(pl, tr.layer_ids, tr.num_experts).with_meta(**pl.meta)
    except ValueError as exc:
        raise InputError(f"{path}: does not fit trace {trace_spec}: {exc}") from None


def replication_rows(trace: Trace, runs: Sequence[tuple[Evaluation, Placement]], dynamic_slots: Sequence[int],
                     budget: float | None) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """Per-step replication (:func:`eplb.dispatch.replication.replicated_rank_loads`) of every evaluated
    placement on ``trace``: ``(title, [(label, row), ...])``, one row per (placement, D dynamic slots per
    rank). Each evaluation's ``extra["replication"]`` gets its rows (they go to its JSON). Copies are
    capped per rank by ``budget`` ms per layer (:func:`eplb.sim.replication.replication_caps`) with the
    cost model of the trace's model (as ``eplb simulate``)."""
    from eplb.dispatch.replication import replicated_rank_loads
    from eplb.metrics import imbalance_ratio
    from eplb.sim.cost import default_cost_model, expert_shape
    from eplb.sim.replication import copy_ms, replication_caps
    from eplb.stats.report import align_placement

    cm = default_cost_model()
    shape, _ = expert_shape(trace.model, trace.meta)
    if shape:
        cm = cm.with_(**shape)
    one = copy_ms(cm)
    title = (f"Per-step replication (copy = {one:.3f} ms per {cm.hidden_size} x {cm.moe_intermediate_size} "
             f"x {cm.dtype_bytes}-byte expert, {cm.device}; budget "
             f"{'none' if budget is None else f'{budget:.3f} ms per layer'})")
    out: list[tuple[str, dict[str, Any]]] = []
    for ev, placement in runs:
        pl = align_placement(placement, trace.layer_ids, trace.num_experts)
        rows = []
        for d in dynamic_slots:
            recv, send = replication_caps(cm, d, pl.num_ranks, budget)
            loads, plan = replicated_rank_loads(trace.counts, pl, d, start="uniform", max_recv=recv, max_send=send)
            used = (plan.dyn_expert >= 0).sum(-1)
            sent = (plan.dyn_source[..., None] == np.arange(pl.num_ranks)).sum((-3, -2)) if d else used
            cms = float((np.maximum(used, sent).max(-1) * one).max()) if d else 0.0
            rows.append({"dynamic_slots": d, "max_recv": recv, "max_send": send, "transfer_budget_ms": budget,
                         "imbalance": float(imbalance_ratio(loads).mean()), "max_load": float(loads.max(-1).mean()),
                         "copies_per_layer": float(plan.copies.mean()), "copy_ms_per_layer_max": cms})
        ev.extra["replication"] = rows
        out += [(ev.label, r) for r in rows]
    return title, out


# ----------------------------------------------------------------- map or trace (eplb convert / validate)
#: suffixes only load traces use (never an engine map)
TRACE_ONLY_SUFFIXES = (".safetensors", ".npy", ".npz", ".csv")


def sglang_loads_file(path: Path, *, with_map: bool = True) -> bool:
    """``path`` is SGLang's load form (a ``logical_count`` dump: loads, not a placement). ``with_map=False``:
    not when it also holds a ``physical_to_logical_map``. Unreadable or trace-only files: False."""
    from eplb.formats import _parse
    from eplb.formats._common import read_bytes

    if path.is_dir() or path.suffix.lower() in TRACE_ONLY_SUFFIXES:
        return False
    try:
        fmt, obj = _parse(path, read_bytes(path))
    except ValueError:
        return False
    return (fmt == "sglang" and isinstance(obj, dict) and "logical_count" in obj
            and (with_map or "physical_to_logical_map" not in obj))


def is_trace_input(path: Path, from_: str | None) -> bool:
    """Whether ``eplb convert`` reads ``path`` as a load trace: ``from_`` names a trace-only format, or the
    path is a directory / has a trace-only suffix / parses as no map / is an SGLang ``logical_count`` dump
    (unless ``from_`` is ``sglang``). Map formats decide the rest (:func:`eplb.formats.detect_map_format`)."""
    from eplb.formats import FORMATS, UnknownMapFormat, _parse
    from eplb.formats._common import read_bytes

    if from_ is not None:
        if from_ in FORMATS and from_ not in ("trtllm", "sglang", "vllm-ascend"):
            return False
        from eplb.stats.io import FORMATS as TRACE_FORMATS

        if from_ not in FORMATS:
            if from_ not in TRACE_FORMATS:
                raise InputError(f"from: unknown format {from_!r}; map formats: {', '.join(FORMATS)}; "
                                 f"trace formats: {', '.join(TRACE_FORMATS)}")
            return True
    if path.is_dir() or path.suffix.lower() in TRACE_ONLY_SUFFIXES:
        return True
    try:
        fmt, obj = _parse(path, read_bytes(path))
    except UnknownMapFormat:
        if from_ in FORMATS:
            raise
        return True  # parses, but is no map: let the trace readers say what it is
    return fmt == "sglang" and isinstance(obj, dict) and "logical_count" in obj and from_ != "sglang"


def is_trace_output(output: Path, to: str | None) -> bool:
    """Whether ``eplb convert`` writes a trace: ``to`` names a trace-only format, or ``output`` is a directory,
    has no suffix or a trace-only suffix (``.safetensors .npy .npz .csv``). Otherwise it is a map."""
    from eplb.formats import FORMATS
    from eplb.stats.io import FORMATS as TRACE_FORMATS

    if to is not None:
        return to in TRACE_FORMATS and to not in FORMATS
    return output.is_dir() or output.suffix == "" or output.suffix.lower() in TRACE_ONLY_SUFFIXES


def auto_dispatch(counts: np.ndarray, placement: Placement, balanced_loads: np.ndarray) -> dict[str, Any]:
    """``strategy="auto"``'s per-layer choice on these counts with the default (measured) cost model."""
    from eplb.dispatch.auto import auto_strategies, auto_summary
    from eplb.sim.cost import default_cost_model

    cm = default_cost_model()
    out = auto_summary(auto_strategies(counts, placement, cm.compute_ms, balanced_loads=balanced_loads))
    out["cost_model"] = f"{cm.device}, {cm.date}"
    return out


def golden_text(before: Evaluation, after: Evaluation, extra: Sequence[Evaluation]) -> str:
    """Deterministic plain-text report (no timings, no paths): the demo's golden output."""
    lines = [f"before: {before.label} on steps {before.window} ({before.num_slots} slots / {before.num_ranks} ranks)",
             before.table.to_text(), "",
             f"after: {after.label} on steps {after.window} ({after.num_slots} slots / {after.num_ranks} ranks)",
             after.table.to_text(), "", "summary:"]
    for ev in (before, after, *extra):
        parts = [f"{ev.label} | steps {ev.window} | imbalance {ev.imbalance:.6f} | max rank load {ev.max_load:.4f}"]
        if ev.balanced_imbalance is not None:
            parts.append(f"balanced dispatch imbalance {ev.balanced_imbalance:.6f}")
        if ev.lower_bound is not None and ev.gap is not None:
            parts.append(f"lower bound {ev.lower_bound:.4f} | gap {ev.gap:.6f}")
        lines.append(" | ".join(parts))
    return "\n".join(lines) + "\n"

def resolve_policy(policy: str | None, num_groups: int = 1, num_nodes: int = 1) -> str:
    """``policy`` checked against the registry, or the best registered one for the layout
    (:func:`eplb.formats.default_policy`)."""
    from eplb.formats import default_policy
    from eplb.policies import policy_info

    if policy is None:
        return default_policy(num_groups, num_nodes)
    return policy_info(policy).name


def plan_placement(
    trace: Trace,
    *,
    ep_size: int,
    num_slots: int | None = None,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str | None = None,
    trace_spec: str = "",
    iter_range: str | None = None,
    options: dict[str, Any] | None = None,
) -> Placement:
    """Plan a placement from ``trace`` with provenance in ``meta`` (trace hash, policy, parameters, bound, gap)."""
    from eplb import __version__
    from eplb.policies import plan

    pol = resolve_policy(policy, num_groups, num_nodes)
    S = int(num_slots) if num_slots is not None else trace.num_experts
    check_layout(trace.num_experts, S, int(ep_size), int(num_nodes), num_groups=int(num_groups),
                 names=("num-slots", "ep-size", "num-nodes", "num-groups"))
    meta = {
        "trace": trace_spec, "trace_digest": trace.digest(), "model": trace.model,
        "iter_range": iter_range or fmt_range(None, trace), "num_steps": trace.num_steps,
        "eplb_version": __version__,
    }
    opts = dict(options or {})
    if pol == "eplb-cooc" and "topk_ids" not in opts and "cooccurrence" not in opts:  # the trace's co-activated pairs
        opts.update(topk_ids=trace.topk_ids) if trace.topk_ids is not None else opts.update(cooccurrence=trace.cooccurrence)
    pl = plan(trace.counts, S, int(ep_size), num_nodes=int(num_nodes), num_groups=int(num_groups), policy=pol,
              layer_ids=trace.layer_ids, meta=meta, **opts)
    ev = evaluate_placement(trace, pl, dispatch=False, bound=True)
    info: dict[str, Any] = {"in_sample_imbalance": round(ev.imbalance, 6), "in_sample_max_load": round(ev.max_load, 4)}
    if ev.lower_bound is not None and ev.gap is not None:
        info.update(lower_bound=round(ev.lower_bound, 4), optimality_gap=round(ev.gap, 6))
    return pl.with_meta(**info)

@dataclass
class DemoResult:
    """What :func:`demo` did: the evaluations, the files written and checked, plots, and the golden text."""

    out_dir: Path
    before: Evaluation
    after: Evaluation
    extra: list[Evaluation]
    files: dict[str, Path]
    plots: list[Path]
    golden: str
    timings: dict[str, float]


DEMO_FILES = {
    "trtllm": "moe_load_balancer.yaml",
    "vllm-ascend": "expert_map.json",
    "sglang": "sglang_init_expert_location.json",
    "vllm": "vllm_eplb_maps.pt",
    "native": "placement.eplb.json",
}


def check_read_back(path: Path, fmt: str, pl: Placement) -> None:
    """Read ``path`` back and require the same placement (what the format records of it)."""
    from eplb.formats import read_placement

    back = read_placement(path, fmt, num_experts=pl.num_experts, ep_size=pl.num_ranks, layer_ids=pl.layer_ids)
    if not np.array_equal(back.phy2log, pl.phy2log) or back.layer_ids != pl.layer_ids or back.num_ranks != pl.num_ranks:
        raise InputError(f"{path}: read back a different placement than was written ({fmt})")


def demo(
    out_dir: Path | None = None,
    *,
    trace_name: str = DEMO_TRACE,
    ep_size: int = 16,
    num_slots: int = 144,
    plan_range: tuple[int, int] = (0, 64),
    eval_range: tuple[int, int] = (64, 128),
    policy: str | None = None,
    plots: bool = True,
    dispatch: bool = True,
    echo: Any = print,
) -> DemoResult:
    """The whole offline flow on a shipped real trace; returns what it did (see :class:`DemoResult`).

    1. report the load without EPLB; 2. plan with the best policy on ``plan_range``; 3. write the
    placement in every format and read each back; 4. evaluate it on the later ``eval_range``
    (held-out) and in-sample; 5. write the plots and ``summary.txt`` / ``summary.json``.
    """
    from eplb.formats import write_placement

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="eplb-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = BUILTIN_PREFIX + trace_name
    tr = load_trace(spec)
    tr_plan, tr_eval = tr.slice(plan_range), tr.slice(eval_range)
    pol = resolve_policy(policy)
    echo(f"[1/5] trace {spec}: {tr.model}, {tr.num_steps} steps x {tr.num_layers} MoE layers x {tr.num_experts} experts "
         f"(top-{tr.top_k}, REAL routing; {tr.source})")
    before = evaluate_placement(tr_eval, None, ep_size, label="no EPLB", dispatch=dispatch)
    timings["report"] = time.perf_counter() - t0
    echo(f"      without EPLB on {ep_size} ranks: imbalance {before.imbalance:.3f} on steps {before.window}")

    t1 = time.perf_counter()
    opts: dict[str, Any] = {}
    if pol.startswith("eplb"):
        opts["max_replicas"] = ep_size  # vllm-ascend holds one slot per expert per device
    pl = plan_placement(tr_plan, ep_size=ep_size, num_slots=num_slots, policy=pol, trace_spec=spec,
                        iter_range=f"{plan_range[0]}-{plan_range[1]}", options=opts)
    timings["plan"] = time.perf_counter() - t1
    echo(f"[2/5] planned with policy {pol!r} on steps {plan_range[0]}-{plan_range[1]}: {num_slots} slots over {ep_size} "
         f"ranks, max {pl.max_replicas} replicas ({timings['plan'] * 1000:.0f} ms)")

    t2 = time.perf_counter()
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for fmt, name in DEMO_FILES.items():
        path = out / name
        opts_w: dict[str, Any] = {"layer_updates_per_iter": 0} if fmt == "trtllm" else {}
        if fmt == "vllm-ascend" and pl.colocated_duplicates().sum():
            skipped[fmt] = (f"the {pol} placement puts {int(pl.colocated_duplicates().sum())} replica(s) on a rank that "
                            "already holds that expert; vllm-ascend holds one slot per expert per device")
            continue
        write_placement(pl, path, fmt, **opts_w)
        check_read_back(path, fmt, pl)
        files[fmt] = path
    timings["write+validate"] = time.perf_counter() - t2
    echo(f"[3/5] wrote and read back {len(files)} formats in {out}: " + ", ".join(f"{k}={v.name}" for k, v in files.items()))
    for fmt, why in skipped.items():
        echo(f"      {fmt} not written: {why}")

    t3 = time.perf_counter()
    after = evaluate_placement(tr_eval, pl, label=f"{pol} planned on {plan_range[0]}-{plan_range[1]} (held-out)",
                               dispatch=dispatch)
    in_sample = evaluate_placement(tr_plan, pl, label=f"{pol} planned on {plan_range[0]}-{plan_range[1]} (in-sample)",
                                   dispatch=False)
    extra = [in_sample]
    timings["evaluate"] = time.perf_counter() - t3
    echo(f"[4/5] evaluated on held-out steps {after.window}: imbalance {before.imbalance:.3f} -> {after.imbalance:.3f}"
         + (f" (balanced dispatch {after.balanced_imbalance:.3f})" if after.balanced_imbalance is not None else ""))

    t4 = time.perf_counter()
    plot_files: list[Path] = []
    if plots:
        from eplb.stats.plots import plot_report

        plot_files = list(plot_report(tr_eval.counts, {"no EPLB": None, pol: pl}, ep_size, out / "plots"))
    golden = golden_text(before, after, extra)
    atomic_write(out / "summary.txt", golden.encode())
    summary = {"trace": spec, "policy": pol, "ep_size": ep_size, "num_slots": num_slots,
               "plan_range": list(plan_range), "eval_range": list(eval_range),
               "evaluations": [e.to_dict() for e in (before, after, *extra)],
               "files": {k: v.name for k, v in files.items()}, "placement_digest": pl.digest()}
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    timings["plots+summary"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    echo(f"[5/5] wrote {len(plot_files)} plot(s), summary.txt and summary.json in {out}")
    return DemoResult(out, before, after, extra, files, plot_files, golden, timings)
