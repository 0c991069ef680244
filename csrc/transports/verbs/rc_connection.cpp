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
#include "transports/verbs/verbs_settings.hpp"

namespace lamina::verbs {
namespace {

constexpr uint64_t kRecvWrBit = 1ull << 63;  // wr_id of receives: bit | slot
constexpr uint32_t kMessageMagic = 0x4c4e4d53;  // "LNMS"
constexpr uint32_t kInfoMagic = 0x4c4e5651;     // "LNVQ"
constexpr uint32_t kInfoVersion = 1;
constexpr uint64_t kCloseNoticeWaitNs = 100'000'000;  // 100 ms
constexpr int kPollBatch = 16;
constexpr uint64_t kExternalDriveGraceNs = 5'000'000;  // a user thread drove progress this recently
constexpr int kDrivenRecheckMaxMs = 40;  // longest look-again interval while a user thread keeps driving
constexpr int kThreadIdleWakeMs = 100;

// First fragment of every message.
struct MessageHeader {
  uint32_t magic;
  uint32_t reserved;
  uint64_t length;
};
static_assert(sizeof(MessageHeader) == 16);

const char* kind_name(int kind) {
  static const char* const names[] = {"RDMA WRITE", "signal (ATOMIC FETCH_AND_ADD)", "ATOMIC FETCH_AND_ADD",
                                      "SEND", "credit update (RDMA WRITE)", "flush (zero-length RDMA WRITE)",
                                      "keepalive probe (zero-length RDMA WRITE)", "close notice (RDMA WRITE)"};
  return kind >= 0 && kind < 8 ? names[kind] : "work request";
}

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
