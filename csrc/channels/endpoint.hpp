// lamina-net: the endpoint (one per process and group) and its channels.
//
// An Endpoint owns the local RegionTable, the transports and the channels to
// peers. A Channel joins this rank and one peer over one transport; it checks
// every operation against the descriptors it is given (bounds, rights, owner,
// group) before the transport sees it, and offers bounded waits.
//
// Contracts:
// - Ordering: operations on one channel are applied at the target in issue
//   order; a put's signal is applied after its data (see transport.hpp).
// - Completion: put/send return when the source may be reused; the OpRef they
//   return (when asked for) completes when the data is applied at the target
//   (put) or handed to the transport (send). flush() waits until everything
//   issued before it is applied at the target.
// - Waits: every wait has a deadline; a timeout names the operation, the peer
//   and what was expected versus seen. Waiting threads drive progress
//   themselves (spin), then sleep until an inbound event.
// - Errors: a channel error is sticky (later operations fail fast with the
//   first reason); other channels are unaffected.
// - Lifetimes: a Region must outlive operations that use it (deregistration
//   waits for inbound writers); the Endpoint outlives its channels' use.
//   close() is idempotent on Endpoint and Channel.
// - Threads: all methods are thread-safe.
#pragma once

#include <sched.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <span>
#include <vector>

#include "common/kv_store.hpp"
#include "memory/region.hpp"
#include "transports/factory.hpp"
#include "transports/transport.hpp"

namespace lamina {

struct EndpointOptions {
  int rank = 0;
  int world_size = 1;
  std::string group = "default";
  double timeout_s = 60.0;          // default bound of blocking calls
  std::string tcp_host;             // advertised tcp address ("" = 127.0.0.1)
  std::vector<std::string> transports = {"shm", "tcp", "verbs"};  // enabled
  VerbsOptions verbs;
};

class Endpoint;

// Something built on an endpoint's channels and regions that must stop
// before they close (the device proxy): Endpoint::close() closes every live
// attachment first.
class EndpointAttachment {
 public:
  virtual ~EndpointAttachment() = default;
  virtual void close() = 0;  // idempotent
};

class Channel {
 public:
  Channel(Endpoint* endpoint, int peer, std::string transport, std::unique_ptr<Connection> connection);
  ~Channel();

  int peer() const { return peer_; }
  const std::string& transport() const { return transport_; }

  // One-sided put of [src, src+len) into dst at dst_offset; then, if signal is
  // given, add signal->add to that remote word. Returns when src may be reused.
  // src_device: src is CUDA memory (dst may be GPU memory too, per its
  // descriptor); signal words are always host memory.
  // With want_completion, the returned op completes when applied at the target.
  //
  // Inline, so that a small put without completion (the latency path) is the
  // transport's post and checks on the descriptors, no more: verbs posts a
  // put without signal that way, shm writes a put and its signal straight
  // into the target's memory. Everything else, and every error, goes through
  // put_general.
  OpRef put(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
            const RemoteWord* signal, bool want_completion, double timeout_s, bool src_device = false) {
    if (!want_completion && !src_device && src != nullptr && !closed_.load(std::memory_order_acquire) &&
        target_usable(dst, dst_offset, len, kAccessRemoteWrite)) {
      if (signal == nullptr ? connection_->try_post_small_put(src, len, RemoteSlice{dst, dst_offset})
                            : signal_usable(*signal) &&
                                  connection_->try_post_small_put_signal(src, len, dst, dst_offset, *signal)) {
        return nullptr;
      }
    }
    return put_general(src, len, dst, dst_offset, signal, want_completion, timeout_s, src_device);
  }
  // A batch of puts, in order: every one is checked first as put checks it
  // (a bad one throws kUsage and none is posted), then all are posted with as
  // few writes as the transport can (Connection::post_puts). ops[i].src.ptr,
  // len and device, dst and signal are the caller's; region is filled here.
  // Returns when the sources may be reused; with want_completion the op
  // completes when all are applied at the target.
  OpRef put_many(std::vector<PutOp>& ops, bool want_completion, double timeout_s);
  OpRef atomic_add(const RegionDescriptor& dst, uint64_t offset, uint64_t value, double timeout_s);
  // A signal with no data: add word.add to the peer's word, ordered after
  // every put issued before it; returns once posted (no old value, nothing
  // allocated). The same checks as atomic_add.
  void signal(const RemoteWord& word, double timeout_s);
  OpRef send(const void* data, uint64_t len, double timeout_s);
  OpRef recv(void* buffer, uint64_t capacity);
  OpRef flush(double timeout_s);

