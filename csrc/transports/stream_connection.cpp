#include "transports/stream_connection.hpp"

#include <algorithm>
#include <cstring>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/settings.hpp"
#include "common/threads.hpp"
#include "memory/cuda_memory.hpp"

namespace lamina {
namespace {

constexpr size_t kHeaderSize = sizeof(FrameHeader);
constexpr size_t kStagingBytes = 256 * 1024;
// Payloads at least this large are read straight into their destination.
constexpr uint64_t kDirectReadMin = 16 * 1024;
// How long the progress thread stays idle after it saw a waiting thread
// drive: kDriverIdleUs, doubled each time it finds the thread still driving,
// up to kDriverIdleMaxUs. Each look is a wake-up that takes a core from
// spinning threads (on a 2-core machine, from the ping-pong itself), and a
// thread that drives for a while most often goes on driving; one that stops
// waiting says so (stop_driving) and ends the sleep at once.
constexpr int kDriverIdleUs = 200;
constexpr int kDriverIdleMaxUs = 6400;


}  // namespace

StreamConnection::StreamConnection(const char* transport_name, int peer_rank, std::unique_ptr<ByteStream> stream,
                                   RegionTable* regions, std::function<void()> on_inbound)
    : transport_name_(transport_name),
      stream_(std::move(stream)),
      regions_(regions),
      on_inbound_(std::move(on_inbound)),
      staging_(kStagingBytes),
      max_unexpected_bytes_(static_cast<uint64_t>(setting_int("MAX_UNEXPECTED_BYTES"))),
      spin_ns_(spin_window_us() * 1000) {
  peer_rank_ = peer_rank;
  direct_min_ = stream_->direct_put_threshold();
}

StreamConnection::~StreamConnection() { close(); }

void StreamConnection::start() {
  progress_thread_ = std::thread([this] {
    name_this_thread("lamina-stream");
    progress_thread_main();
  });
}

bool StreamConnection::failed(std::string* why) const {
  if (!failed_.load(std::memory_order_acquire)) return false;
  if (why) {
    std::lock_guard<std::mutex> lock(fail_mutex_);
    *why = fail_reason_;
  }
  return true;
}

void StreamConnection::throw_if_failed() const {
  std::string why;
  if (failed(&why)) throw_system(why);
}

void StreamConnection::fail(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(fail_mutex_);
    if (failed_.load(std::memory_order_relaxed)) return;
    fail_reason_ = std::string(transport_name_) + " channel to " + peer_label() + " failed: " + why;
    failed_.store(true, std::memory_order_release);
  }
  // An orderly close by the peer is normal operation, not a warning.
  if (peer_said_close_) {
    LAMINA_INFO(fail_reason_);
  } else if (!closing_.load()) {
    LAMINA_WARN(fail_reason_);
  }
  std::string reason;
  failed(&reason);
  std::map<uint64_t, PendingOp> pending;
  {
    std::lock_guard<std::mutex> lock(pending_mutex_);
    pending.swap(pending_);
  }
  for (auto& [seq, p] : pending) p.op->fail(reason);
  std::deque<PostedRecv> recvs;
  {
    std::lock_guard<std::mutex> lock(msg_mutex_);
    recvs.swap(posted_recvs_);
  }
  for (auto& r : recvs) r.op->fail(reason);
  stream_->shutdown();
  stream_->wake();
  if (on_inbound_) on_inbound_();
}

// ---------------------------------------------------------------- rx

bool StreamConnection::fill_staging_locked(bool* eof) {
  if (staging_begin_ == staging_end_) {
    staging_begin_ = staging_end_ = 0;
  } else if (staging_begin_ > 0 && staging_.size() - staging_end_ < kHeaderSize) {
    std::memmove(staging_.data(), staging_.data() + staging_begin_, staging_end_ - staging_begin_);
    staging_end_ -= staging_begin_;
    staging_begin_ = 0;
  }
  size_t n = stream_->read_some(staging_.data() + staging_end_, staging_.size() - staging_end_, eof);
  staging_end_ += n;
  return n > 0;
}

std::shared_ptr<Region> StreamConnection::pin_inbound(std::shared_ptr<Region>& cache, uint64_t id, uint64_t offset,
                                                      uint64_t len, uint32_t need, std::string* why) {
  // Fast path: the region the previous frame targeted. Pin first, then check
  // `closed`: RegionTable::remove sets closed before it waits for pins to drain.
  Region* r = cache.get();
  if (r && r->id == id && r->contains(offset, len) && (r->access & need) == need) {
    r->pins.fetch_add(1, std::memory_order_seq_cst);
    if (!r->closed.load(std::memory_order_seq_cst)) return cache;
    RegionTable::unpin(*r);
    cache.reset();
  }
  auto region = regions_->pin_for_inbound(id, offset, len, need, why);
  if (region) cache = region;
  return region;
}

