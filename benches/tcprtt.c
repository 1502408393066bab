/* tcprtt: loopback TCP round-trip time, for scale next to replicated
 * latencies.
 *
 *   tcprtt SECONDS [MSG_BYTES]
 *
 * One process, two threads: an echo server on 127.0.0.1 (the port is
 * chosen by the kernel) and a client that sends MSG_BYTES (default 32, the
 * size of a Tandem Flush frame), waits for the same bytes back, and times
 * each round trip with CLOCK_MONOTONIC. TCP_NODELAY on both ends, blocking
 * sockets: each round trip includes two thread wake-ups, as a message to
 * the peer node and its acknowledgement do. Prints one JSON object:
 * {"n":…, "mean":…, "p50":…, "p90":…, "p99":…} in microseconds.
 *
 * Build: gcc -O2 -pthread -o tcprtt tcprtt.c
 */

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static size_t msg_bytes = 32;
static int listen_fd;

static void die(const char *what)
{
  perror(what);
  exit(1);
}

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void nodelay(int fd)
{
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
    die("setsockopt");
}

/* Read exactly n bytes; 0 at end of stream. */
static int read_full(int fd, char *buf, size_t n)
{
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, buf + got, n - got);
    if (r < 0)
      die("read");
    if (r == 0)
      return 0;
    got += (size_t)r;
  }
  return 1;
}

static void write_full(int fd, const char *buf, size_t n)
{
  size_t put = 0;
  while (put < n) {
    ssize_t r = write(fd, buf + put, n - put);
    if (r < 0)
      die("write");
    put += (size_t)r;
  }
}

static void *echo(void *arg)
{
  (void)arg;
  int fd = accept(listen_fd, NULL, NULL);
  if (fd < 0)
    die("accept");
  nodelay(fd);
  char *buf = malloc(msg_bytes);
  while (read_full(fd, buf, msg_bytes))
    write_full(fd, buf, msg_bytes);
  close(fd);
  free(buf);
  return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static double pct_us(const uint64_t *v, size_t n, double p)
{
  size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);
  if (rank < 1)
    rank = 1;
  if (rank > n)
    rank = n;
  return (double)v[rank - 1] / 1000.0;
}

int main(int argc, char **argv)
{
  if (argc < 2) {
    fprintf(stderr, "usage: tcprtt SECONDS [MSG_BYTES]\n");
    return 2;
  }
  double seconds = atof(argv[1]);
  if (argc > 2)
    msg_bytes = (size_t)strtoul(argv[2], NULL, 10);
  if (msg_bytes == 0)
    msg_bytes = 1;

  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  listen_fd = socket(AF_INET, SOCK_STREAM, 0);
  if (listen_fd < 0)
    die("socket");
  if (bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0)
    die("bind");
  if (listen(listen_fd, 1) < 0)
    die("listen");
  socklen_t len = sizeof addr;
  if (getsockname(listen_fd, (struct sockaddr *)&addr, &len) < 0)
    die("getsockname");

  pthread_t server;
  if (pthread_create(&server, NULL, echo, NULL) != 0)
    die("pthread_create");

  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    die("socket");
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
    die("connect");
  nodelay(fd);

  char *buf = calloc(1, msg_bytes);
  size_t cap = 1 << 16, n = 0;
  uint64_t *v = malloc(cap * sizeof *v);
  if (!buf || !v)
    die("malloc");
  uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
  for (;;) {
    uint64_t t0 = now_ns();
    if (t0 >= end)
      break;
    write_full(fd, buf, msg_bytes);
    if (!read_full(fd, buf, msg_bytes)) {
      fprintf(stderr, "tcprtt: the echo side closed\n");
      return 1;
    }
    if (n == cap) {
      cap *= 2;
      v = realloc(v, cap * sizeof *v);
      if (!v)
        die("realloc");
    }
    v[n++] = now_ns() - t0;
  }
  close(fd);
  pthread_join(server, NULL);

  qsort(v, n, sizeof *v, cmp_u64);
  long double sum = 0;
  for (size_t i = 0; i < n; i++)
    sum += v[i];
  printf("{\"n\":%zu,\"msg_bytes\":%zu,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f}\n",
         n, msg_bytes, n ? (double)(sum / n / 1000.0) : 0.0, pct_us(v, n, 50), pct_us(v, n, 90),
         pct_us(v, n, 99));
  free(v);
  free(buf);
  return 0;
}
