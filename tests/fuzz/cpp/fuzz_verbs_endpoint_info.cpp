// libFuzzer target: the queue-pair record a verbs peer publishes in the store
// (RcEndpointInfo, csrc/transports/verbs/rc_connection.hpp). Any bytes are
// refused with kSystem or parsed into a record that serializes back the same.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.hpp"
#include "transports/verbs/rc_connection.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lamina;
  using verbs::RcEndpointInfo;
  const std::string blob(reinterpret_cast<const char*>(data), size);
  RcEndpointInfo info;
  try {
    info = RcEndpointInfo::deserialize(blob, 1);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kSystem) std::abort();
    return 0;
  }
  if (RcEndpointInfo::deserialize(info.serialize(), 1).serialize() != info.serialize()) std::abort();
  return 0;
}
