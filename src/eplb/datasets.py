"""Real expert-load traces shipped with the package (derived from public measurements).

See ``src/eplb/data/SOURCES.md`` for what each one is and where it comes from.
"""

from __future__ import annotations

from importlib import resources

from eplb.errors import InputError
from eplb.stats.trace import Trace

__all__ = ["builtin_traces", "load_builtin"]

_SUFFIX = ".safetensors"


def builtin_traces() -> list[str]:
    """Names of the shipped traces (e.g. ``"llama4_maverick_mmlu_decode"``)."""
    root = resources.files("eplb") / "data"
    return sorted(p.name[: -len(_SUFFIX)] for p in root.iterdir() if p.name.endswith(_SUFFIX))


def load_builtin(name: str) -> Trace:
    """Load a shipped trace by name; raises ValueError listing the available names."""
    names = builtin_traces()
    if name not in names:
        raise InputError(f"trace: unknown built-in trace {name!r}; available: {', '.join(names)}")
    with resources.as_file(resources.files("eplb") / "data" / f"{name}{_SUFFIX}") as path:
        return Trace.load(path)
