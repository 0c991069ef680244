// lamina-net: the posting side of StreamConnection (tx): frames, direct
// writes into a same-host peer's memory, and batched puts. The receiving side
// and the connection's lifetime are in stream_connection.cpp.
#include "transports/stream_connection.hpp"

#include <climits>
#include <cstring>

#include "common/error.hpp"
#include "common/settings.hpp"
#include "memory/cuda_memory.hpp"

namespace lamina {
namespace {

constexpr size_t kHeaderSize = sizeof(FrameHeader);
// Frames per write of a batch of puts: two iovecs each, far inside IOV_MAX,
// and their headers fit on the stack.
constexpr size_t kBatchFrames = 32;
static_assert(2 * kBatchFrames <= IOV_MAX, "a batch's iovecs fit one writev");

// The frame of a put of `len` bytes to `dst` (seq, ack and pull set by the caller).
FrameHeader put_header(const RemoteSlice& dst, uint64_t len, const RemoteWord* signal) {
  FrameHeader h;
  h.type = static_cast<uint8_t>(FrameType::kPut);
  h.region_id = dst.target.region_id;
  h.offset = dst.offset;
  h.length = len;
  if (signal) {
    h.flags |= kFlagSignal;
    h.sig_region = signal->target.region_id;
    h.sig_offset = signal->offset;
    h.sig_add = signal->add;
  }
  return h;
}

}  // namespace

// ---------------------------------------------------------------- waiting

namespace {

// Waits inside the transport (local completion of a pull-put), driving progress.
void wait_local(StreamConnection& conn, const OpRef& op, Deadline deadline, const std::string& what) {
  Backoff backoff(conn.spin_ns());
  while (!op->done()) {
    if (!conn.progress()) {
      if (deadline.expired()) throw_timeout(what);
      backoff.pause();
    }
  }
  if (op->failed()) throw_system(op->error());
}

}  // namespace

// ---------------------------------------------------------------- tx

void StreamConnection::write_all_locked(struct iovec* iov, int iovcnt, Deadline deadline) {
  int first = 0;
  while (first < iovcnt) {
    size_t n = stream_->write_some(iov + first, iovcnt - first);
    if (n == 0) {
      if (failed_.load(std::memory_order_acquire)) throw_if_failed();
      if (deadline.expired()) {
        // A partial frame is on the wire: the stream cannot be resynchronized.
        fail("timed out writing to the peer (it stopped reading)");
        throw_timeout(std::string(transport_name_) + " write to " + peer_label() +
                      " timed out: the peer did not drain the connection");
      }
      stream_->wait_writable(deadline.remaining_ms(20));
      continue;
    }
    while (first < iovcnt && n >= iov[first].iov_len) {
      n -= iov[first].iov_len;
      ++first;
    }
    if (first < iovcnt) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + n;
      iov[first].iov_len -= n;
    }
  }
}

void StreamConnection::write_frame_locked(const FrameHeader& header, const void* payload, uint64_t len,
                                          Deadline deadline) {
  flush_control_locked();
  struct iovec iov[2];
  iov[0].iov_base = const_cast<FrameHeader*>(&header);
  iov[0].iov_len = kHeaderSize;
  iov[1].iov_base = const_cast<void*>(payload);
  iov[1].iov_len = len;
  write_all_locked(iov, len ? 2 : 1, deadline);
}

void StreamConnection::queue_control(const FrameHeader& header) {
  std::lock_guard<std::mutex> lock(control_mutex_);
  control_queue_.push_back(header);
  control_pending_.store(true, std::memory_order_release);
}

void StreamConnection::flush_control_locked() {
  if (!control_pending_.load(std::memory_order_acquire)) return;
  std::vector<FrameHeader> frames;
  {
    std::lock_guard<std::mutex> lock(control_mutex_);
    frames.swap(control_queue_);
    control_pending_.store(false, std::memory_order_release);
  }
  if (frames.empty()) return;
  struct iovec iov;
  iov.iov_base = frames.data();
  iov.iov_len = frames.size() * kHeaderSize;
  // Control frames are tiny; the peer's rx never blocks, so this wait is short.
  write_all_locked(&iov, 1, Deadline::after_seconds(setting_double("TIMEOUT")));
}

bool StreamConnection::try_flush_control() {
  if (!control_pending_.load(std::memory_order_acquire)) return false;
  std::unique_lock<std::mutex> lock(tx_mutex_, std::try_to_lock);
  if (!lock.owns_lock()) return false;  // the holder flushes them before its next frame
  try {
    flush_control_locked();
  } catch (const Error& e) {
    fail(e.what());
  }
  return true;
}

