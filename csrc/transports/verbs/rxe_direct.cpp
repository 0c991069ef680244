#include "transports/verbs/rxe_direct.hpp"

#include <dlfcn.h>
#include <limits.h>
#include <rdma/ib_user_verbs.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "common/error.hpp"
#include "common/log.hpp"

namespace lamina::verbs {

namespace {

constexpr int kFirstPinnedRdmaCore = 34;  // rxe_qp / rxe_cq prefix unchanged from here ...
constexpr int kLastPinnedRdmaCore = 64;   // ... through the newest release checked
constexpr size_t kScanLimit = 1024;       // bytes of the provider's object searched for the ring fields

// struct mminfo (rdma/rdma_user_rxe.h) followed by the queue pointer, as the provider stores them.
struct MmapInfo {
  uint64_t offset;
  uint32_t size;
  uint32_t pad;
};
static_assert(sizeof(MmapInfo) == 16, "struct mminfo");
constexpr size_t kRxeWqBytes = 24;  // struct rxe_wq: queue pointer, spinlock, max_sge, max_inline

struct Mapping {
  uint64_t start = 0;
  uint64_t end = 0;
  std::string path;
};

std::vector<Mapping> uverbs_mappings() {
  std::vector<Mapping> out;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("/dev/infiniband/uverbs") == std::string::npos) continue;
    Mapping m;
    std::istringstream in(line);
    std::string range;
    in >> range;
    const size_t dash = range.find('-');
    if (dash == std::string::npos) continue;
    m.start = std::stoull(range.substr(0, dash), nullptr, 16);
    m.end = std::stoull(range.substr(dash + 1), nullptr, 16);
    m.path = line.substr(line.find('/'));
    out.push_back(m);
  }
  return out;
}

const Mapping* mapping_at(const std::vector<Mapping>& maps, uint64_t start) {
  for (const Mapping& m : maps) {
    if (m.start == start) return &m;
  }
  return nullptr;
}

uint64_t page_round(uint64_t n) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return (n + page - 1) / page * page;
}

// A ring found in the provider's object: the mminfo at `offset`, the queue
// pointer right after it, mapped from the command file with that size.
struct FoundRing {
  size_t offset = 0;
  uint8_t* queue = nullptr;
  uint32_t size = 0;
};

bool ring_at(const uint8_t* object, size_t offset, const std::vector<Mapping>& maps, FoundRing* out) {
  MmapInfo info;
  std::memcpy(&info, object + offset, sizeof info);
  uint64_t queue = 0;
  std::memcpy(&queue, object + offset + sizeof info, sizeof queue);
  if (info.size == 0 || queue == 0 || queue % 4096 != 0) return false;
  const Mapping* m = mapping_at(maps, queue);
  if (m == nullptr || m->end - m->start != page_round(info.size)) return false;
  out->offset = offset;
  out->queue = reinterpret_cast<uint8_t*>(queue);
  out->size = info.size;
  return true;
}

uint32_t ring_log2_elem(const uint8_t* queue) { return *reinterpret_cast<const uint32_t*>(queue); }
uint32_t ring_mask(const uint8_t* queue) { return *reinterpret_cast<const uint32_t*>(queue + 4); }

// Checks a ring header against its mapping and what it must hold.
std::string check_ring(const char* what, const FoundRing& r, uint32_t min_elem_bytes, uint32_t min_slots) {
  const uint32_t log2 = ring_log2_elem(r.queue);
  const uint32_t mask = ring_mask(r.queue);
  std::ostringstream why;
  if (log2 > 16 || (1u << log2) < min_elem_bytes) {
    why << what << " element size 2^" << log2 << " is not a " << min_elem_bytes << "+ byte element";
  } else if ((mask & (mask + 1)) != 0 || mask + 1 < min_slots) {
    why << what << " index mask " << mask << " is not a power of two minus one covering " << min_slots << " slots";
  } else if (uint64_t(mask + 1) << log2 > uint64_t(r.size) - direct::kRxeQueueHeaderBytes) {
    why << what << " ring of " << (mask + 1) << " x " << (1u << log2) << " B does not fit its " << r.size
        << "-byte mapping";
  } else {
    const uint32_t prod = *reinterpret_cast<const uint32_t*>(r.queue + direct::kRxeQueueProducer);
    const uint32_t cons = *reinterpret_cast<const uint32_t*>(r.queue + direct::kRxeQueueConsumer);
    if (prod != 0 || cons != 0) why << what << " of a new queue has indices " << prod << "/" << cons << ", not 0/0";
  }
  return why.str();
}

uint32_t log2_of(uint32_t power_of_two) {
  uint32_t n = 0;
  while ((1u << n) < power_of_two) ++n;
  return n;
}

}  // namespace

