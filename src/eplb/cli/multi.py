"""Several workloads in the offline CLI: ``eplb plan A B C ...`` and the "worse than no EPLB" warning of ``evaluate``.

``eplb plan`` with more than one trace plans one placement for all of them (:func:`eplb.plan_multi`: the worst
workload's mean per-step imbalance is minimised) and prints each workload's imbalance without EPLB and with
the plan; ``eplb evaluate`` (one trace, or more with ``--workload``) prints a ``warning:`` line for every
workload on which an evaluated placement is worse than no EPLB (the contiguous placement, one slot per expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eplb.errors import InputError
from eplb.offline import evaluate_placement, load_trace, resolve_policy
from eplb.placement import Placement
from eplb.stats.trace import Trace

__all__ = ["no_eplb_warning", "plan_workloads", "plan_workloads_cmd", "print_no_eplb_warnings", "warn_worse_than_no_eplb"]


def no_eplb_warning(workload: str, label: str, imbalance: float, none: float) -> str | None:
    """The warning line when ``imbalance`` (of placement ``label`` on ``workload``) exceeds no EPLB's ``none``."""
    if imbalance > none * (1 + 1e-9) + 1e-12:
        return (f"warning: {label} is worse than no EPLB on workload {workload}: imbalance {imbalance:.4f} vs "
                f"{none:.4f} without EPLB")
    return None


def warn_worse_than_no_eplb(trace: Trace, workload: str, placements: Sequence[tuple[str, Placement]],
                            echo: Any = print) -> list[str]:
    """Evaluate every ``(label, placement)`` and no EPLB on ``trace``; echo (and return) the warning lines."""
    ep = placements[0][1].num_ranks if placements else 0
    if not placements or trace.num_experts % ep:
        return []
    none = evaluate_placement(trace, None, ep, dispatch=False, bound=False).imbalance
    out = []
    for label, pl in placements:
        line = no_eplb_warning(workload, label, evaluate_placement(trace, pl, dispatch=False, bound=False).imbalance,
                               none)
        if line:
            echo(line)
            out.append(line)
    return out


def plan_workloads(specs: Sequence[str], *, ep_size: int | None, num_slots: int | None, num_nodes: int,
                   num_groups: int, policy: str | None, iter_range: str | None, options: dict[str, Any],
                   layer_ids: list[int] | None = None, echo: Any = print) -> Placement:
    """Load every trace of ``specs`` (same layers and experts), plan one placement for all, echo per-workload lines."""
    from eplb import __version__
    from eplb.policies.multi import plan_multi

    trs = [load_trace(s, iter_range) for s in specs]
    if layer_ids is not None:
        trs = [t.with_layer_ids(layer_ids) for t in trs]
    first = trs[0]
    for s, t in zip(specs, trs, strict=True):
        if t.num_experts != first.num_experts or tuple(t.layer_ids) != tuple(first.layer_ids):
            raise InputError(f"{s}: {t.num_layers} layers x {t.num_experts} experts (layer ids {list(t.layer_ids)[:4]}...), "
                             f"but {specs[0]} has {first.num_layers} x {first.num_experts}; workloads must share them")
    ep = ep_size or first.ep_size
    if not ep:
        raise InputError("ep-size: the traces do not record an EP size; pass --ep-size")
    pol = resolve_policy(policy, num_groups, num_nodes)
    S = int(num_slots) if num_slots is not None else first.num_experts
    meta = {"traces": list(specs), "trace_digests": [t.digest() for t in trs], "model": first.model,
            "eplb_version": __version__, "iter_range": iter_range or "all"}
    pl = plan_multi([t.counts for t in trs], S, int(ep), num_nodes=num_nodes, num_groups=num_groups, policy=pol,
                    layer_ids=first.layer_ids, names=list(specs), meta=meta, **options)
    for s, t in zip(specs, trs, strict=True):
        ev = evaluate_placement(t, pl, dispatch=False, bound=False)
        line = f"workload {s} ({t.num_steps} steps): imbalance "
        if first.num_experts % int(ep) == 0:
            none = evaluate_placement(t, None, int(ep), dispatch=False, bound=False).imbalance
            line += f"{none:.4f} without EPLB -> "
            warn = no_eplb_warning(s, f"the {pol}+multi placement", ev.imbalance, none)
        else:
            warn = None
        echo(line + f"{ev.imbalance:.4f} planned on all {len(specs)} workloads")
        if warn:
            echo(warn)
    return pl


def plan_workloads_cmd(specs: Sequence[str], output: Any, fmt: str, *, num_layers: int | None,
                       layer_updates_per_iter: int, trtllm_ep_size: bool, **kw: Any) -> None:
    """``eplb plan A B C ... -o MAP``: :func:`plan_workloads`, then write the map in ``fmt``."""
    from eplb.formats import write_placement

    pl = plan_workloads(specs, **kw).with_meta(layer_updates_per_iter=layer_updates_per_iter)
    opts: dict[str, Any] = {}
    if fmt == "trtllm":
        opts.update(layer_updates_per_iter=layer_updates_per_iter, with_ep_size=trtllm_ep_size)
    elif trtllm_ep_size:
        raise InputError("trtllm-ep-size: only used by the trtllm format")
    if num_layers is not None:
        opts["num_layers"] = num_layers
    write_placement(pl, output, fmt, **opts)
    print(f"wrote {output} ({fmt}): one placement for {len(specs)} workloads, {pl.num_layers} layers, "
          f"{pl.num_experts} experts -> {pl.num_slots} slots over {pl.num_ranks} ranks, policy {pl.meta['policy']}")


def print_no_eplb_warnings(con: Any, trace: str, evals: Sequence[Any], before: Any, workloads: Sequence[str],
                           pl: Placement | None) -> None:
    """``eplb evaluate``'s warnings: every evaluated placement worse than no EPLB (``before``) on ``trace``, and the
    map ``pl`` on every extra ``workloads`` trace (``--workload``)."""
    lines = []
    if before is not None:
        lines += [w for ev in evals if ev is not before
                  if (w := no_eplb_warning(trace, ev.label, ev.imbalance, before.imbalance))]
    if workloads and pl is None:
        raise InputError("workload: needs --placement (the map to check on the other workloads)")
    for spec in workloads:
        tr = load_trace(spec)
        if tr.num_experts != pl.num_experts:
            raise InputError(f"workload: {spec} has {tr.num_experts} experts, the placement {pl.num_experts}")
        got = warn_worse_than_no_eplb(tr, spec, [("the map", pl)], echo=lambda _: None)
        lines += got
        if not got:
            print(f"workload {spec}: the map is not worse than no EPLB")
    for line in lines:  # plain print: one unwrapped line each, easy to grep
        print(line)
