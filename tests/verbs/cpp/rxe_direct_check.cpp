// The direct back end on a real RDMA stack: CPU threads run the device API's
// direct queue code (lamina_net/direct/rxe.cuh, the same work_queue.cuh that
// mlx5 uses) on an rxe queue pair of their own (lamina::verbs::RxeDirectQueue):
// they write rxe work requests into its real send queue, publish the producer
// index, kick the kernel and poll its real CQ. The peer is an ordinary verbs
// QP on the same device (loopback through rxe), whose memory is checked.
// Needs Soft-RoCE: run it in the guest (tests/verbs/test_verbs_direct.py).
//
//   rxe_direct_check <case>   PASS <case> / FAIL <case>: why / SKIP: why (exit 77)
#include <infiniband/verbs.h>
#include <rdma/ib_user_verbs.h>
#include <rdma/rdma_user_rxe.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/error.hpp"
#include "transports/factory.hpp"
#include "transports/verbs/rxe_direct.hpp"

using namespace lamina;
using namespace lamina::verbs;
using lamina::direct::DirectRequest;
using lamina::direct::RxeFormat;

// The header's offsets are the kernel uapi's.
static_assert(offsetof(rxe_send_wqe, wr.wr_id) == direct::kRxeWqeWrId, "wr_id");
static_assert(offsetof(rxe_send_wqe, wr.opcode) == direct::kRxeWqeOpcode, "opcode");
static_assert(offsetof(rxe_send_wqe, wr.send_flags) == direct::kRxeWqeSendFlags, "send_flags");
static_assert(offsetof(rxe_send_wqe, wr.ex.imm_data) == direct::kRxeWqeImm, "imm");
static_assert(offsetof(rxe_send_wqe, wr.wr.rdma.remote_addr) == direct::kRxeWqeRemoteAddr, "rdma.remote_addr");
static_assert(offsetof(rxe_send_wqe, wr.wr.atomic.remote_addr) == direct::kRxeWqeRemoteAddr, "atomic.remote_addr");
static_assert(offsetof(rxe_send_wqe, wr.wr.rdma.rkey) == direct::kRxeWqeRdmaRkey, "rdma.rkey");
static_assert(offsetof(rxe_send_wqe, wr.wr.atomic.compare_add) == direct::kRxeWqeAtomicAdd, "compare_add");
static_assert(offsetof(rxe_send_wqe, wr.wr.atomic.rkey) == direct::kRxeWqeAtomicRkey, "atomic.rkey");
static_assert(offsetof(rxe_send_wqe, iova) == direct::kRxeWqeIova, "iova");
static_assert(offsetof(rxe_send_wqe, ssn) == direct::kRxeWqeSsn, "ssn");
static_assert(offsetof(rxe_send_wqe, dma) == direct::kRxeWqeDma, "dma");
static_assert(offsetof(rxe_dma_info, length) == 0 && offsetof(rxe_dma_info, resid) == 4 &&
                  offsetof(rxe_dma_info, num_sge) == 12,
              "dma info");
// The SGE / inline data union starts right after rxe_dma_info's last fixed
// field (8-byte aligned there in C, as the kernel is built). C++ lays out
// __DECLARE_FLEX_ARRAY differently, so offsetof of the union is not used here.
static_assert(offsetof(rxe_send_wqe, dma) + offsetof(rxe_dma_info, reserved) + sizeof(__u32) ==
                  direct::kRxeWqeHeaderBytes &&
                  direct::kRxeWqeHeaderBytes % 8 == 0,
              "the SGE / inline data follow the header");
static_assert(offsetof(rxe_sge, addr) == 0 && offsetof(rxe_sge, length) == 8 && offsetof(rxe_sge, lkey) == 12,
              "rxe_sge");
static_assert(offsetof(rxe_queue_buf, producer_index) == direct::kRxeQueueProducer &&
                  offsetof(rxe_queue_buf, consumer_index) == direct::kRxeQueueConsumer &&
                  offsetof(rxe_queue_buf, data) == direct::kRxeQueueHeaderBytes,
              "rxe_queue_buf");
