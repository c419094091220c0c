/* A small epoll load generator and echo server for benchmarks/proxy_bench.py.
 *
 * Written in C so that the load generator is not the bottleneck being measured on a
 * 2-core machine.  Every mode is bounded in time and/or count.
 *
 *   loadgen server MPTCP                      echo server on 127.0.0.1:0, prints its port
 *   loadgen rate PORT CONC SECS MAX REQ MPTCP new connection per request
 *   loadgen rr   PORT CONC SECS MAX REQ MPTCP requests on persistent connections
 *   loadgen idle PORT N MPTCP                 N echoed connections, held until stdin EOF
 * Client modes print one JSON line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>

#define MAXC 20000
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static int mksock(int mptcp) { return socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, mptcp ? 262 : 0); }
static struct sockaddr_in target(int port) {
    struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); return a;
}
static int cmpd(const void *a, const void *b) { double x = *(double*)a, y = *(double*)b; return x < y ? -1 : x > y; }

static int server(int mptcp) {
    int ls = mksock(mptcp), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = target(0); socklen_t al = sizeof a;
    if (bind(ls, (void*)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
    getsockname(ls, (void*)&a, &al); printf("%d\n", ntohs(a.sin_port)); fflush(stdout);
    int ep = epoll_create1(0); struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[256]; static char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (getppid() == 1) return 0;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) { int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK); if (c < 0) break;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event e = {.events = EPOLLIN, .data.fd = c}; epoll_ctl(ep, EPOLL_CTL_ADD, c, &e); }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) { ssize_t w = 0; while (w < r) { ssize_t k = write(fd, buf + w, r - w);
                    if (k < 0) { if (errno == EAGAIN) { struct pollfd p = {fd, POLLOUT, 0}; poll(&p, 1, 1000); continue; } break; } w += k; } }
            else if (r == 0 || errno != EAGAIN) close(fd);
        }
    }
}

typedef struct { int fd; int state; int got; double t0; } conn_t;  /* state 1 connecting, 2 reading */
static conn_t cs[MAXC];
static double *lat; static long nlat, maxlat;
static long errors;

static int start_conn(int ep, int port, int mptcp, int i) {
    struct sockaddr_in a = target(port);
    int fd = mksock(mptcp), one = 1;
    if (fd < 0) { errors++; return -1; }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    cs[i].fd = fd; cs[i].got = 0; cs[i].t0 = now();
    int r = connect(fd, (void*)&a, sizeof a);
    cs[i].state = (r == 0) ? 2 : 1;
    if (r < 0 && errno != EINPROGRESS) { close(fd); errors++; cs[i].fd = -1; return -1; }
    struct epoll_event e = {.events = EPOLLOUT | EPOLLIN, .data.u32 = i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    return 0;
}

static int client(const char *mode, int port, int conc, double secs, long max, int req, int mptcp) {
    int persistent = !strcmp(mode, "rr");
    static char out[65536], in[65536]; memset(out, 'q', sizeof out);
    if (conc > MAXC) conc = MAXC;
    maxlat = max; lat = malloc(sizeof(double) * max); nlat = 0;
    int ep = epoll_create1(0); struct epoll_event evs[512];
    double t_start = now(), t_end = t_start + secs; long started = 0;
    for (int i = 0; i < conc && started < max; i++) { start_conn(ep, port, mptcp, i); started++; }
    int live = conc;
    while (live > 0) {
        int n = epoll_wait(ep, evs, 512, 200);
        double t = now();
        if (t > t_end + 10) break;
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32; conn_t *c = &cs[i]; if (c->fd < 0) continue;
            int done = 0, fail = 0;
            if (evs[k].events & (EPOLLERR | EPOLLHUP) && c->state == 1) fail = 1;
            else if (c->state == 1 && (evs[k].events & EPOLLOUT)) {
                if (write(c->fd, out, req) != req) fail = 1; else c->state = 2;
                struct epoll_event e = {.events = EPOLLIN, .data.u32 = i}; epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
            } else if (c->state == 2 && (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                ssize_t r = read(c->fd, in, sizeof in);
                if (r > 0) { c->got += r; if (c->got >= req) done = 1; }
                else if (r == 0 || errno != EAGAIN) fail = 1;
            }
            if (done && nlat < maxlat) lat[nlat++] = now() - c->t0;
            if (fail) errors++;
            if (done || fail) {
                int more = now() < t_end && started < max;
                if (persistent && done && more) {
                    c->got = 0; c->t0 = now(); started++;
                    if (write(c->fd, out, req) != req) { errors++; close(c->fd); c->fd = -1; live--; }
                    continue;
                }
                close(c->fd); c->fd = -1;
                if (more) { started++; if (start_conn(ep, port, mptcp, i) < 0) live--; }
                else live--;
            }
        }
    }
    double el = now() - t_start;
    qsort(lat, nlat, sizeof(double), cmpd);
    double p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[(long)(nlat * 0.99)] : 0;
    printf("{\"done\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"errors\": %ld}\n",
           nlat, el, nlat / el, p50 * 1e6, p99 * 1e6, errors);
    return 0;
}

static int idle(int port, int n, int mptcp) {
    if (n > MAXC) n = MAXC;
    int ep = epoll_create1(0); struct epoll_event evs[512]; char b[16];
    int opened = 0, ready = 0, inflight = 0; double t_end = now() + 120;
    while (ready < n && now() < t_end) {
        while (inflight < 256 && opened < n) { if (start_conn(ep, port, mptcp, opened) == 0) inflight++; opened++; }
        int m = epoll_wait(ep, evs, 512, 200);
        for (int k = 0; k < m; k++) {
            int i = evs[k].data.u32; conn_t *c = &cs[i];
            if (c->state == 1) { if (write(c->fd, "i", 1) != 1) { errors++; inflight--; continue; } c->state = 2;
                struct epoll_event e = {.events = EPOLLIN, .data.u32 = i}; epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e); }
            else if (c->state == 2) { if (read(c->fd, b, sizeof b) > 0) { ready++; inflight--; c->state = 3;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); } else { errors++; inflight--; c->state = 4; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); } }
        }
    }
    printf("{\"ready\": %d, \"errors\": %ld}\n", ready, errors); fflush(stdout);
    while (read(0, b, sizeof b) > 0) {}
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc >= 9) return client(argv[1], atoi(argv[2]), atoi(argv[3]), atof(argv[4]), atol(argv[5]), atoi(argv[6]), atoi(argv[7]) + 0 * atoi(argv[8]));
    if (argc >= 8) return client(argv[1], atoi(argv[2]), atoi(argv[3]), atof(argv[4]), atol(argv[5]), atoi(argv[6]), atoi(argv[7]));
    if (argc >= 5 && !strcmp(argv[1], "idle")) return idle(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n"); return 2;
}
