// libFuzzer target: the frames a tcp or shm peer sends (csrc/transports/wire.hpp),
// fed to the real receive path of StreamConnection - header validation, region
// lookup and bounds, signals, atomics, acks, two-sided messages, close reasons.
// The input arrives in chunks whose sizes the input also chooses, so partial
// headers and payloads split across reads are covered. Regions are registered
// as a target would; ASan reports any write outside them.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/error.hpp"
#include "memory/region.hpp"
#include "transports/stream_connection.hpp"

namespace {

// The peer's bytes, handed out a chunk at a time; whatever we write is dropped.
class FuzzStream : public lamina::ByteStream {
 public:
  FuzzStream(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t read_some(void* buf, size_t max, bool* eof) override {
    if (at_ >= size_) {
      *eof = true;
      return 0;
    }
    // First byte of each chunk: its length (1..256), so reads split frames anywhere.
    size_t want = static_cast<size_t>(data_[at_++]) + 1;
    size_t n = std::min({want, max, size_ - at_});
    std::memcpy(buf, data_ + at_, n);
    at_ += n;
    return n;
  }
  size_t write_some(const struct iovec* iov, int iovcnt) override {
    size_t n = 0;
    for (int i = 0; i < iovcnt; ++i) n += iov[i].iov_len;
    return n;
  }
  void wait_readable(int, const std::function<bool()>*) override {}
  void wait_writable(int) override {}
  void wake() override {}
  void shutdown() override {}
  bool done() const { return at_ >= size_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setenv("LAMINA_NET_LOG", "error", 0);  // refusals are expected here, by the million
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lamina;
  // Ids 1..3, as a fresh table hands them out: a full-access region, a
  // LOCAL-only one and an atomic word, each in a heap block of its exact size.
  RegionTable regions;
  std::vector<uint8_t> data_block(4096), local_block(64);
  std::vector<uint64_t> word(1);
  regions.add(data_block.data(), data_block.size(), kAccessRemoteWrite | kAccessRemoteRead | kAccessRemoteAtomic,
              MemoryKind::kHost, -1);
  regions.add(local_block.data(), local_block.size(), kAccessLocal, MemoryKind::kHost, -1);
  regions.add(word.data(), sizeof(uint64_t), kAccessRemoteAtomic, MemoryKind::kHost, -1);
  auto owned = std::make_unique<FuzzStream>(data, size);
  FuzzStream* stream = owned.get();
  StreamConnection conn("fuzz", 1, std::move(owned), &regions, [] {});
  // A posted receive, so that SEND frames are delivered, not only queued.
  std::vector<uint8_t> inbox(256);
  auto recv = std::make_shared<OpState>();
  recv->is_recv = true;
  conn.post_recv(inbox.data(), inbox.size(), recv);
  for (int steps = 0; steps < 100000 && !stream->done() && !conn.failed(nullptr); ++steps) {
    try {
      conn.progress();
    } catch (const Error&) {
      break;  // a typed refusal is an answer, not a finding
    }
  }
  conn.close();
  return 0;
}
