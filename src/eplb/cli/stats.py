"""CLI commands of the statistics area: ``eplb record``, ``eplb report``, ``eplb merge``.

Also trace helpers for other commands: :func:`load_trace_arg` (``builtin:NAME`` or any trace
file/directory) and :func:`convert_trace` (``eplb convert`` of traces does the same through
:mod:`eplb.stats.importers`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from eplb.cli._args import check_output
from eplb.errors import InputError

TRACE_FORMATS = "eplb, eplb-dir, trtllm, sglang, vllm-ascend, npy, npz, csv, json"


# --------------------------------------------------------------------------- helpers
def load_trace_arg(spec: str | os.PathLike[str], fmt: str | None = None, *, iter_range: str | None = None,
                   expert_map: str | None = None, progress: Callable[[int], None] | None = None) -> Any:
    """A :class:`~eplb.stats.trace.Trace` from ``builtin:NAME`` or a trace file/directory of any format."""
    s = str(spec)
    if s.startswith("builtin:"):
        from eplb.datasets import load_builtin

        tr = load_builtin(s.split(":", 1)[1])
        return tr.slice(iter_range) if iter_range else tr
    from eplb.stats.io import read_trace

    return read_trace(Path(s), fmt or None, iter_range=iter_range or None, expert_map=expert_map, progress=progress)


def convert_trace(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, from_format: str | None = None,
                  to_format: str | None = None, iter_range: str | None = None, ep_size: int | None = None,
                  expert_map: str | None = None, overwrite: bool = False,
                  layer_ids: Sequence[int] | None = None) -> Any:
    """Read ``src`` (any trace format) and write it to ``dst`` (format from ``to_format`` or the extension).

    ``layer_ids`` labels or selects model layers (:meth:`Trace.with_layer_ids`). Returns the trace
    written. Used by ``eplb convert`` for trace files.
    """
    from eplb.stats.io import write_trace

    tr = load_trace_arg(src, from_format, iter_range=iter_range, expert_map=expert_map)
    if layer_ids is not None:
        tr = tr.with_layer_ids(layer_ids)
    write_trace(tr, dst, to_format or None, overwrite=overwrite, ep_size=ep_size)
    return tr


@contextmanager
def _progress(enabled: bool, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


def _read_placement(path: Path, tr: Any, ep_size: int | None) -> Any:
    """A placement for the trace's layers from a map file of any engine format (native JSON fallback)."""
    try:
        from eplb.formats import read_placement
    except ImportError:  # formats not available: native JSON only
        from eplb.placement import Placement

        pl = Placement.from_dict(json.loads(path.read_text()), source=str(path))
    else:
        pl = read_placement(path, num_experts=tr.num_experts, ep_size=ep_size, layer_ids=tr.layer_ids)
    return pl.with_meta(report_label=path.name)


