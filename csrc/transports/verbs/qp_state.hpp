// lamina-net verbs: the RC queue-pair state machine (RESET -> INIT -> RTR ->
// RTS) shared by the transport's connections (rc_connection) and the device
// API's direct queue pairs (rxe_direct), so both connect the same way.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <string>

#include "transports/verbs/verbs_device.hpp"

namespace lamina::verbs {

// What a peer needs to address one of our queue pairs.
struct QpAddress {
  uint32_t qpn = 0;
  uint32_t psn = 0;
  uint16_t lid = 0;
  uint8_t mtu = 0;         // enum ibv_mtu
  uint8_t link_layer = 0;  // IBV_LINK_LAYER_*
  ibv_gid gid{};
};

// Acknowledgement timer and retries of the requester side.
struct QpTimers {
  uint8_t ack_timeout = 14;  // 4.096 us x 2^ack_timeout
  uint8_t retry_count = 6;   // not 7: rxe treats 7 as "retry forever"
};

// A random 24-bit packet sequence number.
uint32_t random_psn();

// The address of `qp` on `device`, starting at `psn`.
QpAddress local_qp_address(const VerbsDevice& device, const ibv_qp& qp, uint32_t psn);

// RESET -> INIT with local write, remote write, read and atomic access.
// Throws kSystem naming the step.
void move_qp_to_init(const VerbsDevice& device, ibv_qp* qp);

// INIT -> RTR -> RTS towards `peer`. `who` prefixes every error message
// ("verbs: connecting to rank 3: "). Throws kSystem naming the failed step.
void move_qp_to_rts(const VerbsDevice& device, ibv_qp* qp, const QpAddress& peer, uint32_t local_psn,
                    const QpTimers& timers, const std::string& who);

}  // namespace lamina::verbs
