/* Plain C reference: ping-pong through shared memory with spinning.
 *
 * The baseline that `lamina-net bench latency --transport shm` is compared
 * with: two processes share an anonymous mapping; each side memcpy's `size`
 * bytes into the other's mailbox and release-stores a sequence number, the
 * other spins on it (acquire). Also measures one plain memcpy per size
 * (mode "memcpy"), the bound for large puts, and in mode "stream" the
 * bandwidth of ITERATIONS memcpy's of one source into one destination back to
 * back (single thread), the reference of `lamina-net bench bandwidth`.
 *
 * usage: ref_shm_pingpong pingpong|memcpy|stream SIZE[,SIZE...] ITERATIONS WARMUP
 * prints one line per size: "size=<bytes> p50_rtt_ns=<ns> p99_rtt_ns=<ns>"
 * (for memcpy: "size=<bytes> p50_ns=<ns> p99_ns=<ns>"; for stream:
 * "size=<bytes> count=<n> seconds=<s> gbps=<1e9 bytes/s>")
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ref_timing.h"

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

struct mailbox {
  _Alignas(64) volatile uint64_t seq;
  char pad[56];
};

static void wait_seq(struct mailbox *m, uint64_t want) {
  while (__atomic_load_n(&m->seq, __ATOMIC_ACQUIRE) < want) __builtin_ia32_pause();
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s pingpong|memcpy|stream SIZE[,SIZE...] ITERATIONS WARMUP\n", argv[0]);
    return 2;
  }
  int memcpy_mode = strcmp(argv[1], "memcpy") == 0, stream_mode = strcmp(argv[1], "stream") == 0;
  size_t sizes[64];
  int nsizes = 0;
  for (char *tok = strtok(argv[2], ","); tok && nsizes < 64; tok = strtok(NULL, ",")) sizes[nsizes++] = strtoull(tok, NULL, 0);
  int iters = atoi(argv[3]), warmup = atoi(argv[4]);
  size_t max = 64;
  for (int i = 0; i < nsizes; ++i) if (sizes[i] > max) max = sizes[i];
  double *t = malloc(sizeof(double) * (size_t)iters);

  if (memcpy_mode) {
    char *src = malloc(max), *dst = malloc(max);
    memset(src, 1, max);
    memset(dst, 2, max);
    for (int s = 0; s < nsizes; ++s) {
      struct ref_clock clock = ref_clock_start();
      for (int i = 0; i < iters + warmup; ++i) {
        uint64_t t0 = ref_ticks();
        memcpy(dst, src, sizes[s]);
        __asm__ volatile("" ::: "memory");
        if (i >= warmup) t[i - warmup] = (double)(ref_ticks() - t0);
      }
      ref_ticks_to_ns(clock, t, iters);
      qsort(t, (size_t)iters, sizeof(double), cmp_double);
      printf("size=%zu p50_ns=%.0f p99_ns=%.0f\n", sizes[s], t[iters / 2], t[(int)(iters * 0.99)]);
    }
    return 0;
  }

  if (stream_mode) {
    /* Page-aligned, as lamina-net's destination (a memfd mapping) is: two
     * malloc'd blocks where dst lies a few bytes past a 4 KiB multiple from
     * src make rep movsb several times slower on some cores (AMD Zen), which
     * would measure the allocator, not the copy. */
    char *src = mmap(NULL, max, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *dst = mmap(NULL, max, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED) { perror("mmap"); return 1; }
    memset(src, 1, max);
    memset(dst, 2, max);
    for (int s = 0; s < nsizes; ++s) {
      for (int i = 0; i < warmup; ++i) {
        memcpy(dst, src, sizes[s]);
        __asm__ volatile("" ::: "memory");
      }
      double t0 = ref_now_ns();
      for (int i = 0; i < iters; ++i) {
        memcpy(dst, src, sizes[s]);
        __asm__ volatile("" ::: "memory"); /* every copy happens */
      }
      double seconds = (ref_now_ns() - t0) / 1e9;
      printf("size=%zu count=%d seconds=%.6f gbps=%.4f\n", sizes[s], iters, seconds,
             (double)sizes[s] * iters / seconds / 1e9);
    }
    return 0;
  }

  size_t total = 2 * sizeof(struct mailbox) + 2 * max;
  char *shared = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) { perror("mmap"); return 1; }
  struct mailbox *to_child = (struct mailbox *)shared, *to_parent = to_child + 1;
  char *data_child = shared + 2 * sizeof(struct mailbox), *data_parent = data_child + max;
  char *local = malloc(max);
  memset(local, 1, max); /* real pages: calloc could leave the shared zero page */
  pid_t child = fork();
  uint64_t round = 0;
  for (int s = 0; s < nsizes; ++s) {
    struct ref_clock clock = ref_clock_start();
    for (int i = 0; i < iters + warmup; ++i) {
      ++round;
      if (child == 0) {
        wait_seq(to_child, round);
        memcpy(data_parent, local, sizes[s]);
        __atomic_store_n(&to_parent->seq, round, __ATOMIC_RELEASE);
      } else {
        uint64_t t0 = ref_ticks();
        memcpy(data_child, local, sizes[s]);
        __atomic_store_n(&to_child->seq, round, __ATOMIC_RELEASE);
        wait_seq(to_parent, round);
        if (i >= warmup) t[i - warmup] = (double)(ref_ticks() - t0);
      }
    }
    if (child != 0) {
      ref_ticks_to_ns(clock, t, iters);
      qsort(t, (size_t)iters, sizeof(double), cmp_double);
      printf("size=%zu p50_rtt_ns=%.0f p99_rtt_ns=%.0f\n", sizes[s], t[iters / 2], t[(int)(iters * 0.99)]);
      fflush(stdout);
    }
  }
  if (child == 0) return 0;
  waitpid(child, NULL, 0);
  return 0;
}
