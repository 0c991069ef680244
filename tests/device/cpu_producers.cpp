// CPU producers for the device API tests: the same lamina_net/device.cuh a
// kernel includes, compiled by g++ alone and driven from CPU threads.
// Loaded by the tests with ctypes; every function takes the handle's bytes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <lamina_net/device.cuh>

namespace {
lamina::DeviceChannel from_bytes(const void* bytes) {
  lamina::DeviceChannel ch;
  std::memcpy(&ch, bytes, sizeof(ch));
  return ch;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Byte j of record `slot`: a hash of (seed, slot, j / 8), never 0, so a
// record that has not arrived (zeroed memory) or landed at another slot
// never matches.
unsigned char pattern_byte(uint64_t seed, uint64_t slot, uint64_t j) {
  const uint64_t word = splitmix64((seed << 48) ^ (slot << 20) ^ (j >> 3));
  const unsigned char b = static_cast<unsigned char>(word >> (8 * (j & 7)));
  return b == 0 ? 1 : b;
}

uint64_t now_ns() { return lamina::device_detail::now_ns(); }

// Copies each thread's status to statuses[t] (when given); returns the first non-zero one.
int first_status(const std::vector<int>& result, int* statuses) {
  int first = 0;
  for (size_t t = 0; t < result.size(); ++t) {
    if (statuses) statuses[t] = result[t];
    if (first == 0) first = result[t];
  }
  return first;
}
}  // namespace

extern "C" {

unsigned long long ln_handle_bytes() { return sizeof(lamina::DeviceChannel); }
unsigned long long ln_descriptor_bytes() { return sizeof(lamina::DeviceDescriptor); }
unsigned long long ln_descriptor_align() { return alignof(lamina::DeviceDescriptor); }
unsigned long long ln_control_bytes() { return sizeof(lamina::DeviceRingControl); }
// Offsets of the handle's fields the Python side reads (magic, version, capacity, timeout).
unsigned long long ln_handle_offset(int field) {
  switch (field) {
    case 0: return offsetof(lamina::DeviceChannel, magic);
    case 1: return offsetof(lamina::DeviceChannel, abi_version);
    case 2: return offsetof(lamina::DeviceChannel, capacity);
    case 3: return offsetof(lamina::DeviceChannel, timeout_ns);
    case 4: return offsetof(lamina::DeviceChannel, peer);
    case 5: return offsetof(lamina::DeviceChannel, remote_count);
    case 6: return offsetof(lamina::DeviceChannel, local_count);
    default: return ~0ull;
  }
}
unsigned ln_abi_version() { return lamina::kDeviceAbiVersion; }

// Records [first, first + count) of `bytes` bytes each, at base + slot * bytes.
void ln_fill_pattern(void* base, unsigned long long first, unsigned long long count, unsigned long long bytes,
                     unsigned long long seed) {
  unsigned char* p = static_cast<unsigned char*>(base);
  for (uint64_t s = first; s < first + count; ++s) {
    for (uint64_t j = 0; j < bytes; ++j) p[s * bytes + j] = pattern_byte(seed, s, j);
  }
}

// The first record of [first, first + count) that does not hold its pattern,
// or -1 when all do.
long long ln_check_pattern(const void* base, unsigned long long first, unsigned long long count,
                           unsigned long long bytes, unsigned long long seed) {
  const volatile unsigned char* p = static_cast<const volatile unsigned char*>(base);
  for (uint64_t s = first; s < first + count; ++s) {
    for (uint64_t j = 0; j < bytes; ++j) {
      if (p[s * bytes + j] != pattern_byte(seed, s, j)) return static_cast<long long>(s);
    }
  }
  return -1;
}

// The receiver's ordering check, run while the producers post: `words`
// signal words (8 bytes apart from `signals`), word t counting the records
// of producer t (records t * per_word + [0, per_word)). Each time word t is
// seen at a new value k, records t * per_word + [seen, k) must already hold
// their bytes: a signal never overtakes its data. Returns 0 when every word
// reached per_word with every record checked; -1 on timeout; -2 when a word
// went past per_word (an extra or duplicated signal); else 1 + the record
// that was missing when its signal was seen. observations (optional) gets
// how many distinct signal values were seen (how fine-grained the check was).
long long ln_check_signal_order(const void* inbox, const void* signals, int words, unsigned long long per_word,
                                unsigned long long bytes, unsigned long long seed, double timeout_s,
                                unsigned long long* observations) {
  const unsigned char* base = static_cast<const unsigned char*>(inbox);
  const uint64_t* sig = static_cast<const uint64_t*>(signals);
  std::vector<uint64_t> seen(static_cast<size_t>(words), 0);
  uint64_t obs = 0;
  int finished = 0;
  const uint64_t deadline = now_ns() + static_cast<uint64_t>(timeout_s * 1e9);
  uint64_t polls = 0;
  while (finished < words) {
    for (int t = 0; t < words; ++t) {
      const uint64_t v = __atomic_load_n(&sig[t], __ATOMIC_ACQUIRE);
      if (v == seen[t]) continue;
      if (v > per_word) {
        if (observations) *observations = obs;
        return -2;
      }
      ++obs;
      for (uint64_t k = seen[t]; k < v; ++k) {
        const uint64_t slot = static_cast<uint64_t>(t) * per_word + k;
        if (ln_check_pattern(base, slot, 1, bytes, seed) >= 0) {
          if (observations) *observations = obs;
          return 1 + static_cast<long long>(slot);
        }
      }
      seen[t] = v;
      if (v == per_word) ++finished;
    }
    if ((++polls & 1023) == 0 && now_ns() > deadline) {
      if (observations) *observations = obs;
      return -1;
    }
  }
  if (observations) *observations = obs;
  return 0;
}

// The general producer: `threads` CPU threads share the handle; thread t
// posts `per_thread` operations (op 0: put, 1: put_signal, 2: signal) of
// record slot = t * per_thread + i (modulo `wrap` records when wrap > 0),
// from local window src_w at slot * bytes to remote window dst_w at
// slot * bytes; signals go to remote window sig_w at sig_off + t * sig_stride.
// flush_at_end: each thread flushes after its last operation. A thread stops
// at its first status other than kDeviceOk. Per thread (arrays of `threads`,
// each optional): statuses[t] its first non-ok status (0: none),
// posted[t] operations that returned kDeviceOk, elapsed_ns[t] from the
// common start to the thread's return. Returns the first non-ok status.
int ln_produce(const void* h, int threads, long long per_thread, int op, unsigned dst_w, unsigned src_w,
               unsigned long long bytes, unsigned sig_w, unsigned long long sig_off, unsigned long long sig_stride,
               unsigned long long wrap, int flush_at_end, int* statuses, long long* posted,
               long long* elapsed_ns) {
  const lamina::DeviceChannel ch = from_bytes(h);
  std::vector<int> result(static_cast<size_t>(threads), 0);
  std::vector<long long> count(static_cast<size_t>(threads), 0);
  std::vector<long long> took(static_cast<size_t>(threads), 0);
  const uint64_t start = now_ns();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      int s = 0;
      for (long long i = 0; i < per_thread; ++i) {
        uint64_t slot = static_cast<uint64_t>(t) * static_cast<uint64_t>(per_thread) + static_cast<uint64_t>(i);
        if (wrap) slot %= wrap;
        const uint64_t off = slot * bytes;
        const uint64_t goff = sig_off + static_cast<uint64_t>(t) * sig_stride;
        if (op == 0) {
          s = ch.put(dst_w, off, src_w, off, bytes);
        } else if (op == 1) {
          s = ch.put_signal(dst_w, off, src_w, off, bytes, sig_w, goff, 1);
        } else {
          s = ch.signal(sig_w, goff, 1);
        }
        if (s != 0) break;
        ++count[t];
      }
      if (s == 0 && flush_at_end) s = ch.flush();
      result[t] = s;
      took[t] = static_cast<long long>(now_ns() - start);
    });
  }
  for (auto& th : pool) th.join();
  int first = 0;
  for (int t = 0; t < threads; ++t) {
    if (statuses) statuses[t] = result[t];
    if (posted) posted[t] = count[t];
    if (elapsed_ns) elapsed_ns[t] = took[t];
    if (first == 0) first = result[t];
  }
  return first;
}

