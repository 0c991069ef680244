// lamina-net: registered memory regions and their descriptors.
//
// A Region is local memory that lamina-net may read from (as a source) or
// that peers may write into, within the access rights it was registered with.
// A RegionDescriptor is what a peer needs to target it: handed out by the owner
// (serialized to a fixed 80-byte blob), it is a capability; a region is
// reachable remotely only through a descriptor and only within its bounds and
// rights.
//
// Lifetimes: the registering caller keeps the memory alive until the Region is
// deregistered. Deregistration waits (bounded) until no inbound operation is
// writing into the region, so memory can be freed right after it returns.
// Region ids are never reused within an endpoint, so a stale descriptor fails
// with "unknown region" instead of writing into newer memory.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/clock.hpp"

namespace lamina {

// Access rights, as a bit set.
enum Access : uint32_t {
  kAccessLocal = 1u << 0,         // may be a source or a local target
  kAccessRemoteWrite = 1u << 1,   // peers may put into it
  kAccessRemoteRead = 1u << 2,    // peers may read it (reserved for get)
  kAccessRemoteAtomic = 1u << 3,  // peers may atomic-add / signal into it
  kAccessAll = 0xfu,
};

enum class MemoryKind : uint32_t { kHost = 0, kCuda = 1 };

// Per-transport registration state attached to a Region (e.g. a verbs MR).
// Transports subclass it; the Region owns it and destroys it on deregister.
struct TransportRegistration {
  virtual ~TransportRegistration() = default;
};

// Transport slots in Region::registrations and fields of the descriptor.
enum TransportSlot : int { kSlotVerbs = 0, kSlotCount = 1 };

struct Region {
  uint64_t id = 0;
  void* base = nullptr;
  uint64_t size = 0;
  uint32_t access = 0;
  MemoryKind kind = MemoryKind::kHost;
  int device = -1;        // CUDA device ordinal for kCuda
  uint32_t rkey = 0;      // filled by a transport that needs one (verbs)
  uint32_t lkey = 0;
  std::unique_ptr<TransportRegistration> registrations[kSlotCount];
  // Set when the memory lies in a SharedAllocation: same-host peers map the
  // memfd and write with one memcpy.
  int shared_fd = -1;
  uint64_t shared_offset = 0;  // of base within the memfd

  // Inbound operations pin the region while they write into it.
  std::atomic<int> pins{0};
  std::atomic<bool> closed{false};

  bool contains(uint64_t offset, uint64_t len) const {
    return offset <= size && len <= size - offset;
  }
};

// What a peer needs to target a region. Fixed-size little-endian wire form.
struct RegionDescriptor {
  static constexpr uint32_t kMagic = 0x4c4e5244;  // "LNRD"
  static constexpr uint16_t kVersion = 1;
  static constexpr size_t kWireSize = 80;

  uint32_t owner_rank = 0;
  uint64_t group_id = 0;     // hash of the endpoint group; guards cross-group mixups
  uint64_t region_id = 0;
  uint64_t addr = 0;         // virtual address in the owner's process
  uint64_t size = 0;
  uint32_t access = 0;
  MemoryKind kind = MemoryKind::kHost;
  uint32_t rkey = 0;
  int32_t owner_pid = 0;     // for same-host single-copy (process_vm_readv)
  uint64_t host_id = 0;      // hash of the owner's host identity
  int32_t shared_fd = -1;    // memfd in the owner's process, or -1
  uint64_t shared_offset = 0;

  std::string serialize() const;
  // Throws kUsage on a malformed blob (wrong size, magic or version).
  static RegionDescriptor deserialize(const std::string& blob);
  bool contains(uint64_t offset, uint64_t len) const {
    return offset <= size && len <= size - offset;
  }
};

// An endpoint's table of local regions. Thread-safe.
class RegionTable {
 public:
  // Registers memory; throws kUsage for null/empty/overflowing ranges or an
  // overlap-free violation is NOT checked (regions may overlap, like verbs MRs).
  std::shared_ptr<Region> add(void* base, uint64_t size, uint32_t access, MemoryKind kind, int device);
  // Removes the region; waits until inbound writers unpin it (bounded).
  void remove(uint64_t id, Deadline deadline);
  // Looks up a region for an inbound operation and pins it. Returns null when
  // the id is unknown, the range is out of bounds or `need` rights are missing;
  // `why` then says which. The caller must call unpin().
  std::shared_ptr<Region> pin_for_inbound(uint64_t id, uint64_t offset, uint64_t len, uint32_t need,
                                          std::string* why) const;
  static void unpin(Region& region) { region.pins.fetch_sub(1, std::memory_order_release); }
  // The region containing [ptr, ptr+len) with the given rights, or null.
  std::shared_ptr<Region> find_containing(const void* ptr, uint64_t len) const;
  std::shared_ptr<Region> get(uint64_t id) const;
  size_t count() const;
  std::vector<std::shared_ptr<Region>> all() const;

 private:
  mutable std::shared_mutex mutex_;
  std::unordered_map<uint64_t, std::shared_ptr<Region>> regions_;
  uint64_t next_id_ = 1;
};

std::string access_to_string(uint32_t access);

// Host memory that same-host peers can map: a memfd mapped MAP_SHARED.
// Registering memory inside it lets the shm transport put with one memcpy
// straight into it (no ring, no kernel copy). Owns the fd and the mapping.
class SharedAllocation {
 public:
  explicit SharedAllocation(uint64_t size);  // throws kSystem / kUsage
  ~SharedAllocation();
  SharedAllocation(const SharedAllocation&) = delete;
  SharedAllocation& operator=(const SharedAllocation&) = delete;
  void* data() const { return addr_; }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
  void* addr_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace lamina
