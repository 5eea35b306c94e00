"""Helpers for TensorRT-LLM's wide-EP load balancer (the ``EXPERT_STATISTIC_PATH`` flow).

TensorRT-LLM records routed expert ids when ``EXPERT_STATISTIC_PATH`` and
``EXPERT_STATISTIC_ITER_RANGE=start-stop`` are set (``meta_info.json`` + ``rank{R}.safetensors``);
it serves a placement given as ``moe_config.load_balancer: <moe_load_balancer.yaml>`` in the
``--extra_llm_api_options`` YAML. eplb reads the dump (:func:`read_statistics`, also
``eplb report DIR`` / ``eplb plan DIR``) and writes the balancer YAML (``eplb plan ... --output
moe_load_balancer.yaml``); these helpers produce the rest:

* :func:`statistic_env` -- the two environment variables, checked;
* :func:`llm_api_options` / :func:`write_llm_api_options` -- the ``extra_llm_api_options`` YAML that
  points at the balancer file, with ``max_num_tokens`` = ``max_batch_size * ep_size`` when both are
  given (TensorRT-LLM's advice: one chunk for all generation requests, if memory allows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eplb._checks import check_positive_int
from eplb._io import atomic_write
from eplb.errors import InputError
from eplb.stats.trace import Trace, parse_range

__all__ = [
    "ITER_RANGE_ENV",
    "STATISTIC_PATH_ENV",
    "llm_api_options",
    "read_statistics",
    "statistic_env",
    "suggested_max_num_tokens",
    "write_llm_api_options",
]

STATISTIC_PATH_ENV = "EXPERT_STATISTIC_PATH"
ITER_RANGE_ENV = "EXPERT_STATISTIC_ITER_RANGE"


def statistic_env(path: str | os.PathLike[str], iter_range: str) -> dict[str, str]:
    """``{"EXPERT_STATISTIC_PATH": path, "EXPERT_STATISTIC_ITER_RANGE": "a-b"}`` (range checked: ``b > a``)."""
    rng = parse_range(iter_range, "iter_range")
    if rng is None:
        raise InputError("iter_range: expected 'start-stop', e.g. '100-200'")
    return {STATISTIC_PATH_ENV: str(path), ITER_RANGE_ENV: f"{rng[0]}-{rng[1]}"}


def read_statistics(path: str | os.PathLike[str]) -> Trace:
    """A TensorRT-LLM statistics dump directory as a trace (:func:`eplb.stats.importers.read_trtllm`)."""
    from eplb.stats.importers import read_trtllm

    return read_trtllm(path)


def suggested_max_num_tokens(max_batch_size: int, ep_size: int) -> int:
    """``max_batch_size * ep_size``: every generation request in one MoE chunk (e.g. 256 * 36 = 9216)."""
    return check_positive_int(max_batch_size, "max_batch_size") * check_positive_int(ep_size, "ep_size")


def llm_api_options(
    load_balancer: str | os.PathLike[str] | None = None,
    *,
    max_num_tokens: int | None = None,
    max_batch_size: int | None = None,
    ep_size: int | None = None,
    enable_attention_dp: bool = True,
    check: bool = True,
) -> dict[str, Any]:
    """The ``extra_llm_api_options`` dict for wide-EP serving with an eplb placement.

    Args:
        load_balancer: the ``moe_load_balancer.yaml`` path (``None``: no balancer, e.g. for recording).
        max_num_tokens: ``moe_config.max_num_tokens``; default ``max_batch_size * ep_size`` when both
            are given, else left to TensorRT-LLM.
        ep_size: checked against the balancer file when it records one.
        check: read and validate the balancer file (every expert served, equal slots per rank).
    """
    moe: dict[str, Any] = {"backend": "WideEP"}
    if max_num_tokens is None and max_batch_size is not None and ep_size is not None:
        max_num_tokens = suggested_max_num_tokens(max_batch_size, ep_size)
    if max_num_tokens is not None:
        moe["max_num_tokens"] = check_positive_int(max_num_tokens, "max_num_tokens")
    if load_balancer is not None:
        if check:
            from eplb.formats import read_placement

            p = read_placement(load_balancer, "trtllm", ep_size=ep_size)
            if ep_size is not None and p.num_ranks != ep_size:
                raise InputError(f"{load_balancer}: placement is for {p.num_ranks} ranks, expected ep_size={ep_size}")
        moe["load_balancer"] = str(load_balancer)
    return {"enable_attention_dp": bool(enable_attention_dp), "cuda_graph_config": {}, "moe_config": moe}


def write_llm_api_options(path: str | os.PathLike[str], load_balancer: str | os.PathLike[str] | None = None,
                          **kw: Any) -> Path:
    """Write :func:`llm_api_options` as YAML (atomically) and return the path."""
    import yaml

    data = yaml.safe_dump(llm_api_options(load_balancer, **kw), sort_keys=False, default_flow_style=False)
    atomic_write(path, data.encode())
    return Path(path)
