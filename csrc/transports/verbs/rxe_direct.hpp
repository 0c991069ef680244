// lamina-net verbs: a Soft-RoCE (rxe) queue pair whose send queue and
// completion queue the device API's direct back end (lamina_net/direct/rxe.cuh)
// writes and reads itself. The provider's post and poll paths never touch it.
//
// Where the rings are: rxe's provider maps the send queue and the CQ from the
// uverbs command file when it creates them and keeps the pointers in its
// private objects (rdma-core providers/rxe/rxe.h: rxe_qp holds, after the
// verbs_qp, the receive queue's mminfo and rxe_wq, then the send queue's;
// rxe_cq holds, after the verbs_cq, the CQ's mminfo and queue pointer). That
// layout is the same from rdma-core 34 through 64; the offset of the first
// field depends on the runtime's ibv_qp_ex, so it is found, not assumed: a
// candidate is taken only when the mminfo's size matches a mapping of
// /dev/infiniband/uverbs* that starts at the queue pointer, and the ring
// header's element size and mask fit that mapping and the queue's depth. Any
// mismatch throws kSystem naming the rdma-core version and the check.
//
// Doorbell: the direct code publishes the producer index; the kick is a
// POST_SEND command with no work requests written to the command file (the
// kernel then processes the send queue), made by DirectQueue::kick in CPU
// callers, or by this object's kick thread (RxeDirectConfig::host_kick). Its
// failure sets the queue's error word.
//
// Threads: create/connect from one thread; the handle is then used by any
// number of callers (see work_queue.cuh). The object outlives every caller.
#pragma once

#include <infiniband/verbs.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "lamina_net/direct/rxe.cuh"
#include "transports/verbs/qp_state.hpp"
#include "transports/verbs/verbs_device.hpp"

namespace lamina::verbs {

struct RxeDirectConfig {
  uint32_t depth = 256;       // send-queue requests in flight (the CQ is sized to match)
  uint32_t batch = 1;         // ring after this many ready requests
  uint32_t max_inline = 64;   // inline bytes asked of the QP
  uint64_t timeout_ns = 5'000'000'000ull;
  // CPU-assisted doorbell: the caller only publishes the producer index and a
  // host thread of this object makes the kick when `rung` moves (what a GPU
  // caller needs: it cannot make the system call). Off: the caller kicks.
  bool host_kick = false;
  QpTimers timers;
};

// Why a device cannot take direct rxe queues ("" when it can): not rxe, an
// rdma-core outside the pinned range. Cheap; creates nothing.
std::string rxe_direct_unavailable(const VerbsDevice& device);

// The installed rdma-core's version ("44.0"), from libibverbs' file name; "" when unknown.
std::string rdma_core_version();

class RxeDirectQueue {
 public:
  // Creates the QP and its CQ and finds their rings. Throws kSystem naming
  // the failed check (rxe_direct_unavailable, or a layout check).
  static std::unique_ptr<RxeDirectQueue> create(std::shared_ptr<VerbsDevice> device, const RxeDirectConfig& config);
  ~RxeDirectQueue();
  RxeDirectQueue(const RxeDirectQueue&) = delete;
  RxeDirectQueue& operator=(const RxeDirectQueue&) = delete;

  QpAddress address() const { return local_qp_address(*device_, *qp_, psn_); }
  // INIT -> RTR -> RTS towards `peer` (the same state machine as the transport's connections).
  void connect(const QpAddress& peer);

  // The handle for direct::post<RxeFormat> & co; valid while this object lives.
  const direct::DirectQueue& handle() const { return handle_; }
  const direct::DirectQueueState& state() const { return *state_; }
  uint64_t kicks() const { return kicks_.load(std::memory_order_relaxed); }
  ibv_qp* qp() const { return qp_.get(); }
  // Where the rings were found, for logs: "sq 512 x 256 B at +392, cq 512 x 64 B at +304 (rdma-core 44.0)".
  const std::string& layout() const { return layout_; }

 private:
  RxeDirectQueue() = default;
  static void kick_trampoline(void* self);
  void kick();
  void run_kick_thread();

  std::shared_ptr<VerbsDevice> device_;
  UniqueCq cq_;
  UniqueQp qp_;  // declared after cq_: destroyed first
  uint32_t psn_ = 0;
  std::unique_ptr<direct::DirectQueueState> state_;
  direct::DirectQueue handle_{};
  std::atomic<uint64_t> kicks_{0};
  std::string layout_;
  std::atomic<bool> stop_kicking_{false};
  std::thread kick_thread_;  // host_kick only; joined before the QP goes
};

}  // namespace lamina::verbs
