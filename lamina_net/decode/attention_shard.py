"""What an attention worker computes: a head shard of the KV cache and attention over it.

Transport-free, so it can be unit-tested and run in-process (loopback).
:class:`AttentionServer` turns protocol messages (see :mod:`.protocol`) into
replies; the attention-worker process only moves bytes in and out of it.
"""
from __future__ import annotations

import time

import torch

from .protocol import (DTYPE_NAMES, FLAG_HAS_MASK, FLAG_RESET, HEADER_BYTES, HEADER_FIELDS, TRAILER_BYTES, Kind,
                       ProtocolError, bits_float)


def torch_dtype(code: int) -> torch.dtype:
    try:
        return getattr(torch, DTYPE_NAMES[code])
    except KeyError:
        raise ProtocolError(f"unknown dtype code {code}") from None


class MicroBatchKVCache:
    """KV cache of one micro-batch for this worker's heads, all layers.

    Positions are cache slots (left padding included), as in Hugging Face's
    ``cache_position``; ``valid`` marks which slots hold real tokens.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.length = 0  # slots filled once the current step's layers have all been appended
        self.step_start = 0
        self.step_len = 0
        self.step_is_prefill = True
        self.steps = 0  # forward steps begun (the prefill is step 0)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor] = {}  # additive mask of the current step, per sliding window

    def begin_step(self, q_len: int, new_valid: torch.Tensor | None) -> None:
        """Open a forward step of ``q_len`` new tokens (``new_valid``: [batch, q_len] bool)."""
        self.step_is_prefill = self.length == 0
        self.steps += 1
        self.step_start, self.step_len = self.length, q_len
        self.length += q_len
        self._reserve(self.length)
        if new_valid is None:
            self.valid[:, self.step_start:self.length] = True
        else:
            self.valid[:, self.step_start:self.length] = new_valid.to(self.device)
        self._masks.clear()

    def _reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        new_capacity = max(slots, 2 * self.capacity, 16)  # doubling: amortised O(1) appends
        valid = torch.zeros(self.batch, new_capacity, dtype=torch.bool, device=self.device)
        valid[:, :self.capacity] = self.valid[:, :self.capacity]
        self.valid = valid
        for store in (self.keys, self.values):
            for layer, old in store.items():
                fresh = torch.zeros(self.batch, self.num_kv_heads, new_capacity, self.head_dim,
                                    dtype=self.dtype, device=self.device)
                fresh[:, :, :self.capacity] = old[:, :, :self.capacity]
                store[layer] = fresh
        self.capacity = new_capacity

    def _layer_storage(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (self.batch, self.num_kv_heads, self.capacity, self.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.values[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.keys[layer], self.values[layer]

    def _additive_mask(self, sliding_window: int) -> torch.Tensor:
        """[batch, 1, q_len, length] mask: 0 where a query may attend, the dtype's min elsewhere."""
        mask = self._masks.get(sliding_window)
        if mask is None:
            query_pos = torch.arange(self.step_start, self.length, device=self.device)[:, None]
            key_pos = torch.arange(self.length, device=self.device)[None, :]
            allowed = key_pos <= query_pos  # causal
            if sliding_window > 0:
                allowed = allowed & (query_pos - key_pos < sliding_window)
            allowed = allowed[None, None] & self.valid[:, None, None, :self.length]
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            self._masks[sliding_window] = mask
        return mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
               sliding_window: int = 0) -> torch.Tensor:
        """Append this step's ``k``/``v`` for ``layer`` and attend ``q`` over the cache.

        q: [batch, q_heads, q_len, head_dim]; k, v: [batch, kv_heads, q_len, head_dim].
        Returns [batch, q_len, q_heads, head_dim] (the layout the model's o_proj expects).
        """
        keys, values = self._layer_storage(layer)
        keys[:, :, self.step_start:self.length] = k
        values[:, :, self.step_start:self.length] = v
        batch, num_q_heads, q_len, head_dim = q.shape
        group = num_q_heads // self.num_kv_heads
        # GQA without materialising repeated K/V: the G query heads of a KV head
        # become G*q_len rows against that head's keys (rows ordered group-major).
        q_grouped = q.reshape(batch, self.num_kv_heads, group * q_len, head_dim)
        scores = torch.matmul(q_grouped, keys[:, :, :self.length].transpose(2, 3)) * scaling
        mask = self._additive_mask(sliding_window)
        if group > 1:
            mask = mask.repeat(1, 1, group, 1)
        scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values[:, :, :self.length])  # [batch, kv_heads, group*q_len, head_dim]
        out = out.reshape(batch, num_q_heads, q_len, head_dim)
        return out.transpose(1, 2).contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes of K and V held (filled slots, all layers)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.keys) * self.batch * self.num_kv_heads * self.head_dim * element * self.length


