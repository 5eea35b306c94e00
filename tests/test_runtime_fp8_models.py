"""patch_model with FP8 experts: a shrunk DeepSeek-V3 (random weights, built locally) quantised when patching,
transformers' FP8Experts modules, and FP8 safetensors checkpoints (DeepSeek-V3 per-expert and fused layouts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eplb.placement import Placement
from eplb.runtime import build_model, find_experts, patch_model
from eplb.runtime.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_blockwise
from eplb.runtime.models import load_fp8_experts
from eplb.runtime.testing import run_distributed

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "tiny-deepseek-v3-fp8"


def _placement(model, world, seed=0):
    ex = find_experts(model)
    E = ex[0].num_experts
    rng = np.random.default_rng(seed)
    spr = -(-E // world) + 1
    rows = []
    for _ in ex:
        row = np.concatenate([np.arange(E), rng.integers(0, E, world * spr - E)])
        rng.shuffle(row)
        rows.append(row)
    return Placement(np.stack(rows), E, world, layer_ids=[x.layer_id for x in ex])


def _set_dense_experts(model, per_layer):
    """Overwrite each MoE layer's dense experts with ``per_layer[layer_id] = (w13 [E,2I,H], w2 [E,H,I])``."""
    for x in find_experts(model):
        w13, w2 = per_layer[x.layer_id]
        x.module.gate_up_proj.data.copy_(w13)
        x.module.down_proj.data.copy_(w2)


def _quantised_model_worker(rank, world):
    model = build_model(NAME, seed=3)[0]
    ref_model = build_model(NAME, seed=3)[0]
    deq = {}
    for x in find_experts(ref_model):  # the model EPLB-off would serve: experts = dequant(quant(w))
        w13, w2 = x.weights()
        q13, s13 = quantize_blockwise(w13)
        q2, s2 = quantize_blockwise(w2)
        deq[x.layer_id] = (dequantize_blockwise(q13, s13, dtype=torch.float32),
                           dequantize_blockwise(q2, s2, dtype=torch.float32))
    _set_dense_experts(ref_model, deq)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = ref_model(ids).logits
    pl = _placement(model, world)
    layers = patch_model(model, pl, strategy="round-robin", quantize="fp8")
    assert all(m.fp8 and m.w13.dtype == FP8_DTYPE and m.block_size == (128, 128) for m in layers)
    assert all(m.compute_dtype == torch.float32 for m in layers)  # the model's dtype
    with torch.no_grad():
        got = model(ids).logits
    return float((got - ref).abs().max())


def test_fp8_deepseek_v3_patched_equals_dequantised_model_2_ranks():
    errs = run_distributed(_quantised_model_worker, 2, timeout_s=120)
    assert max(errs) < 1e-4, errs


# ----------------------------------------------------------------------------------- checkpoints
def _fp8_expert_tensors(E, inter, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for proj, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
            q, s = quantize_blockwise(torch.randn(rows, cols, generator=g) * 0.1)
            out[(e, proj)] = (q, s)
    return out


def _write_checkpoint(path, model, seed=5, fused=False, shards=2):
    """A DeepSeek-V3-layout FP8 checkpoint of the model's MoE layers (only the expert tensors)."""
    ex = find_experts(model)
    E = ex[0].num_experts
    H = model.config.hidden_size
    inter = model.config.moe_intermediate_size
    tensors, truth = {}, {}
    for x in ex:
        t = _fp8_expert_tensors(E, inter, H, seed + x.layer_id)
        pre = f"model.layers.{x.layer_id}.mlp.experts"
        w13 = torch.stack([torch.cat([t[(e, "gate")][0], t[(e, "up")][0]]) for e in range(E)])
        s13 = torch.stack([torch.cat([t[(e, "gate")][1], t[(e, "up")][1]]) for e in range(E)])
        w2 = torch.stack([t[(e, "down")][0] for e in range(E)])
        s2 = torch.stack([t[(e, "down")][1] for e in range(E)])
        truth[x.layer_id] = {"w13": w13, "w13_scale_inv": s13, "w2": w2, "w2_scale_inv": s2}
        if fused:
            tensors.update({f"{pre}.gate_up_proj": w13, f"{pre}.gate_up_proj_scale_inv": s13,
                            f"{pre}.down_proj": w2, f"{pre}.down_proj_scale_inv": s2})
        else:
            for (e, proj), (q, s) in t.items():
                tensors[f"{pre}.{e}.{proj}_proj.weight"] = q
                tensors[f"{pre}.{e}.{proj}_proj.weight_scale_inv"] = s
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        safetensors_torch.save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return truth


def _read_truth(ckpt, fused):
    """The checkpoint's expert tensors in the EP layout, read independently (safetensors.load_file)."""
    from pathlib import Path

    tensors = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(str(f)))
    truth = {}
    for lid in (1, 2):
        pre = f"model.layers.{lid}.mlp.experts"
        if fused:
            truth[lid] = {"w13": tensors[f"{pre}.gate_up_proj"], "w13_scale_inv": tensors[f"{pre}.gate_up_proj_scale_inv"],
                          "w2": tensors[f"{pre}.down_proj"], "w2_scale_inv": tensors[f"{pre}.down_proj_scale_inv"]}
            continue

        def get(e, p, k, pre=pre):
            return tensors[f"{pre}.{e}.{p}_proj.{k}"]

        truth[lid] = {"w13": torch.stack([torch.cat([get(e, "gate", "weight"), get(e, "up", "weight")]) for e in range(8)]),
                      "w13_scale_inv": torch.stack([torch.cat([get(e, "gate", "weight_scale_inv"),
                                                               get(e, "up", "weight_scale_inv")]) for e in range(8)]),
                      "w2": torch.stack([get(e, "down", "weight") for e in range(8)]),
                      "w2_scale_inv": torch.stack([get(e, "down", "weight_scale_inv") for e in range(8)])}
    return truth


