// lamina-net device API: what CUDA kernels (or, in tests, CPU threads) call to
// issue puts and signals on a channel, with no host thread in their control
// path other than the back end's.
//
// A leaf: includes nothing of lamina-net, so nvcc, NVRTC (cupy RawKernel /
// RawModule with `-I lamina_net.get_include()`) and g++ -std=c++17 all take
// it alone. Compiled by a host compiler (no __CUDACC__), every function runs
// in CPU threads: the tests drive the same code there.
//
// ---- The handle
// lamina::DeviceChannel is a trivially copyable struct, passed by value as a
// kernel argument (Python: `ch.device(...).handle()` gives its bytes). It
// names small windows instead of addresses: remote windows (peer regions,
// resolved on the host once, when the handle is made) and local windows
// (this rank's registered regions: put sources and signal words to wait on).
//
// ---- The proxy back end (this header's producer side)
// A put writes one 64-byte Descriptor into a ring that the host's proxy
// thread drains into the channel's transport (tcp, shm, verbs):
//   1. reserve: ticket = atomic add on the producer counter (many producers:
//      threads, warps, blocks, kernels), then wait (bounded) until the slot
//      is free (ticket - consumed < capacity): a full ring never overwrites
//      (CPU producers first wait, bounded, until no other post is between
//      reserve and publish: see post());
//   2. fill the slot;
//   3. publish in ticket order: wait (bounded) until every earlier ticket is
//      published, then a release store of the producer index `published` -
//      that store is the doorbell the proxy polls.
// The proxy returns credits and completions through words the device reads:
// `consumed` (descriptors executed: their sources may be reused, their slots
// are free) and `completed` (descriptors applied at the target, advanced by
// flushes).
//
// ---- Who may call what
// - Thread forms (put, put_signal, signal, flush, wait, wait_source_free):
//   any thread, any number concurrently, from any number of kernels and
//   blocks sharing the handle.
// - _warp forms: every active lane of a warp calls with the same arguments;
//   one lane posts, all lanes get its status. _block forms: every thread of
//   the block calls (they contain __syncthreads()). In CPU mode the caller is
//   a warp or block of one.
//
// ---- Ordering
// - Operations of one channel are applied at the target in ticket order
//   (posting order for one caller; reservation order among callers).
// - put_signal's signal is applied after its data is visible at the target;
//   a signal never overtakes data posted before it on the same channel.
// - Data the caller (or, for _warp/_block, any participating thread) wrote to
//   the source before posting is what is sent: posting fences at system scope
//   before the doorbell.
// - flush returns when every operation posted on the channel before it (by
//   any caller) is applied at the target.
// - A put's source may be changed again only after wait_source_free(ticket)
//   (or a flush) returned kOk for its ticket.
//
// ---- Errors and bounds
// Nothing here spins forever. Every wait ends after the handle's timeout
// (kTimeout) and checks the channel's error word: once it is set (a failed
// transfer, a dead peer, a descriptor that failed the channel's checks, a
// producer that timed out) every call returns kChannelError at once and the
// host reads the reason (`DeviceChannel.error` in Python). Arguments outside
// the windows return kInvalidArgument and post nothing. A producer that times
// out while holding a ticket sets the error word, so later producers never
// wait on a hole.
//
// ---- Lifetimes
// The host object (lamina_net DeviceChannel / lamina::DeviceProxy) must
// outlive every kernel that uses its handle; closing it stops the proxy,
// which sets the error word (kErrorClosed) for kernels still waiting.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC has no standard headers.
typedef unsigned char lamina_u8;
typedef unsigned short lamina_u16;
typedef unsigned int lamina_u32;
typedef unsigned long long lamina_u64;
typedef int lamina_i32;
#else
#include <stdint.h>
typedef uint8_t lamina_u8;
typedef uint16_t lamina_u16;
typedef uint32_t lamina_u32;
typedef uint64_t lamina_u64;
typedef int32_t lamina_i32;
#endif

