/* Plain C reference: RDMA ping-pong with bare libibverbs, no lamina-net.
 *
 * The floor that `lamina-net bench latency --transport verbs` is compared
 * with, per way of telling the receiver (perftest's ib_write_lat only has the
 * first):
 *   write         one RDMA WRITE whose last 8 bytes carry the round number;
 *                 the peer polls that word (how ib_write_lat detects arrival)
 *   write+atomic  the WRITE, then ATOMIC FETCH_AND_ADD 1 on a signal word,
 *                 both in one ibv_post_send (lamina-net's put-with-signal)
 *   write+write   the WRITE, then an inline 8-byte WRITE of the round number
 *                 into the signal word, one ibv_post_send (Lamina's seqno)
 * Two threads, each with an RC QP connected to the other's on one device
 * (loopback through the port), so no out-of-band exchange is needed.
 * Payloads up to 220 B are inlined (what lamina-net and perftest ask for),
 * larger ones sent from a registered buffer; every 32nd request is signaled
 * and the CQ is drained as the rounds go.
 *
 * usage: ref_verbs_pingpong DEVICE GID_INDEX MODE SIZE[,SIZE...] ITERATIONS WARMUP
 * prints one line per size: "size=<bytes> p50_rtt_ns=<ns> p99_rtt_ns=<ns>"
 */
#define _GNU_SOURCE
#include <infiniband/verbs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ref_timing.h"

enum mode { MODE_WRITE, MODE_WRITE_ATOMIC, MODE_WRITE_WRITE };
enum { MAX_INLINE = 220, SIGNAL_EVERY = 32, QUEUE_DEPTH = 128 };

struct side {
  struct ibv_cq *cq;
  struct ibv_qp *qp;
  uint8_t *target; /* the peer writes here: payload at 0, signal word at target_size */
  struct ibv_mr *target_mr;
  uint8_t *source;
  struct ibv_mr *source_mr;
  uint64_t round_word; /* inline source of the write+write signal */
  uint64_t atomic_result;
  struct ibv_mr *scratch_mr;
  uint64_t peer_addr;
  uint32_t peer_rkey;
  int initiator;
  double *rtt_ns;
  unsigned posted;
};

static struct ibv_context *context;
static struct ibv_pd *pd;
static enum mode mode;
static uint64_t target_size, size;
static int iterations, warmup, gid_index;
static struct side sides[2];

static void die(const char *what) {
  perror(what);
  exit(1);
}


static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static uint8_t *alloc_pages(size_t bytes) {
  void *p = NULL;
  if (posix_memalign(&p, 4096, bytes)) die("posix_memalign");
  memset(p, 0, bytes);
  return p;
}

static void create_side(struct side *s) {
  s->cq = ibv_create_cq(context, 2 * QUEUE_DEPTH, NULL, NULL, 0);
  if (!s->cq) die("ibv_create_cq");
  struct ibv_qp_init_attr init = {0};
  init.send_cq = init.recv_cq = s->cq;
  init.qp_type = IBV_QPT_RC;
  init.cap.max_send_wr = QUEUE_DEPTH;
  init.cap.max_recv_wr = 1;
  init.cap.max_send_sge = init.cap.max_recv_sge = 1;
  init.cap.max_inline_data = MAX_INLINE;
  s->qp = ibv_create_qp(pd, &init);
  if (!s->qp) die("ibv_create_qp");
  s->target = alloc_pages(target_size + 4096);
  s->target_mr = ibv_reg_mr(pd, s->target, target_size + 4096,
                            IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC);
  s->source = alloc_pages(target_size);
  memset(s->source, 1, target_size);
  s->source_mr = ibv_reg_mr(pd, s->source, target_size, IBV_ACCESS_LOCAL_WRITE);
  s->scratch_mr = ibv_reg_mr(pd, &s->atomic_result, sizeof(s->atomic_result), IBV_ACCESS_LOCAL_WRITE);
  if (!s->target_mr || !s->source_mr || !s->scratch_mr) die("ibv_reg_mr");
}

