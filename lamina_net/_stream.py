"""The ``stream=`` forms of the host API: ``Channel.put``, ``Channel.signal`` and ``Region.wait``.

Each enqueues a one-thread kernel on the given CUDA stream (a
``torch.cuda.Stream``, a cupy ``Stream``, an object with ``__cuda_stream__``,
or a raw ``cudaStream_t`` int, 0 = the legacy default stream) and returns at
once: no host synchronisation, no allocation (after a channel's first use of
a window), so the calls can be captured in a CUDA graph and replayed.

Puts and signals go through one GPU :class:`~lamina_net.device.DeviceChannel`
per channel, made on first use and closed with the channel; each Region and
RemoteRegion it meets becomes one of its windows (at most
:data:`~lamina_net.device.MAX_WINDOWS` of each per channel). Ordering: stream
operations of one channel are applied in stream (posting) order, a signal
after the data before it; they are not ordered against host-path operations
of the channel issued while they are still queued (synchronise the stream
first). A put's source may be overwritten by the stream's later work; the
data is not known to have arrived until the peer's signal says so.

CUDA graphs: the first use of a channel (it makes the GPU device channel:
pinned and device allocations), of a window and of a signal word does CUDA
work of its own, which a stream capture does not allow; run one round before
capturing (as with any graph warm-up). A GPU ring's proxy thread spins while
the channel is open (a GPU cannot wake it): one host core per channel that
uses ``stream=``.

Failures on the GPU (a wait that passed its bound, a channel that failed)
are recorded, not raised: ``Channel.stream_error`` / ``Endpoint.stream_error``
say what failed first. See ``csrc/proxy/stream_ops.hpp``.
"""
from __future__ import annotations

from typing import Any, Optional

from .device import WAIT_METHODS, _need_kernels, stream_handle
from .errors import TransportError, UsageError


def channel_stream_device(ch):
    """The channel's GPU DeviceChannel for stream operations (made on first use)."""
    dev = getattr(ch, "_stream_device", None)
    if dev is not None and not dev.closed:
        return dev
    _need_kernels()
    ch._live()
    with ch._endpoint._lock:
        dev = getattr(ch, "_stream_device", None)
        if dev is None or dev.closed:
            try:
                dev = ch.device(gpu=True)
            except TransportError as e:
                raise TransportError(f"stream-ordered operations need a usable GPU: {e}") from None
            ch._stream_device = dev
            ch._device_channels = [d for d in getattr(ch, "_device_channels", []) if not d.closed] + [dev]
    return dev


def _source_window(ch, src, src_offset: int, nbytes: Optional[int]):
    """(Region, byte offset in it, nbytes) for a stream put's source."""
    from .core import Region, _check_uint
    from ._arrays import as_buffer

    src_offset = _check_uint("src_offset", src_offset)
    if isinstance(src, Region):
        if src._endpoint is not ch._endpoint:
            raise UsageError("stream put: the source Region belongs to another endpoint")
        src._live()
        ptr, total = src.ptr, src.nbytes
    else:
        buf = as_buffer(src)
        ptr, total = buf.ptr, buf.nbytes
    n = total - src_offset if nbytes is None else _check_uint("nbytes", nbytes)
    if src_offset > total or n > total - src_offset:
        raise UsageError(f"stream put: source slice [{src_offset}, {src_offset}+{n}) is outside the "
                         f"{total}-byte source")
    if isinstance(src, Region):
        return src, src_offset, n
    start = ptr + src_offset
    with ch._endpoint._lock:
        regions = list(ch._endpoint._regions)
    for r in regions:
        if not r.closed and r.ptr <= start and start + n <= r.ptr + r.nbytes:
            return r, start - r.ptr, n
    raise UsageError("stream put: the source must lie inside a Region registered with this endpoint (the kernel "
                     "names it by window): register the array, or pass the Region")


def _no_timeout(timeout) -> None:
    if timeout is not None:
        raise UsageError("timeout= does not apply with stream=: stream operations are bounded by the channel's "
                         "device timeout (the endpoint's)")


def channel_put(ch, src, dst, dst_offset, src_offset, nbytes, signal, signal_offset, signal_add, timeout,
                stream) -> None:
    from .core import _check_uint

    _no_timeout(timeout)
    handle = stream_handle(stream)
    region, base, n = _source_window(ch, src, src_offset, nbytes)
    ch._remote(dst)  # type checks: a RemoteRegion
    dev = channel_stream_device(ch)
    lw = dev._local_index(region)
    rw = dev._remote_index(dst)
    ops = dev._ops()
    if signal is None:
        ops.put(dev._proxy, handle, rw, _check_uint("dst_offset", dst_offset), lw, base, n)
    else:
        ch._remote(signal)
        sw = dev._remote_index(signal)
        ops.put_signal(dev._proxy, handle, rw, _check_uint("dst_offset", dst_offset), lw, base, n, sw,
                       _check_uint("signal_offset", signal_offset), _check_uint("signal_add", signal_add))


def channel_signal(ch, dst, offset, add, timeout, stream) -> None:
    from .core import _check_uint

    _no_timeout(timeout)
    handle = stream_handle(stream)
    ch._remote(dst)
    dev = channel_stream_device(ch)
    sw = dev._remote_index(dst)
    dev._ops().signal(dev._proxy, handle, sw, _check_uint("offset", offset), _check_uint("add", add))


def endpoint_stream_ops(ep):
    """The endpoint's StreamOps for region waits without a channel (made on first use)."""
    from . import _core

    ops = getattr(ep, "_stream_ops", None)
    if ops is None:
        _need_kernels()
        with ep._lock:
            ops = getattr(ep, "_stream_ops", None)
            if ops is None:
                try:
                    ops = ep._stream_ops = _core.StreamOps()
                except TransportError as e:
                    raise TransportError(f"stream-ordered operations need a usable GPU: {e}") from None
    return ops


def region_wait(region, offset, value, timeout, channel, stream, method: str) -> None:
    from .core import _check_timeout, _check_uint

    if method not in WAIT_METHODS:
        raise UsageError(f"method must be one of {', '.join(WAIT_METHODS)}, got {method!r}")
    handle = stream_handle(stream)
    core_region = region._live()
    ep = region._endpoint
    t = ep.timeout if timeout is None else _check_timeout(timeout)
    if t <= 0:
        raise UsageError("a stream wait needs a timeout > 0 seconds")
    if channel is not None:
        dev = channel_stream_device(channel)
        ops, proxy = dev._ops(), dev._proxy
    else:
        ops, proxy = endpoint_stream_ops(ep), None
    ops.wait(core_region, _check_uint("offset", offset), _check_uint("value", value), t, proxy, handle, method,
             0xFFFFFFFF)


def channel_stream_error(ch) -> Optional[str]:
    dev = getattr(ch, "_stream_device", None)
    if dev is None:
        return None
    return dev.stream_error or (dev.error if dev.error_code not in (0, 4) else None)


def endpoint_stream_error(ep) -> Optional[str]:
    ops: Any = getattr(ep, "_stream_ops", None)
    return (ops.error or None) if ops is not None else None