static_assert(sizeof(ib_uverbs_wc) == direct::kRxeWcBytes && offsetof(ib_uverbs_wc, wr_id) == 0 &&
                  offsetof(ib_uverbs_wc, status) == 8 && offsetof(ib_uverbs_wc, vendor_err) == 16,
              "ib_uverbs_wc");
static_assert(direct::kRxeOpWrite == IB_UVERBS_WR_RDMA_WRITE && direct::kRxeOpWriteImm == IB_UVERBS_WR_RDMA_WRITE_WITH_IMM &&
                  direct::kRxeOpFetchAdd == IB_UVERBS_WR_ATOMIC_FETCH_AND_ADD,
              "opcodes");
static_assert(direct::kRxeFlagSignaled == IBV_SEND_SIGNALED && direct::kRxeFlagInline == IBV_SEND_INLINE &&
                  direct::kRxeFlagFence == IBV_SEND_FENCE,
              "send flags");

namespace {

struct Failure {
  std::string why;
};

void check(bool ok, const std::string& why) {
  if (!ok) throw Failure{why};
}

// Host memory registered for remote write / atomic.
struct Buffer {
  std::vector<uint8_t> bytes;
  UniqueMr mr;
  Buffer(const VerbsDevice& device, size_t n) : bytes(n + 64, 0) {
    mr.reset(device.api().reg_mr(device.pd(), data(), n,
                                 IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC |
                                     IBV_ACCESS_REMOTE_READ));
    check(mr != nullptr, "ibv_reg_mr failed");
  }
  uint8_t* data() { return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(bytes.data()) + 63) & ~uintptr_t(63)); }
  uint64_t addr(size_t off = 0) { return reinterpret_cast<uint64_t>(data() + off); }
};

// The peer: an ordinary verbs RC QP (the provider's own objects), connected to the direct queue.
// An ordinary RC QP made by the provider (its own post and poll paths), with
// a CQ of `cq_entries`, moved to INIT.
struct PlainQp {
  UniqueCq cq;
  UniqueQp qp;
  PlainQp(const VerbsDevice& device, int cq_entries, uint32_t send_wr) {
    cq.reset(device.api().create_cq(device.context(), cq_entries, nullptr, nullptr, 0));
    check(cq != nullptr, "ibv_create_cq failed");
    ibv_qp_init_attr init{};
    init.send_cq = cq.get();
    init.recv_cq = cq.get();
    init.qp_type = IBV_QPT_RC;
    init.cap.max_send_wr = send_wr;
    init.cap.max_recv_wr = 1;
    init.cap.max_send_sge = 1;
    init.cap.max_recv_sge = 1;
    init.cap.max_inline_data = 64;
    qp.reset(device.api().create_qp(device.pd(), &init));
    check(qp != nullptr, "ibv_create_qp failed");
    move_qp_to_init(device, qp.get());
  }
};

// The peer: an ordinary verbs RC QP, connected to the direct queue.
struct OrdinaryPeer : PlainQp {
  uint32_t psn = random_psn();
  OrdinaryPeer(const VerbsDevice& device, RxeDirectQueue& direct) : PlainQp(device, 64, 16) {
    move_qp_to_rts(device, qp.get(), direct.address(), psn, QpTimers{}, "peer: ");
    direct.connect(local_qp_address(device, *qp, psn));
  }
};

struct Setup {
  std::shared_ptr<VerbsDevice> device;
  std::unique_ptr<RxeDirectQueue> direct;
  std::unique_ptr<OrdinaryPeer> peer;
  explicit Setup(RxeDirectConfig config = {}) {
    device = VerbsDevice::open(VerbsOptions{});
    direct = RxeDirectQueue::create(device, config);
    peer = std::make_unique<OrdinaryPeer>(*device, *direct);
  }
};

DirectRequest write_request(Buffer& src, size_t src_off, Buffer& dst, size_t dst_off, uint32_t bytes, bool inl) {
  DirectRequest r{};
  r.opcode = direct::kDirectWrite;
  r.local_addr = src.addr(src_off);
  r.lkey = src.mr->lkey;
  r.remote_addr = dst.addr(dst_off);
  r.rkey = dst.mr->rkey;
  r.bytes = bytes;
  r.inline_data = inl ? 1 : 0;
  return r;
}

