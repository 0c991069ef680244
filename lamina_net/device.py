"""The device API's host side: device channels whose handles kernels use.

A :class:`DeviceChannel` is made from a :class:`~lamina_net.Channel` with
``ch.device(local=[...], remote=[...])``. It owns a descriptor ring and the
proxy thread that drains it into the channel's transport. Its
:meth:`~DeviceChannel.handle` is the ``lamina::DeviceChannel`` struct of
``lamina_net/device.cuh`` as bytes, to pass by value as a kernel argument
(cupy ``RawKernel``: wrap the bytes in a numpy structured scalar of the same
size; C++: ``memcpy`` into a ``lamina::DeviceChannel``).

Windows: ``remote[i]`` (a peer's :class:`~lamina_net.RemoteRegion`) is remote
window ``i``; ``local[i]`` (a :class:`~lamina_net.Region` of this endpoint) is
local window ``i``, a put source or a signal word to wait on. They are
resolved once, here, so no descriptor pays a lookup.

Lifetimes: the DeviceChannel must outlive every kernel using its handle.
``close()`` (idempotent; also when the endpoint closes, before its channels)
stops the proxy and sets the error word, so kernels still waiting stop with
``kDeviceChannelError`` instead of hanging.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from . import _core
from .errors import UsageError

#: Size in bytes of ``lamina::DeviceChannel`` (the handle).
HANDLE_BYTES = _core.DEVICE_CHANNEL_BYTES
MAX_WINDOWS = _core.DEVICE_MAX_WINDOWS

#: Device status codes (``lamina::DeviceStatus``).
OK, TIMEOUT, CHANNEL_ERROR, INVALID_ARGUMENT = 0, 1, 2, 3
#: Error word values (``lamina::DeviceError``).
ERROR_NAMES = {0: "none", 1: "transfer failed", 2: "descriptor rejected", 3: "producer timed out",
               4: "closed"}


def get_include() -> str:
    """Directory holding ``lamina_net/device.cuh`` (pass it to nvcc, NVRTC or g++ as ``-I``)."""
    installed = Path(__file__).resolve().parent / "include"
    if (installed / "lamina_net" / "device.cuh").is_file():
        return str(installed)
    # Editable installs and the source tree: the header where it is written.
    source = Path(__file__).resolve().parent.parent / "csrc" / "device" / "include"
    if (source / "lamina_net" / "device.cuh").is_file():
        return str(source)
    raise UsageError("lamina_net/device.cuh is not installed with this lamina-net (reinstall the package)")


class DeviceChannel:
    """A channel's device-side face: a ring, its proxy thread and the kernel handle."""

    def __init__(self, channel, local: Sequence = (), remote: Sequence = (), *, ring_slots: Optional[int] = None,
                 timeout: Optional[float] = None, gpu: Optional[bool] = None, spin_us: Optional[int] = None):
        from .core import Region, RemoteRegion, _check_timeout, _check_uint

        local = list(local)
        remote = list(remote)
        for i, r in enumerate(local):
            if not isinstance(r, Region):
                raise UsageError(f"local window {i}: expected a Region of this endpoint, got {type(r).__name__}")
            if r._endpoint is not channel._endpoint:
                raise UsageError(f"local window {i}: the region belongs to another endpoint")
        for i, r in enumerate(remote):
            if not isinstance(r, RemoteRegion):
                raise UsageError(f"remote window {i}: expected a RemoteRegion, got {type(r).__name__}")
        if len(local) > MAX_WINDOWS or len(remote) > MAX_WINDOWS:
            raise UsageError(f"at most {MAX_WINDOWS} local and {MAX_WINDOWS} remote windows")
        if ring_slots is None:
            ring_slots = int(os.environ.get("LAMINA_NET_DEVICE_RING_SLOTS", "1024") or 1024)
        ring_slots = _check_uint("ring_slots", ring_slots)
        if gpu is None:
            gpu = any(r._buffer.cuda for r in local)
        if spin_us is None:
            spin_us = -1
        elif isinstance(spin_us, bool) or not isinstance(spin_us, int) or spin_us < 0:
            raise UsageError(f"spin_us must be a non-negative int, got {spin_us!r}")
        self._channel = channel
        self._local = local  # kept alive: the handle points into them
        self._remote = remote
        self._proxy = _core.DeviceProxy(channel._endpoint._live(), channel._live(), [r._live() for r in local],
                                        [r._desc for r in remote], ring_slots, _check_timeout(timeout), bool(gpu),
                                        spin_us)

    def _live(self) -> "_core.DeviceProxy":
        if self._proxy is None or self._proxy.closed:
            raise UsageError("device channel is closed")
        return self._proxy

    def handle(self) -> bytes:
        """The ``lamina::DeviceChannel`` handle, :data:`HANDLE_BYTES` bytes, for a kernel argument."""
        return self._live().handle_bytes()

    @property
    def device_path(self) -> str:
        """The back end that runs this channel's device operations: ``"proxy"``."""
        return self._live().device_path

    @property
    def gpu(self) -> bool:
        """True when kernels can post (ring in mapped pinned memory); False: CPU producers."""
        return self._live().gpu

    @property
    def error(self) -> Optional[str]:
        """Why the device side stopped (the error word is set), or None while healthy."""
        if self._proxy is None:
            return "the device channel was closed"
        if self._proxy.error_code == 0:
            return None
        return self._proxy.error or ERROR_NAMES.get(self._proxy.error_code, "unknown error")

    @property
    def error_code(self) -> int:
        return 4 if self._proxy is None else self._proxy.error_code

    def stats(self) -> dict:
        """Counters of the proxy: descriptors executed, times it slept, flushes."""
        return self._live().stats()

    @property
    def closed(self) -> bool:
        return self._proxy is None or self._proxy.closed

    def close(self) -> None:
        """Stops the proxy (bounded) and sets the error word. Idempotent."""
        if self._proxy is not None:
            self._proxy.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "DeviceChannel(closed)"
        return (f"DeviceChannel(peer={self._channel.peer}, transport={self._channel.transport!r}, "
                f"device_path={self.device_path!r}, local={len(self._local)}, remote={len(self._remote)})")
