"""lamina-net: low-latency networking for attention-offloaded LLM serving.

One-sided put / put-with-signal / atomic add and ordered send/recv between
ranks over RDMA verbs, TCP or same-host shared memory, zero-copy on numpy,
torch and cupy arrays. Importing this package does not import torch.
"""
from .errors import LaminaError, TimeoutError, TransportError, UsageError

__version__ = "0.1.0"


def _check_compiled_module() -> None:
    # Run from a checkout's root after `pip install .`, Python imports the
    # source tree (cwd first on sys.path), which has no compiled module.
    import importlib.util
    import os

    if importlib.util.find_spec(__name__ + "._core") is None:
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"lamina_net's compiled module (_core) is missing from {here}. This looks like the source tree "
            "of lamina-net, imported instead of the installed package (the current directory comes first on "
            "sys.path). Run from outside the checkout, or install it editable there: "
            "pip install --no-build-isolation -e .")


_check_compiled_module()

from .core import Access, Channel, Endpoint, Handle, Put, Region, RemoteRegion  # noqa: E402
from .device import DeviceChannel, get_include  # noqa: E402
from .store import StoreClient, StoreServer  # noqa: E402

__all__ = [
    "Access", "Channel", "DeviceChannel", "Endpoint", "Handle", "Put", "Region", "RemoteRegion", "StoreClient", "StoreServer", "get_include",
    "LaminaError", "UsageError", "TransportError", "TimeoutError", "__version__",
]
