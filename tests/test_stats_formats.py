"""Trace formats: round trips for every format, chunked recordings, merge of shards, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from eplb.placement import Placement
from eplb.stats.importers import read_trtllm, write_trtllm
from eplb.stats.io import FORMATS, detect_trace_format, read_trace, write_trace
from eplb.stats.store import TraceWriter, iter_chunks, merge, read_dir, scan_dir
from eplb.stats.trace import Trace, TraceError


def _trace(T: int = 5, L: int = 3, E: int = 8, seed: int = 0, start: int = 100) -> Trace:
    rng = np.random.default_rng(seed)
    return Trace(rng.integers(0, 50, (T, L, E)), (3, 5, 9)[:L] if L <= 3 else tuple(range(L)),
                 np.arange(start, start + T), top_k=2, model="m", source="synthetic: test", ep_size=4)


def _same(a: Trace, b: Trace, *, ids: bool = True) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    if ids:
        assert a.layer_ids == b.layer_ids
        np.testing.assert_array_equal(a.step_ids, b.step_ids)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name,fmt,keeps_ids", [
    ("t.safetensors", None, True), ("rec", "eplb-dir", True), ("trt", "trtllm", True), ("d.pt", None, True),
    ("a.npy", None, False), ("a.npz", None, True), ("a.csv", None, True), ("a.json", None, True),
])
def test_round_trip_every_format(tmp_path: Path, name: str, fmt: str | None, keeps_ids: bool) -> None:
    tr = _trace()
    p = tmp_path / name
    write_trace(tr, p, fmt)
    back = read_trace(p)  # detected from the path
    _same(tr, back, ids=keeps_ids)
    if name != "a.npy" and name != "a.csv":
        assert back.top_k == 2 and back.model == "m"


def test_all_formats_listed() -> None:
    assert set(FORMATS) == {"eplb", "eplb-dir", "trtllm", "sglang", "vllm-ascend", "npy", "npz", "csv", "json"}


def test_two_dimensional_plain_arrays(tmp_path: Path) -> None:
    arr = np.arange(12).reshape(3, 4)
    np.save(tmp_path / "x.npy", arr)
    (tmp_path / "x.json").write_text(json.dumps({"counts": arr.tolist(), "num_layers": 3}))
    (tmp_path / "x.csv").write_text("\n".join(",".join(map(str, r)) for r in arr.tolist()))
    for f in ("x.npy", "x.json", "x.csv"):
        tr = read_trace(tmp_path / f)
        assert tr.counts.shape == (1, 3, 4)
        np.testing.assert_array_equal(tr.counts[0], arr)


def test_trtllm_layout_is_what_tensorrt_llm_reads(tmp_path: Path) -> None:
    """The exact layout of TensorRT-LLM's load_expert_statistic: sum of rank files per '{iter}_{layer}'."""
    tr = _trace(T=3)
    write_trtllm(tr, tmp_path / "d", ep_size=4)
    files = sorted(os.listdir(tmp_path / "d"))
    assert files == ["meta_info.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors", "rank3.safetensors"]
    info = json.loads((tmp_path / "d" / "meta_info.json").read_text())
    assert info["num_experts"] == 8 and info["num_experts_per_token"] == 2
    from safetensors.numpy import load_file

    total: dict[str, np.ndarray] = {}
    for r in range(4):
        for k, v in load_file(str(tmp_path / "d" / f"rank{r}.safetensors")).items():
            assert v.shape == (8,)
            total[k] = total.get(k, 0) + v
    assert set(total) == {f"{i}_{ly}" for i in (100, 101, 102) for ly in (3, 5, 9)}
    np.testing.assert_array_equal(total["101_5"], tr.counts[1, 1])
    back = read_trtllm(tmp_path / "d")
    assert back.ep_size == 4  # = number of rank files, like TensorRT-LLM
    _same(tr, back)


