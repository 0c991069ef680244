#include "common/settings.hpp"

#include <sched.h>

#include <cstdlib>

#include "common/error.hpp"

namespace lamina {

const std::vector<SettingInfo>& all_settings() {
  static const std::vector<SettingInfo> settings = {
      {"TIMEOUT", "60", "default bound in seconds for every blocking call"},
      {"CONNECT_TIMEOUT", "60", "bound in seconds for connecting a channel"},
      {"LOG", "warn", "log level: error, warn, info, debug"},
      {"STORE", "", "host:port of the standalone store when none is passed"},
      {"TCP_HOST", "", "address the tcp transport listens on and advertises (default: hostname's address, else 127.0.0.1)"},
      {"TCP_BUFFER", "4194304", "SO_SNDBUF/SO_RCVBUF bytes of tcp connections"},
      {"SHM_RING_BYTES", "4194304", "bytes of each direction's shared-memory ring"},
      {"SHM_DIRECT_MIN", "0", "puts of at least this many bytes into a peer's shared allocation (Endpoint.alloc) are one memcpy straight into its memory, and signals/atomics there one atomic add (-1: never)"},
      {"SHM_SINGLE_COPY_MIN", "32768", "puts of at least this many bytes go straight into the peer's memory (process_vm_writev) instead of through the ring"},
      {"SPIN_US", "auto", "microseconds a waiting thread spins before it sleeps (auto: 100, or 0 when LOCAL_WORLD_SIZE says this host runs more ranks than this process has CPUs)"},
      {"PROXY_SPIN_US", "200", "microseconds the device proxy spins on an empty ring of CPU producers before it sleeps until the next doorbell (rings of GPU producers never sleep)"},
      {"DEVICE_RING_SLOTS", "1024", "descriptor slots of a device channel's ring (a power of two)"},
      {"MAX_UNEXPECTED_BYTES", "67108864", "bytes of received messages buffered per channel before a matching recv is posted; beyond it the sender is back-pressured"},
      {"IB_DEVICE", "", "verbs device name (default: first with an active port)"},
      {"IB_PORT", "0", "verbs port number (0: first active)"},
      {"IB_GID_INDEX", "-1", "verbs GID index (-1: first RoCE v2 GID with an IPv4-mapped address, else first RoCE v2)"},
      {"IB_QUEUE_DEPTH", "256", "verbs send queue depth per channel"},
      {"IB_RECV_DEPTH", "32", "verbs pre-posted receive buffers per channel (the peer's send credits)"},
      {"IB_CHUNK_SIZE", "32768", "verbs bounce-buffer/fragment bytes"},
      {"IB_STAGE_MAX", "4096", "verbs puts from registered memory above this many bytes (and above the inline limit) are zero-copy; smaller ones are copied into staging slots (at most IB_CHUNK_SIZE)"},
      {"IB_MAX_INLINE", "512", "verbs inline bytes asked for at QP creation; host puts up to what the device grants are copied into the work request (falls back to 220, 64, 0)"},
      {"IB_TIMEOUT", "14", "verbs local ACK timeout exponent (4.096 us * 2^n)"},
      {"IB_RETRY_CNT", "6", "verbs transport retries before a work request fails (rxe retries forever at 7)"},
      {"IB_KEEPALIVE_MS", "1000", "verbs idle keepalive period, to notice a dead peer (0: off)"},
  };
  return settings;
}

static const SettingInfo& find_setting(const std::string& name) {
  for (const auto& s : all_settings()) {
    if (s.name == name) return s;
  }
  throw_usage("unregistered setting LAMINA_NET_" + name);
}

std::string setting_string(const std::string& name) {
  const SettingInfo& info = find_setting(name);
  const char* v = std::getenv(("LAMINA_NET_" + name).c_str());
  return v && *v ? std::string(v) : info.default_value;
}

int64_t setting_int(const std::string& name) {
  std::string v = setting_string(name);
  try {
    size_t used = 0;
    int64_t x = std::stoll(v, &used, 0);
    if (used != v.size()) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    throw_usage("LAMINA_NET_" + name + "='" + v + "' is not an integer");
  }
}

double setting_double(const std::string& name) {
  std::string v = setting_string(name);
  try {
    size_t used = 0;
    double x = std::stod(v, &used);
    if (used != v.size()) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    throw_usage("LAMINA_NET_" + name + "='" + v + "' is not a number");
  }
}

uint64_t spin_window_us() {
  const std::string v = setting_string("SPIN_US");
  if (v != "auto") {
    const int64_t us = setting_int("SPIN_US");
    if (us < 0) throw_usage("LAMINA_NET_SPIN_US='" + v + "' must be >= 0 or auto");
    return static_cast<uint64_t>(us);
  }
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  long ranks = local && *local ? std::strtol(local, nullptr, 10) : 0;
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const int usable = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 0;
  return ranks > 0 && usable > 0 && ranks > usable ? 0 : 100;
}

}  // namespace lamina
