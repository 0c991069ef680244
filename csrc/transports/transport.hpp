// lamina-net: the one interface every transport implements (tcp, shm, verbs).
//
// A Transport is per endpoint: it registers memory (if it needs to) and makes
// Connections. A Connection joins this rank and one peer and executes
// operations on regions. Everything above this layer is transport-agnostic.
//
// Contracts every Connection honours:
// - Ordering: operations posted on one connection are applied at the target in
//   posting order. A put's signal is applied only after that put's data is
//   visible at the target, so a receiver that sees the signal may read the data.
// - Validation: the channel layer has already checked the local slice and the
//   remote slice against the descriptor (bounds, rights). Transports whose
//   target side applies operations (tcp, shm) validate again at the target
//   against the target's RegionTable and never write outside a region.
// - Completion: post_* return once the source memory may be reused ("local
//   completion"), blocking at most until `deadline` when the transport is
//   backed up (then kTimeout). An OpState passed in completes later: for put /
//   atomic / flush when the operation is applied at the target; for send when
//   the message is handed to the transport; for recv when a message arrived.
//   One exception, as with MPI_Isend or NVSHMEM's *_nbi: a put given an
//   OpState may keep reading its source until that OpState completes (verbs
//   then writes a registered source zero-copy without waiting), so the
//   caller must not change the source before then.
// - Errors: any failure (peer gone, hostile frame, work completion error) fails
//   the connection: failed() turns true with the first reason, pending
//   OpStates fail with it, and later posts throw kSystem with it (sticky).
// - Threads: post_*, progress() and close() may be called from any thread.
//   Blocking waits happen above this layer (OpState::wait), which calls
//   progress() while spinning so that the waiting thread drives the transport.
#pragma once

#include <atomic>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/clock.hpp"
#include "common/error.hpp"
#include "common/kv_store.hpp"
#include "memory/region.hpp"

namespace lamina {

// Completion object of one operation. Shared between the poster and the
// transport; polled or waited on by the handle that the user holds.
class OpState {
 public:
  enum State : int { kPending = 0, kDone = 1, kFailed = 2 };
  bool done() const { return state_.load(std::memory_order_acquire) != kPending; }
  bool failed() const { return state_.load(std::memory_order_acquire) == kFailed; }
  int state() const { return state_.load(std::memory_order_acquire); }
  // Set by the poster of a receive: a wait that times out withdraws it.
  bool is_recv = false;
  // Result: bytes received (recv), old value (atomic add), 0 otherwise.
  uint64_t value() const { return value_; }
  std::string error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }
  void complete(uint64_t value = 0) {
    value_ = value;
    state_.store(kDone, std::memory_order_release);
  }
  // kUsage for the caller's mistakes (a message too long for the buffer),
  // kSystem for everything else.
  ErrorKind error_kind() const { return error_kind_; }
  void fail(const std::string& why, ErrorKind kind = ErrorKind::kSystem) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (state_.load(std::memory_order_relaxed) != kPending) return;
      error_ = why;
      error_kind_ = kind;
    }
    state_.store(kFailed, std::memory_order_release);
  }
  // Makes a finished op pending again, for a poster that reuses its ops (the
  // device proxy's flushes). Only when no transport still holds it.
  void reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    error_.clear();
    value_ = 0;
    error_kind_ = ErrorKind::kSystem;
    state_.store(kPending, std::memory_order_release);
  }

 private:
  std::atomic<int> state_{kPending};
  uint64_t value_ = 0;
  mutable std::mutex mutex_;
  std::string error_;
  ErrorKind error_kind_ = ErrorKind::kSystem;
};
using OpRef = std::shared_ptr<OpState>;

// Source of a put: local bytes, optionally inside a registered region (verbs
// needs the region's lkey; tcp/shm do not).
struct LocalSlice {
  const void* ptr = nullptr;
  uint64_t len = 0;
  const Region* region = nullptr;  // null when the source is unregistered memory
  bool device = false;             // ptr is CUDA device memory
};

