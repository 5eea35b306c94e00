"""Mutation fuzzing of every eplb reader and of the plan path (used by ``tests/test_fuzz_*.py`` and
``bench/fuzz.py``).

A case writes a valid small file with eplb's own writer (a SYNTHETIC placement or trace), mutates it
(a leaf replaced by an adversarial value, a key dropped or added, a list made ragged, deep nesting,
a dtype changed to ``uint64`` past ``2**63`` or to floats past ``2**53``, truncated or flipped bytes),
reads it back and classifies the outcome:

* ``clear``: an eplb error (:class:`~eplb.stats.trace.TraceError`, :class:`~eplb.placement.PlacementError`)
  whose message names the file (for the plan path: a ``ValueError`` naming the argument);
* ``valid``: accepted, and the result equals the exact values of the mutated input (an oracle that
  reads them with Python ints, never through a float or a fixed-width cast);
* ``silent-wrong``: accepted, but the result differs from the input's exact values, or the input holds
  no exact valid values at all (a wrapped, rounded or negative count);
* ``unclear``: any other exception type, or an eplb error that does not name the file;
* ``hang``: no answer within the time limit.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eplb._fuzz.core import (
    INDIRECT_TARGETS,
    MAP_FORMATS,
    OUTCOMES,
    TRACE_FORMATS,
    Hang,
    Outcome,
    _classify,
    _deep_text,
    _exact_grid,
    _exact_int,
    _placement,
    _time_limit,
    _trace,
    mutate_array,
    mutate_bytes,
    mutate_tree,
)
from eplb._fuzz.traces import trace_case

__all__ = ["INDIRECT_TARGETS", "MAP_FORMATS", "OUTCOMES", "TRACE_FORMATS", "Outcome", "map_case", "plan_case", "run_cases",
           "trace_case"]


# ----------------------------------------------------------------------------- map cases
def _map_oracle(fmt: str, obj: Any) -> list[list[int]] | None:
    """Exact ``[L, S]`` rows (file order of the reader) of a mutated map document, or None."""
    try:
        if fmt in ("trtllm", "trtllm-options"):
            if fmt == "trtllm-options":
                obj = obj["moe_config"]["load_balancer"]
            iga = obj["initial_global_assignments"]
            keys = {}
            for k in iga:
                kk = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else _exact_int(k, 0, 2**31 - 1)
                if kk is None or kk < 0:
                    return None
                keys[kk] = iga[k]
            return _exact_grid([keys[k] for k in sorted(keys)], (2,), 0, 2**31 - 1)
        if fmt == "native":
            return _exact_grid(obj["phy2log"], (2,), 0, 2**31 - 1)
        if fmt in ("sglang-json", "sglang-pt"):
            return _exact_grid(obj["physical_to_logical_map"], (2,), 0, 2**31 - 1)
        if fmt in ("vllm-json", "vllm-pt"):
            return _exact_grid(obj["physical_to_logical_map"], (2,), 0, 2**31 - 1)
        if fmt == "vllm-ascend":
            rows = []
            n = obj["moe_layer_count"]
            layers = [ly for ly in obj["layer_list"] if _exact_int(ly["layer_id"]) != n]  # layer n: MTP, skipped
            for ly in sorted(layers, key=lambda x: int(x["layer_id"])):
                devs = sorted(enumerate(ly["device_list"]), key=lambda kx: int(kx[1].get("device_id", kx[0])))
                rows.append([e for _, d in devs for e in d["device_expert"]])
            return _exact_grid(rows, (2,), 0, 2**31 - 1)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None
    return None


def map_case(rng: random.Random, fmt: str, tmp: Path, limit_s: float = 10.0) -> Outcome:
    """One mutated map file of ``fmt`` read with :func:`eplb.formats.read_placement`."""
    import yaml

    from eplb.formats import encode_placement, read_placement

    pl = _placement(rng, no_colocation=fmt == "vllm-ascend")
    base_fmt = {"sglang-json": "sglang", "sglang-pt": "sglang", "sglang-count": "sglang", "vllm-json": "vllm",
                "vllm-pt": "vllm", "trtllm-options": "trtllm"}.get(fmt, fmt)
    suffix = {"trtllm": ".yaml", "trtllm-options": ".yaml", "sglang-pt": ".pt", "vllm-pt": ".pt"}.get(fmt, ".json")
    path = tmp / f"map{suffix}"
    kw: dict[str, Any] = {"ep_size": pl.num_ranks}  # checked against the file where it records one
    if fmt == "sglang-count":
        doc: Any = {"logical_count": _trace(rng).counts.tolist()}
        kw = {"ep_size": 1}
    elif suffix == ".pt":
        doc = None
    else:
        data = encode_placement(pl, base_fmt, container="json")
        doc = yaml.safe_load(data) if suffix == ".yaml" else json.loads(data)
        if fmt == "trtllm-options":
            (tmp / "lb.yaml").write_bytes(data)
            doc = {"moe_config": {"backend": "WideEP", "load_balancer": doc}}
    mutation = "none"
    r = rng.random()
    if suffix == ".pt":
        import torch

        key = "physical_to_logical_map"
        arr, mutation = mutate_array(pl.phy2log, rng) if r < 0.8 else (pl.phy2log, "none")
        payload: dict[str, Any] = {key: torch.from_numpy(np.ascontiguousarray(arr))}
        if fmt == "vllm-pt":
            payload["ep_size"] = pl.num_ranks
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        if 0.8 <= r < 0.95:
            data, mutation = mutate_bytes(data, rng)
        doc = {key: arr, "ep_size": pl.num_ranks}
    else:
        if r < 0.1 and fmt == "trtllm-options":
            doc["moe_config"]["load_balancer"] = rng.choice(INDIRECT_TARGETS)
            mutation = f"indirect={doc['moe_config']['load_balancer']}"
            if doc["moe_config"]["load_balancer"] == "fifo" and not (tmp / "fifo").exists() and hasattr(os, "mkfifo"):
                os.mkfifo(tmp / "fifo")
        elif r < 0.85:
            doc, mutation = mutate_tree(doc, rng)
        text = (yaml.safe_dump(doc, default_flow_style=None) if suffix == ".yaml" else json.dumps(doc)).encode() \
            if not mutation.startswith("deep") else _deep_text(doc, suffix)
        data = text
        if r >= 0.85:
            data, mutation = mutate_bytes(data, rng)
    path.write_bytes(data)
    fixed_text = None if mutation.startswith(("truncate", "flip", "insert")) else doc

    def check(got: Any) -> str | None:
        if fmt == "sglang-count":
            return None if _exact_grid(fixed_text and fixed_text.get("logical_count") if isinstance(fixed_text, dict)
                                       else None, (2, 3)) is not None or fixed_text is None else \
                "accepted logical_count without exact non-negative counts"
        if fixed_text is None:  # byte-level damage: re-derive the document the reader saw
            want = _reparse(fmt, path)
        else:
            want = _map_oracle(fmt, fixed_text) if not (fmt == "trtllm-options" and mutation.startswith("indirect")) \
                else _map_oracle("trtllm", yaml.safe_load((tmp / "lb.yaml").read_bytes()))
        if want is None:
            return "accepted a map without exact integer expert ids"
        if got.phy2log.tolist() != want:
            return "rows differ from the file's exact ids"
        return None

    return _classify(fmt, mutation, path, lambda: read_placement(path, base_fmt, **kw), check, limit_s)


def _reparse(fmt: str, path: Path) -> list[list[int]] | None:
    """The exact ids of a byte-damaged file as Python reads it (None if it no longer parses)."""
    import yaml

    try:
        if path.suffix == ".pt":
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".yaml":
            obj = yaml.safe_load(path.read_bytes())
        else:
            obj = json.loads(path.read_bytes())
    except Exception:  # noqa: BLE001
        return None
    return _map_oracle(fmt, obj)


# ----------------------------------------------------------------------------- plan path
def plan_case(rng: random.Random, limit_s: float = 20.0) -> Outcome:
    """``eplb.plan`` on adversarial loads and sizes; a valid answer is a Placement of the asked shape."""
    import eplb
    import eplb.dispatch  # noqa: F401 - registers eplb-dispatch
    from eplb.policies import POLICIES

    # eplb's own policies (not test or plug-in ones); incremental needs current=
    policy = rng.choice(sorted(p for p, fn in POLICIES.items()
                               if p != "eplb-incremental" and getattr(fn, "__module__", "").startswith("eplb.")))
    T, L, E = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 6)
    R = rng.randint(1, 4)
    S = R * rng.randint(max(1, -(-E // R)), -(-E // R) + 3)
    kind = rng.choice(("ordinary", "zeros", "huge", "tiny", "int64max", "uint64", "nan", "neg", "inf", "one-hot",
                       "bad-shape", "bad-size", "bool", "float32max", "mixed"))
    base = np.asarray([[[rng.random() * 100 for _ in range(E)] for _ in range(L)] for _ in range(T)])
    loads: Any = base
    num_slots, num_ranks = S, R
    if kind == "zeros":
        loads = np.zeros_like(base)
    elif kind == "huge":
        loads = base * 1e300
    elif kind == "tiny":
        loads = base * 1e-300
    elif kind == "int64max":
        loads = np.full(base.shape, 2**63 - 1, dtype=np.int64)
    elif kind == "uint64":
        loads = np.full(base.shape, 2**64 - 1, dtype=np.uint64)
    elif kind == "nan":
        loads = base.copy()
        loads.reshape(-1)[0] = np.nan
    elif kind == "neg":
        loads = base - 50
    elif kind == "inf":
        loads = base.copy()
        loads.reshape(-1)[-1] = np.inf
    elif kind == "one-hot":
        loads = np.zeros_like(base)
        loads[..., 0] = 1e38
    elif kind == "bad-shape":
        loads = base.reshape(-1)
    elif kind == "bad-size":
        num_slots, num_ranks = rng.choice(((E - 1, 1), (S + 1, R), (S, 0), (-S, R), (2**63, R), (S, R + 10**6)))
    elif kind == "bool":
        loads = base > 50
    elif kind == "float32max":
        loads = np.full(base.shape, 3.4e38)
    elif kind == "mixed":
        loads = base.astype(object)
        loads.reshape(-1)[0] = "x"
    bad_loads = kind in ("nan", "inf", "bad-shape", "mixed") or (kind == "neg" and bool(np.any(loads < 0)))

    def read() -> Any:
        return eplb.plan(loads, num_slots, num_ranks, policy=policy)

    try:
        with _time_limit(limit_s):
            got = read()
    except Hang:
        return Outcome("hang", policy, kind)
    except ValueError as exc:
        first = str(exc).split(":", 1)[0]
        return Outcome("clear" if first and " " not in first.strip() else "unclear", policy, kind, str(exc)[:160])
    except Exception as exc:  # noqa: BLE001
        return Outcome("unclear", policy, kind, f"{type(exc).__name__}: {str(exc)[:160]}")
    if bad_loads:
        return Outcome("silent-wrong", policy, kind, "accepted invalid loads")
    ok = got.num_slots == num_slots and got.num_ranks == num_ranks and got.num_experts == E
    return Outcome("valid" if ok else "silent-wrong", policy, kind, "" if ok else "wrong shape")


def run_cases(n: int, seed: int, *, limit_s: float = 10.0, kinds: tuple[str, ...] = ("map", "trace", "plan"),
              on_case: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """``n`` cases round-robin over readers / formats / the plan path, from ``random.Random(seed)``."""
    rng = random.Random(seed)
    jobs: list[tuple[str, str]] = []
    if "map" in kinds:
        jobs += [("map", f) for f in MAP_FORMATS]
    if "trace" in kinds:
        jobs += [("trace", f) for f in TRACE_FORMATS]
    if "plan" in kinds:
        jobs += [("plan", "plan")]
    out = []
    with tempfile.TemporaryDirectory(prefix="eplb-fuzz-") as d:
        for i in range(n):
            kind, fmt = jobs[i % len(jobs)]
            case_dir = Path(d) / str(i)
            case_dir.mkdir()
            if kind == "map":
                o = map_case(rng, fmt, case_dir, limit_s)
            elif kind == "trace":
                o = trace_case(rng, fmt, case_dir, limit_s)
            else:
                o = plan_case(rng, limit_s)
            o.reader = f"{kind}:{fmt}" if kind != "plan" else "plan"
            out.append(o)
            if on_case is not None:
                on_case(o)
            import shutil

            shutil.rmtree(case_dir, ignore_errors=True)
    return out

