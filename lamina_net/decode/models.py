"""Small random-weight models, prompts and the monolithic reference, for the CLI and tests.

Weights are never downloaded: models are built from a config with random
(seeded) weights, or loaded from a local checkpoint directory.
"""
from __future__ import annotations

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