// Source reuse: thread t owns source record t of local window src_w. For
// i in [0, per_thread) it writes record k = t * per_thread + i's pattern
// there, puts it to remote record k of dst_w, waits until that source is
// free (wait_source_free) and writes the next one over it. A back end that
// frees a source before it sent it leaves the target a later record's bytes.
// Thread t's first non-ok status goes to statuses[t]; returns the first.
int ln_reuse_source(const void* h, int threads, long long per_thread, unsigned dst_w, unsigned src_w,
                    unsigned long long bytes, unsigned long long seed, int* statuses) {
  const lamina::DeviceChannel ch = from_bytes(h);
  std::vector<int> result(static_cast<size_t>(threads), 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      unsigned char* record = reinterpret_cast<unsigned char*>(ch.local[src_w].base) + t * bytes;
      int s = 0;
      for (long long i = 0; i < per_thread && s == 0; ++i) {
        const uint64_t k = static_cast<uint64_t>(t) * static_cast<uint64_t>(per_thread) + static_cast<uint64_t>(i);
        for (uint64_t j = 0; j < bytes; ++j) record[j] = pattern_byte(seed, k, j);
        lamina_u64 ticket = 0;
        s = ch.put(dst_w, k * bytes, src_w, static_cast<uint64_t>(t) * bytes, bytes, &ticket);
        if (s == 0) s = ch.wait_source_free(ticket);
      }
      if (s == 0) s = ch.flush();
      result[t] = s;
    });
  }
  for (auto& th : pool) th.join();
  return first_status(result, statuses);
}

// A wait on local window w's word at `off`, timed.
int ln_wait_timed(const void* h, unsigned w, unsigned long long off, unsigned long long value,
                  long long* elapsed_ns) {
  const uint64_t start = now_ns();
  const int s = from_bytes(h).wait(w, off, value);
  if (elapsed_ns) *elapsed_ns = static_cast<long long>(now_ns() - start);
  return s;
}

