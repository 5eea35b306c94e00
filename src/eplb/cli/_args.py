"""Argument checks shared by the CLI commands (messages use the CLI's option names)."""

from __future__ import annotations


def check_layout_args(num_experts: int, num_slots: int, ep_size: int, num_nodes: int, num_groups: int) -> None:
    """The layout options' consistency (plan, simulate, capacity), with the CLI's option names in the messages."""
    for name, v in (("num-slots", num_slots), ("ep-size", ep_size), ("num-nodes", num_nodes), ("num-groups", num_groups)):
        if v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v}")
    if num_slots < num_experts:
        raise ValueError(f"num-slots: {num_slots} slots cannot hold the trace's {num_experts} experts (need >= {num_experts})")
    if num_slots % ep_size:
        raise ValueError(f"num-slots: {num_slots} slots cannot be split evenly over ep-size {ep_size} ranks "
                         f"(try {((num_slots + ep_size - 1) // ep_size) * ep_size})")
    if ep_size % num_nodes:
        raise ValueError(f"num-nodes: ep-size {ep_size} ranks cannot be split evenly over {num_nodes} nodes")
    if num_experts % num_groups:
        raise ValueError(f"num-groups: {num_experts} experts cannot be split into {num_groups} equal groups")


def check_output(path: object, force: bool) -> None:
    """The one overwrite rule of every command that writes a map or a trace: an existing output is
    refused unless ``--force`` is given (checked before any work, so nothing is half-written)."""
    from pathlib import Path

    p = Path(str(path))
    if p.exists() and not force:
        raise ValueError(f"output: {p} already exists (pass --force to replace it)")
