// lamina-net: the same-host shared-memory transport.
//
// Each channel is one shared segment holding two single-producer /
// single-consumer byte rings (one per direction) that carry the frames of
// StreamConnection. Waiting is spin-then-sleep: a reader that goes to sleep
// says so in the ring, and only then does a writer pay for a futex wake.
//
// Large puts (>= LAMINA_NET_SHM_SINGLE_COPY_MIN) take one copy: the frame
// carries the source address and the target copies straight from the sender's
// memory with process_vm_readv, in frame order, after validating the target
// range like any other inbound put. When the kernel forbids cross-process
// reads (ptrace policy), puts stay on the ring and a log line says so.
//
// Puts into a peer's Endpoint.alloc memory are one memcpy by the sender,
// checked first against the peer's region board (region_board.hpp: the
// target's own table of live regions, rights and bounds, mapped read-only);
// a put the board does not allow goes through the ring, where the target's
// progress engine refuses it like any hostile frame.
//
// Peer death: the peer's pid is watched with a pidfd, so a killed peer fails
// the channel within one progress period (20 ms) instead of hanging readers.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <cstring>
#include <vector>
#include <random>
#include <thread>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/settings.hpp"
#include "transports/factory.hpp"
#include "transports/shm/region_board.hpp"
#include "transports/stream_connection.hpp"

