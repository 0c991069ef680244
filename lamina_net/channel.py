"""Channels (an ordered connection to one peer over one transport) and handles.

Contracts (from the C++ headers): operations on one channel are applied at
the target in issue order, a put's signal only after its data is visible;
``put``/``send`` return when the source may be reused, ``iput`` and
``iput_many`` return a :class:`Handle` that completes when the data is
applied at the target; a channel error is sticky.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

from . import _core
from . import _stream
from ._arrays import Buffer, as_buffer, wait_for_producer
from .errors import UsageError
from .region import Region, RemoteRegion, _check_timeout, _check_uint

if TYPE_CHECKING:
    from .core import Endpoint
    from .device import DeviceChannel


class Put(NamedTuple):
    """One put of a batch for :meth:`Channel.put_many`: the arguments of :meth:`Channel.put`."""

    src: Any
    dst: "RemoteRegion"
    dst_offset: int = 0
    src_offset: int = 0
    nbytes: Optional[int] = None
    signal: Optional["RemoteRegion"] = None
    signal_offset: int = 0
    signal_add: int = 1


class Handle:
    """A non-blocking operation. ``wait()`` blocks (bounded); ``test()`` polls.

    ``result``: bytes received (recv), previous value (atomic_add), else None.
    """

    __slots__ = ("_channel", "_op", "_what", "_keepalive", "_result_kind")

    def __init__(self, channel: "Channel", op, what: str, keepalive: Any = None, result_kind: str = "none"):
        self._channel = channel
        self._op = op
        self._what = what
        self._keepalive = keepalive
        self._result_kind = result_kind

    def test(self) -> bool:
        """True once complete; raises the operation's error if it failed."""
        if self._op is None:
            return True
        return self._channel._live().test(self._op)

    def wait(self, timeout: Optional[float] = None):
        """Blocks until complete (at most ``timeout`` s); returns :attr:`result`."""
        if self._op is not None:
            self._channel._live().wait(self._op, _check_timeout(timeout), self._what)
        return self.result

    @property
    def done(self) -> bool:
        return self._op is None or self._op.done

    @property
    def result(self) -> Optional[int]:
        if self._op is None or not self._op.done or self._op.failed or self._result_kind == "none":
            return None
        return self._op.value


def _require_cuda_build() -> None:
    if not _core.HAVE_CUDA:
        raise UsageError("CUDA memory needs lamina-net built with CUDA")


def _address_of(staging: bytearray) -> int:
    import ctypes

    return ctypes.addressof((ctypes.c_char * len(staging)).from_buffer(staging)) if staging else 0


def _cuda_copy(dst: int, src: int, nbytes: int) -> None:
    """The host/GPU copy of staged send/recv (a module attribute, so tests on machines without a GPU can
    stand a host copy in for it and check the staging itself)."""
    _core.cuda_copy(dst, src, nbytes)


class _StagedReceive(Handle):
    """A receive of GPU memory: lands in host ``staging``, copied up to the GPU buffer once, on completion."""

    __slots__ = ("_target", "_staging", "_copied", "_copy_error")

    def __init__(self, channel: "Channel", op, what: str, target: Buffer, staging: bytearray):
        super().__init__(channel, op, what, target.owner, "value")
        self._target, self._staging = target, staging
        self._copied, self._copy_error = False, None

    def _copy_up(self) -> None:
        if self._copied or not self._op.done or self._op.failed:
            return
        if self._copy_error is not None:
            raise self._copy_error
        try:
            _cuda_copy(self._target.ptr, _address_of(self._staging), self._op.value)
        except BaseException as failure:  # every later look at the handle reports it, not a stale success
            self._copy_error = failure
            raise
        self._copied, self._staging = True, bytearray()

    def test(self) -> bool:
        complete = super().test()
        if complete:
            self._copy_up()
        return complete

    def wait(self, timeout: Optional[float] = None):
        super().wait(timeout)
        self._copy_up()
        return self.result

    @property
    def done(self) -> bool:
        if not self._op.done:
            return False
        try:
            self._copy_up()
        except BaseException:  # kept: wait() and test() raise it
            pass
        return True


