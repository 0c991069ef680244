"""lamina-net: low-latency networking for attention-offloaded LLM serving.

One-sided put / put-with-signal / atomic add and ordered send/recv between
ranks over RDMA verbs, TCP or same-host shared memory, zero-copy on numpy,
torch and cupy arrays. Importing this package does not import torch.
"""
from .errors import LaminaError, TimeoutError, TransportError, UsageError

__version__ = "0.1.0"

from .core import Access, Channel, Endpoint, Handle, Region, RemoteRegion  # noqa: E402
from .device import DeviceChannel, get_include  # noqa: E402
from .store import StoreClient, StoreServer  # noqa: E402

__all__ = [
    "Access", "Channel", "DeviceChannel", "Endpoint", "Handle", "Region", "RemoteRegion", "StoreClient", "StoreServer", "get_include",
    "LaminaError", "UsageError", "TransportError", "TimeoutError", "__version__",
]