namespace lamina {
namespace {

constexpr uint64_t kSegmentMagic = 0x4c4e53484d303032ull;  // "LNSHM002"
constexpr size_t kHeaderBytes = 4096;
// A word with a known value whose address each side publishes, so the other
// side can check that process_vm_readv reaches this process.
const uint64_t g_probe_word = 0x70726f62656c6e31ull;

struct alignas(64) RingControl {
  std::atomic<uint64_t> head;  // bytes ever written (writer-owned)
  char pad0[56];
  std::atomic<uint64_t> tail;  // bytes ever consumed (reader-owned)
  char pad1[56];
  std::atomic<uint32_t> data_seq;         // bumped to wake a sleeping reader
  std::atomic<uint32_t> reader_sleeping;  // count of threads asleep on data_seq
  std::atomic<uint32_t> space_seq;        // bumped to wake a sleeping writer
  std::atomic<uint32_t> writer_sleeping;
  std::atomic<uint32_t> writer_closed;
  // Of the sleepers on data_seq, those waiting for something a direct write
  // can change (a user's wait with a readiness check). A direct write wakes
  // only these: the progress thread, asleep for frames, has nothing to do
  // with it, and waking it on every put costs a futex call here and takes
  // a core from the spinning peer there.
  std::atomic<uint32_t> waiter_sleeping;
  char pad2[40];
  std::atomic<uint64_t> applied_seq;  // reader: highest writer seq fully applied
  char pad3[56];
};

// Side s's sender holds direct_writers[s] at 1 during each direct write into
// side 1-s's memory (one at a time); a deregistration on side 1-s waits for
// it to drop to 0.
struct alignas(64) WriterCount {
  std::atomic<uint32_t> n;
};

struct SegmentHeader {
  uint64_t magic;
  uint64_t ring_bytes;
  std::atomic<int32_t> pid[2];
  std::atomic<uint64_t> probe_addr[2];
  std::atomic<int32_t> board_fd[2];  // each side's region board (its fd number), -1: none
  std::atomic<uint32_t> attached;
  char pad[64 - 12];
  RingControl ring[2];  // ring[s] carries frames from side s to side 1-s
  WriterCount direct_writers[2];
};
static_assert(sizeof(SegmentHeader) <= kHeaderBytes, "segment header fits its page");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "cross-process atomics must be lock-free");

class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t len) : addr_(addr), len_(len) {}
  ~Mapping() {
    if (addr_) munmap(addr_, len_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  char* data() const { return static_cast<char*>(addr_); }

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
};

int pidfd_open_compat(int pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

class ShmStream : public ByteStream {
 public:
  // `ring_bytes` is this side's own copy (the creator's setting, or the size
  // the attacher checked against the segment): the header is peer-writable.
  ShmStream(std::shared_ptr<Mapping> mapping, int side, uint64_t ring_bytes, int peer_pid, uint64_t peer_probe,
            uint64_t pull_min)
      : mapping_(std::move(mapping)), side_(side), peer_pid_(peer_pid) {
    header_ = reinterpret_cast<SegmentHeader*>(mapping_->data());
    capacity_ = ring_bytes;
    tx_ = &header_->ring[side];
    rx_ = &header_->ring[1 - side];
    tx_data_ = mapping_->data() + kHeaderBytes + static_cast<size_t>(side) * capacity_;
    rx_data_ = mapping_->data() + kHeaderBytes + static_cast<size_t>(1 - side) * capacity_;
    pidfd_ = pidfd_open_compat(peer_pid);
    int64_t direct_min = setting_int("SHM_DIRECT_MIN");
    direct_min_ = direct_min >= 0 ? static_cast<uint64_t>(direct_min) : UINT64_MAX;
    writers_ = &header_->direct_writers[side].n;
    if (direct_min_ != UINT64_MAX) {
      peer_board_ = std::make_unique<PeerBoard>(peer_pid, header_->board_fd[1 - side].load());
      if (peer_board_->empty()) {
        // Without the target's table nothing can be checked before a direct write.
        LAMINA_INFO("shm transport: cannot map rank's region board of pid " + std::to_string(peer_pid) +
                    "; puts go through the ring");
        direct_min_ = UINT64_MAX;
      }
    }
    uint64_t seen = 0;
    if (pull_min != UINT64_MAX && pull_from_peer(&seen, peer_probe, sizeof(seen)) && seen == g_probe_word) {
      pull_min_ = pull_min;
    } else if (pull_min != UINT64_MAX) {
      LAMINA_INFO("shm transport: process_vm_readv cannot reach pid " + std::to_string(peer_pid) +
                  "; large puts go through the ring (two copies)");
    }
  }
  ~ShmStream() override {
    if (pidfd_ >= 0) ::close(pidfd_);
  }

  // Each side trusts only its own index (rx_tail_, tx_head_, kept here; the
  // shared copies are for the peer) and checks the peer's: a head more than a
  // ring ahead, or a tail past what was written, would make the copy run off
  // the ring. That is a corrupt or hostile peer: the connection fails.
  size_t read_some(void* buf, size_t max, bool* eof) override {
    const uint64_t tail = rx_tail_.load(std::memory_order_relaxed);
    uint64_t head = rx_->head.load(std::memory_order_acquire);
    uint64_t avail = head - tail;
    if (avail > capacity_) {
      throw_system("shm peer corrupted its ring: " + std::to_string(avail) + " bytes announced in a ring of " +
                   std::to_string(capacity_));
    }
    if (avail == 0) {
      if (rx_->writer_closed.load(std::memory_order_acquire) && rx_->head.load(std::memory_order_acquire) == tail) {
        *eof = true;
      }
      return 0;
    }
    size_t n = static_cast<size_t>(std::min<uint64_t>(avail, max));
    copy_out(static_cast<char*>(buf), tail, n);
    rx_tail_.store(tail + n, std::memory_order_relaxed);
    rx_->tail.store(tail + n, std::memory_order_release);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (rx_->writer_sleeping.load(std::memory_order_relaxed)) {
      rx_->space_seq.fetch_add(1, std::memory_order_release);
      futex_wake_all(reinterpret_cast<uint32_t*>(&rx_->space_seq), true);
    }
    return n;
  }

  size_t write_some(const struct iovec* iov, int iovcnt) override {
    const uint64_t head = tx_head_.load(std::memory_order_relaxed);
    uint64_t tail = tx_->tail.load(std::memory_order_acquire);
    if (head - tail > capacity_) {
      throw_system("shm peer corrupted its ring: consumed up to " + std::to_string(tail) + " of " +
                   std::to_string(head) + " bytes written");
    }
    uint64_t space = capacity_ - (head - tail);
    size_t written = 0;
    for (int i = 0; i < iovcnt && space > 0; ++i) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(iov[i].iov_len, space));
      copy_in(head + written, static_cast<const char*>(iov[i].iov_base), n);
      written += n;
      space -= n;
      if (n < iov[i].iov_len) break;
    }
    if (written == 0) return 0;
    tx_head_.store(head + written, std::memory_order_relaxed);
    tx_->head.store(head + written, std::memory_order_release);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (tx_->reader_sleeping.load(std::memory_order_relaxed)) {
      tx_->data_seq.fetch_add(1, std::memory_order_release);
      futex_wake_all(reinterpret_cast<uint32_t*>(&tx_->data_seq), true);
    }
    return written;
  }

  void wait_readable(int timeout_ms, const std::function<bool()>* ready_check) override {
    uint32_t seq = rx_->data_seq.load(std::memory_order_acquire);
    rx_->reader_sleeping.fetch_add(1, std::memory_order_relaxed);
    if (ready_check) rx_->waiter_sleeping.fetch_add(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    bool ready = rx_->head.load(std::memory_order_acquire) != rx_tail_.load(std::memory_order_relaxed) ||
                 rx_->writer_closed.load(std::memory_order_acquire) || (ready_check && (*ready_check)());
    if (!ready) futex_wait(reinterpret_cast<uint32_t*>(&rx_->data_seq), seq, timeout_ms, true);
    if (ready_check) rx_->waiter_sleeping.fetch_sub(1, std::memory_order_relaxed);
    rx_->reader_sleeping.fetch_sub(1, std::memory_order_relaxed);
  }

  void wait_writable(int timeout_ms) override {
    uint32_t seq = tx_->space_seq.load(std::memory_order_acquire);
    tx_->writer_sleeping.fetch_add(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // A corrupt tail reads as ready: the write then finds and reports it.
    bool ready = tx_head_.load(std::memory_order_relaxed) - tx_->tail.load(std::memory_order_acquire) != capacity_;
    if (!ready) futex_wait(reinterpret_cast<uint32_t*>(&tx_->space_seq), seq, timeout_ms, true);
    tx_->writer_sleeping.fetch_sub(1, std::memory_order_relaxed);
  }

  void wake() override {
    rx_->data_seq.fetch_add(1, std::memory_order_release);
    futex_wake_all(reinterpret_cast<uint32_t*>(&rx_->data_seq), true);
  }

  void shutdown() override {
    if (tx_->writer_closed.exchange(1)) return;
    tx_->data_seq.fetch_add(1, std::memory_order_release);
    futex_wake_all(reinterpret_cast<uint32_t*>(&tx_->data_seq), true);
  }

  std::string peer_gone_reason() override {
    bool gone = false;
    if (pidfd_ >= 0) {
      struct pollfd pfd = {pidfd_, POLLIN, 0};
      gone = ::poll(&pfd, 1, 0) > 0;
    } else {
      gone = ::kill(peer_pid_, 0) != 0 && errno == ESRCH;
    }
    if (!gone) return {};
    return "peer process " + std::to_string(peer_pid_) + " exited without closing the channel";
  }

  bool pull_from_peer(void* dst, uint64_t peer_addr, uint64_t len) override {
    char* out = static_cast<char*>(dst);
    while (len > 0) {
      struct iovec local = {out, static_cast<size_t>(len)};
      struct iovec remote = {reinterpret_cast<void*>(peer_addr), static_cast<size_t>(len)};
      ssize_t n = process_vm_readv(peer_pid_, &local, 1, &remote, 1, 0);
      if (n <= 0) return false;
      out += n;
      peer_addr += static_cast<uint64_t>(n);
      len -= static_cast<uint64_t>(n);
    }
    return true;
  }

  uint64_t pull_threshold() const override { return pull_min_; }

  uint64_t direct_put_threshold() const override { return direct_min_; }
  uint64_t peer_applied() const override { return tx_->applied_seq.load(std::memory_order_acquire); }
  void note_applied(uint64_t seq) override { rx_->applied_seq.store(seq, std::memory_order_release); }

  bool writes_directly() const override { return direct_min_ != UINT64_MAX; }

  // Lines the peer writes only when it sends a frame or closes: while it
  // writes directly they stay shared in our cache, and a poll is three loads.
  bool inbound_idle() const override {
    return rx_->head.load(std::memory_order_relaxed) == rx_->tail.load(std::memory_order_relaxed) &&
           !rx_->writer_closed.load(std::memory_order_relaxed);
  }

  DirectResult direct_atomic_add(const RegionDescriptor& target, uint64_t offset, uint64_t add,
                                 uint64_t* old) override {
    if (!direct_target(target)) return DirectResult::kRefused;
    DirectWrite write(*this);
    if (!write.entered) return DirectResult::kBusy;
    uint64_t* word = checked_word(target, offset);
    if (!word) return DirectResult::kRefused;
    const uint64_t prev = __atomic_fetch_add(word, add, __ATOMIC_SEQ_CST);
    if (old) *old = prev;
    wake_sleeping_waiter();
    return DirectResult::kDone;
  }

  DirectResult direct_put_signal(const RegionDescriptor& target, uint64_t offset, const void* src, uint64_t len,
                                 const RemoteWord* signal) override {
    if (!direct_target(target) || (signal && !direct_target(signal->target))) return DirectResult::kRefused;
    // The target's board, not the descriptor, says where and whether: a
    // forged or stale descriptor falls back to the ring and is refused there.
    // Both ranges are checked before either is written, inside one direct
    // write, so anything but kDone has written nothing.
    DirectWrite write(*this);
    if (!write.entered) return DirectResult::kBusy;
    char* dst = checked_range(target.region_id, offset, len, kAccessRemoteWrite);
    if (!dst) return DirectResult::kRefused;
    uint64_t* word = signal ? checked_word(signal->target, signal->offset) : nullptr;
    if (signal && !word) return DirectResult::kRefused;
    std::memcpy(dst, src, len);
    if (!signal) return DirectResult::kDone;
    // seq_cst (a locked add on x86): ordered after the data for whoever acquires the word.
    __atomic_fetch_add(word, signal->add, __ATOMIC_SEQ_CST);
    wake_sleeping_waiter();
    return DirectResult::kDone;
  }

 private:
  // One direct write of this side at a time: its check and copy happen with
  // this side's writer count at 1, entered by a compare-exchange from 0.
  // That one locked instruction is both the mutual exclusion of this
  // process's threads (the kept views and the mappings below are used only
  // inside) and the full barrier the deregistering owner relies on (its
  // board store, then its load of the count, against our count store, then
  // our board load). Leaving needs only release order: a plain store.
  struct DirectWrite {
    explicit DirectWrite(ShmStream& s) : count(s.writers_) {
      uint32_t idle = 0;
      entered = count->compare_exchange_strong(idle, 1, std::memory_order_seq_cst);
    }
    ~DirectWrite() {
      if (entered) count->store(0, std::memory_order_release);
    }
    std::atomic<uint32_t>* count;
    bool entered = false;
  };

  bool direct_target(const RegionDescriptor& target) const {
    return direct_min_ != UINT64_MAX && target.owner_pid == peer_pid_ && target.shared_fd >= 0;
  }

  // Where [offset, offset+len) of the peer's region `id` is mapped here, if
  // the peer's board allows `need` there; null otherwise. Call under a
  // DirectWrite. The view of each recent region is kept with the board
  // entry's sequence number: while that is unchanged (one load), so is the
  // entry, and the rights and bounds are checked against the kept view.
  char* checked_range(uint64_t id, uint64_t offset, uint64_t len, uint32_t need) {
    KnownRegion& k = known_[id % kKnownRegions];
    if (k.id != id || !peer_board_->unchanged(id, k.seq)) {
      k.id = 0;
      BoardView v;
      uint64_t seq;
      if (!peer_board_->read(id, &v, &seq)) return nullptr;
      char* base = peer_mapping(id, v);
      if (!base) return nullptr;
      k = KnownRegion{id, seq, v.size, v.access, base + v.shared_offset};
    }
    if ((k.access & need) != need || !(offset <= k.size && len <= k.size - offset)) return nullptr;
    return k.base + offset;
  }

  // The aligned u64 at `offset` of the peer's region if its board allows an
  // atomic there, else null. Call under a DirectWrite.
  uint64_t* checked_word(const RegionDescriptor& target, uint64_t offset) {
    char* word = checked_range(target.region_id, offset, 8, kAccessRemoteAtomic);
    // Mappings are page-aligned: the address is aligned iff the owner's offset is.
    if (!word || reinterpret_cast<uintptr_t>(word) % 8 != 0) return nullptr;  // atomics need an aligned word
    return reinterpret_cast<uint64_t*>(word);
  }

  // A peer's waiter asleep on our ring would not notice a change that
  // bypassed it (seq_cst: ordered after the write, against its count and
  // its readiness check).
  void wake_sleeping_waiter() {
    if (tx_->waiter_sleeping.load(std::memory_order_seq_cst)) {
      tx_->data_seq.fetch_add(1, std::memory_order_release);
      futex_wake_all(reinterpret_cast<uint32_t*>(&tx_->data_seq), true);
    }
  }

  void copy_out(char* dst, uint64_t pos, size_t n) const {
    size_t at = static_cast<size_t>(pos & (capacity_ - 1));
    size_t first = std::min<size_t>(n, capacity_ - at);
    std::memcpy(dst, rx_data_ + at, first);
    if (first < n) std::memcpy(dst + first, rx_data_, n - first);
  }
  void copy_in(uint64_t pos, const char* src, size_t n) {
    size_t at = static_cast<size_t>(pos & (capacity_ - 1));
    size_t first = std::min<size_t>(n, capacity_ - at);
    std::memcpy(tx_data_ + at, src, first);
    if (first < n) std::memcpy(tx_data_, src + first, n - first);
  }

  // Maps the peer's memfd (through /proc/<pid>/fd) once per region; null if
  // the kernel refuses (another user, ptrace policy) - then the ring is used.
  // `v` is the board's entry for region `id` (checked by the caller).
  char* peer_mapping(uint64_t id, const BoardView& v) {
    auto it = peer_maps_.find(id);
    if (it != peer_maps_.end()) return it->second ? it->second->data() : nullptr;
    std::unique_ptr<Mapping> mapping;
    std::string path = "/proc/" + std::to_string(peer_pid_) + "/fd/" + std::to_string(v.shared_fd);
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) >= v.shared_offset + v.size) {
      void* addr = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (addr != MAP_FAILED) mapping = std::make_unique<Mapping>(addr, static_cast<size_t>(st.st_size));
    }
    if (fd >= 0) ::close(fd);
    if (!mapping) LAMINA_INFO("shm transport: cannot map " + path + "; puts to that region use the ring");
    char* data = mapping ? mapping->data() : nullptr;
    peer_maps_[id] = std::move(mapping);
    return data;
  }

  std::map<uint64_t, std::unique_ptr<Mapping>> peer_maps_;  // by peer region id
  // The views checked_range keeps, direct-mapped by region id (a put and its
  // signal are two regions). Used inside a DirectWrite only.
  struct KnownRegion {
    uint64_t id = 0;  // region ids start at 1: 0 is an empty entry
    uint64_t seq = 0;
    uint64_t size = 0;
    uint32_t access = 0;
    char* base = nullptr;  // the region's first byte in our mapping
  };
  static constexpr size_t kKnownRegions = 4;
  KnownRegion known_[kKnownRegions];
  uint64_t direct_min_ = UINT64_MAX;
  std::unique_ptr<PeerBoard> peer_board_;
  std::atomic<uint32_t>* writers_ = nullptr;
  std::shared_ptr<Mapping> mapping_;
  SegmentHeader* header_;
  int side_;
  int peer_pid_;
  int pidfd_ = -1;
  uint64_t capacity_;
  // Ours alone; atomic because the waits read them outside the rx/tx locks.
  std::atomic<uint64_t> rx_tail_{0};  // bytes consumed from rx
  std::atomic<uint64_t> tx_head_{0};  // bytes written to tx
  uint64_t pull_min_ = UINT64_MAX;
  RingControl* tx_;
  RingControl* rx_;
  char* tx_data_;
  char* rx_data_;
};

