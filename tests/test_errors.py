"""One exception tree: every input/environment error is an EplbError (and keeps its old built-in base);
the CLI turns exactly those into `eplb: error:` exit 2, a bug stays a traceback; atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eplb
from eplb import errors
from eplb._io import atomic_write

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_old_names_are_in_the_tree_and_keep_their_builtin_bases():
    from eplb.formats import MapFormatError
    from eplb.integrations._core import EngineLayoutError
    from eplb.integrations.sglang import SGLangPullError
    from eplb.runtime.distributed import AgreementError
    from eplb.sim.cost import CostModelError
    from eplb.stats.trace import TraceError

    for cls, base in [(eplb.PlacementError, ValueError), (MapFormatError, ValueError), (TraceError, ValueError),
                      (CostModelError, ValueError), (AgreementError, ValueError), (EngineLayoutError, AssertionError),
                      (SGLangPullError, OSError), (errors.BalancerError, RuntimeError), (errors.EplbIOError, OSError),
                      (errors.ConfigError, ValueError)]:
        assert issubclass(cls, errors.EplbError) and issubclass(cls, base), cls
    assert MapFormatError is errors.MapFormatError and eplb.PlacementError is errors.PlacementError


def test_errors_name_the_callers_parameters():
    w = np.ones((1, 8))
    with pytest.raises(errors.InputError, match=r"^num_slots: 10 slots are not divisible by num_ranks=4"):
        eplb.plan(w, num_slots=10, num_ranks=4)
    with pytest.raises(errors.InputError, match=r"^num_replicas: 10 slots are not divisible by num_gpus=4"):
        eplb.rebalance_experts(w, 10, 1, 1, 4)  # DeepSeek's entry point keeps DeepSeek's names
    from eplb.sim import simulate

    with pytest.raises(errors.InputError, match=r"^num-slots: 10 slots are not divisible by ep-size=4"):
        simulate(np.ones((2, 1, 8)), ep_size=4, num_slots=10, policies=["deepseek"])


def test_library_input_errors_are_eplb_errors():
    with pytest.raises(errors.InputError, match="num_replicas"):
        eplb.rebalance_experts(np.ones((1, 4)), 3, 1, 1, 2)
    from eplb.online import BalancerConfig

    with pytest.raises(errors.ConfigError, match="BalancerConfig.eplb_update_threshold"):
        BalancerConfig(eplb_update_threshold=3)


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    prog = code or "from eplb.cli import main; main()"
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_reports_eplb_errors_and_keeps_bugs_as_tracebacks(tmp_path):
    r = _cli("validate", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and r.stderr.startswith("eplb: error:") and "Traceback" not in r.stderr
    bug = ("import sys; from eplb.cli import app, main\n"
           "@app.command('boom')\n"
           "def boom() -> None:\n"
           "    raise ValueError('a bug, not an input error')\n"
           "sys.argv = ['eplb', 'boom']; main()")
    r = _cli(code=bug)
    assert r.returncode == 1 and "Traceback" in r.stderr and "eplb: error" not in r.stderr


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    p = tmp_path / "a" / "b.bin"
    atomic_write(p, b"123")
    assert p.read_bytes() == b"123"
    atomic_write(p, b"45")
    assert p.read_bytes() == b"45" and sorted(os.listdir(p.parent)) == ["b.bin"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(errors.EplbIOError, match="file/out.json: cannot write"):
        atomic_write(blocker / "out.json", b"{}")
