#!/usr/bin/python3
"""An independent verbs peer for interoperability tests (not lamina-net code).

Runs with Debian's /usr/bin/python3 and python3-pyverbs (rdma-core's own
Python bindings). It plays rank 1 of a two-rank lamina-net group whose rank 0
is a real lamina-net Endpoint:

1. reads the group secret and rank 0's region descriptors from the store
   (lamina_net/store.py, loaded by file path: this interpreter cannot import
   the package);
2. creates its own RC QP and swaps its connection info with rank 0's through
   the store rendezvous the lamina-net verbs transport uses (an offer with a
   nonce, then keys naming both nonces), moves its QP to RTS and says so;
3. RDMA-WRITEs a random payload into rank 0's region and bumps rank 0's
   signal word with an ATOMIC FETCH_AND_ADD, then publishes the payload's
   offset and digest;
4. publishes descriptors of its own memory region and signal word (so rank 0
   can put into it), waits until rank 0's signal arrives and checks the
   digest rank 0 published.

usage: pyverbs_peer.py HOST:PORT GROUP [DEVICE]
Exit status 0 on success; on failure the reason is printed and stored under
"interop/peer-error".
"""
import hashlib
import importlib.util
import os
import random
import struct
import sys
import time

import pyverbs.enums as e
from pyverbs.addr import AHAttr, GID, GlobalRoute
from pyverbs.cq import CQ
from pyverbs.device import Context, get_device_list
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import RecvWR, SGE, SendWR

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT = 60.0

# Wire formats of lamina-net (csrc/memory/region.cpp, csrc/transports/verbs/rc_connection.cpp).
DESCRIPTOR = struct.Struct("<IHHIIQQQQIiQ16s")  # magic, version, kind, owner, access, group, id, addr, size, rkey, pid, host
DESCRIPTOR_MAGIC = 0x4C4E5244
QP_INFO = struct.Struct("<IIIIHBB16sIIQIQQ")  # magic, version, qpn, psn, lid, mtu, link layer, gid, recv depth,
QP_INFO_MAGIC = 0x4C4E5651                     # chunk size, inbox addr, inbox rkey, secret hi, secret lo
ACCESS_REMOTE_WRITE = 2
ACCESS_REMOTE_ATOMIC = 8

PAYLOAD_BYTES = 200_000
MY_REGION_BYTES = 1 << 20


