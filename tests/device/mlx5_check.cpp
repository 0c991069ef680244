// Byte-level checks of the direct back end's mlx5 format
// (lamina_net/direct/mlx5.cuh) against rdma-core's own helpers and structures
// in infiniband/mlx5dv.h, and of the shared queue logic
// (lamina_net/direct/work_queue.cuh) driven over mlx5 bytes by CPU threads.
//
//   mlx5_check <case>     prints "PASS <case>" and exits 0, or "FAIL <case>: why" and exits 1.
//
// No mlx5 hardware here: the "NIC" of the queue cases is a CPU thread that
// reads the doorbell record, decodes each WQE with rdma-core's structures,
// applies it and writes a CQE as ConnectX does (owner bit per pass, wqe
// counter, error syndromes). It checks the queue logic, not the hardware.
#include <infiniband/mlx5dv.h>
#include <lamina_net/direct/mlx5.cuh>

#include <arpa/inet.h>
#include <endian.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

using namespace lamina;
using namespace lamina::direct;

static_assert(std::is_trivially_copyable<DirectQueue>::value, "the handle is passed by value into kernels");
static_assert(sizeof(mlx5_wqe_ctrl_seg) == 16 && sizeof(mlx5_wqe_raddr_seg) == 16 && sizeof(mlx5_wqe_data_seg) == 16 &&
                  sizeof(mlx5_wqe_atomic_seg) == 16 && sizeof(mlx5_cqe64) == 64,
              "mlx5 segment sizes");
static_assert(offsetof(mlx5_cqe64, wqe_counter) == 60 && offsetof(mlx5_cqe64, op_own) == 63, "CQE layout");
static_assert(offsetof(mlx5_err_cqe, syndrome) == 55 && offsetof(mlx5_err_cqe, vendor_err_synd) == 54, "error CQE");
static_assert(kMlx5OpRdmaWrite == MLX5_OPCODE_RDMA_WRITE && kMlx5OpRdmaWriteImm == MLX5_OPCODE_RDMA_WRITE_IMM &&
                  kMlx5OpAtomicFetchAdd == MLX5_OPCODE_ATOMIC_FA,
              "opcodes");
static_assert(kMlx5CtrlCqUpdate == MLX5_WQE_CTRL_CQ_UPDATE && kMlx5CtrlFence == MLX5_WQE_CTRL_FENCE, "ctrl flags");
static_assert(kMlx5InlineSeg == MLX5_INLINE_SEG && kMlx5WqeBytes == MLX5_SEND_WQE_BB, "inline, WQEBB");
static_assert(kMlx5CqeReq == MLX5_CQE_REQ && kMlx5CqeReqErr == MLX5_CQE_REQ_ERR &&
                  kMlx5CqeRespErr == MLX5_CQE_RESP_ERR && kMlx5CqeInvalid == MLX5_CQE_INVALID,
              "CQE opcodes");

