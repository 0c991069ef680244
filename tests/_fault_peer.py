"""The misbehaving peer of tests/test_faults.py, run as its own process.

argv: store group transport fault delay
Joins as rank 1 of 2, opens the channel to rank 0 and does what `fault` says;
`delay` (seconds) is when, after the fault's starting point, it dies. Rank 0
publishes "inbox" (1 MiB, written by this peer) and "sig" (signal words).
"""
import os
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np

import lamina_net as ln


def die_after(delay: float) -> None:
    threading.Timer(delay, os._exit, args=(9,)).start()  # no close, no goodbye


def reset_tcp_sockets_on_exit() -> None:
    """SO_LINGER 0 on this process's TCP sockets: its death resets them (RST) instead of closing them."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()  # the dup only: the library's descriptor stays open


def main() -> None:
    store, group, transport, fault, delay = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    ep = ln.Endpoint(1, 2, store, group=group, timeout=60)  # rank 0 bounds the scenario, not this
    if fault == "connect":
        die_after(delay)
        ep.channel(0, transport)
        time.sleep(30)
        return
    ch = ep.channel(0, transport)
    inbox, sig = ep.lookup(0, "inbox"), ep.lookup(0, "sig")
    if fault == "good":
        ch.put(np.full(64, 0x5A, np.uint8), inbox, 0, signal=sig)
        ch.flush()
        ch.recv(np.zeros(1, np.uint8), timeout=20)  # rank 0 checked it: both may close now
        ep.close()
        return
    if fault == "deregister":
        # Regions for rank 0 to put into, deregistered one by one while it does.
        mine = [ep.alloc(1 << 16, np.uint8, ln.Access.REMOTE_WRITE) for _ in range(64)]
        for i, region in enumerate(mine):
            ep.publish(f"target{i}", region)
        ch.signal(sig)
        ch.recv(np.zeros(1, np.uint8), timeout=20)  # rank 0 has looked them up
        die_after(delay)
        for region in mine:
            region.close()
            time.sleep(0.002)
        time.sleep(30)
        return
    ch.signal(sig)  # ready: rank 0 is now in its part of the fault
    if fault == "transfer":
        die_after(delay)
        payload = np.random.default_rng(1).integers(0, 255, 1 << 20, dtype=np.uint8)
        while True:
            ch.put(payload, inbox, 0, signal=sig, signal_offset=8)
    elif fault == "wait":
        die_after(delay)
        time.sleep(30)
    elif fault == "reset":
        reset_tcp_sockets_on_exit()
        die_after(delay)
        time.sleep(30)
    elif fault == "stall":
        os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 kills it once it has seen the timeout
        time.sleep(30)
    elif fault == "store":
        # Rank 0 kills or stops the store now; the data path must not care.
        ln_ok = np.zeros(1, np.uint8)
        ch.recv(ln_ok, timeout=20)
        ch.put(np.full(64, 0xA5, np.uint8), inbox, 64, signal=sig)
        ch.flush(timeout=20)
        ep.close()
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    main()
