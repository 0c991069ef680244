#include "transports/verbs/rc_connection.hpp"

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/threads.hpp"
#include "transports/rendezvous.hpp"
#include "transports/verbs/qp_state.hpp"
#include "transports/verbs/rc_message.hpp"
#include "transports/verbs/verbs_settings.hpp"

namespace lamina::verbs {
namespace {

constexpr uint64_t kRecvWrBit = 1ull << 63;  // wr_id of receives: bit | slot
constexpr uint32_t kInfoMagic = 0x4c4e5651;     // "LNVQ"
constexpr uint32_t kInfoVersion = 1;
constexpr uint64_t kCloseNoticeWaitNs = 100'000'000;  // 100 ms
constexpr int kPollBatch = 16;
constexpr uint64_t kExternalDriveGraceNs = 5'000'000;  // a user thread drove progress this recently
constexpr int kDrivenRecheckMaxMs = 40;  // longest look-again interval while a user thread keeps driving
constexpr int kThreadIdleWakeMs = 100;

// Little-endian field packing for the store blob.
class Writer {
 public:
  template <typename T>
  void put(T value) {
    for (size_t i = 0; i < sizeof(T); ++i) out_.push_back(static_cast<char>((uint64_t(value) >> (8 * i)) & 0xff));
  }
  void put_bytes(const void* data, size_t len) { out_.append(static_cast<const char*>(data), len); }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(const std::string& in) : in_(in) {}
  template <typename T>
  T get() {
    uint64_t value = 0;
    for (size_t i = 0; i < sizeof(T); ++i) value |= uint64_t(uint8_t(byte())) << (8 * i);
    return static_cast<T>(value);
  }
  void get_bytes(void* out, size_t len) {
    for (size_t i = 0; i < len; ++i) static_cast<char*>(out)[i] = byte();
  }
  bool ok() const { return ok_; }

