#include "proxy/device_proxy.hpp"

#include <sched.h>

#include <cstdlib>
#include <cstring>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/settings.hpp"
#include "common/threads.hpp"
#include "memory/cuda_memory.hpp"

namespace lamina {

namespace {
constexpr size_t kMaxFlushesInFlight = 8;
// Credits (`consumed`) are returned per this many descriptors within a batch
// (a power of two), and at the end of every batch.
constexpr uint64_t kCreditBatch = 64;
// Most puts posted together: a batch of frames in one write on tcp.
constexpr size_t kPutBatch = 32;

uint64_t load_acquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

std::string ticket_text(uint64_t ticket) { return "device descriptor " + std::to_string(ticket); }
}  // namespace

// The ring's memory: host views for the proxy, and the addresses producers
// use (the same for a CPU ring; device pointers for a GPU ring).
class DeviceProxy::RingMemory {
 public:
  RingMemory(uint64_t slots, bool gpu) : gpu_(gpu) {
    const uint64_t ring_bytes = slots * sizeof(DeviceDescriptor) + sizeof(DeviceRingControl);
    if (gpu) {
      void* dev = nullptr;
      host_ = cuda_alloc_mapped_host(ring_bytes, &dev);
      device_ = dev;
      try {
        producer_device_ = cuda_alloc_device(sizeof(DeviceProducerState));
      } catch (...) {
        cuda_free_mapped_host(host_);
        throw;
      }
    } else {
      const uint64_t total = ring_bytes + sizeof(DeviceProducerState);
      host_ = std::aligned_alloc(64, (total + 63) / 64 * 64);
      if (!host_) throw_system("device ring: out of memory for " + std::to_string(total) + " bytes");
      std::memset(host_, 0, total);
      device_ = host_;
      producer_device_ = static_cast<char*>(host_) + ring_bytes;
    }
    slots_ = slots;
  }
  ~RingMemory() {
    if (gpu_) {
      cuda_free_device(producer_device_);
      cuda_free_mapped_host(host_);
    } else {
      std::free(host_);
    }
  }
  DeviceDescriptor* host_slots() const { return static_cast<DeviceDescriptor*>(host_); }
  DeviceRingControl* host_control() const {
    return reinterpret_cast<DeviceRingControl*>(static_cast<char*>(host_) + slots_ * sizeof(DeviceDescriptor));
  }
  DeviceDescriptor* device_slots() const { return static_cast<DeviceDescriptor*>(device_); }
  DeviceRingControl* device_control() const {
    return reinterpret_cast<DeviceRingControl*>(static_cast<char*>(device_) + slots_ * sizeof(DeviceDescriptor));
  }
  DeviceProducerState* device_producer() const { return static_cast<DeviceProducerState*>(producer_device_); }

