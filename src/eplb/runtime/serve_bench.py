"""``eplb serve-bench``: decode-like steps of a transformers MoE model served with expert parallelism.

Every rank of the EP group builds the same model (random weights from a config, or a local
checkpoint), patches its ``*Experts`` modules with :class:`~eplb.runtime.ExpertParallelMoE` for the
placement, and runs ``steps`` forward passes on ``batch`` one-token sequences (a decode step's shape;
no KV cache). Routing comes from the model's router or, with a trace, from
:class:`~eplb.runtime.TraceRouter` (real skew). Reported: tokens/s over the whole group, step time
p50/p99, and (token, expert) pairs computed per rank, summed over the MoE layers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import InputError
from eplb.placement import Placement
from eplb.runtime.distributed import GroupInfo, agree, fingerprint, group_info, init_from_env

__all__ = ["ServeBenchResult", "serve_bench"]


@dataclass
class ServeBenchResult:
    """What rank 0 reports (every rank returns the same numbers)."""

    model: str
    ep_size: int
    batch: int
    steps: int
    strategy: str
    placement: str
    routing: str
    device: str
    step_ms: list[float]
    rank_pairs: list[int]  # (token, expert) pairs computed per rank, all MoE layers, timed steps
    num_moe_layers: int
    num_slots: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.step_ms) / 1e3
        return self.steps * self.batch * self.ep_size / total if total > 0 else float("nan")

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.step_ms, 50))

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.step_ms, 99))

    @property
    def imbalance(self) -> float:
        """``max / mean - 1`` of the per-rank pairs."""
        a = np.asarray(self.rank_pairs, dtype=np.float64)
        return float(a.max() / a.mean() - 1) if a.mean() > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ep_size": self.ep_size, "batch_per_rank": self.batch, "steps": self.steps,
                "strategy": self.strategy, "placement": self.placement, "routing": self.routing,
                "device": self.device, "num_moe_layers": self.num_moe_layers, "num_slots": self.num_slots,
                "tokens_per_s": self.tokens_per_s, "step_ms_p50": self.p50_ms, "step_ms_p99": self.p99_ms,
                "rank_pairs": self.rank_pairs, "imbalance": self.imbalance, "step_ms": self.step_ms, **self.extra}

    def render(self) -> str:
        lines = [
            f"eplb serve-bench: {self.model}, ep_size {self.ep_size}, {self.batch} tokens/rank/step, "
            f"{self.steps} timed steps, strategy {self.strategy}, device {self.device}",
            f"placement: {self.placement} ({self.num_slots} slots/layer, {self.num_moe_layers} MoE layers); "
            f"routing: {self.routing}",
            f"tokens/s: {self.tokens_per_s:,.1f}   step p50 {self.p50_ms:.3f} ms   p99 {self.p99_ms:.3f} ms",
            "rank  pairs computed (all MoE layers)  share",
        ]
        tot = max(1, sum(self.rank_pairs))
        for r, v in enumerate(self.rank_pairs):
            lines.append(f"{r:>4}  {v:>31,d}  {v / tot:6.1%}")
        lines.append(f"imbalance (max/mean - 1): {self.imbalance:.3f}")
        return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def serve_bench(
    model: str | Mapping[str, Any],
    *,
    ep_size: int,
    checkpoint: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    placement: Placement | str | None = None,
    num_slots: int | None = None,
    policy: str | None = None,
    trace: Any = None,
    strategy: str = "local-first",
    steps: int = 20,
    warmup: int = 3,
    batch: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    max_num_tokens: int | None = None,
    seed: int = 0,
) -> ServeBenchResult:
    """Run the benchmark on this rank (collective over the EP group; every rank returns the same result).

    Args:
        model: a :data:`~eplb.runtime.TINY_CONFIGS` name, a config.json / checkpoint dir, or a config dict.
        ep_size: expected EP size; must equal the group size (torchrun's world size).
        placement: Placement, map file, or ``None`` (contiguous with ``num_slots`` slots, or planned by
            ``policy`` from the trace: MoE layer ``i`` uses trace layer ``i % L``).
        trace: a :class:`~eplb.Trace` (or ``[T, L, E]`` counts) to route with; ``None``: the model's router.
        batch: tokens per rank per step.
    """
    from eplb.runtime.models import patch_model
    from eplb.runtime.trace_router import TraceRouter
    from eplb.stats.hf import build_model

    for name, v in (("steps", steps), ("batch", batch), ("ep_size", ep_size)):
        if not isinstance(v, int) or v <= 0:
            raise InputError(f"{name}: expected a positive integer, got {v!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup: expected a non-negative integer, got {warmup!r}")
    info: GroupInfo = group_info(None) if dist.is_available() and dist.is_initialized() else init_from_env(
        device=device)
    if info.size != ep_size:
        raise InputError(f"--ep-size {ep_size} does not match the world size {info.size} "
                         f"(launch with: torchrun --nproc-per-node {ep_size} --no-python eplb serve-bench ...)")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if tdtype is None:
        raise InputError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    net: Any = build_model(model, checkpoint=checkpoint, overrides=overrides, shrink=False, dtype=tdtype, device=dev,
                           seed=seed)[0]
    from eplb.runtime.models import find_experts

    experts = find_experts(net)
    router = None
    err = None
    if trace is not None:
        counts = getattr(trace, "counts", trace)
        E_model = experts[0].num_experts if experts else 0
        if np.asarray(counts).shape[-1] != E_model:
            err = f"trace has {np.asarray(counts).shape[-1]} experts per layer but the model has {E_model}"
    if policy is not None and err is None:
        if placement is not None:
            err = "give either a placement or a policy, not both"
        elif trace is None:
            err = "planning with a policy needs a trace (the loads to balance)"
        else:
            try:
                from eplb.policies import plan

                c = np.asarray(getattr(trace, "counts", trace))
                c = c[None] if c.ndim == 2 else c
                lmap = [i % c.shape[1] for i in range(len(experts))]
                placement = plan(c[:, lmap], num_slots or c.shape[-1], ep_size, policy=policy,
                                 layer_ids=[x.layer_id for x in experts])
            except ValueError as exc:
                err = f"planning with policy {policy!r} failed: {exc}"
    agree(info, "serve-bench", fingerprint(str(model), ep_size, strategy, batch, steps), err, device=dev)
    layers = patch_model(net, placement, info.group, strategy=strategy, max_num_tokens=max_num_tokens,
                         compute="auto", num_slots=num_slots)
    if trace is not None:
        router = TraceRouter(trace, num_ranks=info.size, rank=info.rank, seed=seed)
        router.attach(layers)
    vocab = int(net.config.vocab_size)
    gen = torch.Generator().manual_seed(seed * 1000 + info.rank)
    times = []
    with torch.inference_mode():
        for step in range(warmup + steps):
            if step == warmup:
                for layer in layers:
                    layer.take_slot_counts()
            ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(dev)
            _sync(dev)
            if info.distributed:
                dist.barrier(group=info.group)
            t0 = time.perf_counter()
            net(input_ids=ids, use_cache=False)
            _sync(dev)
            t1 = time.perf_counter()
            if step >= warmup:
                times.append((t1 - t0) * 1e3)
            if router is not None:
                router.next_step()
    pairs = torch.stack([layer.take_slot_counts()[1].sum() for layer in layers]).sum().reshape(1)
    step_t = torch.tensor(times, dtype=torch.float64)
    if info.distributed:
        cdev = dev if info.backend == "nccl" else torch.device("cpu")
        allp = [torch.empty_like(pairs.to(cdev)) for _ in range(info.size)]
        dist.all_gather(allp, pairs.to(cdev), group=info.group)
        rank_pairs = [int(p.item()) for p in allp]
        st = step_t.to(cdev)
        dist.all_reduce(st, op=dist.ReduceOp.MAX, group=info.group)  # a step ends when its slowest rank does
        step_t = st.cpu()
    else:
        rank_pairs = [int(pairs.item())]
    pl = layers[0]
    desc = placement if isinstance(placement, str) else (
        f"{placement.meta.get('policy', 'given')}" if isinstance(placement, Placement) else "contiguous")
    return ServeBenchResult(
        model=str(model) if not isinstance(model, Mapping) else str(model.get("model_type")), ep_size=info.size,
        batch=batch, steps=steps, strategy=strategy, placement=str(desc),
        routing=("trace: " + str(getattr(trace, "source", "") or getattr(trace, "model", "") or "counts"))
        if trace is not None else "model router (random weights route almost uniformly)",
        device=str(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu",
        step_ms=[float(v) for v in step_t.tolist()], rank_pairs=rank_pairs, num_moe_layers=len(layers),
        num_slots=pl.num_slots,
    )
