"""CLI commands of the simulator: ``eplb simulate`` and ``eplb capacity``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from eplb.cli._args import check_layout_args
from eplb.policies import DEFAULT_POLICY

TRACE_HELP = ("trace: 'builtin:NAME' (eplb.datasets), an eplb .safetensors trace, a recording directory, a "
              "TensorRT-LLM dump directory, an SGLang .pt dump, or a plain .npy/.npz/.csv/.json [T, L, E] array")


def load_trace(spec: str, fmt: str | None = None) -> Any:
    """A :class:`~eplb.stats.trace.Trace` from ``builtin:NAME`` or a trace file/directory."""
    from eplb.sim.engine import SimInput, as_sim_input, compact_counts

    if spec.startswith("builtin:"):
        from eplb.datasets import load_builtin

        tr = load_builtin(spec.split(":", 1)[1])
        name = spec
    else:
        from eplb.stats.io import read_trace

        tr = read_trace(Path(spec), fmt)
        name = Path(spec).name
    data = as_sim_input(tr, name=name)
    del tr  # the trace's own array is freed once its compact copy exists
    return SimInput(compact_counts(data.counts), data.step_ids, data.layer_ids, name, data.top_k, data.synthetic,
                    data.model, data.meta)


def _split_list(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per label; yields ``update(label, done, total)``."""
    if not enabled:
        yield lambda label, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as prog:
        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total)
            prog.update(tasks[label], completed=done)

        yield update