namespace {

struct Failure {
  std::string why;
};

void check(bool ok, const std::string& why) {
  if (!ok) throw Failure{why};
}

std::string hex(const void* p, size_t n) {
  std::string s;
  char b[4];
  for (size_t i = 0; i < n; ++i) {
    snprintf(b, sizeof b, "%02x", static_cast<const uint8_t*>(p)[i]);
    s += b;
  }
  return s;
}

void same_bytes(const void* ours, const void* theirs, size_t n, const std::string& what) {
  check(memcmp(ours, theirs, n) == 0, what + ": ours " + hex(ours, n) + " rdma-core " + hex(theirs, n));
}

const uint32_t kIndices[] = {0, 1, 0x7f, 0xff, 0x100, 0x7fff, 0x8000, 0xfffe, 0xffff, 0x10000, 0x10001, 0x12345};
const uint32_t kQpns[] = {0x1, 0x1234, 0xabcdef, 0xffffff};
const uint8_t kOpcodes[] = {MLX5_OPCODE_RDMA_WRITE, MLX5_OPCODE_RDMA_WRITE_IMM, MLX5_OPCODE_ATOMIC_FA};

void case_ctrl_seg() {
  for (uint32_t index : kIndices)
    for (uint32_t qpn : kQpns)
      for (uint8_t opcode : kOpcodes)
        for (uint8_t ds : {uint8_t(3), uint8_t(4)})
          for (uint8_t flags : {uint8_t(MLX5_WQE_CTRL_CQ_UPDATE), uint8_t(MLX5_WQE_CTRL_CQ_UPDATE | MLX5_WQE_CTRL_FENCE)})
            for (uint32_t imm : {0u, 0x01020304u, 0xdeadbeefu}) {
              alignas(16) uint8_t ours[16];
              alignas(16) mlx5_wqe_ctrl_seg theirs;
              memset(ours, 0xa5, sizeof ours);
              memset(&theirs, 0, sizeof theirs);
              mlx5_ctrl_seg(ours, static_cast<uint16_t>(index), opcode, qpn, ds, flags, htobe32(imm));
              mlx5dv_set_ctrl_seg(&theirs, static_cast<uint16_t>(index), opcode, 0, qpn, flags, ds, 0, htobe32(imm));
              same_bytes(ours, &theirs, 16, "ctrl index " + std::to_string(index) + " qpn " + std::to_string(qpn));
            }
}

void case_data_raddr_atomic_inline_segs() {
  const uint64_t addrs[] = {0, 0x1000, 0x7fff12345678ull, 0xffffffffffffffc0ull};
  const uint32_t keys[] = {0, 0x42, 0x12345678u, 0xffffffffu};
  const uint32_t lens[] = {0, 1, 8, 28, 4096, 1u << 30, 0x7fffffffu};
  for (uint64_t a : addrs)
    for (uint32_t k : keys)
      for (uint32_t n : lens) {
        alignas(16) uint8_t ours[16];
        mlx5_wqe_data_seg theirs;
        mlx5_data_seg(ours, n, k, a);
        mlx5dv_set_data_seg(&theirs, n, k, a);
        same_bytes(ours, &theirs, 16, "data seg");

        mlx5_wqe_raddr_seg raddr{};
        raddr.raddr = htobe64(a);
        raddr.rkey = htobe32(k);
        mlx5_raddr_seg(ours, a, k);
        same_bytes(ours, &raddr, 16, "raddr seg");

        mlx5_wqe_atomic_seg atomic{};
        atomic.swap_add = htobe64(a ^ n);
        atomic.compare = htobe64(k);
        mlx5_atomic_seg(ours, a ^ n, k);
        same_bytes(ours, &atomic, 16, "atomic seg");
      }
  for (uint32_t n = 0; n <= kMlx5MaxInline; ++n) {
    alignas(16) uint8_t ours[48];
    alignas(16) uint8_t theirs[48];
    uint8_t payload[32];
    for (uint32_t i = 0; i < sizeof payload; ++i) payload[i] = static_cast<uint8_t>(0x30 + i);
    memset(ours, 0xee, sizeof ours);
    memset(theirs, 0xee, sizeof theirs);
    const uint32_t used = mlx5_inline_seg(ours, payload, n);
    auto* inl = reinterpret_cast<mlx5_wqe_inl_data_seg*>(theirs);
    inl->byte_count = htobe32(n | MLX5_INLINE_SEG);
    memcpy(theirs + sizeof(*inl), payload, n);
    const uint32_t rounded = (sizeof(*inl) + n + 15) / 16 * 16;
    memset(theirs + sizeof(*inl) + n, 0, rounded - sizeof(*inl) - n);
    check(used == rounded, "inline seg of " + std::to_string(n) + " B uses " + std::to_string(used));
    same_bytes(ours, theirs, sizeof ours, "inline seg of " + std::to_string(n) + " B");
  }
}

// The WQE rdma-core's helpers build for `r` at index `index`.
void reference_wqe(const DirectRequest& r, uint32_t index, uint32_t qpn, uint8_t* wqe) {
  memset(wqe, 0, 64);
  auto* ctrl = reinterpret_cast<mlx5_wqe_ctrl_seg*>(wqe);
  auto* raddr = reinterpret_cast<mlx5_wqe_raddr_seg*>(wqe + 16);
  const uint8_t flags = MLX5_WQE_CTRL_CQ_UPDATE | (r.fence ? MLX5_WQE_CTRL_FENCE : 0);
  raddr->raddr = htobe64(r.remote_addr);
  raddr->rkey = htobe32(r.rkey);
  if (r.opcode == kDirectFetchAdd) {
    auto* atomic = reinterpret_cast<mlx5_wqe_atomic_seg*>(wqe + 32);
    atomic->swap_add = htobe64(r.add);
    atomic->compare = 0;
    mlx5dv_set_data_seg(reinterpret_cast<mlx5_wqe_data_seg*>(wqe + 48), 8, r.lkey, r.local_addr);
    mlx5dv_set_ctrl_seg(ctrl, static_cast<uint16_t>(index), MLX5_OPCODE_ATOMIC_FA, 0, qpn, flags, 4, 0, 0);
    return;
  }
  const uint8_t opcode = r.opcode == kDirectWriteImm ? MLX5_OPCODE_RDMA_WRITE_IMM : MLX5_OPCODE_RDMA_WRITE;
  const uint32_t imm = r.opcode == kDirectWriteImm ? htobe32(r.imm) : 0;
  uint8_t ds = 3;
  if (r.inline_data) {
    auto* inl = reinterpret_cast<mlx5_wqe_inl_data_seg*>(wqe + 32);
    inl->byte_count = htobe32(r.bytes | MLX5_INLINE_SEG);
    memcpy(wqe + 32 + sizeof(*inl), reinterpret_cast<const void*>(r.local_addr), r.bytes);
    ds = static_cast<uint8_t>(2 + (sizeof(*inl) + r.bytes + 15) / 16);
  } else {
    mlx5dv_set_data_seg(reinterpret_cast<mlx5_wqe_data_seg*>(wqe + 32), r.bytes, r.lkey, r.local_addr);
  }
  mlx5dv_set_ctrl_seg(ctrl, static_cast<uint16_t>(index), opcode, 0, qpn, flags, ds, 0, imm);
}

// Enough of a queue for Mlx5Format::write / publish / poll on host memory.
struct FakeQueue {
  std::vector<uint8_t> sq, cq;
  alignas(64) uint32_t dbr[2] = {0, 0};      // send doorbell record (word 1: send counter)
  alignas(64) uint32_t cq_dbr[2] = {0, 0};   // CQ doorbell record (word 0: consumer index)
  alignas(64) uint64_t uar = 0;              // stands in for the UAR register
  DirectQueueState state{};
  DirectQueue q{};
  FakeQueue(uint32_t sq_log2, uint32_t cq_log2, uint32_t qpn, uint32_t batch) {
    sq.assign((64u << sq_log2) + 64, 0);
    cq.assign((64u << cq_log2) + 64, 0xff);  // every CQE starts INVALID, owner 1
    q.sq = align(sq.data());
    q.cq = align(cq.data());
    q.state = &state;
    q.sq_producer = &dbr[1];
    q.cq_consumer = &cq_dbr[0];
    q.doorbell = &uar;
    q.depth = 1ull << sq_log2;
    q.timeout_ns = 10ull * 1000 * 1000 * 1000;
    q.sq_slots_log2 = sq_log2;
    q.sq_slot_log2 = 6;
    q.cq_entries_log2 = cq_log2;
    q.cq_entry_log2 = 6;
    q.qpn = qpn;
    q.batch = batch;
    q.max_inline = kMlx5MaxInline;
  }
  static uint8_t* align(uint8_t* p) { return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); }
};