  // Waits for op; throws kTimeout naming `what`, or the op's/channel's error.
  void wait(const OpRef& op, double timeout_s, const std::string& what);
  // Non-blocking check; throws the op's error if it failed.
  bool test(const OpRef& op);
  void progress();
  bool failed(std::string* why) const;
  void close();
  bool closed() const { return closed_.load(); }
  Connection* connection() { return connection_.get(); }

 private:
  void check_open() const;
  void check_target(const RegionDescriptor& d, uint64_t offset, uint64_t len, uint32_t need, const char* what) const;
  // check_target's conditions without the messages; the inline put relies on
  // this one alone, so a condition added to one belongs in both.
  bool target_usable(const RegionDescriptor& d, uint64_t offset, uint64_t len, uint32_t need) const {
    return d.group_id == group_id_ && static_cast<int>(d.owner_rank) == peer_ && (d.access & need) == need &&
           d.contains(offset, len);
  }
  // put_general's checks of a signal word, the same way.
  bool signal_usable(const RemoteWord& w) const {
    return w.offset % 8 == 0 && w.target.kind == MemoryKind::kHost &&
           target_usable(w.target, w.offset, 8, kAccessRemoteAtomic);
  }
  // put's checks, with put's messages (kUsage).
  void check_put(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
                 const RemoteWord* signal, bool src_device) const;
  OpRef put_general(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
                    const RemoteWord* signal, bool want_completion, double timeout_s, bool src_device);
  double resolve(double timeout_s) const;

  Endpoint* endpoint_;
  uint64_t group_id_;  // the endpoint's, fixed: read on every put
  int peer_;
  std::string transport_;
  std::unique_ptr<Connection> connection_;
  std::atomic<bool> closed_{false};
};

class Endpoint {
 public:
  Endpoint(const EndpointOptions& options, std::shared_ptr<KeyValueStore> store);
  ~Endpoint();

  int rank() const { return options_.rank; }
  int world_size() const { return options_.world_size; }
  uint64_t group_id() const { return group_id_; }
  double default_timeout() const { return options_.timeout_s; }
  const EndpointOptions& options() const { return options_; }
  KeyValueStore& store() { return *store_; }

  // shared_fd / shared_offset: the memfd (and base's offset in it) when the
  // memory lies in a SharedAllocation; set before the transports see the
  // region, so same-host transports can publish it for single-copy puts.
  std::shared_ptr<Region> register_memory(void* base, uint64_t size, uint32_t access, MemoryKind kind, int device,
                                          int shared_fd = -1, uint64_t shared_offset = 0);
  void deregister(uint64_t region_id, double timeout_s);
  RegionDescriptor describe(const Region& region) const;
  RegionTable& regions() { return regions_; }

  // Both ranks call channel(peer, ...) with the same transport and tag.
  // transport: "tcp", "shm", "verbs" or "auto". Returns the existing channel
  // if one with this peer and tag exists.
  std::shared_ptr<Channel> channel(int peer, const std::string& transport, int tag, double timeout_s);
  // Which transport "auto" picks for peer, and why (for logs and `info`).
  std::string choose_transport(int peer, Deadline deadline, std::string* why);
  // Names of usable transports here; for verbs, *verbs_why says why not.
  std::vector<std::string> available_transports(std::string* verbs_why) const;

  // Waits until the u64 at region[offset] >= value. With `channel`, fails fast
  // when that channel fails; without, drives every channel and only times out.
  // Over transports whose writes land without progress (verbs), the first
  // few thousand polls read the word only (a word reached then returns even
  // if the channel failed meanwhile: the signal arrived).
  void wait_signal(const Region& region, uint64_t offset, uint64_t value, double timeout_s, Channel* channel);

