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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from eplb._io import atomic_write
from eplb.cli._args import check_output
from eplb.cli.multi import plan_workloads_cmd, print_no_eplb_warnings
from eplb.errors import InputError
from eplb.offline import (
    BUILTIN_PREFIX,
    DEMO_TRACE,
    Evaluation,
    demo,
    evaluate_placement,
    is_trace_input,
    is_trace_output,
    load_trace,
    parse_held_out,
    plan_placement,
    read_placement_for_trace,
    replication_rows,
    resolve_policy,
    sglang_loads_file,
)
from eplb.placement import Placement
from eplb.stats.trace import Trace

__all__ = ["register"]


# ============================================================================ helpers
def _console() -> Any:
    from rich.console import Console

    return Console(width=140)


def _parse_options(options: Sequence[str] | None) -> dict[str, Any]:
    """``["max_replicas=16", "x=0.5"]`` -> ``{"max_replicas": 16, "x": 0.5}`` (ints, floats, bools, strings)."""
    out: dict[str, Any] = {}
    for opt in options or ():
        key, sep, val = opt.partition("=")
        if not sep or not key.strip():
            raise InputError(f"option: expected KEY=VALUE, got {opt!r}")
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
        raise InputError(f"layer-ids: expected a list like '1,3,5-9' or '1-47:2', got {spec!r}") from None
    if not out or len(set(out)) != len(out):
        raise InputError(f"layer-ids: expected distinct layer ids, got {spec!r}")
    return out


# ========================================================================= evaluation
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
        if "cross_node_pairs" in ev.extra:
            print(f"{ev.label}: {ev.extra['cross_node_pairs']:.2f} cross-node co-activated pairs per token and layer "
                  f"({ev.extra['cross_node_fraction']:.1%} of all pairs; imbalance {ev.imbalance:.4f})")


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