void case_wqe_bytes() {
  uint8_t payload[kMlx5MaxInline];
  for (uint32_t i = 0; i < sizeof payload; ++i) payload[i] = static_cast<uint8_t>(0xc0 + i);
  for (uint32_t sq_log2 : {1u, 6u, 10u, 15u}) {
    FakeQueue fq(sq_log2, 4, 0x0abcde, 1);
    for (uint32_t index : kIndices) {
      for (uint8_t op : {uint8_t(kDirectWrite), uint8_t(kDirectWriteImm), uint8_t(kDirectFetchAdd)}) {
        for (uint32_t bytes : {0u, 1u, 12u, 13u, 28u, 29u, 4096u, 1u << 20}) {
          for (int inl = 0; inl < 2; ++inl) {
            if (op == kDirectFetchAdd && (inl || bytes != 8)) continue;
            if (inl && bytes > kMlx5MaxInline) continue;
            DirectRequest r{};
            r.opcode = op;
            r.bytes = op == kDirectFetchAdd ? 8 : bytes;
            r.inline_data = static_cast<uint8_t>(inl);
            r.local_addr = inl ? reinterpret_cast<uint64_t>(payload) : 0x7f0000001000ull + index * 64;
            r.remote_addr = 0x55550000ull + index * 8;
            r.lkey = 0x1111 + index;
            r.rkey = 0x2222 + index;
            r.add = 0x0102030405060708ull + index;
            r.imm = 0xa0b0c0d0u + index;
            r.fence = static_cast<uint8_t>(index & 1);
            alignas(64) uint8_t ours[64];
            alignas(64) uint8_t theirs[64];
            memset(ours, 0, 64);
            Mlx5Format::write(fq.q, ours, index, r);
            reference_wqe(r, index, fq.q.qpn, theirs);
            same_bytes(ours, theirs, 64,
                       "WQE op " + std::to_string(op) + " bytes " + std::to_string(bytes) + " inline " +
                           std::to_string(inl) + " index " + std::to_string(index));
          }
        }
      }
    }
  }
}

