// lamina-net verbs: the posting side of RcConnection: puts (inline, staged
// or zero-copy), atomics, sends, receives and flushes, and the send-queue
// slots and credits they wait for. Connecting, progress, receiving and
// closing are in rc_connection.cpp.
#include "transports/verbs/rc_connection.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/error.hpp"
#include "common/log.hpp"
#include "transports/verbs/rc_message.hpp"
#include "transports/verbs/verbs_settings.hpp"

namespace lamina::verbs {

// ---------------------------------------------------------------- posting

uint8_t* RcConnection::take_staging_slot_locked(InFlight& entry) {
  entry.staging_slot = free_staging_.back();
  free_staging_.pop_back();
  return staging_slot(entry.staging_slot);
}

uint64_t RcConnection::post_wr_locked(ibv_send_wr& wr, InFlight entry, bool must_signal) {
  return post_wrs_locked(&wr, &entry, 1, must_signal);
}

uint64_t RcConnection::post_wrs_locked(ibv_send_wr* wrs, InFlight* entries, int count, bool must_signal_last) {
  for (int i = 0; i < count; ++i) {
    InFlight& entry = entries[i];
    entry.seq = next_seq_++;
    // Signal WRs that carry a completion or a scratch word, every quarter
    // queue (so unsignaled WRs are retired and their send-queue slots freed
    // in time), and staged WRs once half the staging slots are taken: a
    // completion retires every earlier WR too, so the slots come back in
    // batches without a completion per put, and the pool never runs dry with
    // no signaled WR on its way to free it.
    const bool staging_low = entry.staging_slot >= 0 && free_staging_.size() < staging_slots_ / 2;
    const bool signaled = (must_signal_last && i == count - 1) || entry.done || staging_low ||
                          entry.scratch_slot >= 0 || ++unsignaled_run_ >= std::max<uint32_t>(1, queue_depth_ / 4);
    if (signaled) unsignaled_run_ = 0;
    entry.signaled = signaled;
    wrs[i].wr_id = entry.seq;
    wrs[i].next = i + 1 < count ? &wrs[i + 1] : nullptr;
    if (signaled) wrs[i].send_flags |= IBV_SEND_SIGNALED;
  }
  // One call (one doorbell) for the whole chain.
  ibv_send_wr* bad = nullptr;
  const int rc = ibv_post_send(qp_.get(), wrs, &bad);
  if (rc != 0) {
    const std::string reason = errno_message("verbs connection to rank " + std::to_string(peer_rank_) +
                                                 " failed: ibv_post_send(" + kind_name(int(entries[0].kind)) + ")",
                                             rc);
    for (int i = 0; i < count; ++i) {
      if (entries[i].done) entries[i].done->fail(reason);
    }
    fail_locked(reason);  // the connection is unusable; its buffers go with it
    throw_system(reason);
  }
  for (int i = 0; i < count; ++i) in_flight_.push_back(std::move(entries[i]));
  return wrs[count - 1].wr_id;
}

template <typename Ready>
void RcConnection::wait_locked(std::unique_lock<std::mutex>& lock, Deadline deadline, const char* op, uint64_t bytes,
                               Ready ready) {
  Backoff backoff;
  for (;;) {
    check_usable_locked();
    if (ready()) return;
    if (progress_locked()) backoff.reset();
    check_usable_locked();
    if (ready()) return;
    if (deadline.expired()) {
      throw_timeout("verbs " + std::string(op) + (bytes > 0 ? " of " + std::to_string(bytes) + " bytes" : "") +
                    " to rank " + std::to_string(peer_rank_) + ": timed out (" +
                    std::to_string(in_flight_.size()) + " work requests in flight, " +
                    std::to_string(send_credits()) + " send credits)");
    }
    lock.unlock();
    backoff.pause();
    lock.lock();
  }
}

uint64_t RcConnection::send_credits() const {
  const uint64_t granted = __atomic_load_n(&inbox()->credits_granted, __ATOMIC_ACQUIRE);
  return peer_recv_depth_ + granted - fragments_sent_;
}

std::optional<uint32_t> RcConnection::registered_lkey(const LocalSlice& src) const {
  if (src.region == nullptr) return std::nullopt;
  const TransportRegistration* registration = src.region->registrations[kSlotVerbs].get();
  if (registration == nullptr) return std::nullopt;
  const uint64_t base = reinterpret_cast<uint64_t>(src.region->base);
  const uint64_t ptr = reinterpret_cast<uint64_t>(src.ptr);
  if (ptr < base || !src.region->contains(ptr - base, src.len)) return std::nullopt;
  return src.region->lkey;
}

void RcConnection::post_put(const LocalSlice& src, const RemoteSlice& dst, const RemoteWord* signal,
                            const OpRef& done, Deadline deadline) {
  std::lock_guard<std::mutex> post_lock(post_mutex_);
  std::unique_lock<std::mutex> lock(state_mutex_);
  check_usable_locked();
  if (signal != nullptr) {
    if ((signal->target.addr + signal->offset) % 8 != 0) throw_usage("verbs put: signal word is not 8-byte aligned");
    if (!device_->supports_atomics()) {
      throw_system("verbs put with signal: device " + device_->name() + " does not support atomics");
    }
  }
  const std::optional<uint32_t> lkey = registered_lkey(src);
  // The CPU cannot copy or inline GPU memory: it always goes zero-copy, so it
  // must lie inside a registered region. src.device is what the caller says
  // (the region may be null: unregistered GPU memory is still GPU memory).
  const bool device_memory = src.device || (src.region != nullptr && src.region->kind == MemoryKind::kCuda);
  if (device_memory && !lkey) {
    throw_usage("verbs put: the GPU source (" + std::to_string(src.len) +
                " bytes) is not inside a region registered with the verbs transport; register it (or a tensor "
                "holding it) with Endpoint.register first: the CPU cannot copy or inline GPU memory");
  }
  const auto* bytes = static_cast<const uint8_t*>(src.ptr);
  const uint64_t remote = dst.target.addr + dst.offset;
  const bool zero_copy = src.len > 0 && lkey.has_value() && (device_memory || src.len > stage_max_);
  const bool inline_source = src.len > 0 && !device_memory && src.len <= max_inline_;
  uint64_t last_seq = 0;

  // The signal goes in the same ibv_post_send call as the last data WR.
  ibv_sge signal_sge{reinterpret_cast<uint64_t>(scratch_word(2)), sizeof(uint64_t), scratch_->lkey()};
  auto make_signal = [&](ibv_send_wr& wr, InFlight& entry) {
    // Same QP, after the data: see the header for why this cannot overtake it.
    wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
    wr.sg_list = &signal_sge;
    wr.num_sge = 1;
    wr.wr.atomic.remote_addr = signal->target.addr + signal->offset;
    wr.wr.atomic.compare_add = signal->add;
    wr.wr.atomic.rkey = signal->target.rkey;
    entry.kind = WrKind::kSignal;
    entry.done = done;
  };
  if (src.len == 0 && signal != nullptr) {  // nothing to write: just the signal
    wait_locked(lock, deadline, "put", 0, [&] { return send_queue_free() >= 1; });
    ibv_send_wr wr{};
    InFlight entry;
    make_signal(wr, entry);
    post_wrs_locked(&wr, &entry, 1, false);
    return;
  }

  uint64_t offset = 0;
  do {
    const uint64_t piece_limit = zero_copy ? max_write_bytes_ : inline_source ? max_inline_ : chunk_size_;
    const uint64_t piece = std::min<uint64_t>(src.len - offset, piece_limit);
    const bool staged = piece > 0 && !zero_copy && !inline_source;
    const bool last_piece = offset + piece == src.len;
    const bool with_signal = last_piece && signal != nullptr;
    wait_locked(lock, deadline, "put", src.len, [&] {
      return send_queue_free() >= 1u + with_signal && (!staged || !free_staging_.empty());
    });
    ibv_send_wr wrs[2] = {};
    InFlight entries[2];
    ibv_send_wr& wr = wrs[0];
    InFlight& entry = entries[0];
    entry.kind = WrKind::kWrite;
    ibv_sge sge{};
    sge.length = static_cast<uint32_t>(piece);
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.sg_list = &sge;
    wr.num_sge = piece > 0 ? 1 : 0;
    wr.wr.rdma.remote_addr = remote + offset;
    wr.wr.rdma.rkey = dst.target.rkey;
    if (inline_source) {
      sge.addr = reinterpret_cast<uint64_t>(bytes + offset);
      wr.send_flags = IBV_SEND_INLINE;  // copied into the WQE: the source is free once posted
    } else if (zero_copy) {
      sge.addr = reinterpret_cast<uint64_t>(bytes + offset);
      sge.lkey = *lkey;
    } else if (staged) {
      uint8_t* staging = take_staging_slot_locked(entry);
      std::memcpy(staging, bytes + offset, piece);
      sge.addr = reinterpret_cast<uint64_t>(staging);
      sge.lkey = staging_buffers_->lkey();
    }
    if (last_piece && signal == nullptr) entry.done = done;
    if (with_signal) make_signal(wrs[1], entries[1]);
    last_seq = post_wrs_locked(wrs, entries, with_signal ? 2 : 1, last_piece && zero_copy);
    offset += piece;
  } while (offset < src.len);

  if (zero_copy && !done) {
    // The caller may reuse the source once we return: wait until the NIC is
    // done reading it. (With `done`, the caller keeps the source until it
    // completes, so large puts from registered memory overlap.)
    try {
      wait_locked(lock, deadline, "put", src.len, [&] { return in_flight_.empty() || in_flight_.front().seq > last_seq; });
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::kTimeout) {
        // Stop the NIC before handing the source back.
        fail_locked(std::string(e.what()) + "; connection failed so that the source buffer is no longer read");
      }
      throw;
    }
  }
}