# --------------------------------------------------------------------------- report
def report(
    trace: Annotated[str, typer.Argument(help="Trace: builtin:NAME, an eplb .safetensors file, a recording directory, "
                                         "a TensorRT-LLM dump directory, an SGLang .pt dump, or .npy/.npz/.csv/.json.")],
    ep_size: Annotated[int | None, typer.Option("--ep-size", min=1, help="Ranks (default: the placement's, else the "
                                                "trace's recorded EP size).")] = None,
    placement: Annotated[Path | None, typer.Option("--placement", help="Project the loads onto this map file "
                                                   "(TensorRT-LLM YAML, vllm-ascend/SGLang/vLLM/native JSON).")] = None,
    per_expert: Annotated[bool, typer.Option("--per-expert", help="Statistics over slots instead of ranks.")] = False,
    iter_range: Annotated[str | None, typer.Option("--iter-range", help="Steps start-stop (stop exclusive).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help=f"Trace format ({TRACE_FORMATS}); default: detected.")] = None,
    expert_map: Annotated[str | None, typer.Option("--expert-map", help="vllm-ascend expert map for a "
                                                   "vllm-ascend load array.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write PNG figures into this directory.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML report.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the table(s) as JSON.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Per-layer mean / std / imbalance ratio of rank loads (TensorRT-LLM's definition).

    Per step: mean and unbiased std of the rank loads, imbalance = max/mean - 1; then averaged over
    steps; the 'average' row is the mean over layers. With --placement the counts are projected
    onto it (slot load = count / replicas of its expert) and compared with the contiguous layout.
    """
    from rich.console import Console

    from eplb.stats.report import LoadTable, load_table, merge_tables, render

    console = Console()
    show = not quiet and console.is_terminal
    path = Path(trace)
    streaming = (not trace.startswith("builtin:") and path.is_dir() and plot is None and html is None
                 and (fmt in (None, "eplb-dir")) and not (path / "meta_info.json").exists())
    if streaming:  # a recording directory: chunk by chunk, never all in memory
        from eplb.stats.store import iter_chunks, scan_dir

        info = scan_dir(path)
        first = None
        tables: dict[str, list[LoadTable]] = {}
        pl = None
        with _progress(show, f"reading {path.name}", info.num_chunks) as adv:
            for chunk in iter_chunks(path, iter_range, progress=adv):
                if first is None:
                    first = chunk
                    pl = _read_placement(placement, chunk, ep_size) if placement is not None else None
                for label, p, ep in _variants(chunk, pl, ep_size, per_expert):
                    tables.setdefault(label, []).append(load_table(chunk, ep, p, per_expert=per_expert))
        if first is None:
            raise InputError(f"{path}: no steps to report")
        result = {label: merge_tables(ts) for label, ts in tables.items()}
        tr = first
    else:
        with _progress(show, f"reading {path.name}", None) as adv:
            tr = load_trace_arg(trace, fmt, iter_range=iter_range, expert_map=expert_map, progress=adv)
        pl = _read_placement(placement, tr, ep_size) if placement is not None else None
        result = {label: load_table(tr, ep, p, per_expert=per_expert) for label, p, ep in _variants(tr, pl, ep_size, per_expert)}
    head = f"{trace}: {tr.num_layers} MoE layers x {tr.num_experts} experts" + (f", model {tr.model}" if tr.model else "")
    console.print(head)
    for label, tab in result.items():
        console.print(render(tab, title=f"{label}: per {'slot' if per_expert else 'rank'}, ep_size={tab.ep_size}, "
                                         f"{tab.num_steps} steps"))
    if len(result) == 2:
        (la, a), (lb, b) = result.items()
        console.print(f"average imbalance ratio: {la} {a.average[2]:.4f} -> {lb} {b.average[2]:.4f}")
    if tr.topk_ids is not None or tr.top_k or tr.cooccurrence is not None:  # all-to-all fan-out, cross-node pairs
        from eplb.metrics import comm_stats
        from eplb.placement import Placement
        from eplb.stats.report import align_placement

        for label, p, ep in _variants(tr, pl, ep_size, per_expert):
            q = Placement.contiguous(tr.num_layers, tr.num_experts, ep, layer_ids=tr.layer_ids) if p is None \
                else align_placement(p, tr.layer_ids, tr.num_experts)
            fan = comm_stats(q, topk_ids=tr.topk_ids, cooccurrence=tr.cooccurrence, counts=tr.counts, top_k=tr.top_k)
            how = "exact from top-k ids" if fan["method"] == "topk_ids" else "expected from counts, independent choices"
            if "mean_ranks" in fan:
                console.print(f"{label}: {fan['mean_ranks']:.2f} ranks and {fan['mean_nodes']:.2f} nodes per token ({how})")
            if "mean_cross_node_pairs" in fan:
                console.print(f"{label}: {fan['mean_cross_node_pairs']:.2f} cross-node co-activated pairs per token "
                              f"and layer ({fan['cross_node_fraction']:.1%} of all pairs; {q.num_nodes} nodes)")
    if json_out is not None:
        from eplb._io import atomic_write

        atomic_write(json_out, json.dumps({k: v.to_dict() for k, v in result.items()}, indent=1).encode())
    if plot is not None or html is not None:
        from eplb.stats.plots import html_report, plot_report

        placements = {label: p for label, p, _ in _variants(tr, pl, ep_size, per_expert)}
        ep_plain = next(ep for _, p, ep in _variants(tr, pl, ep_size, per_expert) if p is None) \
            if any(p is None for p in placements.values()) else 1
        if plot is not None:
            out_dir = plot
        else:
            import tempfile

            out_dir = Path(tempfile.mkdtemp(prefix="eplb-report-"))
        imgs = plot_report(tr, placements, ep_plain, out_dir)
        if plot is not None:
            console.print(f"wrote {', '.join(str(i) for i in imgs)}")
        if html is not None:
            notes = [head] + ([f"source: {tr.source}"] if tr.source else [])
            html_report(result, imgs, html, title=f"eplb load report: {Path(trace).name}", notes=notes)
            console.print(f"wrote {html}")
            if plot is None:
                import shutil

                shutil.rmtree(out_dir, ignore_errors=True)


def _variants(tr: Any, pl: Any, ep_size: int | None, per_expert: bool) -> list[tuple[str, Any, int]]:
    """``(label, placement or None, ep_size)`` rows to report: contiguous (when it fits) and the placement."""
    out: list[tuple[str, Any, int]] = []
    ep_plain = ep_size or (pl.num_ranks if pl is not None else 0) or (tr.ep_size if tr.ep_size > 1 else 0)
    if pl is None and not ep_plain:
        raise InputError(f"ep-size: the trace records no EP size above 1 (it has {tr.ep_size}); give --ep-size N")
    if ep_plain and tr.num_experts % ep_plain == 0:
        out.append(("contiguous", None, int(ep_plain)))
    elif pl is None:
        raise InputError(f"ep-size: {tr.num_experts} experts are not divisible by ep_size={ep_plain}")
    if pl is not None:
        label = str(pl.meta.get("report_label", "") or pl.meta.get("policy", "") or "placement")
        out.append((f"placement ({label})", pl, int(ep_size or pl.num_ranks)))
    return out


# --------------------------------------------------------------------------- merge
def merge(
    shards: Annotated[list[Path], typer.Argument(help="Per-rank traces (files or recording directories) to sum.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Merged trace to write.")],
    fmt: Annotated[str | None, typer.Option("--format", help=f"Output format ({TRACE_FORMATS}); default: extension.")] = None,
    in_fmt: Annotated[str | None, typer.Option("--from", help="Input format (default: detected per shard).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
) -> None:
    """Sum per-rank shards into one trace (same layers, experts and step ids required)."""
    from eplb.stats.io import read_trace, write_trace
    from eplb.stats.store import merge as merge_traces

    check_output(output, force)
    trs = [read_trace(s, in_fmt) for s in shards]
    out = merge_traces(trs, sources=[str(s) for s in shards])
    write_trace(out, output, fmt, overwrite=force)
    typer.echo(f"wrote {output}: {out.num_steps} steps x {out.num_layers} layers x {out.num_experts} experts, "
               f"summed from {len(trs)} shard(s), {int(out.counts.sum())} routed tokens")


# --------------------------------------------------------------------------- record
def record(
    model: Annotated[str, typer.Option("--model", help="Preset (mixtral, qwen2-moe, qwen3-moe, deepseek-v2, deepseek-v3, "
                                       "olmoe: tiny random weights), a config.json, or a local model directory.")],
    dataset: Annotated[Path, typer.Option("--dataset", help="Prompts: text (one per line) or JSON/JSONL.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write (default: "
                                                "$EXPERT_STATISTIC_PATH, else ./expert_statistic).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help=f"Output format ({TRACE_FORMATS}); default: from the "
                                            "output's extension, a directory = eplb-dir.")] = None,
    iter_range: Annotated[str | None, typer.Option("--iter-range", help="Steps start-stop to record (default: "
                                                   "$EXPERT_STATISTIC_ITER_RANGE, else all).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per step.")] = 4,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Prompt tokens kept per prompt.")] = 128,
    decode_steps: Annotated[int, typer.Option("--decode-steps", help="Greedy decode steps after each prefill.")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Use at most this many prompts.")] = None,
    shrink: Annotated[bool | None, typer.Option("--shrink/--no-shrink", help="Shrink hidden sizes of random-weight "
                                                "models (default: yes unless weights are loaded).")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Ignore checkpoint weights.")] = False,
    cooccurrence: Annotated[bool, typer.Option("--cooccurrence", help="Also record [E, E] co-selection counts.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run a transformers MoE model over prompts and record per-step expert loads.

    Each batch is one prefill step (prompts forwarded one by one: no padding tokens counted),
    followed by --decode-steps decode steps. Random weights are SYNTHETIC: such a trace shows the
    recording path and shapes, not a real model's routing.
    """
    from eplb.stats.hf import build_model, read_prompts, record_model
    from eplb.stats.io import detect_trace_format, write_trace
    from eplb.stats.recorder import DEFAULT_PATH, ENV_PATH, ENV_RANGE

    out = output or Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)
    rng = iter_range if iter_range is not None else (os.environ.get(ENV_RANGE) or None)
    check_output(out, force)
    out_fmt = fmt or detect_trace_format(out, for_write=True)
    prompts = read_prompts(dataset, limit)
    m, tok, desc = build_model(model, shrink=shrink, seed=seed, random_weights=random_weights)
    m = m.to(device)
    typer.echo(f"model: {desc}; {len(prompts)} prompts", err=True)
    source = f"eplb record: {desc}; dataset {dataset.name}"
    with _progress(not quiet, "recording", len(prompts)) as adv:
        tr = record_model(m, prompts, tokenizer=tok, batch_size=batch_size, max_tokens=max_tokens,
                          decode_steps=decode_steps, progress=adv, iter_range=rng, cooccurrence=cooccurrence,
                          source=source, device=device)
    assert tr is not None
    tr.model = getattr(m.config, "_name_or_path", "") or model
    for key, attrs in (("hidden_size", ("hidden_size",)), ("moe_intermediate_size", ("moe_intermediate_size",
                                                                                     "intermediate_size"))):
        val = next((getattr(m.config, a) for a in attrs if isinstance(getattr(m.config, a, None), int)), None)
        if val:  # the expert size of the model recorded (eplb simulate prices migrations with it)
            tr.meta.setdefault(key, int(val))
    if tr.ep_size <= 1:
        tr.ep_size = 0
    write_trace(tr, out, out_fmt, overwrite=force)
    typer.echo(f"wrote {out} ({out_fmt}): {tr.num_steps} steps x {tr.num_layers} MoE layers (ids "
               f"{list(tr.layer_ids)[:4]}{'...' if tr.num_layers > 4 else ''}) x {tr.num_experts} experts, "
               f"{int(tr.counts.sum())} routed tokens")


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.command("record")(record)
    app.command("report")(report)
    app.command("merge")(merge)