void case_doorbell_bytes() {
  for (uint32_t counter : kIndices)
    for (uint32_t qpn : kQpns) {
      // The register takes the first 8 bytes of a ctrl segment naming the new counter and the QP.
      mlx5_wqe_ctrl_seg ctrl;
      memset(&ctrl, 0, sizeof ctrl);
      mlx5dv_set_ctrl_seg(&ctrl, static_cast<uint16_t>(counter), 0, 0, qpn, 0, 0, 0, 0);
      const uint64_t value = mlx5_doorbell_value(counter, qpn);
      same_bytes(&value, &ctrl, 8, "doorbell value");
      FakeQueue fq(4, 4, qpn, 1);
      Mlx5Format::publish(fq.q, counter);
      check(fq.dbr[1] == htobe32(counter & 0xffff), "doorbell record word 1 holds the BE send counter");
      check(fq.uar == value, "the register got the doorbell value");
    }
}

void write_cqe(uint8_t* cqe, uint8_t opcode, uint8_t owner, uint16_t counter, uint8_t syndrome, uint8_t vendor) {
  memset(cqe, 0, 64);
  auto* c = reinterpret_cast<mlx5_cqe64*>(cqe);
  c->wqe_counter = htobe16(counter);
  if (opcode == MLX5_CQE_REQ_ERR || opcode == MLX5_CQE_RESP_ERR) {
    auto* e = reinterpret_cast<mlx5_err_cqe*>(cqe);
    e->syndrome = syndrome;
    e->vendor_err_synd = vendor;
  }
  c->op_own = static_cast<uint8_t>((opcode << 4) | (owner & MLX5_CQE_OWNER_MASK));
}

bool mlx5_dv_owner_ok(uint8_t* cqe, uint8_t pass) {
  return (mlx5dv_get_cqe_owner(reinterpret_cast<mlx5_cqe64*>(cqe)) & 1) == pass;
}

