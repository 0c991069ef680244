#include "memory/region.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "common/error.hpp"

namespace lamina {
namespace {

// Little-endian field packing; every supported host is little-endian, and the
// static_assert keeps it that way.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "lamina-net assumes a little-endian host");

template <typename T>
void put_field(std::string& out, size_t at, T value) {
  std::memcpy(&out[at], &value, sizeof(T));
}
template <typename T>
T get_field(const std::string& in, size_t at) {
  T value;
  std::memcpy(&value, &in[at], sizeof(T));
  return value;
}

// Wire layout of RegionDescriptor (80 bytes).
enum : size_t {
  kOffMagic = 0,       // u32
  kOffVersion = 4,     // u16
  kOffKind = 6,        // u16
  kOffOwnerRank = 8,   // u32
  kOffAccess = 12,     // u32
  kOffGroup = 16,      // u64
  kOffRegionId = 24,   // u64
  kOffAddr = 32,       // u64
  kOffSize = 40,       // u64
  kOffRkey = 48,       // u32
  kOffPid = 52,        // i32
  kOffHost = 56,       // u64
  kOffSharedFd = 64,   // i32 (-1: not shareable)
  kOffReserved = 68,   // u32, zero
  kOffSharedOff = 72,  // u64
};

}  // namespace

std::string RegionDescriptor::serialize() const {
  std::string out(kWireSize, '\0');
  put_field<uint32_t>(out, kOffMagic, kMagic);
  put_field<uint16_t>(out, kOffVersion, kVersion);
  put_field<uint16_t>(out, kOffKind, static_cast<uint16_t>(kind));
  put_field<uint32_t>(out, kOffOwnerRank, owner_rank);
  put_field<uint32_t>(out, kOffAccess, access);
  put_field<uint64_t>(out, kOffGroup, group_id);
  put_field<uint64_t>(out, kOffRegionId, region_id);
  put_field<uint64_t>(out, kOffAddr, addr);
  put_field<uint64_t>(out, kOffSize, size);
  put_field<uint32_t>(out, kOffRkey, rkey);
  put_field<int32_t>(out, kOffPid, owner_pid);
  put_field<uint64_t>(out, kOffHost, host_id);
  put_field<int32_t>(out, kOffSharedFd, shared_fd);
  put_field<uint64_t>(out, kOffSharedOff, shared_offset);
  return out;
}

RegionDescriptor RegionDescriptor::deserialize(const std::string& blob) {
  if (blob.size() != kWireSize) {
    throw_usage("region descriptor must be " + std::to_string(kWireSize) + " bytes, got " +
                std::to_string(blob.size()));
  }
  if (get_field<uint32_t>(blob, kOffMagic) != kMagic) throw_usage("not a lamina-net region descriptor (bad magic)");
  uint16_t version = get_field<uint16_t>(blob, kOffVersion);
  if (version != kVersion) {
    throw_usage("region descriptor version " + std::to_string(version) + " is not supported (expected " +
                std::to_string(kVersion) + ")");
  }
  // Zero now; refusing other values keeps the field free for a later version.
  if (get_field<uint32_t>(blob, kOffReserved) != 0) throw_usage("region descriptor has non-zero reserved bytes");
  RegionDescriptor d;
  uint16_t kind = get_field<uint16_t>(blob, kOffKind);
  if (kind > static_cast<uint16_t>(MemoryKind::kCuda)) throw_usage("region descriptor has unknown memory kind");
  d.kind = static_cast<MemoryKind>(kind);
  d.owner_rank = get_field<uint32_t>(blob, kOffOwnerRank);
  d.access = get_field<uint32_t>(blob, kOffAccess);
  d.group_id = get_field<uint64_t>(blob, kOffGroup);
  d.region_id = get_field<uint64_t>(blob, kOffRegionId);
  d.addr = get_field<uint64_t>(blob, kOffAddr);
  d.size = get_field<uint64_t>(blob, kOffSize);
  d.rkey = get_field<uint32_t>(blob, kOffRkey);
  d.owner_pid = get_field<int32_t>(blob, kOffPid);
  d.host_id = get_field<uint64_t>(blob, kOffHost);
  d.shared_fd = get_field<int32_t>(blob, kOffSharedFd);
  d.shared_offset = get_field<uint64_t>(blob, kOffSharedOff);
  if (d.access & ~static_cast<uint32_t>(kAccessAll)) throw_usage("region descriptor has unknown access bits");
  return d;
}

std::shared_ptr<Region> RegionTable::add(void* base, uint64_t size, uint32_t access, MemoryKind kind, int device) {
  if (base == nullptr) throw_usage("cannot register a null pointer");
  if (size == 0) throw_usage("cannot register an empty region");
  if (reinterpret_cast<uintptr_t>(base) + size < reinterpret_cast<uintptr_t>(base)) {
    throw_usage("region [base, base+size) overflows the address space");
  }
  if (access == 0 || (access & ~static_cast<uint32_t>(kAccessAll))) {
    throw_usage("invalid access flags " + std::to_string(access));
  }
  auto region = std::make_shared<Region>();
  region->base = base;
  region->size = size;
  region->access = access | kAccessLocal;
  region->kind = kind;
  region->device = device;
  std::unique_lock<std::shared_mutex> lock(mutex_);
  region->id = next_id_++;
  regions_[region->id] = region;
  return region;
}

void RegionTable::remove(uint64_t id, Deadline deadline) {
  std::shared_ptr<Region> region;
  {
    std::unique_lock<std::shared_mutex> lock(mutex_);
    auto it = regions_.find(id);
    if (it == regions_.end()) return;  // idempotent
    region = it->second;
    region->closed.store(true, std::memory_order_seq_cst);
    regions_.erase(it);
  }
  // New inbound ops can no longer find it; wait for those already writing.
  Backoff backoff;
  while (region->pins.load(std::memory_order_seq_cst) != 0) {
    if (deadline.expired()) {
      throw_timeout("deregistering region " + std::to_string(id) + ": inbound operations still write into it");
    }
    backoff.pause();
  }
}

std::shared_ptr<Region> RegionTable::pin_for_inbound(uint64_t id, uint64_t offset, uint64_t len, uint32_t need,
                                                     std::string* why) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto it = regions_.find(id);
  if (it == regions_.end()) {
    *why = "unknown region id " + std::to_string(id);
    return nullptr;
  }
  const auto& region = it->second;
  if (!region->contains(offset, len)) {
    *why = "range [" + std::to_string(offset) + ", +" + std::to_string(len) + ") outside region " +
           std::to_string(id) + " of " + std::to_string(region->size) + " bytes";
    return nullptr;
  }
  if ((region->access & need) != need) {
    *why = "region " + std::to_string(id) + " lacks access " + access_to_string(need & ~region->access);
    return nullptr;
  }
  region->pins.fetch_add(1, std::memory_order_acquire);
  return region;
}

