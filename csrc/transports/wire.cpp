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

bool secrets_equal(uint64_t a_hi, uint64_t a_lo, uint64_t b_hi, uint64_t b_lo) {
  // No early exit: the time does not depend on where the secrets differ.
  volatile uint64_t diff = (a_hi ^ b_hi) | (a_lo ^ b_lo);
  return diff == 0;
}

}  // namespace lamina
