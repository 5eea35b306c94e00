"""Expert-load statistics: traces, recorders, importers, reports."""

from eplb.stats.trace import Trace, TraceError, parse_range

__all__ = ["Trace", "TraceError", "parse_range"]
