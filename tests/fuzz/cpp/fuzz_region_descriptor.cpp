// libFuzzer target: the 80-byte region descriptor a peer publishes in the store
// and a user passes back to put (csrc/memory/region.hpp). Deserializing any
// bytes either refuses with a typed error or yields a descriptor whose wire
// form is exactly the input (nothing is read or written past the blob).
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.hpp"
#include "memory/region.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lamina;
  const std::string blob(reinterpret_cast<const char*>(data), size);
  RegionDescriptor d;
  try {
    d = RegionDescriptor::deserialize(blob);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kUsage) std::abort();  // malformed input is the caller's mistake
    return 0;
  }
  if (d.serialize() != blob) std::abort();
  return 0;
}