void fill(uint8_t* p, size_t n, uint64_t seed) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>((seed * 131 + i * 7) ^ (i >> 8));
}

uint64_t load(const void* p) { return __atomic_load_n(reinterpret_cast<const uint64_t*>(p), __ATOMIC_ACQUIRE); }

// One completion from `cq`, polled for at most 30 s.
ibv_wc poll_one(ibv_cq* cq) {
  ibv_wc wc{};
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (uint32_t spins = 0; ibv_poll_cq(cq, 1, &wc) == 0; ++spins) {
    if ((spins & 1023) == 0 && std::chrono::steady_clock::now() > until) throw Failure{"no completion in 30 s"};
  }
  return wc;
}

// Spins until the word reaches `value`; false after 30 s (a lost message must not hang the check).
bool spin_until(const void* word, uint64_t value) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (uint32_t spins = 0; load(word) < value; ++spins) {
    if ((spins & 1023) == 0 && std::chrono::steady_clock::now() > until) return false;
  }
  return true;
}

void case_layout() {
  Setup s;
  const auto& h = s.direct->handle();
  std::printf("  %s, depth %llu, max inline %u\n", s.direct->layout().c_str(), (unsigned long long)h.depth,
              h.max_inline);
  check(h.depth >= 1 && h.sq != nullptr && h.cq != nullptr, "handle filled");
  check(std::is_trivially_copyable<direct::DirectQueue>::value, "trivially copyable handle");
}

// Many producer threads: every byte lands at the ordinary peer, every signal counts.
void case_many_producers() {
  RxeDirectConfig config;
  config.depth = 64;
  Setup s(config);
  constexpr int kThreads = 4, kPerThread = 300;
  const uint32_t sizes[] = {8, 60, 256, 4096, 20000};
  constexpr size_t kSlot = 20480;
  Buffer src(*s.device, kSlot * kThreads * kPerThread / 8 + kSlot), dst(*s.device, kSlot * kThreads * kPerThread / 8 + kSlot);
  Buffer scratch(*s.device, 64 * kThreads);
  Buffer signal(*s.device, 64);
  // Each put has its own destination range (one slot per 8 puts, puts of one slot at distinct offsets... keep it
  // simple: slot k holds put k's bytes when k % 8 == 0, other puts go to small distinct lanes of the slot).
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  const size_t slots = kThreads * kPerThread / 8;
  fill(src.data(), kSlot * slots, 1);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const size_t k = size_t(t) * kPerThread + i;
        const uint32_t bytes = sizes[k % 5];
        const size_t off = (k / 8) * kSlot;  // puts of one slot overwrite with the same source bytes
        DirectRequest r = write_request(src, off, dst, off, bytes, bytes <= s.direct->handle().max_inline);
        DeviceStatus st;
        if (i % 4 == 3) {
          st = direct::put_signal<RxeFormat>(s.direct->handle(), r, signal.addr(), signal.mr->rkey, 1,
                                             scratch.addr(64 * t), scratch.mr->lkey, nullptr);
        } else {
          st = direct::post<RxeFormat>(s.direct->handle(), r, false, nullptr);
        }
        if (st != kDeviceOk) failures.fetch_add(1);
      }
      if (direct::flush<RxeFormat>(s.direct->handle()) != kDeviceOk) failures.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  const auto& st = s.direct->state();
  check(failures.load() == 0, std::to_string(failures.load()) + " posts/flushes failed; error word " +
                                  std::to_string(st.error) + " status " + std::to_string(st.error_status));
  // Every slot received at least its largest put's bytes (20000 for k % 5 == 4 somewhere in the slot).
  for (size_t slot = 0; slot < slots; ++slot) {
    uint32_t largest = 0;
    for (size_t k = slot * 8; k < slot * 8 + 8; ++k) largest = std::max(largest, sizes[k % 5]);
    check(std::memcmp(dst.data() + slot * kSlot, src.data() + slot * kSlot, largest) == 0,
          "slot " + std::to_string(slot) + " differs from its source");
  }
  const uint64_t signals = uint64_t(kThreads) * (kPerThread / 4);
  check(load(signal.data()) == signals, "signal word " + std::to_string(load(signal.data())) + ", want " +
                                            std::to_string(signals));
  const uint64_t posted = uint64_t(kThreads) * kPerThread + signals;
  check(st.completed == posted, "completed " + std::to_string(st.completed) + " of " + std::to_string(posted));
  std::printf("  %llu requests, %llu kicks, %llu doorbells\n", (unsigned long long)posted,
              (unsigned long long)s.direct->kicks(), (unsigned long long)st.doorbells);
}