std::shared_ptr<Region> RegionTable::find_containing(const void* ptr, uint64_t len) const {
  auto p = reinterpret_cast<uintptr_t>(ptr);
  std::shared_lock<std::shared_mutex> lock(mutex_);
  for (const auto& [id, region] : regions_) {
    auto b = reinterpret_cast<uintptr_t>(region->base);
    if (p >= b && p - b <= region->size && len <= region->size - (p - b)) return region;
  }
  return nullptr;
}

std::shared_ptr<Region> RegionTable::get(uint64_t id) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto it = regions_.find(id);
  return it == regions_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<Region>> RegionTable::all() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  std::vector<std::shared_ptr<Region>> out;
  for (const auto& [id, region] : regions_) out.push_back(region);
  return out;
}

size_t RegionTable::count() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return regions_.size();
}

SharedAllocation::SharedAllocation(uint64_t size) : size_(size) {
  if (size == 0) throw_usage("cannot allocate 0 bytes");
  fd_ = memfd_create("lamina-net-region", MFD_CLOEXEC);
  if (fd_ < 0) throw_errno("memfd_create", errno);
  if (ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    int err = errno;
    ::close(fd_);
    throw_errno("ftruncate of a " + std::to_string(size) + "-byte shared allocation", err);
  }
  addr_ = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (addr_ == MAP_FAILED) {
    int err = errno;
    ::close(fd_);
    throw_errno("mmap of a shared allocation", err);
  }
}

SharedAllocation::~SharedAllocation() {
  munmap(addr_, size_);
  ::close(fd_);
}

std::string access_to_string(uint32_t access) {
  std::string s;
  auto add = [&](uint32_t bit, const char* name) {
    if (access & bit) s += s.empty() ? name : std::string("|") + name;
  };
  add(kAccessLocal, "LOCAL");
  add(kAccessRemoteWrite, "REMOTE_WRITE");
  add(kAccessRemoteRead, "REMOTE_READ");
  add(kAccessRemoteAtomic, "REMOTE_ATOMIC");
  return s.empty() ? "NONE" : s;
}

}  // namespace lamina
