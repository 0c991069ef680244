#include "channels/pingpong.hpp"

#include "common/error.hpp"

namespace lamina {

std::vector<double> run_pingpong(Endpoint& endpoint, Channel& channel, const PingPongConfig& config,
                                 Region& buffer, Region& signal, const RegionDescriptor& remote_buffer,
                                 const RegionDescriptor& remote_signal) {
  if (config.size > buffer.size) throw_usage("ping-pong size exceeds the buffer");
  if (config.iterations <= 0 || config.warmup < 0) throw_usage("ping-pong needs iterations > 0 and warmup >= 0");
  if (config.op != "put" && config.op != "send") throw_usage("ping-pong op must be 'put' or 'send'");
  std::vector<double> times;
  times.reserve(static_cast<size_t>(config.iterations));
  const int total = config.warmup + config.iterations;
  const uint64_t base = config.signal_base;
  RemoteWord sig{remote_signal, 0, 1};
  const bool use_put = config.op == "put";
  // Send from private memory, as the C references do: sending from the buffer
  // the peer writes into would add cache-line traffic that is not the
  // transport's.
  std::vector<char> source(config.size, 1);
  // Registered, so that transports that need it (verbs) send it zero-copy.
  auto source_region = endpoint.register_memory(source.data(), source.size(), kAccessLocal, MemoryKind::kHost, -1);
  struct Deregister {
    Endpoint& endpoint;
    uint64_t id;
    ~Deregister() {
      try {
        endpoint.deregister(id, 5.0);
      } catch (...) {  // never throw from a destructor; the endpoint cleans up at close
      }
    }
  } deregister{endpoint, source_region->id};

  auto send_one = [&] {
    if (use_put) {
      channel.put(source.data(), config.size, remote_buffer, 0, &sig, false, config.timeout_s);
    } else {
      channel.send(source.data(), config.size, config.timeout_s);
    }
  };
  auto receive_one = [&](int i) {
    if (use_put) {
      endpoint.wait_signal(signal, 0, base + static_cast<uint64_t>(i) + 1, config.timeout_s, &channel);
    } else {
      OpRef op = channel.recv(buffer.base, buffer.size);
      channel.wait(op, config.timeout_s, "ping-pong recv");
    }
  };

  for (int i = 0; i < total; ++i) {
    if (config.initiator) {
      uint64_t t0 = now_ns();
      send_one();
      receive_one(i);
      if (i >= config.warmup) times.push_back(static_cast<double>(now_ns() - t0));
    } else {
      receive_one(i);
      send_one();
    }
  }
  return times;
}

}  // namespace lamina
