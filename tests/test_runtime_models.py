"""patch_model on transformers 5 MoE models: same logits as the unpatched model (2 gloo processes), placement
loading (map files, TensorRT-LLM YAML), and mismatches raising on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb.placement import Placement, PlacementError
from eplb.runtime import TINY_CONFIGS, build_model, find_experts, load_placement, patch_model
from eplb.runtime.layer import ExpertParallelMoE
from eplb.runtime.testing import run_distributed

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _placement_for(model, world: int, seed: int, extra_per_rank: int = 1) -> Placement:
    ex = find_experts(model)
    E = ex[0].num_experts
    rng = np.random.default_rng(seed)
    spr = -(-E // world) + extra_per_rank
    rows = []
    for _ in ex:
        row = np.concatenate([np.arange(E), rng.integers(0, E, world * spr - E)])
        rng.shuffle(row)
        rows.append(row)
    return Placement(np.stack(rows), E, world, layer_ids=[x.layer_id for x in ex])


def _logits_worker(rank: int, world: int, names: list[str]) -> dict[str, float]:
    out = {}
    for i, name in enumerate(names):
        model = build_model(name, seed=i)[0]
        input_ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            ref = model(input_ids).logits
        strategy = ["local-first", "round-robin", "balanced"][i % 3]
        pl = _placement_for(model, world, seed=i)
        layers = patch_model(model, pl, strategy=strategy, max_num_tokens=5 if i % 2 else None)
        assert len(layers) == pl.num_layers and all(isinstance(m, ExpertParallelMoE) for m in layers)
        assert not find_experts(torch.nn.Module()) and find_experts(model) == []  # all swapped
        with torch.no_grad():
            got = model(input_ids).logits
        err = float((got - ref).abs().max())
        assert err < 1e-4, (name, err)
        counts = torch.stack([m.take_counts() for m in layers])
        k = model.config.num_experts_per_tok
        assert counts.sum(1).tolist() == [input_ids.numel() * k] * len(layers)
        out[name] = err
    return out


@pytest.fixture(scope="module", autouse=True)
def _warm_imports():
    """Import every architecture's modeling code once in the parent: forked workers inherit it."""
    for name in TINY_CONFIGS:
        build_model(name)


def test_patched_models_give_the_same_logits_2_ranks():
    res = run_distributed(_logits_worker, 2, list(TINY_CONFIGS), timeout_s=80)
    assert set(res[0]) == set(TINY_CONFIGS)


def _mismatch_worker(rank: int, world: int, tmp: str) -> list[str]:
    msgs = []
    model = build_model("tiny-mixtral")[0]

    def expect(fn):
        with pytest.raises(PlacementError) as info:
            fn()
        msgs.append(str(info.value))

    # expert count mismatch (placement of 6 experts for an 8-expert model)
    expect(lambda: patch_model(model, Placement(np.tile(np.arange(6), (2, 1)), 6, world)))
    # layer count mismatch
    expect(lambda: patch_model(model, Placement(np.tile(np.arange(8), (3, 1)), 8, world)))
    # world size != ep_size
    expect(lambda: patch_model(model, Placement(np.tile(np.arange(8), (2, 1)), 8, 4)))
    # ranks disagree (rank 1 holds another placement)
    a = Placement(np.tile(np.arange(8), (2, 1)), 8, world)
    b = Placement(np.tile(np.arange(8)[::-1].copy(), (2, 1)), 8, world)
    expect(lambda: patch_model(model, b if rank == 1 else a))
    # a placement file missing on rank 0 only
    expect(lambda: patch_model(model, f"{tmp}/nope.yaml" if rank == 0 else None))
    # nothing was patched by the failed calls
    assert len(find_experts(model)) == 2
    return msgs


def test_mismatched_placement_raises_on_every_rank(tmp_path):
    msgs = run_distributed(_mismatch_worker, 2, str(tmp_path), timeout_s=60, collective_timeout_s=30)
    for m in msgs:
        assert "6 experts" in m[0] and "8" in m[0]
        assert "layers" in m[1]
        assert "ep_size=4" in m[2]
        assert "disagree" in m[3]
        assert "not found" in m[4]


