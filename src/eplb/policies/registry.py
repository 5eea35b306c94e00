"""The policy registry: every policy's name, where it lives and what it can do, known without importing it.

A policy is declared here (built-ins) or by :func:`register_policy` (plug-ins), with its
capabilities:

* ``migration``: ``"none"`` (plans from scratch; ``current=`` is refused), ``"optional"`` (uses
  ``current=``, the placement in service, to move few experts, when given) or ``"required"``
  (needs ``current=``);
* ``per_step``: uses the per-step window ``[T, L, E]`` beyond its sum (robust / dispatch-aware);
* ``hierarchical``: honours ``num_nodes`` / ``num_groups`` (node-aware placement);
* ``excluded_ranks``: accepts ``excluded_ranks=`` (drained ranks hold nothing only they serve).

Built-ins defined above :mod:`eplb.policies` (``eplb-dispatch`` in :mod:`eplb.dispatch`, which
imports torch) are imported on first use, so every entry point -- :func:`eplb.plan`, the CLI, the
engine integrations, the online balancer, ``simulate`` / ``capacity`` -- sees every policy, and
:func:`check_serves` says why one cannot serve a purpose instead of failing inside it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from eplb.errors import InputError

__all__ = ["DEFAULT_POLICY", "POLICIES", "POLICY_OPTIONS", "PolicyFn", "PolicyInfo", "check_options", "check_serves", "policy_info",
           "register_policy"]

PolicyFn = Callable[..., np.ndarray]

DEFAULT_POLICY = "eplb"
"""The policy every entry point uses when none is named (``plan``, ``evaluate``, ``simulate``, ``capacity``, the
runtime manager and the engine plug-ins): :func:`eplb.policies.eplb_policy.eplb_policy`, which plans ``[T, L, E]``
windows on the per-step objective with a per-layer DeepSeek fallback."""

_MIGRATION = ("none", "optional", "required")


@dataclass(frozen=True)
class PolicyInfo:
    """A registered policy: ``name``, the ``module`` that defines it, its capabilities and function."""

    name: str
    module: str
    migration: str = "none"
    per_step: bool = False
    hierarchical: bool = False
    excluded_ranks: bool = False
    options: tuple[str, ...] | None = None  # the options it takes (None: not declared, passed unchecked)
    fn: PolicyFn | None = None

    @property
    def migration_aware(self) -> bool:
        """Whether it takes ``current=`` (the placement in service) to move few experts."""
        return self.migration != "none"

    def capabilities(self) -> dict[str, Any]:
        return {"migration": self.migration, "per_step": self.per_step, "hierarchical": self.hierarchical,
                "excluded_ranks": self.excluded_ranks}


_P = "eplb.policies"
_EP = "eplb.policies.eplb_policy"
_INFO: dict[str, PolicyInfo] = {i.name: i for i in (
    PolicyInfo("deepseek", _P, hierarchical=True),
    PolicyInfo("deepseek-global", _P),
    PolicyInfo("deepseek-hierarchical", _P, hierarchical=True),
    PolicyInfo("eplb", _EP, migration="optional", per_step=True, hierarchical=True, excluded_ranks=True),
    PolicyInfo("eplb-hierarchical", _EP, migration="optional", hierarchical=True, excluded_ranks=True),
    PolicyInfo("eplb-incremental", _EP, migration="required", hierarchical=True, excluded_ranks=True),
    PolicyInfo("eplb-robust", "eplb.policies.robust", per_step=True, excluded_ranks=True),
    PolicyInfo("eplb-dispatch", "eplb.dispatch.policy", per_step=True, hierarchical=True),
    PolicyInfo("eplb-cooc", "eplb.policies.cooc", per_step=True, hierarchical=True),
)}


def register_policy(name: str, options: Sequence[str] | None = None, *, migration: str | None = None,
                    per_step: bool | None = None, hierarchical: bool | None = None,
                    excluded_ranks: bool | None = None) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator registering a policy function under ``name`` (signature: see :mod:`eplb.policies`).

    ``options``: the option names it takes; :func:`eplb.plan` then refuses any other option with an
    error listing these (``None``: not declared, options are passed through unchecked). A built-in
    keeps its declared capabilities; a new policy declares its own (default: not migration-aware,
    sums only, flat, no excluded ranks).
    """
    if migration is not None and migration not in _MIGRATION:
        raise InputError(f"migration: expected one of {list(_MIGRATION)}, got {migration!r}")

    def deco(fn: PolicyFn) -> PolicyFn:
        base = _INFO.get(name) or PolicyInfo(name, getattr(fn, "__module__", "?"))
        changes = {k: v for k, v in (("migration", migration), ("per_step", per_step),
                                     ("hierarchical", hierarchical), ("excluded_ranks", excluded_ranks))
                   if v is not None}
        _INFO[name] = replace(base, fn=fn, options=tuple(options) if options is not None else None, **changes)
        return fn

    return deco