def load_store_module():
    spec = importlib.util.spec_from_file_location("lamina_store", os.path.join(REPO, "lamina_net", "store.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_descriptor(blob):
    fields = DESCRIPTOR.unpack(blob)
    if fields[0] != DESCRIPTOR_MAGIC:
        raise RuntimeError("not a lamina-net region descriptor")
    return {"access": fields[4], "group": fields[5], "addr": fields[7], "size": fields[8], "rkey": fields[9]}


def make_descriptor(group, region_id, addr, size, access, rkey):
    return DESCRIPTOR.pack(DESCRIPTOR_MAGIC, 1, 0, 1, access, group, region_id, addr, size, rkey, 0, 0, bytes(16))


def choose_gid(ctx, device, port):
    """RoCE v2 with an IPv4-mapped address first, as lamina-net does."""
    best = None
    for index in range(ctx.query_port(port).gid_tbl_len):
        try:
            gid = ctx.query_gid(port, index)
        except Exception:
            continue
        raw = bytes.fromhex(gid.gid.replace(":", ""))
        if raw == bytes(16):
            continue
        try:
            with open(f"/sys/class/infiniband/{device}/ports/{port}/gid_attrs/types/{index}") as f:
                kind = f.read().strip()
        except OSError:
            kind = ""
        score = 3 if kind == "RoCE v2" and raw.startswith(bytes(10) + b"\xff\xff") else 2 if kind == "RoCE v2" else 1
        if best is None or score > best[0]:
            best = (score, index, gid, raw)
    if best is None:
        raise RuntimeError(f"{device} port {port} has no GID")
    return best[1], best[2], best[3]


def poll_one(cq, what, deadline):
    while time.monotonic() < deadline:
        n, wcs = cq.poll(1)
        if n:
            wc = wcs[0]
            if wc.status != e.IBV_WC_SUCCESS:
                raise RuntimeError(f"{what} failed: work completion status {wc.status}")
            return wc
    raise RuntimeError(f"{what}: no completion within {TIMEOUT} s")


def main():
    address, group = sys.argv[1], sys.argv[2]
    host, port_text = address.rsplit(":", 1)
    store_mod = load_store_module()
    store = store_mod.StoreClient(host, int(port_text), connect_timeout=TIMEOUT)
    prefix = f"ln/{group}"
    try:
        run(store, prefix, sys.argv[3] if len(sys.argv) > 3 else "")
    except BaseException as exc:
        store.set("interop/peer-error", f"{type(exc).__name__}: {exc}".encode())
        raise
    store.set("interop/peer-done", b"ok")
    # Keep the QP up until rank 0 has closed its side.
    store.get("interop/lamina-closed", TIMEOUT)


def run(store, prefix, device_name):
    secret = store.get(f"{prefix}/secret", TIMEOUT).decode()
    secret_hi, secret_lo = int(secret[:16], 16), int(secret[16:], 16)
    lamina_buf = parse_descriptor(store.get(f"{prefix}/regions/0/buf", TIMEOUT))
    lamina_sig = parse_descriptor(store.get(f"{prefix}/regions/0/sig", TIMEOUT))

    devices = [d.name.decode() for d in get_device_list()]
    device = device_name or os.environ.get("LAMINA_NET_IB_DEVICE") or devices[0]
    ctx = Context(name=device)
    ib_port = 1
    port_attr = ctx.query_port(ib_port)
    gid_index, gid, gid_raw = choose_gid(ctx, device, ib_port)
    pd = PD(ctx)
    cq = CQ(ctx, 64)
    qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq,
                           cap=QPCap(max_send_wr=16, max_recv_wr=4, max_send_sge=1, max_recv_sge=1)))
    local_rw = e.IBV_ACCESS_LOCAL_WRITE
    remote_all = local_rw | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_ATOMIC
    mine = MR(pd, MY_REGION_BYTES + 4096, remote_all)  # data, then the signal word at MY_REGION_BYTES
    inbox = MR(pd, 4096, local_rw | e.IBV_ACCESS_REMOTE_WRITE)  # lamina-net writes credits / close here
    staging = MR(pd, PAYLOAD_BYTES + 64, local_rw)
    recv_buf = MR(pd, 4096, local_rw)
    psn = random.getrandbits(24)
    info = QP_INFO.pack(QP_INFO_MAGIC, 1, qp.qp_num, psn, port_attr.lid, port_attr.active_mtu,
                        port_attr.link_layer, gid_raw, 1, 4096, inbox.buf, inbox.rkey, secret_hi, secret_lo)
    # The rendezvous of csrc/transports/rendezvous.hpp: an offer "<nonce hex>;<info>", then
    # "took" keys naming both nonces (no stale record here, so one pass does).
    rv = f"{prefix}/ch/0-1/0/verbs"
    my_nonce = random.getrandbits(64) | 1
    store.set(f"{rv}/offer/1", b"%016x;" % my_nonce + info)
    offer = store.get(f"{rv}/offer/0", TIMEOUT)
    theirs = int(offer[:16], 16)
    store.set(f"{rv}/took/1/{my_nonce:016x}-{theirs:016x}", b"1")
    store.get(f"{rv}/took/0/{theirs:016x}-{my_nonce:016x}", TIMEOUT)
    fields = QP_INFO.unpack(offer[17:])
    if fields[0] != QP_INFO_MAGIC or (fields[12], fields[13]) != (secret_hi, secret_lo):
        raise RuntimeError("rank 0's QP info is malformed or from another group")
    peer_qpn, peer_psn, peer_lid, peer_mtu, peer_gid = fields[2], fields[3], fields[4], fields[5], fields[7]

    attr = QPAttr(qp_state=e.IBV_QPS_INIT)
    attr.port_num = ib_port
    attr.pkey_index = 0
    attr.qp_access_flags = remote_all | e.IBV_ACCESS_REMOTE_READ
    qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS)
    qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(recv_buf.buf, 4096, recv_buf.lkey)]))  # needs INIT
    attr = QPAttr(qp_state=e.IBV_QPS_RTR)
    attr.path_mtu = min(peer_mtu, port_attr.active_mtu)
    attr.dest_qp_num = peer_qpn
    attr.rq_psn = peer_psn
    attr.max_dest_rd_atomic = 1
    attr.min_rnr_timer = 12
    gid_words = peer_gid.hex()
    route = GlobalRoute(dgid=GID(":".join(gid_words[i:i + 4] for i in range(0, 32, 4))), sgid_index=gid_index)
    route.hop_limit = 64
    attr.ah_attr = AHAttr(gr=route, is_global=1, port_num=ib_port, dlid=peer_lid)
    qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN |
              e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
    attr = QPAttr(qp_state=e.IBV_QPS_RTS)
    attr.timeout = int(os.environ.get("LAMINA_NET_IB_TIMEOUT", "14"))
    attr.retry_cnt = 6
    attr.rnr_retry = 7
    attr.sq_psn = psn
    attr.max_rd_atomic = 1
    qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY |
              e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)
    store.set(f"{rv}/rtr/1/{my_nonce:016x}-{theirs:016x}", b"1")
    store.get(f"{rv}/rtr/0/{theirs:016x}-{my_nonce:016x}", TIMEOUT)

    # 3. WRITE into rank 0's region, then FETCH_AND_ADD its signal word, on one QP.
    payload = random.randbytes(PAYLOAD_BYTES)
    offset = random.randrange(0, lamina_buf["size"] - PAYLOAD_BYTES)
    staging.write(payload, PAYLOAD_BYTES, 0)
    write = SendWR(wr_id=10, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                   sg=[SGE(staging.buf, PAYLOAD_BYTES, staging.lkey)])
    write.set_wr_rdma(lamina_buf["rkey"], lamina_buf["addr"] + offset)
    qp.post_send(write)
    bump = SendWR(wr_id=11, opcode=e.IBV_WR_ATOMIC_FETCH_AND_ADD, num_sge=1,
                  sg=[SGE(staging.buf + PAYLOAD_BYTES, 8, staging.lkey)], send_flags=e.IBV_SEND_SIGNALED)
    bump.set_wr_atomic(lamina_sig["rkey"], lamina_sig["addr"], 1, 1)  # FETCH_AND_ADD adds compare_add
    qp.post_send(bump)
    deadline = time.monotonic() + TIMEOUT
    poll_one(cq, "RDMA WRITE + ATOMIC into rank 0", deadline)
    store.set("interop/peer-payload", f"{offset}:{PAYLOAD_BYTES}:{hashlib.sha256(payload).hexdigest()}".encode())

    # 4. Rank 0 puts into our memory and signals our word.
    store.set(f"{prefix}/regions/1/peer-buf",
              make_descriptor(lamina_buf["group"], 1, mine.buf, MY_REGION_BYTES, ACCESS_REMOTE_WRITE, mine.rkey))
    store.set(f"{prefix}/regions/1/peer-sig",
              make_descriptor(lamina_buf["group"], 2, mine.buf + MY_REGION_BYTES, 8, ACCESS_REMOTE_ATOMIC, mine.rkey))
    deadline = time.monotonic() + TIMEOUT
    while struct.unpack("<Q", mine.read(8, MY_REGION_BYTES))[0] < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("rank 0's signal never arrived")
        n, wcs = cq.poll(1)
        if n and wcs[0].status != e.IBV_WC_SUCCESS:
            raise RuntimeError(f"receive side failed: work completion status {wcs[0].status}")
        time.sleep(0.001)
    offset_text, length_text, expected = store.get("interop/lamina-payload", TIMEOUT).decode().split(":")
    got = hashlib.sha256(mine.read(int(length_text), int(offset_text))).hexdigest()
    if got != expected:
        raise RuntimeError("the data rank 0 put into our region is corrupted")
    return True


if __name__ == "__main__":
    main()
