/* Plain C reference: ping-pong over loopback TCP with TCP_NODELAY.
 *
 * The baseline that `lamina-net bench latency --transport tcp` is compared
 * with. Forks a server and a client on 127.0.0.1; the client sends `size`
 * bytes, the server reads them and sends `size` bytes back.
 * Mode "block": blocking recv (the reader sleeps in the kernel; its wake-up
 * time depends on how deeply the idle core slept). Mode "spin": non-blocking
 * recv in a loop, the same waiting strategy as lamina-net's spin phase.
 *
 * usage: ref_tcp_pingpong block|spin SIZE[,SIZE...] ITERATIONS WARMUP
 * prints one line per size: "size=<bytes> p50_rtt_ns=<ns> p99_rtt_ns=<ns>"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>

#include "ref_timing.h"

static int g_spin;

static void io_all(int fd, char *buf, size_t n, int writing) {
  while (n > 0) {
    ssize_t r = writing ? send(fd, buf, n, MSG_NOSIGNAL) : recv(fd, buf, n, g_spin ? MSG_DONTWAIT : 0);
    if (r < 0 && !writing && g_spin && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (r <= 0) { perror(writing ? "send" : "recv"); exit(1); }
    buf += r;
    n -= (size_t)r;
  }
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void tune(int fd) {
  int one = 1, bytes = 4 << 20;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

int main(int argc, char **argv) {
  if (argc != 5 || (strcmp(argv[1], "block") && strcmp(argv[1], "spin"))) {
    fprintf(stderr, "usage: %s block|spin SIZE[,SIZE...] ITERATIONS WARMUP\n", argv[0]);
    return 2;
  }
  g_spin = strcmp(argv[1], "spin") == 0;
  size_t sizes[64];
  int nsizes = 0;
  for (char *tok = strtok(argv[2], ","); tok && nsizes < 64; tok = strtok(NULL, ",")) sizes[nsizes++] = strtoull(tok, NULL, 0);
  int iters = atoi(argv[3]), warmup = atoi(argv[4]);
  size_t max = 1;
  for (int i = 0; i < nsizes; ++i) if (sizes[i] > max) max = sizes[i];

  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {0};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 1)) { perror("bind/listen"); return 1; }
  socklen_t len = sizeof(addr);
  getsockname(lfd, (struct sockaddr *)&addr, &len);

  char *buf = calloc(1, max);
  pid_t child = fork();
  if (child == 0) {
    int fd = accept(lfd, NULL, NULL);
    tune(fd);
    for (int s = 0; s < nsizes; ++s)
      for (int i = 0; i < iters + warmup; ++i) {
        io_all(fd, buf, sizes[s], 0);
        io_all(fd, buf, sizes[s], 1);
      }
    return 0;
  }
  close(lfd);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(fd, (struct sockaddr *)&addr, sizeof(addr))) { perror("connect"); return 1; }
  tune(fd);
  double *t = malloc(sizeof(double) * (size_t)iters);
  for (int s = 0; s < nsizes; ++s) {
    struct ref_clock clock = ref_clock_start();
    for (int i = 0; i < iters + warmup; ++i) {
      uint64_t t0 = ref_ticks();
      io_all(fd, buf, sizes[s], 1);
      io_all(fd, buf, sizes[s], 0);
      if (i >= warmup) t[i - warmup] = (double)(ref_ticks() - t0);
    }
    ref_ticks_to_ns(clock, t, iters);
    qsort(t, (size_t)iters, sizeof(double), cmp_double);
    printf("size=%zu p50_rtt_ns=%.0f p99_rtt_ns=%.0f\n", sizes[s], t[iters / 2], t[(int)(iters * 0.99)]);
    fflush(stdout);
  }
  waitpid(child, NULL, 0);
  return 0;
}
