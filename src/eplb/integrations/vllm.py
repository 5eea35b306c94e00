"""eplb as a vLLM EPLB policy (vLLM >= 0.33), loaded as a vLLM general plug-in.

vLLM's EPLB calls ``policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices)`` every ``step_interval`` steps, on every EP rank, with

* ``weight``: ``[layers, E]`` tokens per logical expert summed over the load window (CPU tensor),
* ``old_global_expert_indices``: the ``[layers, num_physical]`` physical-to-logical map it serves
  now (``-1`` in slots that hold no expert, e.g. right after elastic EP added ranks),

and expects the new ``physical_to_logical_map`` ``[layers, num_replicas]`` as an int64 CPU tensor.
:class:`EplbPolicy` does that with eplb's planner (``"eplb"`` by default) and is migration-aware:
experts stay on the rank (and in the slot) they occupy when the balance allows it, and a layer
whose current map is already as balanced as the new one is left unchanged.

Activation (opt-in): eplb's package declares the entry point
``[project.entry-points."vllm.general_plugins"] eplb = "eplb.integrations.vllm:register"``; vLLM
calls :func:`register` in every process. It does nothing unless ``EPLB_VLLM_POLICY`` is set:

* ``EPLB_VLLM_POLICY=eplb`` (or any registered eplb policy name, e.g. ``deepseek``): replace
  ``vllm.distributed.eplb.policy.EPLB_POLICIES["default"]`` with :class:`EplbPolicy` using that
  planner, and log ``eplb: vLLM EPLB policy 'default' -> eplb ...`` at INFO;
* ``EPLB_VLLM_MIN_GAIN`` (float, default ``0``): keep a layer's current map unless both the new
  plan and a fresh plan lower its max rank load by more than this fraction (``-1`` disables it);
* ``EPLB_VLLM_GROUP_LIMITED`` (default on): when ``num_groups % num_nodes == 0`` (several nodes),
  the ``eplb`` planner keeps every expert group on one node, like vLLM's default policy (the node
  bound of group-limited routing); ``0`` spreads groups for the best token balance;
* ``EPLB_VLLM_RECORD=PATH``: also save every load window the policy sees as one step of an eplb
  trace (safetensors, rewritten atomically, global rank 0 only) -- vLLM's expert statistics.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from eplb.integrations._core import EngineLayoutError, plan_for_engine, resolve_planner

__all__ = [
    "ENV_GROUP_LIMITED",
    "ENV_MIN_GAIN",
    "ENV_POLICY",
    "ENV_RECORD",
    "EngineLayoutError",
    "EplbPolicy",
    "VLLM_AVAILABLE",
    "make_policy",
    "register",
]

ENV_POLICY = "EPLB_VLLM_POLICY"
ENV_MIN_GAIN = "EPLB_VLLM_MIN_GAIN"
ENV_RECORD = "EPLB_VLLM_RECORD"
ENV_GROUP_LIMITED = "EPLB_VLLM_GROUP_LIMITED"
_OFF = {"", "0", "off", "false", "no", "none", "default", "vllm"}

log = logging.getLogger("eplb.integrations.vllm")

VLLM_AVAILABLE = False
_Base: Any = object
try:  # subclass vLLM's abstract policy when vLLM is importable
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy as _Base  # type: ignore[no-redef]

    VLLM_AVAILABLE = True
except Exception as _exc:  # ImportError, or a vLLM that fails to import on this machine
    log.debug("eplb: vLLM not importable (%s); EplbPolicy is a plain class", _exc)


def _rank0() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:
        return True


class _Recorder:
    """Appends each load window to a trace file (one step per rebalance call)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: list[np.ndarray] = []
        self.lock = threading.Lock()

    def add(self, loads: np.ndarray, planner: str) -> None:
        from eplb.stats.trace import Trace

        with self.lock:
            if self.steps and self.steps[0].shape != loads.shape:
                log.warning("eplb: load window shape changed %s -> %s; restarting %s", self.steps[0].shape,
                            loads.shape, self.path)
                self.steps = []
            self.steps.append(np.rint(loads).astype(np.int64))
            tr = Trace(np.stack(self.steps), source="vllm: EPLB load windows seen by eplb's policy plug-in",
                       meta={"planner": planner, "step_unit": "one EPLB load window (window_size forward steps)"})
            tr.save(self.path)


_recorder: _Recorder | None = None


def _env_min_gain() -> float | None:
    raw = os.environ.get(ENV_MIN_GAIN, "").strip()
    if not raw:
        return 0.0
    try:
        v = float(raw)
    except ValueError:
        log.warning("eplb: %s=%r is not a number; using 0", ENV_MIN_GAIN, raw)
        return 0.0
    return None if v < 0 else v


