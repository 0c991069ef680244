// lamina-net shm: the region board, a table of a rank's live shareable
// regions in memory that same-host peers map read-only.
//
// Why: an shm put into a peer's Endpoint.alloc memory is one memcpy by the
// sender, straight into the peer's memfd. The target's progress engine never
// sees it, so the target's rights must be checked by the sender against
// something the target controls - not against the descriptor, which the
// sender could have forged or kept past deregistration. The board is that:
// written only by the owner (a memfd mapped read-write there, read-only by
// peers), one 64-byte entry per region, read under a sequence lock.
//
// Deregistration: the owner clears the entry, then waits until no peer is
// inside a direct write (each channel's segment has a writer count per
// side, raised by the sender around its check and copy: check, then copy,
// under the count - so a write that passed the check finishes before the
// deregistration returns).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "memory/region.hpp"

namespace lamina {

struct alignas(64) BoardEntry {
  std::atomic<uint64_t> seq;  // odd while the owner rewrites the entry
  uint64_t region_id;         // 0: empty
  uint64_t size;
  uint64_t shared_offset;     // of the region's base within its memfd
  int32_t shared_fd;          // the memfd, in the owner's fd table
  uint32_t access;
  char pad[24];
};
static_assert(sizeof(BoardEntry) == 64, "one cache line per entry");

// What a sender may use of a region, as the owner published it.
struct BoardView {
  uint64_t size = 0;
  uint64_t shared_offset = 0;
  int32_t shared_fd = -1;
  uint32_t access = 0;
};

// The owner's side: created with the shm transport.
class RegionBoard {
 public:
  static constexpr uint32_t kEntries = 4096;  // regions by id modulo; a collision falls back to the ring
  RegionBoard();                              // throws kSystem when no memfd can be made
  ~RegionBoard();
  RegionBoard(const RegionBoard&) = delete;
  RegionBoard& operator=(const RegionBoard&) = delete;

  int fd() const { return fd_; }
  // Publishes a shareable host region (no-op for others or on a collision).
  void publish(const Region& region);
  // Clears its entry; the caller then waits for in-flight writers.
  void withdraw(const Region& region);

 private:
  int fd_ = -1;
  BoardEntry* entries_ = nullptr;
};

// A peer's board, mapped read-only by a sender.
class PeerBoard {
 public:
  // Maps /proc/<pid>/fd/<fd>; empty() when the kernel refuses.
  PeerBoard(int pid, int fd);
  ~PeerBoard();
  PeerBoard(const PeerBoard&) = delete;
  PeerBoard& operator=(const PeerBoard&) = delete;
  bool empty() const { return entries_ == nullptr; }
  // The owner's view of region `id` if it is live, with the entry's sequence
  // number at that view; false otherwise. The caller checks rights and
  // bounds against the view.
  bool read(uint64_t id, BoardView* out, uint64_t* seq) const;
  // True while region `id`'s entry has not been rewritten since read()
  // returned `seq`: the view from then still holds. One load (seq_cst: a
  // direct write orders it after raising its writer count).
  bool unchanged(uint64_t id, uint64_t seq) const {
    return entries_[id % RegionBoard::kEntries].seq.load(std::memory_order_seq_cst) == seq;
  }

 private:
  const BoardEntry* entries_ = nullptr;
};

}  // namespace lamina