std::string rdma_core_version() {
  std::string why;
  const IbverbsApi* api = ibverbs_api(&why);
  if (api == nullptr) return "";
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(api->get_device_list), &info) == 0 || info.dli_fname == nullptr) return "";
  char resolved[PATH_MAX];
  if (realpath(info.dli_fname, resolved) == nullptr) return "";
  // libibverbs.so.1.<abi>.<major>.<minor>
  const std::string name = std::string(resolved).substr(std::string(resolved).rfind('/') + 1);
  const size_t last = name.rfind('.');
  if (last == std::string::npos || last == 0) return "";
  const size_t before = name.rfind('.', last - 1);
  if (before == std::string::npos) return "";
  return name.substr(before + 1);
}

std::string rxe_direct_unavailable(const VerbsDevice& device) {
  Dl_info info{};
  void* post_send = reinterpret_cast<void*>(device.context()->ops.post_send);
  if (post_send == nullptr || dladdr(post_send, &info) == 0 || info.dli_fname == nullptr ||
      std::strstr(info.dli_fname, "librxe") == nullptr) {
    return "device " + device.name() + " is not Soft-RoCE (its provider is " +
           (info.dli_fname != nullptr ? std::string(info.dli_fname) : std::string("unknown")) + ")";
  }
  const std::string version = rdma_core_version();
  const int major = version.empty() ? 0 : std::atoi(version.c_str());
  if (major < kFirstPinnedRdmaCore || major > kLastPinnedRdmaCore) {
    return "rdma-core " + (version.empty() ? std::string("of unknown version") : version) +
           ": the rxe provider's queue layout is pinned for rdma-core " + std::to_string(kFirstPinnedRdmaCore) +
           "-" + std::to_string(kLastPinnedRdmaCore);
  }
  return "";
}

std::unique_ptr<RxeDirectQueue> RxeDirectQueue::create(std::shared_ptr<VerbsDevice> device,
                                                       const RxeDirectConfig& config) {
  const std::string unavailable = rxe_direct_unavailable(*device);
  if (!unavailable.empty()) throw_system("direct rxe queue: " + unavailable);
  if (config.depth == 0 || config.batch == 0) throw_usage("direct rxe queue: depth and batch must be positive");
  const IbverbsApi& api = device->api();
  std::unique_ptr<RxeDirectQueue> q(new RxeDirectQueue());
  q->device_ = device;
  const uint32_t depth = std::min<uint32_t>(config.depth, static_cast<uint32_t>(device->device_attr().max_qp_wr));

  // One CQE per request at most `depth` unread: the CQ ring must hold depth + 1.
  q->cq_.reset(api.create_cq(device->context(), static_cast<int>(depth + 1), nullptr, nullptr, 0));
  if (!q->cq_) throw_system(errno_message("direct rxe queue: ibv_create_cq failed", errno));
  ibv_qp_init_attr init{};
  init.send_cq = q->cq_.get();
  init.recv_cq = q->cq_.get();
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;
  init.cap.max_send_wr = depth;
  init.cap.max_recv_wr = 1;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 1;
  init.cap.max_inline_data = config.max_inline;
  q->qp_.reset(api.create_qp(device->pd(), &init));
  if (!q->qp_) throw_system(errno_message("direct rxe queue: ibv_create_qp failed", errno));
  move_qp_to_init(*device, q->qp_.get());
  q->psn_ = random_psn();

  const std::string version = rdma_core_version();
  const std::vector<Mapping> maps = uverbs_mappings();
  const std::string where = "direct rxe queue (rdma-core " + version + "): ";
  // rxe_qp: [verbs_qp][rq mminfo][rq rxe_wq][sq mminfo][sq rxe_wq]: two rings 40 bytes apart.
  const auto* qp_object = reinterpret_cast<const uint8_t*>(q->qp_.get());
  FoundRing rq, sq;
  bool found = false;
  for (size_t off = sizeof(ibv_qp); off + 2 * sizeof(MmapInfo) + kRxeWqBytes + 8 <= kScanLimit && !found; off += 8) {
    found = ring_at(qp_object, off, maps, &rq) && ring_at(qp_object, off + sizeof(MmapInfo) + kRxeWqBytes, maps, &sq);
  }
  if (!found) {
    throw_system(where + "no send/receive queue pair of mapped rings in the provider's QP object (layout differs "
                 "from the pinned one)");
  }
  std::string bad = check_ring("send queue", sq, direct::kRxeWqeHeaderBytes + 16, depth + 1);
  if (!bad.empty()) throw_system(where + bad);
  // rxe_cq: [verbs_cq][mminfo][queue pointer].
  const auto* cq_object = reinterpret_cast<const uint8_t*>(q->cq_.get());
  FoundRing cq;
  found = false;
  for (size_t off = sizeof(ibv_cq); off + sizeof(MmapInfo) + 8 <= kScanLimit && !found; off += 8) {
    found = ring_at(cq_object, off, maps, &cq);
  }
  if (!found) throw_system(where + "no mapped ring in the provider's CQ object (layout differs from the pinned one)");
  bad = check_ring("completion queue", cq, direct::kRxeWcBytes, depth + 1);
  if (!bad.empty()) throw_system(where + bad);

  q->state_ = std::make_unique<direct::DirectQueueState>();
  direct::DirectQueue& h = q->handle_;
  const uint32_t sq_log2 = ring_log2_elem(sq.queue);
  h.sq = sq.queue + direct::kRxeQueueHeaderBytes;
  h.sq_producer = reinterpret_cast<uint32_t*>(sq.queue + direct::kRxeQueueProducer);
  h.sq_slots_log2 = log2_of(ring_mask(sq.queue) + 1);
  h.sq_slot_log2 = sq_log2;
  h.cq = cq.queue + direct::kRxeQueueHeaderBytes;
  h.cq_producer = reinterpret_cast<uint32_t*>(cq.queue + direct::kRxeQueueProducer);
  h.cq_consumer = reinterpret_cast<uint32_t*>(cq.queue + direct::kRxeQueueConsumer);
  h.cq_entries_log2 = log2_of(ring_mask(cq.queue) + 1);
  h.cq_entry_log2 = ring_log2_elem(cq.queue);
  h.state = q->state_.get();
  h.kick = config.host_kick ? nullptr : &RxeDirectQueue::kick_trampoline;
  h.kick_context = config.host_kick ? nullptr : q.get();
  // The ring keeps one slot free; the CQ holds one CQE per request.
  h.depth = std::min<uint64_t>({depth, ring_mask(sq.queue), ring_mask(cq.queue)});
  h.timeout_ns = config.timeout_ns;
  h.qpn = q->qp_->qp_num;
  h.batch = config.batch;
  h.max_inline = std::min<uint32_t>({config.max_inline, init.cap.max_inline_data,
                                     (1u << sq_log2) - direct::kRxeWqeHeaderBytes});
  std::ostringstream layout;
  layout << "sq " << (ring_mask(sq.queue) + 1) << " x " << (1u << sq_log2) << " B at +" << sq.offset << ", cq "
         << (ring_mask(cq.queue) + 1) << " x " << (1u << h.cq_entry_log2) << " B at +" << cq.offset
         << " (rdma-core " << version << ")";
  q->layout_ = layout.str();
  if (config.host_kick) q->kick_thread_ = std::thread([raw = q.get()] { raw->run_kick_thread(); });
  LAMINA_INFO("direct rxe queue: qpn " + std::to_string(h.qpn) + ", " + q->layout_);
  return q;
}

