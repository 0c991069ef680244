#include "transports/verbs/qp_state.hpp"

#include <algorithm>
#include <random>

#include "common/error.hpp"

namespace lamina::verbs {

namespace {
// Outstanding RDMA reads / atomics per QP, capped by what the device grants.
constexpr uint32_t kMaxRdAtomic = 16;
}  // namespace

uint32_t random_psn() {
  std::random_device device;
  return device() & 0xffffff;
}

QpAddress local_qp_address(const VerbsDevice& device, const ibv_qp& qp, uint32_t psn) {
  QpAddress a;
  a.qpn = qp.qp_num;
  a.psn = psn;
  a.lid = device.port_attr().lid;
  a.mtu = static_cast<uint8_t>(device.port_attr().active_mtu);
  a.link_layer = device.port_attr().link_layer;
  a.gid = device.gid();
  return a;
}

void move_qp_to_init(const VerbsDevice& device, ibv_qp* qp) {
  ibv_qp_attr to_init{};
  to_init.qp_state = IBV_QPS_INIT;
  to_init.pkey_index = 0;
  to_init.port_num = device.port();
  to_init.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                            IBV_ACCESS_REMOTE_ATOMIC;
  const int rc =
      device.api().modify_qp(qp, &to_init, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
  if (rc != 0) throw_system(errno_message("verbs: QP RESET->INIT failed", rc));
}

void move_qp_to_rts(const VerbsDevice& device, ibv_qp* qp, const QpAddress& peer, uint32_t local_psn,
                    const QpTimers& timers, const std::string& who) {
  const IbverbsApi& api = device.api();
  const ibv_device_attr& dev = device.device_attr();
  if (peer.link_layer != device.port_attr().link_layer) {
    throw_system(who + "link layers differ (peer " + std::to_string(peer.link_layer) + ", local " +
                 std::to_string(device.port_attr().link_layer) + ")");
  }
  ibv_qp_attr rtr{};
  rtr.qp_state = IBV_QPS_RTR;
  rtr.path_mtu = static_cast<ibv_mtu>(std::min<int>(peer.mtu, device.port_attr().active_mtu));
  rtr.dest_qp_num = peer.qpn;
  rtr.rq_psn = peer.psn;
  rtr.max_dest_rd_atomic = static_cast<uint8_t>(std::min<uint32_t>(dev.max_qp_rd_atom, kMaxRdAtomic));
  rtr.min_rnr_timer = 12;  // 0.64 ms
  rtr.ah_attr.port_num = device.port();
  rtr.ah_attr.dlid = peer.lid;
  rtr.ah_attr.sl = 0;
  // RoCE addresses by GID (GRH always present); InfiniBand routes by LID.
  if (device.is_ethernet() || peer.lid == 0) {
    rtr.ah_attr.is_global = 1;
    rtr.ah_attr.grh.dgid = peer.gid;
    rtr.ah_attr.grh.sgid_index = static_cast<uint8_t>(device.gid_index());
    rtr.ah_attr.grh.hop_limit = 64;
  }
  int rc = api.modify_qp(qp, &rtr,
                         IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                             IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
  if (rc != 0) {
    throw_system(errno_message(who + "QP INIT->RTR failed (peer qpn " + std::to_string(peer.qpn) + ", gid " +
                                   gid_to_string(peer.gid) + ", local " + device.description() + ")",
                               rc));
  }
  ibv_qp_attr rts{};
  rts.qp_state = IBV_QPS_RTS;
  rts.timeout = timers.ack_timeout;
  rts.retry_cnt = timers.retry_count;
  rts.rnr_retry = 7;  // unlimited; RNR is only transient for our receivers
  rts.sq_psn = local_psn;
  rts.max_rd_atomic = static_cast<uint8_t>(std::min<uint32_t>(dev.max_qp_init_rd_atom, kMaxRdAtomic));
  rc = api.modify_qp(qp, &rts,
                     IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                         IBV_QP_MAX_QP_RD_ATOMIC);
  if (rc != 0) throw_system(errno_message(who + "QP RTR->RTS failed", rc));
}

}  // namespace lamina::verbs
