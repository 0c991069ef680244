#include "transports/wire.hpp"

namespace lamina {

const char* frame_type_name(uint8_t type) {
  switch (static_cast<FrameType>(type)) {
    case FrameType::kPut: return "PUT";
    case FrameType::kPutPull: return "PUT_PULL";
    case FrameType::kAtomicAdd: return "ATOMIC_ADD";
    case FrameType::kSend: return "SEND";
    case FrameType::kFlush: return "FLUSH";
    case FrameType::kAck: return "ACK";
    case FrameType::kAtomicResult: return "ATOMIC_RESULT";
    case FrameType::kClose: return "CLOSE";
  }
  return "UNKNOWN";
}

std::string hello_problem(const HelloFrame& hello, const HelloExpectation& expect) {
  if (hello.magic != HelloFrame::kMagic) return "not a lamina-net peer (bad hello magic)";
  if (hello.version != 1) return "unsupported protocol version " + std::to_string(hello.version);
  if (!secrets_equal(hello.secret_hi, hello.secret_lo, expect.secret_hi, expect.secret_lo)) {
    return "wrong group secret";
  }
  if (hello.rank < 0 || hello.rank >= expect.world_size || hello.rank == expect.self_rank) {
    return "invalid rank " + std::to_string(hello.rank);
  }
  if (hello.channel_key[sizeof(hello.channel_key) - 1] != '\0') return "unterminated channel key";
  return {};
}

bool secrets_equal(uint64_t a_hi, uint64_t a_lo, uint64_t b_hi, uint64_t b_lo) {
  // No early exit: the time does not depend on where the secrets differ.
  volatile uint64_t diff = (a_hi ^ b_hi) | (a_lo ^ b_lo);
  return diff == 0;
}

}  // namespace lamina
