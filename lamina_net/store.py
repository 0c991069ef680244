"""Key-value stores for bootstrap.

lamina-net ranks find each other through a key-value store. Three kinds work:

* a ``torch.distributed`` Store (``TCPStore``, ``FileStore``, ...), passed as is;
* :class:`StoreServer` / :class:`StoreClient`: a small standalone TCP store
  that needs no torch (``"host:port"``: rank 0 hosts it, the others connect);
* anything with ``set(key, bytes)`` and ``get(key, timeout_s) -> bytes``.

This module is pure Python and needs nothing else from lamina_net but its
error types, so independent peers (e.g. interoperability tests) can load it
by path (then builtin stand-ins of those types are used).
"""
from __future__ import annotations

import builtins
import selectors
import socket
import socketserver
import struct
import threading
import time
from typing import Optional

try:
    from .errors import TimeoutError, TransportError, UsageError
except ImportError:  # loaded by path, outside the package
    TimeoutError = builtins.TimeoutError  # noqa: A001

    class TransportError(ConnectionError):
        pass

    class UsageError(ValueError):
        pass



class StoreNotAnswering(TimeoutError):
    """The store accepted the request but did not answer within the bound."""


_OP_SET = 1
_OP_GET = 2  # waits until the key exists or the timeout passes
_OP_ADD = 3

_STATUS_OK = 0
_STATUS_TIMEOUT = 1
_STATUS_BAD = 2

# A server that does not answer a get within its own timeout plus this is
# taken as stopped or gone.
_REPLY_GRACE_S = 0.5