static void connect_to(struct side *s, const struct side *peer) {
  union ibv_gid gid;
  if (ibv_query_gid(context, 1, gid_index, &gid)) die("ibv_query_gid");
  struct ibv_port_attr port;
  if (ibv_query_port(context, 1, &port)) die("ibv_query_port");
  struct ibv_qp_attr a = {0};
  a.qp_state = IBV_QPS_INIT;
  a.port_num = 1;
  a.qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC;
  if (ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
    die("modify_qp INIT");
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = port.active_mtu;
  a.dest_qp_num = peer->qp->qp_num;
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = 12;
  a.ah_attr.is_global = 1;
  a.ah_attr.grh.dgid = gid;
  a.ah_attr.grh.sgid_index = gid_index;
  a.ah_attr.grh.hop_limit = 1;
  a.ah_attr.dlid = port.lid;
  a.ah_attr.port_num = 1;
  if (ibv_modify_qp(s->qp, &a,
                    IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                        IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
    die("modify_qp RTR");
  memset(&a, 0, sizeof(a));
  a.qp_state = IBV_QPS_RTS;
  a.timeout = 17;
  a.retry_cnt = 6;
  a.rnr_retry = 6;
  a.max_rd_atomic = 1;
  if (ibv_modify_qp(s->qp, &a,
                    IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                        IBV_QP_MAX_QP_RD_ATOMIC))
    die("modify_qp RTS");
  s->peer_addr = (uint64_t)(uintptr_t)peer->target;
  s->peer_rkey = peer->target_mr->rkey;
}

/* Retires completions; fails loudly on an error status (never "not yet"). */
static void drain_cq(struct side *s) {
  struct ibv_wc wc[16];
  int n;
  while ((n = ibv_poll_cq(s->cq, 16, wc)) > 0) {
    for (int i = 0; i < n; ++i) {
      if (wc[i].status != IBV_WC_SUCCESS) {
        fprintf(stderr, "ref_verbs_pingpong: completion failed: %s\n", ibv_wc_status_str(wc[i].status));
        exit(1);
      }
    }
  }
  if (n < 0) die("ibv_poll_cq");
}

static void send_round(struct side *s, uint64_t round) {
  struct ibv_send_wr wr[2], *bad = NULL;
  struct ibv_sge data, signal;
  memset(wr, 0, sizeof(wr));
  if (mode == MODE_WRITE) memcpy(s->source + size - 8, &round, 8);
  data.addr = (uint64_t)(uintptr_t)s->source;
  data.length = (uint32_t)size;
  data.lkey = s->source_mr->lkey;
  wr[0].opcode = IBV_WR_RDMA_WRITE;
  wr[0].sg_list = &data;
  wr[0].num_sge = 1;
  wr[0].send_flags = size <= MAX_INLINE ? IBV_SEND_INLINE : 0;
  wr[0].wr.rdma.remote_addr = s->peer_addr;
  wr[0].wr.rdma.rkey = s->peer_rkey;
  int count = 1;
  if (mode != MODE_WRITE) {
    wr[0].next = &wr[1];
    count = 2;
    if (mode == MODE_WRITE_ATOMIC) {
      signal.addr = (uint64_t)(uintptr_t)&s->atomic_result;
      signal.length = 8;
      signal.lkey = s->scratch_mr->lkey;
      wr[1].opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
      wr[1].wr.atomic.remote_addr = s->peer_addr + target_size;
      wr[1].wr.atomic.compare_add = 1;
      wr[1].wr.atomic.rkey = s->peer_rkey;
    } else {
      s->round_word = round;
      signal.addr = (uint64_t)(uintptr_t)&s->round_word;
      signal.length = 8;
      signal.lkey = 0;
      wr[1].opcode = IBV_WR_RDMA_WRITE;
      wr[1].send_flags = IBV_SEND_INLINE;
      wr[1].wr.rdma.remote_addr = s->peer_addr + target_size;
      wr[1].wr.rdma.rkey = s->peer_rkey;
    }
    wr[1].sg_list = &signal;
    wr[1].num_sge = 1;
  }
  for (int i = 0; i < count; ++i) {
    if (++s->posted % SIGNAL_EVERY == 0) wr[i].send_flags |= IBV_SEND_SIGNALED;
  }
  if (ibv_post_send(s->qp, wr, &bad)) die("ibv_post_send");
}

static void wait_round(struct side *s, uint64_t round) {
  const volatile uint64_t *word =
      (const volatile uint64_t *)(s->target + (mode == MODE_WRITE ? size - 8 : target_size));
  while (__atomic_load_n(word, __ATOMIC_ACQUIRE) < round) __builtin_ia32_pause();
}

static void *run_side(void *arg) {
  struct side *s = arg;
  const int total = warmup + iterations;
  const struct ref_clock clock = ref_clock_start();
  for (int i = 0; i < total; ++i) {
    const uint64_t round = (uint64_t)i + 1;
    if (s->initiator) {
      const uint64_t t0 = ref_ticks();
      send_round(s, round);
      wait_round(s, round);
      if (i >= warmup) s->rtt_ns[i - warmup] = (double)(ref_ticks() - t0);
    } else {
      wait_round(s, round);
      send_round(s, round);
    }
    drain_cq(s);
  }
  if (s->initiator) ref_ticks_to_ns(clock, s->rtt_ns, iterations);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s DEVICE GID_INDEX write|write+atomic|write+write SIZE[,SIZE...] ITERATIONS WARMUP\n",
            argv[0]);
    return 2;
  }
  gid_index = atoi(argv[2]);
  if (!strcmp(argv[3], "write")) mode = MODE_WRITE;
  else if (!strcmp(argv[3], "write+atomic")) mode = MODE_WRITE_ATOMIC;
  else if (!strcmp(argv[3], "write+write")) mode = MODE_WRITE_WRITE;
  else {
    fprintf(stderr, "unknown mode %s\n", argv[3]);
    return 2;
  }
  iterations = atoi(argv[5]);
  warmup = atoi(argv[6]);
  if (iterations <= 0 || warmup < 0) {
    fprintf(stderr, "ITERATIONS must be > 0 and WARMUP >= 0\n");
    return 2;
  }
  /* One allocation for the largest size; each size runs on fresh QPs. */
  char *sizes = strdup(argv[4]);
  for (char *tok = strtok(sizes, ","); tok; tok = strtok(NULL, ",")) {
    uint64_t s = strtoull(tok, NULL, 10);
    if (s > target_size) target_size = s;
    if (s < 8 || s % 8) {
      fprintf(stderr, "sizes must be multiples of 8 bytes\n");
      return 2;
    }
  }
  target_size = (target_size + 4095) & ~4095ull;

  int count = 0;
  struct ibv_device **devices = ibv_get_device_list(&count);
  if (!devices) die("ibv_get_device_list");
  struct ibv_device *device = NULL;
  for (int i = 0; i < count; ++i)
    if (!strcmp(ibv_get_device_name(devices[i]), argv[1])) device = devices[i];
  if (!device) {
    fprintf(stderr, "no RDMA device named %s\n", argv[1]);
    return 1;
  }
  context = ibv_open_device(device);
  if (!context) die("ibv_open_device");
  pd = ibv_alloc_pd(context);
  if (!pd) die("ibv_alloc_pd");

  strcpy(sizes, argv[4]);
  for (char *tok = strtok(sizes, ","); tok; tok = strtok(NULL, ",")) {
    size = strtoull(tok, NULL, 10);
    for (int k = 0; k < 2; ++k) {
      memset(&sides[k], 0, sizeof(sides[k]));
      create_side(&sides[k]);
    }
    connect_to(&sides[0], &sides[1]);
    connect_to(&sides[1], &sides[0]);
    sides[0].initiator = 1;
    sides[0].rtt_ns = calloc((size_t)iterations, sizeof(double));
    pthread_t threads[2];
    for (int k = 0; k < 2; ++k) pthread_create(&threads[k], NULL, run_side, &sides[k]);
    for (int k = 0; k < 2; ++k) pthread_join(threads[k], NULL);
    qsort(sides[0].rtt_ns, (size_t)iterations, sizeof(double), cmp_double);
    printf("size=%llu p50_rtt_ns=%.0f p99_rtt_ns=%.0f\n", (unsigned long long)size,
           sides[0].rtt_ns[iterations / 2], sides[0].rtt_ns[(int)(iterations * 0.99)]);
    fflush(stdout);
    for (int k = 0; k < 2; ++k) {
      ibv_destroy_qp(sides[k].qp);
      ibv_destroy_cq(sides[k].cq);
      ibv_dereg_mr(sides[k].target_mr);
      ibv_dereg_mr(sides[k].source_mr);
      ibv_dereg_mr(sides[k].scratch_mr);
      free(sides[k].target);
      free(sides[k].source);
    }
    free(sides[0].rtt_ns);
  }
  free(sizes);
  ibv_dealloc_pd(pd);
  ibv_close_device(context);
  ibv_free_device_list(devices);
  return 0;
}
