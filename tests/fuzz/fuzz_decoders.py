"""Coverage-guided fuzzing (atheris) of the decoders of bytes that come from a
peer or the store:

  descriptor  RegionDescriptor wire form (RemoteRegion.from_bytes, C++ deserialize)
  store       the standalone store's request parser (StoreServer's handler)
  device      device-ring descriptors executed by the proxy (a buggy or hostile
              kernel's descriptors): refused or applied in bounds, never a
              write outside the target window

  python tests/fuzz/fuzz_decoders.py TARGET [libFuzzer flags, e.g. -runs=100000]

Any exception other than the typed ones, a crash, or a byte changed outside
the target window is a finding (atheris stops and prints the input).
"""
from __future__ import annotations

import os
import struct
import sys
import threading

import atheris

import lamina_net as ln  # noqa: E402
from lamina_net import store as store_mod  # noqa: E402

# Coverage feedback from the Python decoders (the C++ ones are compiled
# without it: there the fuzzer searches blind, guided by the Python side).
atheris.instrument_func(store_mod._Handler._serve_requests)
atheris.instrument_func(store_mod._recv_field)
atheris.instrument_func(store_mod._recv_exact)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "device"))


# ---- descriptor

def descriptor_one(data: bytes) -> None:
    try:
        ln.RemoteRegion.from_bytes(data)
    except ln.UsageError:
        pass


# ---- store

class _FakeSocket:
    """Feeds the handler the fuzz input as if a client had sent it."""

    def __init__(self, data: bytes):
        self.data, self.at, self.sent = data, 0, 0

    def recv(self, n: int) -> bytes:
        chunk = self.data[self.at:self.at + n]
        self.at += len(chunk)
        return chunk

    def sendall(self, b: bytes) -> None:
        self.sent += len(b)

    def setsockopt(self, *args) -> None:
        pass


class _FakeServer:
    def __init__(self):
        self.data: dict = {}
        self.cond = threading.Condition()
        self.stopping = True  # a get never waits
        self.clients = 0


def store_one(data: bytes) -> None:
    handler = store_mod._Handler.__new__(store_mod._Handler)
    server = _FakeServer()
    handler._serve_requests(server, _FakeSocket(data))  # must swallow every malformed request
    for key, value in server.data.items():
        assert isinstance(key, str) and isinstance(value, bytes) and len(value) <= store_mod._MAX_FIELD


# ---- device

class _DeviceRig:
    """Two endpoints of this process joined by an shm channel; the target's
    window is the middle of a guarded allocation."""

    def __init__(self):
        import numpy as np
        from harness import free_port

        from producers import build, load

        self.np = np
        self.lib = load(build())
        store = f"127.0.0.1:{free_port()}"
        self.ep0 = ln.Endpoint(0, 2, store, group="fuzz-device", timeout=5)
        self.ep1 = ln.Endpoint(1, 2, store, group="fuzz-device", timeout=5)
        self.big = self.ep1.alloc(3 * 4096, np.uint8, ln.Access.LOCAL)
        self.win = self.ep1.register(self.big.array[4096:8192], ln.Access.ALL)
        self.src = self.ep0.alloc(8192, np.uint8, ln.Access.ALL)
        self.src.array[:] = 0xAB
        self.ep1.publish("win", self.win)
        other = threading.Thread(target=lambda: setattr(self, "ch1", self.ep1.channel(0, "shm")))
        other.start()
        self.ch0 = self.ep0.channel(1, "shm")
        other.join()
        self.remote = self.ep0.lookup(1, "win")

    def one(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        opcode = fdp.ConsumeIntInRange(0, 6)
        src_w, dst_w, sig_w = (fdp.ConsumeIntInRange(0, 3) for _ in range(3))
        pick = lambda: fdp.ConsumeIntInRange(0, 9000) if fdp.ConsumeBool() else fdp.ConsumeInt(8)  # noqa: E731
        src_off, dst_off, nbytes, sig_off = pick() % (1 << 64), pick() % (1 << 64), pick() % (1 << 64), pick() % (1 << 64)
        with self.ch0.device([self.src], [self.remote, self.remote], timeout=2, ring_slots=4) as dev:
            h = dev.handle()
            rc = self.lib.ln_post_raw(h, opcode, src_w, src_off, dst_w, dst_off, nbytes, sig_w, sig_off, 1)
            if rc == 0:
                self.lib.ln_flush(h)
        arr = self.big.array
        assert not arr[:4096].any() and not arr[8192:].any(), "a descriptor wrote outside the target window"
        self.win.array[:] = 0
        if self.ch0.failed() is not None or self.ch1.failed() is not None:
            # A refused frame closes the channel (by design): open a fresh pair.
            tag = getattr(self, "tag", 0) + 1
            self.tag = tag
            other = threading.Thread(target=lambda: setattr(self, "ch1", self.ep1.channel(0, "shm", tag=tag)))
            other.start()
            self.ch0 = self.ep0.channel(1, "shm", tag=tag)
            other.join()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("descriptor", "store", "device"):
        raise SystemExit(__doc__)
    target = sys.argv.pop(1)
    if target == "device":
        rig = _DeviceRig()
        one = rig.one
    else:
        one = {"descriptor": descriptor_one, "store": store_one}[target]
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