bool RcConnection::try_post_small_put(const void* src, uint64_t len, const RemoteSlice& dst) {
  if (len == 0 || len > stage_max_) return false;
  // Only state_mutex_: one WR cannot interleave with a message's fragments
  // (SENDs; a WRITE consumes no receive), so post_mutex_ is not needed.
  std::unique_lock<std::mutex> lock(state_mutex_, std::try_to_lock);
  const bool inline_source = len <= max_inline_;
  if (!lock.owns_lock() || closed_ || peer_closed_ || failed_.load(std::memory_order_acquire) ||
      send_queue_free() < 1 || (!inline_source && free_staging_.empty())) {
    return false;  // post_put waits, or reports why
  }
  ibv_sge sge{reinterpret_cast<uint64_t>(src), static_cast<uint32_t>(len), 0};
  ibv_send_wr wr{};
  InFlight entry;
  entry.kind = WrKind::kWrite;
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.rdma.remote_addr = dst.target.addr + dst.offset;
  wr.wr.rdma.rkey = dst.target.rkey;
  if (inline_source) {
    wr.send_flags = IBV_SEND_INLINE;  // copied into the WQE: the source is free once posted
  } else {
    uint8_t* staging = take_staging_slot_locked(entry);
    std::memcpy(staging, src, len);
    sge.addr = reinterpret_cast<uint64_t>(staging);
    sge.lkey = staging_buffers_->lkey();
  }
  post_wrs_locked(&wr, &entry, 1, false);
  return true;
}

