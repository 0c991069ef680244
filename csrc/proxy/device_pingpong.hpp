// lamina-net: the device-API paths of `lamina-net bench latency --path device`
// and `lamina-net bench rate`. In C++ so the measurement contains no Python.
//
// Both issue their operations through lamina::DeviceChannel (the functions of
// lamina_net/device.cuh, compiled for the host: CPU threads are the
// producers), so every operation goes through the descriptor ring and a
// DeviceProxy thread that executes it on the channel - the same back end a
// kernel's puts take.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "channels/endpoint.hpp"
#include "channels/pingpong.hpp"
#include "proxy/device_proxy.hpp"

namespace lamina {

// PingPongConfig's rounds (its `op` is always "put" here), plus the proxy's.
struct DevicePingPongConfig : PingPongConfig {
  uint64_t ring_slots = 1024;
  int64_t spin_us = -1;    // the proxy's spin before it parks; < 0: LAMINA_NET_PROXY_SPIN_US
};

// What the proxy did during a run (for the records).
struct DeviceRunInfo {
  std::string device_path;  // DeviceProxy::device_path(): "proxy"
  DeviceProxyStats stats;
};

// The ping-pong of run_pingpong's "put" op through the device API: each
// round is DeviceChannel::put_signal into the peer's `buffer` with an add on
// its `signal`, and DeviceChannel::wait on the local signal word. A
// DeviceProxy on `channel` has local windows [buffer, signal, source] (source:
// private registered memory the puts are sent from, as run_pingpong does)
// and remote windows [remote_buffer, remote_signal]; it is flushed and closed
// before returning. Returns one round-trip time in ns per measured iteration
// (the initiator's; the responder's vector is empty), timed with the cycle
// counter scaled by the clock over the run, as run_pingpong does.
std::vector<double> run_device_pingpong(Endpoint& endpoint, const std::shared_ptr<Channel>& channel,
                                        const DevicePingPongConfig& config, const std::shared_ptr<Region>& buffer,
                                        const std::shared_ptr<Region>& signal, const RegionDescriptor& remote_buffer,
                                        const RegionDescriptor& remote_signal, DeviceRunInfo* info);

struct PutRateConfig {
  int producers = 1;       // device path: CPU threads posting through one DeviceChannel
  uint64_t size = 8;
  uint64_t ops = 1000000;  // in all, split evenly among the producers
  double timeout_s = 30;
  uint64_t ring_slots = 1024;
  int64_t spin_us = -1;
};

struct PutRateResult {
  uint64_t ops = 0;
  double seconds = 0;  // from the first post to the return of the flush after the last
  DeviceRunInfo info;  // device path only
};

// Small puts (no signal) of config.size bytes into `remote` (offsets cycling
// through it), then one flush, through a DeviceChannel (one proxy thread)
// from config.producers threads. The last producer to finish flushes.
PutRateResult run_device_put_rate(Endpoint& endpoint, const std::shared_ptr<Channel>& channel,
                                  const PutRateConfig& config, const RegionDescriptor& remote);

// The host API's reference: the same puts with Channel::put from the calling
// thread, then Channel::flush.
PutRateResult run_host_put_rate(Endpoint& endpoint, Channel& channel, const PutRateConfig& config,
                                const RegionDescriptor& remote);

}  // namespace lamina