def test_load_placement_trtllm_yaml(tmp_path):
    E, R, S = 8, 2, 10
    yml = tmp_path / "lb.yaml"
    yml.write_text("initial_global_assignments:\n  1: [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]\n"
                   "  2: [7, 6, 5, 4, 3, 2, 1, 0, 7, 7]\nlayer_updates_per_iter: 0\nnum_slots: 10\n")
    pl = load_placement(yml, num_experts=E, ep_size=R, layer_ids=[1, 2])
    assert pl.layer_ids == (1, 2) and pl.num_slots == S
    assert pl.phy2log[1].tolist() == [7, 6, 5, 4, 3, 2, 1, 0, 7, 7]
    only2 = load_placement(yml, num_experts=E, ep_size=R, layer_ids=[2])
    assert only2.phy2log.tolist() == [[7, 6, 5, 4, 3, 2, 1, 0, 7, 7]]
    with pytest.raises(ValueError, match="layer"):
        load_placement(yml, num_experts=E, ep_size=R, layer_ids=[0, 1])
    with pytest.raises(ValueError):
        load_placement(yml, num_experts=6, ep_size=R, layer_ids=[1, 2])
    # online-only config: contiguous start with num_slots slots
    online = tmp_path / "online.yaml"
    online.write_text("moe_config:\n  load_balancer:\n    num_slots: 12\n    layer_updates_per_iter: 2\n")
    pl2 = load_placement(online, num_experts=E, ep_size=R, layer_ids=[1, 2])
    assert pl2.phy2log[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert pl2.meta["layer_updates_per_iter"] == 2
    with pytest.raises(PlacementError, match="num_slots"):
        load_placement(online, num_experts=E, ep_size=R, layer_ids=[1, 2], num_slots=10)
    with pytest.raises(PlacementError, match="not found"):
        load_placement(tmp_path / "missing.yaml", num_experts=E, ep_size=R, layer_ids=[1])


def test_patch_model_from_trtllm_yaml_single_rank(tmp_path):
    model = build_model("tiny-deepseek-v3")[0]  # MoE layers 1 and 2 (first_k_dense_replace=1)
    ex = find_experts(model)
    assert [x.layer_id for x in ex] == [1, 2]
    yml = tmp_path / "lb.yaml"
    yml.write_text("initial_global_assignments:\n  1: [0, 1, 2, 3, 4, 5, 6, 7, 3, 3]\n"
                   "  2: [7, 6, 5, 4, 3, 2, 1, 0, 0, 1]\nlayer_updates_per_iter: 0\nnum_slots: 10\n")
    input_ids = torch.randint(0, 128, (3, 4))
    with torch.no_grad():
        ref = model(input_ids).logits
    layers = patch_model(model, str(yml), strategy="round-robin")
    assert [m.layer_id for m in layers] == [1, 2] and layers[0].w13.shape[0] == 10
    assert layers[1].placement_row.tolist() == [7, 6, 5, 4, 3, 2, 1, 0, 0, 1]
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, ref, atol=1e-5)


def test_find_experts_layouts_and_positional_placement():
    model = build_model("tiny-qwen3-moe")[0]
    ex = find_experts(model)
    w13, w2 = ex[0].weights()
    assert w13.shape == (8, 32, 32) and w2.shape == (8, 32, 16)
    # a positional placement (default layer ids 0..L-1) matches the MoE layers in order
    pl = Placement(np.tile(np.arange(8)[::-1].copy(), (2, 1)), 8, 1)
    layers = patch_model(model, pl)
    assert layers[0].placement_row.tolist() == list(range(7, -1, -1))
    with pytest.raises(ValueError, match="already an ExpertParallelMoE"):
        patch_model(model, pl)
    with pytest.raises(ValueError, match="neither a preset"):
        build_model("no-such-model")


@pytest.mark.parametrize("fmt,suffix", [("native", ".json"), ("vllm-ascend", ".json"), ("trtllm", ".yaml"),
                                        ("vllm", ".json")])
def test_load_placement_from_every_map_format(tmp_path, fmt, suffix):
    from eplb.formats import write_placement

    rng = np.random.default_rng(0)
    perms = [rng.permutation(8) for _ in range(2)]
    rows = np.stack([np.concatenate([q, q[:2]]) for q in perms])  # replicas of rank 0's experts on rank 1
    pl = Placement(rows, 8, 2, layer_ids=[1, 2])
    path = tmp_path / f"map{suffix}"
    write_placement(pl, path, fmt)
    got = load_placement(path, num_experts=8, ep_size=2, layer_ids=[1, 2])
    assert np.array_equal(got.phy2log, pl.phy2log) and got.layer_ids == (1, 2)
    with pytest.raises(ValueError):
        load_placement(path, num_experts=8, ep_size=5, layer_ids=[1, 2])
