/* nbdlat: queue-depth-1 write latency against an NBD server, via libnbd.
 *
 * fio's nbd engine cannot set NBD_CMD_FLAG_FUA, so this small client times
 * what fio cannot: 4 KiB writes with FUA. It also times write+FLUSH pairs,
 * to cross-check fio's fsync=1 numbers with an independent client.
 *
 *   nbdlat URI MODE SECONDS EXTENT_BYTES [BLOCK_BYTES] [RAMP_SECONDS]
 *
 * MODE is one of
 *   fua    pwrite(FUA) per op; latency = the write's round trip
 *   flush  pwrite, then flush, per op; latency = both round trips
 *   write  plain pwrite per op (no durability; for reference only)
 *
 * Offsets are uniformly random, block-aligned, in [0, EXTENT_BYTES). Each
 * op is timed with CLOCK_MONOTONIC around the synchronous libnbd calls, so
 * a latency includes the client's send and receive. The first RAMP_SECONDS
 * (default 1) are run but not recorded. Prints one JSON object on stdout.
 *
 * Build: gcc -O2 -o nbdlat nbdlat.c $(pkg-config --cflags --libs libnbd)
 */

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

struct samples {
  uint64_t *v;
  size_t n, cap;
};

static void push(struct samples *s, uint64_t x)
{
  if (s->n == s->cap) {
    s->cap = s->cap ? s->cap * 2 : 4096;
    s->v = realloc(s->v, s->cap * sizeof *s->v);
    if (!s->v) {
      perror("realloc");
      exit(1);
    }
  }
  s->v[s->n++] = x;
}

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples, in microseconds. */
static double pct_us(const struct samples *s, double p)
{
  if (s->n == 0)
    return 0.0;
  size_t rank = (size_t)(p / 100.0 * (double)s->n + 0.999999);
  if (rank < 1)
    rank = 1;
  if (rank > s->n)
    rank = s->n;
  return (double)s->v[rank - 1] / 1000.0;
}

static double mean_us(const struct samples *s)
{
  if (s->n == 0)
    return 0.0;
  long double sum = 0;
  for (size_t i = 0; i < s->n; i++)
    sum += s->v[i];
  return (double)(sum / s->n / 1000.0);
}

static void print_dist(const char *name, struct samples *s, int comma)
{
  qsort(s->v, s->n, sizeof *s->v, cmp_u64);
  printf("\"%s\":{\"n\":%zu,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,"
         "\"p99\":%.1f,\"p99.9\":%.1f,\"max\":%.1f}%s",
         name, s->n, mean_us(s), pct_us(s, 50), pct_us(s, 90), pct_us(s, 99),
         pct_us(s, 99.9), s->n ? (double)s->v[s->n - 1] / 1000.0 : 0.0,
         comma ? "," : "");
}

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *x)
{
  *x ^= *x << 13;
  *x ^= *x >> 7;
  *x ^= *x << 17;
  return *x;
}

static void die(const char *what)
{
  fprintf(stderr, "nbdlat: %s: %s\n", what, nbd_get_error());
  exit(1);
}

int main(int argc, char **argv)
{
  if (argc < 5) {
    fprintf(stderr,
            "usage: %s URI fua|flush|write SECONDS EXTENT_BYTES [BLOCK_BYTES] "
            "[RAMP_SECONDS]\n",
            argv[0]);
    return 2;
  }
  const char *uri = argv[1], *mode = argv[2];
  double seconds = atof(argv[3]);
  uint64_t extent = strtoull(argv[4], NULL, 0);
  uint64_t bs = argc > 5 ? strtoull(argv[5], NULL, 0) : 4096;
  double ramp = argc > 6 ? atof(argv[6]) : 1.0;
  int fua = strcmp(mode, "fua") == 0, flush = strcmp(mode, "flush") == 0;
  if (!fua && !flush && strcmp(mode, "write") != 0) {
    fprintf(stderr, "nbdlat: unknown mode %s\n", mode);
    return 2;
  }
  if (bs == 0 || extent < bs) {
    fprintf(stderr, "nbdlat: extent must hold at least one block\n");
    return 2;
  }

  struct nbd_handle *h = nbd_create();
  if (!h)
    die("nbd_create");
  if (nbd_connect_uri(h, uri) == -1)
    die("connect");
  if (fua && nbd_can_fua(h) != 1) {
    fprintf(stderr, "nbdlat: the server does not advertise FUA\n");
    return 1;
  }
  if (flush && nbd_can_flush(h) != 1) {
    fprintf(stderr, "nbdlat: the server does not advertise FLUSH\n");
    return 1;
  }

  char *buf = aligned_alloc(4096, (bs + 4095) / 4096 * 4096);
  if (!buf) {
    perror("aligned_alloc");
    return 1;
  }
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  for (uint64_t i = 0; i < bs; i++)
    buf[i] = (char)xorshift(&rng);

  struct samples total = {0}, wr = {0}, fl = {0};
  uint64_t blocks = extent / bs;
  uint64_t start = now_ns();
  uint64_t record_from = start + (uint64_t)(ramp * 1e9);
  uint64_t stop = record_from + (uint64_t)(seconds * 1e9);
  uint64_t t0 = start, recorded_start = 0, all_ops = 0;
  while (t0 < stop) {
    uint64_t off = (xorshift(&rng) % blocks) * bs;
    buf[0] = (char)off; /* never write the same bytes twice in a row */
    if (nbd_pwrite(h, buf, bs, off, fua ? LIBNBD_CMD_FLAG_FUA : 0) == -1)
      die("pwrite");
    uint64_t t1 = now_ns(), t2 = t1;
    if (flush && nbd_flush(h, 0) == -1)
      die("flush");
    if (flush)
      t2 = now_ns();
    all_ops++;
    if (t0 >= record_from) {
      if (!recorded_start)
        recorded_start = t0;
      push(&total, t2 - t0);
      push(&wr, t1 - t0);
      if (flush)
        push(&fl, t2 - t1);
    }
    t0 = t2;
  }
  double elapsed = recorded_start ? (double)(t0 - recorded_start) / 1e9 : 0.0;

  /* all_ops counts the ramp too: what the server did while the client ran. */
  printf("{\"mode\":\"%s\",\"block\":%" PRIu64 ",\"ops\":%zu,\"all_ops\":%" PRIu64
         ",\"seconds\":%.3f,\"iops\":%.1f,\"unit\":\"us\",",
         mode, bs, total.n, all_ops, elapsed, elapsed > 0 ? total.n / elapsed : 0.0);
  print_dist("lat", &total, 1);
  print_dist("write", &wr, flush);
  if (flush)
    print_dist("flush", &fl, 0);
  printf("}\n");

  nbd_shutdown(h, 0);
  nbd_close(h);
  free(buf);
  free(total.v);
  free(wr.v);
  free(fl.v);
  return 0;
}
