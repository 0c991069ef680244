// lamina-net direct back end, mlx5 format: the work queue entries (WQEs), the
// doorbell and the completions of a ConnectX queue pair, written and read by
// the caller (a CUDA thread) itself, as IBGDA does.
//
// Every field the NIC reads is big-endian. One request = one 64-byte WQE
// basic block (WQEBB), so the WQE index is the ticket mod 2^16 and the slot
// the ticket mod the queue size (a power of two, at most 32768, so the 16-bit
// counter arithmetic stays unambiguous):
//   WRITE        ctrl + raddr + data               (ds 3)
//   WRITE inline ctrl + raddr + inline header + payload (<= 28 bytes, ds 3 or 4)
//   WRITE_IMM    as WRITE, opcode 0x09, immediate in the ctrl segment
//   FETCH_ADD    ctrl + raddr + atomic + data      (ds 4; the old value lands at the data segment)
// Every WQE asks for a CQE (CQ_UPDATE). The doorbell: the send counter into
// the doorbell record (word 1), a system-scope fence, then the first 8 bytes
// of a ctrl segment naming the new counter and the QP into the UAR register.
// Completions: 64-byte CQEs, valid when their opcode is not INVALID and their
// owner bit matches the pass over the ring; REQ_ERR / RESP_ERR carry a
// syndrome, reported through the queue's error word.
// tests/device/mlx5_check.cpp compares every segment byte for byte with
// rdma-core's helpers in infiniband/mlx5dv.h.
#pragma once

#include "work_queue.cuh"

namespace lamina {
namespace direct {

constexpr lamina_u8 kMlx5OpRdmaWrite = 0x08;
constexpr lamina_u8 kMlx5OpRdmaWriteImm = 0x09;
constexpr lamina_u8 kMlx5OpAtomicFetchAdd = 0x12;
constexpr lamina_u8 kMlx5CtrlCqUpdate = 0x08;   // fm_ce_se: ask for a CQE
constexpr lamina_u8 kMlx5CtrlFence = 0x80;      // fm_ce_se: fence (4 << 5)
constexpr lamina_u32 kMlx5InlineSeg = 0x80000000u;
constexpr lamina_u32 kMlx5WqeBytes = 64;
constexpr lamina_u32 kMlx5MaxInline = 28;       // one WQEBB: 64 - ctrl - raddr - 4-byte inline header
constexpr lamina_u8 kMlx5CqeReq = 0;
constexpr lamina_u8 kMlx5CqeReqErr = 13;
constexpr lamina_u8 kMlx5CqeRespErr = 14;
constexpr lamina_u8 kMlx5CqeInvalid = 15;
// Status reported for a CQE that is neither a request completion nor an error.
constexpr lamina_u32 kMlx5UnexpectedCqe = 0x100;

namespace mlx5_detail {

LAMINA_HD lamina_u32 be32(lamina_u32 v) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(v, 0, 0x0123);
#else
  return __builtin_bswap32(v);
#endif
}

LAMINA_HD lamina_u64 be64(lamina_u64 v) {
  return (static_cast<lamina_u64>(be32(static_cast<lamina_u32>(v))) << 32) | be32(static_cast<lamina_u32>(v >> 32));
}

LAMINA_HD lamina_u16 be16(lamina_u16 v) { return static_cast<lamina_u16>((v >> 8) | (v << 8)); }

LAMINA_HD void put32(lamina_u8* p, lamina_u32 v) { *reinterpret_cast<lamina_u32*>(p) = v; }
LAMINA_HD void put64(lamina_u8* p, lamina_u64 v) { *reinterpret_cast<lamina_u64*>(p) = v; }

}  // namespace mlx5_detail

// The segments, each 16 bytes at `p` (what mlx5dv_set_ctrl_seg & co. write).
// imm: the value in host order; it is written big-endian, as the receiver reads it.
LAMINA_HD void mlx5_ctrl_seg(lamina_u8* p, lamina_u16 wqe_index, lamina_u8 opcode, lamina_u32 qpn, lamina_u8 ds,
                             lamina_u8 fm_ce_se, lamina_u32 imm_be) {
  using namespace mlx5_detail;
  put32(p, be32((static_cast<lamina_u32>(wqe_index) << 8) | opcode));
  put32(p + 4, be32((qpn << 8) | ds));
  p[8] = 0;   // signature
  p[9] = 0;   // dci stream channel id (2 bytes)
  p[10] = 0;
  p[11] = fm_ce_se;
  put32(p + 12, imm_be);
}

LAMINA_HD void mlx5_raddr_seg(lamina_u8* p, lamina_u64 remote_addr, lamina_u32 rkey) {
  using namespace mlx5_detail;
  put64(p, be64(remote_addr));
  put32(p + 8, be32(rkey));
  put32(p + 12, 0);
}

LAMINA_HD void mlx5_data_seg(lamina_u8* p, lamina_u32 bytes, lamina_u32 lkey, lamina_u64 addr) {
  using namespace mlx5_detail;
  put32(p, be32(bytes));
  put32(p + 4, be32(lkey));
  put64(p + 8, be64(addr));
}

LAMINA_HD void mlx5_atomic_seg(lamina_u8* p, lamina_u64 swap_add, lamina_u64 compare) {
  using namespace mlx5_detail;
  put64(p, be64(swap_add));
  put64(p + 8, be64(compare));
}

// Inline header and payload; returns the bytes used, rounded up to 16.
LAMINA_HD lamina_u32 mlx5_inline_seg(lamina_u8* p, const lamina_u8* src, lamina_u32 bytes) {
  using namespace mlx5_detail;
  put32(p, be32(bytes | kMlx5InlineSeg));
  for (lamina_u32 i = 0; i < bytes; ++i) p[4 + i] = src[i];
  const lamina_u32 used = (4 + bytes + 15) & ~15u;
  for (lamina_u32 i = 4 + bytes; i < used; ++i) p[i] = 0;
  return used;
}

// What the CQE at `cqe` says, for a consumer at pass `pass_bit` over the
// ring (consumer index >> log2 entries, & 1). Returns 0 while the NIC still
// owns the entry.
LAMINA_HD int mlx5_parse_cqe(const lamina_u8* cqe, lamina_u32 pass_bit, DirectCompletion* c) {
  using namespace mlx5_detail;
  const lamina_u8 op_own = *reinterpret_cast<const volatile lamina_u8*>(cqe + 63);
  const lamina_u8 opcode = op_own >> 4;
  if (opcode == kMlx5CqeInvalid || (op_own & 1) != (pass_bit & 1)) return 0;
#if defined(__CUDA_ARCH__)
  __threadfence();
#else
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
#endif
  c->counter = be16(*reinterpret_cast<const lamina_u16*>(cqe + 60));
  if (opcode == kMlx5CqeReq) {
    c->status = 0;
    c->vendor = 0;
  } else if (opcode == kMlx5CqeReqErr || opcode == kMlx5CqeRespErr) {
    c->status = cqe[55];  // syndrome
    c->vendor = cqe[54];  // vendor_err_synd
  } else {
    c->status = kMlx5UnexpectedCqe | opcode;
    c->vendor = 0;
  }
  return 1;
}

// The 8 bytes written to the UAR doorbell register for send counter `counter`.
LAMINA_HD lamina_u64 mlx5_doorbell_value(lamina_u64 counter, lamina_u32 qpn) {
  using namespace mlx5_detail;
  const lamina_u64 lo = be32(static_cast<lamina_u32>((counter & 0xffff) << 8));
  const lamina_u64 hi = be32(qpn << 8);
  return lo | (hi << 32);  // little-endian 64-bit store: lo's bytes first, as the ctrl segment's first 8 bytes
}

struct Mlx5Format {
  static constexpr lamina_u32 kCounterBits = 16;

