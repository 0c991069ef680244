// lamina-net: the windowed put stream behind `lamina-net bench bandwidth`.
// In C++ so the measurement contains no Python.
//
// The method is perftest's ib_write_bw: the sender keeps a window of W puts
// outstanding (iputs: each may keep reading the source until it completes),
// the last put of each window carries a signal, and the sender waits until
// the whole window is applied at the target before the next one. Every put
// goes to offset 0 of the receiver's buffer, as ib_write_bw writes one remote
// buffer for messages above a page and as the memcpy reference copies into
// one destination.
//
// Integrity: the source holds a pattern that depends on the size, and its
// last word (up to 8 bytes) the number of the window. When the last signal
// has arrived the receiver compares its buffer with what the last window
// wrote, and sends the sender the verdict (a 16-byte message), so a
// cross-host run reports it too.
#pragma once

#include <cstdint>

#include "channels/endpoint.hpp"

namespace lamina {

struct BandwidthConfig {
  uint64_t size = 1 << 20;  // bytes per put
  int window = 64;          // puts outstanding before the sender waits
  int iterations = 16;      // measured windows
  int warmup = 2;           // unmeasured windows first
  bool sender = true;
  double timeout_s = 30;    // bound of each wait
  // Value of the receiver's signal word before this run's first put; read
  // before synchronizing with the peer (see PingPongConfig::signal_base).
  uint64_t signal_base = 0;
};

struct BandwidthResult {
  double seconds = 0;        // sender: first measured put to the last window applied
  uint64_t bytes = 0;        // measured bytes (size x window x iterations)
  uint64_t puts = 0;         // measured puts
  bool verified = false;     // the receiver found the last window's bytes intact
  int64_t first_bad = -1;    // else the first offset that differed (-1: none, or the signal count was wrong)
  uint64_t signals_seen = 0; // windows the receiver counted
};

// The bytes window `stamp` puts: a pattern of `size` (64-bit mixed words,
// so a shifted or partial copy shows), its last min(8, size) bytes the
// stamp, little-endian.
void fill_bandwidth_pattern(char* data, uint64_t size, uint64_t stamp);
// First offset of data[0, size) that differs from fill_bandwidth_pattern's
// bytes, or -1 when all match.
int64_t check_bandwidth_pattern(const char* data, uint64_t size, uint64_t stamp);

// Regions: `buffer` (>= size bytes, host memory) receives the puts on the
// receiver; `signal` (>= 8 bytes) counts windows. remote_* are the peer's.
// Both ranks call it with the same size, window, iterations and warmup.
BandwidthResult run_bandwidth(Endpoint& endpoint, Channel& channel, const BandwidthConfig& config, Region& buffer,
                              Region& signal, const RegionDescriptor& remote_buffer,
                              const RegionDescriptor& remote_signal);

}  // namespace lamina
