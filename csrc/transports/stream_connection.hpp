// lamina-net: the protocol engine shared by the byte-stream transports.
//
// tcp and shm differ only in how bytes move (a socket, or a pair of
// shared-memory rings); framing, validation, ordering, acks, flow control and
// failure handling live here once. A StreamConnection owns one ByteStream and
// one progress thread; threads that wait on its operations also drive it.
//
// Threading: the tx side is serialized by tx_mutex_ (a frame and its payload
// are written contiguously); the rx side by rx_mutex_ (one thread parses at a
// time). The rx path never blocks on tx: replies (acks, atomic results) go to
// a control queue flushed by whoever holds tx next, so two peers writing large
// payloads to each other cannot deadlock.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transports/transport.hpp"
#include "transports/wire.hpp"

namespace lamina {

// What a direct write (shm) did: written; refused (not possible for this
// target: use frames, which the target validates); or busy (another thread
// of this process is writing directly on this stream: try again).
enum class DirectResult { kDone, kRefused, kBusy };

// Bytes in, bytes out, non-blocking. Implementations: tcp socket, shm rings.
class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Reads up to `max` bytes. Returns the count, 0 when nothing is available.
  // Sets *eof when the peer closed (orderly); throws kSystem on errors.
  virtual size_t read_some(void* buf, size_t max, bool* eof) = 0;
  // Writes a prefix of the iovecs; returns bytes written, 0 when full.
  virtual size_t write_some(const struct iovec* iov, int iovcnt) = 0;
  // Blocks up to timeout_ms until readable, woken early by wake().
  // `ready` (optional) is checked after the stream registered the sleeper, so
  // a peer that changes memory directly and then wakes sleepers is not missed.
  virtual void wait_readable(int timeout_ms, const std::function<bool()>* ready = nullptr) = 0;
  virtual void wait_writable(int timeout_ms) = 0;
  virtual void wake() = 0;
  // Makes the peer see end-of-stream. Idempotent.
  virtual void shutdown() = 0;
  // Non-empty when the peer is known to be gone (e.g. its process exited).
  virtual std::string peer_gone_reason() { return {}; }
  // Single-copy pull support (shm): copy `len` bytes from the peer process's
  // address into `dst`. Returns false if the peer's memory is not reachable.
  virtual bool pull_from_peer(void* dst, uint64_t peer_addr, uint64_t len) { return false; }
  // Smallest put that uses a pull instead of streaming the payload.
  virtual uint64_t pull_threshold() const { return UINT64_MAX; }
  // Direct path (shm): copy `len` bytes straight into the target region when
  // the peer's memory is mapped here, then, if `signal` is given, add to its
  // word there (after the data). All or nothing: unless kDone, nothing was
  // written. Never blocks; any thread may call it (direct writes on one
  // stream exclude each other: kBusy). The caller guarantees ordering
  // (peer_applied() caught up with its frames) beforehand.
  virtual DirectResult direct_put_signal(const RegionDescriptor& target, uint64_t offset, const void* src,
                                         uint64_t len, const RemoteWord* signal) {
    return DirectResult::kRefused;
  }
  virtual uint64_t direct_put_threshold() const { return UINT64_MAX; }
  // Direct 64-bit fetch-and-add on a word of the peer's shared allocation,
  // then wakes a peer asleep on this stream. The same rules.
  virtual DirectResult direct_atomic_add(const RegionDescriptor& target, uint64_t offset, uint64_t add,
                                         uint64_t* old) {
    return DirectResult::kRefused;
  }
  virtual bool writes_directly() const { return false; }
  // True when a read would find nothing and the peer has not closed, from a
  // look that costs no system call (shm: two loads); false when unsure (tcp).
  // Lets progress() return at once on the polls of a wait.
  virtual bool inbound_idle() const { return false; }
  // Highest sequence number of our frames that the peer has applied, and the
  // receiving side's report of the same (direct-put ordering).
  virtual uint64_t peer_applied() const { return 0; }
  virtual void note_applied(uint64_t seq) {}
};