  // Wake-up plumbing for waiting threads (called by transports on inbound).
  void notify_inbound();
  // Spins (driving `drive`) then sleeps until done() or the deadline. While
  // spinning, `drive` is progressed on every step, or on every 128th with
  // `sparse_progress` (when done() does not depend on it). The deadline is
  // looked at every 128th step, so one from after_seconds_from_first_look()
  // costs no clock read in a wait that ends sooner.
  template <typename Done>
  bool wait_until(Done done, Deadline deadline, std::span<Connection* const> drive, bool sparse_progress = false);

  // Closed (in attach order) before the channels when the endpoint closes.
  void attach(std::weak_ptr<EndpointAttachment> attachment);

  void close();
  bool closed() const { return closed_.load(); }

 private:
  void publish_info();
  std::vector<std::shared_ptr<Channel>> channels_snapshot();

  EndpointOptions options_;
  std::shared_ptr<KeyValueStore> store_;
  std::string prefix_;
  uint64_t group_id_ = 0;
  uint64_t host_id_ = 0;
  uint64_t secret_hi_ = 0, secret_lo_ = 0;
  RegionTable regions_;
  std::map<std::string, std::unique_ptr<Transport>> transports_;
  std::string verbs_unavailable_;
  std::mutex channels_mutex_;
  std::map<std::pair<int, int>, std::shared_ptr<Channel>> channels_;  // (peer, tag)
  std::vector<std::weak_ptr<EndpointAttachment>> attachments_;          // under channels_mutex_
  std::atomic<uint32_t> event_seq_{0};
  std::atomic<int> sleepers_{0};
  uint64_t spin_cycles_;  // LAMINA_NET_SPIN_US in cycle_counter() ticks
  std::atomic<bool> closed_{false};
};

uint64_t local_host_id();
uint64_t hash_string(const std::string& s);

// ---- template implementation

template <typename Done>
bool Endpoint::wait_until(Done done, Deadline deadline, std::span<Connection* const> drive, bool sparse_progress) {
  uint64_t start = 0;  // read at the first look: most waits end before it
  uint32_t spins = 0;
  for (;;) {
    if (done()) return true;
    // Every 128th step: the deadline (coarse clock; a vDSO call, so not on
    // every step) and the spin window (cycle counter: no system call, where
    // the precise clock of a VM (hpet) is a trip through the hypervisor that
    // also slows the other vCPUs). Sparse progress: on the first step (so
    // that every wait retires completions once) and every 128th; otherwise
    // on every 8th step, so that most polls are the word's load alone.
    const bool every_128th = (++spins & 127) == 0;
    if (every_128th && deadline.expired()) return done();
    bool did = false;
    if (sparse_progress ? (spins & 127) == 1 : (spins & 7) == 1) {
      for (Connection* c : drive) did |= c->progress();
    }
    if (did) continue;
    bool keep_spinning = true;
    if (every_128th) {
      const uint64_t now = cycle_counter();
      if (start == 0) start = now;
      keep_spinning = now - start < spin_cycles_;
    }
    if (keep_spinning) {
      // Short waits (a ping-pong round) poll flat out: no pause, no system
      // call. A pause takes ~140 cycles on Intel cores since Skylake and,
      // under emulation, a trip out of the translated code - either one is
      // added to noticing the arrival. Longer waits pause, and yield now and
      // then: on an oversubscribed machine the peer we wait for may need
      // this core.
      if (spins > 1024) {
        if ((spins & 63) == 0) sched_yield();
        cpu_relax();
      }
      continue;
    }
    if (deadline.expired()) return done();
    if (drive.size() == 1) {
      // One connection: sleep in its kernel object (socket / ring futex) and
      // keep driving it ourselves - one wake-up per message, no hand-off.
      drive[0]->wait_inbound_until(deadline.remaining_ms(2), std::function<bool()>(done));
      continue;
    }
    uint32_t seen = event_seq_.load(std::memory_order_acquire);
    bool direct = false;
    for (Connection* c : drive) {
      c->stop_driving();
      direct |= c->writes_directly();
    }
    // Writes that bypass every progress engine do not bump event_seq_: with
    // such a connection, sleep in short slices.
    const int slice_us = direct ? 100 : deadline.remaining_ms(10) * 1000;
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    if (!done()) futex_wait_us(reinterpret_cast<const uint32_t*>(&event_seq_), seen, slice_us, false);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }
}

}  // namespace lamina