void case_cqe_parse() {
  alignas(64) uint8_t cqe[64];
  DirectCompletion c{};
  for (uint32_t counter : {0u, 1u, 0x7fffu, 0xfffeu, 0xffffu}) {
    for (uint8_t pass : {uint8_t(0), uint8_t(1)}) {
      write_cqe(cqe, MLX5_CQE_REQ, pass, static_cast<uint16_t>(counter), 0, 0);
      check(mlx5_dv_owner_ok(cqe, pass), "rdma-core's owner view");
      check(mlx5_parse_cqe(cqe, pass, &c) == 1 && c.counter == counter && c.status == 0, "success CQE");
      check(mlx5_parse_cqe(cqe, pass ^ 1, &c) == 0, "a CQE of the previous pass is still the NIC's");
    }
  }
  memset(cqe, 0xff, 64);
  check(mlx5_parse_cqe(cqe, 1, &c) == 0 && mlx5_parse_cqe(cqe, 0, &c) == 0, "an INVALID CQE is never read");
  const uint8_t syndromes[] = {MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR, MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR,
                               MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, MLX5_CQE_SYNDROME_WR_FLUSH_ERR,
                               MLX5_CQE_SYNDROME_MW_BIND_ERR, MLX5_CQE_SYNDROME_BAD_RESP_ERR,
                               MLX5_CQE_SYNDROME_LOCAL_ACCESS_ERR, MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR,
                               MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, MLX5_CQE_SYNDROME_REMOTE_OP_ERR,
                               MLX5_CQE_SYNDROME_TRANSPORT_RETRY_EXC_ERR, MLX5_CQE_SYNDROME_RNR_RETRY_EXC_ERR,
                               MLX5_CQE_SYNDROME_REMOTE_ABORTED_ERR};
  for (uint8_t opcode : {uint8_t(MLX5_CQE_REQ_ERR), uint8_t(MLX5_CQE_RESP_ERR)})
    for (uint8_t s : syndromes) {
      write_cqe(cqe, opcode, 0, 0x1234, s, 0x77);
      check(mlx5_parse_cqe(cqe, 0, &c) == 1, "an error CQE is read, not taken for 'not yet'");
      check(c.status == s && c.vendor == 0x77 && c.counter == 0x1234, "syndrome " + std::to_string(s));
    }
  write_cqe(cqe, MLX5_CQE_RESP_SEND, 0, 5, 0, 0);
  check(mlx5_parse_cqe(cqe, 0, &c) == 1 && c.status == (kMlx5UnexpectedCqe | MLX5_CQE_RESP_SEND),
        "a receive CQE on the send CQ is an error");
  // 16-bit wrap: the completion's counter extends against the completed count.
  for (uint64_t completed : {0ull, 1ull, 0xfff0ull, 0xffffull, 0x10000ull, 0x12345678ull, (1ull << 40) - 3}) {
    for (uint64_t ahead : {0ull, 1ull, 17ull, 32767ull, 40000ull, 65535ull}) {
      const uint64_t ticket = completed + ahead;
      const uint64_t got = direct_detail::extend_counter(completed, ticket & 0xffff, 16);
      check(got == ticket, "extend " + std::to_string(completed) + "+" + std::to_string(ahead) + " gave " +
                               std::to_string(got));
    }
  }
}

