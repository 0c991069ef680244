/* Plain C reference: one-way TCP stream over loopback.
 *
 * The baseline that `lamina-net bench bandwidth --transport tcp` is compared
 * with. Forks a receiver; the sender writes COUNT messages of SIZE bytes with
 * blocking send(), the receiver reads each one whole with blocking recv() and
 * answers one byte after the last, so the time covers every byte arriving.
 * WARMUP messages (and their answer) go first, unmeasured. Sockets get
 * TCP_NODELAY and SO_SNDBUF/SO_RCVBUF of BUFFER bytes, as lamina-net's tcp
 * connections do (LAMINA_NET_TCP_BUFFER).
 *
 * usage: ref_tcp_stream SIZE[,SIZE...] COUNT WARMUP BUFFER
 * prints one line per size: "size=<bytes> count=<n> seconds=<s> gbps=<1e9 bytes/s>"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ref_timing.h"

static void io_all(int fd, char *buf, size_t n, int writing) {
  while (n > 0) {
    ssize_t r = writing ? send(fd, buf, n, MSG_NOSIGNAL) : recv(fd, buf, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) { perror(writing ? "send" : "recv"); exit(1); }
    buf += r;
    n -= (size_t)r;
  }
}

static void tune(int fd, int bytes) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (bytes > 0) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
  }
}

/* Sends `count` messages, then waits for the receiver's one-byte answer. */
static void stream(int fd, char *buf, size_t size, int count) {
  char ack;
  for (int i = 0; i < count; ++i) io_all(fd, buf, size, 1);
  io_all(fd, &ack, 1, 0);
}

static void drain(int fd, char *buf, size_t size, int count) {
  char ack = 1;
  for (int i = 0; i < count; ++i) io_all(fd, buf, size, 0);
  io_all(fd, &ack, 1, 1);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s SIZE[,SIZE...] COUNT WARMUP BUFFER\n", argv[0]);
    return 2;
  }
  size_t sizes[64];
  int nsizes = 0;
  for (char *tok = strtok(argv[1], ","); tok && nsizes < 64; tok = strtok(NULL, ",")) sizes[nsizes++] = strtoull(tok, NULL, 0);
  int count = atoi(argv[2]), warmup = atoi(argv[3]), bufbytes = atoi(argv[4]);
  if (nsizes == 0 || count <= 0 || warmup < 0) {
    fprintf(stderr, "%s: needs sizes, COUNT > 0 and WARMUP >= 0\n", argv[0]);
    return 2;
  }
  size_t max = 1;
  for (int i = 0; i < nsizes; ++i) if (sizes[i] > max) max = sizes[i];

  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {0};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 1)) { perror("bind/listen"); return 1; }
  socklen_t len = sizeof(addr);
  getsockname(lfd, (struct sockaddr *)&addr, &len);

  char *buf = malloc(max);
  memset(buf, 1, max);
  pid_t child = fork();
  if (child == 0) {
    int fd = accept(lfd, NULL, NULL);
    tune(fd, bufbytes);
    for (int s = 0; s < nsizes; ++s) {
      if (warmup) drain(fd, buf, sizes[s], warmup);
      drain(fd, buf, sizes[s], count);
    }
    return 0;
  }
  close(lfd);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  tune(fd, bufbytes);
  if (connect(fd, (struct sockaddr *)&addr, sizeof(addr))) { perror("connect"); return 1; }
  for (int s = 0; s < nsizes; ++s) {
    if (warmup) stream(fd, buf, sizes[s], warmup);
    double t0 = ref_now_ns();
    stream(fd, buf, sizes[s], count);
    double seconds = (ref_now_ns() - t0) / 1e9;
    printf("size=%zu count=%d seconds=%.6f gbps=%.4f\n", sizes[s], count, seconds,
           (double)sizes[s] * count / seconds / 1e9);
    fflush(stdout);
  }
  int status = 0;
  waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
