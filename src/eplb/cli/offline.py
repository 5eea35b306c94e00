"""CLI commands of the offline flow: ``plan``, ``validate``, ``convert``, ``evaluate``, ``demo``.

Steps 2-3 of the offline flow (TensorRT-LLM's ``generate_eplb_config.py`` and the second
``report_load_statistics.py`` run, for every engine):

* ``eplb plan TRACE --ep-size 36 --num-slots 288 -o moe_load_balancer.yaml`` plans a placement from a
  recorded trace and writes it in any engine's map format;
* ``eplb validate MAP`` checks a map of any format and names the exact problem;
* ``eplb convert IN OUT`` converts between map formats (and delegates load traces to ``eplb.stats``);
* ``eplb evaluate TRACE --placement MAP`` prints the before/after load table, the lower bound and gap,
  balanced-dispatch numbers, and a held-out evaluation (plan on one range, evaluate on a later one);
* ``eplb demo`` runs all of it on the shipped real Llama-4-Maverick trace.

Bad input raises ``ValueError`` (the app's ``main()`` prints ``eplb: error: ...`` and exits 2);
outputs are written atomically or not at all.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from eplb.cli._args import check_layout_args, check_output
from eplb.placement import Placement
from eplb.stats.trace import Trace, atomic_write, parse_range

if TYPE_CHECKING:
    from eplb.stats.report import LoadTable

__all__ = [
    "DEMO_TRACE",
    "Evaluation",
    "demo",
    "evaluate_placement",
    "load_trace",
    "parse_held_out",
    "register",
]

DEMO_TRACE = "llama4_maverick_mmlu_decode"
BUILTIN_PREFIX = "builtin:"
TRACE_ONLY_SUFFIXES = (".safetensors", ".npy", ".npz", ".csv")


# ============================================================================ helpers
def _console() -> Any:
    from rich.console import Console

    return Console(width=140)


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
        raise ValueError(f"trace: {spec}: no such file or directory (or use builtin:NAME for a shipped trace)")
    from eplb.stats.importers import read_trace

    return read_trace(p, iter_range=iter_range)


def _parse_options(options: Sequence[str] | None) -> dict[str, Any]:
    """``["max_replicas=16", "x=0.5"]`` -> ``{"max_replicas": 16, "x": 0.5}`` (ints, floats, bools, strings)."""
    out: dict[str, Any] = {}
    for opt in options or ():
        key, sep, val = opt.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option: expected KEY=VALUE, got {opt!r}")
        v: Any = val.strip()
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                continue
        if isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        out[key.strip().replace("-", "_")] = v
    return out


def _parse_layer_ids(spec: str | None) -> list[int] | None:
    """``"1,3,5-9"`` or ``"1-47:2"`` (inclusive ranges, optional step) -> list of ints."""
    if spec is None:
        return None
    try:
        out: list[int] = []
        for part in spec.split(","):
            rng, _, step = part.strip().partition(":")
            a, sep, b = rng.partition("-")
            out.extend(range(int(a), int(b) + 1, int(step or 1)) if sep else [int(a)])
    except ValueError:
        raise ValueError(f"layer-ids: expected a list like '1,3,5-9' or '1-47:2', got {spec!r}") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"layer-ids: expected distinct layer ids, got {spec!r}")
    return out


def parse_held_out(spec: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``"0-64:64-128"`` -> ``((0, 64), (64, 128))``: plan on the first range, evaluate on the second."""
    plan_s, sep, eval_s = spec.partition(":")
    if not sep:
        raise ValueError(f"held-out: expected PLAN_RANGE:EVAL_RANGE such as 0-64:64-128, got {spec!r}")
    a = parse_range(plan_s, "held-out plan range")
    b = parse_range(eval_s, "held-out eval range")
    assert a is not None and b is not None
    if b[0] < a[1]:
        raise ValueError(f"held-out: the evaluation range {b[0]}-{b[1]} must start at or after the end of the plan "
                         f"range {a[0]}-{a[1]} (held-out means later steps)")
    return a, b


def _fmt_range(rng: tuple[int, int] | None, trace: Trace) -> str:
    if rng is not None:
        return f"{rng[0]}-{rng[1]}"
    assert trace.step_ids is not None
    return f"{int(trace.step_ids[0])}-{int(trace.step_ids[-1]) + 1}"


# ========================================================================= evaluation
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


