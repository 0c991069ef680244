// lamina-net verbs: one reliable-connected (RC) queue pair to one peer.
//
// How each operation maps onto verbs (one QP, one CQ for both directions):
// - put: RDMA WRITE. Host sources up to the QP's inline limit
//   (IB_MAX_INLINE, 512 B asked; 220, 64 or 0 where the device grants less)
//   are inlined. Larger host sources up to IB_STAGE_MAX (4 KiB; at most one
//   chunk), and unregistered sources of any size, are copied into
//   registered staging slots, so post_put returns at once and back-to-back
//   puts overlap. A source inside a region registered with this transport
//   and above IB_STAGE_MAX (or in GPU memory) is written zero-copy, as
//   ib_write_lat and NVSHMEM do, and post_put waits for its completion,
//   because the contract lets the caller reuse the source as soon as
//   post_put returns - unless the put has an OpState (iput): then the
//   caller keeps the source until it completes, and post_put returns at
//   once. Why 4 KiB: above it the copy costs about as much as the wire time
//   it would hide, and in a ping-pong the wait for the acknowledgement
//   overlaps the peer's reply anyway. Staged WRs are signaled only once half
//   the staging slots are taken (a completion retires every earlier WR of
//   the QP), so small puts do not cost a completion each.
//   try_post_small_put is the inlined or staged WRITE with one lock and no
//   waiting: the latency path for puts up to IB_STAGE_MAX (a decode step's
//   activations).
// - put with signal: the data WRITE(s), then on the same QP an ATOMIC
//   FETCH_AND_ADD of `add` on the signal word. This keeps "the signal never
//   overtakes the data": an RC responder executes the requests of one QP in
//   order, so the atomic is applied only after the preceding WRITEs' data is
//   placed. An add rather than a WRITE of a value, so several producers (or
//   several puts) can bump one word without overwriting each other.
// - atomic add: ATOMIC FETCH_AND_ADD; the previous value lands in a small
//   registered scratch slot and becomes done->value().
// - send/recv: SEND into pre-posted receive bounce buffers (IB_RECV_DEPTH of
//   IB_CHUNK_SIZE bytes). A message is one or more fragments; the first
//   carries a 16-byte header with the total length. The receiver copies
//   fragments into the buffers given to post_recv, in order, and reposts each
//   bounce buffer as soon as it is copied out. A message longer than its
//   receive buffer fails that receive (kUsage) and is dropped. Messages that arrive before
//   their receive is posted are copied aside (up to MAX_UNEXPECTED_BYTES, as
//   the tcp transport does). Credit-based flow control: the sender never has
//   more fragments outstanding than the receiver has buffers posted; the
//   receiver returns credits by RDMA-writing its running count of reposted
//   buffers into the sender's inbox word. A receiver that posts no receive
//   and whose unexpected buffer is full therefore back-pressures the sender
//   (bounded by the sender's deadline).
// - flush: a signaled zero-length WRITE; send completions of one QP arrive in
//   posting order and an RC completion means the responder acknowledged, so
//   its completion implies every earlier WR was applied at the target.
// - close: writes a "closed" word into the peer's inbox (waits <= 100 ms for
//   it), then destroys the QP. The peer sees it on its next progress(),
//   delivers what had already arrived, then fails with "peer closed".
//
// Failure: a work completion with an error status fails the connection with
// ibv_wc_status_str text (never read as "not done yet"); the QP is moved to
// the error state so the peer notices too. While receives, senders or
// signal waiters (note_signal_waiter) wait and their progress saw nothing
// posted for IB_KEEPALIVE_MS (posts are counted,
// not timed: no clock read per post), a zero-length WRITE probes the
// peer, so a peer that died is detected by the transport retry
// limit ((IB_RETRY_CNT + 1) x 4.096us x 2^IB_TIMEOUT, ~0.5 s by default).
//
// Progress: a thread calling progress() in a loop drives the connection.
// When nobody has for 5 ms (or stop_driving() was called), the connection's
// own progress thread takes over. While a user thread keeps driving, the
// progress thread looks again after about 5, 10, 20, then every 40 ms (each
// look takes a core from a spinning thread when the cores are all busy), so
// a user thread that stops driving without stop_driving() is taken over
// within 45 ms at worst, and within 5 ms after a short drive. Taken over, it
// sleeps on the CQ's completion channel (woken per completion, and at least
// every 100 ms for keepalive and the peer's close flag), so messages are
// buffered, credits returned, failures detected and on_inbound called even
// while the user is busy elsewhere.
// One-sided writes into our regions raise no completion here: a thread that
// waits for a signal word polls memory (wait_inbound keeps the short default).
//
// Threads: posters are serialized by post_mutex_ (a message's fragments are
// never interleaved with another message); completion state is guarded by
// state_mutex_, which posters release while they back off, so progress() and
// post_recv() from other threads are never blocked for long. on_inbound is
// called without either lock held.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "transports/transport.hpp"
#include "transports/verbs/qp_state.hpp"
#include "transports/verbs/verbs_device.hpp"