# ============================================================================ plan
def plan_cmd(
    trace: Annotated[str, typer.Argument(help="Trace file/directory any eplb.stats reader accepts, or builtin:NAME.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Map file to write.")],
    more_traces: Annotated[list[str] | None, typer.Argument(metavar="[TRACE]...", help="More workloads' traces: plan one placement minimising the worst workload (eplb.plan_multi).")] = None,
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
        raise InputError(f"layer-updates-per-iter: expected >= 0, got {layer_updates_per_iter}")
    if num_layers is not None and fmt != "sglang":
        raise InputError("num-layers: only used by the sglang format")
    lids = _parse_layer_ids(layer_ids)  # fail before any work on a bad list
    if more_traces:  # several workloads: one placement minimising the worst (eplb.plan_multi)
        kw = dict(ep_size=ep_size, num_slots=num_slots, num_nodes=num_nodes, num_groups=num_groups, policy=policy)
        return plan_workloads_cmd([trace, *more_traces], output, fmt, **kw, iter_range=iter_range, options=_parse_options(option),
                                  layer_ids=lids, num_layers=num_layers, layer_updates_per_iter=layer_updates_per_iter, trtllm_ep_size=trtllm_ep_size)
    tr = load_trace(trace, iter_range)
    if lids is not None:
        tr = tr.with_layer_ids(lids)
    ep = ep_size or tr.ep_size  # --ep-size 0 is refused by the option itself (min=1)
    if not ep:
        raise InputError("ep-size: the trace does not record an EP size; pass --ep-size")
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
        raise InputError("trtllm-ep-size: only used by the trtllm format")
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
    from eplb.formats import EPSizeMissing, detect_map_format, read_placement

    fmt = format or detect_map_format(map_file)
    if fmt == "sglang" and sglang_loads_file(map_file, with_map=False):
        raise InputError(
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
        read_placement_for_trace(map_file, fmt, tr, trace, ep_size=pl.num_ranks, num_nodes=num_nodes, num_slots=num_slots)
        note += f"; fits trace {trace} ({tr.num_layers} layers, {tr.num_experts} experts)"
    print(f"OK {map_file} ({fmt}): {desc}{note}")


# ============================================================================ convert
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
        raise InputError(f"{input}: no such file or directory")
    check_output(output, force)
    trace_in = builtin or expert_map is not None or is_trace_input(input, from_)
    if trace_in and not builtin and expert_map is None and not is_trace_output(output, to) \
            and sglang_loads_file(input):
        # SGLang's logical_count file holds loads (as `eplb validate` says): never trace bytes under a map's name
        raise InputError(
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
        raise InputError("iter-range: only used when converting traces")
    fmt_out = format_for_path(output, to)
    pl = read_placement(input, from_, num_experts=num_experts, ep_size=ep_size, num_nodes=num_nodes,
                        layer_ids=_parse_layer_ids(layer_ids), num_slots=num_slots, policy=policy)
    opts: dict[str, Any] = {}
    if layer_updates_per_iter is not None:
        if fmt_out != "trtllm":
            raise InputError("layer-updates-per-iter: only used by the trtllm format")
        opts["layer_updates_per_iter"] = layer_updates_per_iter
    if trtllm_ep_size:
        if fmt_out != "trtllm":
            raise InputError("trtllm-ep-size: only used by the trtllm format")
        opts["with_ep_size"] = True
    if num_layers is not None:
        if fmt_out != "sglang":
            raise InputError("num-layers: only used by the sglang format")
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
    workload: Annotated[list[str] | None, typer.Option("--workload", "-w", help="Another workload's trace (repeatable): warn when the placement is worse than no EPLB there too.")] = None,
) -> None:
    """Before/after load report of a placement on a trace (TensorRT-LLM's report), bound, gap, held-out; warnings."""
    if placement is None and held_out is None:
        raise InputError("evaluate: pass --placement MAP and/or --held-out PLAN:EVAL")
    if held_out is not None and iter_range is not None:
        raise InputError("evaluate: --iter-range and --held-out both choose the evaluation steps; pass one")
    ds = _parse_dynamic_slots(dynamic_slots, transfer_budget)
    tr_all = load_trace(trace)
    pl = None
    if placement is not None:
        pl = read_placement_for_trace(placement, format, tr_all, trace, ep_size=ep_size)
    ep = pl.num_ranks if pl is not None else (ep_size or tr_all.ep_size)
    if not ep:
        raise InputError("ep-size: pass --ep-size (no placement given and the trace does not record one)")
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
        pol = resolve_policy(policy, num_groups, num_nodes)
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
    print_no_eplb_warnings(con, trace, evals, before, workload or [], pl)
    if ds:
        con.print(_replication_table(tr_eval, runs, ds, transfer_budget))
    if json_out is not None:
        atomic_write(json_out, (json.dumps({"trace": trace, "evaluations": [e.to_dict() for e in evals]}, indent=2) + "\n").encode())


def _parse_dynamic_slots(spec: str | None, budget: float | None) -> list[int]:
    if spec is None:
        if budget is not None:
            raise InputError("transfer-budget: only with --dynamic-slots")
        return []
    try:
        ds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"dynamic-slots: expected comma-separated integers, got {spec!r}") from None
    if not ds or any(d < 0 for d in ds):
        raise InputError(f"dynamic-slots: expected integers >= 0, got {spec!r}")
    if budget is not None and (not np.isfinite(budget) or budget < 0):
        raise InputError(f"transfer-budget: expected a time in ms >= 0, got {budget}")
    return ds


def _replication_table(trace: Trace, runs: Sequence[tuple[Evaluation, Placement]], ds: Sequence[int],
                       budget: float | None) -> Any:
    """The rows of :func:`eplb.offline.replication_rows` as a table (they also go to each evaluation's JSON)."""
    from rich.table import Table

    title, rows = replication_rows(trace, runs, ds, budget)
    t = Table(title=title)
    for col in ("placement", "D", "copies recv/send cap", "imbalance", "max rank load", "copies per layer",
                "copy ms per layer (max)"):
        t.add_column(col, justify="right" if col != "placement" else "left")
    for label, row in rows:
        t.add_row(label, str(row["dynamic_slots"]), f"{row['max_recv']}/{row['max_send']}", f"{row['imbalance']:.4f}",
                  f"{row['max_load']:.2f}", f"{row['copies_per_layer']:.1f}", f"{row['copy_ms_per_layer_max']:.3f}")
    return t


# ============================================================================ demo
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