int ln_wait_source_free(const void* h, unsigned long long ticket) { return from_bytes(h).wait_source_free(ticket); }

// put returning its ticket.
int ln_put_ticket(const void* h, unsigned dst_w, unsigned long long dst_off, unsigned src_w,
                  unsigned long long src_off, unsigned long long bytes, unsigned long long* ticket) {
  lamina_u64 t = 0;
  const int s = from_bytes(h).put(dst_w, dst_off, src_w, src_off, bytes, &t);
  if (ticket) *ticket = t;
  return s;
}

int ln_status(const void* h) { return from_bytes(h).status(); }
unsigned long long ln_error_code(const void* h) { return from_bytes(h).error_code(); }

// What a buggy kernel could post: a raw descriptor through the ring,
// bypassing every device-side check; the proxy must refuse it.
int ln_post_raw(const void* h, unsigned opcode, unsigned src_w, unsigned long long src_off, unsigned dst_w,
                unsigned long long dst_off, unsigned long long bytes, unsigned sig_w, unsigned long long sig_off,
                unsigned long long add) {
  lamina::DeviceDescriptor d = {};
  d.opcode = static_cast<lamina_u8>(opcode);
  d.src_window = static_cast<lamina_u16>(src_w);
  d.src_offset = src_off;
  d.dst_window = static_cast<lamina_u16>(dst_w);
  d.dst_offset = dst_off;
  d.bytes = bytes;
  d.signal_window = static_cast<lamina_u16>(sig_w);
  d.signal_offset = sig_off;
  d.signal_add = add;
  return from_bytes(h).post(d, nullptr);
}

// A slot whose ticket field is not its position (what an overwritten or torn
// slot looks like to the proxy): reserved and published in order like post()
// does, but the slot's ticket is off by `skew`.
int ln_post_wrong_ticket(const void* h, unsigned long long skew) {
  using namespace lamina::device_detail;
  const lamina::DeviceChannel ch = from_bytes(h);
  if (load_acquire(&ch.control->error) != lamina::kErrorNone) return lamina::kDeviceChannelError;
  const uint64_t ticket = fetch_add(&ch.producer->reserved, 1);
  WaitBound bound(ch.timeout_ns);
  while (ticket - load_acquire(&ch.control->consumed) >= ch.capacity) {
    if (bound.expired()) return lamina::kDeviceTimeout;
  }
  lamina::DeviceDescriptor* slot = &ch.slots[ticket & (ch.capacity - 1)];
  lamina::DeviceDescriptor d = {};
  d.opcode = lamina::kDeviceOpNop;
  d.ticket = ticket + skew;
  *slot = d;
  fence_system();
  while (load_acquire_gpu(&ch.producer->ordered) != ticket) {
    if (bound.expired()) return lamina::kDeviceTimeout;
  }
  store_release(&ch.control->published, ticket + 1);
  store_release_gpu(&ch.producer->ordered, ticket + 1);
  ring_doorbell(ch.control);
  return lamina::kDeviceOk;
}

int ln_put(const void* h, unsigned dst_w, unsigned long long dst_off, unsigned src_w, unsigned long long src_off,
           unsigned long long bytes) {
  return from_bytes(h).put(dst_w, dst_off, src_w, src_off, bytes);
}

int ln_put_signal(const void* h, unsigned dst_w, unsigned long long dst_off, unsigned src_w,
                  unsigned long long src_off, unsigned long long bytes, unsigned sig_w, unsigned long long sig_off,
                  unsigned long long add) {
  return from_bytes(h).put_signal(dst_w, dst_off, src_w, src_off, bytes, sig_w, sig_off, add);
}

int ln_signal(const void* h, unsigned sig_w, unsigned long long sig_off, unsigned long long add) {
  return from_bytes(h).signal(sig_w, sig_off, add);
}

int ln_flush(const void* h) { return from_bytes(h).flush(); }

int ln_wait(const void* h, unsigned w, unsigned long long off, unsigned long long value) {
  return from_bytes(h).wait(w, off, value);
}

// `threads` producers, each putting `per_thread` records of `bytes` bytes
// (slot = thread * per_thread + i) from local window src_w into remote
// window dst_w, each followed by a signal add of 1. Returns the first
// non-ok status, or 0. statuses (optional, `threads` entries) gets each.
int ln_put_signal_many(const void* h, int threads, int per_thread, unsigned dst_w, unsigned src_w,
                       unsigned long long bytes, unsigned sig_w, unsigned long long sig_off, int* statuses) {
  const lamina::DeviceChannel ch = from_bytes(h);
  std::vector<int> result(threads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        const unsigned long long slot = static_cast<unsigned long long>(t) * per_thread + i;
        int s = ch.put_signal(dst_w, slot * bytes, src_w, slot * bytes, bytes, sig_w, sig_off, 1);
        if (s != 0) {
          result[t] = s;
          return;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  return first_status(result, statuses);
}

}  // extern "C"