  LAMINA_HD static void write(const DirectQueue& q, lamina_u8* slot, lamina_u64 ticket, const DirectRequest& r) {
    const lamina_u16 index = static_cast<lamina_u16>(ticket & 0xffff);
    const lamina_u8 flags = static_cast<lamina_u8>(kMlx5CtrlCqUpdate | (r.fence ? kMlx5CtrlFence : 0));
    lamina_u8 ds = 3;
    lamina_u32 imm_be = 0;
    lamina_u8 opcode = kMlx5OpRdmaWrite;
    if (r.opcode == kDirectFetchAdd) {
      opcode = kMlx5OpAtomicFetchAdd;
      ds = 4;
      mlx5_raddr_seg(slot + 16, r.remote_addr, r.rkey);
      mlx5_atomic_seg(slot + 32, r.add, 0);
      mlx5_data_seg(slot + 48, 8, r.lkey, r.local_addr);
    } else {
      if (r.opcode == kDirectWriteImm) {
        opcode = kMlx5OpRdmaWriteImm;
        imm_be = mlx5_detail::be32(r.imm);
      }
      mlx5_raddr_seg(slot + 16, r.remote_addr, r.rkey);
      if (r.inline_data) {
        const lamina_u32 used = mlx5_inline_seg(slot + 32, reinterpret_cast<const lamina_u8*>(r.local_addr), r.bytes);
        ds = static_cast<lamina_u8>(2 + used / 16);
      } else {
        mlx5_data_seg(slot + 32, r.bytes, r.lkey, r.local_addr);
      }
    }
    // The NIC reads the WQE only after the doorbell (publish), so segment order here is free.
    mlx5_ctrl_seg(slot, index, opcode, q.qpn, ds, flags, imm_be);
  }

  LAMINA_HD static void publish(const DirectQueue& q, lamina_u64 ready) {
    // Doorbell record first (the NIC reads it when it recovers from a lost
    // doorbell), then the register.
    device_detail::store_release(q.sq_producer, mlx5_detail::be32(static_cast<lamina_u32>(ready & 0xffff)));
    device_detail::fence_system();
    const lamina_u64 value = mlx5_doorbell_value(ready, q.qpn);
#if defined(__CUDA_ARCH__)
    asm volatile("st.mmio.relaxed.sys.global.u64 [%0], %1;" ::"l"(q.doorbell), "l"(value) : "memory");
#else
    *reinterpret_cast<volatile lamina_u64*>(q.doorbell) = value;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
  }

  LAMINA_HD static int poll(const DirectQueue& q, lamina_u64 consumer, DirectCompletion* c) {
    const lamina_u64 mask = (1ull << q.cq_entries_log2) - 1;
    const lamina_u8* cqe = q.cq + ((consumer & mask) << q.cq_entry_log2);
    // A 128-byte CQE holds the 64-byte CQE in its second half.
    if (q.cq_entry_log2 == 7) cqe += 64;
    return mlx5_parse_cqe(cqe, static_cast<lamina_u32>((consumer >> q.cq_entries_log2) & 1), c);
  }

  LAMINA_HD static void release(const DirectQueue& q, lamina_u64 consumer) {
    device_detail::store_release(q.cq_consumer, mlx5_detail::be32(static_cast<lamina_u32>(consumer & 0xffffff)));
  }
};

}  // namespace direct
}  // namespace lamina
