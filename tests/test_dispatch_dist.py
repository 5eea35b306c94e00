"""Balanced dispatch across real processes (torch.distributed, gloo): every rank all-gathers the per-expert
counts, calls assign_slots itself, and the per-slot totals over all ranks equal the planned quotas."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out_dir: str) -> None:
    from eplb import Placement
    from eplb.dispatch import DispatchTable, assign_slots, plan_quotas

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        rng = np.random.default_rng(0)  # same placement on every rank
        E, spr = 7, 3
        row = np.concatenate([np.arange(E), rng.integers(0, E, WORLD * spr - E)])
        rng.shuffle(row)
        table = DispatchTable.from_placement(Placement(row[None], E, WORLD), 0)
        local_rng = np.random.default_rng(100 + rank)  # different tokens on every rank
        for _step in range(3):
            ids = torch.as_tensor(local_rng.integers(0, E, (int(local_rng.integers(5, 40)), 2)))
            counts = torch.zeros(E, dtype=torch.int64).scatter_add_(0, ids.view(-1), torch.ones(ids.numel(), dtype=torch.int64))
            gathered = [torch.zeros(E, dtype=torch.int64) for _ in range(WORLD)]
            dist.all_gather(gathered, counts)
            g = torch.stack(gathered)
            slots = assign_slots(ids, table, "balanced", rank=rank, global_counts=g)
            assert torch.equal(table.phy2log[slots], ids)
            per_slot = torch.bincount(slots.view(-1), minlength=table.num_slots)
            dist.all_reduce(per_slot)
            planned = torch.zeros(table.num_slots, dtype=torch.int64).scatter_add_(
                0, table.log2phy.clamp(min=0).view(-1), plan_quotas(g, table).view(-1))
            assert torch.equal(per_slot, planned), (per_slot.tolist(), planned.tolist())
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def test_balanced_dispatch_over_gloo_matches_plan() -> None:
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.spawn(_worker, args=(_free_port(), d), nprocs=WORLD, join=False)
        for p in ctx.processes:
            p.join(timeout=90)
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.terminate()
        assert not alive, "a rank hung"
        assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
        assert sorted(os.listdir(d)) == [f"ok{r}" for r in range(WORLD)]