def simulate_cmd(
    trace: str = typer.Argument(..., help=TRACE_HELP),
    ep_size: int = typer.Option(..., "--ep-size", min=1, help="EP ranks (GPUs)"),
    num_slots: int | None = typer.Option(None, "--num-slots", help="physical slots per layer (default: experts, "
                                                                   "rounded up to a multiple of --ep-size)"),
    num_nodes: int = typer.Option(1, "--num-nodes", help="nodes (inter-node all-to-all uses inter_node_gbps)"),
    num_groups: int = typer.Option(1, "--num-groups", help="expert groups (hierarchical policies)"),
    policy: list[str] | None = typer.Option(None, "--policy", help="policy name(s), repeat or comma-separate; "
                                                                   "'none' = contiguous layout (default: " + DEFAULT_POLICY + ")"),
    placement: list[Path] | None = typer.Option(None, "--placement", help="a placement file of any map format "
                                                                          "to simulate too (repeatable)"),
    strategy: str = typer.Option("uniform", "--strategy", help="replica choice: uniform, balanced, round-robin, "
                                                               "local-first"),
    online: str | None = typer.Option(None, "--online", help="also simulate the online balancer: key=value,... "
                                      "(interval=SECONDS, threshold=0-1, layer_updates_per_iter=N, iterations=N, "
                                      "wait=N, window=N, floor=0-1, gain=0-1, or any BalancerConfig field)"),
    online_config: Path | None = typer.Option(None, "--online-config", help="TensorRT-LLM load balancer YAML for "
                                                                            "the online runs"),
    online_only: bool = typer.Option(False, "--online-only", help="skip the static runs"),
    cost_model: Path | None = typer.Option(None, "--cost-model", help="cost model JSON (default: the shipped "
                                           "measured one, else reference/gpu.md); sections it lacks come from "
                                           "reference/gpu.md"),
    plan_range: str | None = typer.Option(None, "--plan-range", help="step ids start-stop to plan placements on "
                                                                     "(default: all steps)"),
    sim_range: str | None = typer.Option(None, "--sim-range", help="step ids start-stop to replay (default: all)"),
    fmt: str | None = typer.Option(None, "--format", help="trace format (default: detected)"),
    out: Path | None = typer.Option(None, "--out", help="directory for simulation.json, summary.md and PNG plots"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write PNG plots into --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
    hidden_size: int | None = typer.Option(None, "--hidden-size", min=1, help="model hidden size (default: the trace's "
                                           "model, else the cost model's, DeepSeek-V3's 7168)"),
    moe_intermediate_size: int | None = typer.Option(None, "--moe-intermediate-size", min=1, help="expert intermediate "
                                                     "size (an expert is 3 x hidden x intermediate weights)"),
    dtype_bytes: int | None = typer.Option(None, "--dtype-bytes", min=1, help="bytes per weight/activation element "
                                           "(2 = bf16, 1 = fp8)"),
    weight_format: str | None = typer.Option(None, "--weight-format", help="expert weights: 'dense' (dtype bytes) or "
                                             "'fp8-block' (FP8 + float32 128x128 block scales, DeepSeek-V3 layout); "
                                             "default: the cost model's"),
    dynamic_slots: list[str] | None = typer.Option(None, "--dynamic-slots", help="also simulate per-step replication "
                                                   "with D dynamic slots per rank on each static placement (repeat or "
                                                   "comma-separate, e.g. 1,2,4)"),
    transfer_budget: float | None = typer.Option(None, "--transfer-budget", help="per-layer expert-copy time budget "
                                                 "of per-step replication (ms; caps each rank's copies at budget / "
                                                 "copy time, the cost model's P2P time of one expert)"),
    hide_ms: float | None = typer.Option(None, "--hide-ms", help="time a layer's copies overlap with (ms; default: "
                                         "the transfer budget, else the layer's dispatch all-to-all); copy time "
                                         "beyond it is added to the layer"),
    lookahead: bool = typer.Option(False, "--lookahead/--no-lookahead", help="per-step replication: choose the "
                                   "copies on the previous step's counts (exact split on this step's)"),
) -> None:
    """Replay a trace step by step under placements and the online balancer; print a side-by-side summary."""
    from rich.console import Console

    from eplb.sim.cost import default_cost_model, load_cost_model, reference_cost_model
    from eplb.sim.simulate import simulate

    data = load_trace(trace, fmt)
    cm = load_cost_model(cost_model, base=reference_cost_model()) if cost_model is not None else default_cost_model()
    from eplb.sim.cost import expert_shape

    shape, shape_src = expert_shape(data.model, data.meta, hidden_size=hidden_size,
                                    moe_intermediate_size=moe_intermediate_size, dtype_bytes=dtype_bytes)
    if shape:
        cm = cm.with_(**shape)
    if weight_format is not None:
        from eplb.sim.cost import WEIGHT_FORMATS

        if weight_format not in WEIGHT_FORMATS:
            raise typer.BadParameter(f"expected one of {list(WEIGHT_FORMATS)}, got {weight_format!r}",
                                     param_hint="--weight-format")
        cm = cm.with_(weight_format=weight_format)
    wfmt = "FP8 + block scales" if cm.weight_format == "fp8-block" else f"{cm.dtype_bytes} byte(s)"
    shape_line = (f"expert size: hidden {cm.hidden_size} x intermediate {cm.moe_intermediate_size} x {wfmt} "
                  f"({shape_src or 'the cost model: pass --hidden-size / --moe-intermediate-size for this model'}): "
                  f"{cm.expert_bytes:,} bytes per expert")
    pols = _split_list(policy) or ([DEFAULT_POLICY] if not placement else [])
    places = {}
    for f in placement or ():
        from eplb.formats import read_placement

        pl = read_placement(f, num_experts=data.num_experts, ep_size=ep_size,
                            num_nodes=num_nodes if num_nodes > 1 else None)
        if pl.num_layers != data.num_layers and len(pl.layer_ids) >= data.num_layers:
            pl = read_placement(f, num_experts=data.num_experts, ep_size=ep_size, layer_ids=list(data.layer_ids))
        places[f.stem] = pl
    cfg: Any = None
    if online_config is not None:
        from eplb.online import BalancerConfig
        from eplb.sim.online import online_items

        cfg = BalancerConfig.from_trtllm_yaml(online_config, **online_items(online))
        if num_slots is None:
            num_slots = cfg.num_slots
    elif online is not None:
        cfg = online
    if num_slots is not None:
        check_layout_args(data.num_experts, int(num_slots), int(ep_size), int(num_nodes), int(num_groups))
    replication = None
    if dynamic_slots:
        try:
            ds = [int(x) for x in _split_list(dynamic_slots)]
        except ValueError:
            raise ValueError(f"dynamic-slots: expected integers, got {dynamic_slots}") from None
        if any(d < 0 for d in ds):
            raise ValueError(f"dynamic-slots: expected integers >= 0, got {ds}")
        replication = {"dynamic_slots": ds, "transfer_budget_ms": transfer_budget, "hide_ms": hide_ms,
                       "lookahead": lookahead}
    elif transfer_budget is not None or hide_ms is not None or lookahead:
        raise ValueError("transfer-budget / hide-ms / lookahead: only with --dynamic-slots")
    console = Console()
    with _progress(progress and console.is_terminal) as update:
        report = simulate(data, ep_size=ep_size, num_slots=num_slots, num_nodes=num_nodes, num_groups=num_groups,
                          policies=pols, placements=places, strategy=strategy, online=cfg, cost=cm,
                          plan_range=plan_range, sim_range=sim_range, static=not online_only, progress=update,
                          replication=replication)
    console.print(report.table())
    for r in report.results:
        rep = r.meta.get("replication")
        if rep:
            window = f"{rep['hide_ms']:.3f} ms" if rep["hide_ms"] is not None else "the dispatch"
            console.print(f"{r.label}: {rep['copies_per_layer_mean']:.1f} copies per layer (cap {rep['max_recv']} "
                          f"received / {rep['max_send']} sent per rank), copy time per layer mean "
                          f"{rep['copy_ms_per_layer_mean']:.3f} ms, max {rep['copy_ms_per_layer_max']:.3f} ms; "
                          f"{rep['exposed_layers']} layer(s) ({rep['exposed_layers_frac']:.1%}) could not hide their "
                          f"copies under {window}"
                          + (" (lookahead: copies move during the previous step)" if rep["lookahead"] else ""))
    console.print(f"cost model: {cm.device}, {cm.date}, {cm.source}")
    console.print(shape_line)
    _print_auto(console, report, data, cm)
    if out is not None:
        files = report.save(out, plots=plots)
        console.print("wrote " + ", ".join(str(p) for p in files))


#: Steps the auto-dispatch line of ``simulate`` estimates from (the balanced split of a step costs ~0.1 s on one
#: core at DeepSeek-V3 size; the line is a mean over steps).
AUTO_STEPS = 32


def _print_auto(console: Any, report: Any, data: Any, cm: Any) -> None:
    """``strategy="auto"``'s per-layer choice for each static run's placement (on the replayed counts)."""
    from eplb.dispatch.auto import auto_line, auto_strategies, auto_summary

    for r in report.results:
        pl = r.final_placement
        if r.mode != "static" or pl is None or pl.num_slots <= pl.num_experts:
            continue
        counts = data.counts  # a one-line estimate on AUTO_STEPS evenly spaced steps, sampled before any float copy
        if counts.shape[1:] != (pl.num_layers, pl.num_experts):
            continue
        n = min(AUTO_STEPS, counts.shape[0])
        line = auto_line(auto_summary(auto_strategies(counts, pl, cm.compute_ms, max_steps=AUTO_STEPS)))
        console.print(f"{r.label}: {line}" + (f" (estimated on {n} evenly spaced steps)" if n < counts.shape[0] else ""))


def capacity_cmd(
    trace: str = typer.Argument(..., help=TRACE_HELP),
    ep_size: int = typer.Option(..., "--ep-size", min=1, help="EP ranks (GPUs)"),
    target_imbalance: float = typer.Option(0.1, "--target-imbalance", help="target mean imbalance ratio "
                                                                           "(max/mean - 1 of rank load)"),
    held_out: float = typer.Option(0.5, "--held-out", help="fraction of trailing steps held out for evaluation "
                                                           "(plan on the rest); 0 = in-sample"),
    policies: list[str] | None = typer.Option(None, "--policies", "--policy", help="policy names, repeat or "
                                                                                   "comma-separate (default: " + DEFAULT_POLICY + ")"),
    num_nodes: int = typer.Option(1, "--num-nodes"),
    num_groups: int = typer.Option(1, "--num-groups"),
    strategy: str = typer.Option("uniform", "--strategy", help="replica choice: uniform, balanced, round-robin, "
                                                               "local-first"),
    max_slots_per_rank: int | None = typer.Option(None, "--max-slots-per-rank", help="largest slots per rank to try "
                                                  "(default: twice the minimum)"),
    fmt: str | None = typer.Option(None, "--format", help="trace format (default: detected)"),
    out: Path | None = typer.Option(None, "--out", help="directory for capacity.json and capacity.png"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON instead of tables"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Find the fewest redundant slots (per rank and total) that meet an imbalance target on held-out steps."""
    from rich.console import Console

    from eplb.sim.capacity import capacity

    data = load_trace(trace, fmt)
    pols = _split_list(policies) or [DEFAULT_POLICY]
    console = Console()
    with _progress(progress and console.is_terminal and not as_json) as update:
        res = capacity(data, ep_size=ep_size, target_imbalance=target_imbalance, held_out=held_out, policies=pols,
                       num_nodes=num_nodes, num_groups=num_groups, strategy=strategy,
                       max_slots_per_rank=max_slots_per_rank,
                       progress=lambda done, total: update("planning and replaying", done, total))
    if as_json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        if res.meta.get("in_sample") and held_out > 0:
            console.print(f"note: the trace has {data.num_steps} step(s): evaluated in-sample, not held-out")
        console.print(res.table())
        console.print(res.curve_table())
    if out is not None:
        files = res.save(out)
        if not as_json:
            console.print("wrote " + ", ".join(str(p) for p in files))


def register(app: typer.Typer) -> None:
    """Add ``simulate`` and ``capacity`` to ``app``."""
    app.command("simulate")(simulate_cmd)
    app.command("capacity")(capacity_cmd)