void StreamConnection::post_put(const LocalSlice& src_in, const RemoteSlice& dst, const RemoteWord* signal,
                                const OpRef& done, Deadline deadline) {
  throw_if_failed();
  // GPU sources go through host memory: bytes on a socket or a ring are host bytes.
  std::vector<char> staged;
  LocalSlice src = src_in;
  if (src.device) {
    staged.resize(src.len);
    cuda_copy(staged.data(), src.ptr, src.len);
    src.ptr = staged.data();
    src.device = false;
    src.region = nullptr;
  }
  FrameHeader h = put_header(dst, src.len, signal);
  if (goes_direct(src, dst) && try_direct_put(src, dst, signal, done, deadline)) return;
  // Large same-host puts: the target copies straight from our memory (one
  // copy), so we must wait for its ack before the source may be reused.
  const bool pull = src.len >= stream_->pull_threshold();
  OpRef completion = done;
  if (pull) {
    h.type = static_cast<uint8_t>(FrameType::kPutPull);
    h.value = reinterpret_cast<uint64_t>(src.ptr);
    if (!completion) completion = std::make_shared<OpState>();
  }
  if (completion) h.flags |= kFlagAckRequest;
  {
    std::lock_guard<std::mutex> lock(tx_mutex_);
    throw_if_failed();
    h.seq = next_seq_locked();
    if (completion) {
      std::lock_guard<std::mutex> plock(pending_mutex_);
      pending_[h.seq] = PendingOp{Pending::kAck, completion};
    }
    write_frame_locked(h, pull ? nullptr : src.ptr, pull ? 0 : src.len, deadline);
  }
  if (pull) {
    wait_local(*this, completion, deadline,
               "put of " + std::to_string(src.len) + " bytes to " + peer_label() +
                   ": the target did not copy it in time");
  }
}

bool StreamConnection::goes_direct(const LocalSlice& src, const RemoteSlice& dst) const {
  return src.len >= direct_min_ && dst.target.shared_fd >= 0 && dst.target.kind == MemoryKind::kHost;
}

bool StreamConnection::framed_inline(const LocalSlice& src, const RemoteSlice& dst) const {
  return !src.device && src.len < stream_->pull_threshold() && !goes_direct(src, dst);
}

void StreamConnection::post_puts(const PutOp* ops, size_t n, const OpRef& done, Deadline deadline) {
  throw_if_failed();
  if (n == 0 && done) done->complete();
  size_t i = 0;
  while (i < n) {
    const PutOp& op = ops[i];
    if (!framed_inline(op.src, op.dst)) {
      const RemoteWord* signal = op.has_signal ? &op.signal : nullptr;
      const bool last = i + 1 == n;
      // A direct write needs no lock when nothing waits on it (as
      // try_post_small_put); otherwise, and for pulls and GPU sources,
      // post_put's path, where ordering with the frames written before
      // holds too (peer_caught_up_locked).
      const bool written = !op.src.device && !(last && done) &&
                           try_direct_inline(op.src.ptr, op.src.len, op.dst.target, op.dst.offset, signal);
      if (!written) post_put(op.src, op.dst, signal, last ? done : OpRef(), deadline);
      ++i;
      continue;
    }
    size_t end = i + 1;
    while (end < n && end - i < kBatchFrames && framed_inline(ops[end].src, ops[end].dst)) ++end;
    write_put_frames(ops + i, end - i, end == n ? done : OpRef(), deadline);
    i = end;
  }
}

void StreamConnection::write_put_frames(const PutOp* ops, size_t n, const OpRef& done, Deadline deadline) {
  FrameHeader headers[kBatchFrames];
  struct iovec iov[2 * kBatchFrames];
  int iovcnt = 0;
  for (size_t k = 0; k < n; ++k) {
    headers[k] = put_header(ops[k].dst, ops[k].src.len, ops[k].has_signal ? &ops[k].signal : nullptr);
    iov[iovcnt++] = {&headers[k], kHeaderSize};
    if (ops[k].src.len > 0) iov[iovcnt++] = {const_cast<void*>(ops[k].src.ptr), ops[k].src.len};
  }
  // Applied in order at the target: the last frame's ack covers the batch.
  if (done) headers[n - 1].flags |= kFlagAckRequest;
  std::lock_guard<std::mutex> lock(tx_mutex_);
  throw_if_failed();
  for (size_t k = 0; k < n; ++k) headers[k].seq = next_seq_locked();
  if (done) {
    std::lock_guard<std::mutex> plock(pending_mutex_);
    pending_[headers[n - 1].seq] = PendingOp{Pending::kAck, done};
  }
  flush_control_locked();
  write_all_locked(iov, iovcnt, deadline);
}

