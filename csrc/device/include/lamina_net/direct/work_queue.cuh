// lamina-net direct back end: the caller (a CUDA thread, or a CPU thread in
// tests) writes the NIC's work requests into a real send queue, publishes them
// and polls the real completion queue; no proxy thread in between.
//
// This file is the part shared by every NIC format. A Format (mlx5.cuh,
// rxe.cuh) says how one work request is written into a slot, how the producer
// index is published (the doorbell) and how one completion is read; the
// queue logic here - reservation, in-order readiness, doorbell batching,
// completion polling with counter wrap, error propagation - is the same code
// for all of them, so testing it on rxe (a real RDMA stack in the Soft-RoCE
// guest) tests it for mlx5.
//
// A Format provides (all static, LAMINA_HD):
//   static constexpr lamina_u32 kCounterBits;       // width of the completion's WQE counter (16 on mlx5, 64 on rxe)
//   void write(const DirectQueue&, lamina_u8* slot, lamina_u64 ticket, const DirectRequest&);
//   void publish(const DirectQueue&, lamina_u64 ready);  // make slots [0, ready) visible to the NIC (doorbell record + doorbell)
//   int poll(const DirectQueue&, lamina_u64 consumer, DirectCompletion*);  // 1: one CQE read, 0: none yet
//   void release(const DirectQueue&, lamina_u64 consumer);  // CQEs [0, consumer) may be reused by the NIC
//
// ---- The protocol (tickets are 64-bit and never wrap; slots are ticket mod depth)
//   1. reserve: ticket = atomic add on `reserved`; wait (bounded, polling the
//      CQ) until ticket - completed < depth: a slot is never overwritten
//      before the NIC has completed the request that used it;
//   2. write the request into its slot (plain stores), fence;
//   3. ready in ticket order: wait (bounded) until `ready` == ticket, then
//      store ticket + 1 (release);
//   4. doorbell: once `ready - rung` reaches the batch (or the caller asks,
//      as flush does), one caller takes the doorbell lock and publishes
//      everything ready with one doorbell; batching loses nothing, because a
//      doorbell covers every request before its index.
// Every request asks for a completion (the CQ is at least as deep as the
// send queue, so it never overruns). Completions of one RC queue pair come in
// posting order, so the CQE of ticket t retires every ticket <= t.
//
// ---- Who may call what
// Any thread, any number at once: reservation is an atomic add, readiness a
// wait on the previous ticket, CQ polling and the doorbell are each taken by
// one caller at a time (try-locks; the others wait for the result).
//
// ---- Errors
// An error CQE (any status but success) is never read as "not yet": it sets
// the queue's error word (first failure wins) with the NIC's status or
// syndrome and the failed ticket; every call then returns kDeviceChannelError.
// Every wait is bounded by the handle's timeout_ns; a caller that times out
// holding a ticket sets the error word (kErrorProducerTimeout), so later
// tickets never wait on a hole.
//
// ---- Lifetimes
// The host object that made the queue (rxe: lamina::verbs::RxeDirectQueue)
// owns the queue pair, its rings and the state, and outlives every caller.
#pragma once

#include "../device.cuh"

