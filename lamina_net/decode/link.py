"""The decode pipeline's only contact with the transport.

A :class:`Link` moves contiguous torch CPU tensors to and from one peer as
ordered two-sided messages. :class:`ChannelLink` runs over a
``lamina_net.Channel`` (zero-copy: tensors are handed to ``isend``/``irecv``
as they are) and turns lamina-net failures into :class:`WorkerFailure` naming
the peer. :class:`LoopbackLink` serves an in-process
:class:`~.attention_shard.AttentionServer` instead (no transport; used for
unit tests of the model-side code and as ``--transport loopback``).
"""
from __future__ import annotations

import collections
import time

import torch


class PipelineError(RuntimeError):
    """The decode pipeline cannot go on (a worker failed, timed out or misbehaved)."""


class WorkerFailure(PipelineError):
    """A peer of the pipeline failed, or did not answer in time."""

    def __init__(self, peer: str, action: str, cause: BaseException, link: "Link | None" = None):
        self.peer, self.action, self.cause = peer, action, cause
        self.link = link  # the link that failed, when known (recovery replaces the worker behind it)
        kind = "timed out" if isinstance(cause, TimeoutError) else "failed"
        super().__init__(f"{peer} {kind} while {action}: {type(cause).__name__}: {cause}")


class Pending:
    """A posted non-blocking operation; ``wait`` returns the byte count moved."""

    def wait(self, timeout: float | None = None) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def done(self) -> bool:
        """True when ``wait`` would not block (best effort: False when unknown)."""
        return False


class Link:
    """Ordered two-sided messages with one peer (an attention worker or the model worker)."""

    peer: str = "peer"

    def isend(self, tensor: torch.Tensor) -> Pending:  # pragma: no cover - interface
        raise NotImplementedError

    def irecv(self, tensor: torch.Tensor) -> Pending:  # pragma: no cover - interface
        raise NotImplementedError

    def send(self, tensor: torch.Tensor, timeout: float | None = None) -> None:
        self.isend(tensor).wait(timeout)

    def recv(self, tensor: torch.Tensor, timeout: float | None = None) -> int:
        return self.irecv(tensor).wait(timeout)

    def close(self) -> None:
        pass


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        raise ValueError("links move CPU tensors; stage device tensors through a CPU buffer")
    if not tensor.is_contiguous():
        raise ValueError("links need contiguous tensors (they are passed zero-copy)")
    return tensor.reshape(-1).view(torch.uint8)


class _ChannelPending(Pending):
    def __init__(self, link: "ChannelLink", handle, action: str, keepalive: torch.Tensor):
        self.link, self.handle, self.action = link, handle, action
        self.keepalive = keepalive  # the buffer must outlive the operation
        self.nbytes: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.nbytes is None:
            try:
                result = self.handle.wait(self.link.timeout if timeout is None else timeout)
            except self.link.errors as err:
                raise WorkerFailure(self.link.peer, self.action, err, self.link) from err
            self.nbytes = int(result) if result is not None else self.keepalive.numel()
            self.keepalive = None
        return self.nbytes

    def done(self) -> bool:
        if self.nbytes is not None:
            return True
        try:
            return bool(self.handle.test())
        except self.link.errors:
            return True  # wait() raises the failure


class ChannelLink(Link):
    """A :class:`Link` over a ``lamina_net.Channel``."""

    def __init__(self, channel, peer: str, timeout: float | None = None):
        import lamina_net

        self.channel, self.peer, self.timeout = channel, peer, timeout
        # lamina_net.TimeoutError is also the builtin TimeoutError.
        self.errors = (lamina_net.LaminaError, TimeoutError)

    def _post(self, method, tensor: torch.Tensor, action: str) -> Pending:
        data = _byte_view(tensor)
        try:
            handle = method(data)
        except self.errors as err:
            raise WorkerFailure(self.peer, action, err, self) from err
        return _ChannelPending(self, handle, action, data)

    def isend(self, tensor: torch.Tensor) -> Pending:
        return self._post(self.channel.isend, tensor, "sending")

    def irecv(self, tensor: torch.Tensor) -> Pending:
        return self._post(self.channel.irecv, tensor, "receiving")

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:  # closing after a failure must not mask the failure
            pass


class _Done(Pending):
    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def wait(self, timeout: float | None = None) -> int:
        return self.nbytes

    def done(self) -> bool:
        return True


class _LoopbackReceive(Pending):
    def __init__(self, link: "LoopbackLink", out: torch.Tensor):
        self.link, self.out, self.nbytes = link, _byte_view(out), None

    def wait(self, timeout: float | None = None) -> int:
        if self.nbytes is None:
            if not self.link.replies:
                raise WorkerFailure(self.link.peer, "receiving", TimeoutError("no reply queued (protocol bug)"))
            reply = self.link.replies.popleft()
            if reply.numel() > self.out.numel():
                raise PipelineError(f"reply of {reply.numel()} bytes does not fit a {self.out.numel()}-byte buffer")
            self.out[:reply.numel()].copy_(reply)
            self.nbytes = reply.numel()
        return self.nbytes

    def done(self) -> bool:
        return True


class LoopbackLink(Link):
    """Serves an in-process attention server: every send is handled at once."""

    def __init__(self, server, peer: str = "loopback attention worker"):
        self.server, self.peer = server, peer
        self.replies: collections.deque[torch.Tensor] = collections.deque()
        self.busy_seconds = 0.0

    def isend(self, tensor: torch.Tensor) -> Pending:
        data = _byte_view(tensor)
        started = time.perf_counter()
        reply = self.server.handle(data)
        self.busy_seconds += time.perf_counter() - started
        if reply is not None:
            self.replies.append(_byte_view(reply.contiguous()).clone())
        return _Done(data.numel())

    def irecv(self, tensor: torch.Tensor) -> Pending:
        return _LoopbackReceive(self, tensor)
