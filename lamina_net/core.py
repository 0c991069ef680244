"""Endpoints, registered regions, channels and handles.

See ``docs/python-api.md`` for a tour. Contracts (from the C++ headers):

* Operations on one channel are applied at the target in issue order; a put's
  signal is applied only after its data is visible.
* ``put``/``send`` return when the source may be reused; ``iput`` returns a
  :class:`Handle` that completes when the data is applied at the target;
  ``flush`` waits until everything issued before it is applied.
* Every blocking call takes ``timeout=`` (seconds; default: the endpoint's).
* A channel error is sticky; other channels are unaffected.
* ``close()`` is idempotent; every object is a context manager.
"""
from __future__ import annotations

import builtins
import enum
import errno
import operator
import os
import threading
from typing import Any, NamedTuple, Optional, Sequence

from . import _core
from . import _stream
from ._arrays import Buffer, as_buffer, wait_for_producer
from ._membership import claim_rank, release_rank
from .errors import TimeoutError, TransportError, UsageError
from .store import StoreClient, StoreNotAnswering, StoreServer, TorchStoreAdapter, parse_address


class Access(enum.IntFlag):
    """Access rights of a registered region."""

    LOCAL = _core.ACCESS_LOCAL
    REMOTE_WRITE = _core.ACCESS_REMOTE_WRITE
    REMOTE_READ = _core.ACCESS_REMOTE_READ
    REMOTE_ATOMIC = _core.ACCESS_REMOTE_ATOMIC
    ALL = _core.ACCESS_ALL


TRANSPORTS = ("tcp", "shm", "verbs")


#: The largest bound a wait accepts (about 31 years). Every wait in lamina-net
#: is bounded: ``inf`` and larger values are refused, not silently shortened.
MAX_TIMEOUT_S = 1e9


def _check_timeout(timeout: Optional[float], what: str = "timeout") -> float:
    if timeout is None:
        return -1.0
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number of seconds, got {timeout!r}") from None
    if not t >= 0:
        raise UsageError(f"{what} must be >= 0 seconds, got {timeout!r}")
    if t > MAX_TIMEOUT_S:
        raise UsageError(f"{what}={timeout!r} is above the largest bound, {MAX_TIMEOUT_S:g} s: every wait is "
                         "bounded (pass a finite number of seconds)")
    return t


def _check_uint(name: str, value: Any, limit: int = 1 << 64) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise UsageError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0 or value >= limit:
        raise UsageError(f"{name}={value} is out of range")
    return value


def _store_for(store: Any, rank: int, world_size: int, timeout: float):
    """Returns (adapter, server_to_close) for whatever the user passed as store."""
    if store is None:
        store = os.environ.get("LAMINA_NET_STORE")
        if not store and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            # Under torchrun: a store next to torch's, on MASTER_PORT + 1.
            store = f"{os.environ['MASTER_ADDR']}:{int(os.environ['MASTER_PORT']) + 1}"
        if not store:
            raise UsageError("no store given: pass store='host:port', a torch.distributed Store, or set "
                             "LAMINA_NET_STORE")
    if isinstance(store, str):
        try:
            host, port = parse_address(store)
        except ValueError as e:
            raise UsageError(str(e)) from None
        server = None
        if rank == 0:
            try:
                server = StoreServer(host, port)
            except OSError as e:
                # A store already listening there (started by the user) is used as is.
                if e.errno != errno.EADDRINUSE:
                    raise TransportError(f"rank 0 could not host the store on {store}: {e}") from e
        try:
            client = StoreClient(host, port, connect_timeout=timeout)
        except builtins.TimeoutError as e:
            if server:
                server.close()
            raise TimeoutError(str(e)) from e
        return client, server
    if hasattr(store, "set") and hasattr(store, "wait") and type(store).__module__.startswith("torch"):
        return TorchStoreAdapter(store), None
    if isinstance(store, (StoreClient, TorchStoreAdapter)) or (hasattr(store, "set") and hasattr(store, "get")):
        return store, None
    raise UsageError(f"unsupported store {type(store).__name__}: pass 'host:port', a torch.distributed Store or "
                     "an object with set(key, bytes) and get(key, timeout)")


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise UsageError(f"rank/world_size not given and ${name} is not set")
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"${name}={value!r} is not an integer") from None


def _shared_allocation_of(obj) -> "Optional[_core.SharedAllocation]":
    """The SharedAllocation behind a numpy array (made by Endpoint.alloc), if any."""
    while obj is not None:
        if isinstance(obj, _core.SharedAllocation):
            return obj
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
    return None


