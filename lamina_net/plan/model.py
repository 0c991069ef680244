"""Transformer shapes the planner needs, from a preset or a Hugging Face config.json.

Only dense, decoder-only, LLaMA-style models are modelled: per layer a q/k/v/o
attention block with grouped-query attention and a gated (SwiGLU) FFN with
three ``hidden x intermediate`` matrices.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import PlanError

# Bytes per element for the ``torch_dtype`` strings found in config.json files.
DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1,
}

# Shapes in Hugging Face config.json form, so presets and files share one parser.
# LLaMA-33B/65B are the original LLaMA; LLaMA3-70B is Meta-Llama-3-70B.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama-33b": {
        "hidden_size": 6656, "num_hidden_layers": 60, "num_attention_heads": 52,
        "num_key_value_heads": 52, "intermediate_size": 17920, "vocab_size": 32000,
        "torch_dtype": "float16",
    },
    "llama-65b": {
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 64, "intermediate_size": 22016, "vocab_size": 32000,
        "torch_dtype": "float16",
    },
    "llama3-70b": {
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
        "torch_dtype": "bfloat16",
    },
}

_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a dense decoder-only transformer (sizes in elements)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int
    head_dim: int
    tie_word_embeddings: bool = False

    @property
    def group_size(self) -> int:
        """GQA group size G: query heads per key/value head (1 = plain multi-head)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def matmul_params_per_layer(self) -> int:
        """Weights multiplied by every token in one layer: q, k, v, o and the gated FFN."""
        d = self.hidden_size
        attention = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        ffn = 3 * d * self.intermediate_size
        return attention + ffn

    @property
    def matmul_params(self) -> int:
        """Weights read and multiplied per decode iteration: all layers plus the LM head.

        The embedding table is a lookup (B rows), so it costs neither FLOPs nor
        a full read.
        """
        return self.num_layers * self.matmul_params_per_layer + self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        """All parameters held in memory, embeddings and RMSNorm weights included."""
        d = self.hidden_size
        norms = self.num_layers * 2 * d + d
        embedding = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.matmul_params + embedding + norms

    @property
    def weight_bytes(self) -> int:
        return self.parameters * self.dtype_bytes

    @property
    def flops_per_token(self) -> int:
        """Non-attention FLOPs to decode one token (2 per multiply-accumulate)."""
        return 2 * self.matmul_params

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Key plus value cache of one token in one layer."""
        return 2 * self.kv_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_per_layer

    @property
    def network_bytes_per_token_per_layer(self) -> int:
        """Bytes crossing the compute/attention link per token and layer.

        q, k and v go to the attention side and the attention output (as wide
        as q) comes back: (2 + 2/G) * e * d when q_dim == hidden_size.
        """
        return (2 * self.q_dim + 2 * self.kv_dim) * self.dtype_bytes

    def attention_flops_per_token_per_layer(self, context: int) -> int:
        """q.K^T and p.V over ``context`` cached tokens, 2 FLOPs per multiply-accumulate."""
        return 4 * context * self.q_dim


def _positive_int(config: Mapping[str, Any], key: str, source: str) -> int:
    value = config[key]
    # bool is an int subclass; a JSON true is never a valid size.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    return value


def model_from_config(config: Mapping[str, Any], name: str, dtype: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face style config mapping.

    ``dtype`` overrides the config's ``torch_dtype``; a config without either
    is taken as 16-bit.
    """
    if not isinstance(config, Mapping):
        raise PlanError(f"{name}: a model config must be a JSON object")
    if any(key in config for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise PlanError(f"{name}: mixture-of-experts models are not supported (dense models only)")
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise PlanError(f"{name}: config is missing {', '.join(missing)}")
    hidden = _positive_int(config, "hidden_size", name)
    heads = _positive_int(config, "num_attention_heads", name)
    kv_heads = (_positive_int(config, "num_key_value_heads", name)
                if config.get("num_key_value_heads") is not None else heads)
    if heads % kv_heads:
        raise PlanError(f"{name}: num_attention_heads ({heads}) is not a multiple of "
                        f"num_key_value_heads ({kv_heads})")
    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim", name)
    elif hidden % heads:
        raise PlanError(f"{name}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    else:
        head_dim = hidden // heads
    dtype_name = dtype or config.get("torch_dtype") or "float16"
    dtype_key = str(dtype_name).lower().removeprefix("torch.")
    if dtype_key not in DTYPE_BYTES:
        raise PlanError(f"{name}: unknown dtype {dtype_name!r} (known: {', '.join(sorted(DTYPE_BYTES))})")
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        num_layers=_positive_int(config, "num_hidden_layers", name),
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=_positive_int(config, "intermediate_size", name),
        vocab_size=_positive_int(config, "vocab_size", name),
        dtype_bytes=DTYPE_BYTES[dtype_key],
        head_dim=head_dim,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def load_model(name_or_path: str, dtype: str | None = None) -> ModelSpec:
    """Resolve ``--model``: a preset name (case-insensitive) or a path to config.json.

    A directory is accepted too and its ``config.json`` is read.
    """
    preset = MODEL_PRESETS.get(name_or_path.lower())
    if preset is not None:
        return model_from_config(preset, name_or_path.lower(), dtype)
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise PlanError(f"unknown model {name_or_path!r}: not a preset "
                        f"({', '.join(MODEL_PRESETS)}) nor a config.json file")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read model config {path}: {exc}") from exc
    return model_from_config(config, path, dtype)
