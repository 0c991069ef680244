#include "proxy/device_pingpong.hpp"

#include <atomic>
#include <thread>

#include "common/error.hpp"

namespace lamina {

namespace {

// Windows of the ping-pong's device channel.
constexpr uint32_t kLocalBuffer = 0, kLocalSignal = 1, kLocalSource = 2;
constexpr uint32_t kRemoteBuffer = 0, kRemoteSignal = 1;

// Closes the proxy on every way out, so no proxy thread outlives the run.
struct ProxyGuard {
  std::shared_ptr<DeviceProxy> proxy;
  ~ProxyGuard() {
    if (proxy) proxy->close();
  }
};

std::shared_ptr<DeviceProxy> make_proxy(Endpoint& endpoint, const std::shared_ptr<Channel>& channel,
                                        std::vector<std::shared_ptr<Region>> local,
                                        std::vector<RegionDescriptor> remote, uint64_t ring_slots, double timeout_s,
                                        int64_t spin_us) {
  DeviceProxyOptions o;
  o.ring_slots = ring_slots;
  o.timeout_s = timeout_s;
  o.gpu = false;  // CPU producers
  o.spin_us = spin_us;
  auto proxy = std::make_shared<DeviceProxy>(endpoint, channel, std::move(local), std::move(remote), o);
  endpoint.attach(proxy);  // an endpoint closed meanwhile closes it first
  return proxy;
}

// Throws for a device call that did not return kDeviceOk.
void check(DeviceStatus s, const DeviceProxy& proxy, const std::string& what) {
  if (s == kDeviceOk) return;
  const std::string why = proxy.error();
  switch (s) {
    case kDeviceTimeout:
      throw_timeout(what + ": the device call timed out" + (why.empty() ? "" : " (" + why + ")"));
    case kDeviceInvalidArgument:
      throw_usage(what + ": the device call rejected its arguments");
    default:
      throw_system(what + ": " + (why.empty() ? "the device channel failed" : why));
  }
}

void fill_info(const DeviceProxy& proxy, DeviceRunInfo* info) {
  if (!info) return;
  info->device_path = proxy.device_path();
  info->stats = proxy.stats();
}

}  // namespace

std::vector<double> run_device_pingpong(Endpoint& endpoint, const std::shared_ptr<Channel>& channel,
                                        const DevicePingPongConfig& config, const std::shared_ptr<Region>& buffer,
                                        const std::shared_ptr<Region>& signal, const RegionDescriptor& remote_buffer,
                                        const RegionDescriptor& remote_signal, DeviceRunInfo* info) {
  if (!channel || !buffer || !signal) throw_usage("device ping-pong: missing channel or region");
  if (config.size == 0 || config.size > buffer->size || config.size > remote_buffer.size) {
    throw_usage("device ping-pong size must be in [1, the buffers' size]");
  }
  if (signal->size < 8 || remote_signal.size < 8) throw_usage("device ping-pong: signal regions need 8 bytes");
  if (config.iterations <= 0 || config.warmup < 0) {
    throw_usage("device ping-pong needs iterations > 0 and warmup >= 0");
  }
  const uint64_t base = config.signal_base;
  // Sent from private registered memory, as run_pingpong does. Declared
  // before the proxy guard: deregistered after the proxy that reads it is gone.
  PingPongSource source(endpoint, config.size);
  ProxyGuard guard{make_proxy(endpoint, channel, {buffer, signal, source.region()}, {remote_buffer, remote_signal},
                              config.ring_slots, config.timeout_s, config.spin_us)};
  const DeviceProxy& proxy = *guard.proxy;
  const DeviceChannel h = proxy.handle();
  const uint64_t size = config.size;

  auto send_one = [&](int) {
    check(h.put_signal(kRemoteBuffer, 0, kLocalSource, 0, size, kRemoteSignal, 0, 1), proxy, "device ping-pong put");
  };
  auto receive_one = [&](int i) {
    check(h.wait(kLocalSignal, 0, base + static_cast<uint64_t>(i) + 1), proxy,
          "device ping-pong wait for round " + std::to_string(i));
  };
  std::vector<double> times = time_rounds(config.warmup, config.iterations, config.initiator, send_one, receive_one);
  // The responder's last put may still be in the ring: the proxy stops
  // without draining it, so flush before closing.
  check(h.flush(), proxy, "device ping-pong flush");
  fill_info(proxy, info);
  return times;
}

PutRateResult run_device_put_rate(Endpoint& endpoint, const std::shared_ptr<Channel>& channel,
                                  const PutRateConfig& config, const RegionDescriptor& remote) {
  if (!channel) throw_usage("put rate: missing channel");
  if (config.producers < 1 || config.producers > 256) throw_usage("put rate: producers must be in [1, 256]");
  if (config.size == 0 || config.size > remote.size) throw_usage("put rate: size must be in [1, the target's size]");
  if (config.ops == 0) throw_usage("put rate: ops must be > 0");
  const uint64_t size = config.size;
  const uint64_t slots = remote.size / size;  // destination offsets cycle through the target
  const int producers = config.producers;
  PingPongSource source(endpoint, size * static_cast<uint64_t>(producers));
  ProxyGuard guard{make_proxy(endpoint, channel, {source.region()}, {remote}, config.ring_slots, config.timeout_s,
                              config.spin_us)};
  const DeviceProxy& proxy = *guard.proxy;
  const DeviceChannel h = proxy.handle();

  std::atomic<bool> go{false};
  std::atomic<int> remaining{producers};
  std::atomic<int> first_failure{kDeviceOk};
  std::atomic<uint64_t> end_ns{0};
  auto producer = [&](int p) {
    const uint64_t first = config.ops * static_cast<uint64_t>(p) / static_cast<uint64_t>(producers);
    const uint64_t last = config.ops * static_cast<uint64_t>(p + 1) / static_cast<uint64_t>(producers);
    while (!go.load(std::memory_order_acquire)) cpu_relax();
    DeviceStatus s = kDeviceOk;
    for (uint64_t k = first; k < last && s == kDeviceOk; ++k) {
      s = h.put(0, (k % slots) * size, 0, static_cast<uint64_t>(p) * size, size);
    }
    // The last producer to finish flushes: every put of every producer was
    // posted before it.
    if (remaining.fetch_sub(1, std::memory_order_acq_rel) == 1 && s == kDeviceOk) {
      s = h.flush();
      end_ns.store(now_ns(), std::memory_order_release);
    }
    if (s != kDeviceOk) {
      int expected = kDeviceOk;
      first_failure.compare_exchange_strong(expected, s);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(producers));
  for (int p = 0; p < producers; ++p) threads.emplace_back(producer, p);
  // Let the threads reach the start line before the clock starts.
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const uint64_t start_ns = now_ns();
  go.store(true, std::memory_order_release);
  for (auto& t : threads) t.join();
  check(static_cast<DeviceStatus>(first_failure.load()), proxy, "device put rate");
  PutRateResult r;
  r.ops = config.ops;
  r.seconds = static_cast<double>(end_ns.load() - start_ns) * 1e-9;
  fill_info(proxy, &r.info);
  return r;
}

PutRateResult run_host_put_rate(Endpoint& endpoint, Channel& channel, const PutRateConfig& config,
                                const RegionDescriptor& remote) {
  if (config.size == 0 || config.size > remote.size) throw_usage("put rate: size must be in [1, the target's size]");
  if (config.ops == 0) throw_usage("put rate: ops must be > 0");
  const uint64_t size = config.size;
  const uint64_t slots = remote.size / size;
  PingPongSource source(endpoint, size);  // registered, as the device path's source is
  const void* src = source.data();
  const uint64_t start_ns = now_ns();
  for (uint64_t k = 0; k < config.ops; ++k) {
    channel.put(src, size, remote, (k % slots) * size, nullptr, false, config.timeout_s);
  }
  channel.wait(channel.flush(config.timeout_s), config.timeout_s, "put rate flush");
  PutRateResult r;
  r.ops = config.ops;
  r.seconds = static_cast<double>(now_ns() - start_ns) * 1e-9;
  return r;
}

}  // namespace lamina