def _default_tcp_host(store_address: Optional[str]) -> str:
    env = os.environ.get("LAMINA_NET_TCP_HOST")
    if env:
        return env
    if store_address:
        host = store_address.rpartition(":")[0].strip("[]")
        if host in ("localhost",) or host.startswith("127."):
            return "127.0.0.1"
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class RemoteRegion:
    """A peer's region, as described by its owner (a capability).

    Serialize with :meth:`to_bytes`, rebuild with :meth:`from_bytes`.
    """

    __slots__ = ("_desc",)

    def __init__(self, desc: "_core.Descriptor"):
        self._desc = desc

    @classmethod
    def from_bytes(cls, blob: bytes) -> "RemoteRegion":
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise UsageError("descriptor must be bytes")
        return cls(_core.Descriptor.from_bytes(bytes(blob)))

    def to_bytes(self) -> bytes:
        return self._desc.to_bytes()

    @property
    def rank(self) -> int:
        return self._desc.owner_rank

    @property
    def nbytes(self) -> int:
        return self._desc.size

    @property
    def access(self) -> Access:
        return Access(self._desc.access)

    def __repr__(self) -> str:
        return f"RemoteRegion(rank={self.rank}, nbytes={self.nbytes}, access={self.access!r})"


class Region:
    """Local memory registered with an endpoint (zero-copy; the array is kept alive).

    Peers reach it only through its :meth:`descriptor`, within its bounds and
    access rights. Offsets are in bytes.
    """

    def __init__(self, endpoint: "Endpoint", handle: "_core.Region", buffer: Buffer):
        self._endpoint = endpoint
        self._handle = handle
        self._buffer = buffer
        self.array = buffer.owner if not isinstance(buffer.owner, tuple) else buffer.owner[0]

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes

    @property
    def ptr(self) -> int:
        return self._buffer.ptr

    @property
    def access(self) -> Access:
        return Access(self._handle.access)

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live(self) -> "_core.Region":
        if self._handle is None:
            raise UsageError("region is closed")
        return self._handle

    def descriptor(self) -> RemoteRegion:
        """What a peer needs to target this region."""
        return RemoteRegion(self._endpoint._live().describe(self._live()))

    def read_u64(self, offset: int = 0) -> int:
        """Atomically reads the u64 at byte ``offset`` (acquire). GPU memory: copied out (not atomic)."""
        return self._live().load_u64(_check_uint("offset", offset))

    def wait(self, offset: int = 0, value: int = 1, timeout: Optional[float] = None,
             channel: Optional["Channel"] = None, *, stream: Any = None, method: str = "kernel") -> Optional[int]:
        """Waits until the u64 signal word at ``offset`` is >= ``value``; returns it.

        With ``channel``, fails fast (TransportError) if that channel fails. With ``stream``, the
        stream waits instead of the host (returns None at once; the word must be pinned host or
        GPU memory; see :func:`lamina_net._stream.region_wait`).
        """
        if stream is not None:
            return _stream.region_wait(self, offset, value, timeout, channel, stream, method)
        handle = self._live()
        ep = self._endpoint._live()
        ep.wait_signal(handle, _check_uint("offset", offset), _check_uint("value", value), _check_timeout(timeout),
                       channel._live() if channel is not None else None)
        return handle.load_u64(offset)

    def close(self, timeout: Optional[float] = None) -> None:
        """Deregisters the region (waits for inbound writers). Idempotent."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        if not self._endpoint.closed:
            self._endpoint._core.deregister(handle.id, _check_timeout(timeout))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"nbytes={self.nbytes}, access={self.access!r}"
        return f"Region({state})"


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
                try:
                    p = Put(*p)
                except TypeError as e:  # too many or too few fields
                    raise UsageError(f"put {i} of the batch: {e}") from None
            try:
                ptr, n, owner, cuda = self._source(p.src, p.src_offset, p.nbytes)
                items.append((ptr, n, self._remote(p.dst), _check_uint("dst_offset", p.dst_offset),
                              self._remote(p.signal) if p.signal is not None else None,
                              _check_uint("signal_offset", p.signal_offset),
                              _check_uint("signal_add", p.signal_add), cuda))
            except UsageError as e:  # named like the C++ checks' messages
                raise UsageError(f"put {i} of the batch: {e}") from None
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


class Endpoint:
    """This process's presence in a group of ``world_size`` ranks.

    ``store``: a ``torch.distributed`` Store, ``"host:port"`` (rank 0 hosts a
    standalone store there), an object with ``set``/``get(key, timeout)``, or
    None (``LAMINA_NET_STORE``, or torchrun's ``MASTER_ADDR``/``MASTER_PORT`` + 1).
    ``transports``: which to enable (default all available).
    ``rank``/``world_size`` default to ``$RANK``/``$WORLD_SIZE`` (torchrun).
    """

    def __init__(self, rank: Optional[int] = None, world_size: Optional[int] = None, store: Any = None, *,
                 group: str = "default",
                 timeout: Optional[float] = None, transports=("shm", "tcp", "verbs"), tcp_host: Optional[str] = None,
                 ib_device: str = "", ib_port: int = -1, ib_gid_index: int = -1):
        self._core = None
        self._server = None
        self._store = None
        self._claimed = False
        self._regions: list = []
        self._channels: dict = {}
        self._lock = threading.Lock()
        # Under torchrun (or any launcher that sets them), RANK / WORLD_SIZE.
        if rank is None:
            rank = _env_int("RANK")
        if world_size is None:
            world_size = _env_int("WORLD_SIZE")
        if isinstance(rank, bool) or not isinstance(rank, int) or isinstance(world_size, bool) or \
                not isinstance(world_size, int):
            raise UsageError("rank and world_size must be ints")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside [0, world_size={world_size})")
        if not isinstance(group, str) or not group or "/" in group:
            raise UsageError("group must be a non-empty string without '/'")
        if timeout is None:
            timeout = _check_timeout(os.environ.get("LAMINA_NET_TIMEOUT", "60") or "60", "LAMINA_NET_TIMEOUT")
        timeout = _check_timeout(timeout)
        if timeout <= 0:
            raise UsageError("timeout must be > 0 seconds")
        transports = tuple(transports)
        for t in transports:
            if t not in TRANSPORTS:
                raise UsageError(f"unknown transport {t!r} (expected one of {', '.join(TRANSPORTS)})")
        self.timeout = timeout
        self._group = group
        self._store, self._server = _store_for(store, rank, world_size, timeout)
        store_address = store if isinstance(store, str) else getattr(self._store, "address", None)
        self._claimed, self._rank_claimed = False, rank
        try:
            self._claimed = claim_rank(self._store, group, rank, world_size, timeout)
            self._core = _core.Endpoint(rank, world_size, self._store, group, timeout,
                                        tcp_host or _default_tcp_host(store_address), list(transports),
                                        ib_device, ib_port, ib_gid_index)
        except BaseException:
            self._close_store()
            raise

    # ---- properties
    @property
    def rank(self) -> int:
        return self._live().rank

    @property
    def world_size(self) -> int:
        return self._live().world_size

    @property
    def closed(self) -> bool:
        return self._core is None

    @property
    def transports(self) -> list:
        """Transports usable on this endpoint."""
        return list(self._live().available_transports()[0])

    @property
    def verbs_unavailable_reason(self) -> str:
        return self._live().available_transports()[1]

    def _live(self) -> "_core.Endpoint":
        if self._core is None:
            raise UsageError("endpoint is closed")
        return self._core

    # ---- memory
    def register(self, array, access: Access = Access.ALL) -> Region:
        """Registers ``array``'s memory (zero-copy) with the given access rights."""
        try:
            access = Access(access)
        except ValueError:
            raise UsageError(f"invalid access flags {access!r}") from None
        buf = as_buffer(array, writable=bool(access & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC)))
        if buf.cuda and not _core.HAVE_CUDA:
            raise UsageError("CUDA memory needs lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON)")
        if buf.nbytes == 0:
            raise UsageError("cannot register an empty array")
        handle = self._live().register_memory(buf.ptr, buf.nbytes, int(access), buf.cuda, buf.device,
                                              _shared_allocation_of(buf.owner))
        region = Region(self, handle, buf)
        with self._lock:
            self._regions.append(region)
        return region

    def alloc(self, shape, dtype="uint8", access: Access = Access.ALL) -> Region:
        """Allocates a zeroed numpy array in shareable memory and registers it.

        Same-host peers put into such a region with one memcpy straight into
        it (the shm transport maps it), the fastest path for large puts.
        The array is ``region.array``.
        """
        import numpy as np

        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise UsageError("cannot allocate an array of Python objects")
        try:
            shape = (operator.index(shape),) if not isinstance(shape, (tuple, list)) else \
                tuple(operator.index(d) for d in shape)
        except TypeError:
            raise UsageError(f"invalid shape {shape!r}: expected an int or a tuple of ints") from None
        if any(d < 0 for d in shape):
            raise UsageError(f"invalid shape {shape!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            raise UsageError("cannot allocate an empty array")
        allocation = _core.SharedAllocation(nbytes)
        array = np.frombuffer(allocation, dtype=dtype).reshape(shape)
        return self.register(array, access)

    def publish(self, name: str, region: Region) -> None:
        """Makes ``region``'s descriptor available to peers under ``name``."""
        if not isinstance(region, Region):
            raise UsageError("publish needs a Region")
        self._live_store().set(self._key(self.rank, name), region.descriptor().to_bytes())

    def lookup(self, peer: int, name: str, timeout: Optional[float] = None) -> RemoteRegion:
        """Fetches the descriptor ``peer`` published under ``name`` (waits, bounded)."""
        peer = _check_uint("peer", peer, self.world_size)
        t = self.timeout if timeout is None else _check_timeout(timeout)
        try:
            blob = self._live_store().get(self._key(peer, name), t)
        except StoreNotAnswering:
            raise
        except builtins.TimeoutError as e:
            raise TimeoutError(f"rank {peer} did not publish region {name!r} within {t:.3g} s") from e
        return RemoteRegion.from_bytes(blob)

    def _live_store(self):
        if self._core is None or self._store is None:
            raise UsageError("endpoint is closed")
        return self._store

    def _key(self, rank: int, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise UsageError("region name must be a non-empty string")
        return f"ln/{self._group}/regions/{rank}/{name}"

    # ---- channels
    def channel(self, peer: int, transport: str = "auto", *, tag: int = 0,
                timeout: Optional[float] = None) -> Channel:
        """The channel to ``peer`` (created on first call; both ranks must call it).

        ``transport``: "auto" (shm on the same host, else verbs, else tcp),
        "shm", "tcp" or "verbs".
        """
        if transport not in TRANSPORTS + ("auto",):
            raise UsageError(f"unknown transport {transport!r} (expected auto, {', '.join(TRANSPORTS)})")
        handle = self._live().channel(_check_uint("peer", peer, 1 << 31), transport, _check_uint("tag", tag, 1 << 31),
                                      _check_timeout(timeout))
        with self._lock:
            key = (handle.peer, tag)
            ch = self._channels.get(key)
            if ch is None or ch._handle is not handle:
                ch = Channel(self, handle)
                self._channels[key] = ch
        return ch

    @property
    def stream_error(self) -> Optional[str]:
        """What the first failed ``Region.wait(..., stream=)`` without a channel was, or None."""
        return _stream.endpoint_stream_error(self)

    def choose_transport(self, peer: int, timeout: Optional[float] = None) -> tuple:
        """(transport, reason) that ``channel(peer, "auto")`` would pick."""
        t = self.timeout if timeout is None else _check_timeout(timeout)
        return tuple(self._live().choose_transport(_check_uint("peer", peer, self.world_size), t))

    def barrier(self, name: str = "barrier", timeout: Optional[float] = None) -> None:
        """Waits until every rank reached a barrier of this name (through the store)."""
        t = self.timeout if timeout is None else _check_timeout(timeout)
        store = self._live_store()
        store.set(f"ln/{self._group}/barrier/{name}/{self.rank}", b"1")
        for r in range(self.world_size):
            try:
                store.get(f"ln/{self._group}/barrier/{name}/{r}", t)
            except StoreNotAnswering:
                raise
            except builtins.TimeoutError as e:
                raise TimeoutError(f"barrier {name!r}: rank {r} did not arrive within {t:.3g} s") from e

    # ---- lifetime
    def close(self) -> None:
        """Closes channels, deregisters regions, stops hosting the store. Idempotent."""
        if self._core is None:
            return
        core, self._core = self._core, None
        core.close()
        with self._lock:
            for region in self._regions:
                region._handle = None
            self._regions.clear()
            for channel in self._channels.values():
                channel._release()
            self._channels.clear()
        self._close_store()

    def _close_store(self) -> None:
        if self._claimed and self._store is not None:
            self._claimed = False
            release_rank(self._store, self._group, self._rank_claimed)
        if self._store is not None and isinstance(self._store, StoreClient):
            self._store.close()
        self._store = None
        if self._server is not None:
            # Peers may still be reading their last keys (a barrier's): give
            # them a moment to hang up before the store goes.
            self._server.close(linger=min(self.timeout, 5.0) if hasattr(self, "timeout") else 0.0)
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if self._core is None:
            return "Endpoint(closed)"
        return f"Endpoint(rank={self.rank}, world_size={self.world_size}, transports={self.transports})"
