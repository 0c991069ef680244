"""Exception types of lamina-net.

Every failure raised by lamina-net is a :class:`LaminaError`:

* :class:`UsageError` (also a ``ValueError``): the caller asked for something
  invalid - a slice outside a region, a closed object, a missing access right,
  a non-contiguous array. Nothing was sent or written.
* :class:`TransportError`: the OS, the network, a peer or a transport failed.
  The channel that saw it stays failed (later operations raise the same reason).
* :class:`TimeoutError` (also the builtin ``TimeoutError``): a bounded wait
  expired; the message names what was awaited.
"""
import builtins


class LaminaError(Exception):
    """Base class of every lamina-net error."""


class UsageError(LaminaError, ValueError):
    """Invalid use of the API; nothing was sent or written."""


class TransportError(LaminaError):
    """A system, network or peer failure; sticky on the channel that saw it."""


class TimeoutError(LaminaError, builtins.TimeoutError):  # noqa: A001 - deliberate, subclasses the builtin
    """A bounded wait expired."""


__all__ = ["LaminaError", "UsageError", "TransportError", "TimeoutError"]
