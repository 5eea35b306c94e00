"""Atomic file writes: a file appears complete or not at all (never half-written).

The one implementation is :mod:`eplb._atomic` (``fsync`` before rename, directory exchange by
``renameat2(RENAME_EXCHANGE)``, stale-sibling cleanup); this module is its public name for eplb's
writers.
"""

from __future__ import annotations

from eplb._atomic import atomic_dir, atomic_write, cleanup_stale, exchange, recover

__all__ = ["atomic_dir", "atomic_write", "cleanup_stale", "exchange", "recover"]
