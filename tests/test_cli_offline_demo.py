"""``eplb demo``: the whole offline flow on the shipped real trace, checked against a golden table.

The golden file ``tests/golden/demo_summary.txt`` is the demo's deterministic report (no timings,
no paths): the per-layer before/after tables and the summary rows. The "before" part depends only
on the shipped trace and the report; the "after" part also on the best policy ("eplb") and the
balanced dispatch. If a deliberate change to those moves the numbers, check the new numbers and
regenerate with ``EPLB_UPDATE_GOLDEN=1 python -m pytest tests/test_cli_offline_demo.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from eplb.cli import app
from eplb.datasets import load_builtin
from eplb.formats import detect_map_format, read_placement
from eplb.offline import DEMO_FILES
from eplb.stats.report import load_table

GOLDEN = Path(__file__).parent / "golden" / "demo_summary.txt"


def test_demo_end_to_end_against_golden(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 0, (res.output, res.exception)
    assert elapsed < 60, f"the demo must run in well under a minute on a CPU, took {elapsed:.1f} s"
    out = res.output
    assert "imbalance before" in out and "imbalance after" in out and "average" in out and "lower bound" in out

    # every format written, detected, and read back as the same placement
    native = read_placement(tmp_path / DEMO_FILES["native"])
    for fmt, name in DEMO_FILES.items():
        assert detect_map_format(tmp_path / name) == fmt
        back = read_placement(tmp_path / name, num_experts=128, ep_size=16, layer_ids=native.layer_ids)
        assert np.array_equal(back.phy2log, native.phy2log), fmt
    assert native.num_slots == 144 and native.num_ranks == 16 and native.colocated_duplicates().sum() == 0
    trace = load_builtin("llama4_maverick_mmlu_decode")
    assert native.meta["trace_digest"] == trace.slice("0-64").digest() and native.meta["iter_range"] == "0-64"

    # plots and machine-readable summary
    assert sorted(p.suffix for p in (tmp_path / "plots").iterdir()) and all(
        p.stat().st_size > 1000 for p in (tmp_path / "plots").iterdir())
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["evaluations"][0], summary["evaluations"][1]
    # the numbers are the report's (TensorRT-LLM definition), on the held-out steps 64-127
    held_out = trace.slice("64-128")
    assert before["imbalance"] == load_table(held_out, 16).average[2]
    assert after["imbalance"] == load_table(held_out, 16, native).average[2]
    assert after["imbalance"] < 0.25 * before["imbalance"]  # 2.63 -> about 0.52 on this trace
    assert after["balanced_imbalance"] <= after["imbalance"]

    text = (tmp_path / "summary.txt").read_text()
    if os.environ.get("EPLB_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    golden = GOLDEN.read_text()
    split = "\nafter: "
    assert text.split(split)[0] == golden.split(split)[0], "the 'before' report changed (trace or report code)"
    assert text == golden, (
        "the demo's after-table changed (policy or dispatch); if intended, regenerate with EPLB_UPDATE_GOLDEN=1\n" + text)
