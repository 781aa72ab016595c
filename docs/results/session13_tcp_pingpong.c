/* Raw loopback TCP ping-pong (8 B), both sides busy-polling non-blocking recv: the kernel's
 * floor for one round trip, to set beside ucx_perftest's tcp round trip on the same machine.
 * usage: tcp_pingpong [iters] [epoll]   (epoll: poll with epoll_wait(0) before each recv, as UCX does) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int EP = 0;
static void rd(int fd, int ep, char *b) {
  size_t got = 0;
  while (got < 8) {
    if (ep >= 0) { struct epoll_event e; if (epoll_wait(ep, &e, 1, 0) < 1) continue; }
    ssize_t n = recv(fd, b + got, 8 - got, MSG_DONTWAIT);
    if (n > 0) got += n; else if (n == 0) exit(0);
  }
}
static int mkep(int fd) {
  if (!EP) return -1;
  int ep = epoll_create1(0); struct epoll_event e = {.events = EPOLLIN | EPOLLET}; e.data.fd = fd;
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e); return ep;
}
int main(int argc, char **argv) {
  int iters = argc > 1 ? atoi(argv[1]) : 200000; EP = argc > 2;
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sa;
  bind(l, (void *)&sa, sizeof sa); listen(l, 1); getsockname(l, (void *)&sa, &sl);
  if (fork() == 0) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (void *)&sa, sizeof sa); setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int ep = mkep(c); char b[8];
    for (;;) { rd(c, ep, b); send(c, b, 8, 0); }
  }
  int s = accept(l, 0, 0); setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int ep = mkep(s); char b[8] = {0};
  for (int i = 0; i < 20000; i++) { send(s, b, 8, 0); rd(s, ep, b); }
  double t0 = now();
  for (int i = 0; i < iters; i++) { send(s, b, 8, 0); rd(s, ep, b); }
  double t = now() - t0;
  printf("raw tcp loopback 8 B round trip%s: %.2f us\n", EP ? " (epoll_wait before recv)" : "", t / iters * 1e6);
  close(s); wait(NULL); return 0;
}
