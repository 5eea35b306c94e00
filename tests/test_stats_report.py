"""Load report: numbers against hand computations, placement projection, CLI report/merge/plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from eplb.cli import app
from eplb.placement import Placement
from eplb.stats.report import load_table, merge_tables, render
from eplb.stats.trace import Trace

runner = CliRunner()


def test_hand_computed_table() -> None:
    # one layer, 4 experts, 2 ranks (experts 0,1 | 2,3), 2 steps
    counts = np.array([[[1, 3, 2, 6]], [[4, 4, 0, 0]]])
    t = load_table(counts, ep_size=2, layer_ids=[7])
    # step 0: ranks [4, 8]: mean 6, std sqrt(8) (unbiased), imbalance 8/6 - 1
    # step 1: ranks [8, 0]: mean 4, std sqrt(32), imbalance 1
    assert t.layer_ids == (7,) and t.num_steps == 2
    assert t.mean[0] == pytest.approx(5.0)
    assert t.std[0] == pytest.approx((np.sqrt(8) + np.sqrt(32)) / 2)
    assert t.imbalance[0] == pytest.approx((8 / 6 - 1 + 1) / 2)
    rows = list(t.rows())
    assert rows[-1][0] == "average" and rows[-1][3] == pytest.approx(t.imbalance[0])


def test_per_expert_and_average_row() -> None:
    counts = np.array([[[2, 2, 2, 2], [0, 0, 1, 7]]])
    t = load_table(counts, ep_size=2, per_expert=True)
    assert t.imbalance.tolist() == pytest.approx([0.0, 7 / 2 - 1])
    assert t.std[1] == pytest.approx(np.std([0, 0, 1, 7], ddof=1))
    assert t.average == pytest.approx((2.0, float(np.mean(t.std)), (0 + 2.5) / 2))


def test_projection_onto_a_placement() -> None:
    # 4 experts, 6 slots over 2 ranks: expert 3 (hot) replicated twice -> one copy per rank
    counts = np.array([[[1, 1, 2, 8]]])
    pl = Placement(np.array([[3, 0, 1, 3, 2, 1]]), num_experts=4, num_ranks=2, layer_ids=(5,))
    t = load_table(counts, ep_size=2, placement=pl, layer_ids=[5])
    # slot loads: [4, 1, 0.5, 4, 2, 0.5] -> ranks [5.5, 6.5]
    assert t.mean[0] == pytest.approx(6.0)
    assert t.imbalance[0] == pytest.approx(6.5 / 6 - 1)
    assert t.std[0] == pytest.approx(np.std([5.5, 6.5], ddof=1))
    base = load_table(counts, ep_size=2, layer_ids=[5])
    assert base.imbalance[0] == pytest.approx(10 / 6 - 1)


def test_placement_rows_matched_by_layer_id() -> None:
    counts = np.array([[[1, 1, 0, 9]]])
    pl = Placement(np.array([[0, 1, 2, 3], [3, 0, 1, 2]]), 4, 2, layer_ids=(3, 9))
    t = load_table(counts, 2, pl, layer_ids=[9])  # uses the row of layer 9: ranks [9+1, 1+0]
    assert t.imbalance[0] == pytest.approx(10 / 5.5 - 1)
    with pytest.raises(ValueError, match=r"no row for trace layer\(s\) \[4\]"):
        load_table(counts, 2, pl, layer_ids=[4])


def test_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        load_table(np.ones((1, 1, 4)), 3)
    with pytest.raises(ValueError, match="negative"):
        load_table(np.array([[[1, -1]]]), 2)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        load_table(np.ones((1, 1, 4)), 1)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_chunked_tables_merge_exactly(T: int, cut: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 20, (T, 3, 8))
    whole = load_table(c, 4)
    parts = [load_table(c[a:a + cut], 4) for a in range(0, T, cut)]
    m = merge_tables(parts)
    np.testing.assert_allclose(m.mean, whole.mean)
    np.testing.assert_allclose(m.std, whole.std)
    np.testing.assert_allclose(m.imbalance, whole.imbalance)
    assert m.num_steps == T


def test_render_is_a_rich_table() -> None:
    t = load_table(np.array([[[1, 3, 2, 6]]]), 2)
    table = render(t)
    assert table.row_count == 2 and [c.header for c in table.columns] == ["layer", "mean", "std", "imbalance-ratio"]


def test_cli_report_with_placement_plots_and_html(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 30, (6, 2, 8))
    counts[:, :, 0] += 200  # a hot expert
    tr = Trace(counts, (3, 4), ep_size=4, model="synthetic")
    write_dir = tmp_path / "rec"
    from eplb.stats.io import write_trace

    write_trace(tr, write_dir, "eplb-dir", chunk_steps=2)
    pl = Placement(np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0]] * 2), 8, 4, layer_ids=(3, 4), meta={"policy": "hand"})
    (tmp_path / "p.json").write_text(json.dumps(pl.to_dict()))
    res = runner.invoke(app, ["report", str(write_dir), "-q", "--placement", str(tmp_path / "p.json"),
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "average" in res.output and "contiguous" in res.output
    got = json.loads((tmp_path / "r.json").read_text())
    want = load_table(tr, 4, pl)
    assert got["placement (p.json)"]["rows"][-1]["imbalance_ratio"] == pytest.approx(want.average[2])
    assert got["contiguous"]["rows"][-1]["imbalance_ratio"] == pytest.approx(load_table(tr, 4).average[2])
    res = runner.invoke(app, ["report", str(write_dir), "-q", "--iter-range", "2-5", "--per-expert",
                              "--plot", str(tmp_path / "plots"), "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["expert_load_heatmap.png", "imbalance_per_layer.png", "rank_load.png"]
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "3 steps" in page


def test_cli_merge_and_convert_helper(tmp_path: Path) -> None:
    a, b = (Trace(np.full((2, 1, 4), v), (0,)) for v in (1, 2))
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    res = runner.invoke(app, ["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                              "-o", str(tmp_path / "m.npy")])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.full((2, 1, 4), 3))
    from eplb.cli.stats import convert_trace

    tr = convert_trace("builtin:llama4_maverick_mmlu_decode", tmp_path / "trt", to_format="trtllm", ep_size=16,
                       iter_range="0-4")
    assert tr.num_steps == 4
    assert len(list((tmp_path / "trt").glob("rank*.safetensors"))) == 16
    res = runner.invoke(app, ["report", str(tmp_path / "trt"), "-q"])
    assert res.exit_code == 0 and "16" in res.output


def test_cli_report_errors(tmp_path: Path) -> None:
    Trace(np.ones((1, 1, 4))).save(tmp_path / "t.safetensors")
    res = runner.invoke(app, ["report", str(tmp_path / "t.safetensors"), "-q"])
    assert res.exit_code != 0 and "give --ep-size" in str(res.exception)
