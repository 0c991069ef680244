#include "channels/pingpong.hpp"

#include <cstring>

#include "common/error.hpp"

namespace lamina {

std::vector<double> run_pingpong(Endpoint& endpoint, Channel& channel, const PingPongConfig& config,
                                 Region& buffer, Region& signal, const RegionDescriptor& remote_buffer,
                                 const RegionDescriptor& remote_signal) {
  if (config.size > buffer.size) throw_usage("ping-pong size exceeds the buffer");
  if (config.iterations <= 0 || config.warmup < 0) throw_usage("ping-pong needs iterations > 0 and warmup >= 0");
  if (config.op != "put" && config.op != "send" && config.op != "write") {
    throw_usage("ping-pong op must be 'put', 'write' or 'send'");
  }
  if (config.op == "write" && (config.size < 8 || config.size % 8 != 0)) {
    throw_usage("ping-pong op 'write' needs a size that is a multiple of 8 bytes (its last word carries the round)");
  }
  const uint64_t base = config.signal_base;
  RemoteWord sig{remote_signal, 0, 1};
  const bool use_put = config.op == "put";
  // "write": a plain put (one RDMA WRITE on verbs) whose last word carries
  // the round number, and the peer waits for that word - how ib_write_lat
  // detects arrival. A measurement method for the bare write path only: the
  // API's arrival guarantee is put-with-signal (placement order inside one
  // write is not guaranteed by RDMA).
  const bool use_write = config.op == "write";
  const uint64_t last_word = config.size - 8;
  PingPongSource source(endpoint, config.size);

  auto send_one = [&](int i) {
    if (use_write) {
      const uint64_t round = static_cast<uint64_t>(i) + 1;
      std::memcpy(source.data() + last_word, &round, sizeof(round));
      channel.put(source.data(), config.size, remote_buffer, 0, nullptr, false, config.timeout_s);
    } else if (use_put) {
      channel.put(source.data(), config.size, remote_buffer, 0, &sig, false, config.timeout_s);
    } else {
      channel.send(source.data(), config.size, config.timeout_s);
    }
  };
  auto receive_one = [&](int i) {
    if (use_write) {
      endpoint.wait_signal(buffer, last_word, static_cast<uint64_t>(i) + 1, config.timeout_s, &channel);
    } else if (use_put) {
      endpoint.wait_signal(signal, 0, base + static_cast<uint64_t>(i) + 1, config.timeout_s, &channel);
    } else {
      OpRef op = channel.recv(buffer.base, buffer.size);
      channel.wait(op, config.timeout_s, "ping-pong recv");
    }
  };

  return time_rounds(config.warmup, config.iterations, config.initiator, send_one, receive_one);
}

PingPongSource::PingPongSource(Endpoint& endpoint, uint64_t size) : endpoint_(endpoint), bytes_(size, 1) {
  region_ = endpoint_.register_memory(bytes_.data(), bytes_.size(), kAccessLocal, MemoryKind::kHost, -1);
}

PingPongSource::~PingPongSource() {
  const uint64_t id = region_->id;
  region_.reset();
  try {
    endpoint_.deregister(id, 5.0);
  } catch (...) {  // never throw from a destructor; the endpoint cleans up at close
  }
}

}  // namespace lamina