def _bound_and_gap(counts: np.ndarray, placement: Placement) -> tuple[float, float]:
    """(lower bound, gap), each averaged over layers.

    The bound (:func:`eplb.metrics.lower_bound`) is on the mean per-step max rank load of ANY static
    placement with this slot and rank count; the gap (:func:`eplb.metrics.optimality_gap`) is
    ``max rank load / bound - 1`` per layer.
    """
    from eplb.metrics import lower_bound, optimality_gap

    lb = np.asarray(lower_bound(counts, placement.num_slots, placement.num_ranks), dtype=np.float64)
    gap = np.asarray(optimality_gap(counts, placement), dtype=np.float64)
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
            raise ValueError("ep-size: needed to evaluate without a placement")
        if E % ep_size:
            raise ValueError(f"ep-size: {E} experts (no EPLB: one slot per expert) are not divisible by ep_size={ep_size}")
        pl = Placement.contiguous(L, E, int(ep_size), layer_ids=trace.layer_ids)
    else:
        if ep_size and ep_size != placement.num_ranks:
            raise ValueError(f"ep-size: {ep_size} given, but the placement is for {placement.num_ranks} ranks")
        pl = align_placement(placement, trace.layer_ids, E)
    table = load_table(trace, pl.num_ranks, None if placement is None else pl)
    rl = rank_loads(c, pl)  # [T, L, R]
    ev = Evaluation(
        label=label or (str(pl.meta.get("policy", "placement")) if placement is not None else "no EPLB"),
        window=_fmt_range(None, trace), table=table, imbalance=table.average[2],
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
        ev.extra["auto_dispatch"] = _auto_dispatch(c, pl, brl)
    elif dispatch:  # no replicas: every token has one slot, balanced dispatch is the static split
        ev.balanced_layers = table.imbalance
        ev.balanced_imbalance, ev.balanced_max_load = ev.imbalance, ev.max_load
    if bound:
        ev.lower_bound, ev.gap = _bound_and_gap(c, pl)
    if trace.topk_ids is not None or trace.top_k:
        from eplb.metrics import fanout_per_token

        fan = fanout_per_token(pl, topk_ids=trace.topk_ids, counts=c, top_k=trace.top_k)
        ev.extra.update(ranks_per_token=round(fan["mean_ranks"], 4), nodes_per_token=round(fan["mean_nodes"], 4),
                        fanout_method=fan["method"])
    return ev


def _auto_dispatch(counts: np.ndarray, placement: Placement, balanced_loads: np.ndarray) -> dict[str, Any]:
    """``strategy="auto"``'s per-layer choice on these counts with the default (measured) cost model."""
    from eplb.dispatch.auto import auto_strategies, auto_summary
    from eplb.sim.cost import default_cost_model

    cm = default_cost_model()
    out = auto_summary(auto_strategies(counts, placement, cm.compute_ms, balanced_loads=balanced_loads))
    out["cost_model"] = f"{cm.device}, {cm.date}"
    return out


def _summary_table(evals: Sequence[Evaluation], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("placement", min_width=26)
    for col in ("steps", "slots/ranks", "imbalance", "max rank load", "imbalance, balanced dispatch",
                "dispatch bound", "lower bound", "gap"):
        t.add_column(col, justify="right", max_width=14)

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for ev in evals:
        t.add_row(ev.label, ev.window, f"{ev.num_slots}/{ev.num_ranks}", f"{ev.imbalance:.4f}", f"{ev.max_load:.2f}",
                  f(ev.balanced_imbalance, ".4f"), f(ev.dispatch_bound, ".2f"), f(ev.lower_bound, ".2f"), f(ev.gap, ".2%"))
    return t


def _print_fanout(evals: Sequence[Evaluation]) -> None:
    """Ranks and nodes one token is sent to (all-to-all fan-out), where the trace allows it."""
    for ev in evals:
        if "ranks_per_token" in ev.extra:
            how = ("exact from the tokens' top-k ids" if ev.extra["fanout_method"] == "topk_ids"
                   else "expected from counts, independent choices")
            print(f"{ev.label}: {ev.extra['ranks_per_token']:.2f} ranks and {ev.extra['nodes_per_token']:.2f} nodes "
                  f"per token ({how}; uniform replica choice)")


def _per_layer_table(before: Evaluation, after: Evaluation, title: str) -> Any:
    """Side-by-side per-layer table (TensorRT-LLM's report columns, before and after)."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("layer", justify="right")
    t.add_column("mean", justify="right")
    for name in ("before", "after"):
        t.add_column(f"std {name}", justify="right")
        t.add_column(f"imbalance {name}", justify="right")
    if after.balanced_layers is not None:
        t.add_column("imbalance after, balanced dispatch", justify="right")
    b_rows, a_rows = list(before.table.rows()), list(after.table.rows())
    for i, (b, a) in enumerate(zip(b_rows, a_rows, strict=True)):
        last = i == len(b_rows) - 1
        cells = [b[0], f"{a[1]:.2f}", f"{b[2]:.4f}", f"{b[3]:.4f}", f"{a[2]:.4f}", f"{a[3]:.4f}"]
        if after.balanced_layers is not None:
            v = float(np.mean(after.balanced_layers)) if last else float(after.balanced_layers[i])
            cells.append(f"{v:.4f}")
        t.add_row(*cells, style="bold" if last else None, end_section=i == len(b_rows) - 2)
    return t


def _golden_text(before: Evaluation, after: Evaluation, extra: Sequence[Evaluation]) -> str:
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


# ============================================================================ plan
def _best_policy(policy: str | None, num_groups: int = 1, num_nodes: int = 1) -> str:
    from eplb.formats import default_policy
    from eplb.policies import load_policy_plugins

    if policy is None:
        return default_policy(num_groups, num_nodes)
    POLICIES = load_policy_plugins()
    if policy not in POLICIES:
        raise ValueError(f"policy: unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    return policy


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

    pol = _best_policy(policy, num_groups, num_nodes)
    S = int(num_slots) if num_slots is not None else trace.num_experts
    check_layout_args(trace.num_experts, S, int(ep_size), int(num_nodes), int(num_groups))
    meta = {
        "trace": trace_spec, "trace_digest": trace.digest(), "model": trace.model,
        "iter_range": iter_range or _fmt_range(None, trace), "num_steps": trace.num_steps,
        "eplb_version": __version__,
    }
    pl = plan(trace.counts, S, int(ep_size), num_nodes=int(num_nodes), num_groups=int(num_groups), policy=pol,
              layer_ids=trace.layer_ids, meta=meta, **(options or {}))
    ev = evaluate_placement(trace, pl, dispatch=False, bound=True)
    info: dict[str, Any] = {"in_sample_imbalance": round(ev.imbalance, 6), "in_sample_max_load": round(ev.max_load, 4)}
    if ev.lower_bound is not None and ev.gap is not None:
        info.update(lower_bound=round(ev.lower_bound, 4), optimality_gap=round(ev.gap, 6))
    return pl.with_meta(**info)


def plan_cmd(
    trace: Annotated[str, typer.Argument(help="Trace file/directory any eplb.stats reader accepts, or builtin:NAME.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Map file to write.")],
    ep_size: Annotated[int | None, typer.Option("--ep-size", min=1, help="EP ranks (default: the trace's).")] = None,
    num_slots: Annotated[int | None, typer.Option("--num-slots", help="Physical slots per layer (default: experts).")] = None,
    num_nodes: Annotated[int, typer.Option("--num-nodes", help="Nodes (divides ep-size).")] = 1,
    num_groups: Annotated[int, typer.Option("--num-groups", help="Expert groups (hierarchical policies).")] = 1,
    policy: Annotated[str | None, typer.Option("--policy", help="Policy name (default: the best registered, 'eplb').")] = None,
    iter_range: Annotated[str | None, typer.Option("--iter-range", help="Steps a-b (start inclusive, stop exclusive).")] = None,
    layer_updates_per_iter: Annotated[int, typer.Option("--layer-updates-per-iter", help="TensorRT-LLM: layers updated online per iteration (0 = static).")] = 0,
    format: Annotated[str | None, typer.Option("--format", "-f", help="trtllm | vllm-ascend | sglang | vllm | native (default: from the suffix).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Policy option KEY=VALUE (repeatable), e.g. max_replicas=16.")] = None,
    num_layers: Annotated[int | None, typer.Option("--num-layers", help="sglang: model layers (rows) to write, for trailing dense layers.")] = None,
    trtllm_ep_size: Annotated[bool, typer.Option("--trtllm-ep-size", help="trtllm: also write 'ep_size' (for report_load_statistics.py --projection_eplb_config_path; TensorRT-LLM's serving loader rejects it).")] = False,
    layer_ids: Annotated[str | None, typer.Option("--layer-ids", help="Model layer ids of the trace's MoE layers, e.g. '1-26' (labels a trace numbered 0..L-1, else selects those layers).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Plan a placement from a trace and write it as an engine map (TensorRT-LLM generate_eplb_config.py)."""
    from eplb.formats import format_for_path, write_placement

    fmt = format_for_path(output, format)  # fail before any work on a bad name
    check_output(output, force)
    if layer_updates_per_iter < 0:
        raise ValueError(f"layer-updates-per-iter: expected >= 0, got {layer_updates_per_iter}")
    if num_layers is not None and fmt != "sglang":
        raise ValueError("num-layers: only used by the sglang format")
    lids = _parse_layer_ids(layer_ids)  # fail before any work on a bad list
    tr = load_trace(trace, iter_range)
    if lids is not None:
        tr = tr.with_layer_ids(lids)
    ep = ep_size or tr.ep_size  # --ep-size 0 is refused by the option itself (min=1)
    if not ep:
        raise ValueError("ep-size: the trace does not record an EP size; pass --ep-size")
    t0 = time.perf_counter()
    pl = plan_placement(tr, ep_size=ep, num_slots=num_slots, num_nodes=num_nodes, num_groups=num_groups, policy=policy,
                        trace_spec=trace, iter_range=iter_range, options=_parse_options(option))
    dt = time.perf_counter() - t0
    pl = pl.with_meta(layer_updates_per_iter=layer_updates_per_iter)
    opts: dict[str, Any] = {}
    if fmt == "trtllm":
        opts["layer_updates_per_iter"] = layer_updates_per_iter
        opts["with_ep_size"] = trtllm_ep_size
    elif trtllm_ep_size:
        raise ValueError("trtllm-ep-size: only used by the trtllm format")
    if num_layers is not None:
        opts["num_layers"] = num_layers
    write_placement(pl, output, fmt, **opts)
    before = evaluate_placement(tr, None, ep, dispatch=False, bound=False) if tr.num_experts % ep == 0 else None
    m = pl.meta
    print(f"wrote {output} ({fmt}): {pl.num_layers} layers, {pl.num_experts} experts -> {pl.num_slots} slots over "
          f"{pl.num_ranks} ranks ({pl.slots_per_rank} per rank), policy {m['policy']}, max {pl.max_replicas} replicas")
    line = f"trace {trace} steps {m['iter_range']} ({tr.num_steps} steps): imbalance "
    line += f"{before.imbalance:.4f} without EPLB -> " if before is not None else ""
    line += f"{m['in_sample_imbalance']:.4f} in-sample"
    if "lower_bound" in m:
        line += f"; max rank load {m['in_sample_max_load']:.2f} vs lower bound {m['lower_bound']:.2f} (gap {m['optimality_gap']:.2%})"
    print(line + f"; planned in {dt * 1000:.0f} ms")
    _serving_hint(fmt, output, pl)


def _serving_hint(fmt: str, output: Path, pl: Placement) -> None:
    """How to serve the written map, per engine version where the options differ."""
    if fmt == "vllm-ascend":
        from eplb.formats.vllm_ascend import serving_hint

        print(serving_hint(str(output.resolve()), pl))


def _read_for_trace(path: Path, fmt: str | None, tr: Trace, trace_spec: str, **kw: Any) -> Placement:
    """Read a map that must fit ``tr`` (experts, layers); a misfit names the trace, a bad file its own problem."""
    from eplb.formats import FORMATS, MapFormatError, detect_format, read_placement
    from eplb.stats.report import align_placement

    if FORMATS[fmt or detect_format(path)].layer_axis == "moe" and "layer_ids" not in kw:
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
        raise ValueError(f"{path}: does not fit trace {trace_spec} ({tr.num_experts} experts, {alone.num_experts} in the "
                         f"map): {msg}") from None
    try:
        return align_placement(pl, tr.layer_ids, tr.num_experts).with_meta(**pl.meta)
    except ValueError as exc:
        raise ValueError(f"{path}: does not fit trace {trace_spec}: {exc}") from None


# ============================================================================ validate
def _describe(pl: Placement) -> str:
    coloc = int(pl.colocated_duplicates().sum())
    return (f"{pl.num_layers} layers (ids {_ids(pl.layer_ids)}), {pl.num_experts} experts, {pl.num_slots} slots over "
            f"{pl.num_ranks} ranks ({pl.slots_per_rank} per rank), {pl.num_nodes} node(s), max {pl.max_replicas} "
            f"replicas, {coloc} co-located replica(s)")


def _ids(ids: Sequence[int]) -> str:
    ids = list(ids)
    if len(ids) > 2 and all(b - a == ids[1] - ids[0] for a, b in zip(ids, ids[1:], strict=False)):
        step = ids[1] - ids[0]
        return f"{ids[0]}..{ids[-1]}" + (f" step {step}" if step != 1 else "")
    return ",".join(map(str, ids[:12])) + (" ..." if len(ids) > 12 else "")


def validate_cmd(
    map_file: Annotated[Path, typer.Argument(metavar="MAP", help="Map file of any format.")],
    num_experts: Annotated[int | None, typer.Option("--num-experts", help="Expected number of experts.")] = None,
    ep_size: Annotated[int | None, typer.Option("--ep-size", min=1, help="Expected EP size (required by formats that do not record it to check slots per rank).")] = None,
    num_nodes: Annotated[int | None, typer.Option("--num-nodes")] = None,
    format: Annotated[str | None, typer.Option("--format", "-f", help="Map format (default: detected).")] = None,
    trace: Annotated[str | None, typer.Option("--trace", help="Also check the map fits this trace (layers, experts).")] = None,
    num_slots: Annotated[int | None, typer.Option("--num-slots", help="sglang logical_count files: slots to plan.")] = None,
) -> None:
    """Check a map of any format: every expert served in every layer, ids in range, equal slots per device."""
    from eplb.formats import EPSizeMissing, detect_format, read_placement

    fmt = format or detect_format(map_file)
    if fmt == "sglang" and _holds_loads(map_file):
        raise ValueError(
            f"{map_file}: holds load counts (SGLang 'logical_count': an expert-distribution dump / trace), not a "
            f"placement map. SGLang plans a map from it at start-up (--init-expert-location); to see and check "
            f"the map eplb plans from it: eplb plan {map_file} --ep-size N -o map.json --format sglang; "
            f"eplb validate map.json --ep-size N"
        )
    kw: dict[str, Any] = dict(num_experts=num_experts, num_nodes=num_nodes, num_slots=num_slots)
    try:
        pl = read_placement(map_file, fmt, ep_size=ep_size, **kw)
        desc, note = _describe(pl), ""
    except EPSizeMissing:
        pl = read_placement(map_file, fmt, ep_size=1, **kw)  # everything but the per-rank layout
        desc = (f"{pl.num_layers} layers (ids {_ids(pl.layer_ids)}), {pl.num_experts} experts, {pl.num_slots} slots, "
                f"max {pl.max_replicas} replicas")
        note = " (the file does not record the EP size: pass --ep-size to check the slots per rank)"
    if trace is not None:
        tr = load_trace(trace)
        _read_for_trace(map_file, fmt, tr, trace, ep_size=pl.num_ranks, num_nodes=num_nodes, num_slots=num_slots)
        note += f"; fits trace {trace} ({tr.num_layers} layers, {tr.num_experts} experts)"
    print(f"OK {map_file} ({fmt}): {desc}{note}")


def _holds_loads(path: Path) -> bool:
    """The file is SGLang's load form (``logical_count``), not a ``physical_to_logical_map``."""
    from eplb.formats import _parse
    from eplb.formats._common import read_bytes

    _, obj = _parse(path, read_bytes(path))
    return isinstance(obj, dict) and "logical_count" in obj and "physical_to_logical_map" not in obj


# ============================================================================ convert
_MAP_ONLY = ("vllm", "native")


def _is_trace_input(path: Path, from_: str | None) -> bool:
    from eplb.formats import FORMATS, UnknownMapFormat, _parse
    from eplb.formats._common import read_bytes

    if from_ is not None:
        if from_ in FORMATS and from_ not in ("trtllm", "sglang", "vllm-ascend"):
            return False
        from eplb.stats.importers import FORMATS as TRACE_FORMATS

        if from_ not in FORMATS:
            if from_ not in TRACE_FORMATS:
                raise ValueError(f"from: unknown format {from_!r}; map formats: {', '.join(FORMATS)}; "
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


def _holds_logical_count(path: Path) -> bool:
    from eplb.formats import _parse
    from eplb.formats._common import read_bytes

    if path.is_dir() or path.suffix.lower() in TRACE_ONLY_SUFFIXES:
        return False
    try:
        fmt, obj = _parse(path, read_bytes(path))
    except ValueError:
        return False
    return fmt == "sglang" and isinstance(obj, dict) and "logical_count" in obj


def _is_trace_output(output: Path, to: str | None) -> bool:
    """Whether ``eplb convert`` writes a trace: ``--to`` names a trace-only format, or OUT is a directory,
    has no suffix or a trace-only suffix (``.safetensors .npy .npz .csv``). Otherwise OUT is a map."""
    from eplb.formats import FORMATS
    from eplb.stats.importers import FORMATS as TRACE_FORMATS

    if to is not None:
        return to in TRACE_FORMATS and to not in FORMATS
    return output.is_dir() or output.suffix == "" or output.suffix.lower() in TRACE_ONLY_SUFFIXES


def convert_cmd(
    input: Annotated[Path, typer.Argument(metavar="IN", help="Map (or trace) to read.")],
    output: Annotated[Path, typer.Argument(metavar="OUT", help="File to write.")],
    from_: Annotated[str | None, typer.Option("--from", help="Input format (default: detected).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Output format (default: from OUT's suffix).")] = None,
    num_experts: Annotated[int | None, typer.Option("--num-experts")] = None,
    ep_size: Annotated[int | None, typer.Option("--ep-size", min=1, help="EP size, when the input format does not record it.")] = None,
    num_nodes: Annotated[int | None, typer.Option("--num-nodes")] = None,
    layer_ids: Annotated[str | None, typer.Option("--layer-ids", help="Model layer ids, e.g. '1,3,5-47' (select rows / label positional rows).")] = None,
    num_layers: Annotated[int | None, typer.Option("--num-layers", help="sglang output: model layers (rows).")] = None,
    layer_updates_per_iter: Annotated[int | None, typer.Option("--layer-updates-per-iter", help="trtllm output.")] = None,
    num_slots: Annotated[int | None, typer.Option("--num-slots", help="sglang logical_count input: slots to plan.")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="sglang logical_count input: policy.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (map or trace).")] = False,
    expert_map: Annotated[str | None, typer.Option("--expert-map", help="Trace inputs: the vllm-ascend expert map that maps its per-slot load arrays to experts.")] = None,
    iter_range: Annotated[str | None, typer.Option("--iter-range", help="Trace inputs: steps a-b to keep.")] = None,
    trtllm_ep_size: Annotated[bool, typer.Option("--trtllm-ep-size", help="trtllm output: also write 'ep_size' (report projection only; TensorRT-LLM's serving loader rejects it).")] = False,
) -> None:
    """Convert a map between engine formats, or a trace between statistics formats (eplb.stats readers/writers)."""
    from eplb.formats import FORMATS, format_for_path, read_placement, write_placement

    builtin = str(input).startswith(BUILTIN_PREFIX)
    if not builtin and not input.exists():
        raise ValueError(f"{input}: no such file or directory")
    check_output(output, force)
    trace_in = builtin or expert_map is not None or _is_trace_input(input, from_)
    if trace_in and not builtin and expert_map is None and not _is_trace_output(output, to) \
            and _holds_logical_count(input):
        # SGLang's logical_count file holds loads (as `eplb validate` says): never trace bytes under a map's name
        raise ValueError(
            f"{input}: holds load counts (SGLang 'logical_count'), not a placement map, and {output} names a map; "
            f"plan one from it: eplb plan {input} --ep-size N -o {output} (or convert to a trace: --to npz / .npz)"
        )
    if trace_in:
        from eplb.cli.stats import convert_trace

        tr = convert_trace(str(input), output, from_format=from_ if from_ not in (None, "native") else None,
                           to_format=to, iter_range=iter_range, ep_size=ep_size, expert_map=expert_map, overwrite=force,
                           layer_ids=_parse_layer_ids(layer_ids))
        print(f"wrote trace {output}: {tr.num_steps} steps x {tr.num_layers} layers x {tr.num_experts} experts")
        return
    if iter_range is not None:
        raise ValueError("iter-range: only used when converting traces")
    fmt_out = format_for_path(output, to)
    pl = read_placement(input, from_, num_experts=num_experts, ep_size=ep_size, num_nodes=num_nodes,
                        layer_ids=_parse_layer_ids(layer_ids), num_slots=num_slots, policy=policy)
    opts: dict[str, Any] = {}
    if layer_updates_per_iter is not None:
        if fmt_out != "trtllm":
            raise ValueError("layer-updates-per-iter: only used by the trtllm format")
        opts["layer_updates_per_iter"] = layer_updates_per_iter
    if trtllm_ep_size:
        if fmt_out != "trtllm":
            raise ValueError("trtllm-ep-size: only used by the trtllm format")
        opts["with_ep_size"] = True
    if num_layers is not None:
        if fmt_out != "sglang":
            raise ValueError("num-layers: only used by the sglang format")
        opts["num_layers"] = num_layers
    write_placement(pl, output, fmt_out, **opts)
    src = str(pl.meta.get("source_format", "?"))
    if pl.meta.get("layer_ids_positional") and FORMATS[fmt_out].layer_axis == "model":
        print(f"note: {input} numbers MoE layers 0..{pl.num_layers - 1}; {output} keys rows by model layer index. "
              "Pass --layer-ids (e.g. '1-47:2') to write the model's layer indices.")
    lost = []
    if FORMATS[fmt_out].layer_axis == "moe" and fmt_out == "vllm-ascend":
        lost.append("model layer ids (vllm-ascend numbers MoE layers 0..L-1)")
    if not FORMATS[fmt_out].records_ep_size:
        lost.append("the EP size")
    note = f" (not recorded by {fmt_out}: {'; '.join(lost)})" if lost else ""
    print(f"wrote {output} ({fmt_out}) from {input} ({src}): {_describe(pl)}{note}")
    _serving_hint(fmt_out, output, pl)


# ============================================================================ evaluate
def evaluate_cmd(
    trace: Annotated[str, typer.Argument(help="Trace file/directory, or builtin:NAME.")],
    placement: Annotated[Path | None, typer.Option("--placement", "-p", help="Map file of any format.")] = None,
    iter_range: Annotated[str | None, typer.Option("--iter-range", help="Steps a-b to evaluate on.")] = None,
    ep_size: Annotated[int | None, typer.Option("--ep-size", min=1, help="EP size (for maps that do not record it, and held-out plans).")] = None,
    held_out: Annotated[str | None, typer.Option("--held-out", help="PLAN:EVAL ranges, e.g. 0-64:64-128: plan with --policy on PLAN, evaluate on EVAL.")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Policy for --held-out (default: the best registered).")] = None,
    num_slots: Annotated[int | None, typer.Option("--num-slots", help="Slots for --held-out plans without --placement.")] = None,
    num_nodes: Annotated[int, typer.Option("--num-nodes")] = 1,
    num_groups: Annotated[int, typer.Option("--num-groups")] = 1,
    option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Policy option KEY=VALUE for --held-out.")] = None,
    format: Annotated[str | None, typer.Option("--format", "-f", help="Map format (default: detected).")] = None,
    dispatch: Annotated[bool, typer.Option("--dispatch/--no-dispatch", help="Also evaluate per-step balanced dispatch (and its LP bound).")] = True,
    per_layer: Annotated[bool, typer.Option("--per-layer/--no-per-layer", help="Print the per-layer before/after table.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")] = None,
    dynamic_slots: Annotated[str | None, typer.Option("--dynamic-slots", help="Also evaluate per-step replication with D dynamic slots per rank, e.g. 1,2,4.")] = None,
    transfer_budget: Annotated[float | None, typer.Option("--transfer-budget", help="Per-layer copy time budget of per-step replication (ms; each rank's copies <= budget / the cost model's P2P time of one expert).")] = None,
) -> None:
    """Before/after load report of a placement on a trace (TensorRT-LLM's report), bound, gap, held-out."""
    if placement is None and held_out is None:
        raise ValueError("evaluate: pass --placement MAP and/or --held-out PLAN:EVAL")
    if held_out is not None and iter_range is not None:
        raise ValueError("evaluate: --iter-range and --held-out both choose the evaluation steps; pass one")
    ds = _parse_dynamic_slots(dynamic_slots, transfer_budget)
    tr_all = load_trace(trace)
    pl = None
    if placement is not None:
        pl = _read_for_trace(placement, format, tr_all, trace, ep_size=ep_size)
    ep = pl.num_ranks if pl is not None else (ep_size or tr_all.ep_size)
    if not ep:
        raise ValueError("ep-size: pass --ep-size (no placement given and the trace does not record one)")
    rng_plan = rng_eval = None
    if held_out is not None:
        rng_plan, rng_eval = parse_held_out(held_out)
        tr_eval = tr_all.slice(rng_eval)
    else:
        tr_eval = tr_all.slice(iter_range) if iter_range else tr_all
    evals: list[Evaluation] = []
    runs: list[tuple[Evaluation, Placement]] = []  # evaluations of a placement, for --dynamic-slots
    before = evaluate_placement(tr_eval, None, ep, label="no EPLB", dispatch=dispatch, bound=True) \
        if tr_all.num_experts % ep == 0 else None
    if before is not None:
        evals.append(before)
    after = None
    if pl is not None:
        after = evaluate_placement(tr_eval, pl, label=f"map {placement.name}" if placement else "map",
                                   dispatch=dispatch)
        evals.append(after)
        runs.append((after, pl))
    if rng_plan is not None and rng_eval is not None:
        S = pl.num_slots if pl is not None else (num_slots or tr_all.num_experts)
        opts = _parse_options(option)
        pol = _best_policy(policy, num_groups, num_nodes)
        planned = plan_placement(tr_all.slice(rng_plan), ep_size=ep, num_slots=S, num_nodes=num_nodes,
                                 num_groups=num_groups, policy=pol, trace_spec=trace, options=opts)
        ho = evaluate_placement(tr_eval, planned, label=f"{pol} planned on {rng_plan[0]}-{rng_plan[1]} (held-out)",
                                dispatch=dispatch)
        oracle = plan_placement(tr_eval, ep_size=ep, num_slots=S, num_nodes=num_nodes, num_groups=num_groups,
                                policy=pol, options=opts)
        orc = evaluate_placement(tr_eval, oracle, label=f"{pol} planned on {rng_eval[0]}-{rng_eval[1]} (in-sample oracle)",
                                 dispatch=dispatch)
        evals += [ho, orc]
        runs += [(ho, planned), (orc, oracle)]
        if after is None:
            after = ho
    con = _console()
    if per_layer and before is not None and after is not None:
        con.print(_per_layer_table(before, after, f"Load per rank, {trace} steps {after.window}: {before.label} -> {after.label}"))
    con.print(_summary_table(evals, f"{trace}: {tr_eval.num_steps} steps, {ep} ranks (imbalance = max/mean - 1 per step, averaged)"))
    _print_fanout(evals)
    from eplb.dispatch.auto import auto_line

    for ev in evals:
        if "auto_dispatch" in ev.extra:
            con.print(f"{ev.label}: {auto_line(ev.extra['auto_dispatch'])} (cost model {ev.extra['auto_dispatch']['cost_model']})")
    if ds:
        con.print(_replication_table(tr_eval, runs, ds, transfer_budget))
    if json_out is not None:
        atomic_write(json_out, (json.dumps({"trace": trace, "evaluations": [e.to_dict() for e in evals]}, indent=2) + "\n").encode())


def _parse_dynamic_slots(spec: str | None, budget: float | None) -> list[int]:
    if spec is None:
        if budget is not None:
            raise ValueError("transfer-budget: only with --dynamic-slots")
        return []
    try:
        ds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"dynamic-slots: expected comma-separated integers, got {spec!r}") from None
    if not ds or any(d < 0 for d in ds):
        raise ValueError(f"dynamic-slots: expected integers >= 0, got {spec!r}")
    if budget is not None and (not np.isfinite(budget) or budget < 0):
        raise ValueError(f"transfer-budget: expected a time in ms >= 0, got {budget}")
    return ds


def _replication_table(trace: Trace, runs: Sequence[tuple[Evaluation, Placement]], ds: Sequence[int],
                       budget: float | None) -> Any:
    """Per-step replication (:func:`eplb.dispatch.replication.replicated_rank_loads`) of every evaluated
    placement, one row per (placement, D); the numbers also go to each evaluation's JSON (``replication``)."""
    from rich.table import Table

    from eplb.dispatch.replication import replicated_rank_loads
    from eplb.metrics import imbalance_ratio
    from eplb.sim.cost import default_cost_model, expert_shape
    from eplb.sim.replication import copy_ms, replication_caps
    from eplb.stats.report import align_placement

    cm = default_cost_model()
    shape, _ = expert_shape(trace.model, trace.meta)  # the trace's model's expert size, as `eplb simulate`
    if shape:
        cm = cm.with_(**shape)
    one = copy_ms(cm)
    t = Table(title=f"Per-step replication (copy = {one:.3f} ms per {cm.hidden_size} x {cm.moe_intermediate_size} "
                    f"x {cm.dtype_bytes}-byte expert, {cm.device}; budget "
                    f"{'none' if budget is None else f'{budget:.3f} ms per layer'})")
    for col in ("placement", "D", "copies recv/send cap", "imbalance", "max rank load", "copies per layer",
                "copy ms per layer (max)"):
        t.add_column(col, justify="right" if col != "placement" else "left")
    for ev, placement in runs:
        pl = align_placement(placement, trace.layer_ids, trace.num_experts)
        rows = []
        for d in ds:
            recv, send = replication_caps(cm, d, pl.num_ranks, budget)
            loads, plan = replicated_rank_loads(trace.counts, pl, d, start="uniform", max_recv=recv, max_send=send)
            used = (plan.dyn_expert >= 0).sum(-1)
            sent = (plan.dyn_source[..., None] == np.arange(pl.num_ranks)).sum((-3, -2)) if d else used
            cms = float((np.maximum(used, sent).max(-1) * one).max()) if d else 0.0
            row = {"dynamic_slots": d, "max_recv": recv, "max_send": send, "transfer_budget_ms": budget,
                   "imbalance": float(imbalance_ratio(loads).mean()), "max_load": float(loads.max(-1).mean()),
                   "copies_per_layer": float(plan.copies.mean()), "copy_ms_per_layer_max": cms}
            rows.append(row)
            t.add_row(ev.label, str(d), f"{recv}/{send}", f"{row['imbalance']:.4f}", f"{row['max_load']:.2f}",
                      f"{row['copies_per_layer']:.1f}", f"{cms:.3f}")
        ev.extra["replication"] = rows
    return t


# ============================================================================ demo
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


def _check_read_back(path: Path, fmt: str, pl: Placement) -> None:
    """Read ``path`` back and require the same placement (what the format records of it)."""
    from eplb.formats import read_placement

    back = read_placement(path, fmt, num_experts=pl.num_experts, ep_size=pl.num_ranks, layer_ids=pl.layer_ids)
    if not np.array_equal(back.phy2log, pl.phy2log) or back.layer_ids != pl.layer_ids or back.num_ranks != pl.num_ranks:
        raise ValueError(f"{path}: read back a different placement than was written ({fmt})")


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
    pol = _best_policy(policy)
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
        _check_read_back(path, fmt, pl)
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
    golden = _golden_text(before, after, extra)
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


def demo_cmd(
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default: a new temporary directory).")] = None,
    ep_size: Annotated[int, typer.Option("--ep-size", min=1)] = 16,
    num_slots: Annotated[int, typer.Option("--num-slots")] = 144,
    policy: Annotated[str | None, typer.Option("--policy", help="Default: the best registered policy ('eplb').")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots")] = True,
    dispatch: Annotated[bool, typer.Option("--dispatch/--no-dispatch", help="Evaluate balanced dispatch too.")] = True,
) -> None:
    """The whole offline flow on the shipped real Llama-4-Maverick trace, on the CPU, in seconds."""
    res = demo(out, ep_size=ep_size, num_slots=num_slots, policy=policy, plots=plots, dispatch=dispatch)
    con = _console()
    con.print(_per_layer_table(res.before, res.after,
                               f"Load per rank on held-out steps {res.after.window} ({DEMO_TRACE}): before -> after"))
    con.print(_summary_table([res.before, res.after, *res.extra], "Summary (imbalance = max/mean - 1 of rank load per step, averaged)"))
    print("files: " + ", ".join(str(p) for p in (*res.files.values(), *res.plots)))
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.command("plan")(plan_cmd)
    app.command("validate")(validate_cmd)
    app.command("convert")(convert_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("demo")(demo_cmd)