 private:
  bool gpu_;
  uint64_t slots_ = 0;
  void* host_ = nullptr;
  void* device_ = nullptr;
  void* producer_device_ = nullptr;
};

DeviceProxy::DeviceProxy(Endpoint& endpoint, std::shared_ptr<Channel> channel,
                         std::vector<std::shared_ptr<Region>> local, std::vector<RegionDescriptor> remote,
                         const DeviceProxyOptions& options)
    : options_(options), channel_(std::move(channel)), local_(std::move(local)), remote_(std::move(remote)) {
  if (!channel_ || channel_->closed()) throw_usage("device channel: the channel is closed");
  if (options_.ring_slots == 0) {
    const int64_t from_env = setting_int("DEVICE_RING_SLOTS");
    if (from_env <= 0) {
      throw_usage("LAMINA_NET_DEVICE_RING_SLOTS=" + std::to_string(from_env) + " must be a power of two >= 2");
    }
    options_.ring_slots = static_cast<uint64_t>(from_env);
  }
  const uint64_t n = options_.ring_slots;
  if (n < 2 || (n & (n - 1)) != 0 || n > (1u << 24)) {
    throw_usage("device channel: ring_slots must be a power of two in [2, 16777216], got " + std::to_string(n));
  }
  if (local_.size() > kMaxDeviceWindows || remote_.size() > kMaxDeviceWindows) {
    throw_usage("device channel: at most " + std::to_string(kMaxDeviceWindows) + " local and " +
                std::to_string(kMaxDeviceWindows) + " remote windows");
  }
  for (size_t i = 0; i < remote_.size(); ++i) {
    const RegionDescriptor& d = remote_[i];
    if (static_cast<int>(d.owner_rank) != channel_->peer()) {
      throw_usage("device channel: remote window " + std::to_string(i) + " is a region of rank " +
                  std::to_string(d.owner_rank) + ", not of the channel's peer " + std::to_string(channel_->peer()));
    }
    if (d.group_id != endpoint.group_id()) {
      throw_usage("device channel: remote window " + std::to_string(i) + " belongs to another group");
    }
  }
  for (size_t i = 0; i < local_.size(); ++i) {
    if (!local_[i] || local_[i]->closed.load()) {
      throw_usage("device channel: local window " + std::to_string(i) + " is closed");
    }
  }
  timeout_s_ = options_.timeout_s < 0 ? endpoint.default_timeout() : options_.timeout_s;
  if (!(timeout_s_ > 0)) throw_usage("device channel: timeout must be > 0 seconds");
  const int64_t spin_us = options_.spin_us >= 0 ? options_.spin_us : setting_int("PROXY_SPIN_US");
  spin_cycles_ = cycles_for_ns(static_cast<uint64_t>(spin_us) * 1000);

  group_id_ = endpoint.group_id();
  local_.reserve(kMaxDeviceWindows);
  remote_.reserve(kMaxDeviceWindows);
  local_count_.store(static_cast<uint32_t>(local_.size()));
  remote_count_.store(static_cast<uint32_t>(remote_.size()));
  memory_ = std::make_unique<RingMemory>(n, options_.gpu);
  slots_ = memory_->host_slots();
  control_ = memory_->host_control();
  handle_.magic = kDeviceChannelMagic;
  handle_.abi_version = kDeviceAbiVersion;
  handle_.slots = memory_->device_slots();
  handle_.control = memory_->device_control();
  handle_.producer = memory_->device_producer();
  handle_.capacity = n;
  const double timeout_ns = timeout_s_ * 1e9;
  handle_.timeout_ns = timeout_ns >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(timeout_ns);
  handle_.peer = channel_->peer();
  handle_.remote_count = static_cast<uint32_t>(remote_.size());
  handle_.local_count = static_cast<uint32_t>(local_.size());
  for (size_t i = 0; i < remote_.size(); ++i) {
    handle_.remote_size[i] = remote_[i].size;
    handle_.remote_access[i] = remote_[i].access;
  }
  for (size_t i = 0; i < local_.size(); ++i) {
    handle_.local[i].base = reinterpret_cast<uint64_t>(local_[i]->base);
    handle_.local[i].size = local_[i]->size;
  }
  for (size_t i = 0; i < kMaxFlushesInFlight; ++i) free_flush_ops_.push_back(std::make_shared<OpState>());
  flushes_.reserve(kMaxFlushesInFlight);
  batch_.reserve(kPutBatch);
  thread_ = std::thread([this] { run(); });
}

DeviceProxy::~DeviceProxy() { close(); }

DeviceChannel DeviceProxy::add_windows(std::vector<std::shared_ptr<Region>> local,
                                       std::vector<RegionDescriptor> remote) {
  std::lock_guard<std::mutex> lock(handle_mutex_);
  if (closed_.load()) throw_usage("device channel is closed");
  const size_t nl = local_count_.load(), nr = remote_count_.load();
  if (nl + local.size() > kMaxDeviceWindows || nr + remote.size() > kMaxDeviceWindows) {
    throw_usage("device channel: at most " + std::to_string(kMaxDeviceWindows) + " local and " +
                std::to_string(kMaxDeviceWindows) + " remote windows (it has " + std::to_string(nl) + " and " +
                std::to_string(nr) + ")");
  }
  for (size_t i = 0; i < remote.size(); ++i) {
    if (static_cast<int>(remote[i].owner_rank) != channel_->peer() || remote[i].group_id != group_id_) {
      throw_usage("device channel: remote window " + std::to_string(nr + i) +
                  " is not a region of the channel's peer in this group");
    }
  }
  for (size_t i = 0; i < local.size(); ++i) {
    if (!local[i] || local[i]->closed.load()) {
      throw_usage("device channel: local window " + std::to_string(nl + i) + " is closed");
    }
  }
  // Filled first, then counted (release): the proxy thread reads an entry
  // only below the count it loaded (acquire).
  for (auto& r : local) {
    handle_.local[local_.size()].base = reinterpret_cast<uint64_t>(r->base);
    handle_.local[local_.size()].size = r->size;
    local_.push_back(std::move(r));
  }
  for (auto& d : remote) {
    handle_.remote_size[remote_.size()] = d.size;
    handle_.remote_access[remote_.size()] = d.access;
    remote_.push_back(d);
  }
  handle_.local_count = static_cast<uint32_t>(local_.size());
  handle_.remote_count = static_cast<uint32_t>(remote_.size());
  local_count_.store(handle_.local_count, std::memory_order_release);
  remote_count_.store(handle_.remote_count, std::memory_order_release);
  return handle_;
}

uint64_t DeviceProxy::error_code() const { return load_acquire(&control_->error); }

std::string DeviceProxy::error() const {
  std::lock_guard<std::mutex> lock(error_mutex_);
  return error_;
}

DeviceProxyStats DeviceProxy::stats() const {
  DeviceProxyStats s;
  s.executed = executed_.load(std::memory_order_relaxed);
  s.parks = parks_.load(std::memory_order_relaxed);
  s.flushes = flush_count_.load(std::memory_order_relaxed);
  return s;
}

void DeviceProxy::fail(uint64_t code, uint64_t ticket, const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (error_.empty()) error_ = why;
  }
  uint64_t expected = 0;
  if (__atomic_compare_exchange_n(&control_->error, &expected, code, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    store_release(&control_->error_ticket, ticket);
    if (code != kErrorClosed) LAMINA_WARN("device channel to rank " + std::to_string(channel_->peer()) + ": " + why);
  }
}

void DeviceProxy::close() {
  if (closed_.exchange(true)) return;
  stop_.store(true, std::memory_order_release);
  __atomic_fetch_add(&control_->doorbell_futex, 1, __ATOMIC_SEQ_CST);
  futex_wake_all(&control_->doorbell_futex, true);
  if (thread_.joinable()) thread_.join();
  // Kernels still waiting on this handle stop with an error instead of hanging.
  fail(kErrorClosed, load_acquire(&control_->consumed), "the device channel was closed");
  // The ring stays allocated until destruction: a kernel that outlived the
  // close (a contract violation) then reads an error word, not freed memory.
}

bool DeviceProxy::execute(const DeviceDescriptor& d, uint64_t expected_ticket) {
  if (d.ticket != expected_ticket) {
    fail(kErrorRejected, expected_ticket,
         ticket_text(expected_ticket) + " carries ticket " + std::to_string(d.ticket) + " (the ring was overwritten)");
    return false;
  }
  auto remote_window = [&](uint32_t w, const char* what) -> const RegionDescriptor& {
    const uint32_t count = remote_count_.load(std::memory_order_acquire);
    if (w >= count) {
      throw_usage(std::string(what) + " window " + std::to_string(w) + " is not one of the channel's " +
                  std::to_string(count) + " remote windows");
    }
    return remote_[w];
  };
  const bool is_put = d.opcode == kDeviceOpPut || d.opcode == kDeviceOpPutSignal;
  // Everything else is ordered after the puts before it: post those first.
  if (!is_put && !post_batch()) return false;
  try {
    switch (d.opcode) {
      case kDeviceOpNop: break;
      case kDeviceOpPut:
      case kDeviceOpPutSignal: {
        const uint32_t local_count = local_count_.load(std::memory_order_acquire);
        if (d.src_window >= local_count) {
          throw_usage("source window " + std::to_string(d.src_window) + " is not one of the channel's " +
                      std::to_string(local_count) + " local windows");
        }
        const Region& src = *local_[d.src_window];
        if (!src.contains(d.src_offset, d.bytes)) {
          throw_usage("source range [" + std::to_string(d.src_offset) + ", +" + std::to_string(d.bytes) +
                      ") is outside local window " + std::to_string(d.src_window) + " of " +
                      std::to_string(src.size) + " bytes");
        }
        PutOp op;
        op.dst = RemoteSlice{remote_window(d.dst_window, "destination"), d.dst_offset};
        if (d.opcode == kDeviceOpPutSignal) {
          op.signal = RemoteWord{remote_window(d.signal_window, "signal"), d.signal_offset, d.signal_add};
          op.has_signal = true;
        }
        op.src.ptr = static_cast<const char*>(src.base) + d.src_offset;
        op.src.len = d.bytes;
        op.src.device = src.kind == MemoryKind::kCuda;
        if (batch_.empty()) batch_first_ = expected_ticket;
        batch_.push_back(op);
        // Counted once posted (post_batch).
        return batch_.size() < kPutBatch || post_batch();
      }
      case kDeviceOpSignal: {
        RemoteWord word{remote_window(d.signal_window, "signal"), d.signal_offset, d.signal_add};
        channel_->signal(word, timeout_s_);
        break;
      }
      case kDeviceOpFlush: {
        if (flushes_.size() >= kMaxFlushesInFlight) retire_flushes(true);
        if (error_code() != kErrorNone) return false;
        OpRef op;
        if (!free_flush_ops_.empty()) {
          op = std::move(free_flush_ops_.back());
          free_flush_ops_.pop_back();
        } else {
          op = std::make_shared<OpState>();  // only when a transport kept a finished one
        }
        if (channel_->closed()) throw_usage("the channel is closed");
        channel_->connection()->post_flush(op, Deadline::after_seconds(timeout_s_));
        flushes_.push_back(PendingFlush{std::move(op), expected_ticket + 1});
        flush_count_.fetch_add(1, std::memory_order_relaxed);
        break;
      }
      default:
        throw_usage("unknown opcode " + std::to_string(d.opcode));
    }
  } catch (const Error& e) {
    // A rejected put: the valid ones before it still go out, in order.
    if (is_put && !post_batch()) return false;
    fail(e.kind() == ErrorKind::kUsage ? kErrorRejected : kErrorTransfer, expected_ticket,
         ticket_text(expected_ticket) + ": " + e.what());
    return false;
  }
  // Only this thread writes the counter: a plain store, no locked add.
  executed_.store(executed_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  return true;
}

bool DeviceProxy::post_batch() {
  if (batch_.empty()) return true;
  const size_t n = batch_.size();
  try {
    if (n == 1) {
      // One put: Channel::put's inline path (shm writes it with no lock).
      const PutOp& op = batch_[0];
      channel_->put(op.src.ptr, op.src.len, op.dst.target, op.dst.offset, op.has_signal ? &op.signal : nullptr,
                    false, timeout_s_, op.src.device);
    } else {
      channel_->put_many(batch_, false, timeout_s_);
    }
  } catch (const Error& e) {
    batch_.clear();
    fail(e.kind() == ErrorKind::kUsage ? kErrorRejected : kErrorTransfer, batch_first_,
         ticket_text(batch_first_) + (n > 1 ? " (first of " + std::to_string(n) + " puts posted together)" : "") +
             ": " + e.what());
    return false;
  }
  batch_.clear();
  executed_.store(executed_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  return true;
}

void DeviceProxy::retire_flushes(bool wait_oldest) {
  if (wait_oldest && !flushes_.empty()) {
    // Bounded: the flush's own deadline, enforced by the channel's wait.
    try {
      channel_->wait(flushes_.front().op, timeout_s_, "device flush");
    } catch (const Error& e) {
      fail(kErrorTransfer, flushes_.front().completes_through - 1, std::string("device flush: ") + e.what());
      return;
    }
  }
  size_t retired = 0;
  while (retired < flushes_.size() && flushes_[retired].op->done()) {
    PendingFlush& f = flushes_[retired];
    if (f.op->failed()) {
      fail(kErrorTransfer, f.completes_through - 1, "device flush: " + f.op->error());
      return;
    }
    store_release(&control_->completed, f.completes_through);
    if (f.op.use_count() == 1) {
      f.op->reset();
      free_flush_ops_.push_back(std::move(f.op));
    }
    ++retired;
  }
  if (retired) flushes_.erase(flushes_.begin(), flushes_.begin() + static_cast<long>(retired));
}

void DeviceProxy::park(uint64_t published) {
  const uint32_t seen = __atomic_load_n(&control_->doorbell_futex, __ATOMIC_SEQ_CST);
  __atomic_store_n(&control_->proxy_parked, 1u, __ATOMIC_SEQ_CST);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (load_acquire(&control_->published) == published && !stop_.load(std::memory_order_acquire)) {
    parks_.fetch_add(1, std::memory_order_relaxed);
    // Bounded nap (20 ms: an idle device channel wakes 50 times a second, and
    // notices a failed channel within that); close() wakes it at once.
    futex_wait_us(&control_->doorbell_futex, seen, 20000, true);
  }
  __atomic_store_n(&control_->proxy_parked, 0u, __ATOMIC_SEQ_CST);
}

void DeviceProxy::run() {
  name_this_thread("lamina-proxy");
  const uint64_t mask = options_.ring_slots - 1;
  uint64_t next = 0;  // first descriptor not yet executed
  uint64_t idle_since = 0;
  uint32_t idle = 0;
  bool healthy = true;
  while (!stop_.load(std::memory_order_acquire)) {
    const uint64_t published = load_acquire(&control_->published);
    if (published == next) {
      if (!flushes_.empty()) {
        channel_->progress();
        retire_flushes(false);
      }
      ++idle;
      if ((idle & 1023) == 0 && healthy) {
        std::string why;
        if (channel_->failed(&why)) {
          fail(kErrorTransfer, next, "the channel failed: " + why);
        } else if (channel_->closed()) {
          fail(kErrorClosed, next, "the channel was closed");
        }
        healthy = error_code() == kErrorNone;
      }
      if (idle == 1) idle_since = cycle_counter();
      if ((idle & 127) == 0) {
        if (!options_.gpu && flushes_.empty() && cycle_counter() - idle_since >= spin_cycles_) {
          park(published);
          idle = 0;
        } else if ((idle & 4095) == 0) {
          sched_yield();  // a GPU ring's proxy spins, but gives way on an oversubscribed host
        }
      }
      continue;
    }
    idle = 0;
    healthy = healthy && error_code() == kErrorNone;
    for (; next < published; ++next) {
      // close() waits for the descriptor being executed, not for the rest of
      // the batch (up to ring_slots operations, each bounded by the timeout).
      if (stop_.load(std::memory_order_relaxed)) break;
      if (healthy) {
        // A copy: the producer may refill the slot once `consumed` passes it.
        const DeviceDescriptor d = slots_[next & mask];
        healthy = execute(d, next);
      }
      // Credits flow even after an error, so no producer waits on a full ring:
      // per kCreditBatch descriptors and at the end of the batch, not per
      // descriptor (each store takes the line from the producers polling it).
      if (((next + 1) & (kCreditBatch - 1)) == 0) {
        // Not past a gathered put: `consumed` says its source may be reused.
        store_release(&control_->consumed, batch_.empty() ? next + 1 : batch_first_);
      }
    }
    if (healthy) {
      healthy = post_batch();
    } else {
      batch_.clear();  // the error word already stops the kernels waiting on these
    }
    store_release(&control_->consumed, next);
    if (!flushes_.empty()) retire_flushes(false);
  }
  // Stopping: flushes already posted complete or fail within their bound.
  while (!flushes_.empty() && error_code() == kErrorNone) retire_flushes(true);
}

}  // namespace lamina
