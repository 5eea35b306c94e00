"""Expert-load statistics: traces, recordings, importers, reports.

* :class:`Trace` (``trace``): per-step counts ``[T, L, E]`` with metadata; one safetensors file.
* ``store``: chunked per-rank recording directories (:class:`TraceWriter`), :func:`merge` of shards.
* ``importers``: :func:`read_trace` / :func:`write_trace` for eplb, TensorRT-LLM, SGLang, vllm-ascend, npy/csv/json.
* ``recorder``: :class:`eplb.stats.recorder.ExpertRecorder` (torch; imported on demand).
* ``report``: :func:`load_table` / :func:`render` (TensorRT-LLM's statistics); ``plots``: figures.
"""

from eplb.stats.io import read_trace, write_trace
from eplb.stats.report import LoadTable, load_table, render
from eplb.stats.store import TraceWriter, merge
from eplb.stats.trace import Trace, TraceError, parse_range

__all__ = [
    "LoadTable", "Trace", "TraceError", "TraceWriter", "load_table", "merge", "parse_range", "read_trace", "render",
    "write_trace",
]