void RcConnection::post_atomic_add(const RemoteWord& word, const OpRef& done, Deadline deadline) {
  std::lock_guard<std::mutex> post_lock(post_mutex_);
  std::unique_lock<std::mutex> lock(state_mutex_);
  if ((word.target.addr + word.offset) % 8 != 0) throw_usage("verbs atomic add: target word is not 8-byte aligned");
  if (!device_->supports_atomics()) {
    throw_system("verbs atomic add: device " + device_->name() + " does not support atomics");
  }
  wait_locked(lock, deadline, "atomic add", 0, [&] { return send_queue_free() >= 1 && !free_scratch_.empty(); });
  InFlight entry;
  entry.kind = WrKind::kAtomic;
  entry.done = done;
  entry.scratch_slot = free_scratch_.back();
  free_scratch_.pop_back();
  ibv_sge sge{reinterpret_cast<uint64_t>(scratch_word(entry.scratch_slot)), sizeof(uint64_t), scratch_->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.atomic.remote_addr = word.target.addr + word.offset;
  wr.wr.atomic.compare_add = word.add;
  wr.wr.atomic.rkey = word.target.rkey;
  post_wr_locked(wr, std::move(entry), true);
}

void RcConnection::post_send(const void* data, uint64_t len, const OpRef& done, Deadline deadline) {
  std::lock_guard<std::mutex> post_lock(post_mutex_);
  std::unique_lock<std::mutex> lock(state_mutex_);
  const uint32_t fragment_limit = std::min(chunk_size_, peer_chunk_size_);
  const auto* bytes = static_cast<const uint8_t*>(data);
  uint64_t offset = 0;
  bool first = true;
  while (first || offset < len) {
    waiting_for_peer_ = true;
    try {
      wait_locked(lock, deadline, "send", len,
                  [&] { return send_queue_free() >= 1 && !free_staging_.empty() && send_credits() >= 1; });
    } catch (const Error& e) {
      waiting_for_peer_ = false;
      if (e.kind() == ErrorKind::kTimeout && !first) {
        // Part of the message is on the wire; the stream cannot be resynchronized.
        fail_locked(std::string(e.what()) + "; the message was partly sent, so the connection is failed");
      }
      throw;
    }
    waiting_for_peer_ = false;
    InFlight entry;
    entry.kind = WrKind::kSend;
    uint8_t* fragment = take_staging_slot_locked(entry);
    uint32_t header_bytes = 0;
    if (first) {
      const MessageHeader header{kMessageMagic, 0, len};
      std::memcpy(fragment, &header, sizeof(header));
      header_bytes = sizeof(header);
    }
    const uint64_t payload = std::min<uint64_t>(len - offset, fragment_limit - header_bytes);
    std::memcpy(fragment + header_bytes, bytes + offset, payload);
    ibv_sge sge{reinterpret_cast<uint64_t>(fragment), static_cast<uint32_t>(header_bytes + payload),
                staging_buffers_->lkey()};
    ibv_send_wr wr{};
    wr.opcode = IBV_WR_SEND;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    post_wr_locked(wr, std::move(entry), false);
    ++fragments_sent_;
    offset += payload;
    first = false;
  }
  if (done) done->complete();  // handed to the transport (copied into staging)
}

void RcConnection::post_recv(void* buffer, uint64_t capacity, const OpRef& done) {
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    if (closed_) throw_system("verbs connection to rank " + std::to_string(peer_rank_) + " is closed");
    throw_if_failed_locked();
    pending_recvs_.push_back({static_cast<uint8_t*>(buffer), capacity, done});
    deliver_locked();
    return_credits_locked();
  }
  notify_inbound();
}

bool RcConnection::cancel_recv(const OpRef& op) {
  std::lock_guard<std::mutex> lock(state_mutex_);
  for (auto it = pending_recvs_.begin(); it != pending_recvs_.end(); ++it) {
    if (it->done != op) continue;
    // The oldest receive is being filled while a message for it is inbound.
    const bool filling = it == pending_recvs_.begin() && inbound_ && inbound_->target == InboundMessage::kRecv;
    if (filling) return false;
    pending_recvs_.erase(it);
    return true;
  }
  return false;
}

void RcConnection::post_flush(const OpRef& done, Deadline deadline) {
  std::lock_guard<std::mutex> post_lock(post_mutex_);
  std::unique_lock<std::mutex> lock(state_mutex_);
  check_usable_locked();
  if (in_flight_.empty()) {
    if (done) done->complete();
    return;
  }
  wait_locked(lock, deadline, "flush", 0, [&] { return send_queue_free() >= 1; });
  post_empty_write_locked(WrKind::kFlush, done);
}

}  // namespace lamina::verbs