// A CPU "NIC" for the queue cases: applies WRITE / FETCH_ADD WQEs it reads
// (decoded with rdma-core's structures) once the doorbell record covers them,
// and writes one CQE per WQE. `fail_at`: the WQE index that completes with
// REMOTE_ACCESS (then every later one with WR_FLUSH, as a QP in error does).
struct SimulatedNic {
  FakeQueue& fq;
  uint64_t fail_at;
  std::atomic<bool> stop{false};
  uint64_t executed = 0;
  uint64_t max_outstanding = 0;
  std::string error;
  std::thread thread;
  SimulatedNic(FakeQueue& q, uint64_t fail) : fq(q), fail_at(fail), thread([this] { run(); }) {}
  ~SimulatedNic() {
    stop = true;
    thread.join();
  }
  void run() {
    uint64_t head = 0;  // next WQE, 64-bit
    const uint64_t sq_mask = (1ull << fq.q.sq_slots_log2) - 1;
    const uint64_t cq_n = 1ull << fq.q.cq_entries_log2;
    bool in_error = false;
    while (!stop.load(std::memory_order_relaxed)) {
      const uint16_t counter = static_cast<uint16_t>(be32toh(__atomic_load_n(&fq.dbr[1], __ATOMIC_ACQUIRE)));
      if (counter == static_cast<uint16_t>(head)) {
        std::this_thread::yield();
        continue;
      }
      while (static_cast<uint16_t>(head) != counter) {
        // The CQ must have room: the consumer index (BE, 24 bits) says how far software read.
        const uint32_t ci = be32toh(__atomic_load_n(&fq.cq_dbr[0], __ATOMIC_ACQUIRE));
        const uint64_t outstanding = (head - ci) & 0xffffff;
        if (outstanding >= cq_n) {
          if (error.empty()) error = "CQ overrun: software left " + std::to_string(outstanding) + " CQEs unread";
          return;
        }
        max_outstanding = std::max(max_outstanding, outstanding);
        const uint8_t* wqe = fq.q.sq + ((head & sq_mask) << 6);
        const auto* ctrl = reinterpret_cast<const mlx5_wqe_ctrl_seg*>(wqe);
        const uint32_t word = be32toh(ctrl->opmod_idx_opcode);
        const uint8_t opcode = word & 0xff;
        const uint16_t index = static_cast<uint16_t>(word >> 8);
        if (index != static_cast<uint16_t>(head) || (be32toh(ctrl->qpn_ds) >> 8) != fq.q.qpn ||
            !(ctrl->fm_ce_se & MLX5_WQE_CTRL_CQ_UPDATE)) {
          if (error.empty()) error = "WQE " + std::to_string(head) + " has index " + std::to_string(index);
          return;
        }
        const auto* raddr = reinterpret_cast<const mlx5_wqe_raddr_seg*>(wqe + 16);
        uint8_t cqe_opcode = MLX5_CQE_REQ;
        uint8_t syndrome = 0;
        if (in_error || head == fail_at) {
          cqe_opcode = MLX5_CQE_REQ_ERR;
          syndrome = in_error ? MLX5_CQE_SYNDROME_WR_FLUSH_ERR : MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR;
          in_error = true;
        } else if (opcode == MLX5_OPCODE_RDMA_WRITE || opcode == MLX5_OPCODE_RDMA_WRITE_IMM) {
          const auto* data = reinterpret_cast<const mlx5_wqe_data_seg*>(wqe + 32);
          const uint32_t bc = be32toh(data->byte_count);
          void* dst = reinterpret_cast<void*>(be64toh(raddr->raddr));
          if (bc & MLX5_INLINE_SEG) {
            memcpy(dst, wqe + 36, bc & ~MLX5_INLINE_SEG);
          } else {
            memcpy(dst, reinterpret_cast<const void*>(be64toh(data->addr)), bc);
          }
        } else if (opcode == MLX5_OPCODE_ATOMIC_FA) {
          const auto* atomic = reinterpret_cast<const mlx5_wqe_atomic_seg*>(wqe + 32);
          const auto* data = reinterpret_cast<const mlx5_wqe_data_seg*>(wqe + 48);
          auto* word64 = reinterpret_cast<uint64_t*>(be64toh(raddr->raddr));
          const uint64_t old = __atomic_fetch_add(word64, be64toh(atomic->swap_add), __ATOMIC_ACQ_REL);
          *reinterpret_cast<uint64_t*>(be64toh(data->addr)) = old;
        } else {
          if (error.empty()) error = "unknown opcode " + std::to_string(opcode);
          return;
        }
        uint8_t* cqe = fq.q.cq + ((head & (cq_n - 1)) << 6);
        const uint8_t owner = static_cast<uint8_t>((head >> fq.q.cq_entries_log2) & 1);
        auto* c = reinterpret_cast<mlx5_cqe64*>(cqe);
        c->wqe_counter = htobe16(static_cast<uint16_t>(head));
        reinterpret_cast<mlx5_err_cqe*>(cqe)->syndrome = syndrome;
        __atomic_store_n(&c->op_own, static_cast<uint8_t>((cqe_opcode << 4) | owner), __ATOMIC_RELEASE);
        ++head;
        ++executed;
      }
    }
  }
};

