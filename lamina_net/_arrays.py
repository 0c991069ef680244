"""Zero-copy access to the memory behind arrays.

Accepts numpy arrays, torch tensors, cupy arrays, objects with ``__dlpack__``
or ``__cuda_array_interface__``, and anything with the buffer protocol
(bytes, bytearray, memoryview, array.array). Only C-contiguous memory is
accepted; nothing is copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Buffer:
    """Raw view of an array's memory. ``owner`` keeps the memory alive."""

    ptr: int
    nbytes: int
    readonly: bool
    cuda: bool
    device: int
    owner: Any


def _from_numpy(np, arr) -> Buffer:
    if arr.dtype.hasobject:
        raise UsageError("arrays of Python objects cannot be sent or registered (dtype=object)")
    if not arr.flags.c_contiguous:
        raise UsageError("array must be C-contiguous (use numpy.ascontiguousarray)")
    return Buffer(arr.__array_interface__["data"][0], int(arr.nbytes), not arr.flags.writeable, False, -1, arr)


def _from_torch(t) -> Buffer:
    if not t.is_contiguous():
        raise UsageError("tensor must be contiguous (use .contiguous())")
    if t.device.type == "cuda":
        return Buffer(int(t.data_ptr()), int(t.numel() * t.element_size()), False, True,
                      int(t.device.index or 0), t)
    if t.device.type != "cpu":
        raise UsageError(f"tensors on device {t.device.type!r} are not supported (cpu or cuda)")
    return Buffer(int(t.data_ptr()), int(t.numel() * t.element_size()), False, False, -1, t)


def _from_cuda_interface(obj) -> Buffer:
    iface = obj.__cuda_array_interface__
    shape = tuple(iface["shape"])
    itemsize = int(iface["typestr"][2:])
    strides = iface.get("strides")
    if strides is not None:
        expected, step = [], itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        if tuple(reversed(expected)) != tuple(strides) and any(d > 1 for d in shape):
            raise UsageError("CUDA array must be C-contiguous")
    n = itemsize
    for dim in shape:
        n *= dim
    ptr, readonly = iface["data"]
    device = getattr(getattr(obj, "device", None), "id", 0)
    return Buffer(int(ptr), int(n), bool(readonly), True, int(device or 0), obj)


def as_buffer(obj: Any, *, writable: bool = False) -> Buffer:
    """Returns the memory behind ``obj`` without copying.

    Raises UsageError for non-contiguous, read-only (when ``writable``),
    object-typed or unsupported inputs.
    """
    import numpy as np

    if obj is None:
        raise UsageError("expected an array, got None")
    if isinstance(obj, np.ndarray):
        buf = _from_numpy(np, obj)
    elif type(obj).__module__.split(".")[0] == "torch":
        buf = _from_torch(obj)
    elif hasattr(obj, "__cuda_array_interface__"):
        buf = _from_cuda_interface(obj)
    elif hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        device_type, _ = obj.__dlpack_device__()
        if int(device_type) != 1:  # kDLCPU
            raise UsageError(f"DLPack device type {device_type} is not supported without __cuda_array_interface__")
        buf = _from_numpy(np, np.from_dlpack(obj))
        buf = Buffer(buf.ptr, buf.nbytes, buf.readonly, False, -1, (obj, buf.owner))
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            raise UsageError(f"{type(obj).__name__} is not an array: it has no buffer protocol, DLPack or "
                             "__cuda_array_interface__") from None
        if not view.c_contiguous:
            raise UsageError("buffer must be C-contiguous")
        arr = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
        ptr = arr.__array_interface__["data"][0] if view.nbytes else 0
        buf = Buffer(ptr, view.nbytes, view.readonly, False, -1, (obj, view, arr))
    if writable and buf.readonly:
        raise UsageError("array is read-only but is written to")
    return buf


def wait_for_producer(obj: Any) -> None:
    """Blocks until the stream work that produced GPU array ``obj`` is done.

    What a host-path put of GPU memory does before any transport reads it
    (tcp/shm copy it on a stream of lamina-net's own; verbs reads it in place):
    torch tensors wait for torch's current stream on their device; other
    objects for the ``stream`` of their ``__cuda_array_interface__`` (v3:
    None means there is nothing to wait for). Nothing for host memory.
    """
    if type(obj).__module__.split(".")[0] == "torch":
        if obj.device.type == "cuda":
            import torch

            torch.cuda.current_stream(obj.device).synchronize()
        return
    iface = getattr(obj, "__cuda_array_interface__", None)
    if not isinstance(iface, dict):
        return
    stream = iface.get("stream")
    if stream is None:
        return
    if isinstance(stream, bool) or not isinstance(stream, int) or stream <= 0:
        raise UsageError(f"__cuda_array_interface__ 'stream' must be None or a positive cudaStream_t, got {stream!r}")
    from . import _core

    _core.cuda_stream_synchronize(stream)