// The signal never overtakes its data: a reader at the peer checks the data of
// every signal value it sees.
void case_signal_after_data() {
  Setup s;
  constexpr int kRounds = 200;
  constexpr size_t kChunk = 8192;
  Buffer src(*s.device, kChunk * kRounds), dst(*s.device, kChunk * kRounds), scratch(*s.device, 64),
      signal(*s.device, 64);
  for (int i = 0; i < kRounds; ++i) fill(src.data() + i * kChunk, kChunk, 1000 + i);
  std::atomic<bool> done{false};
  std::string reader_error;
  std::thread reader([&] {
    uint64_t seen = 0;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (seen < kRounds && std::chrono::steady_clock::now() < until) {
      const uint64_t now = load(signal.data());
      for (; seen < now; ++seen) {
        if (std::memcmp(dst.data() + seen * kChunk, src.data() + seen * kChunk, kChunk) != 0) {
          reader_error = "signal " + std::to_string(now) + " seen before chunk " + std::to_string(seen) + "'s data";
          return;
        }
      }
    }
    if (seen < kRounds) reader_error = "only " + std::to_string(seen) + " signals arrived";
    done = true;
  });
  for (int i = 0; i < kRounds; ++i) {
    DirectRequest r = write_request(src, i * kChunk, dst, i * kChunk, kChunk, false);
    const DeviceStatus st = direct::put_signal<RxeFormat>(s.direct->handle(), r, signal.addr(), signal.mr->rkey, 1,
                                                          scratch.addr(), scratch.mr->lkey, nullptr);
    check(st == kDeviceOk, "put_signal " + std::to_string(i) + " returned " + std::to_string(st));
  }
  check(direct::flush<RxeFormat>(s.direct->handle()) == kDeviceOk, "flush");
  reader.join();
  check(reader_error.empty(), reader_error);
}

// Doorbell batching: requests posted without ringing go out with few kicks, none lost.
void case_doorbell_batching() {
  RxeDirectConfig config;
  config.depth = 128;
  config.batch = 16;
  Setup s(config);
  constexpr int kPuts = 1000;
  Buffer src(*s.device, 8 * kPuts), dst(*s.device, 8 * kPuts);
  for (int i = 0; i < kPuts; ++i) std::memcpy(src.data() + 8 * i, &i, sizeof i);
  for (int i = 0; i < kPuts; ++i) {
    DirectRequest r = write_request(src, 8 * i, dst, 8 * i, 8, true);
    check(direct::post<RxeFormat>(s.direct->handle(), r, false, nullptr) == kDeviceOk, "post");
  }
  check(direct::flush<RxeFormat>(s.direct->handle()) == kDeviceOk, "flush");
  check(std::memcmp(src.data(), dst.data(), 8 * kPuts) == 0, "every batched put arrived");
  const uint64_t kicks = s.direct->kicks();
  std::printf("  %d puts, %llu kicks (batch 16)\n", kPuts, (unsigned long long)kicks);
  check(kicks <= kPuts / 16 + 8, "batching: " + std::to_string(kicks) + " kicks for " + std::to_string(kPuts) + " puts");
}