class EplbPolicy(_Base):
    """vLLM EPLB policy backed by :func:`eplb.plan`; migration-aware through the current map.

    Class attributes (set by :func:`make_policy` / :func:`register`):
        planner: eplb policy name (``None``: ``"eplb"``, or ``"deepseek"`` if that is not registered).
        min_gain: keep a layer's current map unless both the new plan and a fresh plan lower its
            max rank load by more than this fraction (``None`` disables it).
    """

    planner: str | None = None
    min_gain: float | None = 0.0

    @classmethod
    def rebalance_experts(
        cls,
        weight: Any,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: Any = None,
    ) -> Any:
        """Plan a new physical-to-logical map.

        Args:
            weight: ``[layers, E]`` load (tokens) per logical expert (``[window, layers, E]`` is
                accepted too); torch tensor on any device, or numpy.
            num_replicas: ``S`` physical experts per layer, a multiple of ``num_ranks``.
            num_groups: expert groups (``<= 0`` or not dividing ``E``: no grouping).
            num_nodes: nodes (not dividing ``num_ranks``: 1).
            num_ranks: EP ranks.
            old_global_expert_indices: the current ``[layers, S_old]`` physical-to-logical map
                (``-1`` = empty slot), or ``None``.

        Returns:
            ``physical_to_logical_map``: int64 CPU tensor ``[layers, num_replicas]``; every expert
            has at least one slot in every layer.

        Raises:
            EngineLayoutError: (a ``ValueError`` and ``AssertionError``) impossible layout.
            ValueError: NaN/negative loads, wrong shapes.
        """
        import torch

        planner = resolve_planner(cls.planner)
        grouped = os.environ.get(ENV_GROUP_LIMITED, "1").strip().lower() not in _OFF - {"default"}
        new = plan_for_engine(weight, num_replicas, num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                              old=old_global_expert_indices, planner=planner, min_gain=cls.min_gain,
                              group_limited=grouped)
        if _recorder is not None and _rank0():
            try:
                from eplb._checks import to_numpy

                w = to_numpy(weight).astype(np.float64)
                _recorder.add(w.sum(0) if w.ndim == 3 else w, planner)
            except Exception:  # recording must never break serving
                log.exception("eplb: could not record the load window to %s", _recorder.path)
        return torch.from_numpy(np.ascontiguousarray(new, dtype=np.int64))


def _class_name(planner: str, min_gain: float | None) -> str:
    name = f"EplbPolicy_{planner.replace('-', '_')}"
    if min_gain != 0.0:
        name += "__gain_" + ("none" if min_gain is None else repr(float(min_gain)).replace(".", "p").replace("-", "m"))
    return name


def make_policy(planner: str | None = None, min_gain: float | None = 0.0) -> type[EplbPolicy]:
    """A :class:`EplbPolicy` subclass bound to ``planner`` and ``min_gain``.

    The class is a module attribute (``eplb.integrations.vllm.EplbPolicy_<planner>``; created on
    first access in a fresh process too), so ``pickle`` stores it by reference.
    """
    name = resolve_planner(planner)
    cls_name = _class_name(name, min_gain)
    cls = globals().get(cls_name)
    if not (isinstance(cls, type) and issubclass(cls, EplbPolicy)):
        cls = type(cls_name, (EplbPolicy,), {"planner": name, "min_gain": min_gain, "__module__": __name__,
                                             "__qualname__": cls_name})
        globals()[cls_name] = cls
    return cls


def __getattr__(attr: str) -> Any:
    """Re-create a :func:`make_policy` class by its name (unpickling in a process that did not make it)."""
    if attr.startswith("EplbPolicy_"):
        from eplb.policies import load_policy_plugins

        base, _, gain = attr[len("EplbPolicy_"):].partition("__gain_")
        for planner in load_policy_plugins():
            if planner.replace("-", "_") == base:
                mg: float | None = 0.0
                if gain:
                    mg = None if gain == "none" else float(gain.replace("m", "-").replace("p", "."))
                cls = make_policy(planner, mg)
                if cls.__name__ == attr:
                    return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def register() -> type[EplbPolicy] | None:
    """vLLM general-plug-in entry point; opt-in through ``EPLB_VLLM_POLICY`` (see the module docstring).

    Replaces ``EPLB_POLICIES["default"]`` in ``vllm.distributed.eplb.policy`` (the registry vLLM's
    ``EplbState`` reads when it builds its policy; async EPLB requires the policy named
    ``"default"``). Safe to call repeatedly. Returns the installed class, or ``None``.
    """
    global _recorder
    choice = os.environ.get(ENV_POLICY, "").strip()
    if choice.lower() in _OFF:
        log.debug("eplb: %s is not set; leaving vLLM's EPLB policy unchanged", ENV_POLICY)
        return None
    try:
        planner = resolve_planner(None if choice.lower() in ("1", "on", "true", "yes") else choice)
    except ValueError as exc:
        log.warning("eplb: %s=%r: %s; leaving vLLM's EPLB policy unchanged", ENV_POLICY, choice, exc)
        return None
    try:
        from vllm.distributed.eplb import policy as vllm_policy
    except Exception as exc:
        log.warning("eplb: %s=%s but vllm.distributed.eplb.policy is not importable (%s)", ENV_POLICY, choice, exc)
        return None
    registry = getattr(vllm_policy, "EPLB_POLICIES", None)
    if not isinstance(registry, dict):
        log.warning("eplb: this vLLM has no EPLB_POLICIES registry; eplb's policy is not installed")
        return None
    min_gain = _env_min_gain()
    current = registry.get("default")
    if isinstance(current, type) and issubclass(current, EplbPolicy) and current.planner == planner \
            and current.min_gain == min_gain:
        return current  # already installed in this process
    cls = make_policy(planner, min_gain)
    registry["default"] = cls
    record = os.environ.get(ENV_RECORD, "").strip()
    _recorder = _Recorder(record) if record else None
    args = (cls.__name__, planner, min_gain, f", recording load windows to {record}" if record else "", ENV_POLICY)
    msg = "eplb: vLLM EPLB policy 'default' -> eplb %s (planner=%s, min_gain=%s%s); set %s= to disable"
    log.info(msg, *args)
    vlog = _vllm_logger()
    if vlog is not log:  # vLLM's logger does not propagate: say it there too, so it shows in vLLM's output
        vlog.info(msg, *args)
    return cls


def _vllm_logger() -> logging.Logger:
    """vLLM's logger when available (so the line shows in vLLM's output), else eplb's."""
    try:
        from vllm.logger import init_logger

        return init_logger("vllm.eplb_plugin")  # type: ignore[no-any-return]
    except Exception:
        return log
