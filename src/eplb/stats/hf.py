"""Record a HF ``transformers`` MoE model over prompts (``eplb record``).

* :func:`build_model`: a preset name (tiny random model of a family), a ``config.json`` file, or a
  local model directory (its weights when present, else random weights from its config).
  Random-weight models are shrunk by default (hidden sizes, heads) keeping the number of layers,
  experts and top-k, so the trace has the real model's shape and runs on CPU.
* :func:`read_prompts`: a text file (one prompt per line) or JSON/JSONL (strings, or objects with
  ``prompt``/``text``/``input``/``question``/``content``, or ``input_ids``).
* :func:`record_model`: prefill step per batch (every prompt forwarded alone: no padding tokens are
  counted), then ``decode_steps`` greedy decode steps (step ``t`` = the ``t``-th new token of every
  prompt of the batch).

Tokenisation uses the model directory's tokenizer when one is there, else UTF-8 bytes (ids
``byte % vocab_size``) -- no network access is ever needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from eplb.stats.recorder import ExpertRecorder, attach, detach
from eplb.stats.trace import Trace

__all__ = ["PRESETS", "build_model", "read_prompts", "record_model", "tokenize"]

_COMMON = {"vocab_size": 512, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 4096}
#: tiny random-weight model presets (family -> config kwargs); SYNTHETIC weights.
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral": {"model_type": "mixtral", **_COMMON, "intermediate_size": 64, "num_hidden_layers": 4,
                "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2-moe": {"model_type": "qwen2_moe", **_COMMON, "intermediate_size": 64, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "num_hidden_layers": 4, "num_experts": 16,
                  "num_experts_per_tok": 4},
    "qwen3-moe": {"model_type": "qwen3_moe", **_COMMON, "intermediate_size": 64, "moe_intermediate_size": 32,
                  "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4, "head_dim": 16},
    "deepseek-v2": {"model_type": "deepseek_v2", **_COMMON, "num_key_value_heads": 4, "intermediate_size": 64,
                    "moe_intermediate_size": 32, "num_hidden_layers": 4, "first_k_dense_replace": 1,
                    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "kv_lora_rank": 32,
                    "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16},
    "deepseek-v3": {"model_type": "deepseek_v3", **_COMMON, "num_key_value_heads": 4, "intermediate_size": 64,
                    "moe_intermediate_size": 32, "num_hidden_layers": 4, "first_k_dense_replace": 1,
                    "n_routed_experts": 32, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
                    "n_shared_experts": 1, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16},
    "olmoe": {"model_type": "olmoe", **_COMMON, "num_key_value_heads": 4, "intermediate_size": 32,
              "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4},
}

# sizes shrunk for random-weight runs of a full config (layers, experts, top-k are kept)
_SHRINK = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32,
           "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "vocab_size": 512}


def _shrink(cfg: Any) -> None:
    """Shrink the sizes of ``cfg`` in place (:data:`_SHRINK`), keeping the relations the model code
    relies on: multi-head latent attention (DeepSeek-V2/V3) has as many key/value heads as query
    heads and rotary embeddings of ``head_dim = qk_rope_head_dim``."""
    same_kv = getattr(cfg, "num_key_value_heads", None) == getattr(cfg, "num_attention_heads", None)
    for k, v in _SHRINK.items():
        if hasattr(cfg, k) and getattr(cfg, k) is not None:
            setattr(cfg, k, v)
    if same_kv and getattr(cfg, "num_attention_heads", None) is not None:
        cfg.num_key_value_heads = cfg.num_attention_heads
    if getattr(cfg, "qk_rope_head_dim", None) is not None:  # MLA: rotary part of each head
        cfg.head_dim = cfg.qk_rope_head_dim
        if hasattr(cfg, "qk_head_dim"):
            cfg.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim


def _config_from_dict(d: dict[str, Any], source: str) -> Any:
    from transformers import AutoConfig

    d = dict(d)
    mt = d.pop("model_type", None)
    if not mt:
        raise ValueError(f"{source}: config has no 'model_type'")
    try:
        return AutoConfig.for_model(mt, **d)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{source}: unknown model_type {mt!r} ({exc})") from None


def build_model(spec: str, *, shrink: bool | None = None, seed: int = 0, random_weights: bool = False,
                overrides: dict[str, Any] | None = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer or None, description)`` for ``spec`` (preset, config file or model dir).

    ``shrink`` (default: True for random weights of a file/dir config) shrinks hidden sizes.
    """
    from transformers import AutoModelForCausalLM

    tok = None
    p = Path(spec)
    load_weights = False
    if spec in PRESETS:
        cfg = _config_from_dict({**PRESETS[spec], **(overrides or {})}, spec)
        desc = f"preset {spec} (tiny, random weights: SYNTHETIC)"
        shrink = False if shrink is None else shrink
    elif p.is_file():
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not a JSON config ({exc})") from None
        cfg = _config_from_dict({**d, **(overrides or {})}, str(p))
        desc = f"config {p} (random weights: SYNTHETIC)"
    elif p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p}: no config.json in the model directory")
        d = json.loads((p / "config.json").read_text())
        cfg = _config_from_dict({**d, **(overrides or {})}, str(p / "config.json"))
        has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
        load_weights = has_weights and not random_weights
        desc = f"checkpoint {p}" if load_weights else f"config {p / 'config.json'} (random weights: SYNTHETIC)"
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception:
            tok = None
    else:
        raise ValueError(f"model: {spec!r} is neither a preset ({', '.join(PRESETS)}), a config file nor a model directory")
    if shrink is None:
        shrink = not load_weights
    if not load_weights and getattr(cfg, "quantization_config", None) is not None:
        cfg.quantization_config = None  # e.g. DeepSeek-V3's fp8 block quantization: random weights are not quantized
        del cfg.quantization_config
    if shrink and not load_weights:
        _shrink(cfg)
        desc += ", shrunk"
    torch.manual_seed(seed)
    if load_weights:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval(), tok, desc


