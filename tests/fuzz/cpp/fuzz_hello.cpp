// libFuzzer target: the 128-byte hello an unauthenticated tcp client sends
// first (csrc/transports/wire.hpp). Arbitrary bytes must be refused with a
// reason unless they carry the group's secret and a valid rank; an accepted
// hello's channel key is a terminated string that fits its field.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "transports/wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lamina;
  if (size < sizeof(HelloFrame)) return -1;  // a short read never reaches the check
  HelloFrame hello;
  std::memcpy(&hello, data, sizeof(hello));
  const HelloExpectation expect{0x1122334455667788ull, 0x99aabbccddeeff00ull, 0, 4};
  const std::string why = hello_problem(hello, expect);
  if (why.empty()) {
    // Accepted: then every field the acceptor goes on to use is in range.
    if (hello.magic != HelloFrame::kMagic || hello.rank <= 0 || hello.rank >= 4) std::abort();
    if (hello.secret_hi != expect.secret_hi || hello.secret_lo != expect.secret_lo) std::abort();
    if (std::strlen(hello.channel_key) >= sizeof(hello.channel_key)) std::abort();
  }
  return 0;
}