// Many CPU producers over mlx5 bytes: every put lands, the signal word counts
// every put_signal, the 16-bit counter wraps many times, batching saves doorbells.
void run_queue_case(uint32_t sq_log2, uint32_t batch, int threads, int per_thread) {
  FakeQueue fq(sq_log2, sq_log2 + 1, 0x321, batch);
  std::vector<uint64_t> target(size_t(threads) * per_thread, 0);
  std::vector<uint64_t> source(target.size());
  alignas(8) uint64_t signal_word = 0;
  std::vector<uint64_t> scratch(size_t(threads), 0);
  for (size_t i = 0; i < source.size(); ++i) source[i] = 0x5000000000ull + i;
  std::atomic<int> failures{0};
  {
    SimulatedNic nic(fq, ~0ull);
    std::vector<std::thread> producers;
    for (int t = 0; t < threads; ++t) {
      producers.emplace_back([&, t] {
        for (int i = 0; i < per_thread; ++i) {
          const size_t k = size_t(t) * per_thread + i;
          DirectRequest r{};
          r.opcode = kDirectWrite;
          r.bytes = 8;
          r.local_addr = reinterpret_cast<uint64_t>(&source[k]);
          r.remote_addr = reinterpret_cast<uint64_t>(&target[k]);
          r.inline_data = static_cast<uint8_t>(i & 1);
          DeviceStatus st;
          if (i % 4 == 3) {
            st = put_signal<Mlx5Format>(fq.q, r, reinterpret_cast<uint64_t>(&signal_word), 0, 1,
                                        reinterpret_cast<uint64_t>(&scratch[t]), 0, nullptr);
          } else {
            st = post<Mlx5Format>(fq.q, r, false, nullptr);
          }
          if (st != kDeviceOk) failures.fetch_add(1);
        }
        if (flush<Mlx5Format>(fq.q) != kDeviceOk) failures.fetch_add(1);
      });
    }
    for (auto& p : producers) p.join();
    check(nic.error.empty(), "NIC: " + nic.error);
  }
  check(failures.load() == 0, std::to_string(failures.load()) + " posts or flushes failed");
  for (size_t i = 0; i < target.size(); ++i) check(target[i] == source[i], "put " + std::to_string(i) + " lost");
  const uint64_t signals = uint64_t(threads) * (per_thread / 4);
  check(signal_word == signals, "signal word " + std::to_string(signal_word) + ", want " + std::to_string(signals));
  const uint64_t posted = target.size() + signals;
  check(fq.state.completed == posted, "completed " + std::to_string(fq.state.completed));
  check(posted > 0x10000 || sq_log2 < 4, "the case must wrap the 16-bit counter");
  if (batch > 1) {
    check(fq.state.doorbells < posted, "batch " + std::to_string(batch) + " rang " +
                                           std::to_string(fq.state.doorbells) + " doorbells for " +
                                           std::to_string(posted) + " WQEs");
  }
  printf("  sq 2^%u batch %u: %llu WQEs, %llu doorbells\n", sq_log2, batch, (unsigned long long)posted,
         (unsigned long long)fq.state.doorbells);
}

void case_queue_many_producers() {
  run_queue_case(6, 1, 4, 20000);
  run_queue_case(6, 8, 4, 20000);
  run_queue_case(1, 1, 2, 2000);
  run_queue_case(15, 32, 2, 40000);
}