#if !defined(__CUDA_ARCH__)
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif

#if defined(__CUDACC__)
#define LAMINA_HD __host__ __device__ __forceinline__
#else
#define LAMINA_HD inline
#endif

namespace lamina {

// Version of the handle and descriptor layout; the host refuses a mismatch.
constexpr lamina_u32 kDeviceAbiVersion = 1;
constexpr lamina_u32 kDeviceChannelMagic = 0x4c4e4443u;  // "LNDC"
constexpr int kMaxDeviceWindows = 16;

// What a device call returns.
enum DeviceStatus : lamina_i32 {
  kDeviceOk = 0,
  kDeviceTimeout = 1,          // the handle's bound passed; nothing is known to be lost
  kDeviceChannelError = 2,     // the error word is set: read the reason on the host
  kDeviceInvalidArgument = 3,  // a window id or range outside the handle's windows; nothing posted
};

// Values of the error word (the first failure wins; sticky).
enum DeviceError : lamina_u64 {
  kErrorNone = 0,
  kErrorTransfer = 1,          // the transport failed an operation (peer gone, remote access error...)
  kErrorRejected = 2,          // a descriptor failed the channel's checks on the host
  kErrorProducerTimeout = 3,   // a producer timed out holding a ticket (ring stalled)
  kErrorClosed = 4,            // the host object was closed
  kErrorStreamWait = 5,        // a stream-ordered wait (host stream API) passed its bound: work after it
                               // in that stream would have run on data that had not arrived
};

enum DeviceOpcode : lamina_u8 {
  kDeviceOpNop = 0,
  kDeviceOpPut = 1,
  kDeviceOpPutSignal = 2,
  kDeviceOpSignal = 3,
  kDeviceOpFlush = 4,
};

// One ring slot: 64 bytes, one cache line / one PCIe write burst.
struct alignas(64) DeviceDescriptor {
  lamina_u64 src_offset;     // into local window src_window
  lamina_u64 dst_offset;     // into remote window dst_window
  lamina_u64 bytes;
  lamina_u64 signal_offset;  // into remote window signal_window (8-byte aligned)
  lamina_u64 signal_add;
  lamina_u64 ticket;         // the slot's position in the ring, for the proxy's checks
  lamina_u8 opcode;
  lamina_u8 flags;
  lamina_u16 src_window;
  lamina_u16 dst_window;
  lamina_u16 signal_window;
  lamina_u64 reserved;
};
static_assert(sizeof(DeviceDescriptor) == 64, "a ring slot is 64 bytes");

// Words the proxy writes and producers read (and the doorbell). Host memory
// (mapped into the GPU's address space for kernels); one cache line each, so
// the proxy's stores do not bounce the producers' line.
struct DeviceRingControl {
  alignas(64) lamina_u64 published;  // producer index: slots [0, published) are ready (the doorbell)
  alignas(64) lamina_u64 consumed;   // slots [0, consumed) executed: free, sources reusable
  alignas(64) lamina_u64 completed;  // tickets [0, completed) applied at the target
  alignas(64) lamina_u64 error;      // a DeviceError; kErrorNone while healthy
  lamina_u64 error_ticket;           // the ticket that failed (or the first unexecuted one)
  // CPU producers only: a proxy with nothing to do parks on doorbell_futex
  // after its spin window (proxy_parked != 0); a producer then bumps the word
  // and wakes it. A GPU cannot make the system call: its proxy never parks.
  alignas(64) lamina_u32 proxy_parked;
  lamina_u32 doorbell_futex;
};

// Words only producers touch (device memory on a GPU: their atomics stay on
// the device).
struct DeviceProducerState {
  alignas(64) lamina_u64 reserved;  // next ticket to hand out
  alignas(64) lamina_u64 ordered;   // tickets [0, ordered) have passed the in-order publish
};

struct DeviceLocalWindow {
  lamina_u64 base;  // address as the caller sees it (device pointer for kernels)
  lamina_u64 size;
};

// Trivially copyable; passed by value into kernels. Made by the host
// (DeviceProxy::handle); its pointers stay valid while the host object lives.
struct DeviceChannel {
  lamina_u32 magic;
  lamina_u32 abi_version;
  DeviceDescriptor* slots;
  DeviceRingControl* control;
  DeviceProducerState* producer;
  lamina_u64 capacity;     // slots, a power of two
  lamina_u64 timeout_ns;   // bound of every wait in this header
  lamina_i32 peer;
  lamina_u32 remote_count;
  lamina_u32 local_count;
  lamina_u32 reserved0;
  lamina_u64 remote_size[kMaxDeviceWindows];
  lamina_u32 remote_access[kMaxDeviceWindows];  // lamina::Access bits of each remote window
  DeviceLocalWindow local[kMaxDeviceWindows];

