#include "channels/endpoint.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/settings.hpp"
#include "memory/cuda_memory.hpp"

namespace lamina {

uint64_t hash_string(const std::string& s) {
  // FNV-1a: stable across processes and builds (std::hash is not).
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t local_host_id() {
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  std::string boot_id;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::getline(f, boot_id);
  return hash_string(std::string(host) + "/" + boot_id);
}

namespace {

std::string to_hex(uint64_t hi, uint64_t lo) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(hi),
                static_cast<unsigned long long>(lo));
  return buf;
}

void parse_secret(const std::string& hex, uint64_t* hi, uint64_t* lo) {
  if (hex.size() != 32) throw_system("malformed group secret in the store");
  *hi = std::stoull(hex.substr(0, 16), nullptr, 16);
  *lo = std::stoull(hex.substr(16), nullptr, 16);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

// ------------------------------------------------------------------ Channel

namespace {
[[noreturn]] void throw_op_error(const OpState& op) {
  throw Error(op.error_kind(), op.error());
}
}  // namespace

Channel::Channel(Endpoint* endpoint, int peer, std::string transport, std::unique_ptr<Connection> connection)
    : endpoint_(endpoint),
      group_id_(endpoint->group_id()),
      peer_(peer),
      transport_(std::move(transport)),
      connection_(std::move(connection)) {}

Channel::~Channel() { close(); }

void Channel::check_open() const {
  if (closed_.load()) throw_usage("channel to rank " + std::to_string(peer_) + " is closed");
  if (!connection_->failed(nullptr)) return;  // the common case: no string to build
  std::string why;
  if (connection_->failed(&why)) throw_system(why);
}

double Channel::resolve(double timeout_s) const {
  return timeout_s < 0 ? endpoint_->default_timeout() : timeout_s;
}

void Channel::check_target(const RegionDescriptor& d, uint64_t offset, uint64_t len, uint32_t need,
                           const char* what) const {
  if (d.group_id != group_id_) throw_usage(std::string(what) + ": descriptor belongs to another group");
  if (static_cast<int>(d.owner_rank) != peer_) {
    throw_usage(std::string(what) + ": descriptor of rank " + std::to_string(d.owner_rank) +
                " used on the channel to rank " + std::to_string(peer_));
  }
  if ((d.access & need) != need) {
    throw_usage(std::string(what) + ": remote region was registered without " + access_to_string(need & ~d.access));
  }
  if (!d.contains(offset, len)) {
    throw_usage(std::string(what) + ": range [" + std::to_string(offset) + ", " + std::to_string(offset) + "+" +
                std::to_string(len) + ") is outside the remote region of " + std::to_string(d.size) + " bytes");
  }
}

void Channel::check_put(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
                        const RemoteWord* signal, bool src_device) const {
  if (len > 0 && src == nullptr) throw_usage("put: null source");
  check_target(dst, dst_offset, len, kAccessRemoteWrite, "put");
  if (signal) {
    if (signal->offset % 8 != 0) throw_usage("put: signal offset must be 8-byte aligned");
    check_target(signal->target, signal->offset, 8, kAccessRemoteAtomic, "put signal");
    if (signal->target.kind != MemoryKind::kHost) throw_usage("put signal: signal words must be host memory");
  }
  if (src_device) cuda_check_device_range(src, len);
}

OpRef Channel::put_many(std::vector<PutOp>& ops, bool want_completion, double timeout_s) {
  check_open();
  for (size_t i = 0; i < ops.size(); ++i) {
    const PutOp& op = ops[i];
    try {
      check_put(op.src.ptr, op.src.len, op.dst.target, op.dst.offset, op.has_signal ? &op.signal : nullptr,
                op.src.device);
    } catch (const Error& e) {
      throw Error(e.kind(), "put " + std::to_string(i) + " of the batch: " + e.what());
    }
  }
  // Sources' regions, for transports that need their keys; held until posted.
  std::vector<std::shared_ptr<Region>> held;
  for (PutOp& op : ops) {
    op.src.region = nullptr;
    if (!connection_->needs_source_region(op.src.len, op.src.device)) continue;
    held.push_back(endpoint_->regions().find_containing(op.src.ptr, op.src.len));
    op.src.region = held.back().get();
  }
  OpRef done = want_completion ? std::make_shared<OpState>() : nullptr;
  connection_->post_puts(ops.data(), ops.size(), done, Deadline::after_seconds(resolve(timeout_s)));
  return done;
}

OpRef Channel::put_general(const void* src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
                           const RemoteWord* signal, bool want_completion, double timeout_s, bool src_device) {
  check_open();
  check_put(src, len, dst, dst_offset, signal, src_device);
  RemoteSlice remote{dst, dst_offset};
  LocalSlice slice;
  slice.ptr = src;
  slice.len = len;
  std::shared_ptr<Region> region;
  if (connection_->needs_source_region(len, src_device)) region = endpoint_->regions().find_containing(src, len);
  slice.region = region.get();
  slice.device = src_device;
  OpRef op = want_completion ? std::make_shared<OpState>() : nullptr;
  connection_->post_put(slice, remote, signal, op, Deadline::after_seconds(resolve(timeout_s)));
  return op;
}

OpRef Channel::atomic_add(const RegionDescriptor& dst, uint64_t offset, uint64_t value, double timeout_s) {
  check_open();
  if (offset % 8 != 0) throw_usage("atomic_add: offset must be 8-byte aligned");
  check_target(dst, offset, 8, kAccessRemoteAtomic, "atomic_add");
  if (dst.kind != MemoryKind::kHost) throw_usage("atomic_add: atomic words must be host memory");
  auto op = std::make_shared<OpState>();
  connection_->post_atomic_add(RemoteWord{dst, offset, value}, op, Deadline::after_seconds(resolve(timeout_s)));
  return op;
}

void Channel::signal(const RemoteWord& word, double timeout_s) {
  check_open();
  if (word.offset % 8 != 0) throw_usage("signal: offset must be 8-byte aligned");
  check_target(word.target, word.offset, 8, kAccessRemoteAtomic, "signal");
  if (word.target.kind != MemoryKind::kHost) throw_usage("signal: signal words must be host memory");
  connection_->post_atomic_add(word, nullptr, Deadline::after_seconds(resolve(timeout_s)));
}

OpRef Channel::send(const void* data, uint64_t len, double timeout_s) {
  check_open();
  if (len > 0 && data == nullptr) throw_usage("send: null buffer");
  auto op = std::make_shared<OpState>();
  connection_->post_send(data, len, op, Deadline::after_seconds(resolve(timeout_s)));
  return op;
}

OpRef Channel::recv(void* buffer, uint64_t capacity) {
  // Messages that arrived before the peer closed stay receivable, so only a
  // local close is checked here; the transport fails the op when none is left.
  if (closed_.load()) throw_usage("channel to rank " + std::to_string(peer_) + " is closed");
  if (capacity > 0 && buffer == nullptr) throw_usage("recv: null buffer");
  auto op = std::make_shared<OpState>();
  op->is_recv = true;
  connection_->post_recv(buffer, capacity, op);
  return op;
}

OpRef Channel::flush(double timeout_s) {
  check_open();
  auto op = std::make_shared<OpState>();
  connection_->post_flush(op, Deadline::after_seconds(resolve(timeout_s)));
  return op;
}

void Channel::wait(const OpRef& op, double timeout_s, const std::string& what) {
  if (!op) return;
  double bound = resolve(timeout_s);
  Connection* conn = connection_.get();
  endpoint_->wait_until([&] { return op->done() || conn->failed(nullptr); },
                        Deadline::after_seconds_from_first_look(bound), std::span<Connection* const>(&conn, 1));
  if (op->failed()) throw_op_error(*op);
  if (op->done()) return;
  std::string why;
  if (conn->failed(&why)) throw_system(why);
  std::string withdrawn;
  if (op->is_recv) {
    // A timed-out receive must not keep a buffer the caller may free, nor
    // swallow the next message: withdraw it. If a message is being written
    // into it right now, let that finish (bounded), else close the channel.
    if (conn->cancel_recv(op)) {
      withdrawn = "; the receive was withdrawn";
      op->fail(what + " timed out and was withdrawn", ErrorKind::kTimeout);
    } else {
      endpoint_->wait_until([&] { return op->done() || conn->failed(nullptr); },
                            Deadline::after_seconds(endpoint_->default_timeout()),
                            std::span<Connection* const>(&conn, 1));
      if (op->done()) return wait(op, 0, what);
      close();
      withdrawn = "; a message was still arriving into it, so the channel was closed";
    }
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3g", bound);
  throw_timeout(what + " on the " + transport_ + " channel to rank " + std::to_string(peer_) +
                " did not complete within " + buf + " s" + withdrawn);
}

bool Channel::test(const OpRef& op) {
  if (!op) return true;
  if (!op->done()) connection_->progress();
  if (op->failed()) throw_op_error(*op);
  if (op->done()) return true;
  std::string why;
  if (connection_->failed(&why)) throw_system(why);
  return false;
}

void Channel::progress() { connection_->progress(); }

bool Channel::failed(std::string* why) const { return connection_->failed(why); }

void Channel::close() {
  if (closed_.exchange(true)) return;
  connection_->close();
}

// ------------------------------------------------------------------ Endpoint

Endpoint::Endpoint(const EndpointOptions& options, std::shared_ptr<KeyValueStore> store)
    : options_(options), store_(std::move(store)) {
  if (!store_) throw_usage("an endpoint needs a store");
  if (options_.world_size < 1) throw_usage("world_size must be >= 1");
  if (options_.rank < 0 || options_.rank >= options_.world_size) {
    throw_usage("rank " + std::to_string(options_.rank) + " is outside [0, " + std::to_string(options_.world_size) +
                ")");
  }
  if (options_.group.empty() || options_.group.find('/') != std::string::npos) {
    throw_usage("group name must be non-empty and contain no '/'");
  }
  if (!(options_.timeout_s > 0)) throw_usage("timeout must be > 0 seconds");
  if (!(options_.timeout_s <= kMaxBoundSeconds)) {
    throw_usage("timeout " + std::to_string(options_.timeout_s) + " s is above the largest bound (1e9 s)");
  }
  for (const auto& t : options_.transports) {
    if (t != "tcp" && t != "shm" && t != "verbs") throw_usage("unknown transport '" + t + "'");
  }
  spin_cycles_ = cycles_for_ns(spin_window_us() * 1000);
  prefix_ = "ln/" + options_.group;
  group_id_ = hash_string(options_.group);
  host_id_ = local_host_id();
  Deadline deadline = Deadline::after_seconds(options_.timeout_s);
  if (options_.rank == 0) {
    std::random_device rd;
    uint64_t hi = (static_cast<uint64_t>(rd()) << 32) | rd();
    uint64_t lo = (static_cast<uint64_t>(rd()) << 32) | rd();
    store_->set(prefix_ + "/secret", to_hex(hi, lo));
  }
  parse_secret(store_->get(prefix_ + "/secret", deadline), &secret_hi_, &secret_lo_);

  TransportContext ctx;
  ctx.rank = options_.rank;
  ctx.world_size = options_.world_size;
  ctx.group_prefix = prefix_;
  ctx.store = store_.get();
  ctx.regions = &regions_;
  ctx.secret_hi = secret_hi_;
  ctx.secret_lo = secret_lo_;
  ctx.host_id = host_id_;
  ctx.connect_timeout_s = options_.timeout_s;
  ctx.tcp_host = options_.tcp_host;
  if (contains(options_.transports, "tcp")) transports_["tcp"] = make_tcp_transport(ctx);
  if (contains(options_.transports, "shm")) transports_["shm"] = make_shm_transport(ctx);
  if (contains(options_.transports, "verbs")) {
    std::string why;
    if (verbs_available(&why)) {
      try {
        transports_["verbs"] = make_verbs_transport(ctx, options_.verbs);
      } catch (const Error& e) {
        verbs_unavailable_ = e.what();
      }
    } else {
      verbs_unavailable_ = "verbs not available: " + why;
    }
  } else {
    verbs_unavailable_ = "verbs not enabled for this endpoint";
  }
  publish_info();
}

Endpoint::~Endpoint() { close(); }

void Endpoint::publish_info() {
  std::string names;
  for (const auto& [name, t] : transports_) names += (names.empty() ? "" : ",") + name;
  store_->set(prefix_ + "/" + std::to_string(options_.rank) + "/info", std::to_string(host_id_) + ";" + names);
}

std::vector<std::string> Endpoint::available_transports(std::string* verbs_why) const {
  std::vector<std::string> out;
  for (const auto& [name, t] : transports_) out.push_back(name);
  if (verbs_why) *verbs_why = verbs_unavailable_;
  return out;
}

std::shared_ptr<Region> Endpoint::register_memory(void* base, uint64_t size, uint32_t access, MemoryKind kind,
                                                  int device, int shared_fd, uint64_t shared_offset) {
  if (closed_.load()) throw_usage("endpoint is closed");
  if (kind == MemoryKind::kCuda) device = cuda_check_device_range(base, size);
  auto region = regions_.add(base, size, access, kind, device);
  if (shared_fd >= 0 && kind == MemoryKind::kHost) {
    region->shared_fd = shared_fd;
    region->shared_offset = shared_offset;
  }
  try {
    for (auto& [name, t] : transports_) t->register_region(*region);
  } catch (...) {
    for (auto& [name, t] : transports_) t->deregister_region(*region);
    regions_.remove(region->id, Deadline::after_seconds(1));
    throw;
  }
  return region;
}

void Endpoint::deregister(uint64_t region_id, double timeout_s) {
  auto region = regions_.get(region_id);
  if (!region) return;
  regions_.remove(region_id, Deadline::after_seconds(timeout_s < 0 ? options_.timeout_s : timeout_s));
  for (auto& [name, t] : transports_) t->deregister_region(*region);
}

RegionDescriptor Endpoint::describe(const Region& region) const {
  RegionDescriptor d;
  d.owner_rank = static_cast<uint32_t>(options_.rank);
  d.group_id = group_id_;
  d.region_id = region.id;
  d.addr = reinterpret_cast<uint64_t>(region.base);
  d.size = region.size;
  d.access = region.access;
  d.kind = region.kind;
  d.rkey = region.rkey;
  d.owner_pid = static_cast<int32_t>(getpid());
  d.host_id = host_id_;
  d.shared_fd = region.shared_fd;
  d.shared_offset = region.shared_offset;
  return d;
}

std::string Endpoint::choose_transport(int peer, Deadline deadline, std::string* why) {
  std::string info = store_->get(prefix_ + "/" + std::to_string(peer) + "/info", deadline);
  auto parts = split(info, ';');
  uint64_t peer_host = parts.empty() ? 0 : std::stoull(parts[0]);
  auto peer_transports = parts.size() > 1 ? split(parts[1], ',') : std::vector<std::string>{};
  auto both = [&](const std::string& t) { return transports_.count(t) && contains(peer_transports, t); };
  if (peer_host == host_id_ && both("shm")) {
    *why = "same host";
    return "shm";
  }
  if (both("verbs")) {
    *why = "RDMA on both ranks";
    return "verbs";
  }
  if (both("tcp")) {
    *why = peer_host == host_id_ ? "same host, shm not enabled on both" : "different hosts";
    if (!transports_.count("verbs")) *why += "; " + verbs_unavailable_;
    else *why += "; verbs not available on rank " + std::to_string(peer);
    return "tcp";
  }
  throw_usage("no transport is enabled on both rank " + std::to_string(options_.rank) + " and rank " +
              std::to_string(peer));
}

std::shared_ptr<Channel> Endpoint::channel(int peer, const std::string& transport, int tag, double timeout_s) {
  if (closed_.load()) throw_usage("endpoint is closed");
  if (peer < 0 || peer >= options_.world_size) {
    throw_usage("peer rank " + std::to_string(peer) + " is outside [0, " + std::to_string(options_.world_size) + ")");
  }
  if (peer == options_.rank) throw_usage("a channel needs a peer other than this rank");
  if (tag < 0) throw_usage("channel tag must be >= 0");
  Deadline deadline = Deadline::after_seconds(timeout_s < 0 ? options_.timeout_s : timeout_s);
  {
    std::lock_guard<std::mutex> lock(channels_mutex_);
    auto it = channels_.find({peer, tag});
    // A failed channel (its peer died or restarted) is replaced by a new one.
    if (it != channels_.end() && !it->second->closed() && !it->second->failed(nullptr)) {
      if (transport != "auto" && transport != it->second->transport()) {
        throw_usage("a " + it->second->transport() + " channel to rank " + std::to_string(peer) + " with tag " +
                    std::to_string(tag) + " already exists");
      }
      return it->second;
    }
  }
  std::string chosen = transport;
  if (transport == "auto") {
    std::string why;
    chosen = choose_transport(peer, deadline, &why);
    LAMINA_INFO("auto transport to rank " + std::to_string(peer) + ": " + chosen + " (" + why + ")");
  } else if (transport != "tcp" && transport != "shm" && transport != "verbs") {
    throw_usage("unknown transport '" + transport + "' (expected tcp, shm, verbs or auto)");
  }
  auto it = transports_.find(chosen);
  if (it == transports_.end()) {
    if (chosen == "verbs") throw_system(verbs_unavailable_);
    throw_usage("transport '" + chosen + "' is not enabled on this endpoint");
  }
  int lo = std::min(peer, options_.rank), hi = std::max(peer, options_.rank);
  ConnectParams params;
  params.self_rank = options_.rank;
  params.peer_rank = peer;
  params.key_prefix = prefix_ + "/ch/" + std::to_string(lo) + "-" + std::to_string(hi) + "/" + std::to_string(tag) +
                      "/" + chosen;
  params.group_secret_hi = secret_hi_;
  params.group_secret_lo = secret_lo_;
  params.store = store_.get();
  params.regions = &regions_;
  params.deadline = deadline;
  params.on_inbound = [this] { notify_inbound(); };
  auto connection = it->second->connect(params);
  auto ch = std::make_shared<Channel>(this, peer, chosen, std::move(connection));
  std::lock_guard<std::mutex> lock(channels_mutex_);
  channels_[{peer, tag}] = ch;
  return ch;
}

std::vector<std::shared_ptr<Channel>> Endpoint::channels_snapshot() {
  std::lock_guard<std::mutex> lock(channels_mutex_);
  std::vector<std::shared_ptr<Channel>> out;
  for (auto& [key, ch] : channels_) out.push_back(ch);
  return out;
}

void Endpoint::notify_inbound() {
  event_seq_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    futex_wake_all(reinterpret_cast<const uint32_t*>(&event_seq_), false);
  }
}

namespace {
constexpr int kFlatSignalPolls = 4096;
}  // namespace

void Endpoint::wait_signal(const Region& region, uint64_t offset, uint64_t value, double timeout_s,
                           Channel* channel) {
  if (offset % 8 != 0 || !region.contains(offset, 8)) {
    throw_usage("wait: offset " + std::to_string(offset) + " is not an aligned u64 inside the region of " +
                std::to_string(region.size) + " bytes");
  }
  if (region.closed.load()) throw_usage("wait: region is closed");
  if (region.kind == MemoryKind::kCuda) {
    // The CPU cannot load GPU memory (and no transport here writes signal words there).
    throw_usage("wait: the signal word is in GPU memory, which the CPU cannot poll; use a host signal word "
                "(pinned host memory also lets kernels wait on it), or wait in stream order (stream=...)");
  }
  const auto* word = reinterpret_cast<const uint64_t*>(static_cast<const char*>(region.base) + offset);
  std::vector<std::shared_ptr<Channel>> keep;
  std::vector<Connection*> all;
  Connection* one = nullptr;
  std::span<Connection* const> drive;
  if (channel) {
    one = channel->connection();
    drive = std::span<Connection* const>(&one, 1);  // no allocation on the latency path
  } else {
    keep = channels_snapshot();
    for (auto& ch : keep) all.push_back(ch->connection());
    drive = all;
  }
  double bound = timeout_s < 0 ? options_.timeout_s : timeout_s;
  // The word on every poll; the channel's failure flag (a virtual call) on
  // every 16th, so a poll stays a load and a compare.
  uint32_t polls = 0;
  auto reached = [&] {
    return __atomic_load_n(word, __ATOMIC_ACQUIRE) >= value ||
           (channel && (++polls & 15) == 0 && channel->failed(nullptr));
  };
  // Over RDMA the word changes without our progress: poll it alone, and
  // drive the connections every 128th step (a CQ poll per step costs more
  // than the memory read and delays noticing the signal).
  bool sparse = !drive.empty();
  for (Connection* c : drive) sparse &= c->inbound_writes_need_no_progress();
  if (sparse) {
    // On a latency path the word most often lands within a few thousand
    // polls (~4 us on a native core): poll it alone first - no progress, no
    // clock, no failure check, no call - and only then start the bounded
    // wait, which does them. Under emulation each of those in the loop
    // delays the moment the word is seen (docs/verbs.md). Only where the
    // word changes without our progress: tcp and shm deliver by progress.
    for (int i = 0; i < kFlatSignalPolls; ++i) {
      if (__atomic_load_n(word, __ATOMIC_ACQUIRE) >= value) return;
    }
  }
  // Marked as waiting, a connection that only notices a dead peer by
  // sending (verbs) probes it, so the wait ends with the death, not the bound.
  struct WaiterMark {
    std::span<Connection* const> marked;
    explicit WaiterMark(std::span<Connection* const> c) : marked(c) {
      for (Connection* x : marked) x->note_signal_waiter(+1);
    }
    ~WaiterMark() {
      for (Connection* x : marked) x->note_signal_waiter(-1);
    }
  } mark(drive);
  wait_until(reached, Deadline::after_seconds_from_first_look(bound), drive, sparse);
  uint64_t seen = __atomic_load_n(word, __ATOMIC_ACQUIRE);
  if (seen >= value) return;
  std::string why;
  if (channel && channel->failed(&why)) throw_system(why + " (while waiting for a signal)");
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3g", bound);
  throw_timeout("wait for signal at offset " + std::to_string(offset) + " to reach " + std::to_string(value) +
                " timed out after " + buf + " s (value is " + std::to_string(seen) + ")");
}

void Endpoint::attach(std::weak_ptr<EndpointAttachment> attachment) {
  std::lock_guard<std::mutex> lock(channels_mutex_);
  // Drop the ones already gone, so a long-lived endpoint does not grow.
  std::erase_if(attachments_, [](const auto& a) { return a.expired(); });
  attachments_.push_back(std::move(attachment));
}

void Endpoint::close() {
  if (closed_.exchange(true)) return;
  std::vector<std::weak_ptr<EndpointAttachment>> attachments;
  {
    std::lock_guard<std::mutex> lock(channels_mutex_);
    attachments.swap(attachments_);
  }
  for (auto& weak : attachments) {
    if (auto a = weak.lock()) a->close();
  }
  for (auto& ch : channels_snapshot()) ch->close();
  {
    std::lock_guard<std::mutex> lock(channels_mutex_);
    channels_.clear();
  }
  // Transport registrations (e.g. verbs MRs) go before the transports do.
  for (auto& region : regions_.all()) {
    for (auto& [name, t] : transports_) t->deregister_region(*region);
  }
  transports_.clear();
}

}  // namespace lamina