bool StreamConnection::parse_header_locked() {
  FrameHeader h;
  std::memcpy(&h, staging_.data() + staging_begin_, kHeaderSize);
  if (h.magic != FrameHeader::kMagic) {
    fail("received a malformed frame (bad magic 0x" + std::to_string(h.magic) + "); closing the connection");
    return false;
  }
  std::string why;
  auto reject = [&](const std::string& reason) {
    // The sender is alive and should learn why, not guess "process died?".
    send_refusal(std::string("refused a ") + frame_type_name(h.type) + ": " + reason);
    fail(std::string("rejected ") + frame_type_name(h.type) + " frame from the peer: " + reason);
    return false;
  };
  auto pin_signal = [&]() -> bool {
    if (!(h.flags & kFlagSignal)) return true;
    if (h.sig_offset % 8 != 0) return reject("signal offset " + std::to_string(h.sig_offset) + " is not 8-byte aligned");
    signal_region_ = pin_inbound(cached_signal_region_, h.sig_region, h.sig_offset, 8, kAccessRemoteAtomic, &why);
    if (!signal_region_) return reject("signal target: " + why);
    if (signal_region_->kind != MemoryKind::kHost) {
      RegionTable::unpin(*signal_region_);
      signal_region_.reset();
      return reject("signal target is not host memory");
    }
    return true;
  };
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kPut:
    case FrameType::kPutPull: {
      payload_region_ = pin_inbound(cached_data_region_, h.region_id, h.offset, h.length, kAccessRemoteWrite, &why);
      if (!payload_region_) return reject(why);
      if (!pin_signal()) {
        RegionTable::unpin(*payload_region_);
        payload_region_.reset();
        return false;
      }
      payload_dst_ = static_cast<char*>(payload_region_->base) + h.offset;
      if (payload_region_->kind == MemoryKind::kCuda) {
        // Receive into host memory; finish_frame copies it up before the signal.
        device_staging_.resize(h.length);
        payload_dst_ = device_staging_.data();
      }
      payload_left_ = h.type == static_cast<uint8_t>(FrameType::kPut) ? h.length : 0;
      break;
    }
    case FrameType::kAtomicAdd:
      if (h.offset % 8 != 0) return reject("atomic offset " + std::to_string(h.offset) + " is not 8-byte aligned");
      signal_region_ = pin_inbound(cached_signal_region_, h.region_id, h.offset, 8, kAccessRemoteAtomic, &why);
      if (!signal_region_) return reject(why);
      if (signal_region_->kind != MemoryKind::kHost) {
        RegionTable::unpin(*signal_region_);
        signal_region_.reset();
        return reject("atomic target is not host memory");
      }
      payload_left_ = 0;
      break;
    case FrameType::kSend: {
      std::lock_guard<std::mutex> lock(msg_mutex_);
      if (!posted_recvs_.empty()) {
        PostedRecv r = posted_recvs_.front();
        posted_recvs_.pop_front();
        if (h.length > r.capacity) {
          r.op->fail("message of " + std::to_string(h.length) + " bytes does not fit the receive buffer of " +
                     std::to_string(r.capacity) + " bytes (message dropped)",
               ErrorKind::kUsage);
          payload_dst_ = nullptr;  // discard the payload
          payload_recv_op_.reset();
        } else {
          payload_dst_ = static_cast<char*>(r.buffer);
          payload_recv_op_ = r.op;
        }
        payload_to_message_ = false;
      } else {
        // No receive posted: buffer it, within the unexpected-bytes budget;
        // otherwise leave the header unparsed (back-pressure on the sender).
        if (unexpected_bytes_ + h.length > max_unexpected_bytes_ && !(unexpected_.empty() && h.length == 0)) {
          rx_stalled_.store(true, std::memory_order_relaxed);
          return false;
        }
        payload_message_.assign(h.length, 0);
        payload_dst_ = payload_message_.data();
        payload_to_message_ = true;
      }
      payload_recv_len_ = h.length;
      payload_left_ = h.length;
      break;
    }
    case FrameType::kFlush:
      payload_left_ = 0;
      break;
    case FrameType::kClose:
      // Optional payload: why the peer closed (a refused operation).
      if (h.length > kMaxCloseReason) {
        fail("received a close frame with a " + std::to_string(h.length) + "-byte reason; closing the connection");
        return false;
      }
      close_reason_.assign(h.length, 0);
      payload_dst_ = close_reason_.data();
      payload_to_message_ = false;
      payload_left_ = h.length;
      break;
    case FrameType::kAck:
    case FrameType::kAtomicResult:
      payload_left_ = 0;
      break;
    default:
      fail("received a frame of unknown type " + std::to_string(h.type) + "; closing the connection");
      return false;
  }
  staging_begin_ += kHeaderSize;
  current_ = h;
  in_payload_ = payload_left_ > 0;
  return true;
}

