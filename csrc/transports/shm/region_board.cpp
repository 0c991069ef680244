#include "transports/shm/region_board.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "common/error.hpp"

namespace lamina {

namespace {
constexpr size_t kBoardBytes = sizeof(BoardEntry) * RegionBoard::kEntries;
}

RegionBoard::RegionBoard() {
  fd_ = memfd_create("lamina-net-board", MFD_CLOEXEC);
  if (fd_ < 0) throw_errno("shm transport: memfd_create for the region board", errno);
  if (ftruncate(fd_, static_cast<off_t>(kBoardBytes)) != 0) {
    int err = errno;
    ::close(fd_);
    throw_errno("shm transport: sizing the region board", err);
  }
  void* addr = mmap(nullptr, kBoardBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (addr == MAP_FAILED) {
    int err = errno;
    ::close(fd_);
    throw_errno("shm transport: mapping the region board", err);
  }
  entries_ = static_cast<BoardEntry*>(addr);  // a fresh memfd reads as zeros: every entry empty
}

RegionBoard::~RegionBoard() {
  if (entries_) munmap(entries_, kBoardBytes);
  if (fd_ >= 0) ::close(fd_);
}

void RegionBoard::publish(const Region& region) {
  if (region.shared_fd < 0 || region.kind != MemoryKind::kHost || region.id == 0) return;
  BoardEntry& e = entries_[region.id % kEntries];
  if (e.region_id != 0) return;  // taken by a live region: this one's puts use the ring
  const uint64_t s = e.seq.load(std::memory_order_relaxed);
  e.seq.store(s + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  e.size = region.size;
  e.shared_offset = region.shared_offset;
  e.shared_fd = region.shared_fd;
  e.access = region.access;
  e.region_id = region.id;
  e.seq.store(s + 2, std::memory_order_release);
}

void RegionBoard::withdraw(const Region& region) {
  if (region.id == 0) return;
  BoardEntry& e = entries_[region.id % kEntries];
  if (e.region_id != region.id) return;
  const uint64_t s = e.seq.load(std::memory_order_relaxed);
  e.seq.store(s + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  e.region_id = 0;
  e.access = 0;
  e.size = 0;
  // seq_cst: ordered before the caller's reads of the writer counts.
  e.seq.store(s + 2, std::memory_order_seq_cst);
}

PeerBoard::PeerBoard(int pid, int fd) {
  if (pid <= 0 || fd < 0) return;
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  int local = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (local < 0) return;
  void* addr = mmap(nullptr, kBoardBytes, PROT_READ, MAP_SHARED, local, 0);
  ::close(local);
  if (addr != MAP_FAILED) entries_ = static_cast<const BoardEntry*>(addr);
}

PeerBoard::~PeerBoard() {
  if (entries_) munmap(const_cast<BoardEntry*>(entries_), kBoardBytes);
}

bool PeerBoard::read(uint64_t id, BoardView* out, uint64_t* seq) const {
  if (!entries_ || id == 0) return false;
  const BoardEntry& e = entries_[id % RegionBoard::kEntries];
  const uint64_t before = e.seq.load(std::memory_order_seq_cst);
  if (before & 1) return false;
  // Plain reads of words the owner may be rewriting: the sequence check
  // after them discards a torn view.
  const uint64_t rid = __atomic_load_n(&e.region_id, __ATOMIC_RELAXED);
  BoardView v;
  v.size = __atomic_load_n(&e.size, __ATOMIC_RELAXED);
  v.shared_offset = __atomic_load_n(&e.shared_offset, __ATOMIC_RELAXED);
  v.shared_fd = __atomic_load_n(&e.shared_fd, __ATOMIC_RELAXED);
  v.access = __atomic_load_n(&e.access, __ATOMIC_RELAXED);
  std::atomic_thread_fence(std::memory_order_acquire);
  if (e.seq.load(std::memory_order_relaxed) != before || rid != id) return false;
  *out = v;
  *seq = before;
  return true;
}

}  // namespace lamina
