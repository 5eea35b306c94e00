"""Hard rank loss: kill one of 3 gloo processes while serving, restart the survivors as a 2-rank world that
resumes from the recorded placement (a placement excluding the lost rank) with every expert served.

The test plays torchrun elastic's role (restart the surviving workers with a smaller WORLD_SIZE); the
workers are this file run as a script. The time to recover (kill -> first step served by the survivors)
is printed and returned in the test's record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

L, E, SPR = 2, 6, 3  # 3 ranks x 3 slots = 9 slots; the 2 survivors keep 6 slots >= 6 experts
H, INTER, K, N_TOK = 8, 4, 2, 12
PATTERN = np.array([8, 6, 4, 3, 2, 1])  # per rank and step: 12 tokens x top-2


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _worker(phase: str, rank: int, world: int, port: int, d: Path, steps: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from eplb import Placement
    from eplb.online import BalancerConfig
    from eplb.runtime.balancer import OnlineBalancer, resume_placement
    from eplb.runtime.layer import ExpertParallelMoE, reference_moe
    from eplb.runtime.trace_router import topk_from_counts

    torch.set_num_threads(1)
    t_start = time.time()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    g = torch.Generator().manual_seed(7)  # the "checkpoint": every rank can load any expert
    w13 = torch.randn(L, E, 2 * INTER, H, generator=g) * 0.3
    w2 = torch.randn(L, E, H, INTER, generator=g) * 0.3
    cfg = BalancerConfig(num_wait_worker_iterations=0, num_iterations_eplb_update=4, window_size=4,
                         layer_updates_per_iter=2, policy="eplb", policy_backend="inline",
                         policy_options={"max_replicas": 2}, expert_map_record_path=str(d / "eplb.json"))
    pl = resume_placement(cfg, num_experts=E, num_ranks=world, num_layers=L)
    resumed = pl is not None
    if pl is None:
        pl = Placement.contiguous(L, E, world, world * SPR)
    layers = [ExpertParallelMoE.from_full_weights(w13[i], w2[i], pl, i) for i in range(L)]
    bal = OnlineBalancer(layers, cfg)
    prog = d / f"{phase}.rank{rank}.json"
    first_step_t = None
    try:
        for t in range(steps):
            bal.step()
            gen = torch.Generator().manual_seed(100 * t + rank)
            hidden = torch.randn(N_TOK, H, generator=gen)
            for i, layer in enumerate(layers):
                assert set(layer.placement_row.tolist()) == set(range(E)), "an expert lost its last slot"
                ids = torch.as_tensor(topk_from_counts(PATTERN, N_TOK, K))
                wts = torch.rand(N_TOK, K, generator=gen)
                out = layer(hidden, ids, wts)
                torch.testing.assert_close(out, reference_moe(hidden, ids, wts, w13[i], w2[i]), rtol=1e-5, atol=1e-5)
            if first_step_t is None:
                first_step_t = time.time()
            _write(prog, {"step": t, "t": time.time(), "first_step_t": first_step_t, "t_start": t_start,
                          "resumed": resumed, "num_ranks": pl.num_ranks, "placement": bal.placement.phy2log.tolist(),
                          "plans": len(bal.history)})
            time.sleep(0.02)
        bal.close()
        _write(d / f"{phase}.rank{rank}.done.json", {"ok": True})
    except Exception as exc:  # noqa: BLE001 - a peer died: report and exit non-zero (what torchrun sees)
        _write(d / f"{phase}.rank{rank}.failed.json", {"t": time.time(), "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)


def _spawn(phase: str, world: int, port: int, d: Path, steps: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return [subprocess.Popen([sys.executable, __file__, phase, str(r), str(world), str(port), str(d), str(steps)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(world)]


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _wait(cond, timeout: float, what: str, procs=()) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise TimeoutError(what)


def test_hard_rank_loss_survivors_resume_with_every_expert_served(tmp_path):
    from eplb.runtime.testing import free_port

    d = tmp_path
    procs = _spawn("serve", 3, free_port(), d, 400)
    try:
        # serve until the first rebalance was recorded and every rank is past step 12
        _wait(lambda: all((_read(d / f"serve.rank{r}.json") or {}).get("step", -1) >= 12 for r in range(3))
              and (d / "eplb.native.json").exists(), 90, "3-rank serving did not reach step 12", procs)
        os.kill(procs[2].pid, signal.SIGKILL)  # hard loss of rank 2
        t_kill = time.time()
        for p in procs[:2]:
            p.wait(timeout=60)  # survivors notice (their next collective fails) and exit
        t_detect = max((_read(d / f"serve.rank{r}.failed.json") or {"t": time.time()})["t"] for r in range(2))
        assert all(p.returncode != 0 for p in procs[:2])
        recorded = json.loads((d / "eplb.native.json").read_text())
        assert recorded["num_ranks"] == 3
        # "torchrun elastic": restart the survivors as a 2-rank world
        procs2 = _spawn("resume", 2, free_port(), d, 10)
        _wait(lambda: all((d / f"resume.rank{r}.done.json").exists() or (d / f"resume.rank{r}.failed.json").exists()
                          for r in range(2)), 90, "survivors did not resume", procs2)
        for p in procs2:
            p.wait(timeout=30)
        errs = [p.stderr.read().decode()[-2000:] for p in procs2 if p.returncode != 0]
        assert not errs, errs
        states = [_read(d / f"resume.rank{r}.json") for r in range(2)]
        assert all(s is not None and s["resumed"] and s["num_ranks"] == 2 and s["step"] == 9 for s in states)
        final = np.array(states[0]["placement"])
        assert final.shape == (L, 2 * SPR)
        assert all(sorted(set(row)) == list(range(E)) for row in final.tolist())  # every expert served
        recover_s = max(s["first_step_t"] for s in states) - t_kill
        print(f"\nrank loss: detected after {t_detect - t_kill:.2f} s, survivors serving again after {recover_s:.2f} s "
              f"(restart of 2 processes incl. torch import {max(s['first_step_t'] - s['t_start'] for s in states):.2f} s)")
        assert recover_s < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), int(sys.argv[6]))