def policy_info(name: str) -> PolicyInfo:
    """The registered policy ``name`` (its module imported), or an InputError listing the known ones."""
    info = _INFO.get(name) if isinstance(name, str) else None
    if info is None:
        raise InputError(f"policy: unknown policy {name!r}; expected one of {sorted(_INFO)}")
    if info.fn is None:
        importlib.import_module(info.module)
        info = _INFO[name]
        if info.fn is None:
            raise InputError(f"policy: {name!r} is declared in {info.module} but that module registers no such policy")
    return info


def check_serves(name: str, *, current: bool = False, excluded: bool = False, what: str = "policy") -> PolicyInfo:
    """The policy ``name`` if it can serve a call with (``current``) / without the placement in service
    and with ``excluded`` ranks; else an InputError saying why (naming ``what``)."""
    info = policy_info(name)
    if current and info.migration == "none":
        raise InputError(f"current: {what} {name!r} is not migration-aware (it plans from scratch); "
                         f"migration-aware policies: {sorted(n for n, i in _INFO.items() if i.migration != 'none')}")
    if not current and info.migration == "required":
        raise InputError(f"current: {what} {name!r} needs current=<the placement in service> (it only re-plans one)")
    if excluded and not info.excluded_ranks:
        raise InputError(f"excluded_ranks: {what} {name!r} cannot exclude ranks; policies that can: "
                         f"{sorted(n for n, i in _INFO.items() if i.excluded_ranks)}")
    return info


def check_options(policy: str, options: Mapping[str, Any]) -> None:
    """Refuse options ``policy`` does not take; the error names the option and lists the valid ones.

    ``current`` (the placement in service) is governed by the policy's ``migration`` capability
    (:func:`check_serves`), not by its option list.
    """
    valid = policy_info(policy).options
    if valid is None:
        return
    for key in options:
        if key not in valid and key != "current":
            listed = ", ".join(valid) if valid else "none"
            raise InputError(f"{key}: policy {policy!r} has no option {key!r}; its options: {listed}")


class _Policies(Mapping[str, PolicyFn]):
    """``name -> policy function`` over every declared policy; a policy's module is imported on access."""

    def __getitem__(self, name: str) -> PolicyFn:
        if name not in _INFO:
            raise KeyError(name)
        fn = policy_info(name).fn
        assert fn is not None
        return fn

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_INFO))

    def __len__(self) -> int:
        return len(_INFO)

    def __contains__(self, name: object) -> bool:
        return name in _INFO

    def __repr__(self) -> str:
        return f"POLICIES({sorted(_INFO)})"


#: Every registered policy by name (lazy: the defining module is imported when a policy is looked up).
POLICIES: Mapping[str, PolicyFn] = _Policies()


class _Options(Mapping[str, tuple[str, ...]]):
    """``name -> declared option names`` of the policies that declared them (modules imported on access)."""

    def _declared(self) -> dict[str, tuple[str, ...]]:
        out = {}
        for n in sorted(_INFO):
            opts = policy_info(n).options
            if opts is not None:
                out[n] = opts
        return out

    def __getitem__(self, name: str) -> tuple[str, ...]:
        opts = policy_info(name).options if name in _INFO else None
        if opts is None:
            raise KeyError(name)
        return opts

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared())

    def __len__(self) -> int:
        return len(self._declared())


#: The options (``plan(..., **options)`` / ``-O KEY=VALUE``) each policy takes, where it declared them.
POLICY_OPTIONS: Mapping[str, tuple[str, ...]] = _Options()
