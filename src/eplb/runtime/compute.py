"""Local expert compute of an EP rank: SwiGLU experts over tokens grouped by local slot.

Shapes (per rank): ``spr`` slots, hidden size ``H``, expert intermediate size ``I``.

* ``w13`` ``[spr, 2*I, H]``: gate rows ``0..I-1`` then up rows ``I..2I-1`` (the layout of
  transformers' ``*Experts.gate_up_proj``);
* ``w2`` ``[spr, H, I]`` (``*Experts.down_proj``);
* ``x`` ``[M, H]`` tokens sorted by local slot, ``counts`` ``[spr]`` tokens per slot.

Output ``y[m] = w2[s] @ (act(w13[s, :I] @ x[m]) * (w13[s, I:] @ x[m]))`` for the slot ``s`` of row ``m``.

Two implementations with identical results (up to floating-point summation order):

* ``"grouped"``: two ``grouped_mm`` calls (``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``);
  on CUDA used for bf16 on compute capability >= 8.0 when the device accepts the shapes (probed once);
* ``"loop"``: one pair of matmuls per non-empty slot (needs the counts on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from eplb.errors import InputError

__all__ = ["ACTIVATIONS", "expert_ffn", "grouped_mm_fn", "resolve_activation", "resolve_impl"]

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Activation] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}

_PROBED: dict[tuple[Any, ...], bool] = {}


def resolve_activation(act: str | Activation | None) -> Activation:
    """``"silu"`` (default), ``"gelu"``, ``"relu"`` or any callable (e.g. transformers' ``ACT2FN[...]``)."""
    if act is None:
        return F.silu
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise InputError(f"activation: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)} or a callable")
        return ACTIVATIONS[act]
    if not callable(act):
        raise InputError(f"activation: expected a name or a callable, got {act!r}")
    return act


def grouped_mm_fn() -> Callable[..., torch.Tensor] | None:
    """``torch.nn.functional.grouped_mm`` (torch >= 2.10) or ``torch._grouped_mm``, or ``None``."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def _probe_grouped(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` runs on this device/dtype/shape (tried once per key, result cached)."""
    fn = grouped_mm_fn()
    if fn is None:
        return False
    dev = w13.device
    if dev.type == "cuda":
        if w13.dtype != torch.bfloat16 or torch.cuda.get_device_capability(dev) < (8, 0):
            return False
    key = (dev.type, dev.index, w13.dtype, tuple(w13.shape[1:]), tuple(w2.shape[1:]))
    if key not in _PROBED:
        try:
            n = min(2, w13.shape[0])
            x = torch.zeros(n, w13.shape[2], dtype=w13.dtype, device=dev)
            offs = torch.arange(1, n + 1, dtype=torch.int32, device=dev)
            h = fn(x, w13[:n].transpose(1, 2), offs=offs)
            a = h[:, : w2.shape[2]].contiguous()
            fn(a, w2[:n].transpose(1, 2), offs=offs)
            _PROBED[key] = True
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            _PROBED[key] = False
    return _PROBED[key]


def resolve_impl(impl: str, w13: torch.Tensor, w2: torch.Tensor) -> str:
    """Map ``"auto"`` to ``"grouped"`` where supported (see module doc), else ``"loop"``; validate names."""
    if impl not in ("auto", "grouped", "loop"):
        raise InputError(f"compute: expected 'auto', 'grouped' or 'loop', got {impl!r}")
    if impl == "loop":
        return "loop"
    ok = _probe_grouped(w13, w2)
    if impl == "grouped" and not ok:
        raise InputError(
            f"compute: grouped_mm is not available for dtype {w13.dtype} on device {w13.device} "
            f"(torch {torch.__version__}); use compute='loop' or 'auto'"
        )
    return "grouped" if ok else "loop"


def expert_ffn(
    x: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    act: Activation = F.silu,
    impl: str = "loop",
    counts_host: Sequence[int] | None = None,
) -> torch.Tensor:
    """SwiGLU experts on tokens sorted by slot.

    Args:
        x: ``[M, H]`` tokens grouped by local slot (slot 0's rows first).
        counts: ``[spr]`` int tokens per slot on ``x``'s device (sums to ``M``).
        w13: ``[spr, 2I, H]``; w2: ``[spr, H, I]``.
        act: activation on the gate half.
        impl: ``"grouped"`` or ``"loop"`` (use :func:`resolve_impl` for ``"auto"``).
        counts_host: the counts as a host list (the loop uses it; read from ``counts`` otherwise, one sync).

    Returns:
        ``[M, H]`` in the weights' dtype.
    """
    M = x.shape[0]
    H = w2.shape[1]
    inter = w2.shape[2]
    xw = x.to(w13.dtype)
    if M == 0:
        return xw.new_zeros(0, H)
    if impl == "grouped":
        fn = grouped_mm_fn()
        assert fn is not None
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = fn(xw, w13.transpose(1, 2), offs=offs)  # [M, 2I]
        a = act(h[:, :inter]) * h[:, inter:]
        return fn(a.contiguous(), w2.transpose(1, 2), offs=offs)  # [M, H]
    if impl != "loop":
        raise InputError(f"impl: expected 'grouped' or 'loop', got {impl!r}")
    host = list(counts_host) if counts_host is not None else [int(c) for c in counts.tolist()]
    out = xw.new_empty(M, H)
    start = 0
    for s, c in enumerate(host):
        if c == 0:
            continue
        xs = xw[start : start + c]
        h = xs @ w13[s].t()
        out[start : start + c] = (act(h[:, :inter]) * h[:, inter:]) @ w2[s].t()
        start += c
    return out