// Destination of a put: [offset, offset+len) of a peer's region.
struct RemoteSlice {
  RegionDescriptor target;
  uint64_t offset = 0;
};

// A 64-bit word in a peer's region to add to (signal or atomic add).
struct RemoteWord {
  RegionDescriptor target;
  uint64_t offset = 0;  // must be 8-byte aligned
  uint64_t add = 1;
};

// One put of a batch (Connection::post_puts); `signal` is used when has_signal.
struct PutOp {
  LocalSlice src;
  RemoteSlice dst;
  RemoteWord signal;
  bool has_signal = false;
};

// Everything a transport needs to connect one pair of ranks.
struct ConnectParams {
  int self_rank = 0;
  int peer_rank = 0;
  std::string key_prefix;   // unique per endpoint group + channel, for the store
  uint64_t group_secret_hi = 0;
  uint64_t group_secret_lo = 0;
  KeyValueStore* store = nullptr;
  RegionTable* regions = nullptr;  // this rank's regions (target-side validation)
  Deadline deadline;
  // Called (from any thread) whenever an inbound operation changed local
  // memory that someone may be waiting on (a signal, an atomic, a message).
  std::function<void()> on_inbound;
};

class Connection {
 public:
  virtual ~Connection() = default;
  virtual const char* transport_name() const = 0;
  int peer_rank() const { return peer_rank_; }

  // One-sided write of `src` to `dst`; then, if `signal` is non-null, add
  // signal->add to that remote 64-bit word. `done` (nullable) completes when
  // data (and signal) are applied at the target; with `done`, `src` must stay
  // unchanged until then (see Completion above).
  virtual void post_put(const LocalSlice& src, const RemoteSlice& dst, const RemoteWord* signal,
                        const OpRef& done, Deadline deadline) = 0;
  // The latency path of post_put: a small put from host memory with no
  // signal and no completion, posted only if that needs no waiting and no
  // region lookup (verbs: one RDMA WRITE, inlined or from a free staging
  // slot, with a free send-queue slot and the connection lock uncontended).
  // Returns false, with nothing posted, whenever it cannot - the caller then
  // uses post_put, which waits, reports errors and handles every other case.
  // Never throws for "cannot"; the bytes are copied out before it returns true.
  virtual bool try_post_small_put(const void* src, uint64_t len, const RemoteSlice& dst) {
    (void)src, (void)len, (void)dst;
    return false;
  }
  // The same for a put with a signal (host word, checked by the caller like
  // post_put's): true once both are posted (shm: both written into the
  // target's memory, the signal after the data); false, with nothing posted,
  // whenever that cannot be done at once.
  virtual bool try_post_small_put_signal(const void* src, uint64_t len, const RegionDescriptor& dst,
                                         uint64_t dst_offset, const RemoteWord& signal) {
    (void)src, (void)len, (void)dst, (void)dst_offset, (void)signal;
    return false;
  }
  // Batched puts: ops[0..n) in order, each as post_put would (the same
  // checks done beforehand, the same ordering, each signal after its own
  // data), with as few writes as the transport can (tcp: one sendmsg for a
  // run of framed puts). `done` (nullable) completes once all are applied at
  // the target; with it every source stays unchanged until then. Returns when
  // the sources may be reused. A failure part way fails the connection, as
  // post_put's does. The default posts them one by one; ordering makes the
  // last one's completion cover the others.
  virtual void post_puts(const PutOp* ops, size_t n, const OpRef& done, Deadline deadline) {
    if (n == 0) {
      if (done) done->complete();
      return;
    }
    for (size_t i = 0; i < n; ++i) {
      const PutOp& op = ops[i];
      post_put(op.src, op.dst, op.has_signal ? &op.signal : nullptr, i + 1 == n ? done : OpRef(), deadline);
    }
  }
  // Remote 64-bit fetch-and-add; done->value() is the previous value.
  virtual void post_atomic_add(const RemoteWord& word, const OpRef& done, Deadline deadline) = 0;
  // Two-sided, ordered messages. send copies or transmits `len` bytes before it
  // returns (local completion); done (nullable) completes then too.
  virtual void post_send(const void* data, uint64_t len, const OpRef& done, Deadline deadline) = 0;
  // Posts a receive buffer; receives complete in posting order, each with the
  // next message. A message longer than `capacity` fails that receive (kUsage)
  // and is dropped; the connection goes on.
  virtual void post_recv(void* buffer, uint64_t capacity, const OpRef& done) = 0;
  // Withdraws a posted receive that no message has started to fill; true if
  // withdrawn (the transport never touches its buffer again), false if it is
  // done or a message is being written into it right now.
  virtual bool cancel_recv(const OpRef& op) = 0;
  // done completes when every operation posted before it is applied at the target.
  virtual void post_flush(const OpRef& done, Deadline deadline) = 0;

