"""Capacity planning: the fewest redundant slots that meet an imbalance target on held-out steps.

For each policy and each slots-per-rank value ``spr`` from ``ceil(E / R)`` upward (``S = spr * R``
slots per layer, ``S - E`` redundant), plan a placement on the first part of the trace (the
training steps) and replay it on the remaining ``held_out`` fraction of steps; the imbalance is
``max / mean - 1`` of rank load per step and layer, averaged (the evaluate command's and
TensorRT-LLM's definition). The answer for a policy is the smallest ``spr`` whose held-out
imbalance is at most the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_positive_int
from eplb._io import atomic_write
from eplb.errors import InputError
from eplb.metrics import imbalance_ratio, slot_share
from eplb.placement import Placement
from eplb.policies import DEFAULT_POLICY
from eplb.sim.engine import SimInput, as_sim_input, step_chunk, strategy_rank_loads
from eplb.stats.trace import Trace
from eplb.strategies import check_strategy

__all__ = ["CapacityResult", "capacity", "held_out_imbalance", "known_policies", "plan_placement", "split_steps"]


def known_policies() -> Mapping[str, Any]:
    """:data:`eplb.policies.POLICIES` (the lazy registry: every policy, none imported until used)."""
    from eplb.policies import POLICIES

    return POLICIES


def plan_placement(policy: str, train: np.ndarray, *, num_slots: int, num_ranks: int, num_nodes: int = 1,
                   num_groups: int = 1, layer_ids: Sequence[int] = (), **options: Any) -> Placement:
    """A placement from ``train`` ``[T, L, E]`` loads with ``policy``.

    ``"none"`` is the unbalanced baseline a deployment without eplb serves: the identity layout
    (slot ``s`` holds expert ``s``, no redundant slots; ``S = E`` rounded up to a multiple of the
    ranks), whatever ``num_slots`` says -- the same baseline ``eplb evaluate`` uses.

    A policy that plans on summed loads (no ``per_step`` capability) gets ``train`` summed over steps in its own
    (integer) dtype, so a long trace is never copied to float64 for it.
    """
    from eplb.policies import plan
    from eplb.policies.registry import policy_info

    L, E = train.shape[-2], train.shape[-1]
    if policy == "none":
        from eplb._checks import check_layout

        check_layout(E, num_slots, num_ranks, num_nodes)
        return Placement.contiguous(L, E, num_ranks, -(-E // num_ranks) * num_ranks, num_nodes,
                                    layer_ids=layer_ids).with_meta(policy="none")
    if train.ndim == 3 and not policy_info(policy).per_step:
        train = train.sum(axis=0)
    return plan(train, num_slots, num_ranks, num_nodes=num_nodes, num_groups=num_groups, policy=policy,
                layer_ids=layer_ids, **options)


def split_steps(num_steps: int, held_out: float) -> tuple[slice, slice, bool]:
    """``(train, test, in_sample)``: the last ``held_out`` fraction of steps is the test window.

    ``held_out == 0`` or a one-step trace: train and test are all steps (``in_sample`` True).
    """
    if not 0.0 <= held_out < 1.0:
        raise InputError(f"held-out: expected a fraction in [0, 1), got {held_out}")
    n_test = int(round(num_steps * held_out))
    if held_out == 0.0 or num_steps < 2:
        return slice(0, num_steps), slice(0, num_steps), True
    n_test = min(max(n_test, 1), num_steps - 1)
    cut = num_steps - n_test
    return slice(0, cut), slice(cut, num_steps), False


def held_out_imbalance(counts: np.ndarray, placement: Placement, strategy: str = "uniform") -> np.ndarray:
    """``[T, L]`` per-step, per-layer imbalance ratio of ``counts`` under ``placement`` (chunked)."""
    T, L, E = counts.shape
    chunk = step_chunk(L, max(E, placement.num_slots))
    share = slot_share(placement) if strategy == "uniform" else None
    out = np.empty((T, L))
    for a in range(0, T, chunk):
        out[a:a + chunk] = imbalance_ratio(strategy_rank_loads(counts[a:a + chunk], placement, strategy, share))
    return out


@dataclass
class CapacityResult:
    """Imbalance against slots for each policy, and the fewest slots meeting the target.

    Attributes:
        slots_per_rank: the ``spr`` values tried (ascending).
        imbalance: ``{policy: [len(slots_per_rank)]}`` mean held-out imbalance.
        imbalance_p99: ``{policy: [...]}`` 99th percentile over held-out steps of the per-step
            imbalance (mean over layers).
        target: the target imbalance ratio.
        num_experts, num_ranks, num_nodes: layout.
        meta: trace, steps used, strategy.
    """

    slots_per_rank: list[int]
    imbalance: dict[str, list[float]]
    imbalance_p99: dict[str, list[float]]
    target: float
    num_experts: int
    num_ranks: int
    num_nodes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def best(self, policy: str) -> dict[str, Any] | None:
        """The smallest slot count meeting the target for ``policy`` (``None`` if none tried does)."""
        for spr, imb in zip(self.slots_per_rank, self.imbalance[policy], strict=True):
            if imb <= self.target:
                S = spr * self.num_ranks
                return {"slots_per_rank": spr, "num_slots": S, "redundant_total": S - self.num_experts,
                        "redundant_per_rank": (S - self.num_experts) / self.num_ranks, "imbalance": imb}
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "eplb.capacity", "version": 1, "target_imbalance": self.target, "num_experts": self.num_experts,
            "num_ranks": self.num_ranks, "num_nodes": self.num_nodes, "slots_per_rank": self.slots_per_rank,
            "num_slots": [s * self.num_ranks for s in self.slots_per_rank],
            "imbalance": self.imbalance, "imbalance_p99": self.imbalance_p99,
            "best": {p: self.best(p) for p in self.imbalance}, "meta": self.meta,
        }

    def table(self) -> Any:
        """A rich table: one row per policy with the answer, then the imbalance at every slot count."""
        from rich.table import Table

        syn = " [SYNTHETIC data]" if self.meta.get("synthetic") else ""
        t = Table(title=f"capacity {self.meta.get('trace', '?')}{syn}: {self.num_ranks} ranks, target imbalance "
                        f"{self.target:g} on {self.meta.get('test_steps', '?')} "
                        f"{'in-sample' if self.meta.get('in_sample') else 'held-out'} steps")
        t.add_column("policy")
        t.add_column("slots/rank", justify="right")
        t.add_column("total slots", justify="right")
        t.add_column("redundant (total)", justify="right")
        t.add_column("redundant/rank", justify="right")
        t.add_column("imbalance", justify="right")
        for p in self.imbalance:
            b = self.best(p)
            if b is None:
                t.add_row(p, "-", "-", "-", "-", f"not met up to {self.slots_per_rank[-1]}/rank "
                          f"(best {min(self.imbalance[p]):.3f})")
            else:
                t.add_row(p, str(b["slots_per_rank"]), str(b["num_slots"]), str(b["redundant_total"]),
                          f"{b['redundant_per_rank']:.2f}", f"{b['imbalance']:.4f}")
        return t

    def curve_table(self) -> Any:
        """A rich table of imbalance vs slots (rows: slots per rank, columns: policies)."""
        from rich.table import Table

        t = Table(title="held-out imbalance vs slots" if not self.meta.get("in_sample") else "imbalance vs slots")
        t.add_column("slots/rank", justify="right")
        t.add_column("total slots", justify="right")
        for p in self.imbalance:
            t.add_column(p, justify="right")
        for i, spr in enumerate(self.slots_per_rank):
            t.add_row(str(spr), str(spr * self.num_ranks), *(f"{self.imbalance[p][i]:.4f}" for p in self.imbalance))
        return t

    def plot(self, path: str | Path) -> Path:
        """PNG: imbalance against total slots for each policy, with the target line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from eplb.sim.report import save_figure

        fig, ax = plt.subplots(figsize=(8, 5))
        x = [s * self.num_ranks for s in self.slots_per_rank]
        for p, ys in self.imbalance.items():
            ax.plot(x, ys, marker="o", label=p)
        ax.axhline(self.target, color="k", ls="--", lw=1, label=f"target {self.target:g}")
        ax.axvline(self.num_experts, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"physical slots per layer ({self.num_ranks} ranks; experts = {self.num_experts})")
        ax.set_ylabel("imbalance ratio (max/mean - 1), " + ("in-sample" if self.meta.get("in_sample") else "held-out"))
        syn = " (SYNTHETIC data)" if self.meta.get("synthetic") else ""
        ax.set_title(f"capacity: {self.meta.get('trace', '?')}{syn}", fontsize=9)
        ax.legend(fontsize=8)
        out = save_figure(fig, Path(path))
        plt.close(fig)
        return out

    def save(self, out_dir: str | Path) -> list[Path]:
        import json

        d = Path(out_dir)
        p = d / "capacity.json"
        atomic_write(p, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        return [p, self.plot(d / "capacity.png")]


def capacity(
    trace: Trace | ArrayLike | SimInput,
    *,
    ep_size: int,
    target_imbalance: float = 0.1,
    held_out: float = 0.5,
    policies: Sequence[str] = (DEFAULT_POLICY,),
    num_nodes: int = 1,
    num_groups: int = 1,
    strategy: str = "uniform",
    max_slots_per_rank: int | None = None,
    policy_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CapacityResult:
    """Find, per policy, the fewest slots per rank whose held-out imbalance meets ``target_imbalance``.

    Args:
        trace: ``[T, L, E]`` counts.
        ep_size: ``R`` ranks.
        target_imbalance: target of the mean imbalance ratio (``max / mean - 1``), e.g. 0.1.
        held_out: fraction of trailing steps to evaluate on (plan on the rest); 0 = in-sample.
        policies: policy names (``"none"`` = contiguous layout; else :data:`eplb.policies.POLICIES`).
        max_slots_per_rank: largest ``spr`` tried (default ``2 * ceil(E / R)``, at least ``ceil(E/R) + 4``).
        progress: called with ``(done, total)`` plans.
    """
    data = as_sim_input(trace)
    R = check_positive_int(ep_size, "ep-size")
    N = check_positive_int(num_nodes, "num-nodes")
    if R % N:
        raise InputError(f"num-nodes: {R} ranks are not divisible by {N} nodes")
    if not (isinstance(target_imbalance, (int, float)) and math.isfinite(target_imbalance) and target_imbalance >= 0):
        raise InputError(f"target-imbalance: expected a number >= 0, got {target_imbalance!r}")
    check_strategy(strategy)
    if not policies:
        raise InputError("policies: give at least one policy")
    POLICIES = known_policies()
    for p in policies:
        if p != "none" and p not in POLICIES:
            raise InputError(f"policies: unknown policy {p!r}; expected 'none' or one of {sorted(POLICIES)}")
    E = data.num_experts
    lo = -(-E // R)
    hi = max_slots_per_rank if max_slots_per_rank is not None else max(2 * lo, lo + 4)
    hi = check_positive_int(hi, "max-slots-per-rank")
    if hi < lo:
        raise InputError(f"max-slots-per-rank: {hi} is below the minimum ceil({E}/{R}) = {lo}")
    train_sl, test_sl, in_sample = split_steps(data.num_steps, held_out)
    train = data.counts[train_sl]
    test = data.counts[test_sl]
    sprs = list(range(lo, hi + 1))
    imb: dict[str, list[float]] = {p: [] for p in policies}
    p99: dict[str, list[float]] = {p: [] for p in policies}
    total, done = len(policies) * len(sprs), 0
    for p in policies:
        opts = dict((policy_options or {}).get(p, {}))
        for spr in sprs:
            pl = plan_placement(p, train, num_slots=spr * R, num_ranks=R, num_nodes=N, num_groups=num_groups,
                                layer_ids=data.layer_ids, **opts)
            x = held_out_imbalance(test, pl, strategy)
            imb[p].append(float(x.mean()))
            p99[p].append(float(np.percentile(x.mean(axis=1), 99)))
            done += 1
            if progress is not None:
                progress(done, total)
    meta = {"trace": data.name, "synthetic": data.synthetic, "strategy": strategy, "held_out": held_out,
            "in_sample": in_sample, "train_steps": [int(data.step_ids[train_sl][0]), int(data.step_ids[train_sl][-1])],
            "test_steps": int(test.shape[0]), "num_layers": data.num_layers, "num_groups": num_groups}
    return CapacityResult(sprs, imb, p99, float(target_imbalance), E, R, N, meta)