class AttentionServer:
    """Protocol endpoint of an attention worker: messages in, replies out.

    ``handle`` takes a received message (a uint8 tensor holding exactly the
    received bytes) and returns the reply tensor to send back, or ``None``.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.configured = False
        self.caches: dict[int, MicroBatchKVCache] = {}
        self.layer_messages = 0
        self.attention_seconds = 0.0
        self.decode_layer_messages = 0  # messages of steps after a micro-batch's first (prefill) step
        self.decode_attention_seconds = 0.0
        self.idle_seconds = 0.0
        self.stopped = False

    def handle(self, message: torch.Tensor, received_at: float | None = None) -> torch.Tensor | None:
        """``received_at``: when the message was in hand (``time.perf_counter``), for the LAYER reply's trailer."""
        received_at = time.perf_counter() if received_at is None else received_at
        if message.numel() < HEADER_BYTES:
            raise ProtocolError(f"message of {message.numel()} bytes is shorter than the header")
        header = [int(x) for x in message[:HEADER_BYTES].view(torch.int64).tolist()]
        assert len(header) == HEADER_FIELDS
        payload = message[HEADER_BYTES:]
        kind = header[0]
        if kind == Kind.SETUP:
            self._setup(header)
            return None
        if kind == Kind.STOP:
            self.stopped = True
            return None
        if kind == Kind.STATS:
            held = sum(c.nbytes for c in self.caches.values())
            return torch.tensor([self.layer_messages, self.attention_seconds, self.decode_layer_messages,
                                 self.decode_attention_seconds, self.idle_seconds, held], dtype=torch.float64)
        if not self.configured:
            raise ProtocolError(f"message kind {kind} before SETUP")
        if kind == Kind.BEGIN:
            self._begin(header, payload)
            return None
        if kind == Kind.LAYER:
            out = self._layer(header, payload)
            reply = torch.empty(out.numel() * out.element_size() + TRAILER_BYTES, dtype=torch.uint8)
            reply[:-TRAILER_BYTES].view(out.dtype).copy_(out.reshape(-1))
            reply[-TRAILER_BYTES:].view(torch.float64).copy_(
                torch.tensor([received_at, time.perf_counter()], dtype=torch.float64))
            return reply
        raise ProtocolError(f"unknown message kind {kind}")

    def current_step(self, micro_batch: int) -> int | None:
        """The forward step ``micro_batch`` is in (0: its prefill), None before its first BEGIN."""
        cache = self.caches.get(micro_batch)
        return cache.steps - 1 if cache is not None and cache.steps else None

    def _setup(self, header: list[int]) -> None:
        _, self.num_q_heads, self.num_kv_heads, self.head_dim, dtype_code, self.max_payload, _, _ = header
        self.dtype = torch_dtype(dtype_code)
        self.caches.clear()
        self.configured = True

    def _begin(self, header: list[int], payload: torch.Tensor) -> None:
        _, micro_batch, _, batch, q_len, _, _, flags = header
        cache = self.caches.get(micro_batch)
        if flags & FLAG_RESET or cache is None:
            cache = MicroBatchKVCache(batch, self.num_kv_heads, self.head_dim, self.dtype, self.device)
            self.caches[micro_batch] = cache
        elif cache.batch != batch:
            raise ProtocolError(f"micro-batch {micro_batch} changed batch size {cache.batch} -> {batch} without reset")
        new_valid = None
        if flags & FLAG_HAS_MASK:
            if payload.numel() != batch * q_len:
                raise ProtocolError(f"BEGIN mask has {payload.numel()} bytes, expected {batch * q_len}")
            new_valid = payload.view(batch, q_len).bool()
        cache.begin_step(q_len, new_valid)

    def _layer(self, header: list[int], payload: torch.Tensor) -> torch.Tensor:
        _, micro_batch, layer, batch, q_len, sliding_window, scaling_bits, _ = header
        cache = self.caches.get(micro_batch)
        if cache is None or cache.step_len != q_len or cache.batch != batch:
            raise ProtocolError(f"LAYER {layer} for micro-batch {micro_batch} without a matching BEGIN")
        started = time.perf_counter()
        q_numel = batch * self.num_q_heads * q_len * self.head_dim
        kv_numel = batch * self.num_kv_heads * q_len * self.head_dim
        values = payload.view(self.dtype)
        if values.numel() != q_numel + 2 * kv_numel:
            raise ProtocolError(f"LAYER payload has {values.numel()} elements, expected {q_numel + 2 * kv_numel}")
        q = values[:q_numel].view(batch, self.num_q_heads, q_len, self.head_dim)
        k = values[q_numel:q_numel + kv_numel].view(batch, self.num_kv_heads, q_len, self.head_dim)
        v = values[q_numel + kv_numel:].view(batch, self.num_kv_heads, q_len, self.head_dim)
        if self.device.type != "cpu":
            q, k, v = (t.to(self.device, non_blocking=True) for t in (q, k, v))
        out = cache.attend(layer, q, k, v, bits_float(scaling_bits), sliding_window)
        if self.device.type != "cpu":
            out = out.cpu()
        elapsed = time.perf_counter() - started
        self.layer_messages += 1
        self.attention_seconds += elapsed
        if not cache.step_is_prefill:
            self.decode_layer_messages += 1
            self.decode_attention_seconds += elapsed
        return out