_MAX_FIELD = 64 << 20  # refuses absurd lengths from a broken or hostile client


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("store connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _send_fields(sock: socket.socket, *fields: bytes) -> None:
    sock.sendall(b"".join(struct.pack("<I", len(f)) + f for f in fields))


def _recv_field(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<I", _recv_exact(sock, 4))
    if n > _MAX_FIELD:
        raise ConnectionError(f"store field of {n} bytes refused")
    return _recv_exact(sock, n)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with server.cond:
            server.clients += 1
        try:
            self._serve_requests(server, sock)
        finally:
            with server.cond:
                server.clients -= 1
                server.cond.notify_all()

    def _serve_requests(self, server: "_Server", sock: socket.socket) -> None:
        try:
            while True:
                op = _recv_exact(sock, 1)[0]
                key = _recv_field(sock).decode()
                arg = _recv_field(sock)
                if op == _OP_SET:
                    with server.cond:
                        server.data[key] = arg
                        server.cond.notify_all()
                    _send_fields(sock, bytes([_STATUS_OK]))
                elif op == _OP_GET:
                    (timeout,) = struct.unpack("<d", arg)
                    deadline = time.monotonic() + max(0.0, timeout)
                    with server.cond:
                        while key not in server.data:
                            left = deadline - time.monotonic()
                            if left <= 0 or server.stopping:
                                break
                            server.cond.wait(left)  # close() notifies too
                        value = server.data.get(key)
                    if value is None:
                        _send_fields(sock, bytes([_STATUS_TIMEOUT]))
                    else:
                        _send_fields(sock, bytes([_STATUS_OK]), value)
                elif op == _OP_ADD:
                    (delta,) = struct.unpack("<q", arg)
                    with server.cond:
                        try:
                            value = int(server.data.get(key, b"0")) + delta
                        except ValueError:  # the key holds something else (found by fuzzing)
                            value = None
                        if value is not None:
                            server.data[key] = str(value).encode()
                            server.cond.notify_all()
                    if value is None:
                        _send_fields(sock, bytes([_STATUS_BAD]))
                    else:
                        _send_fields(sock, bytes([_STATUS_OK]), str(value).encode())
                else:
                    _send_fields(sock, bytes([_STATUS_BAD]))
                    return
        except (ConnectionError, OSError, struct.error, UnicodeDecodeError):
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr):
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.clients = 0  # connections being served
        super().__init__(addr, _Handler)


class StoreServer:
    """A standalone store server on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = _Server((host, port))
        # Never blocks in accept: the loop below only calls it once the
        # socket is readable, and a client that vanished in between is skipped.
        self._server.socket.setblocking(False)
        self.host, self.port = self._server.server_address[:2]
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="lamina-net-store", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # Sleeps until a client connects or close() writes to the wake socket:
        # no periodic wake-ups (socketserver's serve_forever polls 10 times a
        # second, each a preemption of a rank spinning on a busy core).
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._wake_reader for key, _ in ready):
                    return
                self._server.handle_request()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self, linger: float = 0.0) -> None:
        """Stops serving. Idempotent.

        ``linger``: first wait up to that many seconds for connected clients to
        hang up, so that a rank hosting the store does not take it away from
        peers still reading their last keys (a barrier's, say).
        """
        if self._thread is None:
            return
        deadline = time.monotonic() + max(0.0, linger)
        with self._server.cond:
            while self._server.clients > 0 and time.monotonic() < deadline:
                self._server.cond.wait(max(0.001, deadline - time.monotonic()))
        with self._server.cond:
            self._server.stopping = True
            self._server.cond.notify_all()
        self._wake_writer.send(b"x")
        self._thread.join(timeout=5)
        self._server.server_close()
        self._wake_reader.close()
        self._wake_writer.close()
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StoreClient:
    """Client of :class:`StoreServer`. Thread-safe; reconnects are not attempted.

    Every call is bounded: ``get`` by its ``timeout`` (the server answers
    "timed out" then; a server that does not answer at all is given
    :data:`_REPLY_GRACE_S` more), ``set`` and ``add`` by ``op_timeout``
    (default: ``connect_timeout``). A call that times out or loses the
    connection leaves the client unusable (the reply stream is out of step);
    errors are :class:`lamina_net.TimeoutError` and
    :class:`lamina_net.TransportError`.
    """

    def __init__(self, host: str, port: int, connect_timeout: float = 60.0, op_timeout: Optional[float] = None):
        deadline = time.monotonic() + connect_timeout
        last: Optional[Exception] = None
        while True:
            try:
                self._sock = socket.create_connection((host, port), timeout=max(0.01, min(5.0, connect_timeout)))
                break
            except OSError as e:  # the server may not be up yet
                last = e
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"could not reach the store at {host}:{port}: {last}") from e
                time.sleep(0.05)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self._broken: Optional[str] = None
        self.address = f"{host}:{port}"
        self.op_timeout = connect_timeout if op_timeout is None else op_timeout

    def _call(self, op: int, key: str, arg: bytes, bound_s: float) -> list:
        with self._lock:
            if self._sock is None:
                raise UsageError("store client is closed")
            if self._broken:
                raise TransportError(f"store at {self.address} is unusable: {self._broken}")
            self._sock.settimeout(max(0.001, bound_s))
            try:
                self._sock.sendall(bytes([op]))
                _send_fields(self._sock, key.encode(), arg)
                status = _recv_field(self._sock)[0]
                if status == _STATUS_TIMEOUT:
                    return [None]
                if status != _STATUS_OK:
                    raise TransportError(f"store at {self.address} refused the request for {key!r}")
                return [_recv_field(self._sock)] if op != _OP_SET else [b""]
            except socket.timeout:
                self._broken = f"no answer for {key!r} within {bound_s:.3g} s"
                raise StoreNotAnswering(f"store at {self.address} did not answer the request for {key!r} within "
                                   f"{bound_s:.3g} s (is the store process stopped or overloaded?)") from None
            except (ConnectionError, OSError) as e:
                self._broken = f"connection lost ({e})"
                raise TransportError(f"store at {self.address} is unreachable (connection lost: {e}); "
                                     "did the rank hosting the store exit?") from None

    def set(self, key: str, value: bytes) -> None:
        if isinstance(value, str):
            value = value.encode()
        self._call(_OP_SET, key, bytes(value), self.op_timeout)

    def get(self, key: str, timeout: float = 300.0) -> bytes:
        """Returns the value of ``key``, waiting up to ``timeout`` seconds for it."""
        timeout = float(timeout)
        (value,) = self._call(_OP_GET, key, struct.pack("<d", timeout), timeout + _REPLY_GRACE_S)
        if value is None:
            raise TimeoutError(f"store key {key!r} did not appear within {timeout:.3g} s")
        return value

    def add(self, key: str, delta: int) -> int:
        (value,) = self._call(_OP_ADD, key, struct.pack("<q", int(delta)), self.op_timeout)
        return int(value)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchStoreAdapter:
    """Adapts a ``torch.distributed.Store`` to ``set(key, bytes)`` / ``get(key, timeout)``."""

    def __init__(self, store):
        self.store = store

    def set(self, key: str, value: bytes) -> None:
        self.store.set(key, value)

    def add(self, key: str, delta: int) -> int:
        return int(self.store.add(key, int(delta)))

    def get(self, key: str, timeout: float = 300.0) -> bytes:
        import datetime

        try:
            self.store.wait([key], datetime.timedelta(seconds=max(timeout, 0.001)))
        except RuntimeError as e:  # torch reports a wait timeout as RuntimeError/DistStoreError
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                raise TimeoutError(f"store key {key!r} did not appear within {timeout:.3g} s") from e
            raise TransportError(f"torch store: {e}") from e
        return bytes(self.store.get(key))


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"store address must be 'host:port', got {address!r}")
    return host.strip("[]"), int(port)