namespace lamina::verbs {

// Per-connection sizes and protocol timers (LAMINA_NET_IB_* settings).
struct RcConfig {
  uint32_t queue_depth = 256;
  uint32_t recv_depth = 32;
  uint32_t chunk_size = 32768;
  uint32_t stage_max = 4096;  // registered sources above it go zero-copy (capped at chunk_size)
  uint32_t max_inline = 512;  // inline bytes asked of the QP; the device may grant less
  uint8_t ack_timeout = 14;
  uint8_t retry_count = 6;  // not 7: rxe treats 7 as "retry forever", and a dead peer would go unnoticed
  uint32_t keepalive_ms = 1000;
  uint64_t max_unexpected_bytes = 64ull << 20;
  static RcConfig from_settings();
};

// Page-aligned host memory registered for local access (and remote write
// when `remote_write`), owned together with its MR.
class RegisteredBuffer {
 public:
  RegisteredBuffer(const VerbsDevice& device, size_t size, bool remote_write);
  uint8_t* data() const { return memory_.get(); }
  size_t size() const { return size_; }
  uint32_t lkey() const { return mr_->lkey; }
  uint32_t rkey() const { return mr_->rkey; }

 private:
  struct FreeDeleter { void operator()(uint8_t* p) const; };
  std::unique_ptr<uint8_t, FreeDeleter> memory_;
  size_t size_ = 0;
  UniqueMr mr_;  // declared after memory_: deregistered before the memory is freed
};

// What each side publishes in the store to connect an RC QP.
struct RcEndpointInfo {
  QpAddress address;        // the QP (number, first PSN, LID, MTU, link layer, GID)
  uint32_t recv_depth = 0;  // initial send credits for the peer
  uint32_t chunk_size = 0;  // largest fragment the peer may send us
  uint64_t inbox_addr = 0;  // where the peer writes credits / the closed flag
  uint32_t inbox_rkey = 0;
  uint64_t secret_hi = 0;
  uint64_t secret_lo = 0;

  std::string serialize() const;
  // Throws kSystem on a malformed blob.
  static RcEndpointInfo deserialize(const std::string& blob, int from_rank);
};

class RcConnection final : public Connection {
 public:
  // Creates the QP and buffers, exchanges RcEndpointInfo through the store,
  // and returns once both sides are ready to send (kTimeout at the deadline).
  static std::unique_ptr<RcConnection> connect(std::shared_ptr<VerbsDevice> device, const ConnectParams& params,
                                               const RcConfig& config);
  ~RcConnection() override;

  const char* transport_name() const override { return "verbs"; }
  void post_put(const LocalSlice& src, const RemoteSlice& dst, const RemoteWord* signal, const OpRef& done,
                Deadline deadline) override;
  bool try_post_small_put(const void* src, uint64_t len, const RemoteSlice& dst) override;
  void post_atomic_add(const RemoteWord& word, const OpRef& done, Deadline deadline) override;
  void post_send(const void* data, uint64_t len, const OpRef& done, Deadline deadline) override;
  void post_recv(void* buffer, uint64_t capacity, const OpRef& done) override;
  bool cancel_recv(const OpRef& op) override;
  void post_flush(const OpRef& done, Deadline deadline) override;
  bool progress() override;
  void stop_driving() override;
  // RDMA writes and atomics land in our memory with no completion here.
  bool writes_directly() const override { return true; }
  bool inbound_writes_need_no_progress() const override { return true; }
  void note_signal_waiter(int delta) override { signal_waiters_.fetch_add(delta, std::memory_order_relaxed); }
  // Host sources up to stage_max_ are inlined or staged and need no lkey
  // (saves the region lookup); larger registered ones go zero-copy.
  bool needs_source_region(uint64_t len, bool device) const override { return device || len > stage_max_; }
  void close() override;
  bool failed(std::string* why) const override;