def test_trtllm_reads_a_hand_made_multi_rank_dump(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    (d / "meta_info.json").write_text(json.dumps({"num_experts": 4, "num_experts_per_token": 1}))
    save_file({"7_3": np.array([1, 0, 2, 0]), "8_3": np.array([0, 0, 0, 5])}, str(d / "rank0.safetensors"))
    save_file({"7_3": np.array([0, 4, 0, 0]), "8_3": np.array([1, 1, 1, 1])}, str(d / "rank1.safetensors"))
    tr = read_trace(d)
    assert tr.layer_ids == (3,) and list(tr.step_ids) == [7, 8] and tr.ep_size == 2 and tr.top_k == 1
    np.testing.assert_array_equal(tr.counts[:, 0], [[1, 4, 2, 0], [1, 1, 1, 6]])


def test_cooccurrence_and_topk_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    T, L, E, k = 3, 2, 6, 2
    per_step = [rng.integers(0, E, (n, L, k)) for n in (4, 0, 3)]
    ids = np.concatenate(per_step)
    off = np.array([0, 4, 4, 7])
    counts = np.stack([np.stack([np.bincount(s[:, j].ravel(), minlength=E) for j in range(L)]) for s in per_step])
    co = np.zeros((T, L, E, E), dtype=np.int64)
    for t, s in enumerate(per_step):
        for j in range(L):
            oh = np.zeros((len(s), E))
            np.put_along_axis(oh, s[:, j], 1, axis=1)
            co[t, j] = oh.T @ oh
    tr = Trace(counts, (1, 2), None, k, cooccurrence=co, topk_ids=ids, topk_offsets=off)
    tr.save(tmp_path / "t.safetensors")
    back = Trace.load(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(back.cooccurrence, co)
    np.testing.assert_array_equal(back.topk_ids, ids)
    np.testing.assert_array_equal(back.topk_offsets, off)
    sl = back.slice("1-3", layers=[1])
    np.testing.assert_array_equal(sl.topk_ids, ids[4:, [1]])
    np.testing.assert_array_equal(sl.topk_offsets, [0, 0, 3])
    write_trtllm(tr, tmp_path / "trt")
    assert (tmp_path / "trt" / "cooccurrence_rank0.safetensors").exists()
    assert (tmp_path / "trt" / "rank0_raw.safetensors").exists()
    b2 = read_trtllm(tmp_path / "trt", raw=True)
    np.testing.assert_array_equal(b2.cooccurrence, co)
    np.testing.assert_array_equal(b2.topk_ids, ids)


def test_sglang_dump_is_a_logical_count_dict(tmp_path: Path) -> None:
    tr = _trace()
    write_trace(tr, tmp_path / "x.pt")
    obj = torch.load(tmp_path / "x.pt", weights_only=True)
    assert obj["logical_count"].shape == (5, 3, 8)
    # a dump as SGLang writes it (rank, logical_count, utilization) reads without our metadata
    torch.save({"rank": 0, "logical_count": torch.tensor(tr.counts, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, tmp_path / "sg.pt")
    back = read_trace(tmp_path / "sg.pt")
    _same(tr, back, ids=False)
    assert back.layer_ids == (0, 1, 2)


def test_vllm_ascend_load_array_with_expert_map(tmp_path: Path) -> None:
    # 2 layers, 2 devices x 3 local slots, 5 experts (expert 0 replicated in layer 0, expert 4 in layer 1)
    emap = {"moe_layer_count": 2, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [0, 1, 2]},
                                                           {"device_id": 1, "device_expert": [3, 4, 0]}]},
        {"layer_id": 1, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [4, 3, 2]},
                                                           {"device_id": 1, "device_expert": [1, 0, 4]}]}]}
    (tmp_path / "map.json").write_text(json.dumps(emap))
    moe_load = np.array([[[5, 1, 2], [3, 4, 6]], [[7, 1, 1], [2, 3, 8]]])  # [L, D, spr]
    np.save(tmp_path / "load.npy", moe_load)
    tr = read_trace(tmp_path / "load.npy", "vllm-ascend", expert_map=tmp_path / "map.json")
    np.testing.assert_array_equal(tr.counts[0], [[11, 1, 2, 3, 4], [3, 2, 1, 1, 15]])
    assert tr.ep_size == 2
    # write with a placement and read back through the same map
    pl = Placement(np.array([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4]]), 5, 2)
    write_trace(tr, tmp_path / "out.npy", "vllm-ascend", placement=pl)
    back = read_trace(tmp_path / "out.npy", "vllm-ascend", expert_map=pl)
    np.testing.assert_array_equal(back.counts, tr.counts)
    # identity layout without a map
    write_trace(_trace(), tmp_path / "id.json", "vllm-ascend", ep_size=4)
    _same(_trace(), read_trace(tmp_path / "id.json", "vllm-ascend", expert_map="identity"), ids=False)