class StreamConnection : public Connection {
 public:
  StreamConnection(const char* transport_name, int peer_rank, std::unique_ptr<ByteStream> stream,
                   RegionTable* regions, std::function<void()> on_inbound);
  ~StreamConnection() override;

  const char* transport_name() const override { return transport_name_; }
  void post_put(const LocalSlice& src, const RemoteSlice& dst, const RemoteWord* signal, const OpRef& done,
                Deadline deadline) override;
  // One write (one sendmsg on tcp) for each run of up to 32 puts that would
  // each be one frame; the others as post_put.
  void post_puts(const PutOp* ops, size_t n, const OpRef& done, Deadline deadline) override;
  bool try_post_small_put(const void* src, uint64_t len, const RemoteSlice& dst) override;
  bool try_post_small_put_signal(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
                                 const RemoteWord& signal) override;
  void post_atomic_add(const RemoteWord& word, const OpRef& done, Deadline deadline) override;
  void post_send(const void* data, uint64_t len, const OpRef& done, Deadline deadline) override;
  void post_recv(void* buffer, uint64_t capacity, const OpRef& done) override;
  bool cancel_recv(const OpRef& op) override;
  void post_flush(const OpRef& done, Deadline deadline) override;
  bool progress() override;
  uint64_t spin_ns() const { return spin_ns_; }  // how long its own waits spin before they sleep
  bool needs_source_region(uint64_t, bool) const override { return false; }
  void stop_driving() override;
  void wait_inbound(int timeout_ms) override;
  void wait_inbound_until(int timeout_ms, const std::function<bool()>& ready) override;
  bool writes_directly() const override { return stream_->writes_directly(); }
  void close() override;
  bool failed(std::string* why) const override;

  // Starts the progress thread; called by the transport once connected.
  void start();

 private:
  enum class Pending { kAck, kAtomic };
  struct PendingOp {
    Pending kind;
    OpRef op;
  };
  struct PostedRecv {
    void* buffer;
    uint64_t capacity;
    OpRef op;
  };

  // tx
  // A put that post_put writes straight into the peer's memory (shm).
  bool goes_direct(const LocalSlice& src, const RemoteSlice& dst) const;
  // A put that post_put sends as one frame carrying its payload.
  bool framed_inline(const LocalSlice& src, const RemoteSlice& dst) const;
  // Frames for n <= kBatchFrames such puts, written with one writev.
  void write_put_frames(const PutOp* ops, size_t n, const OpRef& done, Deadline deadline);
  bool try_direct_put(const LocalSlice& src, const RemoteSlice& dst, const RemoteWord* signal, const OpRef& done,
                      Deadline deadline);
  // The inline direct put (no lock, no waiting, no frame): true when written
  // (data, then signal), false with nothing written.
  bool try_direct_inline(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
                         const RemoteWord* signal);
  // A direct write from a path that may wait: retries while another thread
  // writes directly, within the deadline (then kRefused: frames instead).
  template <typename Write>
  DirectResult direct_retrying(Write write, const Deadline& deadline);
  // Waits (briefly) until the peer applied every frame sent so far; false if
  // it lags, then the caller uses frames (which keep issue order by themselves).
  bool peer_caught_up_locked(Deadline deadline);
  std::string peer_label() const { return "rank " + std::to_string(peer_rank_); }
  uint64_t next_seq_locked() {
    const uint64_t seq = last_seq_.load(std::memory_order_relaxed) + 1;
    last_seq_.store(seq, std::memory_order_release);
    return seq;
  }
  void write_frame_locked(const FrameHeader& header, const void* payload, uint64_t len, Deadline deadline);
  void write_all_locked(struct iovec* iov, int iovcnt, Deadline deadline);
  void queue_control(const FrameHeader& header);
  void flush_control_locked();
  bool try_flush_control();
  void throw_if_failed() const;
  // Tells the peer, in a close frame, which of its operations was refused.
  void send_refusal(const std::string& reason);

