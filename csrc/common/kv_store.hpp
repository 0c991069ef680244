// lamina-net: the key-value store interface that bootstrap hands to transports.
//
// Implemented by the bootstrap layer (a torch.distributed Store, or the
// standalone lamina-net store). Transports use it only while connecting, to
// publish and fetch connection info. Values are opaque bytes.
#pragma once

#include <string>

#include "common/clock.hpp"

namespace lamina {

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  virtual void set(const std::string& key, const std::string& value) = 0;
  // Blocks until the key exists; throws kTimeout naming the key at the deadline.
  virtual std::string get(const std::string& key, Deadline deadline) = 0;
};

}  // namespace lamina
