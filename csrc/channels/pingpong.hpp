// lamina-net: the ping-pong timing loop behind `lamina-net bench latency`.
// In C++ so the measurement contains no Python.
#pragma once

#include <memory>
#include <vector>

#include "channels/endpoint.hpp"

namespace lamina {

struct PingPongConfig {
  // "put": put+signal into the peer; "send": send/recv; "write": a plain put
  // whose last word carries the round number, waited on by the peer (the way
  // ib_write_lat detects arrival; needs size % 8 == 0 and the peer's buffer
  // word at size - 8 zeroed before the run).
  std::string op = "put";
  uint64_t size = 8;
  int iterations = 1000;
  int warmup = 100;
  bool initiator = true;   // rank that starts each round
  double timeout_s = 30;
  // Value of the local signal word before the peer's first put of this run.
  // Read it before synchronizing with the peer: the peer's first put may
  // arrive before this rank enters run_pingpong.
  uint64_t signal_base = 0;
};

// Private registered memory a ping-pong sends from, as the C references do
// (sending from the buffer the peer writes into would add cache-line traffic
// that is not the transport's); registered, so that transports that need it
// (verbs) send it zero-copy. Deregistered when it goes out of scope.
class PingPongSource {
 public:
  PingPongSource(Endpoint& endpoint, uint64_t size);
  ~PingPongSource();
  PingPongSource(const PingPongSource&) = delete;
  PingPongSource& operator=(const PingPongSource&) = delete;
  char* data() { return bytes_.data(); }
  const std::shared_ptr<Region>& region() const { return region_; }

 private:
  Endpoint& endpoint_;
  std::vector<char> bytes_;
  std::shared_ptr<Region> region_;
};

// Runs warmup + iterations rounds: the initiator calls send(i) then
// receive(i) and times each measured round, the responder receive(i) then
// send(i). Rounds are timed in CPU cycles where there is a cycle counter (as
// perftest does), scaled to ns by the clock over the whole run: on VMs whose
// clock is an emulated device, two clock reads per round would add to what
// is measured. Returns the initiator's round trips in ns (empty otherwise).
template <typename Send, typename Receive>
std::vector<double> time_rounds(int warmup, int iterations, bool initiator, Send send, Receive receive) {
  std::vector<double> times;
  times.reserve(static_cast<size_t>(iterations));
  const int total = warmup + iterations;
  const uint64_t run_start_ns = now_ns();
  const uint64_t run_start_ticks = cycle_counter();
  for (int i = 0; i < total; ++i) {
    if (initiator) {
      const uint64_t t0 = cycle_counter();
      send(i);
      receive(i);
      if (i >= warmup) times.push_back(static_cast<double>(cycle_counter() - t0));
    } else {
      receive(i);
      send(i);
    }
  }
  const uint64_t run_ticks = cycle_counter() - run_start_ticks;
  const double ns_per_tick = run_ticks > 0 ? static_cast<double>(now_ns() - run_start_ns) / run_ticks : 1.0;
  for (double& t : times) t *= ns_per_tick;
  return times;
}

// Regions: `buffer` (>= size bytes) receives the peer's payload; `signal`
// (>= 8 bytes) counts arrivals. remote_* are the peer's equivalents.
// Returns one round-trip time in nanoseconds per measured iteration
// (the initiator's view; the responder returns an empty vector).
std::vector<double> run_pingpong(Endpoint& endpoint, Channel& channel, const PingPongConfig& config,
                                 Region& buffer, Region& signal, const RegionDescriptor& remote_buffer,
                                 const RegionDescriptor& remote_signal);

}  // namespace lamina