void StreamConnection::apply_signal(uint64_t region_id, uint64_t offset, uint64_t add, uint64_t* old_value) {
  auto* word = reinterpret_cast<uint64_t*>(static_cast<char*>(signal_region_->base) + offset);
  // acq_rel: the data written before (memcpy) is visible to whoever acquires the word.
  uint64_t old = __atomic_fetch_add(word, add, __ATOMIC_ACQ_REL);
  if (old_value) *old_value = old;
  RegionTable::unpin(*signal_region_);
  signal_region_.reset();
}

void StreamConnection::release_pins_locked() {
  if (payload_region_) {
    RegionTable::unpin(*payload_region_);
    payload_region_.reset();
  }
  if (signal_region_) {
    RegionTable::unpin(*signal_region_);
    signal_region_.reset();
  }
}

void StreamConnection::finish_frame_locked() {
  const FrameHeader& h = current_;
  FrameHeader reply;
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kPutPull:
      if (h.length && !stream_->pull_from_peer(payload_dst_, h.value, h.length)) {
        release_pins_locked();
        fail("could not copy a put from the peer's memory (process_vm_readv failed)");
        return;
      }
      [[fallthrough]];
    case FrameType::kPut:
      if (payload_region_->kind == MemoryKind::kCuda && h.length) {
        try {
          cuda_copy(static_cast<char*>(payload_region_->base) + h.offset, device_staging_.data(), h.length);
        } catch (const Error& e) {
          release_pins_locked();
          fail(std::string("could not copy a put into GPU memory: ") + e.what());
          return;
        }
      }
      std::atomic_thread_fence(std::memory_order_release);
      RegionTable::unpin(*payload_region_);
      payload_region_.reset();
      if (h.flags & kFlagSignal) apply_signal(h.sig_region, h.sig_offset, h.sig_add, nullptr);
      if (h.flags & kFlagAckRequest) {
        reply.type = static_cast<uint8_t>(FrameType::kAck);
        reply.value = h.seq;
        queue_control(reply);
      }
      if (h.flags & kFlagSignal && on_inbound_) on_inbound_();
      break;
    case FrameType::kAtomicAdd: {
      uint64_t old = 0;
      apply_signal(h.region_id, h.offset, h.value, &old);
      reply.type = static_cast<uint8_t>(FrameType::kAtomicResult);
      reply.seq = h.seq;
      reply.value = old;
      queue_control(reply);
      if (on_inbound_) on_inbound_();
      break;
    }
    case FrameType::kSend:
      if (payload_to_message_) {
        deliver_message_locked(std::move(payload_message_));
        payload_message_ = {};
      } else if (payload_recv_op_) {
        payload_recv_op_->complete(payload_recv_len_);
        payload_recv_op_.reset();
      }
      if (on_inbound_) on_inbound_();
      break;
    case FrameType::kFlush:
      reply.type = static_cast<uint8_t>(FrameType::kAck);
      reply.value = h.seq;
      queue_control(reply);
      break;
    case FrameType::kAck:
      on_ack(h.value);
      break;
    case FrameType::kAtomicResult:
      on_atomic_result(h.seq, h.value);
      break;
    case FrameType::kClose:
      peer_said_close_ = true;
      break;
  }
  // Frames that carry the peer's own sequence numbers report progress back
  // (after they are fully applied: direct puts rely on it for ordering).
  if (h.type <= static_cast<uint8_t>(FrameType::kFlush)) stream_->note_applied(h.seq);
}

void StreamConnection::deliver_message_locked(std::vector<char>&& message) {
  OpRef op;
  void* buffer = nullptr;
  uint64_t capacity = 0;
  {
    std::lock_guard<std::mutex> lock(msg_mutex_);
    if (posted_recvs_.empty()) {
      unexpected_bytes_ += message.size();
      unexpected_.push_back(std::move(message));
      return;
    }
    PostedRecv r = posted_recvs_.front();
    posted_recvs_.pop_front();
    op = r.op;
    buffer = r.buffer;
    capacity = r.capacity;
  }
  if (message.size() > capacity) {
    op->fail("message of " + std::to_string(message.size()) + " bytes does not fit the receive buffer of " +
             std::to_string(capacity) + " bytes (message dropped)",
               ErrorKind::kUsage);
    return;
  }
  if (!message.empty()) std::memcpy(buffer, message.data(), message.size());
  op->complete(message.size());
}

