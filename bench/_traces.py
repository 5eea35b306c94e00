"""REAL per-workload traces from /work/shared/data (see its SOURCES.md) as ``[T, L, E]`` per-step counts.

* :func:`esft_domains`: DeepSeek-V2-Lite-architecture routing (ESFT-vanilla-lite, 26 MoE layers x 64 experts,
  top-6) in four task domains; a step = ``tokens_per_step`` consecutive tokens of the domain's samples in file order.
* :func:`llama4_subjects`: Llama-4-Maverick (24 layers x 128 experts, top-1) per MMLU subject; decode step ``t`` =
  the ``t``-th decode token of every request of the subject (SOURCES.md's recipe).
* :func:`olmoe_domains`: OLMoE-1B-7B aggregate counts of layers 0 / 7 / 15 (64 experts, top-8) per text domain,
  one "step" each (aggregate only).

Also the top-k ids (:func:`esft_topk`) for co-occurrence. Returns ``{}`` when the data folder is missing.
"""

from __future__ import annotations

import json
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np

DATA = Path("/work/shared/data")
ESFT_LAYERS = 26
ESFT_EXPERTS = 64
ESFT_TOPK = 6


@lru_cache(maxsize=1)
def _esft_raw() -> dict[str, list[np.ndarray]]:
    """domain -> per layer ``[N, 6]`` expert ids of every token (samples concatenated in file order)."""
    path = DATA / "esft-dsv2lite-routing" / "esft_results_expert_scores.tar.gz"
    if not path.exists():
        return {}
    out: dict[str, list[np.ndarray | None]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if not m.isfile() or not parts[-1].startswith("expert_weights_"):
                continue
            dom, layer = parts[-2], int(parts[-1][len("expert_weights_"):-4]) - 1
            f = tf.extractfile(m)
            assert f is not None
            ids = []
            for line in f.read().decode().splitlines():
                if not line.strip():
                    continue
                ids.append(np.array(line.split("\t\t")[0].split("\t"), dtype=np.int64))
            out.setdefault(dom, [None] * ESFT_LAYERS)[layer] = np.concatenate(ids).reshape(-1, ESFT_TOPK)
    return {d: v for d, v in sorted(out.items())}  # type: ignore[misc]


def esft_topk(tokens_per_step: int = 256) -> dict[str, np.ndarray]:
    """domain -> ``[T, n, L, 6]`` top-k ids, ``n = tokens_per_step`` (trailing partial step dropped)."""
    out = {}
    for dom, layers in _esft_raw().items():
        ids = np.stack(layers, axis=1)  # [N, L, 6]
        T = ids.shape[0] // tokens_per_step
        out[dom] = ids[: T * tokens_per_step].reshape(T, tokens_per_step, ESFT_LAYERS, ESFT_TOPK)
    return out


def esft_domains(tokens_per_step: int = 256) -> dict[str, np.ndarray]:
    """domain -> ``[T, 26, 64]`` per-step counts (see the module docstring)."""
    out = {}
    for dom, ids in esft_topk(tokens_per_step).items():
        T = ids.shape[0]
        c = np.zeros((T, ESFT_LAYERS, ESFT_EXPERTS))
        t = np.broadcast_to(np.arange(T)[:, None, None, None], ids.shape)
        la = np.broadcast_to(np.arange(ESFT_LAYERS)[None, None, :, None], ids.shape)
        np.add.at(c, (t.ravel(), la.ravel(), ids.ravel()), 1.0)
        out[dom] = c
    return out


def llama4_subjects() -> dict[str, np.ndarray]:
    """subject -> ``[128, 24, 128]`` decode-step counts."""
    path = DATA / "llama4-maverick-mmlu" / "routes.npz"
    if not path.exists():
        return {}
    z = np.load(path)
    ids, req, pos, pre, subj = z["expert_ids"], z["request"], z["position"], z["prefill"], z["subject"]
    out = {}
    for s in sorted(set(subj.tolist())):
        sel = ~pre & np.isin(req, np.flatnonzero(subj == s))
        first = {}
        for r in np.unique(req[sel]):
            first[int(r)] = int(pos[sel & (req == r)].min())
        step = pos[sel] - np.array([first[int(r)] for r in req[sel]])
        T = int(step.max()) + 1
        c = np.zeros((T, ids.shape[1], 128))
        la = np.broadcast_to(np.arange(ids.shape[1]), (int(sel.sum()), ids.shape[1]))
        np.add.at(c, (np.repeat(step, ids.shape[1]), la.ravel(), ids[sel].astype(np.int64).ravel()), 1.0)
        out[s] = c
    return out


def olmoe_domains() -> dict[str, np.ndarray]:
    """domain -> ``[1, 3, 64]`` aggregate counts (OLMoE-1B-7B, layers 0, 7, 15)."""
    path = DATA / "olmoe-domain-counts" / "expert_counts.json"
    if not path.exists():
        return {}
    d = json.loads(path.read_text())["counts"]
    out = {}
    for k, v in d.items():
        if k.startswith("olmoe/expert_counts/") and not k.endswith("tulu.pkl"):
            dom = k.rsplit("/", 1)[1][:-4]
            c = np.zeros((1, len(v), 64))
            for li, m in enumerate(v):
                for e, n in m.items():
                    c[0, li, int(e)] = n
            out[dom] = c
    return dict(sorted(out.items()))