  // ---- thread forms
  LAMINA_HD DeviceStatus put(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                             lamina_u64 src_offset, lamina_u64 bytes, lamina_u64* ticket = 0) const;
  LAMINA_HD DeviceStatus put_signal(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                                    lamina_u64 src_offset, lamina_u64 bytes, lamina_u32 signal_window,
                                    lamina_u64 signal_offset, lamina_u64 add = 1, lamina_u64* ticket = 0) const;
  // Remote 64-bit add on a peer's signal word (no fetch).
  LAMINA_HD DeviceStatus signal(lamina_u32 signal_window, lamina_u64 signal_offset, lamina_u64 add = 1,
                                lamina_u64* ticket = 0) const;
  // Returns when every operation posted before it is applied at the target.
  LAMINA_HD DeviceStatus flush() const;
  // Returns when the put with `ticket` has been executed by the back end:
  // its source may be changed.
  LAMINA_HD DeviceStatus wait_source_free(lamina_u64 ticket) const;
  // Waits until the u64 at local window `window` + offset is >= value.
  LAMINA_HD DeviceStatus wait(lamina_u32 window, lamina_u64 offset, lamina_u64 value) const;
  // The same on a raw pointer to a local word the caller knows is valid.
  LAMINA_HD DeviceStatus wait_word(const lamina_u64* word, lamina_u64 value) const;
  // kDeviceOk or kDeviceChannelError.
  LAMINA_HD DeviceStatus status() const;
  LAMINA_HD lamina_u64 error_code() const;

#if defined(__CUDACC__)
  // ---- warp and block forms (one lane / thread posts for all)
  __device__ DeviceStatus put_warp(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                                   lamina_u64 src_offset, lamina_u64 bytes) const;
  __device__ DeviceStatus put_signal_warp(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                                          lamina_u64 src_offset, lamina_u64 bytes, lamina_u32 signal_window,
                                          lamina_u64 signal_offset, lamina_u64 add = 1) const;
  __device__ DeviceStatus signal_warp(lamina_u32 signal_window, lamina_u64 signal_offset, lamina_u64 add = 1) const;
  __device__ DeviceStatus flush_warp() const;
  __device__ DeviceStatus wait_warp(lamina_u32 window, lamina_u64 offset, lamina_u64 value) const;
  __device__ DeviceStatus put_block(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                                    lamina_u64 src_offset, lamina_u64 bytes) const;
  __device__ DeviceStatus put_signal_block(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                                           lamina_u64 src_offset, lamina_u64 bytes, lamina_u32 signal_window,
                                           lamina_u64 signal_offset, lamina_u64 add = 1) const;
  __device__ DeviceStatus signal_block(lamina_u32 signal_window, lamina_u64 signal_offset,
                                       lamina_u64 add = 1) const;
  __device__ DeviceStatus flush_block() const;
  __device__ DeviceStatus wait_block(lamina_u32 window, lamina_u64 offset, lamina_u64 value) const;
#else
  // CPU mode: a warp or block of one.
  DeviceStatus put_warp(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw, lamina_u64 soff, lamina_u64 n) const {
    return put(dw, doff, sw, soff, n);
  }
  DeviceStatus put_signal_warp(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw, lamina_u64 soff, lamina_u64 n,
                               lamina_u32 gw, lamina_u64 goff, lamina_u64 add = 1) const {
    return put_signal(dw, doff, sw, soff, n, gw, goff, add);
  }
  DeviceStatus signal_warp(lamina_u32 gw, lamina_u64 goff, lamina_u64 add = 1) const { return signal(gw, goff, add); }
  DeviceStatus flush_warp() const { return flush(); }
  DeviceStatus wait_warp(lamina_u32 w, lamina_u64 off, lamina_u64 v) const { return wait(w, off, v); }
  DeviceStatus put_block(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw, lamina_u64 soff, lamina_u64 n) const {
    return put(dw, doff, sw, soff, n);
  }
  DeviceStatus put_signal_block(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw, lamina_u64 soff, lamina_u64 n,
                                lamina_u32 gw, lamina_u64 goff, lamina_u64 add = 1) const {
    return put_signal(dw, doff, sw, soff, n, gw, goff, add);
  }
  DeviceStatus signal_block(lamina_u32 gw, lamina_u64 goff, lamina_u64 add = 1) const { return signal(gw, goff, add); }
  DeviceStatus flush_block() const { return flush(); }
  DeviceStatus wait_block(lamina_u32 w, lamina_u64 off, lamina_u64 v) const { return wait(w, off, v); }
#endif