uint64_t round_up_pow2(uint64_t x) {
  uint64_t p = 4096;
  while (p < x) p <<= 1;
  return p;
}

std::string random_segment_name() {
  std::random_device rd;
  char buf[64];
  std::snprintf(buf, sizeof(buf), "/lamina-net-%d-%08x%08x", static_cast<int>(getpid()), rd(), rd());
  return buf;
}

class ShmTransport : public Transport {
 public:
  explicit ShmTransport(const TransportContext& ctx) : ctx_(ctx) {
    try {
      board_ = std::make_unique<RegionBoard>();
    } catch (const Error& e) {
      LAMINA_INFO(std::string("shm transport: no region board (") + e.what() + "); peers put through the ring");
    }
  }
  const char* name() const override { return "shm"; }

  void register_region(Region& region) override {
    if (board_) board_->publish(region);
  }
  // After the region left the board, no new direct write can start; wait
  // (bounded) for those that passed the check before, on every channel.
  void deregister_region(Region& region) override {
    if (!board_ || region.shared_fd < 0) return;
    board_->withdraw(region);
    std::vector<std::pair<std::shared_ptr<Mapping>, int>> live;
    {
      std::lock_guard<std::mutex> lock(segments_mutex_);
      std::erase_if(segments_, [](const auto& s) { return s.first.expired(); });
      for (auto& [weak, side] : segments_) {
        if (auto m = weak.lock()) live.emplace_back(std::move(m), side);
      }
    }
    Deadline deadline = Deadline::after_seconds(ctx_.connect_timeout_s);
    for (auto& [mapping, side] : live) {
      auto* header = reinterpret_cast<SegmentHeader*>(mapping->data());
      Backoff backoff(20000);
      while (header->direct_writers[1 - side].n.load(std::memory_order_seq_cst) != 0 && !deadline.expired()) {
        backoff.pause();
      }
    }
  }