# ------------------------------------------------------------------ chunked recordings
def test_writer_chunks_and_sliced_load(tmp_path: Path) -> None:
    tr = _trace(T=23, L=2, start=0)
    with TraceWriter(tmp_path / "rec", 8, tr.layer_ids, chunk_steps=5) as w:
        for a in range(0, 23, 2):
            w.append(tr.counts[a:a + 2])
    chunks = sorted(os.listdir(tmp_path / "rec" / "rank0"))
    assert chunks[-1] == "meta.json" and len(chunks) == 1 + 4  # 6+6+6+5 steps (appends of 2 pass 5)
    info = scan_dir(tmp_path / "rec")
    assert info.num_steps == 23 and info.metas[0]["complete"] is True
    _same(tr, read_trace(tmp_path / "rec"))  # a directory: the dispatcher, not Trace.load
    part = read_trace(tmp_path / "rec", iter_range="7-13", layers=[1])
    np.testing.assert_array_equal(part.counts, tr.counts[7:13, [1]])
    assert [c.num_steps for c in iter_chunks(tmp_path / "rec", "7-13")] == [5, 1]


def test_writer_flushes_by_size(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "r", 4, (0,), chunk_steps=10**6, max_chunk_bytes=64)
    for _ in range(4):
        w.append(np.ones((1, 1, 4)))  # 32 bytes each
    assert w.info["num_chunks"] == 2  # nothing accumulates past the byte limit
    w.close()


