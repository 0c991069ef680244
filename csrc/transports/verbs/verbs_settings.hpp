// lamina-net verbs: the LAMINA_NET_IB_* settings this transport reads.
//
//   IB_DEVICE      device name (default: first device with an active port)
//   IB_PORT        port number (0 or unset: first active port)
//   IB_GID_INDEX   GID index (-1 or unset: RoCE v2 + IPv4-mapped, then any RoCE v2)
//   MAX_UNEXPECTED_BYTES  received message bytes buffered before a recv is posted
//   IB_TIMEOUT     local ACK timeout exponent, 4.096us * 2^N (default 14, ~67 ms)
//   IB_RETRY_CNT   transport retries before a WR fails (default 6; rxe retries forever at 7)
//   IB_QUEUE_DEPTH send queue depth per connection (default 256)
//   IB_RECV_DEPTH  pre-posted receive buffers per connection (default 32)
//   IB_CHUNK_SIZE  bytes per bounce buffer / message fragment (default 32768)
//   IB_KEEPALIVE_MS idle probe period while receives wait, 0 = off (default 1000)
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.hpp"
#include "common/settings.hpp"

namespace lamina::verbs {

// Every IB_* name is registered in csrc/common/settings.cpp (so `lamina-net
// info` lists it); an unregistered name still falls back to the environment.
inline std::string ib_setting_string(const char* name) {
  try {
    return setting_string(name);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kUsage) throw;
  }
  const char* value = std::getenv((std::string("LAMINA_NET_") + name).c_str());
  return value != nullptr ? std::string(value) : std::string();
}

// The integer value, `fallback` when unset or empty; kUsage outside [min, max].
inline int64_t ib_setting_int(const char* name, int64_t fallback, int64_t min_value, int64_t max_value) {
  const std::string text = ib_setting_string(name);
  if (text.empty()) return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 0);
  if (end == text.c_str() || *end != '\0' || value < min_value || value > max_value) {
    throw_usage("LAMINA_NET_" + std::string(name) + "=" + text + ": expected an integer in [" +
                std::to_string(min_value) + ", " + std::to_string(max_value) + "]");
  }
  return value;
}

}  // namespace lamina::verbs
