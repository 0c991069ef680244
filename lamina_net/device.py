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

Stream-ordered operations (a GPU channel only): :meth:`~DeviceChannel.put`,
:meth:`~DeviceChannel.put_signal`, :meth:`~DeviceChannel.signal` and
:meth:`~DeviceChannel.wait` take ``stream=`` (a ``torch.cuda.Stream``, a cupy
``Stream``, an object with ``__cuda_stream__``, or a raw ``cudaStream_t`` int,
0 = the legacy default stream) and enqueue a one-thread kernel there: they
return at once, never synchronise, allocate nothing, and can be captured in
a CUDA graph and replayed. What fails later, on the GPU, is in
:attr:`~DeviceChannel.stream_error` (see ``csrc/proxy/stream_ops.hpp``).
"""
from __future__ import annotations

import operator
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from . import _core
from .errors import TransportError, UsageError

#: Size in bytes of ``lamina::DeviceChannel`` (the handle).
HANDLE_BYTES = _core.DEVICE_CHANNEL_BYTES
MAX_WINDOWS = _core.DEVICE_MAX_WINDOWS

#: Device status codes (``lamina::DeviceStatus``).
OK, TIMEOUT, CHANNEL_ERROR, INVALID_ARGUMENT = 0, 1, 2, 3
#: Error word values (``lamina::DeviceError``).
ERROR_NAMES = {0: "none", 1: "transfer failed", 2: "descriptor rejected", 3: "producer timed out",
               4: "closed", 5: "a stream-ordered wait timed out"}
#: How a stream-ordered wait waits: ``"kernel"`` (a one-thread kernel polls the
#: word; bounded, stops when the channel fails), ``"mem_op"``
#: (``cuStreamWaitValue64``: uses no SM, but has no bound - only the word
#: releases the stream), ``"auto"`` (``mem_op`` where supported).
WAIT_METHODS = ("kernel", "mem_op", "auto")


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` (an int) behind ``stream``.

    Accepts a ``torch.cuda.Stream``, a cupy ``Stream`` (``.ptr``), an object
    with ``__cuda_stream__`` (the CUDA Python protocol), or an int (0 = the
    legacy default stream; CUDA's ``cudaStreamLegacy`` = 1 and
    ``cudaStreamPerThread`` = 2 work too).
    """
    if stream is None:
        raise UsageError("stream= is required: a torch.cuda.Stream, a cupy Stream, or a raw cudaStream_t int "
                         "(0 = the legacy default stream)")
    if isinstance(stream, bool):
        raise UsageError("stream must be a CUDA stream or an int handle, got a bool")
    try:
        value = operator.index(stream)
    except TypeError:
        value = None
        proto = getattr(stream, "__cuda_stream__", None)
        if callable(proto):
            value = proto()[1]
        else:
            for attr in ("cuda_stream", "ptr"):  # torch, cupy
                v = getattr(stream, attr, None)
                if isinstance(v, int) and not isinstance(v, bool):
                    value = v
                    break
        if value is None:
            raise UsageError(f"stream must be a torch.cuda.Stream, a cupy Stream, an object with __cuda_stream__ "
                             f"or a raw cudaStream_t int, got {type(stream).__name__}") from None
        value = int(value)
    if value < 0 or value >= 1 << 64:
        raise UsageError(f"stream handle {value} is not a cudaStream_t")
    return value


def _need_kernels() -> None:
    if not getattr(_core, "HAVE_CUDA_KERNELS", False):
        raise UsageError("stream-ordered operations need lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON, the "
                         "CUDA toolkit and nvcc): this build has no CUDA kernels")


