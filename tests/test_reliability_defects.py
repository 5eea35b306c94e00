"""Regression tests of the defects the reliability review found (each failed before its fix)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import eplb
from eplb.formats import MapFormatError, read_placement, write_placement
from eplb.metrics import rank_loads
from eplb.placement import Placement
from eplb.stats.io import read_trace, write_trace
from eplb.stats.trace import Trace, TraceError


# ----------------------------------------------------------------------------- eplb-dispatch
def test_eplb_dispatch_never_returns_uninitialised_slots() -> None:
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 50, (3, 2, 2)).astype(float)
    first = eplb.plan(loads, 12, 3, policy="eplb-dispatch")  # 12 slots > 2 experts x 3 ranks: co-located
    for _ in range(5):
        assert np.array_equal(eplb.plan(loads, 12, 3, policy="eplb-dispatch").phy2log, first.phy2log)
    assert set(first.phy2log.ravel().tolist()) == {0, 1}


# ----------------------------------------------------------------------------- exact counts
def test_uint64_counts_past_2_63_are_refused_not_wrapped(tmp_path: Path) -> None:
    a = np.zeros((1, 2, 3), dtype=np.uint64)
    a[0, 1, 2] = 2**63 + 5
    np.save(tmp_path / "t.npy", a)
    with pytest.raises(TraceError, match=r"t\.npy.*index \[0, 1, 2\]"):
        read_trace(tmp_path / "t.npy")


@pytest.mark.parametrize("text", ['{"counts": [[1e19, 1]]}', '{"counts": [[9007199254740993, 1]]}',
                                  '{"counts": [[true, 1]]}', '{"counts": [["7", 1]]}'])
def test_json_counts_that_are_not_exact_integers_are_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(TraceError, match="t.json"):
        read_trace(tmp_path / "t.json")


def test_csv_counts_are_read_exactly_or_refused(tmp_path: Path) -> None:
    (tmp_path / "ok.csv").write_text("step,layer,0,1\n0,0,9007199254740992,3\n")
    assert read_trace(tmp_path / "ok.csv").counts.tolist() == [[[2**53, 3]]]
    (tmp_path / "big.csv").write_text("step,layer,0,1\n0,0,9007199254740993,3\n")  # float64 would round it
    with pytest.raises(TraceError, match="big.csv"):
        read_trace(tmp_path / "big.csv")


def test_trtllm_uint64_max_is_not_summed_as_minus_one(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tr = Trace(np.arange(6).reshape(1, 2, 3), (1, 3), top_k=2)
    write_trace(tr, tmp_path / "dump", "trtllm", ep_size=2)
    f = tmp_path / "dump" / "rank1.safetensors"
    d = load_file(str(f))
    d["0_1"] = np.array([2**64 - 1, 0, 0], dtype=np.uint64)
    save_file(d, str(f))
    with pytest.raises(TraceError, match="rank1.safetensors"):
        read_trace(tmp_path / "dump")


def test_trace_sums_past_2_53_are_refused() -> None:
    with pytest.raises(TraceError, match="sum over steps"):
        Trace(np.full((3, 1, 2), 2**52, dtype=np.int64))


# ----------------------------------------------------------------------------- convert of logical_count
def test_convert_logical_count_to_a_map_name_is_refused_not_written_as_a_trace(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from eplb.cli import app

    (tmp_path / "lc.json").write_text(json.dumps({"logical_count": [[[5, 1, 1, 3], [2, 2, 2, 2]]]}))
    for name, extra in (("moe_load_balancer.yaml", []), ("map.json", ["--to", "native"])):
        out = tmp_path / name
        res = CliRunner().invoke(app, ["convert", str(tmp_path / "lc.json"), str(out), "--ep-size", "2", *extra])
        assert res.exit_code != 0 and "holds load counts" in str(res.exception)
        assert not out.exists()  # before: a trace directory named moe_load_balancer.yaml, trace bytes in map.json
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "lc.json"), str(tmp_path / "t.npz")])
    assert res.exit_code == 0 and read_trace(tmp_path / "t.npz").counts.tolist() == [[[5, 1, 1, 3], [2, 2, 2, 2]]]


# ----------------------------------------------------------------------------- --force
def test_force_does_not_delete_a_directory_that_holds_no_trace(tmp_path: Path) -> None:
    d = tmp_path / "out"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    tr = Trace(np.ones((1, 1, 2), dtype=np.int64))
    with pytest.raises(TraceError, match="holds no trace"):
        write_trace(tr, d, "eplb-dir", overwrite=True)
    assert (d / "precious.txt").read_text() == "keep me"
    write_trace(tr, tmp_path / "dump", "trtllm", ep_size=1)
    with pytest.raises(TraceError, match="trtllm trace, not eplb-dir"):
        write_trace(tr, tmp_path / "dump", "eplb-dir", overwrite=True)


# ----------------------------------------------------------------------------- TensorRT-LLM indirection
@pytest.mark.parametrize("target", ["../../etc/passwd", "/dev/zero", "/etc/hostname", "fifo", "sub/../../x.yaml"])
def test_load_balancer_path_is_confined_to_regular_files_next_to_the_config(tmp_path: Path, target: str) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    if target == "fifo":
        os.mkfifo(cfg / "fifo")
    (cfg / "opts.yaml").write_text(f"moe_config:\n  load_balancer: {target}\n")
    t0 = time.monotonic()
    with pytest.raises(MapFormatError, match="opts.yaml: moe_config.load_balancer"):
        read_placement(cfg / "opts.yaml")
    assert time.monotonic() - t0 < 5  # a FIFO is never opened


def test_deep_nesting_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(MapFormatError, match="m.json: JSON nested deeper"):
        read_placement(tmp_path / "m.json")
    (tmp_path / "m.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(MapFormatError, match="m.yaml"):
        read_placement(tmp_path / "m.yaml")
    (tmp_path / "t.json").write_text('{"counts": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(TraceError, match="t.json"):
        read_trace(tmp_path / "t.json")


def test_ids_past_int64_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps({"physical_to_logical_map": [[0, 2**64]]}))
    with pytest.raises(MapFormatError, match=r"m.json: physical_to_logical_map\[0\]\[1\]"):
        read_placement(tmp_path / "m.json", "sglang", ep_size=1)


# ----------------------------------------------------------------------------- float32 overflow
@pytest.mark.parametrize("policy", ["deepseek", "deepseek-global", "eplb", "eplb-robust", "eplb-hierarchical"])
def test_loads_overflowing_float32_still_give_valid_placements(policy: str) -> None:
    rng = np.random.default_rng(1)
    loads = rng.random((2, 3, 8)) * 1e38 * 50
    loads[0, 0, 0] = 1e300
    pl = eplb.plan(loads, 16, 4, policy=policy)
    assert pl.num_slots == 16 and (pl.logcnt >= 1).all()
    # layer 0's expert 0 carries ~all the load: it gets the most replicas (4 = one per rank, or more)
    assert pl.logcnt[0, 0] == pl.logcnt[0].max() >= 4
    # only ratios matter: a placement as good as the one for the loads scaled down by 1e280 (the window search may
    # break ties differently on the rescaled floats, so compare per-step imbalance, not the maps)
    if policy == "eplb":  # the float64 policy; DeepSeek's float32 path rounds the rescaled loads differently
        small = loads / 1e280
        other = eplb.plan(small, 16, 4, policy=policy)
        imb = [(lambda rl: rl.max(-1) / rl.mean(-1))(rank_loads(small, p)).mean(0) for p in (pl, other)]
        np.testing.assert_allclose(imb[0], imb[1], rtol=1e-9)


# ----------------------------------------------------------------------------- eplb-incremental at scale
def _dense_align(current: np.ndarray, new: np.ndarray, P: int, E: int) -> np.ndarray:
    """The previous O(P^3) greedy + pairwise matching (reference)."""
    from eplb.policies.keep import preserve_slots
    from eplb.policies.packing import expert_pack_count

    X, S = new.shape
    spr = S // P
    rows = np.arange(X)
    ov = np.einsum("xeq,xep->xqp", np.minimum(expert_pack_count(new, E, P), 1).astype(float),
                   np.minimum(expert_pack_count(current, E, P), 1).astype(float))
    assign = np.full((X, P), -1)
    uq, up = np.zeros((X, P), bool), np.zeros((X, P), bool)
    for _ in range(P):
        flat = np.argmax(np.where(uq[:, :, None] | up[:, None, :], -1.0, ov).reshape(X, -1), axis=1)
        q, p = flat // P, flat % P
        assign[rows, q] = p
        uq[rows, q] = True
        up[rows, p] = True
    for _ in range(2 * P):
        val = ov[rows[:, None], np.arange(P)[None, :], assign]
        cross = ov[rows[:, None, None], np.arange(P)[None, :, None], assign[:, None, :]]
        gain = cross + cross.transpose(0, 2, 1) - val[:, :, None] - val[:, None, :]
        flat = np.argmax(gain.reshape(X, -1), axis=1)
        sel = gain.reshape(X, -1)[rows, flat] > 0.5
        if not sel.any():
            break
        r = rows[sel]
        q1, q2 = flat[sel] // P, flat[sel] % P
        p1, p2 = assign[r, q1].copy(), assign[r, q2].copy()
        assign[r, q1], assign[r, q2] = p2, p1
    out = np.empty_like(new.reshape(X, P, spr))
    out[rows[:, None], assign] = new.reshape(X, P, spr)
    return preserve_slots(out.reshape(X, S), current, P, E)


def test_sparse_pack_matching_equals_the_dense_one() -> None:
    from eplb.policies.packing import align_packs

    rng = np.random.default_rng(3)
    for _ in range(60):
        P, spr = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        E, X = int(rng.integers(1, P * spr + 1)), int(rng.integers(1, 3))
        cur, new = rng.integers(0, E, (X, P * spr)), rng.integers(0, E, (X, P * spr))
        assert np.array_equal(align_packs(cur, new, P, E), _dense_align(cur, new, P, E))


def test_incremental_plan_at_4096_ranks_is_fast() -> None:
    rng = np.random.default_rng(0)
    loads = rng.gamma(0.5, 100, (4, 2, 256))
    cur = eplb.plan(loads[:2], 4096, 4096, policy="deepseek")
    t0 = time.perf_counter()
    pl = eplb.plan(loads[2:], 4096, 4096, policy="eplb-incremental", current=cur)
    assert time.perf_counter() - t0 < 30  # was 7 s at 1024 ranks and O(P^3): minutes at 4096
    assert pl.num_ranks == 4096


# ----------------------------------------------------------------------------- fsync
def test_writes_fsync_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import eplb._atomic as atomic

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.atomic_write(tmp_path / "f.bin", b"data")
    assert events[:2] == ["fsync", "replace"] and (tmp_path / "f.bin").read_bytes() == b"data"


# ----------------------------------------------------------------------------- pull
class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(body: bytes = b"", drip: float = 0.0, redirect: str | None = None) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if redirect is not None:
                self.send_response(302)
                self.send_header("Location", redirect)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            try:
                if drip:
                    for b in body:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(drip)
                else:
                    self.wfile.write(body)
            except OSError:
                pass

    return H


def test_pull_bounds_size_time_redirects_and_json() -> None:
    from eplb.integrations.sglang import SGLangPullError, _request, _server_info

    big = _Server(_handler(b"x" * (1 << 20)))
    slow = _Server(_handler(b"y" * 100, drip=0.2))
    away = _Server(_handler(redirect="http://127.0.0.2:9/elsewhere"))
    deep = _Server(_handler(b"[" * 100000 + b"]" * 100000))
    try:
        with pytest.raises(SGLangPullError, match="larger than 1000 bytes"):
            _request(big.url + "/a", "GET", 5, max_bytes=1000)
        t0 = time.monotonic()
        with pytest.raises(SGLangPullError, match="within 1 s"):
            _request(slow.url + "/a", "GET", 1.0)
        assert time.monotonic() - t0 < 3
        with pytest.raises(SGLangPullError, match="another host"):
            _request(away.url + "/a", "GET", 5)
        assert _server_info(deep.url, 5) == {}  # untrusted JSON: bounded depth, no RecursionError
    finally:
        for s in (big, slow, away, deep):
            s.close()


def test_pt_trace_files_with_uint64_counts_are_refused(tmp_path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save({"logical_count": torch.tensor([[[2**63, 1]]], dtype=torch.uint64)}, buf)
    (tmp_path / "d.pt").write_bytes(buf.getvalue())
    with pytest.raises(TraceError, match="d.pt"):
        read_trace(tmp_path / "d.pt")


def test_placement_round_trip_still_exact(tmp_path: Path) -> None:
    pl = Placement.contiguous(2, 4, 2, 6)
    write_placement(pl, tmp_path / "m.yaml")
    assert np.array_equal(read_placement(tmp_path / "m.yaml").phy2log, pl.phy2log)
