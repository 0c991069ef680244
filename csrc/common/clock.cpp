#include "common/clock.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

namespace lamina {

uint64_t coarse_tick_ns() {
  static const uint64_t tick = []() -> uint64_t {
    timespec res{};
    if (clock_getres(CLOCK_MONOTONIC_COARSE, &res) != 0) return 10'000'000;
    return static_cast<uint64_t>(res.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(res.tv_nsec);
  }();
  return tick;
}

uint64_t cycles_for_ns(uint64_t ns) {
  static const double cycles_per_ns = []() -> double {
    const uint64_t ns0 = now_ns(), c0 = cycle_counter();
    timespec one_ms{0, 1'000'000};
    nanosleep(&one_ms, nullptr);
    const uint64_t ns1 = now_ns(), c1 = cycle_counter();
    const double rate = ns1 > ns0 && c1 > c0 ? double(c1 - c0) / double(ns1 - ns0) : 1.0;
    return rate > 0.01 && rate < 100.0 ? rate : 1.0;  // nonsense (a TSC that stood still): count ns
  }();
  return static_cast<uint64_t>(double(ns) * cycles_per_ns);
}

int Deadline::remaining_ms(int cap_ms) const {
  start_if_lazy();
  if (at_ns_ == UINT64_MAX) return cap_ms;
  uint64_t now = coarse_now_ns();
  if (now >= at_ns_) return 0;
  uint64_t ms = (at_ns_ - now + 999999) / 1000000;
  return static_cast<int>(std::min<uint64_t>(ms, static_cast<uint64_t>(cap_ms)));
}

void Backoff::pause() {
  if (start_ns_ == 0) start_ns_ = now_ns();
  if (spinning()) {
    for (int i = 0; i < 16; ++i) cpu_relax();
    return;
  }
  if (sleep_us_ <= 4) {
    std::this_thread::yield();
    sleep_us_ *= 2;
    return;
  }
  std::this_thread::sleep_for(std::chrono::microseconds(sleep_us_));
  sleep_us_ = std::min<uint32_t>(sleep_us_ * 2, 1000);
}

void futex_wait(const uint32_t* word, uint32_t expected, int timeout_ms, bool shared) {
  futex_wait_us(word, expected, timeout_ms * 1000, shared);
}

void futex_wait_us(const uint32_t* word, uint32_t expected, int timeout_us, bool shared) {
  struct timespec ts;
  ts.tv_sec = timeout_us / 1000000;
  ts.tv_nsec = static_cast<long>(timeout_us % 1000000) * 1000L;
  int op = shared ? FUTEX_WAIT : FUTEX_WAIT_PRIVATE;
  syscall(SYS_futex, word, op, expected, &ts, nullptr, 0);
}

void futex_wake_all(const uint32_t* word, bool shared) {
  int op = shared ? FUTEX_WAKE : FUTEX_WAKE_PRIVATE;
  syscall(SYS_futex, word, op, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace lamina
