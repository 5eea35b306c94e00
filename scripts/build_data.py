"""Build the small derived traces that the package ships (src/eplb/data/) from ../shared/data.

Run once by a maintainer: python scripts/build_data.py [SHARED_DATA_DIR]
Every output is derived losslessly from public measurements (see src/eplb/data/SOURCES.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from eplb.stats.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "eplb" / "data"


def llama4(shared: Path) -> None:
    d = np.load(shared / "llama4-maverick-mmlu" / "routes.npz")
    ids, req, pos, pre = d["expert_ids"].astype(np.int64), d["request"], d["position"], d["prefill"]
    layers = tuple(int(x) for x in d["moe_layers"])
    R = int(req.max()) + 1
    # decode step t = t-th decode token of every request (all requests decode together)
    dec = ~pre
    first_dec = np.full(R, np.iinfo(np.int64).max)
    np.minimum.at(first_dec, req[dec], pos[dec])
    t = pos[dec] - first_dec[req[dec]]
    T = int(t.max()) + 1
    counts = np.zeros((T, ids.shape[1], 128), dtype=np.int64)
    for layer in range(ids.shape[1]):
        np.add.at(counts[:, layer], (t, ids[dec, layer]), 1)
    src = ("Llama-4-Maverick-17B-128E-Instruct routing on 235 MMLU requests (Yu et al., arXiv:2510.05497, "
           "dataset core12345/MoE_expert_selection_trace); decode step t = t-th decode token of every request")
    Trace(counts, layers, None, 1, "meta-llama/Llama-4-Maverick-17B-128E-Instruct", src, 0,
          {"phase": "decode", "requests": R}).save(OUT / "llama4_maverick_mmlu_decode.safetensors")
    # prefill: one step per request (its whole prompt)
    pc = np.zeros((R, ids.shape[1], 128), dtype=np.int64)
    for layer in range(ids.shape[1]):
        np.add.at(pc[:, layer], (req[pre], ids[pre, layer]), 1)
    Trace(pc, layers, None, 1, "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
          src.replace("decode step t = t-th decode token of every request", "one step per request's prefill"), 0,
          {"phase": "prefill", "requests": R}).save(OUT / "llama4_maverick_mmlu_prefill.safetensors")


def qwen3(shared: Path) -> None:
    for name, model in (("counts30b.json", "Qwen/Qwen3-30B-A3B"), ("counts235b.json", "Qwen/Qwen3-235B-A22B-FP8")):
        d = json.loads((shared / "qwen3-sglang-counts" / name).read_text())
        counts = np.asarray(d["counts"], dtype=np.int64)[None]
        Trace(counts, (), None, 8, model, "SGLang expert-distribution recorder (stat mode, summed), 8,192 theorem-prover "
              "prompts, prefill; public repository sjqsjq/EPLB OEPLB/repro", 8, {"aggregate": True}).save(
            OUT / f"qwen3_{name.replace('counts', '').replace('.json', '')}_sglang.safetensors")


if __name__ == "__main__":
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
    OUT.mkdir(parents=True, exist_ok=True)
    llama4(shared)
    qwen3(shared)
    print(sorted(p.name for p in OUT.glob("*.safetensors")))
