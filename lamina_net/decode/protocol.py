"""Wire format between the model worker and the attention workers.

Every message from the model worker is one lamina-net two-sided message: a
fixed 64-byte header (eight little-endian int64 fields) followed by a payload.
Replies carry no header: the channel is ordered, so the model worker knows which
request a reply answers, and checks its byte count.

==========  =====================================================================
kind        payload
==========  =====================================================================
SETUP       none; fields: q heads, kv heads, head dim, dtype, max payload bytes
BEGIN       optional uint8 key-validity mask [batch, q_len] (left padding);
            starts a forward step of one micro-batch (flag RESET: new requests)
LAYER       q [batch, q_heads, q_len, head_dim], then k and v
            [batch, kv_heads, q_len, head_dim], all in the model dtype;
            reply: attention output [batch, q_len, q_heads, head_dim], then
            a trailer of two float64: when the worker had the request and
            when it posted the reply (``time.perf_counter``; comparable with
            the model worker's clock on one host only)
STATS       none; reply: float64 [STATS_FIELDS] timing counters
STOP        none; no reply, the worker exits
==========  =====================================================================
"""
from __future__ import annotations

import enum
import struct

HEADER_FIELDS = 8
HEADER_BYTES = HEADER_FIELDS * 8
# STATS reply fields: layer messages, seconds computing attention, the same two for decode steps only
# (after each micro-batch's prefill), seconds waiting for requests, KV cache bytes held.
STATS_FIELDS = 6

TRAILER_BYTES = 16  # LAYER reply trailer: request received, reply posted (float64 seconds)

FLAG_RESET = 1  # BEGIN: drop the micro-batch's KV cache, new requests start
FLAG_HAS_MASK = 2  # BEGIN: a key-validity mask follows; otherwise all new tokens are valid


class Kind(enum.IntEnum):
    SETUP = 1
    BEGIN = 2
    LAYER = 3
    STATS = 4
    STOP = 5


# dtype codes; strings so this module does not need torch.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def float_bits(value: float) -> int:
    """A float64 stored in an int64 header field (for the softmax scale)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


class ProtocolError(RuntimeError):
    """A message that does not fit the protocol (bug or mismatched peers)."""