bool StreamConnection::peer_caught_up_locked(Deadline deadline) {
  // Ordering: every frame sent before must be applied at the target, or a
  // direct write could overtake a queued put to the same bytes. A target that
  // lags behind more than briefly gets frames instead.
  // The common case first: no clock read (a vDSO call) on the latency path.
  if (stream_->peer_applied() >= last_seq_.load(std::memory_order_relaxed)) return true;
  Deadline catch_up = Deadline::after_seconds(0.002);
  Backoff backoff(200000);
  while (stream_->peer_applied() < last_seq_.load(std::memory_order_relaxed)) {
    if (catch_up.expired() || deadline.expired() || failed_.load()) return false;
    backoff.pause();
  }
  return true;
}

template <typename Write>
DirectResult StreamConnection::direct_retrying(Write write, const Deadline& deadline) {
  DirectResult result = write();
  if (result != DirectResult::kBusy) return result;
  // Another thread's direct write: a check and a copy, so this is short. A
  // longer wait (the count is in memory the peer can write too) gives up
  // and sends frames, as a lagging peer does.
  Deadline give_up = Deadline::after_seconds(0.002);
  Backoff backoff(20000);
  while ((result = write()) == DirectResult::kBusy) {
    if (give_up.expired() || deadline.expired() || failed_.load(std::memory_order_acquire)) {
      return DirectResult::kRefused;
    }
    backoff.pause();
  }
  return result;
}

bool StreamConnection::try_direct_put(const LocalSlice& src, const RemoteSlice& dst, const RemoteWord* signal,
                                      const OpRef& done, Deadline deadline) {
  std::lock_guard<std::mutex> lock(tx_mutex_);
  throw_if_failed();
  if (!peer_caught_up_locked(deadline)) return false;
  auto put = [&](const RemoteWord* with_signal) {
    return direct_retrying(
        [&] { return stream_->direct_put_signal(dst.target, dst.offset, src.ptr, src.len, with_signal); }, deadline);
  };
  // The data is at the target and, when the signal's word is in shared
  // memory too, the signal (one atomic add there, after the data): the put
  // needs no frame at all.
  const bool direct_signal = signal && signal->target.shared_fd >= 0 && signal->target.kind == MemoryKind::kHost;
  if (direct_signal && put(signal) == DirectResult::kDone) {
    if (done) done->complete();
    return true;
  }
  if (put(nullptr) != DirectResult::kDone) return false;
  if (!signal) {
    if (done) done->complete();
    return true;
  }
  // The signal word cannot be written directly: a frame carries it (and the
  // ack), ordered after the data already there.
  std::atomic_thread_fence(std::memory_order_release);
  FrameHeader h;
  h.type = static_cast<uint8_t>(FrameType::kPut);
  h.region_id = dst.target.region_id;
  h.offset = dst.offset;
  h.length = 0;  // the data is already there; the frame carries signal/ack
  h.flags |= kFlagSignal;
  h.sig_region = signal->target.region_id;
  h.sig_offset = signal->offset;
  h.sig_add = signal->add;
  if (done) h.flags |= kFlagAckRequest;
  h.seq = next_seq_locked();
  if (done) {
    std::lock_guard<std::mutex> plock(pending_mutex_);
    pending_[h.seq] = PendingOp{Pending::kAck, done};
  }
  write_frame_locked(h, nullptr, 0, deadline);
  return true;
}

bool StreamConnection::try_direct_inline(const void* src, uint64_t len, const RegionDescriptor& dst,
                                         uint64_t dst_offset, const RemoteWord* signal) {
  if (len < direct_min_ || dst.shared_fd < 0 || dst.kind != MemoryKind::kHost) return false;
  if (signal && signal->target.shared_fd < 0) return false;
  // No tx lock: the stream keeps direct writes apart (kBusy), and frames of
  // other threads are not ordered with this put anyway. This thread's own
  // frames are (it wrote last_seq_): a peer still applying them, or any
  // kBusy, sends the caller to post_put, which waits within its bound.
  if (failed_.load(std::memory_order_acquire)) return false;
  if (stream_->peer_applied() < last_seq_.load(std::memory_order_acquire)) return false;
  return stream_->direct_put_signal(dst, dst_offset, src, len, signal) == DirectResult::kDone;
}