void StreamConnection::on_ack(uint64_t seq) {
  std::vector<OpRef> completed;
  {
    std::lock_guard<std::mutex> lock(pending_mutex_);
    auto it = pending_.begin();
    while (it != pending_.end() && it->first <= seq) {
      if (it->second.kind == Pending::kAck) {
        completed.push_back(it->second.op);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& op : completed) op->complete();
  if (!completed.empty() && on_inbound_) on_inbound_();
}

void StreamConnection::on_atomic_result(uint64_t seq, uint64_t old_value) {
  OpRef op;
  {
    std::lock_guard<std::mutex> lock(pending_mutex_);
    auto it = pending_.find(seq);
    if (it == pending_.end() || it->second.kind != Pending::kAtomic) return;
    op = it->second.op;
    pending_.erase(it);
  }
  op->complete(old_value);
  if (on_inbound_) on_inbound_();
}

bool StreamConnection::drain_locked() {
  bool did = false;
  bool eof = false;
  rx_stalled_.store(false, std::memory_order_relaxed);
  try {
    while (!failed_.load(std::memory_order_acquire)) {
      if (!in_payload_) {
        if (staging_end_ - staging_begin_ < kHeaderSize) {
          if (!fill_staging_locked(&eof)) break;
          continue;
        }
        if (!parse_header_locked()) break;
        did = true;
        if (!in_payload_) {
          finish_frame_locked();
          // Nothing buffered: return to the caller rather than pay for a read
          // that most likely finds nothing (it calls again anyway).
          if (staging_begin_ == staging_end_) break;
          continue;
        }
      }
      size_t avail = staging_end_ - staging_begin_;
      size_t n = 0;
      if (avail > 0) {
        n = static_cast<size_t>(std::min<uint64_t>(avail, payload_left_));
        if (payload_dst_) std::memcpy(payload_dst_, staging_.data() + staging_begin_, n);
        staging_begin_ += n;
      } else if (payload_dst_ && payload_left_ >= kDirectReadMin) {
        n = stream_->read_some(payload_dst_, payload_left_, &eof);
        if (n == 0) break;
      } else {
        if (!fill_staging_locked(&eof)) break;
        continue;
      }
      did = true;
      if (payload_dst_) payload_dst_ += n;
      payload_left_ -= n;
      if (payload_left_ == 0) {
        in_payload_ = false;
        finish_frame_locked();
        if (staging_begin_ == staging_end_) break;
      }
    }
  } catch (const Error& e) {
    fail(e.what());
    return true;
  }
  rx_buffered_.store(in_payload_ || staging_begin_ != staging_end_, std::memory_order_relaxed);
  if (eof && !failed_.load()) {
    if (peer_said_close_ && !close_reason_.empty()) {
      fail("the peer " + std::string(close_reason_.begin(), close_reason_.end()) + ", and closed the channel");
    } else if (peer_said_close_) {
      fail("the peer closed the channel");
    } else if (in_payload_ || staging_end_ != staging_begin_) {
      fail("the peer disconnected in the middle of a frame (process died?)");
    } else {
      fail("the peer disconnected without closing the channel (process died?)");
    }
    did = true;
  }
  if (failed_.load() && payload_recv_op_) {
    payload_recv_op_->fail("connection failed while the message was arriving");
    payload_recv_op_.reset();
  }
  return did;
}

bool StreamConnection::progress() { return progress_step(true); }

bool StreamConnection::progress_step(bool external) {
  if (failed_.load(std::memory_order_acquire)) return false;
  if (external) {
    // Not an RMW: an approximate tick is enough and keeps the spin loop cheap.
    external_ticks_.store(external_ticks_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
  // The polls of a wait mostly find nothing: then no lock and no read (shm:
  // two flags here and three words of the ring are all this looks at).
  if (!rx_buffered_.load(std::memory_order_relaxed) && !control_pending_.load(std::memory_order_acquire) &&
      stream_->inbound_idle()) {
    return false;
  }
  bool did = false;
  if (rx_mutex_.try_lock()) {
    did = drain_locked();
    rx_mutex_.unlock();
  }
  if (did && inbound_sleepers_.load(std::memory_order_seq_cst) > 0) stream_->wake();
  if (control_pending_.load(std::memory_order_acquire)) did |= try_flush_control();
  return did;
}

void StreamConnection::wait_inbound(int timeout_ms) {
  if (failed_.load(std::memory_order_acquire)) return;
  inbound_sleepers_.fetch_add(1, std::memory_order_seq_cst);
  stream_->wait_readable(timeout_ms);
  inbound_sleepers_.fetch_sub(1, std::memory_order_relaxed);
}

void StreamConnection::wait_inbound_until(int timeout_ms, const std::function<bool()>& ready) {
  if (failed_.load(std::memory_order_acquire)) return;
  // Counted before ready() is checked: a drain that applies what ready()
  // waits for after that check sees the count and wakes the stream.
  inbound_sleepers_.fetch_add(1, std::memory_order_seq_cst);
  stream_->wait_readable(timeout_ms, &ready);
  inbound_sleepers_.fetch_sub(1, std::memory_order_relaxed);
}

void StreamConnection::stop_driving() {
  driver_stopped_.store(true, std::memory_order_release);
  idle_wake_.fetch_add(1, std::memory_order_release);
  futex_wake_all(reinterpret_cast<const uint32_t*>(&idle_wake_), false);
}

void StreamConnection::progress_thread_main() {
  uint64_t seen_ticks = external_ticks_.load(std::memory_order_relaxed);
  int idle_us = kDriverIdleUs;
  while (!closing_.load(std::memory_order_acquire) && !failed_.load(std::memory_order_acquire)) {
    // A thread that waits on this connection is driving it: stay out of its
    // way until it stops (it says so), has not driven for a look's sleep, or
    // the peer is gone.
    uint32_t seen = idle_wake_.load(std::memory_order_acquire);
    uint64_t ticks = external_ticks_.load(std::memory_order_relaxed);
    if (driver_stopped_.exchange(false, std::memory_order_acq_rel)) {
      seen_ticks = ticks;
      idle_us = kDriverIdleUs;
    } else if (ticks != seen_ticks) {
      seen_ticks = ticks;
      futex_wait_us(reinterpret_cast<const uint32_t*>(&idle_wake_), seen, idle_us, false);
      idle_us = std::min(2 * idle_us, kDriverIdleMaxUs);
      // A driving thread does not look for a dead peer; this look does (one
      // poll of the pidfd or socket), and takes over when it finds one.
      if (stream_->peer_gone_reason().empty()) continue;
    } else {
      idle_us = kDriverIdleUs;
    }
    if (progress_step(false)) continue;
    if (rx_stalled_.load(std::memory_order_relaxed)) {
      // Waiting for a recv to be posted; the stream stays readable meanwhile.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      continue;
    }
    std::string gone = stream_->peer_gone_reason();
    if (!gone.empty()) {
      // Apply whatever the peer managed to send before it went away.
      progress_step(false);
      fail(gone);
      break;
    }
    stream_->wait_readable(20);
  }
}

void StreamConnection::send_refusal(const std::string& reason) {
  // Best effort and brief: the rx path must not wait on tx for long.
  std::unique_lock<std::mutex> lock(tx_mutex_, std::try_to_lock);
  if (!lock.owns_lock() || failed_.load()) return;
  const std::string text = reason.substr(0, kMaxCloseReason);
  FrameHeader h;
  h.type = static_cast<uint8_t>(FrameType::kClose);
  h.length = text.size();
  try {
    write_frame_locked(h, text.data(), text.size(), Deadline::after_seconds(0.2));
  } catch (const Error&) {
  }
}

void StreamConnection::close() {
  if (closing_.exchange(true)) {
    if (progress_thread_.joinable() && progress_thread_.get_id() != std::this_thread::get_id()) progress_thread_.join();
    return;
  }
  if (!failed_.load()) {
    // Best-effort goodbye so the peer reports "closed" rather than "died".
    std::unique_lock<std::mutex> lock(tx_mutex_, std::try_to_lock);
    if (lock.owns_lock()) {
      FrameHeader h;
      h.type = static_cast<uint8_t>(FrameType::kClose);
      try {
        write_frame_locked(h, nullptr, 0, Deadline::after_seconds(0.5));
      } catch (const Error&) {
      }
    }
  }
  fail("the channel was closed locally");
  stream_->wake();
  if (progress_thread_.joinable() && progress_thread_.get_id() != std::this_thread::get_id()) progress_thread_.join();
  std::lock_guard<std::mutex> lock(rx_mutex_);
  cached_data_region_.reset();
  cached_signal_region_.reset();
  release_pins_locked();
}

}  // namespace lamina
