"""CLI commands of the engine integrations: ``eplb pull`` (expert statistics from a running server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def pull(
    output: Annotated[Path, typer.Option("--output", "-o", help="Trace file to write (.safetensors).")],
    sglang: Annotated[str, typer.Option("--sglang", help="URL of a running SGLang server, e.g. http://127.0.0.1:30000.")] = "",
    seconds: Annotated[float, typer.Option("--seconds", "-s", help="Recording window in seconds (send traffic meanwhile).")] = 60.0,
    dump_dir: Annotated[
        Path | None,
        typer.Option("--dump-dir", help="Directory where the server writes its dumps (its "
                     "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR; default: that variable here, else /tmp)."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="HTTP timeout per request (s).")] = 30.0,
    dump_timeout: Annotated[float, typer.Option("--dump-timeout", help="How long to wait for the dump file (s).")] = 60.0,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="EPLB_SGLANG_API_KEY", show_envvar=True, show_default=False,
                                                help="SGLang --api-key, sent as 'Authorization: Bearer' (never printed).")] = None,
    admin_api_key: Annotated[str | None, typer.Option("--admin-api-key", envvar="EPLB_SGLANG_ADMIN_API_KEY", show_envvar=True,
                                                      show_default=False, help="SGLang --admin-api-key, for the record/dump routes (never printed).")] = None,
) -> None:
    """Record expert loads on a running server and save them as an eplb trace.

    SGLang: POST /start_expert_distribution_record, wait --seconds, POST /stop_expert_distribution_record
    and /dump_expert_distribution_record, read the dump the server wrote into --dump-dir and write the
    trace (token counts per forward pass, MoE layer and expert).

    The server must run with --expert-distribution-recorder-mode stat.
    """
    from eplb.integrations.sglang import pull as sglang_pull

    if not sglang:
        raise ValueError("pull: give the server to record from, e.g. --sglang http://127.0.0.1:30000")
    res = sglang_pull(sglang, seconds, dump_dir=dump_dir, timeout=timeout, dump_timeout=dump_timeout,
                      on_event=lambda msg: typer.echo(msg, err=True), api_key=api_key, admin_api_key=admin_api_key)
    res.trace.save(output)
    tr = res.trace
    typer.echo(
        f"wrote {output}: {tr.num_steps} forward passes x {tr.num_layers} MoE layers x {tr.num_experts} experts, "
        f"{int(tr.counts.sum())} routed tokens (from {res.dump_path})"
    )


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.command("pull")(pull)
