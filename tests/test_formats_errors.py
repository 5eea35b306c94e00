"""eplb.formats: every reader validates and names the file and the exact problem; writers are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb import Placement
from eplb.formats import MapFormatError, detect_map_format, format_for_path, read_placement, write_placement


def _ascend(rows: list[list[list[int]]], **top: object) -> dict:
    return {"moe_layer_count": len(rows), **top, "layer_list": [
        {"layer_id": i, "device_count": len(devs),
         "device_list": [{"device_id": d, "device_expert": e} for d, e in enumerate(devs)]}
        for i, devs in enumerate(rows)]}


def _write(tmp_path: Path, name: str, obj: object) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


GOOD2 = [[0, 1], [2, 3], [3, 0]]  # 3 devices x 2 slots, 4 experts


# ----------------------------------------------------------------------------------------- vllm-ascend
@pytest.mark.parametrize("rows, top, match", [
    ([GOOD2, [[0, 1], [2, 3], [3]]], {}, r"layer 1: device 2 has 1 slots, expected 2"),
    ([GOOD2, [[0, 1], [2, 3, 1], [3, 2]]], {}, r"layer 1: device 1 has 3 slots, expected 2"),
    ([[[0, 1], [2, 2], [3, 0]]], {}, r"layer 0: device 1 holds expert 2 in 2 slots; vllm-ascend allows one"),
    ([[[0, 1], [1, 3], [3, 0]]], {}, r"layer 0: expert 2 has no slot"),
    ([[[0, 1], [2, 3], [3, "x"]]], {}, r"layer 0: device_list\[2\]\.device_expert\[1\]: expected an integer expert id, got 'x'"),
])
def test_vllm_ascend_errors(tmp_path: Path, rows: list, top: dict, match: str) -> None:
    p = _write(tmp_path, "map.json", _ascend(rows, **top))
    with pytest.raises(MapFormatError, match=rf"^{p}: {match}"):
        read_placement(p)


def test_vllm_ascend_layer_ids(tmp_path: Path) -> None:
    obj = _ascend([GOOD2, GOOD2])
    obj["layer_list"][1]["layer_id"] = 5
    with pytest.raises(MapFormatError, match=r"layer_id 5 exceeds moe_layer_count=2"):
        read_placement(_write(tmp_path, "a.json", obj))
    obj["layer_list"][1]["layer_id"] = 0
    with pytest.raises(MapFormatError, match=r"layer 0 is listed twice"):
        read_placement(_write(tmp_path, "b.json", obj))
    obj = _ascend([GOOD2])
    obj["moe_layer_count"] = 2
    with pytest.raises(MapFormatError, match=r"layer\(s\) \[1\] missing from layer_list"):
        read_placement(_write(tmp_path, "c.json", obj))
    # layer_id == moe_layer_count is vllm-ascend's MTP layer: skipped
    obj = _ascend([GOOD2, GOOD2])
    obj["layer_list"][1]["layer_id"] = 1
    obj["layer_list"].append({**obj["layer_list"][0], "layer_id": 2})
    pl = read_placement(_write(tmp_path, "d.json", obj))
    assert pl.num_layers == 2 and pl.meta["mtp_layer_skipped"] is True
    obj = _ascend([GOOD2])
    obj["layer_list"][0]["device_count"] = 4
    with pytest.raises(MapFormatError, match=r"layer 0: device_list has 3 devices, expected device_count=4"):
        read_placement(_write(tmp_path, "e.json", obj))
    # device_count must agree with the caller's EP size
    with pytest.raises(MapFormatError, match=r"ep_size is 3 in the file, expected 4"):
        read_placement(_write(tmp_path, "f.json", _ascend([GOOD2])), ep_size=4)
    # newer optional keys are kept
    pl = read_placement(_write(tmp_path, "g.json", _ascend([GOOD2], pool_mode="x", strategy_version=2)))
    assert pl.meta["pool_mode"] == "x" and pl.meta["strategy_version"] == 2


def test_vllm_ascend_refuses_colocated_replicas_on_write(tmp_path: Path) -> None:
    pl = Placement([[0, 0, 1, 2]], 3, 2)
    out = tmp_path / "m.json"
    out.write_text("previous")
    with pytest.raises(MapFormatError, match=r"layer 0: rank 0 holds expert 0 in 2 slots"):
        write_placement(pl, out, "vllm-ascend")
    assert out.read_text() == "previous"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["m.json"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------- trtllm
@pytest.mark.parametrize("text, match", [
    ("num_slots: 4\ninitial_global_assignments:\n  3: [0, 1, 2]\n", r"layer 3: 3 slots, expected num_slots=4"),
    ("num_slots: 4\nep_size: 2\ninitial_global_assignments:\n  3: [0, 1, 2, 2]\n  5: [0, 0, 1, 1]\n",
     r"layer 5: expert 2 has no slot"),
    ("initial_global_assignments:\n  3: [0, 1, 2, 3]\n", r"missing field 'num_slots'"),
    ("num_slots: 288\nlayer_updates_per_iter: 2\n", r"no 'initial_global_assignments' \(an online-only config"),
    ("num_slots: 4\nnum_slot: 4\ninitial_global_assignments:\n  3: [0, 1, 2, 3]\n", r"unknown field\(s\) \['num_slot'\]"),
    ("num_slots: 4\ninitial_global_assignments:\n  3: [0, 1, x, 3]\n",
     r"initial_global_assignments\[3\]\[2\]: expected an integer expert id, got 'x'"),
    ("num_slots: 6\nep_size: 4\ninitial_global_assignments:\n  3: [0, 1, 2, 3, 0, 1]\n",
     r"6 slots per layer are not divisible by ep_size=4 \(every device needs the same number of slots\)"),
    ("num_slots: 4\nep_size: 2\ninitial_global_assignments:\n  3: [0, 1, 2, 9]\n  4: [0, 1, 2, 3]\n",
     r"layer 3: slot 3 holds expert 9, but 4 slots per layer can serve at most 4 experts"),
    ("num_slots: 4\nep_size: 2\ninitial_global_assignments:\n  3: [0, 1, 2, 3]\n  4: [0, 1, 2, -1]\n",
     r"layer 4: slot 3 holds expert -1, expected an id in \[0, 4\)"),
    ("num_slots: 4\ninitial_global_assignments:\n  3: [0, 1, 2,", r"truncated YAML: .* at line \d+, column \d+"),
    ("num_slots: 4\ninitial_global_assignments:\n  3: [0, 1, 2, 3]\n", r"the file does not record the EP size; pass it"),
])
def test_trtllm_errors(tmp_path: Path, text: str, match: str) -> None:
    p = _write(tmp_path, "moe_load_balancer.yaml", text)
    with pytest.raises(MapFormatError, match=rf"^{p}: {match}"):
        read_placement(p)


def test_trtllm_ep_size_mismatch_and_given(tmp_path: Path) -> None:
    p = _write(tmp_path, "lb.yaml", "num_slots: 4\nep_size: 2\ninitial_global_assignments:\n  3: [0, 1, 2, 3]\n")
    with pytest.raises(MapFormatError, match=r"ep_size is 2 in the file, expected 4"):
        read_placement(p, ep_size=4)
    old = _write(tmp_path, "old.yaml", "num_slots: 4\ninitial_global_assignments:\n  3: [0, 1, 2, 3]\n")
    assert read_placement(old, ep_size=4).num_ranks == 4


# ------------------------------------------------------------------------------------- sglang / vllm / native
def test_sglang_errors(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.json", {"physical_to_logical_map": [[0, 1, 2], [0, 1]]})
    with pytest.raises(MapFormatError, match=r"row 1 has 2 slots, expected 3"):
        read_placement(p, ep_size=1)
    p = _write(tmp_path, "s2.json", {"physical_to_logical_map": [[0, 1, 2]], "ep_size": 3, "foo": 1})
    with pytest.raises(MapFormatError, match=r"unexpected key\(s\) \['ep_size', 'foo'\].*init_by_mapping"):
        read_placement(p, "sglang", ep_size=1)
    p = _write(tmp_path, "s3.json", {"logical_count": [[1, -2, 3]]})
    with pytest.raises(MapFormatError, match=r"logical_count: contains negative loads \(first at index \[0, 1\]"):
        read_placement(p, ep_size=1)


def test_vllm_inconsistent_tensors(tmp_path: Path) -> None:
    pl = Placement([[0, 1, 2, 0]], 3, 2)
    write_placement(pl, tmp_path / "v.pt", "vllm")
    d = torch.load(tmp_path / "v.pt", weights_only=True)
    d["logical_replica_count"][0, 0] = 1
    d["logical_replica_count"][0, 1] = 2
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(MapFormatError, match=r"layer 0: logical_replica_count says expert 0 has 1 replicas, .* gives it 2"):
        read_placement(tmp_path / "bad.pt")
    d = torch.load(tmp_path / "v.pt", weights_only=True)
    d["logical_to_physical_map"][0, 1, 0] = 2
    torch.save(d, tmp_path / "bad2.pt")
    with pytest.raises(MapFormatError, match=r"layer 0: logical_to_physical_map puts expert 1 in slot 2"):
        read_placement(tmp_path / "bad2.pt")


def test_native_errors(tmp_path: Path) -> None:
    pl = Placement([[0, 1, 2, 0]], 3, 2)
    write_placement(pl, tmp_path / "n.json", "native")
    obj = json.loads((tmp_path / "n.json").read_text())
    obj["phy2log"][0][3] = 1  # hand edit: still a valid map, but not what was written
    with pytest.raises(MapFormatError, match=r"placement_digest in meta .* does not match the content"):
        read_placement(_write(tmp_path, "edited.json", obj))
    obj["meta"].pop("placement_digest")
    assert read_placement(_write(tmp_path, "edited2.json", obj)).phy2log.tolist() == [[0, 1, 2, 1]]
    obj["num_experts"] = 4
    with pytest.raises(MapFormatError, match=r"layer 0: expert 3 has no slot"):
        read_placement(_write(tmp_path, "e3.json", obj))
    with pytest.raises(MapFormatError, match=r"num_experts is 4 in the file, expected 3"):
        read_placement(_write(tmp_path, "e4.json", obj), num_experts=3)
    obj["format"] = "other"
    with pytest.raises(MapFormatError, match=r"field 'format' is 'other', expected 'eplb.placement'"):
        read_placement(_write(tmp_path, "e5.json", obj), "native")


# ----------------------------------------------------------------------------- detection, files, atomicity
def test_detection_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MapFormatError, match=r"nope\.json: no such file"):
        read_placement(tmp_path / "nope.json")
    with pytest.raises(MapFormatError, match=r"empty\.json: empty file"):
        read_placement(_write(tmp_path, "empty.json", "  \n"))
    with pytest.raises(MapFormatError, match=r"t\.json: truncated JSON: .* at line 1"):
        read_placement(_write(tmp_path, "t.json", '{"moe_layer_count": 1, "layer_list": [{"layer_id": 0'))
    with pytest.raises(MapFormatError, match=r"bad\.json: invalid JSON"):
        read_placement(_write(tmp_path, "bad.json", '{"a": 1,, "b": 2}'))
    with pytest.raises(MapFormatError, match=r"unknown map format: keys \['foo'\]"):
        detect_map_format(_write(tmp_path, "u.json", {"foo": 1}))
    with pytest.raises(MapFormatError, match=r"a \.safetensors file is a load trace, not a placement map"):
        detect_map_format(_write(tmp_path, "t.safetensors", "x"))
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(MapFormatError, match=r"broken\.pt: not a readable torch \.pt file"):
        read_placement(tmp_path / "broken.pt")
    with pytest.raises(MapFormatError, match=r"unknown format 'foo'; expected one of trtllm, vllm-ascend"):
        read_placement(_write(tmp_path, "x.json", {"a": 1}), "foo")
    # no suffix: content decides (JSON, then YAML)
    assert detect_map_format(_write(tmp_path, "noext", "num_slots: 2\ninitial_global_assignments:\n  0: [0, 1]\n")) == "trtllm"


def test_write_format_choice(tmp_path: Path) -> None:
    pl = Placement([[0, 1, 2, 0]], 3, 2)
    assert format_for_path("x.yaml") == "trtllm" and format_for_path("x.YML") == "trtllm"
    with pytest.raises(MapFormatError, match=r"\.json is used by several formats \(vllm-ascend, sglang, vllm, native\)"):
        write_placement(pl, tmp_path / "x.json")
    with pytest.raises(MapFormatError, match=r"the trtllm format is written as \.yaml or \.yml, not \.json"):
        write_placement(pl, tmp_path / "x.json", "trtllm")
    with pytest.raises(MapFormatError, match=r"cannot tell the map format from the suffix \.txt"):
        write_placement(pl, tmp_path / "x.txt")
    with pytest.raises(MapFormatError, match=r"trtllm: unknown option\(s\) \['bogus'\]"):
        write_placement(pl, tmp_path / "x.yaml", bogus=1)
    assert not any(tmp_path.iterdir())  # nothing written by the failures
    write_placement(pl, tmp_path / "sub" / "dir" / "x.yaml")  # parent directories are created
    assert read_placement(tmp_path / "sub" / "dir" / "x.yaml") == pl


def test_layer_id_selection(tmp_path: Path) -> None:
    pl = Placement(np.array([[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]), 3, 2, layer_ids=(3, 5, 7))
    write_placement(pl, tmp_path / "m.yaml")
    sub = read_placement(tmp_path / "m.yaml", layer_ids=[7, 3])
    assert sub.layer_ids == (7, 3) and sub.phy2log.tolist() == [[2, 0, 1, 2], [0, 1, 2, 0]]
    with pytest.raises(MapFormatError, match=r"no row for layer\(s\) \[4\]"):
        read_placement(tmp_path / "m.yaml", layer_ids=[3, 4])
    write_placement(pl, tmp_path / "m.json", "vllm-ascend")
    with pytest.raises(MapFormatError, match=r"3 MoE layers, but 2 layer ids given"):
        read_placement(tmp_path / "m.json", layer_ids=[3, 5])
