"""CLI commands of the runtime area: ``eplb serve-bench``.

Launch under torchrun, one process per rank::

    torchrun --nproc-per-node 2 --no-python eplb serve-bench --model tiny-mixtral --ep-size 2 \\
        --trace synthetic:zipf --policy deepseek --num-slots 10

(``--ep-size 1`` runs without torchrun.) Heavy imports (torch, transformers) happen inside the
command, so ``eplb --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from eplb.errors import InputError


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--override: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _load_trace(spec: str | None, model: str, overrides: dict[str, Any], batch: int, ep_size: int) -> Any:
    """``builtin:NAME`` / a built-in name / a trace file, or ``synthetic:zipf`` (SYNTHETIC, sized for the model)."""
    if spec is None:
        return None
    if spec.startswith("synthetic:"):
        kind = spec.split(":", 1)[1]
        if kind != "zipf":
            raise InputError(f"--trace: unknown synthetic trace {spec!r}; expected synthetic:zipf")
        from eplb.stats.hf import load_config
        from eplb.stats.trace import Trace
        from eplb.synthetic import zipf_counts

        cfg = load_config(model, overrides)
        E = int(next(getattr(cfg, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
                     if getattr(cfg, a, None)))
        k = int(getattr(cfg, "num_experts_per_tok", 1) or 1)
        L = int(cfg.num_hidden_layers)
        counts = zipf_counts(64, L, E, tokens_per_step=batch * ep_size, top_k=k, skew=1.2, seed=0)
        return Trace(counts, top_k=k, source="SYNTHETIC: eplb.synthetic.zipf_counts(skew=1.2)")
    from eplb.datasets import builtin_traces

    if spec in builtin_traces():
        spec = f"builtin:{spec}"
    from eplb.cli.stats import load_trace_arg

    return load_trace_arg(spec)


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""

    @app.command("serve-bench")
    def serve_bench_cmd(
        model: Annotated[str, typer.Option("--model", help="tiny-mixtral | tiny-qwen2-moe | tiny-qwen3-moe | "
                                           "tiny-deepseek-v2 | tiny-deepseek-v3 | tiny-olmoe, a config.json or "
                                           "a checkpoint directory")],
        ep_size: Annotated[int, typer.Option("--ep-size", min=1, help="EP ranks = torchrun world size")] = 1,
        checkpoint: Annotated[str | None, typer.Option(help="local checkpoint directory to load "
                                                       "(default: random weights from the config)")] = None,
        placement: Annotated[str | None, typer.Option(help="map file (any format, incl. TensorRT-LLM YAML)")] = None,
        policy: Annotated[str | None, typer.Option(help="plan the placement from --trace with this policy")] = None,
        num_slots: Annotated[int | None, typer.Option(help="slots per layer (default: experts)")] = None,
        trace: Annotated[str | None, typer.Option(help="route from a trace: builtin:NAME, a trace file, or "
                                                  "synthetic:zipf (default: the model's router)")] = None,
        strategy: Annotated[str, typer.Option(help="local-first | round-robin | balanced")] = "local-first",
        steps: Annotated[int, typer.Option(help="timed steps")] = 20,
        warmup: Annotated[int, typer.Option(help="untimed steps first")] = 3,
        batch: Annotated[int, typer.Option(help="tokens per rank per step")] = 8,
        device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
        max_num_tokens: Annotated[int | None, typer.Option(help="chunk received tokens (TensorRT-LLM "
                                                           "max_num_tokens)")] = None,
        override: Annotated[list[str] | None, typer.Option(help="config KEY=VALUE (e.g. num_hidden_layers=4)")] = None,
        seed: Annotated[int, typer.Option()] = 0,
        json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON (rank 0)")] = None,
    ) -> None:
        """Decode-like steps of a MoE model served with expert parallelism: tokens/s and per-rank loads."""
        from eplb.runtime.serve_bench import serve_bench

        ov = _parse_overrides(override)
        tr = _load_trace(trace, model, ov, batch, ep_size)
        res = serve_bench(model, ep_size=ep_size, checkpoint=checkpoint, overrides=ov, placement=placement,
                          num_slots=num_slots, policy=policy, trace=tr, strategy=strategy, steps=steps,
                          warmup=warmup, batch=batch, device=device, dtype=dtype, max_num_tokens=max_num_tokens,
                          seed=seed)
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(res.render())
            if json_out is not None:
                from eplb._io import atomic_write

                atomic_write(json_out, (json.dumps(res.to_dict(), indent=2) + "\n").encode())
        if dist.is_initialized():
            dist.destroy_process_group()