  // Non-blocking: drive inbound and outbound work. Returns true if it did any.
  // A thread calling it in a loop is "driving" the connection; transports may
  // idle their own progress thread meanwhile.
  virtual bool progress() = 0;
  // The driving thread stops calling progress() (it is about to sleep): the
  // transport's own progress must take over now.
  virtual void stop_driving() {}
  // Blocks up to timeout_ms until inbound data may be available (or the
  // connection is woken/closed). Lets a thread that waits on this connection
  // alone sleep in the kernel object instead of handing off to another thread.
  // The default polls: it sleeps briefly and returns.
  virtual void wait_inbound(int timeout_ms) {
    if (timeout_ms > 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  // Like wait_inbound, but also returns (or does not sleep) once ready() is
  // true: a peer may change local memory without sending anything (shm
  // writes signals straight into shared allocations) and then only wakes a
  // sleeper that declared itself.
  virtual void wait_inbound_until(int timeout_ms, const std::function<bool()>& ready) {
    if (!ready()) wait_inbound(timeout_ms);
  }
  // True when the peer may change local memory without any inbound traffic
  // (see wait_inbound_until); multi-connection waits then sleep in short slices.
  virtual bool writes_directly() const { return false; }
  // True when every put and signal from the peer lands in local memory with
  // no help from this side's progress (RDMA: the NIC places them). A thread
  // waiting on a signal word then drives progress only now and then (for
  // failure detection and its own send queue), not on every poll of the word
  // (at the start of each wait and every 128th poll).
  virtual bool inbound_writes_need_no_progress() const { return false; }
  // Whether post_put wants LocalSlice::region filled in for a source of
  // `len` bytes (`device`: GPU memory). Verbs needs the source's lkey only
  // for zero-copy (GPU memory, or above the size it inlines or stages);
  // byte-stream transports never do, and skip the lookup.
  virtual bool needs_source_region(uint64_t len, bool device) const { return true; }
  // A thread starts (+1) or stops (-1) waiting for the peer to change local
  // memory (a signal word). Transports that notice a dead peer only when they
  // send (verbs: the NIC's retries) probe it meanwhile, so such a wait fails
  // with the peer's death instead of running into its own timeout.
  virtual void note_signal_waiter(int delta) { (void)delta; }
  // Idempotent. Pending operations fail with "connection closed".
  virtual void close() = 0;
  // True once the connection failed or closed; *why gets the first reason.
  virtual bool failed(std::string* why) const = 0;

 protected:
  int peer_rank_ = -1;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  // Called for every region registered on the endpoint (and on the regions
  // that exist when the transport is created). May fill region.rkey/lkey and
  // region.registrations[slot]. Throws kUsage/kSystem when it cannot.
  virtual void register_region(Region& region) { (void)region; }
  virtual void deregister_region(Region& region) { (void)region; }
  // Both ranks call connect with mirrored params; it returns once the pair is
  // connected, or throws (kTimeout at params.deadline, kSystem otherwise).
  virtual std::unique_ptr<Connection> connect(const ConnectParams& params) = 0;
};

}  // namespace lamina
