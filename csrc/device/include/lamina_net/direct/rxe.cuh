// lamina-net direct back end, Soft-RoCE (rxe) format: work requests written
// straight into the send queue an rxe queue pair shares with the kernel
// driver, completions read straight from its CQ ring.
//
// rxe's rings are `struct rxe_queue_buf` (kernel uapi rdma/rdma_user_rxe.h):
// a header with the element size, the index mask and producer / consumer
// indices on their own cache lines, then the elements. Indices are masked
// (the ring has index_mask + 1 elements, one always left free). The send
// queue's elements are `struct rxe_send_wqe`; the CQ's are
// `struct ib_uverbs_wc`. This header mirrors the fields it writes at their
// uapi offsets (it stays a leaf: NVRTC has no kernel headers);
// tests/verbs/cpp/rxe_direct_check.cpp static_asserts every offset against
// the installed uapi headers.
//
// The doorbell has two steps: publish (a release store of the producer
// index, done here by the caller) and a kick (a POST_SEND command with no
// work requests on the uverbs command file, which makes the kernel process
// the queue). A CPU caller kicks through DirectQueue::kick; a GPU cannot make
// the system call, so there a host thread kicks when `rung` moves (the
// CPU-assisted doorbell).
#pragma once

#include "work_queue.cuh"

namespace lamina {
namespace direct {

// Offsets into struct rxe_send_wqe / rxe_queue_buf / ib_uverbs_wc (checked against the uapi).
constexpr lamina_u32 kRxeWqeWrId = 0;
constexpr lamina_u32 kRxeWqeOpcode = 12;
constexpr lamina_u32 kRxeWqeSendFlags = 16;
constexpr lamina_u32 kRxeWqeImm = 20;
constexpr lamina_u32 kRxeWqeRemoteAddr = 24;   // wr.rdma.remote_addr == wr.atomic.remote_addr
constexpr lamina_u32 kRxeWqeRdmaRkey = 32;
constexpr lamina_u32 kRxeWqeAtomicAdd = 32;    // wr.atomic.compare_add
constexpr lamina_u32 kRxeWqeAtomicRkey = 48;
constexpr lamina_u32 kRxeWqeIova = 152;
constexpr lamina_u32 kRxeWqeSsn = 176;
constexpr lamina_u32 kRxeWqeDma = 184;         // struct rxe_dma_info
constexpr lamina_u32 kRxeWqeHeaderBytes = 208; // sizeof(struct rxe_send_wqe): the SGE / inline data follow
constexpr lamina_u32 kRxeQueueProducer = 128;
constexpr lamina_u32 kRxeQueueConsumer = 256;
constexpr lamina_u32 kRxeQueueHeaderBytes = 384;
constexpr lamina_u32 kRxeWcBytes = 48;
// ib_wr_opcode / ib_send_flags values (rdma/ib_user_verbs.h, infiniband/verbs.h).
constexpr lamina_u32 kRxeOpWrite = 0;
constexpr lamina_u32 kRxeOpWriteImm = 1;
constexpr lamina_u32 kRxeOpFetchAdd = 6;
constexpr lamina_u32 kRxeFlagFence = 1;
constexpr lamina_u32 kRxeFlagSignaled = 2;
constexpr lamina_u32 kRxeFlagInline = 8;

struct RxeFormat {
  static constexpr lamina_u32 kCounterBits = 64;  // the CQE carries wr_id: the full ticket

  LAMINA_HD static void put32(lamina_u8* p, lamina_u32 off, lamina_u32 v) {
    *reinterpret_cast<lamina_u32*>(p + off) = v;
  }
  LAMINA_HD static void put64(lamina_u8* p, lamina_u32 off, lamina_u64 v) {
    *reinterpret_cast<lamina_u64*>(p + off) = v;
  }

  LAMINA_HD static void write(const DirectQueue& q, lamina_u8* slot, lamina_u64 ticket, const DirectRequest& r) {
    (void)q;
    lamina_u64* words = reinterpret_cast<lamina_u64*>(slot);
    for (lamina_u32 i = 0; i < kRxeWqeHeaderBytes / 8; ++i) words[i] = 0;
    put64(slot, kRxeWqeWrId, ticket);
    lamina_u32 flags = kRxeFlagSignaled;
    if (r.fence) flags |= kRxeFlagFence;
    if (r.opcode == kDirectFetchAdd) {
      put32(slot, kRxeWqeOpcode, kRxeOpFetchAdd);
      put64(slot, kRxeWqeRemoteAddr, r.remote_addr);
      put64(slot, kRxeWqeAtomicAdd, r.add);
      put32(slot, kRxeWqeAtomicRkey, r.rkey);
    } else {
      put32(slot, kRxeWqeOpcode, r.opcode == kDirectWriteImm ? kRxeOpWriteImm : kRxeOpWrite);
      put64(slot, kRxeWqeRemoteAddr, r.remote_addr);
      put32(slot, kRxeWqeRdmaRkey, r.rkey);
      if (r.opcode == kDirectWriteImm) {
        // imm_data is big-endian on the wire and in the uapi.
        const lamina_u32 v = r.imm;
        put32(slot, kRxeWqeImm, (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24));
      }
      if (r.inline_data) flags |= kRxeFlagInline;
    }
    put32(slot, kRxeWqeSendFlags, flags);
    put64(slot, kRxeWqeIova, r.remote_addr);
    put32(slot, kRxeWqeSsn, static_cast<lamina_u32>(ticket));
    // rxe_dma_info: length, resid, cur_sge, num_sge, sge_offset, reserved, then sge[] / inline data.
    lamina_u8* dma = slot + kRxeWqeDma;
    put32(dma, 0, r.bytes);
    put32(dma, 4, r.bytes);
    put32(dma, 12, 1);
    lamina_u8* tail = slot + kRxeWqeHeaderBytes;
    if (r.inline_data) {
      const lamina_u8* src = reinterpret_cast<const lamina_u8*>(r.local_addr);
      for (lamina_u32 i = 0; i < r.bytes; ++i) tail[i] = src[i];
    } else {
      // struct rxe_sge: addr, length, lkey.
      put64(tail, 0, r.local_addr);
      put32(tail, 8, r.bytes);
      put32(tail, 12, r.lkey);
    }
  }

  LAMINA_HD static void publish(const DirectQueue& q, lamina_u64 ready) {
    const lamina_u32 mask = (1u << q.sq_slots_log2) - 1;
    device_detail::store_release(q.sq_producer, static_cast<lamina_u32>(ready) & mask);
  }

  LAMINA_HD static int poll(const DirectQueue& q, lamina_u64 consumer, DirectCompletion* c) {
    const lamina_u32 mask = (1u << q.cq_entries_log2) - 1;
    const lamina_u32 index = static_cast<lamina_u32>(consumer) & mask;
    if (device_detail::load_acquire(q.cq_producer) == index) return 0;
    const lamina_u8* wc = q.cq + (static_cast<lamina_u64>(index) << q.cq_entry_log2);
    c->counter = *reinterpret_cast<const lamina_u64*>(wc);                  // wr_id
    c->status = *reinterpret_cast<const lamina_u32*>(wc + 8);               // ib_wc_status
    c->vendor = *reinterpret_cast<const lamina_u32*>(wc + 16);              // vendor_err
    return 1;
  }

  LAMINA_HD static void release(const DirectQueue& q, lamina_u64 consumer) {
    const lamina_u32 mask = (1u << q.cq_entries_log2) - 1;
    device_detail::store_release(q.cq_consumer, static_cast<lamina_u32>(consumer) & mask);
  }
};

}  // namespace direct
}  // namespace lamina
