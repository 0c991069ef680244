// lamina-net: time, deadlines and bounded spin-then-sleep waiting.
//
// Contract: every blocking wait in lamina-net takes a Deadline; nothing waits
// forever. `Deadline::never()` exists only for internal loops that are woken
// by close().
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace lamina {

inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

class Deadline {
 public:
  static Deadline after_seconds(double seconds) {
    Deadline d;
    d.at_ns_ = seconds <= 0 ? now_ns() : now_ns() + static_cast<uint64_t>(seconds * 1e9);
    return d;
  }
  static Deadline never() {
    Deadline d;
    d.at_ns_ = UINT64_MAX;
    return d;
  }
  bool expired() const { return at_ns_ != UINT64_MAX && now_ns() >= at_ns_; }
  // Remaining time in ms for poll()/futex, clamped to [0, cap_ms].
  int remaining_ms(int cap_ms) const;
  uint64_t at_ns() const { return at_ns_; }

 private:
  uint64_t at_ns_ = 0;
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
class Backoff {
 public:
  explicit Backoff(uint64_t spin_ns = 20000) : start_ns_(now_ns()), spin_ns_(spin_ns) {}
  void pause();
  void reset() { start_ns_ = now_ns(); sleep_us_ = 1; }
  bool spinning() const { return now_ns() - start_ns_ < spin_ns_; }

 private:
  uint64_t start_ns_;
  uint64_t spin_ns_;
  uint32_t sleep_us_ = 1;
};

// Futex helpers on a 32-bit word (process-private or in shared memory).
// wait returns when *word != expected, on wake, or after timeout_ms.
void futex_wait(const uint32_t* word, uint32_t expected, int timeout_ms, bool shared);
void futex_wait_us(const uint32_t* word, uint32_t expected, int timeout_us, bool shared);
void futex_wake_all(const uint32_t* word, bool shared);

}  // namespace lamina
