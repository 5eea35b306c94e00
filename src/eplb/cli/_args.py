"""Argument checks shared by the CLI commands (messages use the CLI's option names)."""

from __future__ import annotations

from eplb._checks import check_layout
from eplb.errors import InputError


def check_layout_args(num_experts: int, num_slots: int, ep_size: int, num_nodes: int, num_groups: int) -> None:
    """:func:`eplb._checks.check_layout` with the CLI's option names in the messages."""
    check_layout(num_experts, num_slots, ep_size, num_nodes, num_groups=num_groups,
                 names=("num-slots", "ep-size", "num-nodes", "num-groups"))


def check_output(path: object, force: bool) -> None:
    """The one overwrite rule of every command that writes a map or a trace: an existing output is
    refused unless ``--force`` is given (checked before any work, so nothing is half-written)."""
    from pathlib import Path

    p = Path(str(path))
    if p.exists() and not force:
        raise InputError(f"output: {p} already exists (pass --force to replace it)")