namespace lamina {
namespace direct {

enum DirectOpcode : lamina_u8 {
  kDirectWrite = 1,       // RDMA WRITE of `bytes` from (local_addr, lkey) to (remote_addr, rkey)
  kDirectWriteImm = 2,    // the same, with 32-bit immediate `imm` (raises a receive completion at the peer)
  kDirectFetchAdd = 3,    // 64-bit ATOMIC FETCH_AND_ADD of `add` at remote_addr; the old value lands at local_addr
};

// What one work request does; the Format turns it into its NIC's bytes.
struct DirectRequest {
  lamina_u64 local_addr;
  lamina_u64 remote_addr;
  lamina_u64 add;
  lamina_u32 bytes;
  lamina_u32 lkey;
  lamina_u32 rkey;
  lamina_u32 imm;
  lamina_u8 opcode;       // DirectOpcode
  lamina_u8 inline_data;  // copy the payload into the work request (at most the format's inline limit)
  lamina_u8 fence;        // wait for earlier reads/atomics before this one (mlx5 fence bit; rxe IBV_SEND_FENCE)
  lamina_u8 reserved0;
};

// One completion as read from the CQ.
struct DirectCompletion {
  lamina_u64 counter;   // the completed request's WQE counter (kCounterBits wide)
  lamina_u32 status;    // 0: success; else the NIC's status (rxe: ibv_wc_status) or syndrome (mlx5)
  lamina_u32 vendor;    // vendor error / syndrome detail
};

// Queue words every caller shares (device memory on a GPU). One cache line each.
struct DirectQueueState {
  alignas(64) lamina_u64 reserved;   // next ticket to hand out
  alignas(64) lamina_u64 ready;      // tickets [0, ready) are written, in order
  alignas(64) lamina_u64 rung;       // tickets [0, rung) are published to the NIC
  lamina_u64 doorbells;              // doorbells rung (each covers every ready request before it)
  lamina_u32 doorbell_lock;
  alignas(64) lamina_u64 completed;  // tickets [0, completed) completed at the NIC (applied at the target on RC)
  lamina_u64 cq_consumer;            // CQEs [0, cq_consumer) have been read
  lamina_u32 poll_lock;
  alignas(64) lamina_u64 error;      // a DeviceError; kErrorNone while healthy
  lamina_u64 error_ticket;           // the ticket that failed
  lamina_u64 error_status;           // the NIC's status (rxe: ibv_wc_status) or mlx5 syndrome
  lamina_u64 error_vendor;           // vendor error detail
};

// The handle: trivially copyable, passed by value into kernels. The fields a
// format does not use stay zero.
struct DirectQueue {
  lamina_u8* sq;                 // send-queue slots
  lamina_u8* cq;                 // completion-queue entries
  DirectQueueState* state;
  lamina_u32* sq_producer;       // rxe: the queue's producer index; mlx5: doorbell record word 1 (send counter, BE)
  lamina_u32* cq_producer;       // rxe: the CQ's producer index (mlx5: none, ownership bit instead)
  lamina_u32* cq_consumer;       // rxe: the CQ's consumer index; mlx5: CQ doorbell record word 0 (BE)
  lamina_u64* doorbell;          // mlx5: the UAR doorbell register (8-byte MMIO)
  // Host kick after publish (rxe's doorbell is a system call; CPU callers
  // only). Null on a GPU: there a host thread watches `rung` (CPU-assisted).
  void (*kick)(void* context);
  void* kick_context;
  lamina_u64 depth;              // send-queue slots usable at once (a power of two or the ring's usable size)
  lamina_u64 timeout_ns;         // bound of every wait
  lamina_u32 sq_slots_log2;      // the SQ ring has 1 << sq_slots_log2 slots
  lamina_u32 sq_slot_log2;       // bytes per slot (mlx5: 6, one WQEBB)
  lamina_u32 cq_entries_log2;
  lamina_u32 cq_entry_log2;      // bytes per CQE
  lamina_u32 qpn;
  lamina_u32 batch;              // ring after this many ready requests (1: every request)
  lamina_u32 max_inline;         // largest inline payload the format and queue take
  lamina_u32 reserved0;
};

namespace direct_detail {

// Every wait here pauses alone for its first 4096 polls on a CPU: a
// completion that a NIC or the kernel gives within tens of microseconds is
// then seen without a system call in the wait.
constexpr lamina_u32 kPauseOnlyPolls = 4096;

using device_detail::WaitBound;

LAMINA_HD bool try_lock(lamina_u32* lock) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(lock, 0u, 1u) == 0u;
#else
  lamina_u32 expected = 0;
  return __atomic_compare_exchange_n(lock, &expected, 1u, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
#endif
}

LAMINA_HD void unlock(lamina_u32* lock) {
#if defined(__CUDA_ARCH__)
  __threadfence();
  atomicExch(lock, 0u);
#else
  __atomic_store_n(lock, 0u, __ATOMIC_RELEASE);
#endif
}

// First failure wins.
LAMINA_HD void set_error(DirectQueueState* s, lamina_u64 code, lamina_u64 ticket, lamina_u64 status,
                         lamina_u64 vendor) {
#if defined(__CUDA_ARCH__)
  unsigned long long old = atomicCAS(reinterpret_cast<unsigned long long*>(&s->error), 0ull,
                                     static_cast<unsigned long long>(code));
  if (old == 0) {
    s->error_ticket = ticket;
    s->error_status = status;
    s->error_vendor = vendor;
  }
  __threadfence_system();
#else
  lamina_u64 expected = 0;
  if (__atomic_compare_exchange_n(&s->error, &expected, code, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    __atomic_store_n(&s->error_ticket, ticket, __ATOMIC_RELEASE);
    __atomic_store_n(&s->error_status, status, __ATOMIC_RELEASE);
    __atomic_store_n(&s->error_vendor, vendor, __ATOMIC_RELEASE);
  }
#endif
}

LAMINA_HD bool failed(const DirectQueue& q) { return device_detail::load_acquire(&q.state->error) != kErrorNone; }

// The full ticket of a completion whose counter is `bits` wide, given that
// every ticket below `completed` has completed and fewer than 2^bits are
// outstanding (the queue depth guarantees it: mlx5 queues hold <= 32768).
LAMINA_HD lamina_u64 extend_counter(lamina_u64 completed, lamina_u64 counter, lamina_u32 bits) {
  if (bits >= 64) return counter;
  const lamina_u64 mask = (1ull << bits) - 1;
  return completed + ((counter - completed) & mask);
}

}  // namespace direct_detail

// Reads every completion available now (one caller at a time; the others
// return at once). Returns false once the queue has failed.
template <typename Format>
LAMINA_HD bool poll_completions(const DirectQueue& q) {
  using namespace direct_detail;
  DirectQueueState* s = q.state;
  if (!try_lock(&s->poll_lock)) return !failed(q);
  lamina_u64 consumer = s->cq_consumer;
  lamina_u64 completed = device_detail::load_acquire(&s->completed);
  bool read_any = false;
  DirectCompletion c;
  while (Format::poll(q, consumer, &c) == 1) {
    ++consumer;
    read_any = true;
    const lamina_u64 ticket = extend_counter(completed, c.counter, Format::kCounterBits);
    if (c.status != 0) {
      set_error(s, kErrorTransfer, ticket, c.status, c.vendor);
      break;
    }
    if (ticket >= device_detail::load_acquire(&s->rung)) {
      // A completion for a request never published: the counter is corrupt.
      set_error(s, kErrorTransfer, ticket, 0xffffffffu, 0);
      break;
    }
    completed = ticket + 1;
  }
  if (read_any) {
    s->cq_consumer = consumer;
    Format::release(q, consumer);
    device_detail::store_release(&s->completed, completed);
  }
  unlock(&s->poll_lock);
  return !failed(q);
}

// Publishes every ready request with one doorbell, if any is unpublished.
template <typename Format>
LAMINA_HD void ring(const DirectQueue& q) {
  using namespace direct_detail;
  DirectQueueState* s = q.state;
  if (!try_lock(&s->doorbell_lock)) return;  // the holder publishes what is ready when it rings
  const lamina_u64 ready = device_detail::load_acquire(&s->ready);
  if (ready > s->rung) {
    Format::publish(q, ready);
    device_detail::store_release(&s->rung, ready);
    s->doorbells += 1;
    if (q.kick != 0) {
#if !defined(__CUDA_ARCH__)
      q.kick(q.kick_context);
#endif
    }
  }
  unlock(&s->doorbell_lock);
}

// Rings until request `ticket` is published: a caller that loses the
// doorbell lock may have made its request ready after the holder read
// `ready`, so it tries again until `rung` covers it (bounded).
template <typename Format>
LAMINA_HD DeviceStatus ring_through(const DirectQueue& q, lamina_u64 ticket) {
  direct_detail::WaitBound bound(q.timeout_ns, direct_detail::kPauseOnlyPolls);
  while (device_detail::load_acquire(&q.state->rung) <= ticket) {
    ring<Format>(q);
    if (direct_detail::failed(q)) return kDeviceChannelError;
    if (bound.expired()) return kDeviceTimeout;
  }
  return kDeviceOk;
}

// When post rings the doorbell.
enum DirectRing : lamina_u32 {
  kRingByBatch = 0,  // once `batch` requests are ready and unpublished
  kRingNow = 1,      // right after this request (it is published when post returns)
  kRingDeferred = 2, // not here: a later post, ring or flush publishes it (the data half of put_signal)
};

// Posts one request; `ring` says when the doorbell goes (DirectRing; false /
// true mean kRingByBatch / kRingNow). On kDeviceOk, *ticket_out (when not
// null) names the request for wait_completed.
template <typename Format>
LAMINA_HD DeviceStatus post(const DirectQueue& q, const DirectRequest& r, lamina_u32 ring_mode, lamina_u64* ticket_out) {
  using namespace direct_detail;
  DirectQueueState* s = q.state;
  if (failed(q)) return kDeviceChannelError;
  if (r.opcode < kDirectWrite || r.opcode > kDirectFetchAdd) return kDeviceInvalidArgument;
  if (r.inline_data && (r.opcode == kDirectFetchAdd || r.bytes > q.max_inline)) return kDeviceInvalidArgument;
  if (r.opcode == kDirectFetchAdd && (r.remote_addr % 8 != 0 || r.local_addr % 8 != 0)) return kDeviceInvalidArgument;

  const lamina_u64 ticket = device_detail::fetch_add(&s->reserved, 1);
  WaitBound free_bound(q.timeout_ns, direct_detail::kPauseOnlyPolls);
  while (ticket - device_detail::load_acquire(&s->completed) >= q.depth) {
    // Ring first: the requests holding the slots may still be unpublished.
    ring<Format>(q);
    if (!poll_completions<Format>(q)) return kDeviceChannelError;
    if (free_bound.expired()) {
      set_error(s, kErrorProducerTimeout, ticket, 0, 0);
      return kDeviceTimeout;
    }
  }
  lamina_u8* slot = q.sq + ((ticket & ((1ull << q.sq_slots_log2) - 1)) << q.sq_slot_log2);
  Format::write(q, slot, ticket, r);
  device_detail::fence_system();

  WaitBound order_bound(q.timeout_ns, direct_detail::kPauseOnlyPolls);
  while (device_detail::load_acquire(&s->ready) != ticket) {
    if (failed(q)) return kDeviceChannelError;
    if (order_bound.expired()) {
      set_error(s, kErrorProducerTimeout, ticket, 0, 0);
      return kDeviceTimeout;
    }
  }
  device_detail::store_release(&s->ready, ticket + 1);
  if (ticket_out != 0) *ticket_out = ticket;
  if (ring_mode == kRingNow) return ring_through<Format>(q, ticket);
  if (ring_mode == kRingByBatch && ticket + 1 - device_detail::load_acquire(&s->rung) >= q.batch) ring<Format>(q);
  return kDeviceOk;
}

// Waits (bounded) until request `ticket` has completed; on RC that means the
// target applied it and every request before it.
template <typename Format>
LAMINA_HD DeviceStatus wait_completed(const DirectQueue& q, lamina_u64 ticket) {
  using namespace direct_detail;
  WaitBound bound(q.timeout_ns, direct_detail::kPauseOnlyPolls);
  while (device_detail::load_acquire(&q.state->completed) <= ticket) {
    ring<Format>(q);
    if (!poll_completions<Format>(q)) return kDeviceChannelError;
    if (bound.expired()) return failed(q) ? kDeviceChannelError : kDeviceTimeout;
  }
  return failed(q) ? kDeviceChannelError : kDeviceOk;
}

// Every request reserved before the call has completed (rings what is ready).
template <typename Format>
LAMINA_HD DeviceStatus flush(const DirectQueue& q) {
  const lamina_u64 reserved = device_detail::load_acquire(&q.state->reserved);
  if (reserved == 0) return direct_detail::failed(q) ? kDeviceChannelError : kDeviceOk;
  // Wait until the last reserved ticket is ready, then ring and wait for it.
  direct_detail::WaitBound bound(q.timeout_ns, direct_detail::kPauseOnlyPolls);
  while (device_detail::load_acquire(&q.state->ready) < reserved) {
    if (direct_detail::failed(q)) return kDeviceChannelError;
    if (bound.expired()) return kDeviceTimeout;
  }
  const DeviceStatus st = ring_through<Format>(q, reserved - 1);
  if (st != kDeviceOk) return st;
  return wait_completed<Format>(q, reserved - 1);
}

// put with signal: the data WRITE, then a FETCH_AND_ADD of `add` on the
// signal word, same queue pair. The RC responder applies requests of one QP
// in order, so the signal is never applied before the data is placed. The
// atomic's old value lands at `scratch_addr` (8 bytes, lkey `scratch_lkey`).
template <typename Format>
LAMINA_HD DeviceStatus put_signal(const DirectQueue& q, DirectRequest data, lamina_u64 signal_addr,
                                  lamina_u32 signal_rkey, lamina_u64 add, lamina_u64 scratch_addr,
                                  lamina_u32 scratch_lkey, lamina_u64* ticket_out) {
  // One doorbell for the pair: the data WRITE waits for the signal's ring.
  DeviceStatus st = post<Format>(q, data, kRingDeferred, 0);
  if (st != kDeviceOk) return st;
  DirectRequest sig{};
  sig.opcode = kDirectFetchAdd;
  sig.remote_addr = signal_addr;
  sig.rkey = signal_rkey;
  sig.add = add;
  sig.local_addr = scratch_addr;
  sig.lkey = scratch_lkey;
  sig.bytes = 8;
  return post<Format>(q, sig, kRingNow, ticket_out);
}

}  // namespace direct
}  // namespace lamina