// A bad rkey: the peer NAKs, rxe completes the request with REM_ACCESS_ERR, the error word says so.
void case_bad_rkey() {
  Setup s;
  Buffer src(*s.device, 64), dst(*s.device, 64);
  DirectRequest good = write_request(src, 0, dst, 0, 8, false);
  check(direct::post<RxeFormat>(s.direct->handle(), good, true, nullptr) == kDeviceOk, "first put");
  check(direct::flush<RxeFormat>(s.direct->handle()) == kDeviceOk, "flush of the good put");
  DirectRequest bad = good;
  bad.rkey ^= 0x5a5a00;
  lamina_u64 ticket = 0;
  check(direct::post<RxeFormat>(s.direct->handle(), bad, true, &ticket) == kDeviceOk, "posting is fine");
  const DeviceStatus st = direct::flush<RxeFormat>(s.direct->handle());
  const auto& state = s.direct->state();
  check(st == kDeviceChannelError, "flush after a bad rkey returned " + std::to_string(st));
  check(state.error == kErrorTransfer, "error word " + std::to_string(state.error));
  check(state.error_status == IBV_WC_REM_ACCESS_ERR,
        "status " + std::to_string(state.error_status) + ", want IBV_WC_REM_ACCESS_ERR");
  check(state.error_ticket == ticket, "failed ticket " + std::to_string(state.error_ticket) + ", want " +
                                          std::to_string(ticket));
  check(direct::post<RxeFormat>(s.direct->handle(), good, true, nullptr) == kDeviceChannelError,
        "posts after the failure are refused");
}

// The peer's QP is destroyed: the requester's retries run out, the error reaches the word (bounded).
void case_peer_destroyed() {
  Setup s;
  Buffer src(*s.device, 64), dst(*s.device, 64);
  DirectRequest r = write_request(src, 0, dst, 0, 8, false);
  check(direct::post<RxeFormat>(s.direct->handle(), r, true, nullptr) == kDeviceOk, "first put");
  check(direct::flush<RxeFormat>(s.direct->handle()) == kDeviceOk, "flush");
  s.peer->qp.reset();
  const auto start = std::chrono::steady_clock::now();
  check(direct::post<RxeFormat>(s.direct->handle(), r, true, nullptr) == kDeviceOk, "posting is fine");
  const DeviceStatus st = direct::flush<RxeFormat>(s.direct->handle());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto& state = s.direct->state();
  std::printf("  failed after %.2f s with status %llu\n", seconds, (unsigned long long)state.error_status);
  check(st == kDeviceChannelError, "flush to a destroyed QP returned " + std::to_string(st));
  check(state.error_status == IBV_WC_RETRY_EXC_ERR,
        "status " + std::to_string(state.error_status) + ", want IBV_WC_RETRY_EXC_ERR");
}

// CPU-assisted doorbell: the callers only publish; the queue's host thread kicks.
void case_host_kick() {
  RxeDirectConfig config;
  config.depth = 64;
  config.host_kick = true;
  Setup s(config);
  check(s.direct->handle().kick == nullptr, "a host-kicked handle has no caller kick");
  constexpr int kThreads = 2, kPuts = 400;
  Buffer src(*s.device, 8 * kThreads * kPuts), dst(*s.device, 8 * kThreads * kPuts), scratch(*s.device, 64),
      signal(*s.device, 64);
  for (int i = 0; i < kThreads * kPuts; ++i) std::memcpy(src.data() + 8 * i, &i, sizeof i);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPuts; ++i) {
        const size_t k = size_t(t) * kPuts + i;
        DirectRequest r = write_request(src, 8 * k, dst, 8 * k, 8, (i & 1) != 0);
        if (direct::put_signal<RxeFormat>(s.direct->handle(), r, signal.addr(), signal.mr->rkey, 1,
                                          scratch.addr(8 * t), scratch.mr->lkey, nullptr) != kDeviceOk) {
          failures.fetch_add(1);
        }
      }
      if (direct::flush<RxeFormat>(s.direct->handle()) != kDeviceOk) failures.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  check(failures.load() == 0, std::to_string(failures.load()) + " posts/flushes failed");
  check(std::memcmp(src.data(), dst.data(), 8 * kThreads * kPuts) == 0, "every put arrived");
  check(load(signal.data()) == uint64_t(kThreads) * kPuts, "every signal counted");
  check(s.direct->kicks() >= 1 && s.direct->kicks() <= s.direct->state().doorbells,
        "the host thread kicked (" + std::to_string(s.direct->kicks()) + " kicks, " +
            std::to_string(s.direct->state().doorbells) + " doorbells)");
  std::printf("  %d requests, %llu doorbells, %llu host kicks\n", 2 * kThreads * kPuts,
              (unsigned long long)s.direct->state().doorbells, (unsigned long long)s.direct->kicks());
}

