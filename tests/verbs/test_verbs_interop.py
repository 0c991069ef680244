"""Interoperability with an independent verbs peer: rdma-core's pyverbs.

The peer (tests/verbs/pyverbs_peer.py, run by Debian's /usr/bin/python3 with
python3-pyverbs) shares no code with lamina-net. It connects an RC QP to a
lamina-net verbs channel through the same store, RDMA-WRITEs into a lamina-net
region and bumps its signal word with an atomic; lamina-net then puts (with a
signal) into the peer's memory region.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import verbs_ranks as vr  # noqa: E402

import lamina_net as ln  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
PEER = os.path.join(os.path.dirname(__file__), "pyverbs_peer.py")


def _pyverbs_missing() -> str | None:
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyverbs.device"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "Debian's python3-pyverbs is not installed (scripts/softroce/setup.sh installs it)"
    return None


_SKIP = vr.verbs_skip_reason() or _pyverbs_missing()
pytestmark = [pytest.mark.verbs, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def test_pyverbs_peer_writes_into_lamina_and_lamina_writes_into_it():
    group = "interop"
    store = f"127.0.0.1:{vr.free_port()}"
    with ln.Endpoint(0, 2, store, group=group, timeout=60, transports=("verbs",)) as ep:
        buf = np.zeros(1 << 20, np.uint8)
        sig = np.zeros(1, np.uint64)
        rbuf, rsig = ep.register(buf, ln.Access.REMOTE_WRITE), ep.register(sig, ln.Access.REMOTE_ATOMIC)
        ep.publish("buf", rbuf)
        ep.publish("sig", rsig)
        peer = subprocess.Popen([SYSTEM_PYTHON, PEER, store, group], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            ch = ep.channel(1, "verbs", timeout=60)
            # The peer's WRITE + ATOMIC: the signal implies the data is there.
            rsig.wait(0, 1, timeout=60, channel=ch)
            offset, length, expected = ep._store.get("interop/peer-payload", 60).decode().split(":")
            got = hashlib.sha256(buf[int(offset):int(offset) + int(length)].tobytes()).hexdigest()
            assert got == expected, "the pyverbs peer's RDMA WRITE arrived corrupted"
            assert int(sig[0]) == 1

            # lamina-net into the peer's memory: put (staged + zero-copy sizes) with a signal.
            peer_buf, peer_sig = ep.lookup(1, "peer-buf"), ep.lookup(1, "peer-sig")
            payload = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8)
            src = ep.register(payload, ln.Access.LOCAL)
            at = 4096 + 3
            ep._store.set("interop/lamina-payload",
                          f"{at}:{payload.size}:{hashlib.sha256(payload.tobytes()).hexdigest()}".encode())
            ch.put(src, peer_buf, at, signal=peer_sig)
            ch.flush(timeout=30)
            done = ep._store.get("interop/peer-done", 60)
            assert done == b"ok"
            ch.close()
        except BaseException as exc:
            error = b""
            try:
                error = ep._store.get("interop/peer-error", 5)
            except Exception:
                pass
            peer.kill()
            output = peer.communicate(timeout=10)[0]
            raise AssertionError(f"{exc!r}\npeer error: {error!r}\npeer output:\n{output}") from exc
        finally:
            ep._store.set("interop/lamina-closed", b"1")
        output = peer.communicate(timeout=60)[0]
        assert peer.returncode == 0, output