  // rx
  bool drain_locked();  // returns true if anything was processed
  std::shared_ptr<Region> pin_inbound(std::shared_ptr<Region>& cache, uint64_t id, uint64_t offset, uint64_t len,
                                      uint32_t need, std::string* why);
  bool parse_header_locked();
  void finish_frame_locked();
  void release_pins_locked();  // the regions an unfinished frame pinned
  bool fill_staging_locked(bool* eof);
  void apply_signal(uint64_t region_id, uint64_t offset, uint64_t add, uint64_t* old_value);
  void on_ack(uint64_t seq);
  void on_atomic_result(uint64_t seq, uint64_t old_value);
  void deliver_message_locked(std::vector<char>&& message);

  void fail(const std::string& why);
  // progress(); `external`: called by a thread other than our progress
  // thread (a driver, which the progress thread then stays out of the way of).
  bool progress_step(bool external);
  void progress_thread_main();

  const char* transport_name_;
  std::unique_ptr<ByteStream> stream_;
  RegionTable* regions_;
  std::function<void()> on_inbound_;

  // tx state
  uint64_t direct_min_;  // stream_->direct_put_threshold(), fixed at construction
  std::mutex tx_mutex_;
  // Written under tx_mutex_; read without it by the inline direct path (a
  // thread's own frames are always seen: it wrote them).
  std::atomic<uint64_t> last_seq_{0};
  std::mutex control_mutex_;
  std::vector<FrameHeader> control_queue_;
  std::atomic<bool> control_pending_{false};

  // ops waiting for the peer (acks, atomic results), by seq
  std::mutex pending_mutex_;
  std::map<uint64_t, PendingOp> pending_;

  // rx state (guarded by rx_mutex_)
  std::mutex rx_mutex_;
  std::vector<char> staging_;
  size_t staging_begin_ = 0, staging_end_ = 0;
  bool in_payload_ = false;
  FrameHeader current_{};
  char* payload_dst_ = nullptr;     // null: discard
  uint64_t payload_left_ = 0;
  std::shared_ptr<Region> payload_region_;  // pinned while writing into it
  // The regions the last frames targeted (data, signal): most frames hit them.
  std::shared_ptr<Region> cached_data_region_, cached_signal_region_;
  std::shared_ptr<Region> signal_region_;   // pinned until the signal is applied
  std::vector<char> payload_message_;       // unexpected message being received
  std::vector<char> device_staging_;        // host copy of a payload bound for GPU memory
  bool payload_to_message_ = false;
  OpRef payload_recv_op_;
  uint64_t payload_recv_len_ = 0;
  std::atomic<bool> peer_said_close_{false};  // set by the receiver, read by fail() on any thread
  std::vector<char> close_reason_;  // the peer's close frame payload ("refused a PUT: ...")
  static constexpr uint64_t kMaxCloseReason = 1024;
  std::atomic<bool> rx_stalled_{false};  // unexpected-bytes budget exhausted
  // Bytes read from the stream but not yet applied (staged, or a frame cut
  // short): progress() must drain even when the stream itself is idle.
  std::atomic<bool> rx_buffered_{false};

  // two-sided messages
  std::mutex msg_mutex_;
  std::deque<PostedRecv> posted_recvs_;
  std::deque<std::vector<char>> unexpected_;
  uint64_t unexpected_bytes_ = 0;
  uint64_t max_unexpected_bytes_;
  uint64_t spin_ns_;

  // failure / lifetime
  mutable std::mutex fail_mutex_;
  std::string fail_reason_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> closing_{false};
  // A thread waiting on this connection drives it (progress() in a loop);
  // the progress thread then stays idle. external_ticks_ moves while that
  // happens; driver_stopped_ says the driver went to sleep.
  std::atomic<uint64_t> external_ticks_{0};
  std::atomic<bool> driver_stopped_{false};
  std::atomic<uint32_t> idle_wake_{0};  // wakes the progress thread when a driver stops
  // Threads asleep in wait_inbound*: whoever drains inbound work wakes them,
  // or one that checked before another thread drained and applied it would
  // sleep its whole slice with the data already delivered.
  std::atomic<int> inbound_sleepers_{0};
  std::thread progress_thread_;
};

}  // namespace lamina