// One-way cost of a small put until its completion: direct vs the provider's own post path.
void case_latency() {
  Setup s;
  Buffer src(*s.device, 64), dst(*s.device, 64);
  // A second pair: the provider's ibv_post_send / ibv_poll_cq on an ordinary QP.
  OrdinaryPeer& peer = *s.peer;
  constexpr int kIters = 2000;
  auto direct_round = [&] {
    DirectRequest r = write_request(src, 0, dst, 0, 8, true);
    lamina_u64 t = 0;
    direct::post<RxeFormat>(s.direct->handle(), r, true, &t);
    direct::wait_completed<RxeFormat>(s.direct->handle(), t);
  };
  auto provider_round = [&] {
    ibv_sge sge{src.addr(), 8, src.mr->lkey};
    ibv_send_wr wr{};
    ibv_send_wr* bad = nullptr;
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.wr.rdma.remote_addr = dst.addr(8);
    wr.wr.rdma.rkey = dst.mr->rkey;
    ibv_post_send(peer.qp.get(), &wr, &bad);
    check(poll_one(peer.cq.get()).status == IBV_WC_SUCCESS, "provider completion");
  };
  std::vector<double> direct_us, provider_us;
  for (int round = 0; round < 5; ++round) {
    for (auto* pair : {&direct_us, &provider_us}) {
      auto fn = pair == &direct_us ? std::function<void()>(direct_round) : std::function<void()>(provider_round);
      for (int i = 0; i < 50; ++i) fn();
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < kIters; ++i) fn();
      pair->push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
                      kIters);
    }
  }
  std::sort(direct_us.begin(), direct_us.end());
  std::sort(provider_us.begin(), provider_us.end());
  std::printf("  8 B inline put to completion: direct %.2f us, provider ibv_post_send %.2f us (ratio %.2f)\n",
              direct_us[2], provider_us[2], direct_us[2] / provider_us[2]);
  check(s.direct->state().error == kErrorNone, "no error during the rounds");
}