def _remote_key(desc) -> tuple:
    return (desc.owner_rank, desc.group_id, desc.region_id, desc.addr, desc.size, desc.rkey)


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
        # None: the core reads LAMINA_NET_DEVICE_RING_SLOTS (its settings registry, typed errors).
        if ring_slots is None:
            ring_slots = 0
        elif _check_uint("ring_slots", ring_slots) == 0:
            raise UsageError("ring_slots must be a power of two in [2, 16777216], got 0")
        if gpu is None:
            gpu = any(r._buffer.cuda for r in local)
        if spin_us is None:
            spin_us = -1
        elif isinstance(spin_us, bool) or not isinstance(spin_us, int) or spin_us < 0:
            raise UsageError(f"spin_us must be a non-negative int, got {spin_us!r}")
        self._channel = channel
        self._local = local  # kept alive: the handle points into them
        self._remote = remote
        self._lock = threading.Lock()
        self._stream_ops = None
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

    def kernel_arg(self):
        """The handle as a one-element numpy array of :data:`HANDLE_BYTES` bytes.

        cupy passes a one-element numpy array by value, so this is the argument
        for a kernel parameter declared ``lamina::DeviceChannel ch`` (the driver
        lays it out by the kernel's own parameter table).
        """
        import numpy as np

        return np.frombuffer(self.handle(), dtype=np.dtype((np.void, HANDLE_BYTES))).copy()

    def add_windows(self, local: Sequence = (), remote: Sequence = ()) -> tuple:
        """Appends windows; returns the indices of the first new (local, remote) window.

        Handles taken before stay valid (their windows are a prefix), so
        running kernels and captured graphs keep working; take :meth:`handle`
        again to use the new windows in a kernel. At most :data:`MAX_WINDOWS` of each.
        """
        from .core import Region, RemoteRegion

        local, remote = list(local), list(remote)
        for i, r in enumerate(local):
            if not isinstance(r, Region) or r._endpoint is not self._channel._endpoint:
                raise UsageError(f"local window {i}: expected a Region of this endpoint")
        for i, r in enumerate(remote):
            if not isinstance(r, RemoteRegion):
                raise UsageError(f"remote window {i}: expected a RemoteRegion, got {type(r).__name__}")
        with self._lock:
            first = (len(self._local), len(self._remote))
            self._live().add_windows([r._live() for r in local], [r._desc for r in remote])
            self._local.extend(local)
            self._remote.extend(remote)
        return first

    def _local_index(self, region) -> int:
        for i, r in enumerate(self._local):
            if r is region:
                return i
        return self.add_windows(local=[region])[0]

    def _remote_index(self, remote) -> int:
        key = _remote_key(remote._desc)
        for i, r in enumerate(self._remote):
            if _remote_key(r._desc) == key:
                return i
        return self.add_windows(remote=[remote])[1]

    # ---- stream-ordered operations (GPU channels)
    def _ops(self) -> "_core.StreamOps":
        _need_kernels()
        proxy = self._live()
        if not proxy.gpu:
            raise UsageError("stream-ordered operations need a GPU device channel (ch.device(..., gpu=True)): this "
                             "one's ring is in plain host memory, for CPU producers")
        if self._stream_ops is None:
            with self._lock:
                if self._stream_ops is None:
                    try:
                        self._stream_ops = _core.StreamOps()
                    except TransportError as e:
                        raise TransportError(f"stream-ordered operations need a usable GPU: {e}") from None
        return self._stream_ops

    def put(self, dst_window: int, dst_offset: int, src_window: int, src_offset: int, nbytes: int, *,
            stream: Any = None) -> None:
        """Enqueues on ``stream`` a put of local window ``src_window`` [src_offset, +nbytes) to remote window
        ``dst_window`` at ``dst_offset``, after the stream's earlier work.

        Work enqueued after it may overwrite the source (the kernel waits until the proxy executed it); it
        does not wait for the data to arrive at the target.
        """
        from .core import _check_uint

        ops = self._ops()
        ops.put(self._proxy, stream_handle(stream), _check_uint("dst_window", dst_window, 1 << 32),
                _check_uint("dst_offset", dst_offset), _check_uint("src_window", src_window, 1 << 32),
                _check_uint("src_offset", src_offset), _check_uint("nbytes", nbytes))

    def put_signal(self, dst_window: int, dst_offset: int, src_window: int, src_offset: int, nbytes: int,
                   signal_window: int, signal_offset: int = 0, signal_add: int = 1, *, stream: Any = None) -> None:
        """Like :meth:`put`, then adds ``signal_add`` to the u64 at ``signal_offset`` of remote window
        ``signal_window``, after the data is visible at the target."""
        from .core import _check_uint

        ops = self._ops()
        ops.put_signal(self._proxy, stream_handle(stream), _check_uint("dst_window", dst_window, 1 << 32),
                       _check_uint("dst_offset", dst_offset), _check_uint("src_window", src_window, 1 << 32),
                       _check_uint("src_offset", src_offset), _check_uint("nbytes", nbytes),
                       _check_uint("signal_window", signal_window, 1 << 32),
                       _check_uint("signal_offset", signal_offset), _check_uint("signal_add", signal_add))

    def signal(self, signal_window: int, signal_offset: int = 0, add: int = 1, *, stream: Any = None) -> None:
        """Enqueues on ``stream`` a remote 64-bit add of ``add`` to the u64 at ``signal_offset`` of remote
        window ``signal_window``, ordered after every put posted before it on this channel."""
        from .core import _check_uint

        ops = self._ops()
        ops.signal(self._proxy, stream_handle(stream), _check_uint("signal_window", signal_window, 1 << 32),
                   _check_uint("signal_offset", signal_offset), _check_uint("add", add))

    def wait(self, local_window: int, offset: int = 0, value: int = 1, *, stream: Any = None,
             method: str = "kernel") -> None:
        """Makes ``stream`` wait until the u64 at ``offset`` of local window ``local_window`` is >= ``value``;
        the host thread does not wait.

        The word must be GPU memory or pinned host memory. ``method``: see :data:`WAIT_METHODS`; with
        ``"kernel"`` (the default) the wait is bounded by the channel's timeout and ends early when the
        channel fails; then :attr:`stream_error` says why and the channel's error word is set, so later
        device operations of the channel fail instead of running on data that never arrived.
        """
        from .core import _check_uint

        if method not in WAIT_METHODS:
            raise UsageError(f"method must be one of {', '.join(WAIT_METHODS)}, got {method!r}")
        ops = self._ops()
        w = _check_uint("local_window", local_window, 1 << 32)
        if w >= len(self._local):
            raise UsageError(f"local window {w} is not one of the channel's {len(self._local)} local windows")
        ops.wait(self._local[w]._live(), _check_uint("offset", offset), _check_uint("value", value), -1.0,
                 self._proxy, stream_handle(stream), method, w)

    @property
    def stream_error(self) -> Optional[str]:
        """What the first failed stream-ordered operation of this channel was, or None."""
        if self._stream_ops is None:
            return None
        return self._stream_ops.error or None

    def check(self) -> None:
        """Raises TransportError if the error word is set or a stream-ordered operation failed."""
        why = self.stream_error or self.error
        if why is not None:
            raise TransportError(f"device channel: {why}")

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
