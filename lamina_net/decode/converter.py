"""Automated converter: run an unmodified Hugging Face causal LM with attention offloaded.

Nothing of the model's code is copied or edited. Two documented extension
points of ``transformers`` do the work:

* **Attention interface.** :func:`offload_attention` registers
  :func:`offloaded_attention` in ``transformers.AttentionInterface`` under the
  name ``"lamina_offload"`` and switches ``config._attn_implementation`` to it.
  The model's own attention module still computes the q/k/v projections, the
  RoPE rotation (and q/k norms where a family has them) and the output
  projection; only the ``attention_interface(module, q, k, v, ...)`` call lands
  in our function, which hands q and the new token's k/v to an
  :class:`OffloadTarget` (the model worker's link to the attention workers) and
  returns the attention output it gets back. Because the name is not a known
  mask implementation, ``transformers`` skips building the 4D attention mask;
  the attention workers apply causal, padding and sliding-window masking.

* **Cache interface.** :class:`PassThroughCache` is a ``transformers.Cache``
  that stores nothing: ``update`` returns the new k/v unchanged (so the
  attention function receives exactly the new tokens' k/v to ship) and the
  cache only counts positions so the model computes the right
  ``cache_position``. The real KV cache lives on the attention workers.

The offload target reaches the attention function as an extra keyword argument
of the model's ``forward`` (``lamina_offload_context=...``), which
``transformers`` forwards untouched to the attention interface.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import transformers
from packaging.specifiers import SpecifierSet  # packaging: a dependency of transformers
from packaging.version import Version
from transformers import AttentionInterface, Cache, PreTrainedModel

# The transformers releases the decode tests run on (scripts/test_decode_versions.sh runs
# them on both ends); pyproject's `decode` extra declares the same range (a test checks).
SUPPORTED_TRANSFORMERS = ">=4.57.6,<5.25"
TRANSFORMERS_VERSION = transformers.__version__
_MAJOR = Version(TRANSFORMERS_VERSION).major

ATTN_IMPLEMENTATION = "lamina_offload"
CONTEXT_KWARG = "lamina_offload_context"

# Families whose attention modules follow the AttentionInterface contract and were
# checked token-for-token against the monolithic model (tests/test_decode*.py).
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Attention-interface keyword arguments that change the math in ways the attention
# workers do not implement; a model passing them (non-None) is refused.
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")


class ConversionError(ValueError):
    """The model cannot be run with attention offloaded."""


class OffloadTarget(Protocol):
    """Where the offloaded attention of one micro-batch is computed."""

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               sliding_window: int) -> torch.Tensor:
        """query [B, Hq, T, D], key/value [B, Hkv, T, D] (new tokens) -> output [B, T, Hq, D]."""


@dataclass(frozen=True)
class ModelGeometry:
    """The attention shape of a model: what the split and the wire format need."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def wire_bytes_per_token_per_layer(self) -> int:
        """Bytes on the wire per token per layer: q, k, v out, attention output back.

        Equals Lamina's (2 + 2/G) * e * d when ``num_q_heads * head_dim == hidden_size``.
        """
        return (2 * self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim * self.element_size

    def paper_formula_bytes(self) -> float:
        """Lamina's (2 + 2/G) * e * d."""
        return (2 + 2 / self.group_size) * self.element_size * self.hidden_size


def model_geometry(model: PreTrainedModel) -> ModelGeometry:
    config = model.config
    num_q_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
    return ModelGeometry(config.model_type, config.num_hidden_layers, config.hidden_size, num_q_heads, num_kv_heads,
                         head_dim, model.dtype)


def offloaded_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """The ``"lamina_offload"`` attention implementation (see the module docstring).

    ``key``/``value`` are only the new tokens' (see :class:`PassThroughCache`);
    ``attention_mask`` is ``None`` because masking happens on the workers.
    """
    target: OffloadTarget | None = kwargs.get(CONTEXT_KWARG)
    if target is None:
        raise ConversionError(
            f"attention is offloaded (attn_implementation={ATTN_IMPLEMENTATION!r}) but the forward call did not "
            f"pass {CONTEXT_KWARG}=...; run the model through lamina_net.decode's ModelWorker")
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise ConversionError(f"{type(module).__name__} uses {name!r}, which offloaded attention does not support")
    if dropout:
        raise ConversionError("attention dropout is not supported (decoding runs in eval mode)")
    if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        raise ConversionError("q, k and v must share one head dimension")
    window = kwargs.get("sliding_window") or 0
    scale = module.scaling if scaling is None else scaling
    return target.attend(module.layer_idx, query, key, value, float(scale), int(window)), None


class PassThroughCache(Cache):
    """A ``transformers`` cache that keeps no tensors: the KV cache lives on the attention workers.

    ``update`` returns the new key/value states unchanged, so the attention
    function sees exactly what must be shipped; the cache only tracks how many
    positions (left padding included) have been processed.
    """

    def __init__(self, num_layers: int):
        try:
            super().__init__(layers=[])  # transformers >= 4.56: layered caches
        except TypeError:
            super().__init__()
        self.num_layers = num_layers
        self.seen_tokens = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # 4.x passes ``cache_kwargs`` (positionally or by name), 5.x ``kwargs=``: neither is used here.
        if layer_idx == 0:
            self.seen_tokens += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        # 4.x passes ``cache_position`` (a tensor), 5.x the query length (an int).
        length = query if isinstance(query, int) else query.shape[0]
        return self.seen_tokens + length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # grows without bound (older transformers: None)

    def get_max_length(self, layer_idx: int | None = None):
        return -1 if _MAJOR >= 5 else None  # 5.x: -1 means unbounded

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.num_layers


def transformers_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in :data:`SUPPORTED_TRANSFORMERS`."""
    return SpecifierSet(SUPPORTED_TRANSFORMERS).contains(Version(version or TRANSFORMERS_VERSION), prereleases=True)


def _refuse(reason: str) -> ConversionError:
    return ConversionError(f"{reason} (lamina-net's decode pipeline is tested with transformers "
                           f"{SUPPORTED_TRANSFORMERS}; this is transformers {TRANSFORMERS_VERSION})")


def check_convertible(model: PreTrainedModel, allow_untested: bool = False) -> ModelGeometry:
    """Refuse models the converter cannot run exactly, with a reason that names the supported range."""
    config = model.config
    if not transformers_supported() and not allow_untested:
        raise _refuse("this transformers release is outside the tested range; pass allow_untested=True to try it")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse("encoder-decoder models are not supported; use a decoder-only causal LM")
    if not getattr(model, "_supports_attention_backend", False):
        raise _refuse(f"{type(model).__name__} does not route attention through transformers' AttentionInterface")
    if config.model_type not in TESTED_MODEL_TYPES and not allow_untested:
        raise _refuse(f"model type {config.model_type!r} is not among the tested families {TESTED_MODEL_TYPES}; "
                      f"pass allow_untested=True to try it")
    geometry = model_geometry(model)
    if geometry.num_q_heads % geometry.num_kv_heads:
        raise _refuse(f"{geometry.num_q_heads} query heads is not a multiple of {geometry.num_kv_heads} KV heads")
    return geometry


def offload_attention(model: PreTrainedModel, allow_untested: bool = False) -> ModelGeometry:
    """Switch ``model`` (in place) to offloaded attention; returns its :class:`ModelGeometry`.

    Reversible with :func:`restore_attention`.
    """
    geometry = check_convertible(model, allow_untested)
    AttentionInterface.register(ATTN_IMPLEMENTATION, offloaded_attention)
    _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    model.eval()
    return geometry


def restore_attention(model: PreTrainedModel, implementation: str = "eager") -> None:
    """Give ``model`` back a local attention implementation (e.g. for a monolithic reference run)."""
    _set_attn_implementation(model, implementation)


def _set_attn_implementation(model: PreTrainedModel, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    # Older releases (and sub-configs) read the private field directly.
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        config._attn_implementation = implementation


def cache_kwargs(model: PreTrainedModel, cache: Cache) -> dict:
    """The forward keyword that passes ``cache``: ``cache`` from 5.x on (``past_key_values`` is deprecated), else
    ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in parameters else {"past_key_values": cache}


def forward_kwargs(model: PreTrainedModel) -> dict:
    """Keyword arguments that make the forward compute logits of the last position only, when supported."""
    parameters = inspect.signature(model.forward).parameters
    if "logits_to_keep" in parameters:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in parameters:
        return {"num_logits_to_keep": 1}
    return {}