// A put+signal ping-pong, one-way time = round trip / 2: two direct queues
// connected to each other, against two ordinary QPs driven by the provider's
// ibv_post_send (WRITE + FETCH_ADD chained, one doorbell), same process, same rounds.
void case_pingpong() {
  auto device = VerbsDevice::open(VerbsOptions{});
  RxeDirectConfig config;
  config.depth = 128;
  auto a = RxeDirectQueue::create(device, config);
  auto b = RxeDirectQueue::create(device, config);
  a->connect(b->address());
  b->connect(a->address());
  // Provider pair.
  PlainQp px(*device, 512, 128), py(*device, 512, 128);
  ibv_qp* x = px.qp.get();
  ibv_qp* y = py.qp.get();
  const uint32_t psn_x = random_psn(), psn_y = random_psn();
  move_qp_to_rts(*device, x, local_qp_address(*device, *y, psn_y), psn_x, QpTimers{}, "x: ");
  move_qp_to_rts(*device, y, local_qp_address(*device, *x, psn_x), psn_y, QpTimers{}, "y: ");

  Buffer side_a(*device, 256), side_b(*device, 256);  // [0]: data, [64]: signal word, [128]: atomic scratch, [192]: source
  constexpr int kIters = 1000;
  using Post = std::function<void(int from, uint64_t round)>;
  auto direct_post = [&](int from, uint64_t round) {
    Buffer& me = from == 0 ? side_a : side_b;
    Buffer& peer = from == 0 ? side_b : side_a;
    RxeDirectQueue& q = from == 0 ? *a : *b;
    std::memcpy(me.data() + 192, &round, 8);
    DirectRequest r = write_request(me, 192, peer, 0, 8, true);
    direct::put_signal<RxeFormat>(q.handle(), r, peer.addr(64), peer.mr->rkey, 1, me.addr(128), me.mr->lkey,
                                  nullptr);
  };
  uint64_t provider_posted[2] = {0, 0};
  auto provider_post = [&](int from, uint64_t round) {
    Buffer& me = from == 0 ? side_a : side_b;
    Buffer& peer = from == 0 ? side_b : side_a;
    ibv_qp* qp = from == 0 ? x : y;
    ibv_cq* cq = from == 0 ? px.cq.get() : py.cq.get();
    std::memcpy(me.data() + 192, &round, 8);
    ibv_sge data_sge{me.addr(192), 8, me.mr->lkey};
    ibv_sge atomic_sge{me.addr(128), 8, me.mr->lkey};
    ibv_send_wr wr[2]{};
    wr[0].opcode = IBV_WR_RDMA_WRITE;
    wr[0].send_flags = IBV_SEND_INLINE;
    wr[0].sg_list = &data_sge;
    wr[0].num_sge = 1;
    wr[0].wr.rdma.remote_addr = peer.addr(0);
    wr[0].wr.rdma.rkey = peer.mr->rkey;
    wr[0].next = &wr[1];
    wr[1].opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
    // Signal every 32nd pair so the send queue drains (completions retire earlier WRs).
    const bool signaled = (++provider_posted[from] % 32) == 0;
    wr[1].send_flags = signaled ? IBV_SEND_SIGNALED : 0;
    wr[1].sg_list = &atomic_sge;
    wr[1].num_sge = 1;
    wr[1].wr.atomic.remote_addr = peer.addr(64);
    wr[1].wr.atomic.compare_add = 1;
    wr[1].wr.atomic.rkey = peer.mr->rkey;
    ibv_send_wr* bad = nullptr;
    check(ibv_post_send(qp, wr, &bad) == 0, "ibv_post_send");
    if (signaled) {
      check(poll_one(cq).status == IBV_WC_SUCCESS, "provider completion");
    }
  };
  auto run = [&](const Post& post) {
    std::memset(side_a.data() + 64, 0, 8);
    std::memset(side_b.data() + 64, 0, 8);
    std::atomic<bool> lost{false};
    std::thread responder([&] {
      for (uint64_t i = 1; i <= kIters && !lost; ++i) {
        if (!spin_until(side_b.data() + 64, i)) {
          lost = true;
          return;
        }
        post(1, i);
      }
    });
    const auto start = std::chrono::steady_clock::now();
    for (uint64_t i = 1; i <= kIters && !lost; ++i) {
      post(0, i);
      if (!spin_until(side_a.data() + 64, i)) lost = true;
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    responder.join();
    check(!lost, "a ping-pong message was lost (30 s without its signal)");
    return us / kIters / 2;
  };
  std::vector<double> d, p;
  for (int round = 0; round < 5; ++round) {
    d.push_back(run(direct_post));
    p.push_back(run(provider_post));
  }
  std::sort(d.begin(), d.end());
  std::sort(p.begin(), p.end());
  check(a->state().error == kErrorNone && b->state().error == kErrorNone, "no error in the direct rounds");
  std::printf("  8 B put+signal ping-pong, one-way (median of 5): direct %.2f us, provider %.2f us (ratio %.2f)\n",
              d[2], p[2], d[2] / p[2]);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const std::map<std::string, std::function<void()>> cases = {
      {"layout", case_layout},
      {"many_producers", case_many_producers},
      {"signal_after_data", case_signal_after_data},
      {"doorbell_batching", case_doorbell_batching},
      {"bad_rkey", case_bad_rkey},
      {"peer_destroyed", case_peer_destroyed},
      {"host_kick", case_host_kick},
      {"latency", case_latency},
      {"pingpong", case_pingpong},
  };
  if (argc != 2 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: rxe_direct_check <case>\n");
    return 2;
  }
  std::string why;
  if (!verbs_available(&why)) {
    std::printf("SKIP: verbs not available: %s\n", why.c_str());
    return 77;
  }
  try {
    {
      auto device = VerbsDevice::open(VerbsOptions{});
      const std::string unavailable = rxe_direct_unavailable(*device);
      if (!unavailable.empty()) {
        std::printf("SKIP: %s\n", unavailable.c_str());
        return 77;
      }
    }
    cases.at(argv[1])();
  } catch (const Failure& f) {
    std::printf("FAIL %s: %s\n", argv[1], f.why.c_str());
    return 1;
  } catch (const Error& e) {
    std::printf("FAIL %s: %s\n", argv[1], e.what());
    return 1;
  }
  std::printf("PASS %s\n", argv[1]);
  return 0;
}