 private:
  char byte() {
    if (pos_ >= in_.size()) {
      ok_ = false;
      return 0;
    }
    return in_[pos_++];
  }
  const std::string& in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace

// ---------------------------------------------------------------- config / info

RcConfig RcConfig::from_settings() {
  RcConfig config;
  config.queue_depth = static_cast<uint32_t>(ib_setting_int("IB_QUEUE_DEPTH", config.queue_depth, 16, 32768));
  config.recv_depth = static_cast<uint32_t>(ib_setting_int("IB_RECV_DEPTH", config.recv_depth, 2, 4096));
  config.chunk_size = static_cast<uint32_t>(ib_setting_int("IB_CHUNK_SIZE", config.chunk_size, 256, 1 << 24));
  config.stage_max = static_cast<uint32_t>(ib_setting_int("IB_STAGE_MAX", config.stage_max, 0, 1 << 24));
  config.max_inline = static_cast<uint32_t>(ib_setting_int("IB_MAX_INLINE", config.max_inline, 0, 4096));
  config.ack_timeout = static_cast<uint8_t>(ib_setting_int("IB_TIMEOUT", config.ack_timeout, 1, 31));
  config.retry_count = static_cast<uint8_t>(ib_setting_int("IB_RETRY_CNT", config.retry_count, 0, 7));
  config.keepalive_ms = static_cast<uint32_t>(ib_setting_int("IB_KEEPALIVE_MS", config.keepalive_ms, 0, 3600000));
  config.max_unexpected_bytes = static_cast<uint64_t>(
      ib_setting_int("MAX_UNEXPECTED_BYTES", int64_t(config.max_unexpected_bytes), 0, int64_t(1) << 40));
  return config;
}

std::string RcEndpointInfo::serialize() const {
  Writer w;
  w.put<uint32_t>(kInfoMagic);
  w.put<uint32_t>(kInfoVersion);
  w.put<uint32_t>(address.qpn);
  w.put<uint32_t>(address.psn);
  w.put<uint16_t>(address.lid);
  w.put<uint8_t>(address.mtu);
  w.put<uint8_t>(address.link_layer);
  w.put_bytes(address.gid.raw, sizeof(address.gid.raw));
  w.put<uint32_t>(recv_depth);
  w.put<uint32_t>(chunk_size);
  w.put<uint64_t>(inbox_addr);
  w.put<uint32_t>(inbox_rkey);
  w.put<uint64_t>(secret_hi);
  w.put<uint64_t>(secret_lo);
  return w.take();
}

RcEndpointInfo RcEndpointInfo::deserialize(const std::string& blob, int from_rank) {
  Reader r(blob);
  RcEndpointInfo info;
  const uint32_t magic = r.get<uint32_t>();
  const uint32_t version = r.get<uint32_t>();
  info.address.qpn = r.get<uint32_t>();
  info.address.psn = r.get<uint32_t>();
  info.address.lid = r.get<uint16_t>();
  info.address.mtu = r.get<uint8_t>();
  info.address.link_layer = r.get<uint8_t>();
  r.get_bytes(info.address.gid.raw, sizeof(info.address.gid.raw));
  info.recv_depth = r.get<uint32_t>();
  info.chunk_size = r.get<uint32_t>();
  info.inbox_addr = r.get<uint64_t>();
  info.inbox_rkey = r.get<uint32_t>();
  info.secret_hi = r.get<uint64_t>();
  info.secret_lo = r.get<uint64_t>();
  if (!r.ok() || magic != kInfoMagic || version != kInfoVersion || info.recv_depth == 0 ||
      info.chunk_size < sizeof(MessageHeader) + 1) {
    throw_system("verbs: malformed QP info from rank " + std::to_string(from_rank) + " (" +
                 std::to_string(blob.size()) + " bytes; a different lamina-net version?)");
  }
  return info;
}

// ---------------------------------------------------------------- buffers

void RegisteredBuffer::FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

RegisteredBuffer::RegisteredBuffer(const VerbsDevice& device, size_t size, bool remote_write) {
  constexpr size_t kPage = 4096;
  size_ = (std::max<size_t>(size, 1) + kPage - 1) / kPage * kPage;
  void* memory = nullptr;
  if (posix_memalign(&memory, kPage, size_) != 0) throw_system("verbs: out of memory for " + std::to_string(size_) + " bytes of buffers");
  std::memset(memory, 0, size_);
  memory_.reset(static_cast<uint8_t*>(memory));
  int access = IBV_ACCESS_LOCAL_WRITE | (remote_write ? IBV_ACCESS_REMOTE_WRITE : 0);
  mr_.reset(device.api().reg_mr(device.pd(), memory, size_, access));
  if (!mr_) {
    const int error = errno;
    throw_system(errno_message("verbs: registering " + std::to_string(size_) + " bytes of connection buffers on " +
                                   device.name() + " failed (locked-memory limit, ulimit -l, too low?)",
                               error));
  }
}

// ---------------------------------------------------------------- connect

RcConnection::RcConnection(std::shared_ptr<VerbsDevice> device, const ConnectParams& params, const RcConfig& config)
    : device_(std::move(device)),
      config_(config),
      on_inbound_(params.on_inbound),
      secret_hi_(params.group_secret_hi),
      secret_lo_(params.group_secret_lo) {
  peer_rank_ = params.peer_rank;
}

RcConnection::~RcConnection() {
  close();
  // Destroyed from inside its own progress thread (an on_inbound callback
  // dropped the last reference): that thread exits on its own.
  if (progress_thread_.joinable()) progress_thread_.detach();
  if (wake_fd_ >= 0) ::close(wake_fd_);  // here, not in close(): stop_driving() may race with close()
}

void RcConnection::create_queue_pair() {
  const IbverbsApi& api = device_->api();
  const ibv_device_attr& attr = device_->device_attr();
  queue_depth_ = std::min<uint32_t>(config_.queue_depth, static_cast<uint32_t>(attr.max_qp_wr));
  recv_depth_ = std::min<uint32_t>(config_.recv_depth, static_cast<uint32_t>(attr.max_qp_wr));
  chunk_size_ = config_.chunk_size;
  staging_slots_ = std::max<uint32_t>(4, std::min<uint32_t>(16, queue_depth_ / 4));
  max_write_bytes_ = std::min<uint64_t>(device_->port_attr().max_msg_sz, 1ull << 30);
  if (max_write_bytes_ == 0) max_write_bytes_ = 1ull << 30;

  recv_buffers_ = std::make_unique<RegisteredBuffer>(*device_, size_t(recv_depth_) * chunk_size_, false);
  staging_buffers_ = std::make_unique<RegisteredBuffer>(*device_, size_t(staging_slots_) * chunk_size_, false);
  scratch_ = std::make_unique<RegisteredBuffer>(*device_, size_t(queue_depth_ + 8) * sizeof(uint64_t), false);
  inbox_ = std::make_unique<RegisteredBuffer>(*device_, sizeof(Inbox), true);

  completion_channel_.reset(api.create_comp_channel(device_->context()));
  if (!completion_channel_) throw_system(errno_message("verbs: ibv_create_comp_channel failed", errno));
  // Non-blocking, so a spurious wake-up never blocks the progress thread in ibv_get_cq_event.
  const int flags = fcntl(completion_channel_->fd, F_GETFL);
  if (flags < 0 || fcntl(completion_channel_->fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    throw_system(errno_message("verbs: making the completion channel non-blocking failed", errno));
  }
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) throw_system(errno_message("verbs: eventfd failed", errno));
  // Every signaled send WR and every receive can produce one CQE.
  const int cq_size = std::min<int>(static_cast<int>(queue_depth_ + recv_depth_ + 16), attr.max_cqe);
  cq_.reset(api.create_cq(device_->context(), cq_size, nullptr, completion_channel_.get(), 0));
  if (!cq_) throw_system(errno_message("verbs: ibv_create_cq(" + std::to_string(cq_size) + ") failed", errno));

  ibv_qp_init_attr init{};
  init.send_cq = cq_.get();
  init.recv_cq = cq_.get();
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;
  init.cap.max_send_wr = queue_depth_;
  init.cap.max_recv_wr = recv_depth_;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 1;
  // Inline small puts (copied into the WQE: no DMA read of the source, and
  // the source is free at once). IB_MAX_INLINE (512 B) is asked for first:
  // rxe grants 512 and skips the source-MR lookup and copy in the kernel;
  // on mlx5 a WQE past the 256 B BlueFlame buffer is fetched by the NIC in
  // one read, which replaces the read of the source. Devices that cannot do
  // as much get 220 B (perftest's default), 64 B, or none at all.
  const uint32_t wanted = config_.max_inline;
  uint32_t asked = 0;
  for (uint32_t inline_bytes : {wanted, std::min(wanted, 220u), std::min(wanted, 64u), 0u}) {
    asked = inline_bytes;
    init.cap.max_inline_data = inline_bytes;
    qp_.reset(api.create_qp(device_->pd(), &init));
    if (qp_) break;
  }
  if (!qp_) throw_system(errno_message("verbs: ibv_create_qp(RC, depth " + std::to_string(queue_depth_) + ") failed", errno));
  // Devices may grant more than asked (rxe: at least one SGE's 16 B); a
  // setting of 0 still means no inline puts.
  max_inline_ = std::min(init.cap.max_inline_data, asked);
  // Registered host sources up to here are inlined or copied; above, zero-copy.
  stage_max_ = std::max(std::min(config_.stage_max, chunk_size_), max_inline_);
  psn_ = random_psn();

  move_qp_to_init(*device_, qp_.get());

  for (int slot = int(staging_slots_) - 1; slot >= 0; --slot) free_staging_.push_back(slot);
  // Scratch words: [0] credit source, [1] closed-notice source, [2] discarded
  // signal results, [3..] atomic results.
  for (int slot = int(queue_depth_ + 7); slot >= 3; --slot) free_scratch_.push_back(slot);
  // Receives go up before the QP info is published: the peer may send as soon as it is connected.
  std::lock_guard<std::mutex> lock(state_mutex_);
  for (uint32_t slot = 0; slot < recv_depth_; ++slot) repost_receive_locked(slot);
  if (failed_.load()) throw_system(reason_);
}

RcEndpointInfo RcConnection::local_info() const {
  RcEndpointInfo info;
  info.address = local_qp_address(*device_, *qp_, psn_);
  info.recv_depth = recv_depth_;
  info.chunk_size = chunk_size_;
  info.inbox_addr = reinterpret_cast<uint64_t>(inbox_->data());
  info.inbox_rkey = inbox_->rkey();
  info.secret_hi = secret_hi_;
  info.secret_lo = secret_lo_;
  return info;
}

void RcConnection::bring_up(const RcEndpointInfo& peer) {
  QpTimers timers;
  timers.ack_timeout = config_.ack_timeout;
  timers.retry_count = config_.retry_count;
  move_qp_to_rts(*device_, qp_.get(), peer.address, psn_, timers,
                 "verbs: connecting to rank " + std::to_string(peer_rank_) + ": ");

  peer_recv_depth_ = peer.recv_depth;
  peer_chunk_size_ = peer.chunk_size;
  peer_inbox_addr_ = peer.inbox_addr;
  peer_inbox_rkey_ = peer.inbox_rkey;
}

std::unique_ptr<RcConnection> RcConnection::connect(std::shared_ptr<VerbsDevice> device, const ConnectParams& params,
                                                    const RcConfig& config) {
  if (params.store == nullptr) throw_usage("verbs: connect needs a key-value store");
  std::unique_ptr<RcConnection> connection(new RcConnection(std::move(device), params, config));
  connection->create_queue_pair();

  const std::string peer_name = "rank " + std::to_string(params.peer_rank);
  // The QP info goes through a rendezvous that ignores what an earlier
  // process of the peer's rank (or a failed channel being replaced) left in
  // the store: connecting to that QP would only fail at the first write.
  const std::string& prefix = params.key_prefix;  // names the pair, the tag and the transport
  const RendezvousResult agreed = rendezvous(*params.store, prefix, params.self_rank, params.peer_rank,
                                             connection->local_info().serialize(), params.deadline, "verbs connect");
  const RcEndpointInfo peer = RcEndpointInfo::deserialize(agreed.peer_blob, params.peer_rank);
  if (peer.secret_hi != params.group_secret_hi || peer.secret_lo != params.group_secret_lo) {
    throw_system("verbs connect: " + peer_name + " belongs to a different endpoint group (secret mismatch)");
  }
  connection->bring_up(peer);

  // Both QPs must be past RTR before either side sends, or the first packets
  // would be dropped and retried until the transport gives up.
  rendezvous_barrier(*params.store, prefix, params.self_rank, params.peer_rank, agreed, "rtr", params.deadline,
                     "verbs connect");
  LAMINA_DEBUG("verbs: rank " + std::to_string(params.self_rank) + " connected to " + peer_name + " via " +
               connection->device_->description() + ", qpn " + std::to_string(connection->qp_->qp_num) + " -> " +
               std::to_string(peer.address.qpn) + ", inline " + std::to_string(connection->max_inline_));
  {
    std::lock_guard<std::mutex> lock(connection->state_mutex_);
    connection->seq_at_last_look_ = connection->next_seq_;
    connection->last_post_seen_ns_ = coarse_now_ns();
    connection->connected_ = true;
  }
  RcConnection* raw = connection.get();
  connection->progress_thread_ = std::thread([raw] {
    name_this_thread("lamina-verbs");
    raw->run_progress_thread();
  });
  return connection;
}

// ---------------------------------------------------------------- failure

bool RcConnection::failed(std::string* why) const {
  if (!failed_.load(std::memory_order_acquire)) return false;
  if (why != nullptr) {
    std::lock_guard<std::mutex> lock(reason_mutex_);
    *why = reason_;
  }
  return true;
}

void RcConnection::throw_if_failed_locked() const {
  if (!failed_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(reason_mutex_);
  throw_system(reason_);
}

void RcConnection::check_usable_locked() {
  if (closed_) throw_system("verbs connection to rank " + std::to_string(peer_rank_) + " is closed");
  if (peer_closed_) {
    fail_locked("verbs connection to rank " + std::to_string(peer_rank_) + " failed: peer rank " +
                std::to_string(peer_rank_) + " closed the connection");
  }
  throw_if_failed_locked();
}

void RcConnection::fail_locked(const std::string& reason) {
  if (failed_.load(std::memory_order_acquire)) return;
  {
    std::lock_guard<std::mutex> lock(reason_mutex_);
    reason_ = reason;
  }
  failed_.store(true, std::memory_order_release);
  LAMINA_INFO("verbs: " + reason);
  for (InFlight& entry : in_flight_) {
    if (entry.done) entry.done->fail(reason);
  }
  in_flight_.clear();  // buffers stay allocated until the QP is destroyed
  for (PendingRecv& recv : pending_recvs_) {
    if (recv.done) recv.done->fail(reason);
  }
  pending_recvs_.clear();
  inbound_.reset();
  unexpected_.clear();
  unexpected_bytes_ = 0;
  // Stop the QP so the peer notices (its next WR is not acknowledged).
  if (qp_) {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_ERR;
    device_->api().modify_qp(qp_.get(), &attr, IBV_QP_STATE);
  }
  inbound_notify_ = true;  // waiters on inbound data should look again
}

std::string RcConnection::describe_wc_failure(const ibv_wc& wc, WrKind kind) const {
  const bool is_recv = (wc.wr_id & kRecvWrBit) != 0;
  std::string text = "verbs connection to rank " + std::to_string(peer_rank_) + " failed: " +
                     (is_recv ? std::string("receive") : std::string(kind_name(int(kind)))) +
                     " work completion error: " + device_->api().wc_status_str(wc.status) + " (status " +
                     std::to_string(int(wc.status)) + ", vendor error 0x";
  char vendor[16];
  std::snprintf(vendor, sizeof(vendor), "%x", wc.vendor_err);
  text += vendor;
  text += ")";
  switch (wc.status) {
    case IBV_WC_REM_ACCESS_ERR:
      text += ": the target region is not registered for this access, was deregistered, or the range is outside it";
      break;
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
      text += ": rank " + std::to_string(peer_rank_) +
              " did not acknowledge (it exited, closed the connection, or the network is down)";
      break;
    case IBV_WC_LOC_PROT_ERR:
      text += ": a local buffer is not covered by its memory registration";
      break;
    case IBV_WC_WR_FLUSH_ERR:
      text += ": the queue pair is in the error state (the peer's QP reported an error on this connection, "
              "e.g. it received an invalid or unauthorized request)";
      break;
    case IBV_WC_REM_INV_REQ_ERR:
      text += ": the peer rejected the request (unaligned atomic, or an operation its QP does not allow)";
      break;
    default:
      break;
  }
  return text;
}

// ---------------------------------------------------------------- progress

bool RcConnection::progress() {
  // "A user thread drives", on the coarse clock: it stays in user space, and
  // a tick is finer than the grace period.
  external_progress_ns_.store(coarse_now_ns(), std::memory_order_relaxed);
  return drive();
}

void RcConnection::stop_driving() {
  external_progress_ns_.store(0, std::memory_order_relaxed);
  wake_progress_thread();
}

void RcConnection::wake_progress_thread() {
  if (wake_fd_ >= 0) wake_eventfd(wake_fd_);
}

void RcConnection::run_progress_thread() {
  const IbverbsApi& api = device_->api();
  int recheck_ms = 0;  // grows while a user thread keeps driving
  while (!stop_thread_.load(std::memory_order_acquire)) {
    pollfd fds[2] = {{completion_channel_->fd, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const uint64_t external = external_progress_ns_.load(std::memory_order_relaxed);
    const uint64_t since = external != 0 ? coarse_now_ns() - external : UINT64_MAX;
    if (since < kExternalDriveGraceNs) {
      // A user thread is driving: look again when the grace period would run
      // out, and later each time it still is - each wake-up takes a core from
      // the spinning driver when all cores are busy (at 32 KiB under
      // Soft-RoCE, 5 ms looks cost ~10% of the round trip).
      const int until_grace_ms = static_cast<int>((kExternalDriveGraceNs - since) / 1'000'000) + 1;
      recheck_ms = recheck_ms == 0 ? until_grace_ms : std::min(recheck_ms * 2, kDrivenRecheckMaxMs);
      if (poll(&fds[1], 1, recheck_ms) <= 0) continue;
      recheck_ms = 0;  // stop_driving(): the user thread is going to sleep
    } else {
      recheck_ms = 0;
      bool armed = false;
      {
        // Never block a poster on this lock: if it is busy, someone is
        // posting or driving right now.
        std::unique_lock<std::mutex> lock(state_mutex_, std::try_to_lock);
        if (lock.owns_lock()) {
          if (closed_ || failed_.load(std::memory_order_acquire)) return;  // nothing left to drive
          // Arm before the final poll of the CQ, so no completion slips between them.
          ibv_req_notify_cq(cq_.get(), 0);
          armed = true;
        }
      }
      if (armed) {
        drive();
        poll(fds, 2, kThreadIdleWakeMs);
        if (fds[0].revents & POLLIN) {
          ibv_cq* cq = nullptr;
          void* context = nullptr;
          if (api.get_cq_event(completion_channel_.get(), &cq, &context) == 0) api.ack_cq_events(cq, 1);
        }
      } else {
        poll(&fds[1], 1, 1);  // look again in a millisecond
      }
    }
    if (fds[1].revents & POLLIN) {
      uint64_t count = 0;
      ssize_t ignored = read(wake_fd_, &count, sizeof(count));
      (void)ignored;
    }
    drive();
  }
}

bool RcConnection::drive() {
  bool did_work = false;
  bool notify = false;
  {
    std::unique_lock<std::mutex> lock(state_mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return false;  // another thread is driving this connection
    did_work = progress_locked();
    notify = std::exchange(inbound_notify_, false);  // taken here: one lock per spin step, not two
  }
  if (notify && on_inbound_) on_inbound_();
  return did_work;
}

void RcConnection::notify_inbound() {
  bool notify = false;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    notify = std::exchange(inbound_notify_, false);
  }
  if (notify && on_inbound_) on_inbound_();
}

bool RcConnection::progress_locked() {
  if (closed_ || failed_.load(std::memory_order_acquire)) return false;
  bool did_work = false;
  // Read the peer's close flag before polling: every completion of a message
  // the peer sent before closing is then already in the CQ.
  const bool close_seen = !peer_closed_ && __atomic_load_n(&inbox()->peer_closed, __ATOMIC_ACQUIRE) != 0;
  ibv_wc wcs[kPollBatch];
  for (;;) {
    const int n = ibv_poll_cq(cq_.get(), kPollBatch, wcs);
    if (n < 0) {
      fail_locked("verbs connection to rank " + std::to_string(peer_rank_) + " failed: ibv_poll_cq returned " +
                  std::to_string(n));
      return true;
    }
    for (int i = 0; i < n; ++i) {
      on_completion_locked(wcs[i]);
      if (failed_.load(std::memory_order_relaxed)) return true;
    }
    did_work |= n > 0;
    if (n < kPollBatch) break;
  }
  if (!arrived_.empty()) deliver_locked();
  if (failed_.load(std::memory_order_relaxed)) return true;
  return_credits_locked();

  // The peer's close notice: fail once everything that arrived before it is delivered.
  if (close_seen) {
    peer_closed_ = true;
    did_work = true;
  }
  if (peer_closed_ && arrived_.empty() && unexpected_.empty()) {
    fail_locked("verbs connection to rank " + std::to_string(peer_rank_) + " failed: peer rank " +
                std::to_string(peer_rank_) + " closed the connection");
    return true;
  }
  maybe_probe_locked();
  return did_work;
}

void RcConnection::on_completion_locked(const ibv_wc& wc) {
  if (wc.wr_id & kRecvWrBit) {
    if (wc.status != IBV_WC_SUCCESS) {
      fail_locked(describe_wc_failure(wc, WrKind::kSend));
      return;
    }
    arrived_.push_back({static_cast<uint32_t>(wc.wr_id & ~kRecvWrBit), wc.byte_len});
    return;
  }
  if (wc.status != IBV_WC_SUCCESS) {
    WrKind kind = WrKind::kWrite;
    for (const InFlight& entry : in_flight_) {
      if (entry.seq == wc.wr_id) kind = entry.kind;
    }
    fail_locked(describe_wc_failure(wc, kind));
    return;
  }
  retire_through_locked(wc.wr_id);
}

void RcConnection::retire_through_locked(uint64_t seq) {
  while (!in_flight_.empty() && in_flight_.front().seq <= seq) {
    InFlight entry = std::move(in_flight_.front());
    in_flight_.pop_front();
    if (entry.staging_slot >= 0) free_staging_.push_back(entry.staging_slot);
    uint64_t value = 0;
    if (entry.scratch_slot >= 0) {
      value = __atomic_load_n(scratch_word(entry.scratch_slot), __ATOMIC_ACQUIRE);
      free_scratch_.push_back(entry.scratch_slot);
    }
    if (entry.kind == WrKind::kCredit) credit_write_in_flight_ = false;
    if (entry.done) entry.done->complete(value);
  }
}

void RcConnection::repost_receive_locked(uint32_t slot) {
  ibv_sge sge{};
  sge.addr = reinterpret_cast<uint64_t>(recv_slot(slot));
  sge.length = chunk_size_;
  sge.lkey = recv_buffers_->lkey();
  ibv_recv_wr wr{};
  wr.wr_id = kRecvWrBit | slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  const int rc = ibv_post_recv(qp_.get(), &wr, &bad);
  if (rc != 0) {
    fail_locked(errno_message("verbs connection to rank " + std::to_string(peer_rank_) + " failed: ibv_post_recv", rc));
  }
}

void RcConnection::fail_too_long(PendingRecv& recv, uint64_t message_bytes) {
  if (recv.done) {
    recv.done->fail("message of " + std::to_string(message_bytes) + " bytes does not fit the receive buffer of " +
                        std::to_string(recv.capacity) + " bytes (message dropped)",
                    ErrorKind::kUsage);
  }
  inbound_notify_ = true;
}

void RcConnection::deliver_locked() {
  const std::string who = "verbs connection to rank " + std::to_string(peer_rank_) + " failed: ";
  while (!failed_.load(std::memory_order_relaxed)) {
    // Messages buffered earlier go to the oldest receives first.
    while (!pending_recvs_.empty() && !unexpected_.empty() && unexpected_.front().complete) {
      UnexpectedMessage& message = unexpected_.front();
      PendingRecv& recv = pending_recvs_.front();
      if (message.size > recv.capacity) {
        fail_too_long(recv, message.size);
      } else {
        std::memcpy(recv.buffer, message.bytes.get(), message.size);
        if (recv.done) recv.done->complete(message.size);
      }
      unexpected_bytes_ -= message.size;
      unexpected_.pop_front();
      pending_recvs_.pop_front();
      inbound_notify_ = true;
    }
    if (arrived_.empty()) return;

    const ArrivedFragment fragment = arrived_.front();
    const uint8_t* data = recv_slot(fragment.slot);
    uint64_t length = fragment.length;
    if (!inbound_) {
      MessageHeader header{};
      if (length < sizeof(header)) {
        fail_locked(who + "protocol error: message fragment of " + std::to_string(length) + " bytes has no header");
        return;
      }
      std::memcpy(&header, data, sizeof(header));
      if (header.magic != kMessageMagic) {
        fail_locked(who + "protocol error: bad message header");
        return;
      }
      if (unexpected_.empty() && !pending_recvs_.empty()) {
        PendingRecv& recv = pending_recvs_.front();
        if (header.length > recv.capacity) {
          fail_too_long(recv, header.length);
          pending_recvs_.pop_front();
          inbound_ = InboundMessage{header.length, 0, InboundMessage::kDiscard};
        } else {
          inbound_ = InboundMessage{header.length, 0, InboundMessage::kRecv};
        }
      } else if (unexpected_bytes_ + header.length <= config_.max_unexpected_bytes) {
        unexpected_.push_back({std::unique_ptr<uint8_t[]>(new uint8_t[header.length]), header.length, false});
        unexpected_bytes_ += header.length;
        inbound_ = InboundMessage{header.length, 0, InboundMessage::kUnexpected};
      } else {
        return;  // hold the bounce buffer (no credit back): this is the back-pressure
      }
      data += sizeof(header);
      length -= sizeof(header);
    }
    if (length > inbound_->total - inbound_->copied) {
      fail_locked(who + "protocol error: message fragment overruns the announced length");
      return;
    }
    if (inbound_->target != InboundMessage::kDiscard) {
      uint8_t* target = inbound_->target == InboundMessage::kUnexpected ? unexpected_.back().bytes.get()
                                                                         : pending_recvs_.front().buffer;
      std::memcpy(target + inbound_->copied, data, length);
    }
    inbound_->copied += length;
    arrived_.pop_front();
    repost_receive_locked(fragment.slot);
    ++credits_granted_;
    if (inbound_->copied == inbound_->total) {
      if (inbound_->target == InboundMessage::kUnexpected) {
        unexpected_.back().complete = true;
      } else if (inbound_->target == InboundMessage::kRecv) {
        PendingRecv& recv = pending_recvs_.front();
        if (recv.done) recv.done->complete(inbound_->total);
        pending_recvs_.pop_front();
        inbound_notify_ = true;
      }
      inbound_.reset();
    }
  }
}

uint64_t RcConnection::write_inbox_word_locked(int scratch_slot, uint64_t value, size_t inbox_offset, WrKind kind) {
  uint64_t* source = scratch_word(scratch_slot);
  *source = value;
  ibv_sge sge{reinterpret_cast<uint64_t>(source), sizeof(uint64_t), scratch_->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.rdma.remote_addr = peer_inbox_addr_ + inbox_offset;
  wr.wr.rdma.rkey = peer_inbox_rkey_;
  InFlight entry;
  entry.kind = kind;
  return post_wr_locked(wr, std::move(entry), true);
}

void RcConnection::return_credits_locked() {
  const uint64_t unannounced = credits_granted_ - credits_announced_;
  // Batch the updates; the sender cannot be starved by the batching because
  // it only blocks when it used every credit, i.e. when we hold a full batch.
  const uint64_t batch = std::max<uint32_t>(1, recv_depth_ / 4);
  if (credit_write_in_flight_ || unannounced < batch || send_queue_free() == 0) return;
  // Slot 0 is not in flight (single outstanding update), so it is safe to rewrite.
  write_inbox_word_locked(0, credits_granted_, offsetof(Inbox, credits_granted), WrKind::kCredit);
  credit_write_in_flight_ = true;
  credits_announced_ = credits_granted_;
}

void RcConnection::maybe_probe_locked() {
  if (config_.keepalive_ms == 0 || send_queue_free() == 0) return;
  if (pending_recvs_.empty() && !waiting_for_peer_ && signal_waiters_.load(std::memory_order_relaxed) == 0) return;
  // Posts are counted (next_seq_), not timed: the clock is read here, while
  // someone waits, instead of on every post.
  const uint64_t now = coarse_now_ns();
  if (next_seq_ != seq_at_last_look_) {
    seq_at_last_look_ = next_seq_;
    last_post_seen_ns_ = now;
    return;
  }
  if (now - last_post_seen_ns_ < uint64_t(config_.keepalive_ms) * 1'000'000) return;
  post_empty_write_locked(WrKind::kProbe, nullptr);
}

uint64_t RcConnection::post_empty_write_locked(WrKind kind, const OpRef& done) {
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.num_sge = 0;
  wr.wr.rdma.remote_addr = peer_inbox_addr_;
  wr.wr.rdma.rkey = peer_inbox_rkey_;
  InFlight entry;
  entry.kind = kind;
  entry.done = done;
  return post_wr_locked(wr, std::move(entry), true);
}

// ---------------------------------------------------------------- close

void RcConnection::close() {
  // Stop the progress thread first; it must not touch the QP or CQ once they go.
  stop_thread_.store(true, std::memory_order_release);
  if (progress_thread_.joinable() && progress_thread_.get_id() != std::this_thread::get_id()) {
    wake_progress_thread();
    progress_thread_.join();
  }
  {
    std::unique_lock<std::mutex> lock(state_mutex_);
    if (closed_) return;
    if (connected_ && !peer_closed_ && !failed_.load() && send_queue_free() >= 1) {
      // Tell the peer, so it fails fast instead of by retry timeout. Best effort, bounded.
      try {
        const uint64_t seq = write_inbox_word_locked(1, 1, offsetof(Inbox, peer_closed), WrKind::kCloseNotice);
        const uint64_t give_up = now_ns() + kCloseNoticeWaitNs;
        while (!failed_.load() && !in_flight_.empty() && in_flight_.front().seq <= seq && now_ns() < give_up) {
          progress_locked();
        }
      } catch (const Error&) {
        // Already recorded as the failure reason; closing anyway.
      }
    }
    fail_locked("verbs connection to rank " + std::to_string(peer_rank_) + " is closed");
    closed_ = true;
    inbound_notify_ = false;  // no callbacks from close(): the owner may be tearing down
    release_resources_locked();
  }
}

void RcConnection::release_resources_locked() {
  // QP first (no more DMA), then CQ, then buffers and their MRs.
  qp_.reset();
  cq_.reset();
  completion_channel_.reset();
  arrived_.clear();
  inbox_.reset();
  scratch_.reset();
  staging_buffers_.reset();
  recv_buffers_.reset();
}

}  // namespace lamina::verbs
