"""Fuzzing every reader and the plan path (hypothesis, fixed seeds; eplb._fuzz holds the mutators and oracles).

Every mutated input must give a clear error (an eplb error naming the file; for the plan path a
ValueError naming the argument) or a valid result equal to the exact values of the input: never
another exception type, never a wrapped / rounded / invented count, never a hang.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from eplb._fuzz import MAP_FORMATS, TRACE_FORMATS, map_case, plan_case, trace_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = settings(max_examples=1, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _assert_ok(o) -> None:  # noqa: ANN001
    assert o.kind in ("clear", "valid"), f"{o.kind}: {o.fmt} after {o.mutation}: {o.detail}"


@pytest.mark.parametrize("fmt", MAP_FORMATS)
@seed(1017)
@settings(SETTINGS, max_examples=120)
@given(case_seed=st.integers(0, 2**32 - 1))
def test_map_readers_fail_clearly_or_read_exactly(tmp_path_factory, fmt: str, case_seed: int) -> None:
    d = Path(tmp_path_factory.mktemp("map"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_ok(map_case(random.Random(case_seed), fmt, d, limit_s=20))


@pytest.mark.parametrize("fmt", TRACE_FORMATS)
@seed(1017)
@settings(SETTINGS, max_examples=120)
@given(case_seed=st.integers(0, 2**32 - 1))
def test_trace_readers_fail_clearly_or_read_exactly(tmp_path_factory, fmt: str, case_seed: int) -> None:
    d = Path(tmp_path_factory.mktemp("trace"))
    _assert_ok(trace_case(random.Random(case_seed), fmt, d, limit_s=20))


@seed(1017)
@settings(SETTINGS, max_examples=300)
@given(case_seed=st.integers(0, 2**32 - 1))
def test_plan_fails_clearly_or_returns_a_valid_placement(case_seed: int) -> None:
    _assert_ok(plan_case(random.Random(case_seed), limit_s=30))


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    import sys

    from eplb.cli import main

    monkeypatch.setattr(sys, "argv", ["eplb", *argv])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("verb", ["validate", "report", "convert"])
def test_cli_verbs_exit_0_or_2_on_mutated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,  # noqa: ANN001
                                                verb: str) -> None:
    rng = random.Random(17)
    fmts = MAP_FORMATS if verb == "validate" else TRACE_FORMATS
    for i in range(36):
        d = tmp_path / str(i)
        d.mkdir()
        fmt = fmts[i % len(fmts)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (map_case if verb == "validate" else trace_case)(rng, fmt, d, limit_s=20)
        src = next(p for p in sorted(d.iterdir()) if p.name.startswith(("map", "trace", "dump")))
        if verb == "validate":
            argv = ["validate", str(src), "--ep-size", "1"]
        elif verb == "report":
            argv = ["report", str(src), "--ep-size", "1"] + (["--format", fmt, "--expert-map", "identity"] if fmt == "vllm-ascend" else [])
        else:
            argv = ["convert", str(src), str(d / "out.npz")] + (["--from", fmt, "--expert-map", "identity"] if fmt == "vllm-ascend" else [])
        code = _cli(argv, monkeypatch)  # anything but exit 0 / exit 2 (a traceback) fails the test
        err = capsys.readouterr().err
        assert code in (0, 2), (argv, err)
        if code == 2:
            assert err.startswith("eplb: error: ") and err.count("\n") == 1, err