def test_merge_of_shards_equals_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    whole = rng.integers(0, 100, (12, 3, 8))
    split = [rng.integers(0, 1 + whole // 2) for _ in range(2)]
    shards = [split[0], split[1], whole - split[0] - split[1]]
    for r, c in enumerate(shards):
        with TraceWriter(tmp_path / "rec", 8, (1, 2, 3), rank=r, world_size=3, chunk_steps=4) as w:
            w.append(c)
    np.testing.assert_array_equal(read_dir(tmp_path / "rec").counts, whole)
    files = []
    for r, c in enumerate(shards):
        f = tmp_path / f"s{r}.safetensors"
        Trace(c, (1, 2, 3)).save(f)
        files.append(f)
    m = merge(files)
    np.testing.assert_array_equal(m.counts, whole)
    assert m.ep_size == 3


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_merge_property(nshards: int, T: int, chunk: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [Trace(rng.integers(0, 9, (T, 2, 4)), (4, 6), np.arange(5, 5 + T)) for _ in range(nshards)]
    m = merge(parts)
    np.testing.assert_array_equal(m.counts, sum(p.counts for p in parts))
    np.testing.assert_array_equal(m.step_ids, np.arange(5, 5 + T))


# ------------------------------------------------------------------ bad input
def test_trtllm_bad_input(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    save_file({"0_3": np.array([1, 2]), "1_3": np.array([1, 2])}, str(d / "rank0.safetensors"))
    with pytest.raises(TraceError, match="meta_info.json"):
        read_trace(d)
    (d / "meta_info.json").write_text(json.dumps({"num_experts": 2}))
    with pytest.raises(TraceError, match="meta_info.json: missing field 'num_experts_per_token'"):
        read_trace(d)
    (d / "meta_info.json").write_text(json.dumps({"num_experts": 2, "num_experts_per_token": 1}))
    assert read_trace(d).counts.shape == (2, 1, 2)
    save_file({"0_3": np.array([1, 2]), "2_3": np.array([1, 2])}, str(d / "rank0.safetensors"))  # gap
    with pytest.raises(TraceError, match=r"missing iteration\(s\) \[1\]"):
        read_trace(d)
    save_file({"0_3": np.array([1, 2]), "1_3": np.array([1, 2]), "1_4": np.array([0, 0])}, str(d / "rank0.safetensors"))
    with pytest.raises(TraceError, match="missing count key.*'0_4'"):
        read_trace(d)
    save_file({"0_3": np.array([1, 2, 3])}, str(d / "rank0.safetensors"))  # mismatched length
    with pytest.raises(TraceError, match=r"rank0.safetensors: key '0_3'.*\(3,\), expected \(2,\)"):
        read_trace(d)
    save_file({"0_3": np.array([1, -2])}, str(d / "rank0.safetensors"))
    with pytest.raises(TraceError, match="rank0.safetensors: key '0_3': negative count"):
        read_trace(d)
    save_file({"iter0_layer3": np.array([1, 2])}, str(d / "rank0.safetensors"))
    with pytest.raises(TraceError, match="key 'iter0_layer3' is not"):
        read_trace(d)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.xyz").write_text("1")
    with pytest.raises(TraceError, match="unknown trace file type '.xyz'"):
        read_trace(tmp_path / "x.xyz")
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "missing.npy")
    (tmp_path / "neg.json").write_text(json.dumps({"counts": [[1, -1]]}))
    with pytest.raises(ValueError, match="neg.json: key 'counts': counts: contains negative"):
        read_trace(tmp_path / "neg.json")
    (tmp_path / "rag.json").write_text(json.dumps([[1, 2], [3]]))
    with pytest.raises(TraceError, match="rag.json: not a rectangular"):
        read_trace(tmp_path / "rag.json")
    (tmp_path / "s.pt").write_bytes(b"junk")
    with pytest.raises(TraceError, match="s.pt: not a readable torch file"):
        read_trace(tmp_path / "s.pt")
    torch.save({"counts": torch.ones(2, 2)}, tmp_path / "k.pt")
    with pytest.raises(TraceError, match="k.pt: missing key 'logical_count'"):
        read_trace(tmp_path / "k.pt")
    (tmp_path / "c.csv").write_text("step,layer,0,1\n0,1,3,4\n1,1,x,2\n")
    with pytest.raises(TraceError, match="c.csv: line 3, column 3: 'x' is not a number"):
        read_trace(tmp_path / "c.csv")
    with pytest.raises(TraceError, match="step_ids: must be strictly increasing"):
        Trace(np.ones((2, 1, 2)), step_ids=[3, 3])
    with pytest.raises(TraceError, match="format: unknown trace format 'parquet'"):
        write_trace(_trace(), tmp_path / "o.bin", "parquet")


def test_nothing_half_written(tmp_path: Path) -> None:
    tr = _trace()
    out = tmp_path / "o.safetensors"
    write_trace(tr, out)
    before = out.read_bytes()
    with pytest.raises(TraceError, match="already exists"):
        write_trace(_trace(seed=9), out)
    assert out.read_bytes() == before
    gappy = Trace(np.ones((2, 1, 4)), step_ids=[0, 5])
    with pytest.raises(TraceError, match="contiguous iteration ids"):
        write_trace(gappy, tmp_path / "trt", "trtllm")
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]  # no directory, no temp files left
    # a failure in the middle of building a directory leaves nothing behind either
    bad_shards = [_trace(T=5), _trace(T=4)]
    with pytest.raises(TraceError, match="shard 1 has other layers/steps"):
        write_trtllm(_trace(T=5), tmp_path / "trt2", shards=bad_shards)
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


def test_detect_trace_format(tmp_path: Path) -> None:
    assert detect_trace_format(tmp_path / "new", for_write=True) == "eplb-dir"
    assert detect_trace_format(tmp_path / "a.pt", for_write=True) == "sglang"
    (tmp_path / "d").mkdir()
    save_file({"0_0": np.zeros(2)}, str(tmp_path / "d" / "rank0.safetensors"))
    with pytest.raises(TraceError, match="meta_info.json is missing"):
        detect_trace_format(tmp_path / "d")