 private:
  enum class WrKind : uint8_t { kWrite, kSignal, kAtomic, kSend, kCredit, kFlush, kProbe, kCloseNotice };
  // A posted send-queue WR, retired in posting order when a signaled WR at or
  // after it completes.
  struct InFlight {
    uint64_t seq = 0;
    WrKind kind = WrKind::kWrite;
    bool signaled = false;
    int staging_slot = -1;
    int scratch_slot = -1;
    OpRef done;
  };
  struct PendingRecv {
    uint8_t* buffer = nullptr;
    uint64_t capacity = 0;
    OpRef done;
  };
  struct ArrivedFragment {
    uint32_t slot = 0;
    uint32_t length = 0;
  };
  struct InboundMessage {
    enum Target : uint8_t { kRecv, kUnexpected, kDiscard };
    uint64_t total = 0;
    uint64_t copied = 0;
    Target target = kRecv;  // the first pending recv, unexpected_.back(), or dropped (too long)
  };
  // A message that arrived before a receive was posted for it.
  struct UnexpectedMessage {
    std::unique_ptr<uint8_t[]> bytes;
    uint64_t size = 0;
    bool complete = false;
  };
  // Layout of the peer-writable inbox page.
  struct Inbox {
    uint64_t credits_granted;  // running count of receive buffers the peer reposted
    uint64_t peer_closed;      // non-zero once the peer closed
  };

  RcConnection(std::shared_ptr<VerbsDevice> device, const ConnectParams& params, const RcConfig& config);
  void create_queue_pair();
  void bring_up(const RcEndpointInfo& peer);
  RcEndpointInfo local_info() const;

  // All *_locked helpers need state_mutex_ held.
  bool drive();  // progress without marking an external driver
  void run_progress_thread();
  void wake_progress_thread();
  bool progress_locked();
  void on_completion_locked(const ibv_wc& wc);
  void retire_through_locked(uint64_t seq);
  void deliver_locked();
  void fail_too_long(PendingRecv& recv, uint64_t message_bytes);
  void repost_receive_locked(uint32_t slot);
  void return_credits_locked();
  void maybe_probe_locked();
  // Takes a free staging slot (the caller checked there is one) for `entry`,
  // which gives it back when the WR retires; returns the slot's memory.
  uint8_t* take_staging_slot_locked(InFlight& entry);
  // Posts one WR described by `wr` (wr_id/flags filled here); the caller made
  // sure a send-queue slot is free. Returns the WR's sequence number.
  uint64_t post_wr_locked(ibv_send_wr& wr, InFlight entry, bool must_signal);
  // RDMA-WRITEs one u64 (from scratch slot `scratch_slot`) into the peer's inbox at
  // `inbox_offset`; returns the WR's sequence number.
  uint64_t write_inbox_word_locked(int scratch_slot, uint64_t value, size_t inbox_offset, WrKind kind);
  // A signaled zero-length RDMA WRITE to the peer's inbox (keepalive probe,
  // flush): its completion means everything before it was acknowledged.
  uint64_t post_empty_write_locked(WrKind kind, const OpRef& done);
  // Posts a chain of `count` WRs with one ibv_post_send; returns the last sequence number.
  uint64_t post_wrs_locked(ibv_send_wr* wrs, InFlight* entries, int count, bool must_signal_last);
  // Drives progress until ready() or the deadline (kTimeout naming the op).
  template <typename Ready>
  void wait_locked(std::unique_lock<std::mutex>& lock, Deadline deadline, const char* op, uint64_t bytes, Ready ready);
  void throw_if_failed_locked() const;
  // Fails fast when the connection failed, closed, or the peer closed.
  void check_usable_locked();
  void fail_locked(const std::string& reason);
  void notify_inbound();
  void release_resources_locked();