  std::unique_ptr<Connection> connect(const ConnectParams& params) override {
    const int side = params.self_rank < params.peer_rank ? 0 : 1;
    const std::string key = params.key_prefix + "/segment";
    std::shared_ptr<Mapping> mapping;
    SegmentHeader* header = nullptr;
    uint64_t ring_bytes = 0;
    if (side == 0) {
      ring_bytes = round_up_pow2(static_cast<uint64_t>(setting_int("SHM_RING_BYTES")));
      size_t total = kHeaderBytes + 2 * ring_bytes;
      std::string name = random_segment_name();
      int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
      if (fd < 0) throw_errno("shm transport: shm_open(" + name + ")", errno);
      if (ftruncate(fd, static_cast<off_t>(total)) != 0) {
        int err = errno;
        ::close(fd);
        shm_unlink(name.c_str());
        throw_errno("shm transport: ftruncate " + std::to_string(total) + " bytes (is /dev/shm large enough?)", err);
      }
      void* addr = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      ::close(fd);
      if (addr == MAP_FAILED) {
        int err = errno;
        shm_unlink(name.c_str());
        throw_errno("shm transport: mmap", err);
      }
      mapping = std::make_shared<Mapping>(addr, total);
      header = new (addr) SegmentHeader();
      header->magic = kSegmentMagic;
      header->ring_bytes = ring_bytes;
      header->board_fd[0].store(board_ ? board_->fd() : -1);
      header->board_fd[1].store(-1);
      header->pid[0].store(getpid());
      header->probe_addr[0].store(reinterpret_cast<uint64_t>(&g_probe_word));
      params.store->set(key, name + ";" + std::to_string(total));
      // Wait until the peer has mapped it, then remove the name so a crash
      // later cannot leak the segment.
      Backoff backoff(0);
      while (header->attached.load(std::memory_order_acquire) == 0) {
        if (params.deadline.expired()) {
          shm_unlink(name.c_str());
          throw_timeout("waiting for rank " + std::to_string(params.peer_rank) + " to attach the shm channel");
        }
        backoff.pause();
      }
      shm_unlink(name.c_str());
    } else {
      // The record may be a restarted peer's previous one (its segment is
      // gone): keep reading until a segment opens or the deadline passes.
      std::string value, name;
      size_t total = 0;
      int fd = -1;
      for (;;) {
        value = params.store->get(key, params.deadline);
        auto semi = value.find(';');
        if (semi == std::string::npos) throw_system("bad shm segment record '" + value + "' in the store");
        name = value.substr(0, semi);
        total = std::stoull(value.substr(semi + 1));
        fd = shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0600);
        if (fd >= 0) break;
        const int err = errno;
        if (err != ENOENT || params.deadline.expired()) {
          throw_errno("shm transport: cannot open rank " + std::to_string(params.peer_rank) + "'s segment " + name +
                          (err == ENOENT ? " (the record in the store is stale - the peer restarted and has not "
                                           "opened the channel again - or the peer is on another host)"
                                         : ""),
                      err);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      void* addr = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      ::close(fd);
      if (addr == MAP_FAILED) throw_errno("shm transport: mmap", errno);
      mapping = std::make_shared<Mapping>(addr, total);
      header = reinterpret_cast<SegmentHeader*>(addr);
      ring_bytes = header->ring_bytes;  // read once: the creator may not change it under us
      if (header->magic != kSegmentMagic || ring_bytes == 0 || (ring_bytes & (ring_bytes - 1)) != 0 ||
          kHeaderBytes + 2 * ring_bytes != total) {
        throw_system("shm segment " + name + " is not a lamina-net channel");
      }
      header->board_fd[1].store(board_ ? board_->fd() : -1);
      header->pid[1].store(getpid());
      header->probe_addr[1].store(reinterpret_cast<uint64_t>(&g_probe_word));
      header->attached.store(1, std::memory_order_release);
    }
    int peer_pid = header->pid[1 - side].load();
    uint64_t peer_probe = header->probe_addr[1 - side].load();
    uint64_t pull_min = static_cast<uint64_t>(setting_int("SHM_SINGLE_COPY_MIN"));
    if (pull_min == 0) pull_min = UINT64_MAX;
    {
      std::lock_guard<std::mutex> lock(segments_mutex_);
      segments_.emplace_back(mapping, side);
    }
    auto stream = std::make_unique<ShmStream>(std::move(mapping), side, ring_bytes, peer_pid, peer_probe, pull_min);
    auto conn = std::make_unique<StreamConnection>("shm", params.peer_rank, std::move(stream), params.regions,
                                                   params.on_inbound);
    conn->start();
    return conn;
  }

 private:
  TransportContext ctx_;
  std::unique_ptr<RegionBoard> board_;
  std::mutex segments_mutex_;
  std::vector<std::pair<std::weak_ptr<Mapping>, int>> segments_;  // every channel's segment, and our side
};

}  // namespace

std::unique_ptr<Transport> make_shm_transport(const TransportContext& ctx) {
  return std::make_unique<ShmTransport>(ctx);
}

}  // namespace lamina