def _checkpoint_worker(rank, world, ckpt, fused):
    model = build_model(NAME, seed=4)[0]
    truth = _read_truth(ckpt, fused)
    ref_model = build_model(NAME, seed=4)[0]
    _set_dense_experts(ref_model, {lid: (dequantize_blockwise(t["w13"], t["w13_scale_inv"], dtype=torch.float32),
                                         dequantize_blockwise(t["w2"], t["w2_scale_inv"], dtype=torch.float32))
                                   for lid, t in truth.items()})
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(10 + rank))
    with torch.no_grad():
        ref = ref_model(ids).logits
    pl = _placement(model, world, seed=1)
    layers = patch_model(model, pl, fp8_checkpoint=ckpt)
    checked = 0
    for layer in layers:  # every local slot holds the checkpoint's bytes of its expert, weights and scales
        row = layer.placement_row.numpy()
        spr = layer.slots_per_rank
        t = truth[layer.layer_id]
        for j in range(spr):
            e = int(row[rank * spr + j])
            for n in layer.expert_weight_names:
                assert torch.equal(getattr(layer, n)[j].view(torch.uint8), t[n][e].contiguous().view(torch.uint8))
                checked += 1
    with torch.no_grad():
        got = model(ids).logits
    return {"checked": checked, "err": float((got - ref).abs().max())}


@pytest.mark.parametrize("fused", [False, True])
def test_fp8_checkpoint_loads_bit_exact_and_serves_2_ranks(tmp_path, fused):
    model = build_model(NAME, seed=4)[0]
    _write_checkpoint(tmp_path, model, fused=fused, shards=1 if fused else 2)
    res = run_distributed(_checkpoint_worker, 2, str(tmp_path), fused, timeout_s=120)
    for r in res:
        assert r["checked"] == 2 * 5 * 4  # 2 layers x 5 slots x 4 tensors
        assert r["err"] < 1e-4, r


def test_fp8_checkpoint_errors_name_the_tensor(tmp_path):
    model = build_model(NAME, seed=4)[0]
    _write_checkpoint(tmp_path, model, shards=1)
    with pytest.raises(ValueError, match=r"has no tensor 'model\.layers\.9\.mlp\.experts\.0\.gate_proj\.weight'"):
        load_fp8_experts(tmp_path, 9, [0])
    bad = tmp_path / "bad"
    bad.mkdir()
    safetensors_torch.save_file({"model.layers.1.mlp.experts.0.gate_proj.weight": torch.zeros(128, 128)},
                                str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight "
                                         r"is torch\.float32, expected torch\.float8_e4m3fn"):
        load_fp8_experts(bad, 1, [0])
    with pytest.raises(ValueError, match="has no \\*.safetensors files"):
        load_fp8_experts(_empty(tmp_path), 1, [0])
    # repeats: two slots of one expert are independent copies with the same bytes
    ws = load_fp8_experts(tmp_path, 1, [3, 0, 3])
    assert ws.num_slots == 3 and torch.equal(ws["w13"][0].view(torch.uint8), ws["w13"][2].view(torch.uint8))
    assert ws["w13"][0].data_ptr() != ws["w13"][2].data_ptr()


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_transformers_fp8_experts_modules_are_served_as_fp8():
    fp8mod = pytest.importorskip("transformers.integrations.finegrained_fp8")
    model = build_model(NAME, seed=6)[0]
    ref_model = build_model(NAME, seed=6)[0]
    deq = {}
    for x in find_experts(model):
        w13, w2 = x.weights()
        q13, s13 = quantize_blockwise(w13)
        q2, s2 = quantize_blockwise(w2)
        mod = fp8mod.FP8Experts(model.config, block_size=(128, 128))
        mod.gate_up_proj.data = q13
        mod.gate_up_proj_scale_inv.data = s13
        mod.down_proj.data = q2
        mod.down_proj_scale_inv.data = s2
        parent, _, child = x.name.rpartition(".")
        setattr(model.get_submodule(parent), child, mod)
        deq[x.layer_id] = (dequantize_blockwise(q13, s13, dtype=torch.float32),
                           dequantize_blockwise(q2, s2, dtype=torch.float32))
    _set_dense_experts(ref_model, deq)
    found = find_experts(model)
    assert found and all(x.is_fp8 for x in found)
    layers = patch_model(model, num_slots=10)
    assert all(m.fp8 and torch.equal(m.w13_scale_inv[:8], deq_s) for m, deq_s in
               zip(layers, [f.module.gate_up_proj_scale_inv for f in found], strict=True))
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = float((model(ids).logits - ref_model(ids).logits).abs().max())
    assert err < 1e-4
