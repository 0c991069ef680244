/* How the C references time a round: the same way as lamina-net's ping-pong
 * loop (csrc/channels/pingpong.cpp), so that ratios compare like with like.
 * Rounds are counted in TSC ticks where there is a TSC (no system call; on
 * VMs whose clock is an emulated device a clock read costs microseconds),
 * and scaled to ns by the clock over the whole measurement. */
#ifndef LAMINA_BENCH_REF_TIMING_H
#define LAMINA_BENCH_REF_TIMING_H

#include <stdint.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

static inline double ref_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static inline uint64_t ref_ticks(void) {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return (uint64_t)ref_now_ns();
#endif
}

struct ref_clock {
  double start_ns;
  uint64_t start_ticks;
};

static inline struct ref_clock ref_clock_start(void) {
  struct ref_clock c = {ref_now_ns(), ref_ticks()};
  return c;
}

/* Converts `n` tick counts in `t` to ns, using the clock since `c` started. */
static inline void ref_ticks_to_ns(struct ref_clock c, double *t, int n) {
  const uint64_t ticks = ref_ticks() - c.start_ticks;
  const double scale = ticks ? (ref_now_ns() - c.start_ns) / (double)ticks : 1.0;
  for (int i = 0; i < n; ++i) t[i] *= scale;
}

#endif
