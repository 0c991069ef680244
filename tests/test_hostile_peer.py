"""Malformed and hostile inbound tcp traffic from a raw socket.

The target closes that connection with a logged reason, never writes outside
a registered region, and keeps running.
"""
import multiprocessing as mp
import socket
import struct
import time

import numpy as np

import lamina_net as ln

GROUP = "hostile"
FRAME = struct.Struct("<HBBIQQQQQQQQ")  # csrc/transports/wire.hpp FrameHeader, 72 bytes
HELLO = struct.Struct("<QIiQQ96s")      # HelloFrame, 128 bytes
HELLO_MAGIC = 0x4C414D494E41312E
FRAME_MAGIC = 0x4C4E
PUT, ATOMIC, SEND = 1, 3, 4
FLAG_SIGNAL = 1

CASES = {
    # name: (frame fields, payload)
    "bad magic": (dict(magic=0xBEEF, type=PUT, length=8), b"x" * 8),
    "unknown region": (dict(type=PUT, region=999999, length=8), b"x" * 8),
    "offset out of range": (dict(type=PUT, region="data", offset=4090, length=16), b"x" * 16),
    "huge length": (dict(type=PUT, region="data", offset=0, length=1 << 62), b"x" * 64),
    "misaligned signal": (dict(type=PUT, region="data", length=8, flags=FLAG_SIGNAL, sig_region="sig",
                               sig_offset=3, sig_add=1), b"x" * 8),
    "no atomic right": (dict(type=ATOMIC, region="data", offset=0, value=1), b""),
    "unknown type": (dict(type=99), b""),
}


def target_rank(store_addr, tags, result_queue):
    host, port = store_addr.split(":")
    store = ln.StoreClient(host, int(port))
    with ln.Endpoint(0, 2, store, group=GROUP, timeout=20, transports=("tcp",)) as ep:
        data = np.zeros(4096, np.uint8)
        sig = np.zeros(1, np.uint64)
        ep.publish("data", ep.register(data, ln.Access.REMOTE_WRITE))
        ep.publish("sig", ep.register(sig, ln.Access.REMOTE_ATOMIC))
        reasons = {}
        for name, tag in tags.items():
            ch = ep.channel(1, "tcp", tag=tag, timeout=20)
            deadline = time.monotonic() + 10
            while ch.failed() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            reasons[name] = ch.failed()
        result_queue.put((reasons, bool(data.any()), int(sig[0])))


def _frame(fields, ids):
    resolve = lambda v: ids[v] if isinstance(v, str) else v
    return FRAME.pack(fields.get("magic", FRAME_MAGIC), fields.get("type", PUT), fields.get("flags", 0), 0, 1,
                      resolve(fields.get("region", 0)), fields.get("offset", 0), fields.get("length", 0),
                      fields.get("value", 0), resolve(fields.get("sig_region", 0)), fields.get("sig_offset", 0),
                      fields.get("sig_add", 0))


def _connect(addr, secret_hex, key):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    hi, lo = int(secret_hex[:16], 16), int(secret_hex[16:], 16)
    s.sendall(HELLO.pack(HELLO_MAGIC, 1, 1, hi, lo, key.encode()))
    return s


def _closed_by_peer(s, within=5.0):
    s.settimeout(within)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_hostile_frames_close_the_connection_and_write_nothing():
    tags = {name: i + 1 for i, name in enumerate(CASES)}
    with ln.StoreServer("127.0.0.1", 0) as server:
        store = ln.StoreClient(server.host, server.port)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=target_rank, args=(server.address, tags, q), daemon=True)
        proc.start()
        try:
            addr = store.get(f"ln/{GROUP}/0/tcp_addr", 30).decode()
            secret = store.get(f"ln/{GROUP}/secret", 30).decode()
            ids = {}
            for name in ("data", "sig"):
                blob = store.get(f"ln/{GROUP}/regions/0/{name}", 30)
                ids[name] = struct.unpack_from("<Q", blob, 24)[0]

            # 1. Wrong secret and garbage hellos are refused before any channel sees them.
            wrong = _connect(addr, "0" * 32, f"ln/{GROUP}/ch/0-1/1/tcp")
            assert _closed_by_peer(wrong), "a connection with the wrong secret was kept open"
            junk = socket.create_connection(tuple(addr.rsplit(":", 1)[:1]) + (int(addr.rsplit(":", 1)[1]),))
            junk.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 200)
            assert _closed_by_peer(junk), "a garbage hello was kept open"

            # 2. A peer holding the secret sends malformed frames, one connection each.
            for name, (fields, payload) in CASES.items():
                s = _connect(addr, secret, f"ln/{GROUP}/ch/0-1/{tags[name]}/tcp")
                s.recv(HELLO.size, socket.MSG_WAITALL)  # the target's hello
                s.sendall(_frame(fields, ids) + payload)
                assert _closed_by_peer(s), f"{name}: connection not closed"
            reasons, data_written, sig_value = q.get(timeout=60)
        finally:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        assert proc.exitcode == 0, "the target process crashed"
        assert not data_written, "a hostile frame wrote into the region"
        assert sig_value == 0
        for name, reason in reasons.items():
            assert reason, f"{name}: the channel did not fail"
        assert "bad magic" in reasons["bad magic"]
        assert "unknown region" in reasons["unknown region"]
        assert "outside region" in reasons["offset out of range"]
        assert "outside region" in reasons["huge length"]
        assert "aligned" in reasons["misaligned signal"]
        assert "lacks access" in reasons["no atomic right"]
        assert "unknown type" in reasons["unknown type"]
