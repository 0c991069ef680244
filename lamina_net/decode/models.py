"""Small random-weight models, prompts and the monolithic reference, for the CLI and tests.

Weights are never downloaded: models are built from a config with random
(seeded) weights, or loaded from a local checkpoint directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, vocab_size: int = 256, **overrides):
    """A ``transformers`` config of ``family`` with the given shape (head_dim = hidden / heads)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (expected one of {', '.join(FAMILIES)})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
    settings = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                    num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    head_dim=hidden_size // num_heads, vocab_size=vocab_size, max_position_embeddings=4096,
                    tie_word_embeddings=False, pad_token_id=0)
    settings.update(overrides)
    return AutoConfig.for_model(family, **settings)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """A model with seeded random weights and eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(device=device, dtype=dtype).eval()


def random_prompts(batch: int, prompt_len: int, vocab_size: int, ragged: bool = False, seed: int = 1,
                   pad_id: int = 0):
    """Random prompts ``[batch, prompt_len]`` and their attention mask.

    With ``ragged`` the lengths differ (row 0 is full, the others shorter) and
    prompts are left-padded with ``pad_id``, as batched generation expects.
    """
    generator = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)  # keep clear of the usual special ids of tiny configs
    input_ids = torch.randint(low, vocab_size, (batch, prompt_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if ragged:
        lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch,), generator=generator)
        lengths[0] = prompt_len
        for row, length in enumerate(lengths.tolist()):
            attention_mask[row, :prompt_len - length] = 0
        input_ids[attention_mask == 0] = pad_id
    return input_ids, attention_mask


def reference_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The monolithic model's greedy ``generate`` with eager attention; returns the new tokens only."""
    from .converter import restore_attention
    from .model_worker import pad_token_id

    restore_attention(model, "eager")
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                do_sample=False, num_beams=1, pad_token_id=pad_token_id(model))
    return output[:, input_ids.shape[1]:]


@dataclass
class MonolithicTiming:
    """One timed greedy ``generate`` of the unsplit model (eager attention, no network)."""

    tokens: torch.Tensor  # [batch, new tokens]
    wall_seconds: float
    prefill_seconds: float  # until the first new token
    num_layers: int
    token_intervals: list[float] = field(default_factory=list)  # seconds between successive decode tokens

    @property
    def generated_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        decode = self.wall_seconds - self.prefill_seconds
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1) / decode if decode > 0 else 0.0

    @property
    def compute_per_layer(self) -> float:
        """A decode step's time over its layers (embedding and LM head included)."""
        steps = len(self.token_intervals)
        return sum(self.token_intervals) / (steps * self.num_layers) if steps else 0.0


def timed_reference_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             new_tokens: int) -> MonolithicTiming:
    """:func:`reference_generate` with per-token timestamps (a ``generate`` streamer)."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):  # the first call carries the prompt, each later one a step's tokens
            self.times.append(time.perf_counter())

        def end(self):
            pass

    from .converter import restore_attention
    from .model_worker import pad_token_id

    restore_attention(model, "eager")
    stamps = Stamps()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                do_sample=False, num_beams=1, pad_token_id=pad_token_id(model), streamer=stamps)
    wall = time.perf_counter() - started
    token_times = stamps.times[1:]
    intervals = [b - a for a, b in zip(token_times, token_times[1:])]
    prefill = (token_times[0] - started) if token_times else wall
    return MonolithicTiming(output[:, input_ids.shape[1]:], wall, prefill, model.config.num_hidden_layers, intervals)
