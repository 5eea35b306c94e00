"""Trace-reader cases of the fuzz engine (:mod:`eplb._fuzz`): every trace format, mutated, read back
and compared with the exact counts of the mutated file."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from eplb._fuzz.core import (
    Outcome,
    _as3,
    _classify,
    _deep_text,
    _exact_grid,
    _exact_int,
    _trace,
    mutate_array,
    mutate_bytes,
    mutate_tree,
)

__all__ = ["trace_case"]


# ----------------------------------------------------------------------------- trace cases
def trace_case(rng: random.Random, fmt: str, tmp: Path, limit_s: float = 10.0) -> Outcome:
    """One mutated trace of ``fmt`` read with :func:`eplb.stats.io.read_trace`."""
    from eplb.stats.io import read_trace, write_trace

    tr = _trace(rng)
    suffix = {"npy": ".npy", "npz": ".npz", "csv": ".csv", "json": ".json", "eplb": ".safetensors",
              "sglang": ".pt", "vllm-ascend": ".npy"}.get(fmt, "")
    path = tmp / f"trace{suffix}" if fmt != "trtllm" else tmp / "dump"
    want: list[Any] | None
    mutation = "none"
    r = rng.random()
    if fmt in ("json",):
        write_trace(tr, path, fmt)
        doc = json.loads(path.read_bytes())
        if r < 0.85:
            doc, mutation = mutate_tree(doc, rng)
            path.write_bytes(json.dumps(doc).encode() if not mutation.startswith("deep") else _deep_text(doc, ".json"))
        else:
            data, mutation = mutate_bytes(path.read_bytes(), rng)
            path.write_bytes(data)
        want = _json_counts(path)
    elif fmt == "csv":
        write_trace(tr, path, fmt)
        lines = path.read_text().splitlines()
        if r < 0.85 and len(lines) > 1:
            i = rng.randrange(1, len(lines))
            cells = lines[i].split(",")
            j = rng.randrange(len(cells))
            v = rng.choice(("18446744073709551615", "9223372036854775808", "1e19", "9007199254740993", "-1", "1.5",
                            "x", "", "nan", "inf", "3", "1e3", "9" * 400))
            op = rng.choice(("cell", "drop-cell", "extra-cell"))
            if op == "cell":
                cells[j] = v
            elif op == "drop-cell":
                cells.pop(j)
            else:
                cells.append(v)
            lines[i] = ",".join(cells)
            mutation = f"{op}={v[:12]}"
            path.write_text("\n".join(lines) + "\n")
        elif r >= 0.85:
            data, mutation = mutate_bytes(path.read_bytes(), rng)
            path.write_bytes(data)
        want = _csv_counts(path)
    elif fmt in ("npy", "vllm-ascend"):
        arr = tr.counts if fmt == "npy" else tr.counts.reshape(tr.num_steps, tr.num_layers, 1, tr.num_experts)
        if r < 0.85:
            arr, mutation = mutate_array(arr, rng)
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
        if r >= 0.85:
            data, mutation = mutate_bytes(data, rng)
        path.write_bytes(data)
        want = _exact_grid(arr, (2, 3)) if fmt == "npy" and mutation not in ("truncate", "flip", "insert") else \
            _exact_grid(arr.reshape(arr.shape[0], arr.shape[1], -1) if arr.ndim == 4 else arr, (3,)) \
            if mutation not in ("truncate", "flip", "insert") else _npy_counts(path, fmt)
    elif fmt in ("npz", "eplb", "sglang"):
        arr = tr.counts
        if r < 0.85:
            arr, mutation = mutate_array(arr, rng)
        data = _binary_trace(fmt, arr, tr)
        if r >= 0.85:
            data, mutation = mutate_bytes(data, rng)
        path.write_bytes(data)
        want = _exact_grid(arr, (2, 3)) if mutation not in ("truncate", "flip", "insert") else None
        if mutation in ("truncate", "flip", "insert"):
            want = _binary_counts(fmt, path)
    else:  # trtllm dump directory
        write_trace(tr, path, "trtllm", ep_size=2)
        f = path / "rank1.safetensors"
        from safetensors.numpy import load_file, save_file

        d = load_file(str(f))
        key = rng.choice(sorted(d))
        if r < 0.85:
            d[key], mutation = mutate_array(d[key], rng)
            save_file({k: np.ascontiguousarray(v) for k, v in d.items()}, str(f))
        else:
            data, mutation = mutate_bytes(f.read_bytes(), rng)
            f.write_bytes(data)
        want = _trtllm_counts(path)
    emap = "identity" if fmt == "vllm-ascend" else None  # its per-slot loads need a map (identity layout here)
    return _classify(fmt, mutation, path, lambda: read_trace(path, fmt if fmt != "eplb" else None, expert_map=emap),
                     lambda got: _check_counts(got, want), limit_s)


def _check_counts(got: Any, want: list[Any] | None) -> str | None:
    if want is None:
        return "accepted a trace without exact non-negative integer counts"
    w = _as3(want)
    if got.counts.tolist() != w:
        return "counts differ from the file's exact values"
    return None


def _json_counts(path: Path) -> list[Any] | None:
    try:
        obj = json.loads(path.read_bytes())
    except Exception:  # noqa: BLE001
        return None
    if isinstance(obj, dict):
        key = next((k for k in ("counts", "logical_count", "load", "loads") if k in obj), None)
        obj = obj.get(key) if key else None
    return _exact_grid(obj, (2, 3))


def _csv_counts(path: Path) -> list[Any] | None:
    """Exact counts of a CSV trace as the format defines it (optional header naming 'layer' / 'step')."""
    import csv

    try:
        rows = [r for r in csv.reader(path.read_bytes().decode("utf-8").splitlines()) if r and any(c.strip() for c in r)]
    except Exception:  # noqa: BLE001
        return None
    if not rows:
        return None

    def isnum(c: str) -> bool:
        try:
            float(c)
            return True
        except ValueError:
            return False

    if all(isnum(c) for c in rows[0]):
        return _exact_grid([[_exact_csv(c) for c in r] for r in rows], (2,))
    header = [c.strip().lower() for c in rows[0]]
    body = rows[1:]
    if "layer" not in header or not body or any(len(r) != len(header) for r in body):
        return None
    lc = header.index("layer")
    sc = header.index("step") if "step" in header else None
    ecols = [j for j in range(len(header)) if j not in (lc, sc)]
    vals: dict[tuple[int, int], list[int | None]] = {}
    for r in body:
        ly = _exact_csv(r[lc], 2**63 - 1)
        st = _exact_csv(r[sc], 2**63 - 1) if sc is not None else 0
        cs = [_exact_csv(r[j]) for j in ecols]
        if ly is None or st is None or any(c is None for c in cs) or (st, ly) in vals or not cs:
            return None
        vals[(st, ly)] = cs
    steps = sorted({k[0] for k in vals})
    layers = sorted({k[1] for k in vals})
    if len(vals) != len(steps) * len(layers):
        return None
    return [[vals[(st, ly)] for ly in layers] for st in steps]


def _exact_csv(c: str, maximum: int = 2**53) -> int | None:
    c = c.strip()
    try:
        return _exact_int(int(c), 0, maximum)
    except ValueError:
        pass
    try:
        return _exact_int(float(c), 0, maximum)
    except ValueError:
        return None


def _npy_counts(path: Path, fmt: str) -> list[Any] | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001
        return None
    if fmt == "vllm-ascend":
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            return None
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return _exact_grid(arr, (2, 3))


def _binary_trace(fmt: str, arr: np.ndarray, tr: Any) -> bytes:
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, counts=arr, step_ids=tr.step_ids, layer_ids=np.asarray(tr.layer_ids))
        return buf.getvalue()
    if fmt == "eplb":
        from safetensors.numpy import save

        return bytes(save({"counts": np.ascontiguousarray(arr), "step_ids": tr.step_ids},
                          metadata={"eplb.trace": json.dumps(tr.metadata())}))
    import torch

    buf = io.BytesIO()
    t = torch.from_numpy(np.ascontiguousarray(arr)) if arr.dtype != np.uint64 or True else None
    torch.save({"logical_count": t}, buf)
    return buf.getvalue()


def _binary_counts(fmt: str, path: Path) -> list[Any] | None:
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                arr = z["counts"]
        elif fmt == "eplb":
            from safetensors.numpy import load_file

            arr = load_file(str(path))["counts"]
        else:
            import torch

            arr = torch.load(path, map_location="cpu", weights_only=True)["logical_count"]
    except Exception:  # noqa: BLE001
        return None
    return _exact_grid(arr, (2, 3))


def _trtllm_counts(path: Path) -> list[Any] | None:
    from safetensors.numpy import load_file

    tot: dict[tuple[int, int], list[int]] = {}
    try:
        meta = json.loads((path / "meta_info.json").read_bytes())
        E = meta["num_experts"]
        for f in sorted(path.glob("rank*.safetensors")):
            for k, v in load_file(str(f)).items():
                it, ly = (int(x) for x in k.split("_"))
                g = _exact_grid(v, (1,))
                if g is None or len(g) != E:
                    return None
                tot[(it, ly)] = [a + b for a, b in zip(tot.get((it, ly), [0] * E), g, strict=True)]
    except Exception:  # noqa: BLE001
        return None
    if any(max(v) > 2**53 for v in tot.values()):
        return None
    its = sorted({k[0] for k in tot})
    lys = sorted({k[1] for k in tot})
    return [[tot[(i, ly)] for ly in lys] for i in its]