def read_prompts(path: str | os.PathLike[str], limit: int | None = None) -> list[str | list[int]]:
    """Prompts of a text (one per line) or JSON/JSONL file; items are strings or token id lists."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"dataset: {p}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    items: list[Any]
    if p.suffix.lower() in (".jsonl", ".json"):
        try:
            obj = json.loads(text)
            items = obj if isinstance(obj, list) else [obj]
        except json.JSONDecodeError:
            items = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"dataset: {p}: line {i}: not JSON ({exc})") from None
    else:
        items = [ln for ln in text.splitlines() if ln.strip()]
    out: list[str | list[int]] = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, dict):
            if "input_ids" in it:
                out.append([int(v) for v in it["input_ids"]])
            else:
                key = next((k for k in ("prompt", "text", "input", "question", "content") if k in it), None)
                if key is None:
                    raise ValueError(f"dataset: {p}: item {i}: no 'prompt'/'text'/'input'/'input_ids' field")
                out.append(str(it[key]))
        else:
            raise ValueError(f"dataset: {p}: item {i}: expected a string or an object, got {type(it).__name__}")
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"dataset: {p}: no prompts")
    return out


def tokenize(prompt: str | list[int], tokenizer: Any, vocab_size: int, max_tokens: int) -> list[int]:
    """Token ids of ``prompt`` (tokenizer, else UTF-8 bytes modulo the vocabulary), at most ``max_tokens``."""
    if isinstance(prompt, list):
        ids = [i % vocab_size for i in prompt]
    elif tokenizer is not None:
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        ids = [b % vocab_size for b in prompt.encode("utf-8")]
    ids = ids[:max_tokens]
    return ids or [0]


def _cache_of(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def record_model(
    model: Any,
    prompts: Sequence[str | list[int]],
    *,
    tokenizer: Any = None,
    batch_size: int = 4,
    max_tokens: int = 128,
    decode_steps: int = 0,
    recorder: ExpertRecorder | None = None,
    progress: Callable[[int], None] | None = None,
    **recorder_kwargs: Any,
) -> Trace | None:
    """Run ``model`` over ``prompts`` and record expert loads; return the trace (None if written to files).

    Steps: one prefill step per batch of ``batch_size`` prompts, then ``decode_steps`` decode steps.
    """
    if batch_size <= 0 or max_tokens <= 0 or decode_steps < 0:
        raise ValueError("batch_size/max_tokens must be positive and decode_steps non-negative")
    vocab = int(model.config.vocab_size)
    rec = attach(model, recorder, auto_step=False, **recorder_kwargs)
    dev = next(model.parameters()).device
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        with torch.no_grad():
            for b in range(0, len(prompts), batch_size):
                if rec.finished:
                    break
                batch = [torch.tensor([tokenize(p, tokenizer, vocab, max_tokens)], device=dev)
                         for p in prompts[b:b + batch_size]]
                caches: list[Any] = []
                nxt: list[torch.Tensor] = []
                for ids in batch:
                    out = model(input_ids=ids, use_cache=decode_steps > 0)
                    if decode_steps:
                        caches.append(_cache_of(out))
                        nxt.append(out.logits[:, -1:].argmax(-1))
                rec.step()
                for _ in range(decode_steps):
                    if rec.finished:
                        break
                    for i in range(len(batch)):
                        out = model(input_ids=nxt[i], use_cache=True, **{cache_kw: caches[i]})
                        caches[i] = _cache_of(out)
                        nxt[i] = out.logits[:, -1:].argmax(-1)
                    rec.step()
                if progress is not None:
                    progress(len(batch))
    finally:
        detach(rec)
    if rec.path is not None:
        rec.close()
        return None
    tr = rec.trace()
    rec.close()
    return tr
