// lamina-net: time, deadlines and bounded spin-then-sleep waiting.
//
// Contract: every blocking wait in lamina-net takes a Deadline; nothing waits
// forever. `Deadline::never()` exists only for internal loops that are woken
// by close().
#pragma once

#include <chrono>
#include <cstdint>
#include <ctime>
#include <string>

namespace lamina {

inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// A clock read that never leaves user space (the kernel's last tick, a few ms
// resolution), for hot loops that only need coarse time: keepalive periods,
// "who drove this recently". On machines whose clocksource has no vDSO path
// (hpet in VMs) now_ns() is a system call costing ~1 us.
inline uint64_t coarse_now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// Resolution of coarse_now_ns() (one kernel tick), read once.
uint64_t coarse_tick_ns();

// A tick count that never leaves user space: the TSC on x86 (constant-rate on
// the CPUs and hypervisors this runs on), now_ns() elsewhere. For spin windows
// and ping-pong timing, which read the time every few polls.
inline uint64_t cycle_counter() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_ia32_rdtsc();
#else
  return now_ns();
#endif
}

// cycle_counter() ticks in `ns`, from a rate measured once against now_ns()
// (a 1 ms sleep at the first call).
uint64_t cycles_for_ns(uint64_t ns);

// A bound on a wait. Kept on the coarse clock: every put and wait makes one,
// and a bound needs no better than a tick, while the precise clock can cost a
// system call (see coarse_now_ns). One tick is added so that a deadline never
// expires early; it may expire up to two ticks late. A bound <= 0 has expired
// already.
// The largest bound a wait accepts, in seconds (about 31 years).
constexpr double kMaxBoundSeconds = 1e9;

class Deadline {
 public:
  static Deadline after_seconds(double seconds) {
    Deadline d;
    d.at_ns_ = seconds <= 0 ? 0 : coarse_now_ns() + bound_ns(seconds);
    return d;
  }
  // The same bound, counted from the first expired() / remaining_ms() /
  // at_ns() instead of from now: for waits that mostly end before they first
  // look (a ping-pong round), which then read no clock at all. Only for a
  // caller that looks within microseconds of starting (wait_until looks
  // every 128th poll), so the wait is still bounded by `seconds` plus that.
  static Deadline after_seconds_from_first_look(double seconds) {
    Deadline d;
    if (seconds > 0) d.lazy_bound_ns_ = bound_ns(seconds);
    return d;
  }
  static Deadline never() {
    Deadline d;
    d.at_ns_ = UINT64_MAX;
    return d;
  }
  bool expired() const {
    start_if_lazy();
    return at_ns_ != UINT64_MAX && coarse_now_ns() >= at_ns_;
  }
  // Remaining time in ms for poll()/futex, clamped to [0, cap_ms].
  int remaining_ms(int cap_ms) const;
  uint64_t at_ns() const {
    start_if_lazy();
    return at_ns_;
  }

 private:
  // Bounds past kMaxBoundSeconds (or not finite) are refused where they
  // enter (kUsage); here they saturate instead of wrapping around, which
  // once made `inf` expire at once.
  static uint64_t bound_ns(double seconds) {
    if (!(seconds < kMaxBoundSeconds)) return UINT64_MAX / 2;
    return static_cast<uint64_t>(seconds * 1e9) + coarse_tick_ns();
  }
  void start_if_lazy() const {
    if (lazy_bound_ns_ != 0) {
      at_ns_ = coarse_now_ns() + lazy_bound_ns_;
      lazy_bound_ns_ = 0;
    }
  }

  mutable uint64_t at_ns_ = 0;
  mutable uint64_t lazy_bound_ns_ = 0;  // != 0: not started yet
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Spin for `spin_ns`, then yield, then sleep in growing steps up to 1 ms.
// Used by waits that have no kernel object to block on.
// The spin window starts at the first pause(), not at construction: most
// waits never pause, and a clock read can cost a system call (see
// coarse_now_ns).
class Backoff {
 public:
  explicit Backoff(uint64_t spin_ns = 20000) : spin_ns_(spin_ns) {}
  void pause();
  void reset() { start_ns_ = 0; sleep_us_ = 1; }
  bool spinning() const { return start_ns_ == 0 || now_ns() - start_ns_ < spin_ns_; }

 private:
  uint64_t start_ns_ = 0;  // 0: not paused yet
  uint64_t spin_ns_;
  uint32_t sleep_us_ = 1;
};

// Futex helpers on a 32-bit word (process-private or in shared memory).
// wait returns when *word != expected, on wake, or after timeout_ms.
void futex_wait(const uint32_t* word, uint32_t expected, int timeout_ms, bool shared);
void futex_wait_us(const uint32_t* word, uint32_t expected, int timeout_us, bool shared);
void futex_wake_all(const uint32_t* word, bool shared);

}  // namespace lamina
