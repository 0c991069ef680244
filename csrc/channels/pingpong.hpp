// lamina-net: the ping-pong timing loop behind `lamina-net bench latency`.
// In C++ so the measurement contains no Python.
#pragma once

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

// Regions: `buffer` (>= size bytes) receives the peer's payload; `signal`
// (>= 8 bytes) counts arrivals. remote_* are the peer's equivalents.
// Returns one round-trip time in nanoseconds per measured iteration
// (the initiator's view; the responder returns an empty vector).
std::vector<double> run_pingpong(Endpoint& endpoint, Channel& channel, const PingPongConfig& config,
                                 Region& buffer, Region& signal, const RegionDescriptor& remote_buffer,
                                 const RegionDescriptor& remote_signal);

}  // namespace lamina