bool StreamConnection::try_post_small_put(const void* src, uint64_t len, const RemoteSlice& dst) {
  return try_direct_inline(src, len, dst.target, dst.offset, nullptr);
}

bool StreamConnection::try_post_small_put_signal(const void* src, uint64_t len, const RegionDescriptor& dst,
                                                 uint64_t dst_offset, const RemoteWord& signal) {
  return try_direct_inline(src, len, dst, dst_offset, &signal);
}

void StreamConnection::post_atomic_add(const RemoteWord& word, const OpRef& done, Deadline deadline) {
  throw_if_failed();
  // Only a stream that maps the peer's memory (shm) writes directly; asking
  // any other one whether the peer caught up would wait out its catch-up bound.
  if (stream_->writes_directly() && word.target.shared_fd >= 0 && word.target.kind == MemoryKind::kHost) {
    std::lock_guard<std::mutex> lock(tx_mutex_);
    throw_if_failed();
    uint64_t old = 0;
    if (peer_caught_up_locked(deadline) &&
        direct_retrying([&] { return stream_->direct_atomic_add(word.target, word.offset, word.add, &old); },
                        deadline) == DirectResult::kDone) {
      if (done) done->complete(old);
      return;
    }
  }
  FrameHeader h;
  h.type = static_cast<uint8_t>(FrameType::kAtomicAdd);
  h.region_id = word.target.region_id;
  h.offset = word.offset;
  h.value = word.add;
  std::lock_guard<std::mutex> lock(tx_mutex_);
  throw_if_failed();
  h.seq = next_seq_locked();
  if (done) {
    std::lock_guard<std::mutex> plock(pending_mutex_);
    pending_[h.seq] = PendingOp{Pending::kAtomic, done};
  }
  write_frame_locked(h, nullptr, 0, deadline);
}

void StreamConnection::post_send(const void* data, uint64_t len, const OpRef& done, Deadline deadline) {
  throw_if_failed();
  FrameHeader h;
  h.type = static_cast<uint8_t>(FrameType::kSend);
  h.length = len;
  {
    std::lock_guard<std::mutex> lock(tx_mutex_);
    throw_if_failed();
    h.seq = next_seq_locked();
    write_frame_locked(h, data, len, deadline);
  }
  if (done) done->complete(len);
}

void StreamConnection::post_recv(void* buffer, uint64_t capacity, const OpRef& done) {
  std::vector<char> message;
  {
    std::lock_guard<std::mutex> lock(msg_mutex_);
    if (unexpected_.empty()) {
      std::string why;
      if (failed(&why)) {
        done->fail(why);
        return;
      }
      posted_recvs_.push_back(PostedRecv{buffer, capacity, done});
      return;
    }
    message = std::move(unexpected_.front());
    unexpected_.pop_front();
    unexpected_bytes_ -= message.size();
  }
  stream_->wake();  // rx may have been stalled on the unexpected-bytes limit
  if (message.size() > capacity) {
    done->fail("message of " + std::to_string(message.size()) + " bytes does not fit the receive buffer of " +
               std::to_string(capacity) + " bytes (message dropped)",
               ErrorKind::kUsage);
    return;
  }
  if (!message.empty()) std::memcpy(buffer, message.data(), message.size());
  done->complete(message.size());
}

bool StreamConnection::cancel_recv(const OpRef& op) {
  std::lock_guard<std::mutex> lock(msg_mutex_);
  // Receives still queued here have not been touched; the one being filled
  // was already taken off the queue by the rx path.
  for (auto it = posted_recvs_.begin(); it != posted_recvs_.end(); ++it) {
    if (it->op == op) {
      posted_recvs_.erase(it);
      return true;
    }
  }
  return false;
}

void StreamConnection::post_flush(const OpRef& done, Deadline deadline) {
  throw_if_failed();
  FrameHeader h;
  h.type = static_cast<uint8_t>(FrameType::kFlush);
  std::lock_guard<std::mutex> lock(tx_mutex_);
  throw_if_failed();
  h.seq = next_seq_locked();
  {
    std::lock_guard<std::mutex> plock(pending_mutex_);
    pending_[h.seq] = PendingOp{Pending::kAck, done};
  }
  write_frame_locked(h, nullptr, 0, deadline);
}

}  // namespace lamina
