"""The surviving rank of tests/test_faults.py (importable by spawned children).

`survive` is rank 0. It starts the misbehaving peer (tests/_fault_peer.py) as
its own process, goes through its side of the fault, records what each
operation raised and how long it took, then checks that it can still reach a
fresh peer and that nothing is left behind once its endpoint is closed: file
descriptors, shared segments, mappings of lamina-net memory.
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

import lamina_net as ln
from harness import free_port

TIMEOUT = 6.0  # the endpoint's configured timeout on tcp and shm (verbs needs longer: its keepalive)
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fault_peer.py")


def resources() -> dict:
    """What a leak would show: open descriptors, lamina-net mappings, this process's shm segments."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed already
    with open("/proc/self/maps") as f:
        maps = [line.split()[-1] for line in f if "lamina-net" in line or "/dev/shm/" in line]
    shm = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"lamina-net-{os.getpid()}-"))
    return {"fds": fds, "maps": maps, "shm": shm}


class Peer:
    """The other process; its stderr goes to a file so that no pipe is left open."""

    def __init__(self, store: str, group: str, transport: str, fault: str, delay: float = 0.0):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lamina-fault-peer-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, PEER, store, group, transport, fault, str(delay)],
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        return self.proc.wait(10)

    def finish(self, grace: float = 0.0) -> tuple:
        """(exit status, last stderr lines), after `grace` seconds to exit and a kill if still running."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        status = self.kill()
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-5:]
        self.log.close()
        os.unlink(self.log.name)
        return status, tail


def timed(label: str, events: list, fn, *args, **kwargs):
    """Runs fn, appends (label, outcome, seconds); only lamina-net errors are outcomes, anything else is a bug."""
    t0 = time.monotonic()
    try:
        result = fn(*args, **kwargs)
        outcome = "ok"
    except ln.LaminaError as e:
        result, outcome = None, f"{type(e).__name__}: {e}"
    events.append((label, outcome, time.monotonic() - t0))
    return result


class StoreProcess:
    """A standalone store in its own process, to be killed or stopped."""

    def __init__(self):
        self.port = free_port()
        code = ("import sys, time, lamina_net as ln; s = ln.StoreServer('127.0.0.1', int(sys.argv[1])); "
                "print('ready', flush=True); time.sleep(600)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.port)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.proc.stdout.close()
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


def _endpoint(store: str, group: str, limit: float):
    ep = ln.Endpoint(0, 2, store, group=group, timeout=limit)
    inbox = ep.alloc(1 << 20, np.uint8, ln.Access.REMOTE_WRITE)
    sig = ep.alloc(4, np.uint64, ln.Access.REMOTE_ATOMIC)
    ep.publish("inbox", inbox)
    ep.publish("sig", sig)
    return ep, inbox, sig


def _reach_fresh_peer(ep, inbox, sig, store: str, group: str, transport: str, events: list, limit: float) -> bool:
    """A new, well-behaved rank 1 connects and puts 64 bytes with a signal."""
    inbox.array[:64] = 0
    expected = int(sig.array[0]) + 1
    peer = Peer(store, group, transport, "good")
    ch = timed("fresh peer: channel", events, ep.channel, 1, transport, timeout=limit)
    ok = False
    if ch is not None:
        timed("fresh peer: wait", events, sig.wait, 0, expected, timeout=limit, channel=ch)
        ok = bool((inbox.array[:64] == 0x5A).all()) and int(sig.array[0]) == expected
        timed("fresh peer: bye", events, ch.send, np.ones(1, np.uint8), timeout=limit)
    status, tail = peer.finish(grace=limit)
    if ch is not None:
        ch.close()
    events.append(("fresh peer: exit", f"status {status} {tail}", 0.0))
    return ok and status == 0


def _peer_fault(ep, inbox, sig, store, group, transport, fault, delay, events, limit) -> Peer:
    peer = Peer(store, group, transport, fault, delay)
    ch = timed("channel", events, ep.channel, 1, transport, timeout=limit)
    if ch is None:
        return peer
    if fault == "connect":
        timed("wait", events, sig.wait, 0, 1, timeout=limit, channel=ch)
        ch.close()
        return peer
    timed("ready", events, sig.wait, 0, 1, timeout=limit, channel=ch)
    if events[-1][1] != "ok":
        ch.close()
        return peer
    if fault in ("transfer", "wait", "reset"):
        # The peer puts (transfer) or idles, and dies: a value that never comes.
        timed("wait", events, sig.wait, 8 if fault == "transfer" else 0, 1 << 62, timeout=limit, channel=ch)
        timed("later send", events, ch.send, np.zeros(8, np.uint8), timeout=limit)  # sticky: fails at once
    elif fault == "deregister":
        targets = [ep.lookup(1, f"target{i}") for i in range(64)]
        ch.send(np.ones(1, np.uint8), timeout=limit)  # go: it deregisters, and dies part way
        payload = np.full(1 << 15, 7, np.uint8)
        deadline = time.monotonic() + limit
        i = 0
        while time.monotonic() < deadline:
            timed(f"put {i}", events, ch.put, payload, targets[i % 64], 0, timeout=limit)
            if events[-1][1].startswith("TransportError"):
                break
            i += 1
    elif fault == "stall":
        timed("wait on a stopped peer", events, sig.wait, 0, 2, timeout=1.5, channel=ch)
        timed("send to a stopped peer", events, ch.send, np.zeros(64 << 20, np.uint8), timeout=1.5)
        peer.kill()
        timed("wait after its death", events, sig.wait, 0, 2, timeout=limit, channel=ch)
    ch.close()
    return peer


def survive(rank, world, store, transport, fault, delay, limit=TIMEOUT):
    # One endpoint first, so that what the library keeps for the process's
    # lifetime (its settings, the interpreter's imports) is in the baseline.
    with ln.Endpoint(0, 1, f"127.0.0.1:{free_port()}", group="warm-up", timeout=limit) as warm:
        warm.alloc(64)
    gc.collect()
    before = resources()
    events: list = []
    group = f"faults-{transport}-{fault}"
    store_proc = StoreProcess() if fault.startswith("store") else None
    if store_proc is not None:
        store = store_proc.address
    ep, inbox, sig = _endpoint(store, group, limit)
    reached = False
    if store_proc is None:
        peer = _peer_fault(ep, inbox, sig, store, group, transport, fault, delay, events, limit)
        status, tail = peer.finish()
        events.append(("faulty peer: exit", f"status {status} {tail}", 0.0))
        reached = _reach_fresh_peer(ep, inbox, sig, store, group, transport, events, limit)
        timed("close", events, ep.close)
    else:
        peer = Peer(store, group, transport, "store")
        ch = timed("channel", events, ep.channel, 1, transport, timeout=limit)
        timed("ready", events, sig.wait, 0, 1, timeout=limit, channel=ch)
        if fault == "store-killed":
            store_proc.proc.kill()
            store_proc.proc.wait(10)
        else:
            store_proc.proc.send_signal(signal.SIGSTOP)
        timed("store: lookup", events, ep.lookup, 1, "never-published", timeout=2.0)
        timed("store: publish", events, ep.publish, "late", inbox)
        timed("store: barrier", events, ep.barrier, "after-the-store", timeout=2.0)
        # The data path does not go through the store.
        timed("data: send", events, ch.send, np.ones(1, np.uint8), timeout=limit)
        timed("data: wait", events, sig.wait, 0, 2, timeout=limit, channel=ch)
        data_ok = bool((inbox.array[64:128] == 0xA5).all())
        status, tail = peer.finish(grace=limit)
        events.append(("peer: exit", f"status {status} {tail}", 0.0))
        timed("close", events, ep.close)
        store_proc.close()
        # A fresh peer, through a fresh store (this rank hosts it).
        store = f"127.0.0.1:{free_port()}"
        ep, inbox, sig = _endpoint(store, group + "-again", limit)
        reached = data_ok and _reach_fresh_peer(ep, inbox, sig, store, group + "-again", transport, events, limit)
        timed("close again", events, ep.close)
    del ep, inbox, sig
    gc.collect()
    after = resources()
    return {"events": events, "reached": reached, "before": before, "after": after}
