// lamina-net: the host half of the device API's proxy back end.
//
// A DeviceProxy owns one channel's descriptor ring (see
// lamina_net/device.cuh) and the thread that drains it: each descriptor is
// executed on the channel (its transport: tcp, shm, verbs) through the same
// checks as the host API, and credits (`consumed`) and completions
// (`completed`, advanced by flushes) are written back for the device side.
//
// Windows are resolved once, here: remote windows are peer descriptors,
// local windows registered regions of this endpoint; a descriptor names them
// by index, so executing it costs no region lookup.
//
// Contracts:
// - Ordering: descriptors are executed in ticket order on one channel, so
//   the channel's ordering (transport.hpp) carries over to the device side.
//   Consecutive puts are posted together (Channel::put_many, up to 32): in
//   the same order, before any later descriptor, and `consumed` passes a put
//   only once it is posted (its source is then free).
// - Errors: the first failure (an operation the channel refuses or fails, a
//   malformed descriptor, the channel failing while idle) sets the ring's
//   error word and its reason (error()); the proxy then executes nothing
//   more, but keeps returning credits so no producer waits on a full ring.
// - Lifetimes: the proxy keeps its channel and regions alive; it must outlive
//   every kernel that uses its handle. close() stops the thread (bounded),
//   then sets kErrorClosed, and only then frees the ring. The Endpoint's
//   close() closes its proxies before its channels.
// - Threads: handle(), add_windows(), error(), close() and the stats are
//   thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "channels/endpoint.hpp"
#include "lamina_net/device.cuh"

namespace lamina {

struct DeviceProxyOptions {
  uint64_t ring_slots = 0;      // a power of two, >= 2; 0: LAMINA_NET_DEVICE_RING_SLOTS
  double timeout_s = -1;        // bound of device waits and of each operation; < 0: the endpoint's
  // Ring in mapped pinned host memory and producer counters in GPU memory,
  // so kernels can post; otherwise plain host memory for CPU producers.
  bool gpu = false;
  int64_t spin_us = -1;         // proxy's spin before it parks (CPU rings); < 0: LAMINA_NET_PROXY_SPIN_US
};

struct DeviceProxyStats {
  uint64_t executed = 0;   // descriptors executed
  uint64_t parks = 0;      // times the proxy went to sleep
  uint64_t flushes = 0;
};

class DeviceProxy : public EndpointAttachment {
 public:
  // Throws kUsage for a bad window (a descriptor of another rank or group, a
  // closed region, more than kMaxDeviceWindows), kSystem when GPU memory
  // cannot be had.
  DeviceProxy(Endpoint& endpoint, std::shared_ptr<Channel> channel, std::vector<std::shared_ptr<Region>> local,
              std::vector<RegionDescriptor> remote, const DeviceProxyOptions& options);
  ~DeviceProxy() override;
  DeviceProxy(const DeviceProxy&) = delete;
  DeviceProxy& operator=(const DeviceProxy&) = delete;

  DeviceChannel handle() const {
    std::lock_guard<std::mutex> lock(handle_mutex_);
    return handle_;
  }
  // Appends windows: local[i] becomes local window local_count + i, likewise
  // remote; returns the new handle. Handles made before stay valid (their
  // windows are a prefix of the new ones), so kernels and CUDA graphs holding
  // them keep working. The constructor's checks; at most kMaxDeviceWindows of
  // each in all (kUsage). Thread-safe: the proxy thread accepts a window once
  // it is complete.
  DeviceChannel add_windows(std::vector<std::shared_ptr<Region>> local, std::vector<RegionDescriptor> remote);
  bool gpu() const { return options_.gpu; }
  // The back end that runs this channel's device operations.
  const char* device_path() const { return "proxy"; }
  Channel& channel() { return *channel_; }
  uint64_t error_code() const;
  std::string error() const;  // "" while healthy
  DeviceProxyStats stats() const;
  // Idempotent; bounded by the options' timeout (waits for the descriptor
  // being executed, never for producers).
  void close() override;
  bool closed() const { return closed_.load(); }

 private:
  class RingMemory;

  void run();
  // Returns false once the ring has an error (nothing more is executed).
  // Puts are gathered into batch_ (up to kPutBatch, one write on tcp) and
  // posted when another kind of descriptor comes, the batch is full, or the
  // published descriptors run out.
  bool execute(const DeviceDescriptor& d, uint64_t expected_ticket);
  // Posts batch_; false (the ring failed, naming its first ticket) on error.
  bool post_batch();
  void retire_flushes(bool wait_all);
  void fail(uint64_t code, uint64_t ticket, const std::string& why);
  void park(uint64_t published);

  DeviceProxyOptions options_;
  double timeout_s_;
  std::shared_ptr<Channel> channel_;
  // Capacity kMaxDeviceWindows, reserved up front: add_windows appends
  // without moving what the proxy thread reads; it reads only the first
  // local_count_ / remote_count_ entries.
  std::vector<std::shared_ptr<Region>> local_;
  std::vector<RegionDescriptor> remote_;
  std::atomic<uint32_t> local_count_{0}, remote_count_{0};
  uint64_t group_id_ = 0;
  mutable std::mutex handle_mutex_;  // handle_ and appending windows
  std::unique_ptr<RingMemory> memory_;
  DeviceChannel handle_{};
  DeviceRingControl* control_ = nullptr;  // host view of the control words
  DeviceDescriptor* slots_ = nullptr;     // host view of the ring

  // Flushes in flight: their completion op and the `completed` value they
  // stand for. Ops are reused (no allocation per descriptor).
  struct PendingFlush {
    OpRef op;
    uint64_t completes_through;
  };
  std::vector<PendingFlush> flushes_;
  std::vector<OpRef> free_flush_ops_;
  // Puts executed but not yet posted, from ticket batch_first_ on; capacity
  // reserved up front (no allocation per descriptor).
  std::vector<PutOp> batch_;
  uint64_t batch_first_ = 0;

  mutable std::mutex error_mutex_;
  std::string error_;
  std::atomic<uint64_t> executed_{0}, parks_{0}, flush_count_{0};
  uint64_t spin_cycles_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};
  std::thread thread_;
};

}  // namespace lamina
