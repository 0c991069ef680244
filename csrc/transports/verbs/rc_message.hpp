// lamina-net verbs: what the two halves of RcConnection share about its
// messages (rc_connection.cpp: connect, progress, receive, close;
// rc_connection_post.cpp: posting). Private to the verbs transport.
#pragma once

#include <cstdint>

namespace lamina::verbs {

inline constexpr uint32_t kMessageMagic = 0x4c4e4d53;  // "LNMS"

// First fragment of every message.
struct MessageHeader {
  uint32_t magic;
  uint32_t reserved;
  uint64_t length;
};
static_assert(sizeof(MessageHeader) == 16);

// The name of a work request kind (RcConnection::WrKind), for error messages.
inline const char* kind_name(int kind) {
  static const char* const names[] = {"RDMA WRITE", "signal (ATOMIC FETCH_AND_ADD)", "ATOMIC FETCH_AND_ADD",
                                      "SEND", "credit update (RDMA WRITE)", "flush (zero-length RDMA WRITE)",
                                      "keepalive probe (zero-length RDMA WRITE)", "close notice (RDMA WRITE)"};
  return kind >= 0 && kind < 8 ? names[kind] : "work request";
}

}  // namespace lamina::verbs
