"""Recorder: device counts equal brute force on random-weight transformers MoE models (CPU), buffers,
iteration ranges, environment variables, per-rank shards under torch.distributed (gloo)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eplb.stats.recorder import (
    ExpertRecorder,
    attach,
    detach,
    find_routers,
    register_router,
    topk_from_logits,
)
from eplb.stats.store import read_dir
from eplb.stats.trace import TraceError


def _tiny(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    if kind == "qwen3":
        cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                             num_experts_per_tok=2, head_dim=8)
    else:
        cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen3", "mixtral"])
def test_recorder_matches_brute_force_on_transformers_model(kind: str) -> None:
    model = _tiny(kind)
    routers = find_routers(model)
    assert [r.layer_id for r in routers] == list(range(len(routers)))
    # brute force, independent of the router's own top-k: capture the router *inputs* and recompute
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = [r.module.register_forward_hook(lambda m, i, o, lid=r.layer_id: inputs.setdefault(lid, []).append(i[0]))
               for r in routers]
    rec = attach(model, flush_every=2)  # small buffer: several device->host swaps
    steps = 5
    with torch.no_grad():
        for s in range(steps):
            model(torch.randint(0, 64, (2, 3 + s)))
    tr = rec.trace()
    for h in handles:
        h.remove()
    detach(rec)
    E, k = routers[0].num_experts, routers[0].top_k
    want = np.zeros((steps, len(routers), E), dtype=np.int64)
    for j, r in enumerate(routers):
        for s, h in enumerate(inputs[r.layer_id]):
            logits = F.linear(h.reshape(-1, h.shape[-1]), r.module.weight)
            ids = logits.softmax(-1).topk(k, dim=-1).indices
            for e in ids.flatten().tolist():
                want[s, j, e] += 1
    np.testing.assert_array_equal(tr.counts, want)
    assert tr.counts.sum() == sum(2 * (3 + s) * k for s in range(steps)) * len(routers)
    assert tr.top_k == k and tr.num_experts == E


def test_record_and_add_counts_with_range_and_cooccurrence() -> None:
    rng = np.random.default_rng(0)
    E, k = 6, 2
    rec = ExpertRecorder(2, E, layer_ids=(4, 7), device="cpu", iter_range="2-6", flush_every=3, cooccurrence=True,
                         record_topk=True, top_k=k)
    want = np.zeros((4, 2, E), dtype=np.int64)
    want_co = np.zeros((4, 2, E, E), dtype=np.int64)
    for s in range(9):
        for j, lid in enumerate((4, 7)):
            ids = np.stack([rng.choice(E, k, replace=False) for _ in range(5)])
            rec.record(lid, torch.from_numpy(ids).to(torch.int32))
            if 2 <= s < 6:
                want[s - 2, j] += np.bincount(ids.ravel(), minlength=E)
                oh = np.zeros((5, E))
                np.put_along_axis(oh, ids, 1, axis=1)
                want_co[s - 2, j] += (oh.T @ oh).astype(np.int64)
        extra = torch.arange(E)
        rec.add_counts(7, extra)
        if 2 <= s < 6:
            want[s - 2, 1] += np.arange(E)
        rec.step()
    assert rec.finished and not rec.active  # finalised at the range's stop
    tr = rec.trace()
    np.testing.assert_array_equal(tr.step_ids, [2, 3, 4, 5])
    np.testing.assert_array_equal(tr.counts, want)
    np.testing.assert_array_equal(tr.cooccurrence, want_co)
    assert tr.topk_ids.shape == (20, 2, 2) and list(tr.topk_offsets) == [0, 5, 10, 15, 20]
    for t in range(4):  # raw ids agree with the counts of layer 4
        a, b = tr.topk_offsets[t], tr.topk_offsets[t + 1]
        np.testing.assert_array_equal(np.bincount(tr.topk_ids[a:b, 0].ravel(), minlength=E), want[t, 0])


def test_recorder_errors() -> None:
    rec = ExpertRecorder(1, 4, device="cpu")
    with pytest.raises(ValueError, match="layer: 3 is not a recorded MoE layer id"):
        rec.record(3, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"counts: expected shape \[4\]"):
        rec.add_counts(0, torch.ones(5))
    with pytest.raises(TraceError, match="no steps recorded"):
        rec.trace()
    with pytest.raises(ValueError, match="iter-range"):
        ExpertRecorder(1, 4, device="cpu", iter_range="5-2")


def test_env_vars_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXPERT_STATISTIC_ITER_RANGE", raising=False)
    assert ExpertRecorder.from_env(2, 4) is None
    monkeypatch.setenv("EXPERT_STATISTIC_ITER_RANGE", "1-4")
    monkeypatch.setenv("EXPERT_STATISTIC_PATH", str(tmp_path / "stat"))
    rec = ExpertRecorder.from_env(2, 4, device="cpu", layer_ids=(3, 5), top_k=1, output_format="trtllm", chunk_steps=2)
    assert rec is not None
    for s in range(6):
        rec.record(3, torch.tensor([[s % 4]]))
        rec.record(5, torch.tensor([[0], [1]]))
        rec.step()
    assert rec.finished
    tr = read_dir(tmp_path / "stat" / "rank0")
    np.testing.assert_array_equal(tr.step_ids, [1, 2, 3])
    np.testing.assert_array_equal(tr.counts[:, 0], np.eye(4, dtype=int)[[1, 2, 3]])
    # TensorRT-LLM's own layout was written too
    from eplb.stats.importers import read_trtllm

    trt = read_trtllm(tmp_path / "stat")
    np.testing.assert_array_equal(trt.counts, tr.counts)
    assert trt.layer_ids == (3, 5) and trt.top_k == 1


def test_register_router_for_other_modules() -> None:
    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(5, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T  # logits only

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
            for m in self.layers:
                m.router = Gate()  # type: ignore[assignment]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.layers:
                x = x + m.router(x).sum(-1, keepdim=True)
            return x

    register_router("Gate", topk_from_logits(2))
    model = Block()
    rec = attach(model, device="cpu", top_k=2)  # explicit recorder options pass through (top_k used to clash)
    x = torch.randn(7, 8)
    model(x)
    tr = rec.trace()
    assert tr.layer_ids == (0, 1) and tr.num_experts == 5
    ids = (x @ model.layers[0].router.weight.T).topk(2, dim=-1).indices
    np.testing.assert_array_equal(tr.counts[0, 0], np.bincount(ids.ravel().numpy(), minlength=5))


# ------------------------------------------------------------------ torch.distributed shards
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        rec = ExpertRecorder(2, 8, device="cpu", path=path, flush_every=2, chunk_steps=3)  # rank/world from dist
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(5):
            for lid in range(2):
                rec.record(lid, torch.randint(0, 8, (4 + rank, 2), generator=g))
            rec.step()
        rec.close()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_per_rank_shards_under_torch_distributed(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    world, path = 2, str(tmp_path / "rec")
    ctx = mp.start_processes(_worker, args=(world, _free_port(), path), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + 90
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in 90 s")
    assert sorted(p.name for p in Path(path).iterdir()) == ["rank0", "rank1"]
    want = np.zeros((5, 2, 8), dtype=np.int64)
    for rank in range(world):
        g = torch.Generator().manual_seed(100 + rank)
        for s in range(5):
            for lid in range(2):
                ids = torch.randint(0, 8, (4 + rank, 2), generator=g)
                want[s, lid] += np.bincount(ids.ravel().numpy(), minlength=8)
    tr = read_dir(path)
    np.testing.assert_array_equal(tr.counts, want)
    assert tr.ep_size == 2 and tr.meta["world_size"] == 2


def test_cli_record_tiny_preset(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from eplb.cli import app

    (tmp_path / "p.jsonl").write_text('{"prompt": "hello experts"}\n{"input_ids": [1, 2, 3, 4, 5]}\n"plain"\n')
    res = CliRunner().invoke(app, ["record", "--model", "qwen3-moe", "--dataset", str(tmp_path / "p.jsonl"), "-o",
                                   str(tmp_path / "t.safetensors"), "--batch-size", "2", "--decode-steps", "2", "-q"])
    assert res.exit_code == 0, res.output
    from eplb.stats.trace import Trace

    tr = Trace.load(tmp_path / "t.safetensors")
    assert tr.counts.shape == (6, 4, 16)  # 2 batches x (1 prefill + 2 decode steps), 4 layers, 16 experts
    # prefill of batch 0: "hello experts" (13 bytes) + 5 ids, top-4 per token, every layer
    assert tr.counts[0].sum(-1).tolist() == [(13 + 5) * 4] * 4
    assert tr.counts[1].sum(-1).tolist() == [2 * 4] * 4  # one token per prompt per decode step


@pytest.mark.parametrize("preset", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3", "olmoe"])
def test_every_supported_family_is_found_and_counted(preset: str) -> None:
    from eplb.stats.hf import PRESETS, build_model, record_model

    model, _, desc = build_model(preset)
    assert "SYNTHETIC" in desc
    routers = find_routers(model)
    dense = PRESETS[preset].get("first_k_dense_replace", 0)
    assert [r.layer_id for r in routers] == list(range(dense, PRESETS[preset]["num_hidden_layers"]))
    k = routers[0].top_k
    tr = record_model(model, [[1, 2, 3], [4, 5]], batch_size=2, device="cpu")
    assert tr is not None and tr.layer_ids == tuple(r.layer_id for r in routers)
    assert tr.counts.sum(-1).tolist() == [[5 * k] * len(routers)]


def test_build_model_from_config_file_and_checkpoint(tmp_path: Path) -> None:
    import json as _json

    from eplb.stats.hf import PRESETS, build_model

    cfg = {**PRESETS["qwen3-moe"], "hidden_size": 256, "num_attention_heads": 8, "head_dim": 32}
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    m, tok, desc = build_model(str(tmp_path / "config.json"))
    assert "shrunk" in desc and "SYNTHETIC" in desc and tok is None
    assert m.config.hidden_size == 64 and m.config.num_experts == 16 and m.config.num_experts_per_tok == 4
    ckpt = tmp_path / "ckpt"
    m.save_pretrained(ckpt)
    m2, _, desc2 = build_model(str(ckpt))
    assert desc2 == f"checkpoint {ckpt}"
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(ValueError, match="neither a preset"):
        build_model(str(tmp_path / "nope"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_double_buffered_copies_keep_every_step(tmp_path: Path) -> None:
    """Asynchronous device->pinned copies on a side stream: per-step counts exact, in order, on every path."""
    E, L, steps = 32, 3, 50
    g = torch.Generator().manual_seed(5)
    recs = [ExpertRecorder(L, E, device="cuda", flush_every=3, cooccurrence=True),
            ExpertRecorder(L, E, device="cuda", flush_every=4, path=tmp_path / "rec", chunk_steps=7)]
    want = np.zeros((steps, L, E), dtype=np.int64)
    want_co = np.zeros((steps, L, E, E), dtype=np.int64)
    for s in range(steps):
        for lid in range(L):
            ids = torch.stack([torch.randperm(E, generator=g)[:4] for _ in range(1 + (s * 7 + lid) % 40)])
            want[s, lid] = np.bincount(ids.ravel().numpy(), minlength=E)
            oh = np.zeros((ids.shape[0], E))
            np.put_along_axis(oh, ids.numpy(), 1, axis=1)
            want_co[s, lid] = oh.T @ oh
            big = torch.randn(2048, 2048, device="cuda")
            (big @ big).sum()  # keep the compute stream busy while copies run
            for r in recs:
                r.record(lid, ids.cuda())
        for r in recs:
            r.step()
    for r in recs:
        tr = r.trace()
        np.testing.assert_array_equal(tr.counts, want)
        np.testing.assert_array_equal(tr.step_ids, np.arange(steps))
        r.close()
    np.testing.assert_array_equal(recs[0].trace().cooccurrence, want_co)
    np.testing.assert_array_equal(read_dir(tmp_path / "rec").counts, want)
