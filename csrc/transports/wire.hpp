// lamina-net: the frame format shared by the byte-stream transports (tcp, shm).
//
// Every operation is one 72-byte little-endian header, followed by `length`
// payload bytes for PUT and SEND. The target's progress engine validates every
// header (magic, type, lengths, region id, bounds, rights) before it touches
// memory; a frame that fails validation fails the connection.
#pragma once

#include <cstdint>
#include <string>

namespace lamina {

enum class FrameType : uint8_t {
  kPut = 1,          // payload -> region[offset, +length); optional signal
  kPutPull = 2,      // shm: target copies `length` bytes from the sender's
                     // address `value` (process_vm_readv), then acks
  kAtomicAdd = 3,    // region[offset] += value (u64); reply kAtomicResult
  kSend = 4,         // two-sided message of `length` bytes
  kFlush = 5,        // reply kAck(seq) once every earlier frame is applied
  kAck = 6,          // every frame with seq <= value is applied
  kAtomicResult = 7, // frame `seq` applied; value = previous word
  kClose = 8,        // orderly goodbye
};

enum FrameFlags : uint8_t {
  kFlagSignal = 1u << 0,      // PUT: then sig_region[sig_offset] += sig_add
  kFlagAckRequest = 1u << 1,  // PUT: reply kAck(seq) once applied
};

struct FrameHeader {
  static constexpr uint16_t kMagic = 0x4c4e;  // "LN"
  uint16_t magic = kMagic;
  uint8_t type = 0;
  uint8_t flags = 0;
  uint32_t reserved = 0;
  uint64_t seq = 0;
  uint64_t region_id = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t value = 0;
  uint64_t sig_region = 0;
  uint64_t sig_offset = 0;
  uint64_t sig_add = 0;
};
static_assert(sizeof(FrameHeader) == 72, "frame header is 72 bytes on the wire");

// Connection handshake sent first on a tcp connection, checked by the acceptor.
struct HelloFrame {
  static constexpr uint64_t kMagic = 0x4c414d494e41312eull;  // "LAMINA1."
  uint64_t magic = kMagic;
  uint32_t version = 1;
  int32_t rank = -1;
  uint64_t secret_hi = 0;
  uint64_t secret_lo = 0;
  char channel_key[96] = {};  // which channel this connection is for
};
static_assert(sizeof(HelloFrame) == 128, "hello frame is 128 bytes on the wire");

// What a hello must carry to be accepted: the group's secret, and a rank of
// the group other than our own.
struct HelloExpectation {
  uint64_t secret_hi = 0, secret_lo = 0;
  int self_rank = 0;
  int world_size = 0;
};
// Empty when `hello` (raw bytes from an unauthenticated socket) is acceptable,
// else the reason it is refused. Checks magic, version, secret (in constant
// time), rank and a NUL-terminated channel key.
std::string hello_problem(const HelloFrame& hello, const HelloExpectation& expect);

const char* frame_type_name(uint8_t type);
// Constant-time comparison of the 128-bit secret.
bool secrets_equal(uint64_t a_hi, uint64_t a_lo, uint64_t b_hi, uint64_t b_lo);

}  // namespace lamina
