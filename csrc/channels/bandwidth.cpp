#include "channels/bandwidth.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "channels/pingpong.hpp"
#include "common/error.hpp"

namespace lamina {

namespace {

// splitmix64: neighbouring words differ in every byte, so a copy that lands
// shifted by any amount, or stops short, does not match by chance.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t stamp_bytes(uint64_t size) { return std::min<uint64_t>(8, size); }

void write_stamp(char* data, uint64_t size, uint64_t stamp) {
  const uint64_t n = stamp_bytes(size);
  std::memcpy(data + size - n, &stamp, n);  // little-endian hosts: the low bytes
}

// The receiver's verdict, sent back to the sender.
struct Verdict {
  uint64_t signals_seen;
  int64_t first_bad;
  uint64_t verified;
};

}  // namespace

void fill_bandwidth_pattern(char* data, uint64_t size, uint64_t stamp) {
  for (uint64_t i = 0; i < size; i += 8) {
    const uint64_t word = mix(i / 8 + size * 0x100000001b3ull);
    std::memcpy(data + i, &word, std::min<uint64_t>(8, size - i));
  }
  write_stamp(data, size, stamp);
}

int64_t check_bandwidth_pattern(const char* data, uint64_t size, uint64_t stamp) {
  std::vector<char> want(size);
  fill_bandwidth_pattern(want.data(), size, stamp);
  const auto diff = std::mismatch(want.begin(), want.end(), data);
  return diff.first == want.end() ? -1 : static_cast<int64_t>(diff.first - want.begin());
}

BandwidthResult run_bandwidth(Endpoint& endpoint, Channel& channel, const BandwidthConfig& config, Region& buffer,
                              Region& signal, const RegionDescriptor& remote_buffer,
                              const RegionDescriptor& remote_signal) {
  if (config.size == 0) throw_usage("bandwidth: size must be > 0");
  if (config.window <= 0 || config.iterations <= 0 || config.warmup < 0) {
    throw_usage("bandwidth: needs window > 0, iterations > 0 and warmup >= 0");
  }
  if (config.size > buffer.size || config.size > remote_buffer.size) {
    throw_usage("bandwidth: size exceeds the receive buffer");
  }
  if (signal.size < 8 || remote_signal.size < 8) throw_usage("bandwidth: the signal regions need 8 bytes");
  if (!config.sender && buffer.kind != MemoryKind::kHost) {
    throw_usage("bandwidth: the receive buffer must be host memory (the receiver checks its bytes)");
  }
  const int total = config.warmup + config.iterations;
  BandwidthResult result;
  result.puts = static_cast<uint64_t>(config.window) * static_cast<uint64_t>(config.iterations);
  result.bytes = result.puts * config.size;

  if (config.sender) {
    PingPongSource source(endpoint, config.size);  // registered: verbs writes it zero-copy
    fill_bandwidth_pattern(source.data(), config.size, 0);
    RemoteWord sig{remote_signal, 0, 1};
    std::vector<OpRef> ops(static_cast<size_t>(config.window));
    uint64_t start_ns = now_ns();
    for (int w = 0; w < total; ++w) {
      if (w == config.warmup) start_ns = now_ns();
      // The previous window has completed, so the source may change.
      write_stamp(source.data(), config.size, static_cast<uint64_t>(w) + 1);
      for (int k = 0; k < config.window; ++k) {
        const bool last = k == config.window - 1;
        ops[k] = channel.put(source.data(), config.size, remote_buffer, 0, last ? &sig : nullptr, true,
                             config.timeout_s);
      }
      for (const OpRef& op : ops) {
        if (op) channel.wait(op, config.timeout_s, "bandwidth window put");
      }
    }
    result.seconds = static_cast<double>(now_ns() - start_ns) / 1e9;
    Verdict verdict{};
    OpRef got = channel.recv(&verdict, sizeof(verdict));
    channel.wait(got, config.timeout_s, "bandwidth verdict from the receiver");
    if (got->value() != sizeof(verdict)) throw_system("bandwidth: the receiver's verdict has the wrong length");
    result.signals_seen = verdict.signals_seen;
    result.first_bad = verdict.first_bad;
    result.verified = verdict.verified != 0;
    return result;
  }

  for (int w = 0; w < total; ++w) {
    endpoint.wait_signal(signal, 0, config.signal_base + static_cast<uint64_t>(w) + 1, config.timeout_s, &channel);
  }
  const uint64_t seen = __atomic_load_n(static_cast<const uint64_t*>(signal.base), __ATOMIC_ACQUIRE);
  result.signals_seen = seen - config.signal_base;
  result.first_bad = check_bandwidth_pattern(static_cast<const char*>(buffer.base), config.size,
                                             static_cast<uint64_t>(total));
  result.verified = result.first_bad < 0 && result.signals_seen == static_cast<uint64_t>(total);
  Verdict verdict{result.signals_seen, result.first_bad, result.verified ? 1u : 0u};
  OpRef sent = channel.send(&verdict, sizeof(verdict), config.timeout_s);
  if (sent) channel.wait(sent, config.timeout_s, "bandwidth verdict to the sender");
  return result;
}

}  // namespace lamina
