"""Multi-workload planning (eplb.plan_multi, `eplb plan A B ...`) and evaluate's "worse than no EPLB" warning."""

import numpy as np
import pytest
from typer.testing import CliRunner

import eplb
from eplb.errors import InputError
from eplb.metrics import step_imbalance
from eplb.placement import Placement
from eplb.policies.multi import _group_matrix, minimax_rows, workload_objective


def _shifted(seed: int, T: int = 12, L: int = 3, E: int = 16) -> list[np.ndarray]:
    """SYNTHETIC: two workloads whose hot experts differ (a domain shift)."""
    rng = np.random.default_rng(seed)
    out = []
    for hot in (np.arange(4), np.arange(8, 12)):
        p = np.full(E, 1.0)
        p[hot] = 12.0
        out.append(rng.multinomial(512, p / p.sum(), size=(T, L)).astype(np.float64))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_plan_multi_minimises_the_worst_workload(seed):
    a, b = _shifted(seed)
    E, R = 16, 4
    for S in (16, 20):
        multi = eplb.plan_multi([a, b], S, R, names=["a", "b"])
        assert multi.meta["workloads"] == ["a", "b"] and multi.meta["policy"] == "eplb+multi"
        worst = max(step_imbalance(w, multi).mean() for w in (a, b))
        for single in (eplb.plan(a, S, R), eplb.plan(b, S, R)):  # each single-workload plan is a candidate
            assert worst <= max(step_imbalance(w, single).mean() for w in (a, b)) + 1e-9
        if S == E:  # no EPLB is a candidate too
            none = Placement.contiguous(3, E, R)
            assert worst <= max(step_imbalance(w, none).mean() for w in (a, b)) + 1e-9
        lg = multi.logcnt
        assert np.all(lg >= 1) and np.all(lg.sum(1) == S)


def test_minimax_search_never_raises_the_objective():
    a, b = _shifted(7)
    norm = [x / x.sum(2, keepdims=True) for x in (a, b)]
    win = np.concatenate(norm)
    G = _group_matrix([a.shape[0], b.shape[0]])
    start = np.asarray(eplb.plan(a, 20, 4).phy2log)
    found = minimax_rows(win, G, start, 4)
    before = workload_objective(win, G, start, 4).max(1)
    after = workload_objective(win, G, found, 4).max(1)
    assert np.all(after <= before + 1e-12)
    assert np.array_equal(np.sort(found, 1), np.sort(start, 1))  # replica counts kept
    # objective = 1 + mean per-step imbalance per workload
    obj = workload_objective(win, G, found, 4)
    pl = Placement(found, 16, 4)
    for k, w in enumerate((a, b)):
        assert obj[:, k] == pytest.approx(1 + step_imbalance(w, pl), rel=1e-9)


def test_plan_multi_errors():
    a, b = _shifted(0)
    with pytest.raises(InputError, match="workloads"):
        eplb.plan_multi([], 16, 4)
    with pytest.raises(InputError, match="workloads\\[1\\]"):
        eplb.plan_multi([a, b[:, :, :8]], 16, 4)


def _write_trace(path, counts):
    from eplb.stats.io import write_trace
    from eplb.stats.trace import Trace

    write_trace(Trace(counts, ep_size=4), path)


def test_cli_plan_several_and_evaluate_warns(tmp_path):
    from eplb.cli import app

    rng = np.random.default_rng(1)
    a, _ = _shifted(1)  # hot experts 0..3: no EPLB (contiguous) puts them all on rank 0
    p = np.ones(16)
    p[[0, 4, 8, 12]] = 12.0  # hot experts one per contiguous rank: no EPLB is near perfect
    c = rng.multinomial(512, p / p.sum(), size=(12, 3)).astype(np.float64)
    pa, pc = tmp_path / "a.npz", tmp_path / "c.npz"
    _write_trace(pa, a)
    _write_trace(pc, c)
    run = CliRunner()
    out = tmp_path / "map.json"
    r = run.invoke(app, ["plan", str(pa), str(pc), "--num-slots", "20", "-o", str(out), "-f", "native"])
    assert r.exit_code == 0, r.output
    assert "one placement for 2 workloads" in r.output and f"workload {pa}" in r.output and f"workload {pc}" in r.output
    assert "warning:" not in r.output
    # a map with c's hot experts on one rank: worse than no EPLB on c, better on a
    bad_map = tmp_path / "bad.json"
    eplb.write_placement(Placement(np.tile([0, 4, 8, 12, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15], (3, 1)), 16, 4),
                         bad_map, "native")
    pl = eplb.read_placement(bad_map)
    bad = float(step_imbalance(c, pl).mean())
    none = float(step_imbalance(c, Placement.contiguous(3, 16, 4)).mean())
    assert bad > none and step_imbalance(a, pl).mean() < step_imbalance(a, Placement.contiguous(3, 16, 4)).mean()
    r = run.invoke(app, ["evaluate", str(pc), "-p", str(bad_map), "--no-dispatch", "--no-per-layer"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("warning:"))
    assert str(pc) in line and f"{bad:.4f}" in line and f"{none:.4f}" in line
    # --workload: evaluated on a (no warning there) and on c (the warning)
    r = run.invoke(app, ["evaluate", str(pa), "-p", str(bad_map), "--workload", str(pc), "--no-dispatch",
                         "--no-per-layer"])
    assert r.exit_code == 0, r.output
    warns = [x for x in r.output.splitlines() if x.startswith("warning:")]
    assert len(warns) == 1 and str(pc) in warns[0], r.output
