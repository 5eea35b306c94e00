"""Bounded, safe reading of untrusted files: regular files of bounded size, JSON / YAML of bounded depth.

Every function takes the error type to raise (a ``ValueError`` subclass of the caller: a map reader's
:class:`~eplb.formats.MapFormatError`, a trace reader's :class:`~eplb.stats.trace.TraceError`), and every
message starts with the file name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "check_depth", "json_depth", "parse_json", "parse_yaml", "read_bytes"]

PathLike = str | os.PathLike[str]


#: Deepest nesting of lists / mappings any eplb file may have (maps and traces need 4).
MAX_DEPTH = 32
#: Largest file a reader loads into memory (a map of DeepSeek-V3 size is ~100 KB).
MAX_FILE_BYTES = 4 << 30
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def read_bytes(path: PathLike, *, max_bytes: int = MAX_FILE_BYTES, error: type[ValueError] | None = None) -> bytes:
    """The bytes of a regular file; a missing file, a directory, a device / FIFO, a file larger than
    ``max_bytes`` or an empty file is a :class:`MapFormatError` (or ``error``) naming the file."""
    err = error or ValueError
    p = Path(path)
    if not p.exists():
        raise err(f"{p}: no such file")
    if p.is_dir():
        raise err(f"{p}: is a directory, expected a map file")
    if not p.is_file():
        raise err(f"{p}: not a regular file (a device, FIFO or socket)")
    size = p.stat().st_size
    if size > max_bytes:
        raise err(f"{p}: {size} bytes, larger than the {max_bytes}-byte limit")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise err(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise err(f"{p}: larger than the {max_bytes}-byte limit")
    if not data.strip():
        raise err(f"{p}: empty file")
    return data


def json_depth(data: bytes) -> int:
    """Deepest ``[`` / ``{`` nesting of a JSON text (strings skipped), without parsing it."""
    body = _JSON_STRING.sub(b'""', data)
    arr = np.frombuffer(body, dtype=np.uint8)
    step = (arr == ord("[")).astype(np.int32) + (arr == ord("{")) - (arr == ord("]")) - (arr == ord("}"))
    return int(np.cumsum(step).max()) if step.size else 0


def check_depth(obj: Any, path: PathLike, max_depth: int = MAX_DEPTH, error: type[ValueError] | None = None) -> Any:
    """``obj`` if its lists / mappings nest at most ``max_depth`` deep (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, Mapping):
            kids: Any = o.values()
        elif isinstance(o, (list, tuple)):
            kids = o
        else:
            continue
        if d > max_depth:
            raise (error or ValueError)(f"{path}: nested deeper than {max_depth} levels")
        stack.extend((k, d + 1) for k in kids if isinstance(k, (Mapping, list, tuple)))
    return obj


def parse_json(path: PathLike, data: bytes, *, error: type[ValueError] | None = None,
               max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON; a truncated or malformed document names the line and column; nesting is bounded."""
    err = error or ValueError
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise err(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if json_depth(data) > max_depth:
        raise err(f"{path}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text.rstrip())
        what = "truncated JSON" if truncated else "invalid JSON"
        raise err(f"{path}: {what}: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (RecursionError, ValueError) as exc:  # int strings past Python's digit limit, deep nesting
        raise err(f"{path}: invalid JSON: {str(exc).splitlines()[0][:120]}") from None


def parse_yaml(path: PathLike, data: bytes, *, error: type[ValueError] | None = None,
               max_depth: int = MAX_DEPTH) -> Any:
    """Parse YAML (safe loader); errors name the line and column; nesting is bounded."""
    import yaml

    err = error or ValueError
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 10x faster
        obj = yaml.load(data.decode("utf-8"), Loader=loader)  # noqa: S506 (a safe loader)
    except UnicodeDecodeError as exc:
        raise err(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise err(f"{path}: YAML nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:  # constructors of timestamps, big floats, ...
        raise err(f"{path}: invalid YAML value: {str(exc).splitlines()[0][:120]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        end = len(data.rstrip())
        truncated = mark is not None and mark.index >= len(data.decode("utf-8")[:end]) - 1
        what = "truncated YAML" if truncated else "invalid YAML"
        raise err(f"{path}: {what}: {problem}{where}") from None
    try:
        return check_depth(obj, path, max_depth, err)
    except RecursionError:
        raise err(f"{path}: YAML nested deeper than {max_depth} levels") from None