class Channel:
    """An ordered connection between this rank and one peer over one transport."""

    def __init__(self, endpoint: "Endpoint", handle: "_core.Channel"):
        self._endpoint = endpoint
        self._handle = handle
        # Posted receives keep their buffers alive here until they complete,
        # even if the caller drops the Handle.
        self._pending_recvs: list = []
        self._final_failure: Optional[str] = None  # failed() once the handle is released

    @property
    def peer(self) -> int:
        return self._live().peer

    @property
    def transport(self) -> str:
        return self._live().transport

    @property
    def closed(self) -> bool:
        return self._handle is None or self._handle.closed

    def _live(self) -> "_core.Channel":
        if self._handle is None or self._handle.closed:
            raise UsageError("channel is closed")
        return self._handle

    def _source(self, src, src_offset: int, nbytes: Optional[int]) -> tuple[int, int, Any]:
        if isinstance(src, Region):
            src._live()
            base, total, keep, cuda = src.ptr, src.nbytes, src, src._buffer.cuda
        else:
            buf = as_buffer(src)
            base, total, keep, cuda = buf.ptr, buf.nbytes, buf.owner, buf.cuda
        if cuda:
            _require_cuda_build()
        src_offset = _check_uint("src_offset", src_offset)
        n = total - src_offset if nbytes is None else _check_uint("nbytes", nbytes)
        if src_offset > total or n > total - src_offset:
            raise UsageError(f"source slice [{src_offset}, {src_offset}+{n}) is outside the {total}-byte source")
        if cuda:
            # Read only after the stream work that produced it (torch's current stream, or the
            # __cuda_array_interface__ 'stream'): tcp/shm copy it on a stream of their own, verbs in place.
            wait_for_producer(src._buffer.owner if isinstance(src, Region) else keep)
        return base + src_offset, n, keep, cuda

    @staticmethod
    def _remote(dst) -> "_core.Descriptor":
        if isinstance(dst, RemoteRegion):
            return dst._desc
        if isinstance(dst, Region):
            raise UsageError("pass the peer's RemoteRegion (region.descriptor() on the peer), not a local Region")
        raise UsageError(f"expected a RemoteRegion, got {type(dst).__name__}")

    def _put(self, src, dst, dst_offset, src_offset, nbytes, signal, signal_offset, signal_add, want, timeout):
        ptr, n, keep, cuda = self._source(src, src_offset, nbytes)
        sig = self._remote(signal) if signal is not None else None
        op = self._live().put(ptr, n, self._remote(dst), _check_uint("dst_offset", dst_offset), sig,
                              _check_uint("signal_offset", signal_offset), _check_uint("signal_add", signal_add),
                              want, _check_timeout(timeout), cuda)
        return op, keep, n

    def put(self, src, dst: RemoteRegion, dst_offset: int = 0, *, src_offset: int = 0, nbytes: Optional[int] = None,
            signal: Optional[RemoteRegion] = None, signal_offset: int = 0, signal_add: int = 1,
            timeout: Optional[float] = None, stream: Any = None) -> None:
        """One-sided write of ``src`` (array or Region slice) into ``dst`` at ``dst_offset``.

        With ``signal``, then adds ``signal_add`` to the u64 at ``signal_offset`` of
        that remote region, after the data is visible. Returns when ``src`` may be reused:
        over verbs, sources up to ``LAMINA_NET_IB_STAGE_MAX`` (4 KiB) are copied out and it
        returns at once; a larger source inside a registered region is read by the NIC in
        place (zero-copy) and it returns once that write completed (use :meth:`iput` to
        overlap several).

        With ``stream`` (a torch/cupy CUDA stream or a raw handle), the put is enqueued on that
        stream instead and this returns at once (graph-capturable; see :func:`lamina_net._stream.channel_put`):
        ``src`` must lie in a Region of this endpoint; later work in the stream may overwrite it.
        """
        if stream is not None:
            return _stream.channel_put(self, src, dst, dst_offset, src_offset, nbytes, signal, signal_offset,
                                       signal_add, timeout, stream)
        self._put(src, dst, dst_offset, src_offset, nbytes, signal, signal_offset, signal_add, False, timeout)

    def iput(self, src, dst: RemoteRegion, dst_offset: int = 0, *, src_offset: int = 0,
             nbytes: Optional[int] = None, signal: Optional[RemoteRegion] = None, signal_offset: int = 0,
             signal_add: int = 1, timeout: Optional[float] = None) -> Handle:
        """Like :meth:`put`, but returns at once; the handle completes when the data is applied at the target.

        Do not change ``src`` until the handle completes (as with MPI_Isend or
        NVSHMEM's ``put_nbi``): over verbs a source inside a registered region
        is read by the NIC in place, zero-copy, until then. The handle keeps
        ``src`` alive.
        """
        op, keep, n = self._put(src, dst, dst_offset, src_offset, nbytes, signal, signal_offset, signal_add, True,
                                timeout)
        return Handle(self, op, f"put of {n} bytes", keep)

    def _put_many(self, puts, want, timeout):
        if isinstance(puts, Put):
            raise UsageError("put_many takes a sequence of Put, not a single Put")
        items, keep = [], []
        for i, p in enumerate(puts):
            if not isinstance(p, Put):
                if not isinstance(p, tuple):
                    raise UsageError(f"put_many: item {i} is a {type(p).__name__}, expected a lamina_net.Put")
                p = Put(*p)
            ptr, n, owner, cuda = self._source(p.src, p.src_offset, p.nbytes)
            items.append((ptr, n, self._remote(p.dst), _check_uint("dst_offset", p.dst_offset),
                          self._remote(p.signal) if p.signal is not None else None,
                          _check_uint("signal_offset", p.signal_offset), _check_uint("signal_add", p.signal_add),
                          cuda))
            keep.append(owner)
        op = self._live().put_many(items, want, _check_timeout(timeout))
        return op, keep, len(items)

    def put_many(self, puts: Sequence[Put], *, timeout: Optional[float] = None) -> None:
        """Posts a batch of puts in order, as consecutive :meth:`put` calls would, in as few writes as can be.

        Each item is a :class:`Put` (or a tuple of its fields). Every put is checked before any is
        posted, so a bad one raises :class:`UsageError` naming its index and nothing is sent. Each
        signal is applied after its own put's data, and puts apply in order, so a signal on the
        last put covers the whole batch. Over tcp a run of up to 32 puts goes out in one
        ``sendmsg``; shm writes each straight into the peer's memory; verbs posts them one by one.
        Returns when the sources may be reused.
        """
        self._put_many(puts, False, timeout)

    def iput_many(self, puts: Sequence[Put], *, timeout: Optional[float] = None) -> Handle:
        """Like :meth:`put_many`, but the handle completes when every put is applied at the target.

        Do not change the sources until then (see :meth:`iput`); the handle keeps them alive.
        """
        op, keep, n = self._put_many(puts, True, timeout)
        return Handle(self, op, f"batch of {n} puts", keep)

    def signal(self, dst: RemoteRegion, offset: int = 0, add: int = 1, *, timeout: Optional[float] = None,
               stream: Any = None) -> None:
        """Adds ``add`` to the peer's u64 at ``offset`` of ``dst`` (no old value), after every put before it.

        Returns once posted. With ``stream``, enqueued on that CUDA stream instead (see :meth:`put`).
        """
        if stream is not None:
            return _stream.channel_signal(self, dst, offset, add, timeout, stream)
        self._live().signal(self._remote(dst), _check_uint("offset", offset), _check_uint("add", add),
                            _check_timeout(timeout))

    @property
    def stream_error(self) -> Optional[str]:
        """What the first failed ``stream=`` operation of this channel was (recorded on the GPU), or None."""
        return _stream.channel_stream_error(self)

    def iatomic_add(self, dst: RemoteRegion, offset: int = 0, value: int = 1,
                    timeout: Optional[float] = None) -> Handle:
        """Remote 64-bit fetch-and-add; the handle's result is the previous value."""
        op = self._live().atomic_add(self._remote(dst), _check_uint("offset", offset), _check_uint("value", value),
                                     _check_timeout(timeout))
        return Handle(self, op, "atomic_add", None, "value")

    def atomic_add(self, dst: RemoteRegion, offset: int = 0, value: int = 1, timeout: Optional[float] = None) -> int:
        """Blocking remote fetch-and-add; returns the previous value."""
        return self.iatomic_add(dst, offset, value, timeout).wait(timeout)

    def isend(self, data, timeout: Optional[float] = None) -> Handle:
        """Sends one message (ordered). The source may be reused once this returns.

        GPU memory is staged through host memory (copied down after the stream
        work that produced it) on every transport.
        """
        buf = as_buffer(data)
        ptr, keep = buf.ptr, None
        if buf.cuda:
            ptr, keep = self._stage_down(buf)
        op = self._live().send(ptr, buf.nbytes, _check_timeout(timeout))
        return Handle(self, op, f"send of {buf.nbytes} bytes", keep, "value")

    def send(self, data, timeout: Optional[float] = None) -> None:
        self.isend(data, timeout).wait(timeout)

    @staticmethod
    def _stage_down(buf: Buffer) -> tuple[int, Any]:
        _require_cuda_build()
        wait_for_producer(buf.owner)
        staging = bytearray(buf.nbytes)
        address = _address_of(staging)
        _cuda_copy(address, buf.ptr, buf.nbytes)
        return address, staging

    def irecv(self, out) -> Handle:
        """Posts a receive into ``out``; the handle's result is the message size in bytes.

        Receives complete in posting order. A message larger than ``out`` fails
        that receive with UsageError (the message is dropped). A wait that times
        out withdraws the receive, so the next message goes to the next one.
        GPU memory receives into host memory first; the copy up is made when
        the handle is first seen complete (``wait``, ``test`` or ``done``).
        """
        buf = as_buffer(out, writable=True)
        if buf.cuda:
            _require_cuda_build()
            staging = bytearray(buf.nbytes)
            op = self._live().recv(_address_of(staging), buf.nbytes)
            handle: Handle = _StagedReceive(self, op, f"recv into {buf.nbytes} bytes", buf, staging)
        else:
            op = self._live().recv(buf.ptr, buf.nbytes)
            handle = Handle(self, op, f"recv into {buf.nbytes} bytes", buf.owner, "value")
        self._pending_recvs = [h for h in self._pending_recvs if not h._op.done] + [handle]
        return handle

    def recv(self, out, timeout: Optional[float] = None) -> int:
        """Blocks until the next message arrives in ``out``; returns its size in bytes."""
        _check_timeout(timeout)  # before posting: a bad argument must not leave a receive behind
        return self.irecv(out).wait(timeout)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Blocks until every operation issued before it is applied at the target."""
        handle = self._live()
        op = handle.flush(_check_timeout(timeout))
        handle.wait(op, _check_timeout(timeout), "flush")

    def device(self, local=(), remote=(), *, ring_slots: Optional[int] = None, timeout: Optional[float] = None,
               gpu: Optional[bool] = None, spin_us: Optional[int] = None) -> "DeviceChannel":
        """A :class:`~lamina_net.device.DeviceChannel` on this channel, for kernels (or CPU threads).

        ``local``: Regions of this endpoint (local windows: put sources, signal
        words to wait on); ``remote``: the peer's RemoteRegions (remote windows).
        ``gpu``: ring in mapped pinned memory for kernels (default: when a
        local window is CUDA memory). See ``lamina_net/device.cuh``.
        """
        from .device import DeviceChannel

        return DeviceChannel(self, local, remote, ring_slots=ring_slots, timeout=timeout, gpu=gpu, spin_us=spin_us)

    def device_handle(self, local=(), remote=(), **options) -> bytes:
        """The handle bytes of a new device channel kept with this channel (closed with it)."""
        dev = self.device(local, remote, **options)
        self._device_channels = [d for d in getattr(self, "_device_channels", []) if not d.closed] + [dev]
        return dev.handle()

    def failed(self) -> Optional[str]:
        """The reason this channel failed, or None."""
        if self._handle is None:
            return self._final_failure
        is_failed, why = self._handle.failed()
        return why if is_failed else None

    def close(self) -> None:
        """Closes the channel; the peer sees 'closed'. Idempotent."""
        for dev in getattr(self, "_device_channels", []):
            dev.close()  # proxies stop before their channel closes
        if self._handle is not None:
            self._handle.close()  # after this the transport writes into no buffer
            self._pending_recvs = []
            self._release()

    def _release(self) -> None:
        # A closed channel kept by the caller must not keep its socket, rings
        # or mappings: the core object goes with this last reference.
        if self._handle is not None:
            self._final_failure = self.failed()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if self._handle is None:
            return "Channel(closed)"
        return f"Channel(peer={self._handle.peer}, transport={self._handle.transport!r}, closed={self.closed})"
