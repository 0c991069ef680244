"""Registered regions, their peers' descriptors, access rights and argument checks.

The layer below channels and endpoints (lamina_net.channel, lamina_net.core):
a :class:`Region` is memory of this endpoint that peers may reach, a
:class:`RemoteRegion` a peer's region as its owner described it.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Optional

from . import _core
from . import _stream
from ._arrays import Buffer
from .errors import UsageError

if TYPE_CHECKING:
    from .channel import Channel
    from .core import Endpoint


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
