// Direct check of the verbs transport below the channel layer: two ranks as
// two threads of one process, each with its own VerbsTransport on the same
// device, connected through an in-memory store. Needs an RDMA device (run it
// in the Soft-RoCE guest); exits 77 ("skipped") when verbs are not available.
//
// Build (tests/verbs/build_cpp_check.sh does this):
//   g++ -std=c++20 -O2 -Icsrc tests/verbs/cpp/verbs_transport_check.cpp <core + verbs sources> -ldl -lpthread
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/error.hpp"
#include "transports/factory.hpp"

using namespace lamina;

namespace {

int g_failures = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "CHECK failed %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)

class MemoryStore final : public KeyValueStore {
 public:
  void set(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mutex_);
    values_[key] = value;
    changed_.notify_all();
  }
  std::string get(const std::string& key, Deadline deadline) override {
    std::unique_lock<std::mutex> lock(mutex_);
    while (values_.find(key) == values_.end()) {
      if (deadline.expired()) throw_timeout("store get " + key);
      changed_.wait_for(lock, std::chrono::milliseconds(5));
    }
    return values_[key];
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::string> values_;
};

// Spins on op completion while driving the connection (what OpState::wait does).
bool wait_op(Connection& c, const OpRef& op, double seconds = 20) {
  Deadline deadline = Deadline::after_seconds(seconds);
  while (!op->done()) {
    c.progress();
    if (deadline.expired()) return false;
  }
  return !op->failed();
}

struct Rank {
  explicit Rank(int r) : rank(r) {}
  int rank;
  RegionTable regions;
  std::unique_ptr<Transport> transport;
  std::unique_ptr<Connection> connection;
  std::vector<uint8_t> data;          // remote-writable target
  std::vector<uint64_t> words;        // remote-atomic target
  std::vector<uint8_t> source;        // registered source
  std::shared_ptr<Region> data_region, word_region, source_region;
};

RegionDescriptor descriptor(const Region& region, int owner) {
  RegionDescriptor d;
  d.owner_rank = owner;
  d.region_id = region.id;
  d.addr = reinterpret_cast<uint64_t>(region.base);
  d.size = region.size;
  d.access = region.access;
  d.rkey = region.rkey;
  return d;
}

void setup(Rank& r, MemoryStore& store, const std::string& prefix) {
  TransportContext context;
  context.rank = r.rank;
  context.world_size = 2;
  context.store = &store;
  context.regions = &r.regions;
  r.transport = make_verbs_transport(context, VerbsOptions{});
  r.data.assign(8 << 20, 0);
  r.words.assign(64, 0);
  r.source.assign(8 << 20, 0);
  r.data_region = r.regions.add(r.data.data(), r.data.size(), kAccessLocal | kAccessRemoteWrite, MemoryKind::kHost, -1);
  r.word_region = r.regions.add(r.words.data(), r.words.size() * 8, kAccessLocal | kAccessRemoteAtomic | kAccessRemoteWrite,
                                MemoryKind::kHost, -1);
  r.source_region = r.regions.add(r.source.data(), r.source.size(), kAccessLocal, MemoryKind::kHost, -1);
  r.transport->register_region(*r.data_region);
  r.transport->register_region(*r.word_region);
  r.transport->register_region(*r.source_region);
  ConnectParams params;
  params.self_rank = r.rank;
  params.peer_rank = 1 - r.rank;
  params.key_prefix = prefix;
  params.store = &store;
  params.regions = &r.regions;
  params.deadline = Deadline::after_seconds(30);
  r.connection = r.transport->connect(params);
}

// Runs a helper thread's body; an exception counts as a failure instead of terminating.
template <typename Body>
void guarded(Body body) {
  try {
    body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helper thread: %s\n", e.what());
    ++g_failures;
  }
}

// Connects both ranks concurrently; rethrows the first failure.
void connect_pair(Rank& a, Rank& b, MemoryStore& store, const std::string& prefix) {
  std::exception_ptr b_error;
  std::thread tb([&] {
    try {
      setup(b, store, prefix);
    } catch (...) {
      b_error = std::current_exception();
    }
  });
  std::exception_ptr a_error;
  try {
    setup(a, store, prefix);
  } catch (...) {
    a_error = std::current_exception();
  }
  tb.join();
  if (a_error) std::rethrow_exception(a_error);
  if (b_error) std::rethrow_exception(b_error);
}

uint64_t checksum(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

void run_checks() {
  MemoryStore store;
  Rank a(0), b(1);
  connect_pair(a, b, store, "check/1");
  std::printf("connected\n");
  std::mt19937_64 rng(42);
  const RegionDescriptor b_data = descriptor(*b.data_region, 1);
  const RegionDescriptor b_words = descriptor(*b.word_region, 1);

  // Puts of many sizes: registered (inline/staged/zero-copy) and unregistered sources.
  const size_t sizes[] = {1, 7, 64, 65, 4095, 32768, 32769, 100000, 1 << 20, 5 << 20};
  for (size_t size : sizes) {
    for (int registered = 0; registered < 2; ++registered) {
      std::vector<uint8_t> unregistered(size);
      uint8_t* src = registered ? a.source.data() + (rng() % 1024) : unregistered.data();
      for (size_t i = 0; i < size; ++i) src[i] = static_cast<uint8_t>(rng());
      const uint64_t dst_off = rng() % (b.data.size() - size);
      LocalSlice slice{src, size, registered ? a.source_region.get() : nullptr};
      RemoteSlice dst{b_data, dst_off};
      RemoteWord sig{b_words, 0, 1};
      const uint64_t before = __atomic_load_n(&b.words[0], __ATOMIC_ACQUIRE);
      auto op = std::make_shared<OpState>();
      a.connection->post_put(slice, dst, &sig, op, Deadline::after_seconds(20));
      CHECK(wait_op(*a.connection, op));
      if (op->failed()) std::fprintf(stderr, "put failed: %s\n", op->error().c_str());
      CHECK(__atomic_load_n(&b.words[0], __ATOMIC_ACQUIRE) == before + 1);
      CHECK(checksum(src, size) == checksum(b.data.data() + dst_off, size));
    }
  }
  std::printf("puts ok\n");

  // Many small puts + signals, then flush.
  for (int i = 0; i < 2000; ++i) {
    uint64_t value = i;
    LocalSlice slice{&value, 8, nullptr};
    RemoteSlice dst{b_data, uint64_t(i) * 8};
    RemoteWord sig{b_words, 8, 1};
    a.connection->post_put(slice, dst, &sig, nullptr, Deadline::after_seconds(20));
  }
  auto flush = std::make_shared<OpState>();
  a.connection->post_flush(flush, Deadline::after_seconds(20));
  CHECK(wait_op(*a.connection, flush));
  CHECK(b.words[1] == 2000);
  bool in_order = true;
  for (int i = 0; i < 2000; ++i) in_order &= reinterpret_cast<uint64_t*>(b.data.data())[i] == uint64_t(i);
  CHECK(in_order);
  std::printf("many puts + flush ok\n");

  // Atomic add returns the previous value.
  for (int i = 0; i < 100; ++i) {
    auto op = std::make_shared<OpState>();
    a.connection->post_atomic_add(RemoteWord{b_words, 16, 3}, op, Deadline::after_seconds(20));
    CHECK(wait_op(*a.connection, op));
    CHECK(op->value() == uint64_t(i) * 3);
  }
  CHECK(b.words[2] == 300);
  std::printf("atomics ok\n");

  // Send/recv: sizes around fragment boundaries and larger than all bounce buffers.
  const size_t msg_sizes[] = {0, 1, 32752, 32753, 65536, 3 << 20, 17};
  std::thread receiver([&] { guarded([&] {
    for (size_t size : msg_sizes) {
      std::vector<uint8_t> in(size + 10, 0xee);
      auto op = std::make_shared<OpState>();
      b.connection->post_recv(in.data(), in.size(), op);
      if (!wait_op(*b.connection, op)) {
        std::fprintf(stderr, "recv failed: %s\n", op->error().c_str());
        ++g_failures;
        return;
      }
      CHECK(op->value() == size);
      bool ok = true;
      for (size_t i = 0; i < size; ++i) ok &= in[i] == static_cast<uint8_t>(i * 7 + size);
      CHECK(ok);
    }
  }); });
  for (size_t size : msg_sizes) {
    std::vector<uint8_t> out(size);
    for (size_t i = 0; i < size; ++i) out[i] = static_cast<uint8_t>(i * 7 + size);
    a.connection->post_send(out.data(), size, nullptr, Deadline::after_seconds(30));
  }
  receiver.join();
  std::printf("send/recv ok\n");

  // Many messages both ways, nothing lost or reordered.
  const int kMessages = 3000;
  std::thread echo([&] { guarded([&] {
    for (int i = 0; i < kMessages; ++i) {
      uint64_t v = 0;
      auto op = std::make_shared<OpState>();
      b.connection->post_recv(&v, sizeof(v), op);
      if (!wait_op(*b.connection, op) || v != uint64_t(i)) {
        ++g_failures;
        std::fprintf(stderr, "message %d: got %llu\n", i, (unsigned long long)v);
        return;
      }
      b.connection->post_send(&v, sizeof(v), nullptr, Deadline::after_seconds(20));
    }
  }); });
  for (int i = 0; i < kMessages; ++i) {
    uint64_t v = i;
    a.connection->post_send(&v, sizeof(v), nullptr, Deadline::after_seconds(20));
  }
  for (int i = 0; i < kMessages; ++i) {
    uint64_t v = 0;
    auto op = std::make_shared<OpState>();
    a.connection->post_recv(&v, sizeof(v), op);
    CHECK(wait_op(*a.connection, op));
    if (v != uint64_t(i)) {
      CHECK(v == uint64_t(i));
      break;
    }
  }
  echo.join();
  std::printf("many messages ok\n");

  // A GPU source outside every registered region (issue 15, item 10): refused
  // with kUsage before anything is posted - the CPU must never inline or copy
  // from a device pointer. (A host word stands in: the flag is what counts.)
  {
    uint64_t v = 7;
    bool refused = false;
    try {
      a.connection->post_put(LocalSlice{&v, 8, nullptr, true}, RemoteSlice{b_data, 0}, nullptr, nullptr,
                             Deadline::after_seconds(5));
    } catch (const Error& e) {
      refused = e.kind() == ErrorKind::kUsage;
    }
    CHECK(refused);
    CHECK(!a.connection->failed(nullptr));
    std::printf("unregistered GPU source refused\n");
  }

  // Remote access error: wrong rkey.
  {
    RegionDescriptor bad = b_data;
    bad.rkey ^= 0x5a5a00;
    uint64_t v = 1;
    auto op = std::make_shared<OpState>();
    a.connection->post_put(LocalSlice{&v, 8, nullptr}, RemoteSlice{bad, 0}, nullptr, op, Deadline::after_seconds(20));
    wait_op(*a.connection, op);
    CHECK(op->failed());
    std::printf("bad rkey: %s\n", op->error().c_str());
    std::string why;
    CHECK(a.connection->failed(&why));
    bool sticky = false;
    try {
      a.connection->post_flush(nullptr, Deadline::after_seconds(1));
    } catch (const Error& e) {
      sticky = e.kind() == ErrorKind::kSystem && std::string(e.what()) == why;
    }
    CHECK(sticky);
  }
  // The peer notices too (its responder moved its QP to the error state):
  // either post_recv throws the sticky error or the receive fails.
  {
    uint64_t v = 0;
    auto op = std::make_shared<OpState>();
    const uint64_t t0 = now_ns();
    std::string error;
    try {
      b.connection->post_recv(&v, sizeof(v), op);
      wait_op(*b.connection, op, 15);
      CHECK(op->failed());
      error = op->error();
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::kSystem);
      error = e.what();
    }
    CHECK(b.connection->failed(nullptr));
    std::printf("peer side after failure (%.2f s): %s\n", (now_ns() - t0) / 1e9, error.c_str());
  }
  a.connection->close();
  b.connection->close();
  a.connection->close();  // idempotent
}

void run_close_check() {
  MemoryStore store;
  Rank a(0), b(1);
  connect_pair(a, b, store, "check/2");
  // A message sent right before close is still delivered; then the receiver sees "closed".
  uint64_t v = 99;
  a.connection->post_send(&v, sizeof(v), nullptr, Deadline::after_seconds(10));
  a.connection->close();
  uint64_t got = 0;
  auto op = std::make_shared<OpState>();
  b.connection->post_recv(&got, sizeof(got), op);
  CHECK(wait_op(*b.connection, op));
  CHECK(got == 99);
  auto op2 = std::make_shared<OpState>();
  try {
    b.connection->post_recv(&got, sizeof(got), op2);
    wait_op(*b.connection, op2, 10);
  } catch (const Error& e) {
    std::printf("post_recv after peer close threw: %s\n", e.what());
  }
  std::string why;
  CHECK(b.connection->failed(&why));
  std::printf("after peer close: %s\n", why.c_str());
}

// Back-pressure with a small unexpected-message buffer (1 KiB): the sender
// stalls once the receiver's bounce buffers and that buffer are full; a send
// that times out before anything went out leaves the connection usable, one
// that times out half-way fails it (the stream cannot resynchronize).
void run_backpressure_check() {
  setenv("LAMINA_NET_MAX_UNEXPECTED_BYTES", "1024", 1);
  MemoryStore store;
  Rank a(0), b(1);
  connect_pair(a, b, store, "check/3");
  unsetenv("LAMINA_NET_MAX_UNEXPECTED_BYTES");
  int sent = 0;
  try {
    for (;; ++sent) {
      uint64_t v = 1000 + sent;
      a.connection->post_send(&v, sizeof(v), nullptr, Deadline::after_seconds(1));
    }
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::kTimeout);
    std::printf("back-pressure after %d messages: %s\n", sent, e.what());
  }
  // Bounce buffers + unexpected buffer; credits go back in batches of 8, so
  // up to 7 may still be unannounced when the receiver's buffer is full.
  CHECK(sent <= 32 + 1024 / 8 && sent >= 32 + 1024 / 8 - 7);
  CHECK(!a.connection->failed(nullptr));
  for (int i = 0; i < sent; ++i) {
    uint64_t v = 0;
    auto op = std::make_shared<OpState>();
    b.connection->post_recv(&v, sizeof(v), op);
    CHECK(wait_op(*b.connection, op));
    if (v != uint64_t(1000 + i)) {
      CHECK(v == uint64_t(1000 + i));
      break;
    }
  }
  {
    uint64_t v = 7, got = 0;
    auto op = std::make_shared<OpState>();
    b.connection->post_recv(&got, sizeof(got), op);
    a.connection->post_send(&v, sizeof(v), nullptr, Deadline::after_seconds(10));
    CHECK(wait_op(*b.connection, op));
    CHECK(got == 7);
  }
  std::printf("back-pressure ok\n");
  std::vector<uint8_t> big(4 << 20, 1);
  bool timed_out = false;
  try {
    a.connection->post_send(big.data(), big.size(), nullptr, Deadline::after_seconds(1));
  } catch (const Error& e) {
    timed_out = e.kind() == ErrorKind::kTimeout;
    std::printf("partial send: %s\n", e.what());
  }
  CHECK(timed_out);
  CHECK(a.connection->failed(nullptr));
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  std::string why;
  if (!verbs_available(&why)) {
    std::printf("SKIP: verbs not available: %s\n", why.c_str());
    return 77;
  }
  try {
    run_checks();
    run_close_check();
    run_backpressure_check();
  } catch (const Error& e) {
    std::fprintf(stderr, "unexpected error: %s\n", e.what());
    return 1;
  }
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