  // ---- the ring itself (public for tests and back ends)
  // Reserves a slot, fills it from `d` (ticket filled in) and publishes it.
  LAMINA_HD DeviceStatus post(const DeviceDescriptor& d, lamina_u64* ticket) const;
};

#if defined(__cplusplus) && (__cplusplus >= 201103L || defined(__CUDACC_RTC__))
static_assert(__is_trivially_copyable(DeviceChannel), "DeviceChannel is passed by value into kernels");
static_assert(__is_trivially_copyable(DeviceDescriptor), "descriptors are copied byte for byte");
#endif

// ================================================================ primitives
// System-scope loads and stores: the other side is the host proxy (or a CPU
// thread) and, for data, a NIC or a peer process.
namespace device_detail {

LAMINA_HD lamina_u64 load_acquire(const lamina_u64* p) {
#if defined(__CUDA_ARCH__)
  lamina_u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

LAMINA_HD void store_release(lamina_u64* p, lamina_u64 v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#else
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

// 32-bit forms (NIC ring indices and doorbell records of the direct back end).
LAMINA_HD lamina_u32 load_acquire(const lamina_u32* p) {
#if defined(__CUDA_ARCH__)
  lamina_u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

LAMINA_HD void store_release(lamina_u32* p, lamina_u32 v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#else
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

// Device-scope on a GPU: only producers (kernels on this GPU) touch it.
LAMINA_HD lamina_u64 fetch_add(lamina_u64* p, lamina_u64 v) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
#endif
}

LAMINA_HD lamina_u64 load_acquire_gpu(const lamina_u64* p) {
#if defined(__CUDA_ARCH__)
  lamina_u64 v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

LAMINA_HD void store_release_gpu(lamina_u64* p, lamina_u64 v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#else
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

// First failure wins.
LAMINA_HD void set_error(DeviceRingControl* c, lamina_u64 code, lamina_u64 ticket) {
#if defined(__CUDA_ARCH__)
  unsigned long long old =
      atomicCAS_system(reinterpret_cast<unsigned long long*>(&c->error), 0ull, static_cast<unsigned long long>(code));
  if (old == 0) c->error_ticket = ticket;
  __threadfence_system();
#else
  lamina_u64 expected = 0;
  if (__atomic_compare_exchange_n(&c->error, &expected, code, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    __atomic_store_n(&c->error_ticket, ticket, __ATOMIC_RELEASE);
  }
#endif
}

LAMINA_HD lamina_u64 now_ns() {
#if defined(__CUDA_ARCH__)
  lamina_u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<lamina_u64>(ts.tv_sec) * 1000000000ull + static_cast<lamina_u64>(ts.tv_nsec);
#endif
}

LAMINA_HD void relax(lamina_u32 spins) {
#if defined(__CUDA_ARCH__)
  if (spins > 64) __nanosleep(spins > 4096 ? 1000 : 100);
#else
#if defined(__x86_64__) || defined(__i386__)
  if (spins > 256) __builtin_ia32_pause();
#endif
  // An oversubscribed CPU (tests run more producer threads than cores; a
  // ping-pong runs a proxy thread beside each waiting thread) must let the
  // proxy and the thread holding the previous ticket run: a yield every 32nd
  // poll (~0.5 us when nobody else wants the core) hands it over at once.
  // Naps only in long waits: a 20 us nanosleep lasts ~70 us (timer slack),
  // which a short wait would add to its latency (a 2-core ping-pong spent
  // ~150 us one-way in them).
  if (spins > 256 && (spins & 31) == 0) sched_yield();
  if (spins > 65536 && (spins & 255) == 0) {
    timespec ts{0, 20000};
    nanosleep(&ts, 0);
  }
#endif
}

LAMINA_HD void fence_system() {
#if defined(__CUDA_ARCH__)
  __threadfence_system();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

// After the doorbell store: wake a parked proxy (CPU producers only). The
// seq_cst fence orders the store of `published` before the load of
// proxy_parked; the proxy stores proxy_parked, fences, then reads published.
LAMINA_HD void ring_doorbell(DeviceRingControl* c) {
#if !defined(__CUDA_ARCH__)
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (__atomic_load_n(&c->proxy_parked, __ATOMIC_RELAXED) != 0) {
    __atomic_fetch_add(&c->doorbell_futex, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &c->doorbell_futex, FUTEX_WAKE, 1, 0, 0, 0);
  }
#else
  (void)c;
#endif
}

// A bounded wait: the clock is read every 1024th poll only. `pause_polls`:
// on a CPU, the first polls only pause before relax()'s yields and naps
// start (the direct back end waits for a NIC or kernel that answers within
// tens of microseconds, and a system call there would add to its latency).
struct WaitBound {
  lamina_u64 timeout_ns;
  lamina_u64 start;
  lamina_u32 spins;
  lamina_u32 pause_polls;
  LAMINA_HD explicit WaitBound(lamina_u64 t, lamina_u32 pause_only_polls = 0)
      : timeout_ns(t), start(0), spins(0), pause_polls(pause_only_polls) {}
  // True when the bound has passed; relaxes the caller between polls.
  LAMINA_HD bool expired() {
    ++spins;
    if ((spins & 1023) == 1) {
      const lamina_u64 now = now_ns();
      if (start == 0) start = now;
      if (now - start >= timeout_ns) return true;
    }
#if !defined(__CUDA_ARCH__) && (defined(__x86_64__) || defined(__i386__))
    if (spins < pause_polls) {
      __builtin_ia32_pause();
      return false;
    }
#endif
    relax(spins);
    return false;
  }
};

}  // namespace device_detail

// ================================================================ ring and operations

LAMINA_HD DeviceStatus DeviceChannel::status() const {
  return device_detail::load_acquire(&control->error) == kErrorNone ? kDeviceOk : kDeviceChannelError;
}

LAMINA_HD lamina_u64 DeviceChannel::error_code() const { return device_detail::load_acquire(&control->error); }

LAMINA_HD DeviceStatus DeviceChannel::post(const DeviceDescriptor& d, lamina_u64* ticket_out) const {
  using namespace device_detail;
  if (load_acquire(&control->error) != kErrorNone) return kDeviceChannelError;
#if !defined(__CUDA_ARCH__)
  // CPU producers take a ticket only when no other one is between reserve
  // and publish. A thread preempted while it holds a ticket stalls every
  // later ticket's publish; with more producer threads than cores each post
  // then waited for a context switch (4 producers on 2 cores: 0.25 M posts/s,
  // 11 M with this). Bounded: past the timeout it takes a ticket anyway.
  // GPU threads are not preempted that way, and their posts overlap.
  {
    WaitBound admit(timeout_ns);
    while (load_acquire_gpu(&producer->ordered) != load_acquire_gpu(&producer->reserved)) {
      if (load_acquire(&control->error) != kErrorNone) return kDeviceChannelError;
      if (admit.expired()) break;
    }
  }
#endif
  const lamina_u64 ticket = fetch_add(&producer->reserved, 1);
  WaitBound bound(timeout_ns);
  // 1. A free slot (credits from the proxy). A timeout here leaves a hole at
  //    `ticket`: the error word tells every later producer and the host.
  while (ticket - load_acquire(&control->consumed) >= capacity) {
    if (load_acquire(&control->error) != kErrorNone) return kDeviceChannelError;
    if (bound.expired()) {
      set_error(control, kErrorProducerTimeout, ticket);
      return kDeviceTimeout;
    }
  }
  // 2. Fill it. The ticket field lets the proxy check it read what was published.
  DeviceDescriptor* slot = &slots[ticket & (capacity - 1)];
  *slot = d;
  slot->ticket = ticket;
  // 3. Publish in ticket order. The fence makes the slot (and the caller's
  //    source data) visible system-wide before the doorbell store.
  fence_system();
  while (load_acquire_gpu(&producer->ordered) != ticket) {
    if (load_acquire(&control->error) != kErrorNone) return kDeviceChannelError;
    if (bound.expired()) {
      set_error(control, kErrorProducerTimeout, ticket);
      return kDeviceTimeout;
    }
  }
  store_release(&control->published, ticket + 1);
  store_release_gpu(&producer->ordered, ticket + 1);
  ring_doorbell(control);
  if (ticket_out) *ticket_out = ticket;
  return kDeviceOk;
}

namespace device_detail {
LAMINA_HD bool range_ok(lamina_u64 offset, lamina_u64 len, lamina_u64 size) {
  return offset <= size && len <= size - offset;
}
constexpr lamina_u32 kRemoteWrite = 1u << 1;   // lamina::kAccessRemoteWrite
constexpr lamina_u32 kRemoteAtomic = 1u << 3;  // lamina::kAccessRemoteAtomic
}  // namespace device_detail

LAMINA_HD DeviceStatus DeviceChannel::put(lamina_u32 dst_window, lamina_u64 dst_offset, lamina_u32 src_window,
                                          lamina_u64 src_offset, lamina_u64 bytes, lamina_u64* ticket) const {
  using namespace device_detail;
  if (dst_window >= remote_count || src_window >= local_count ||
      (remote_access[dst_window] & kRemoteWrite) == 0 || !range_ok(dst_offset, bytes, remote_size[dst_window]) ||
      !range_ok(src_offset, bytes, local[src_window].size)) {
    return kDeviceInvalidArgument;
  }
  DeviceDescriptor d = {};
  d.opcode = kDeviceOpPut;
  d.src_window = static_cast<lamina_u16>(src_window);
  d.dst_window = static_cast<lamina_u16>(dst_window);
  d.src_offset = src_offset;
  d.dst_offset = dst_offset;
  d.bytes = bytes;
  return post(d, ticket);
}

LAMINA_HD DeviceStatus DeviceChannel::put_signal(lamina_u32 dst_window, lamina_u64 dst_offset,
                                                 lamina_u32 src_window, lamina_u64 src_offset, lamina_u64 bytes,
                                                 lamina_u32 signal_window, lamina_u64 signal_offset, lamina_u64 add,
                                                 lamina_u64* ticket) const {
  using namespace device_detail;
  if (dst_window >= remote_count || src_window >= local_count || signal_window >= remote_count ||
      (remote_access[dst_window] & kRemoteWrite) == 0 || (remote_access[signal_window] & kRemoteAtomic) == 0 ||
      !range_ok(dst_offset, bytes, remote_size[dst_window]) || !range_ok(src_offset, bytes, local[src_window].size) ||
      signal_offset % 8 != 0 || !range_ok(signal_offset, 8, remote_size[signal_window])) {
    return kDeviceInvalidArgument;
  }
  DeviceDescriptor d = {};
  d.opcode = kDeviceOpPutSignal;
  d.src_window = static_cast<lamina_u16>(src_window);
  d.dst_window = static_cast<lamina_u16>(dst_window);
  d.signal_window = static_cast<lamina_u16>(signal_window);
  d.src_offset = src_offset;
  d.dst_offset = dst_offset;
  d.bytes = bytes;
  d.signal_offset = signal_offset;
  d.signal_add = add;
  return post(d, ticket);
}

LAMINA_HD DeviceStatus DeviceChannel::signal(lamina_u32 signal_window, lamina_u64 signal_offset, lamina_u64 add,
                                             lamina_u64* ticket) const {
  using namespace device_detail;
  if (signal_window >= remote_count || (remote_access[signal_window] & kRemoteAtomic) == 0 ||
      signal_offset % 8 != 0 || !range_ok(signal_offset, 8, remote_size[signal_window])) {
    return kDeviceInvalidArgument;
  }
  DeviceDescriptor d = {};
  d.opcode = kDeviceOpSignal;
  d.signal_window = static_cast<lamina_u16>(signal_window);
  d.signal_offset = signal_offset;
  d.signal_add = add;
  return post(d, ticket);
}

LAMINA_HD DeviceStatus DeviceChannel::flush() const {
  using namespace device_detail;
  DeviceDescriptor d = {};
  d.opcode = kDeviceOpFlush;
  lamina_u64 ticket = 0;
  DeviceStatus s = post(d, &ticket);
  if (s != kDeviceOk) return s;
  WaitBound bound(timeout_ns);
  while (load_acquire(&control->completed) <= ticket) {
    if (load_acquire(&control->error) != kErrorNone) return kDeviceChannelError;
    if (bound.expired()) return kDeviceTimeout;
  }
  return kDeviceOk;
}

LAMINA_HD DeviceStatus DeviceChannel::wait_source_free(lamina_u64 ticket) const {
  using namespace device_detail;
  WaitBound bound(timeout_ns);
  while (load_acquire(&control->consumed) <= ticket) {
    if (load_acquire(&control->error) != kErrorNone) return kDeviceChannelError;
    if (bound.expired()) return kDeviceTimeout;
  }
  return kDeviceOk;
}

LAMINA_HD DeviceStatus DeviceChannel::wait_word(const lamina_u64* word, lamina_u64 value) const {
  using namespace device_detail;
  if (word == 0 || (reinterpret_cast<lamina_u64>(word) & 7) != 0) return kDeviceInvalidArgument;
  // The word alone first: most waits on a latency path end within these polls.
  for (int i = 0; i < 64; ++i) {
    if (load_acquire(word) >= value) return kDeviceOk;
  }
  WaitBound bound(timeout_ns);
  for (;;) {
    if (load_acquire(word) >= value) return kDeviceOk;
    if ((bound.spins & 15) == 0 && load_acquire(&control->error) != kErrorNone) {
      // The signal may have landed just before the failure.
      return load_acquire(word) >= value ? kDeviceOk : kDeviceChannelError;
    }
    if (bound.expired()) return load_acquire(word) >= value ? kDeviceOk : kDeviceTimeout;
  }
}

LAMINA_HD DeviceStatus DeviceChannel::wait(lamina_u32 window, lamina_u64 offset, lamina_u64 value) const {
  if (window >= local_count || offset % 8 != 0 || !device_detail::range_ok(offset, 8, local[window].size)) {
    return kDeviceInvalidArgument;
  }
  return wait_word(reinterpret_cast<const lamina_u64*>(local[window].base + offset), value);
}

// ================================================================ warp and block forms
#if defined(__CUDACC__)
namespace device_detail {
// Runs f on the lowest active lane after the warp's writes are visible, and
// hands its status to every lane.
template <typename F>
__device__ DeviceStatus on_warp_leader(F f) {
  const unsigned mask = __activemask();
  const int leader = __ffs(mask) - 1;
  __threadfence_system();
  __syncwarp(mask);
  int s = 0;
  if ((threadIdx.x & 31) == leader) s = static_cast<int>(f());
  s = __shfl_sync(mask, s, leader);
  return static_cast<DeviceStatus>(s);
}
template <typename F>
__device__ DeviceStatus on_block_leader(F f) {
  __shared__ int status;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) status = static_cast<int>(f());
  __syncthreads();
  const int s = status;
  __syncthreads();  // status may be reused by the next call
  return static_cast<DeviceStatus>(s);
}
}  // namespace device_detail

__device__ inline DeviceStatus DeviceChannel::put_warp(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw,
                                                       lamina_u64 soff, lamina_u64 n) const {
  return device_detail::on_warp_leader([&] { return put(dw, doff, sw, soff, n); });
}
__device__ inline DeviceStatus DeviceChannel::put_signal_warp(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw,
                                                              lamina_u64 soff, lamina_u64 n, lamina_u32 gw,
                                                              lamina_u64 goff, lamina_u64 add) const {
  return device_detail::on_warp_leader([&] { return put_signal(dw, doff, sw, soff, n, gw, goff, add); });
}
__device__ inline DeviceStatus DeviceChannel::signal_warp(lamina_u32 gw, lamina_u64 goff, lamina_u64 add) const {
  return device_detail::on_warp_leader([&] { return signal(gw, goff, add); });
}
__device__ inline DeviceStatus DeviceChannel::flush_warp() const {
  return device_detail::on_warp_leader([&] { return flush(); });
}
__device__ inline DeviceStatus DeviceChannel::wait_warp(lamina_u32 w, lamina_u64 off, lamina_u64 v) const {
  return device_detail::on_warp_leader([&] { return wait(w, off, v); });
}
__device__ inline DeviceStatus DeviceChannel::put_block(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw,
                                                        lamina_u64 soff, lamina_u64 n) const {
  return device_detail::on_block_leader([&] { return put(dw, doff, sw, soff, n); });
}
__device__ inline DeviceStatus DeviceChannel::put_signal_block(lamina_u32 dw, lamina_u64 doff, lamina_u32 sw,
                                                               lamina_u64 soff, lamina_u64 n, lamina_u32 gw,
                                                               lamina_u64 goff, lamina_u64 add) const {
  return device_detail::on_block_leader([&] { return put_signal(dw, doff, sw, soff, n, gw, goff, add); });
}
__device__ inline DeviceStatus DeviceChannel::signal_block(lamina_u32 gw, lamina_u64 goff, lamina_u64 add) const {
  return device_detail::on_block_leader([&] { return signal(gw, goff, add); });
}
__device__ inline DeviceStatus DeviceChannel::flush_block() const {
  return device_detail::on_block_leader([&] { return flush(); });
}
__device__ inline DeviceStatus DeviceChannel::wait_block(lamina_u32 w, lamina_u64 off, lamina_u64 v) const {
  return device_detail::on_block_leader([&] { return wait(w, off, v); });
}
#endif

}  // namespace lamina