RxeDirectQueue::~RxeDirectQueue() {
  stop_kicking_.store(true, std::memory_order_relaxed);
  if (kick_thread_.joinable()) kick_thread_.join();
}

void RxeDirectQueue::run_kick_thread() {
  // Spins while requests come (a kick within about a microsecond of the
  // publish), then backs off to 50 us naps when the queue is idle.
  uint64_t kicked = 0;
  uint32_t idle = 0;
  while (!stop_kicking_.load(std::memory_order_relaxed)) {
    const uint64_t rung = __atomic_load_n(&state_->rung, __ATOMIC_ACQUIRE);
    if (rung != kicked) {
      kick();
      kicked = rung;
      idle = 0;
      continue;
    }
    if (++idle < 20000) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((idle & 63) == 0) std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

void RxeDirectQueue::connect(const QpAddress& peer) {
  move_qp_to_rts(*device_, qp_.get(), peer, psn_, QpTimers{}, "direct rxe queue: ");
}

void RxeDirectQueue::kick_trampoline(void* self) { static_cast<RxeDirectQueue*>(self)->kick(); }

void RxeDirectQueue::kick() {
  // POST_SEND with no work requests: the kernel processes what the producer index covers.
  ib_uverbs_cmd_hdr hdr{};
  ib_uverbs_post_send cmd{};
  ib_uverbs_post_send_resp resp{};
  uint8_t request[sizeof hdr + sizeof cmd];
  hdr.command = IB_USER_VERBS_CMD_POST_SEND;
  hdr.in_words = sizeof request / 4;
  hdr.out_words = sizeof resp / 4;
  cmd.response = reinterpret_cast<uintptr_t>(&resp);
  cmd.qp_handle = qp_->handle;
  cmd.wr_count = 0;
  cmd.sge_count = 0;
  cmd.wqe_size = sizeof(ib_uverbs_send_wr);
  std::memcpy(request, &hdr, sizeof hdr);
  std::memcpy(request + sizeof hdr, &cmd, sizeof cmd);
  kicks_.fetch_add(1, std::memory_order_relaxed);
  if (write(qp_->context->cmd_fd, request, sizeof request) != static_cast<ssize_t>(sizeof request)) {
    direct::direct_detail::set_error(state_.get(), kErrorTransfer, state_->rung, 0x10000u | uint32_t(errno), 0);
  }
}

}  // namespace lamina::verbs