void case_queue_error_cqe() {
  FakeQueue fq(4, 5, 0x99, 1);
  std::vector<uint64_t> target(64, 0), source(64, 7);
  {
    SimulatedNic nic(fq, 20);
    DeviceStatus last = kDeviceOk;
    int ok = 0;
    for (int i = 0; i < 64; ++i) {
      DirectRequest r{};
      r.opcode = kDirectWrite;
      r.bytes = 8;
      r.local_addr = reinterpret_cast<uint64_t>(&source[i]);
      r.remote_addr = reinterpret_cast<uint64_t>(&target[i]);
      last = post<Mlx5Format>(fq.q, r, true, nullptr);
      if (last != kDeviceOk) break;
      ++ok;
    }
    const DeviceStatus f = flush<Mlx5Format>(fq.q);
    check(f == kDeviceChannelError, "flush after an error CQE returns kDeviceChannelError, got " + std::to_string(f));
    check(ok >= 21, "posts before the failure went through");
    check(nic.error.empty(), "NIC: " + nic.error);
  }
  check(fq.state.error == kErrorTransfer, "error word " + std::to_string(fq.state.error));
  check(fq.state.error_ticket == 20, "failed ticket " + std::to_string(fq.state.error_ticket));
  check(fq.state.error_status == MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, "syndrome " + std::to_string(fq.state.error_status));
  check(fq.state.completed == 20, "tickets before the failure completed");
  DirectRequest r{};
  r.opcode = kDirectWrite;
  check(post<Mlx5Format>(fq.q, r, false, nullptr) == kDeviceChannelError, "posting after the failure is refused");
}

void case_queue_bad_arguments() {
  FakeQueue fq(4, 5, 0x99, 1);
  DirectRequest r{};
  r.opcode = 0;
  check(post<Mlx5Format>(fq.q, r, false, nullptr) == kDeviceInvalidArgument, "opcode 0");
  r.opcode = kDirectWrite;
  r.inline_data = 1;
  r.bytes = kMlx5MaxInline + 1;
  check(post<Mlx5Format>(fq.q, r, false, nullptr) == kDeviceInvalidArgument, "inline above the limit");
  r = DirectRequest{};
  r.opcode = kDirectFetchAdd;
  r.remote_addr = 4;
  check(post<Mlx5Format>(fq.q, r, false, nullptr) == kDeviceInvalidArgument, "misaligned atomic");
  check(fq.state.reserved == 0, "nothing was reserved");
}

// No NIC consumes: a full queue makes the producer time out (bounded), and the error word says so.
void case_queue_full_times_out() {
  FakeQueue fq(2, 3, 0x99, 1);
  fq.q.timeout_ns = 200ull * 1000 * 1000;
  uint64_t src = 1, dst = 0;
  DirectRequest r{};
  r.opcode = kDirectWrite;
  r.bytes = 8;
  r.local_addr = reinterpret_cast<uint64_t>(&src);
  r.remote_addr = reinterpret_cast<uint64_t>(&dst);
  for (int i = 0; i < 4; ++i) check(post<Mlx5Format>(fq.q, r, false, nullptr) == kDeviceOk, "fill the queue");
  check(post<Mlx5Format>(fq.q, r, false, nullptr) == kDeviceTimeout, "a full queue times out");
  check(fq.state.error == kErrorProducerTimeout && fq.state.error_ticket == 4, "the stuck ticket is reported");
  check(fq.state.doorbells >= 1, "the producer rang for the slots it waited on");
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"ctrl_seg", case_ctrl_seg},
      {"segments", case_data_raddr_atomic_inline_segs},
      {"wqe_bytes", case_wqe_bytes},
      {"doorbell_bytes", case_doorbell_bytes},
      {"cqe_parse", case_cqe_parse},
      {"queue_many_producers", case_queue_many_producers},
      {"queue_error_cqe", case_queue_error_cqe},
      {"queue_bad_arguments", case_queue_bad_arguments},
      {"queue_full_times_out", case_queue_full_times_out},
  };
  if (argc != 2 || !cases.count(argv[1])) {
    fprintf(stderr, "usage: mlx5_check <case>; cases:");
    for (const auto& c : cases) fprintf(stderr, " %s", c.first.c_str());
    fprintf(stderr, "\n");
    return 2;
  }
  try {
    cases.at(argv[1])();
  } catch (const Failure& f) {
    printf("FAIL %s: %s\n", argv[1], f.why.c_str());
    return 1;
  }
  printf("PASS %s\n", argv[1]);
  return 0;
}
