"""``eplb pull --sglang URL`` against a fake SGLang server on 127.0.0.1 (http.server in a thread).

The fake behaves like SGLang's HTTP layer: the three expert-distribution endpoints accept GET/POST and
answer plain text; ``/dump_expert_distribution_record`` makes "rank 0" write
``expert_distribution_recorder_<time>.pt`` (``{"rank", "logical_count" [buffer, layers, E],
"average_utilization_rate_over_window"}``) into the dump directory; ``/server_info`` answers the
server args as JSON. Every server is shut down by its fixture; requests carry short timeouts.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eplb.cli import app, main
from eplb.integrations import sglang as sg
from eplb.stats.trace import Trace, TraceError

L_MODEL, E = 5, 8  # model layers 0 and 4 are dense (all-zero rows in SGLang's dump)


def make_counts(buffer: int, used: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.zeros((buffer, L_MODEL, E), dtype=np.int32)
    c[:used, 1:4] = rng.integers(0, 50, (used, 3, E))
    c[:used, 1:4, 0] += 1  # every used pass routes tokens
    return c


class FakeSGLang:
    def __init__(self, dump_dir: Path, counts: np.ndarray, *, info: dict[str, Any] | None = None,
                 dump_obj: dict[str, Any] | None = None, write_dump: bool = True, fail: str = "",
                 api_key: str | None = None, admin_api_key: str | None = None) -> None:
        self.dump_dir = dump_dir
        self.counts = counts
        self.info = {"expert_distribution_recorder_mode": "stat", "ep_size": 4, "model_path": "fake/Qwen3-MoE",
                     "expert_distribution_recorder_buffer_size": int(counts.shape[0])} if info is None else info
        self.dump_obj = dump_obj
        self.write_dump = write_dump
        self.fail = fail
        self.calls: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        fake = self
        admin_routes = ("/start_expert_distribution_record", "/stop_expert_distribution_record",
                        "/dump_expert_distribution_record")

        class Handler(BaseHTTPRequestHandler):
            timeout = 5

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                fake.calls.append((method, self.path))
                got = self.headers.get("Authorization")
                fake.auth.append(got)
                # SGLang: --admin-api-key guards the admin routes, --api-key every route (401 otherwise)
                need = admin_api_key if (admin_api_key and self.path in admin_routes) else api_key
                if need and got != f"Bearer {need}":
                    return self._reply(401, b'{"error":"Unauthorized"}', "application/json")
                if fake.fail and self.path == fake.fail:
                    return self._reply(500, b"Internal Server Error: recorder crashed\n")
                if self.path == "/server_info" and fake.info:
                    return self._reply(200, json.dumps(fake.info).encode(), "application/json")
                if self.path == "/start_expert_distribution_record":
                    return self._reply(200, b"Start recording the expert distribution.\n")
                if self.path == "/stop_expert_distribution_record":
                    return self._reply(200, b"Stop recording the expert distribution.\n")
                if self.path == "/dump_expert_distribution_record":
                    if fake.write_dump:
                        obj = fake.dump_obj if fake.dump_obj is not None else {
                            "rank": 0, "logical_count": torch.from_numpy(fake.counts),
                            "average_utilization_rate_over_window": None}
                        torch.save(obj, str(fake.dump_dir / f"expert_distribution_recorder_{time.time()}.pt"))
                    return self._reply(200, b"Dump expert distribution record.\n")
                return self._reply(404, b'{"detail":"Not Found"}', "application/json")

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def server(tmp_path):
    made: list[FakeSGLang] = []

    def start(**kw: Any) -> FakeSGLang:
        d = tmp_path / "sglang_dumps"
        d.mkdir(exist_ok=True)
        s = FakeSGLang(d, kw.pop("counts", make_counts(16, 11)), **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def test_pull_cli_writes_trace(server, tmp_path):
    counts = make_counts(16, 11, seed=1)
    srv = server(counts=counts)
    # an older dump in the same directory must not be picked up
    torch.save({"logical_count": torch.ones(2, L_MODEL, E)}, str(srv.dump_dir / "expert_distribution_recorder_1.pt"))
    out = tmp_path / "pulled.safetensors"
    res = CliRunner().invoke(app, ["pull", "--sglang", srv.url + "/", "--seconds", "0.2", "--output", str(out),
                                   "--dump-dir", str(srv.dump_dir), "--timeout", "5", "--dump-timeout", "5"])
    assert res.exit_code == 0, res.output
    assert "11 forward passes x 3 MoE layers x 8 experts" in res.stdout
    posts = [p for m, p in srv.calls if m == "POST"]
    assert posts == ["/start_expert_distribution_record", "/stop_expert_distribution_record",
                     "/dump_expert_distribution_record"]
    tr = Trace.load(out)
    np.testing.assert_array_equal(tr.counts, counts[:11, 1:4])  # unused ring rows and dense layers dropped
    assert tr.layer_ids == (1, 2, 3)
    assert tr.ep_size == 4 and tr.model == "fake/Qwen3-MoE" and tr.source.startswith("sglang: ")
    assert tr.meta["dropped_empty_passes"] == 5 and tr.meta["sglang_num_layers"] == L_MODEL


def test_pull_waits_the_window_and_reads_env_dump_dir(server, monkeypatch):
    srv = server()
    slept: list[float] = []
    monkeypatch.setenv(sg.DUMP_DIR_ENV, str(srv.dump_dir))
    res = sg.pull(srv.url, 3.0, timeout=5, dump_timeout=5, sleep=slept.append)
    assert slept[0] == 3.0
    assert res.dump_path.parent == srv.dump_dir and res.trace.num_steps == 11


def test_pull_without_server_info_still_works(server):
    srv = server(info={})  # older/newer server without /server_info: proceeds, ep_size unknown
    res = sg.pull(srv.url, 0, dump_dir=srv.dump_dir, timeout=5, dump_timeout=5)
    assert res.trace.ep_size == 0 and res.server_info == {}
    assert ("GET", "/get_server_info") in srv.calls


def test_pull_warns_when_ring_buffer_wrapped(server, caplog):
    srv = server(counts=make_counts(6, 6))
    res = sg.pull(srv.url, 0, dump_dir=srv.dump_dir, timeout=5, dump_timeout=5)
    assert res.trace.meta.get("sglang_buffer_wrapped") is True
    assert any("ring buffer" in r.getMessage() for r in caplog.records)


def test_pull_errors_are_clear(server, tmp_path, monkeypatch):
    srv = server(info={"expert_distribution_recorder_mode": None})
    with pytest.raises(sg.SGLangPullError, match="--expert-distribution-recorder-mode stat"):
        sg.pull(srv.url, 0, dump_dir=srv.dump_dir, timeout=5)
    assert not [p for m, p in srv.calls if m == "POST"]  # nothing started on a server that cannot record

    srv2 = server(info={"expert_distribution_recorder_mode": "per_token"})
    with pytest.raises(sg.SGLangPullError, match="per_token"):
        sg.pull(srv2.url, 0, dump_dir=srv2.dump_dir, timeout=5)

    srv3 = server(write_dump=False)  # dump written elsewhere (e.g. on another machine)
    t0 = time.monotonic()
    with pytest.raises(sg.SGLangPullError, match="--dump-dir"):
        sg.pull(srv3.url, 0, dump_dir=srv3.dump_dir, timeout=5, dump_timeout=0.5)
    assert time.monotonic() - t0 < 5

    srv4 = server(fail="/stop_expert_distribution_record")
    with pytest.raises(sg.SGLangPullError, match="HTTP 500"):
        sg.pull(srv4.url, 0, dump_dir=srv4.dump_dir, timeout=5)

    srv5 = server(dump_obj={"records": [], "last_physical_to_logical_map": torch.zeros(2, 3)})
    with pytest.raises(TraceError, match="recorder-mode stat"):
        sg.pull(srv5.url, 0, dump_dir=srv5.dump_dir, timeout=5, dump_timeout=5)

    srv6 = server(counts=np.zeros((4, L_MODEL, E), dtype=np.int32))
    with pytest.raises(TraceError, match="all zero"):
        sg.pull(srv6.url, 0, dump_dir=srv6.dump_dir, timeout=5, dump_timeout=5)

    with pytest.raises(ValueError, match="http"):
        sg.pull("127.0.0.1:1", 0, dump_dir=tmp_path)
    with pytest.raises(ValueError, match="--dump-dir"):
        sg.pull(srv.url, 0, dump_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="--seconds"):
        sg.pull(srv.url, -1, dump_dir=tmp_path)


def test_pull_unreachable_server_exits_2(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "t.safetensors"
    monkeypatch.setattr(sys, "argv", ["eplb", "pull", "--sglang", f"http://127.0.0.1:{port}", "--seconds", "0",
                                      "--output", str(out), "--dump-dir", str(tmp_path), "--timeout", "2"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: sglang: POST") and "start_expert_distribution_record" in err
    assert not out.exists()


def test_pull_requires_a_server(tmp_path):
    res = CliRunner().invoke(app, ["pull", "--output", str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0
    assert isinstance(res.exception, ValueError) and "--sglang" in str(res.exception)


def test_read_dump_uses_stats_importer_and_tidies(tmp_path):
    c = make_counts(6, 4)
    f = tmp_path / "expert_distribution_recorder_5.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(c)}, str(f))
    tr = sg.read_dump(f)
    np.testing.assert_array_equal(tr.counts, c[:4, 1:4])
    assert tr.layer_ids == (1, 2, 3) and tr.step_ids.tolist() == [0, 1, 2, 3]
    assert tr.meta["dropped_empty_passes"] == 2
    torch.save({"logical_count": torch.from_numpy(c[0])}, str(f))  # [layers, E]: one pass
    assert sg.read_dump(f).counts.shape == (1, 3, E)
    torch.save({"logical_count": torch.from_numpy(c) - 1}, str(f))
    with pytest.raises(TraceError, match="negative"):
        sg.read_dump(f)
    f.write_bytes(b"not a torch file")
    with pytest.raises(TraceError, match=str(f.name)):
        sg.read_dump(f)


def test_documented_sglang_flow_pull_plan_init_location(server, tmp_path):
    """docs/engines/sglang.md: pull -> report -> plan --format sglang -> --init-expert-location file."""
    srv = server(counts=make_counts(32, 20, seed=4))
    trace = tmp_path / "sglang_trace.safetensors"
    run = CliRunner()
    res = run.invoke(app, ["pull", "--sglang", srv.url, "--seconds", "0", "--output", str(trace),
                           "--dump-dir", str(srv.dump_dir), "--dump-timeout", "5"])
    assert res.exit_code == 0, res.output
    assert run.invoke(app, ["report", str(trace), "-q"]).exit_code == 0
    init = tmp_path / "init_expert_location.json"
    res = run.invoke(app, ["plan", str(trace), "--ep-size", "4", "--num-slots", "12", "--format", "sglang",
                           "--num-layers", str(L_MODEL), "--output", str(init)])
    assert res.exit_code == 0, res.output
    rows = np.array(json.loads(init.read_text())["physical_to_logical_map"])
    assert rows.shape == (L_MODEL, 12)
    np.testing.assert_array_equal(rows[[0, 4]], np.tile(np.arange(12) % E, (2, 1)))  # dense layers: trivial
    for layer in (1, 2, 3):
        assert set(rows[layer].tolist()) == set(range(E))  # every expert served
    assert run.invoke(app, ["validate", str(init), "--ep-size", "4"]).exit_code == 0
    res = run.invoke(app, ["evaluate", str(trace), "--placement", str(init), "--ep-size", "4", "--held-out", "0-10:10-20"])
    assert res.exit_code == 0, res.output
    res = run.invoke(app, ["report", str(trace), "-q", "--ep-size", "4", "--placement", str(init)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("how", ["option", "env"])
def test_pull_sends_api_keys_as_bearer_and_never_prints_them(server, tmp_path, monkeypatch, caplog, how):
    key, admin = "sk-user-7f3a9c", "sk-admin-41d2e8"
    srv = server(counts=make_counts(16, 11, seed=2), api_key=key, admin_api_key=admin)
    base = ["pull", "--sglang", srv.url, "--seconds", "0", "--dump-dir", str(srv.dump_dir), "--timeout", "5",
            "--dump-timeout", "5"]
    # without keys: HTTP 401, a clear error that says how to pass one
    res = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "a.safetensors")])
    assert res.exit_code != 0 and "HTTP 401" in str(res.exception) and "--api-key" in str(res.exception)
    # a wrong admin key: refused, and the key is not echoed
    res = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "b.safetensors"), "--api-key", key,
                                   "--admin-api-key", "sk-wrong-000"])
    assert res.exit_code != 0 and "the key given was refused" in str(res.exception)
    assert "sk-wrong-000" not in str(res.exception) + res.output
    out = tmp_path / "c.safetensors"
    args = [*base, "--output", str(out)]
    if how == "option":
        args += ["--api-key", key, "--admin-api-key", admin]
    else:
        monkeypatch.setenv("EPLB_SGLANG_API_KEY", key)
        monkeypatch.setenv("EPLB_SGLANG_ADMIN_API_KEY", admin)
    srv.auth.clear()
    with caplog.at_level("DEBUG"):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    assert Trace.load(out).num_steps == 11
    assert f"Bearer {admin}" in srv.auth and f"Bearer {key}" in srv.auth  # admin routes got the admin key
    text = res.output + caplog.text + "".join(str(v) for v in Trace.load(out).meta.values())
    assert key not in text and admin not in text
