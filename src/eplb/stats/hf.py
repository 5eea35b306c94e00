"""Record a HF ``transformers`` MoE model over prompts (``eplb record``).

* :func:`build_model` (the one model builder, also used by :mod:`eplb.runtime`): a preset name (tiny
  random model of a family; :data:`PRESETS` for recording, :data:`TINY_CONFIGS` for the runtime), a
  ``config.json`` file, or a local model directory (its weights when present, else random weights from
  its config), or an explicit ``checkpoint``.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from eplb.errors import InputError
from eplb.stats.recorder import ExpertRecorder, attach, detach
from eplb.stats.trace import Trace

__all__ = ["PRESETS", "TINY_CONFIGS", "build_model", "load_config", "read_prompts", "record_model", "tokenize"]

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

_SMALL = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "hidden_act": "silu"}

#: tiny configs of every supported MoE architecture (8 experts, top-2), for tests and CPU runs
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-mixtral": {"model_type": "mixtral", **_SMALL, "intermediate_size": 16, "num_local_experts": 8,
                     "num_experts_per_tok": 2},
    "tiny-qwen2-moe": {"model_type": "qwen2_moe", **_SMALL, "intermediate_size": 32, "moe_intermediate_size": 16,
                       "shared_expert_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
                       "norm_topk_prob": True},
    "tiny-qwen3-moe": {"model_type": "qwen3_moe", **_SMALL, "intermediate_size": 32, "moe_intermediate_size": 16,
                       "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True},
    "tiny-deepseek-v2": {"model_type": "deepseek_v2", **_SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4,
                         "intermediate_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 8,
                         "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                         "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                         "v_head_dim": 8, "head_dim": 8, "topk_method": "greedy"},
    "tiny-deepseek-v3": {"model_type": "deepseek_v3", **_SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4,
                         "intermediate_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 8,
                         "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                         "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                         "v_head_dim": 8, "head_dim": 8, "n_group": 2, "topk_group": 1},
    "tiny-olmoe": {"model_type": "olmoe", **_SMALL, "intermediate_size": 16, "num_experts": 8,
                   "num_experts_per_tok": 2, "eos_token_id": 2, "pad_token_id": 1},
}
#: a shrunk DeepSeek-V3 with FP8 experts (128x128 blocks: hidden and expert intermediate size 128)
TINY_CONFIGS["tiny-deepseek-v3-fp8"] = {
    **TINY_CONFIGS["tiny-deepseek-v3"], "hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}}

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


def load_config(spec: str | os.PathLike[str] | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Any:
    """A transformers config from a :data:`PRESETS` / :data:`TINY_CONFIGS` name, a ``config.json`` file, a model
    (checkpoint) directory, or a dict with ``model_type``; ``overrides`` set attributes (e.g. ``num_hidden_layers``)."""
    from transformers import AutoConfig

    source = "model"
    if isinstance(spec, Mapping):
        d = dict(spec)
    elif str(spec) in PRESETS or str(spec) in TINY_CONFIGS:
        d = dict(PRESETS.get(str(spec)) or TINY_CONFIGS[str(spec)])
    else:
        p = Path(spec)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise InputError(f"{p}: no config.json in the model directory")
            p = p / "config.json"
        if not p.is_file():
            raise InputError(f"model: {str(spec)!r} is neither a preset ({', '.join(PRESETS)}), a built-in config "
                             f"({', '.join(TINY_CONFIGS)}), a config file nor a model directory")
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: not a JSON config ({exc})") from None
        source = str(p)
    d = {**d, **(overrides or {})}
    mt = d.pop("model_type", None)
    if not mt:
        raise InputError(f"{source}: config has no 'model_type'")
    try:
        return AutoConfig.for_model(mt, **d)
    except (KeyError, ValueError) as exc:
        raise InputError(f"{source}: cannot build a config of model_type {mt!r} ({exc})") from None


def build_model(spec: str | os.PathLike[str] | Mapping[str, Any] | None, *,
                checkpoint: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None,
                shrink: bool | None = None, random_weights: bool = False, seed: int = 0,
                dtype: torch.dtype | None = None, device: Any = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer or None, description)``, in eval mode, the one model builder (``eplb record``,
    ``eplb serve-bench``, :mod:`eplb.runtime`).

    ``spec``: a :data:`PRESETS` / :data:`TINY_CONFIGS` name, a config dict, a ``config.json`` file or a
    model directory (:func:`load_config`). Weights come from ``checkpoint`` (a local directory,
    ``from_pretrained``, local files only), else from ``spec`` when it is a directory holding weights
    (unless ``random_weights``), else random (seeded; SYNTHETIC). ``shrink`` (default: True for random
    weights of a file/directory config) shrinks hidden sizes and drops the config's quantization
    (a shrunk model no longer fits its blocks). ``dtype`` / ``device`` apply to the built model.
    """
    from transformers import AutoModelForCausalLM

    p = None if spec is None or isinstance(spec, Mapping) else Path(spec)
    table = p is not None and (str(spec) in PRESETS or str(spec) in TINY_CONFIGS)
    weights: Path | None = Path(checkpoint) if checkpoint is not None else None
    if weights is not None and not weights.is_dir():
        raise InputError(f"checkpoint: {weights} is not a directory")
    if weights is None and p is not None and not table and p.is_dir() and not random_weights \
            and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        weights = p
    cfg = load_config(spec if spec is not None else weights, overrides)  # type: ignore[arg-type]
    if weights is not None:
        desc = f"checkpoint {weights}"
    elif table:
        desc = f"preset {spec} (tiny, random weights: SYNTHETIC)"
    elif p is None:
        desc = "config dict (random weights: SYNTHETIC)"
    else:
        desc = f"config {p / 'config.json' if p.is_dir() else p} (random weights: SYNTHETIC)"
    if shrink is None:
        shrink = weights is None and p is not None and not table
    if shrink and weights is None:
        if getattr(cfg, "quantization_config", None) is not None:
            cfg.quantization_config = None  # e.g. DeepSeek-V3's fp8 blocks: a shrunk random model is not quantized
            del cfg.quantization_config
        _shrink(cfg)
        desc += ", shrunk"
    kw = {} if dtype is None else {"dtype": dtype}
    torch.manual_seed(seed)
    if weights is not None:
        model = AutoModelForCausalLM.from_pretrained(str(weights), config=cfg, local_files_only=True, **kw)
    else:
        model = AutoModelForCausalLM.from_config(cfg, **kw)
    tok = None
    tok_dir = weights if weights is not None else (p if p is not None and not table and p.is_dir() else None)
    if tok_dir is not None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception:
            tok = None
    if device is not None:
        model = model.to(device)
    return model.eval(), tok, desc


def read_prompts(path: str | os.PathLike[str], limit: int | None = None) -> list[str | list[int]]:
    """Prompts of a text (one per line) or JSON/JSONL file; items are strings or token id lists."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"dataset: {p}: no such file")
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
                        raise InputError(f"dataset: {p}: line {i}: not JSON ({exc})") from None
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
                    raise InputError(f"dataset: {p}: item {i}: no 'prompt'/'text'/'input'/'input_ids' field")
                out.append(str(it[key]))
        else:
            raise InputError(f"dataset: {p}: item {i}: expected a string or an object, got {type(it).__name__}")
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"dataset: {p}: no prompts")
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
        raise InputError("batch_size/max_tokens must be positive and decode_steps non-negative")
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