  uint32_t send_queue_free() const { return queue_depth_ - static_cast<uint32_t>(in_flight_.size()); }
  uint64_t send_credits() const;
  uint8_t* recv_slot(uint32_t slot) const { return recv_buffers_->data() + size_t(slot) * chunk_size_; }
  uint8_t* staging_slot(int slot) const { return staging_buffers_->data() + size_t(slot) * chunk_size_; }
  uint64_t* scratch_word(int slot) const { return reinterpret_cast<uint64_t*>(scratch_->data()) + slot; }
  Inbox* inbox() const { return reinterpret_cast<Inbox*>(inbox_->data()); }
  // The lkey of `src` when it lies in a region registered with this device.
  std::optional<uint32_t> registered_lkey(const LocalSlice& src) const;
  std::string describe_wc_failure(const ibv_wc& wc, WrKind kind) const;

  std::shared_ptr<VerbsDevice> device_;
  const RcConfig config_;
  const std::function<void()> on_inbound_;
  const uint64_t secret_hi_;
  const uint64_t secret_lo_;

  // Verbs objects. Declared in dependency order: destroyed QP first, then CQ,
  // then the MRs and memory.
  std::unique_ptr<RegisteredBuffer> recv_buffers_;     // recv_depth x chunk
  std::unique_ptr<RegisteredBuffer> staging_buffers_;  // staging_slots x chunk
  std::unique_ptr<RegisteredBuffer> scratch_;          // atomic results, credit/closed sources
  std::unique_ptr<RegisteredBuffer> inbox_;            // written by the peer
  UniqueCompChannel completion_channel_;               // wakes the progress thread
  UniqueCq cq_;
  UniqueQp qp_;
  uint32_t psn_ = 0;
  uint32_t queue_depth_ = 0;
  uint32_t recv_depth_ = 0;
  uint32_t max_inline_ = 0;
  uint32_t chunk_size_ = 0;
  uint32_t stage_max_ = 0;  // host sources up to here are inlined or staged (>= max_inline_, <= chunk_size_)
  uint32_t staging_slots_ = 0;
  uint64_t max_write_bytes_ = 0;

  // Peer facts, from its RcEndpointInfo.
  uint32_t peer_recv_depth_ = 0;
  uint32_t peer_chunk_size_ = 0;
  uint64_t peer_inbox_addr_ = 0;
  uint32_t peer_inbox_rkey_ = 0;

  std::mutex post_mutex_;
  mutable std::mutex state_mutex_;
  // --- guarded by state_mutex_
  bool connected_ = false;  // both QPs reached RTS
  bool closed_ = false;
  bool peer_closed_ = false;
  uint64_t next_seq_ = 1;
  uint32_t unsignaled_run_ = 0;
  uint64_t seq_at_last_look_ = 0;   // next_seq_ when maybe_probe_locked last saw it change
  uint64_t last_post_seen_ns_ = 0;  // ... and when
  std::deque<InFlight> in_flight_;
  std::vector<int> free_staging_;
  std::vector<int> free_scratch_;
  uint64_t fragments_sent_ = 0;
  uint64_t credits_granted_ = 0;   // receive buffers reposted (running count)
  uint64_t credits_announced_ = 0; // last count written to the peer
  bool credit_write_in_flight_ = false;
  bool waiting_for_peer_ = false;  // a poster waits for credits: keep probing
  std::atomic<int> signal_waiters_{0};  // threads waiting for a signal word from the peer: keep probing
  std::deque<ArrivedFragment> arrived_;
  std::deque<PendingRecv> pending_recvs_;
  std::optional<InboundMessage> inbound_;
  std::deque<UnexpectedMessage> unexpected_;
  uint64_t unexpected_bytes_ = 0;
  bool inbound_notify_ = false;
  // --- progress thread
  std::thread progress_thread_;
  int wake_fd_ = -1;  // eventfd: stop_driving() and close() wake the thread
  std::atomic<bool> stop_thread_{false};
  std::atomic<uint64_t> external_progress_ns_{0};  // last progress() from a user thread, 0 = none
  // --- failure state, readable without state_mutex_
  std::atomic<bool> failed_{false};
  mutable std::mutex reason_mutex_;
  std::string reason_;
};

}  // namespace lamina::verbs
