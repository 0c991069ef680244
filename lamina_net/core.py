"""Endpoints: a rank's place in a group, its regions and its channels.

Regions are in :mod:`lamina_net.region`, channels and handles in
:mod:`lamina_net.channel`; all are importable from here too. See
``docs/python-api.md`` for a tour. Contracts (from the C++ headers):

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
import errno
import operator
import os
import threading
from typing import Any, Optional

from . import _core
from . import _stream
from ._arrays import as_buffer
from ._membership import claim_rank, release_rank
from .errors import TimeoutError, TransportError, UsageError
from .store import StoreClient, StoreNotAnswering, StoreServer, TorchStoreAdapter, parse_address
# Re-exported: lamina_net.core is where the public classes have always been importable from.
from .channel import Channel, Handle, Put  # noqa: F401
from .region import TRANSPORTS, Access, Region, RemoteRegion, _check_timeout, _check_uint  # noqa: F401


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
