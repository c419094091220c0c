/* The proxy's compiled data path: accept -> connect -> relay -> close, in C.
 *
 * Why: per proxied connection the pure-Python relay (relay.py) spends about 50 us of
 * user CPU in the interpreter against HAProxy's 15-20; on a busy machine that CPU is
 * the connection rate.  This module runs the same state machine as relay.py, with the
 * same rules (one shared read buffer, one pending copy per direction as backpressure,
 * half-close carried across, FIN on graceful close, RST on abort), and leaves every
 * decision that is not about moving bytes to Python, through the frontend object it
 * is given:
 *
 *   fe.pick(caddr, tried)          -> target tuple, or a str: why the client is closed
 *   fe.failed(state, err, tried)   -> None: try another server; str: close the client
 *   fe.header(state, caddr, local) -> bytes of a PROXY header for the server
 *   fe.parse(hdr)                  -> None (need more) | (caddr, daddr, used) | str
 *                                     (caddr, daddr None: LOCAL, the socket's own stand)
 *   fe.leg_state(fd)               -> "fallback"/"TCP"/None for a leg without subflows
 *   fe.done(state, record)         -> a connection ended (record None unless observing)
 *   fe.accept_failed(err)          -> accept() failed with something other than EAGAIN
 *   fe.route(caddr, dport, data, final) -> the backend (use_backend rules), or None:
 *                                     wait for more of the ClientHello (router.py)
 *
 * Frontends with use_backend rules (`route`) ask fe.route() once per connection; with
 * rules on req.ssl_sni they first peek (MSG_PEEK) at the client's bytes until the
 * ClientHello is whole or `inspect_delay` passes.  The chosen backend object goes to
 * fe.pick() as a third argument.  Frontends without rules run none of this.
 *
 * A target tuple is (state, family, sockaddr bytes, proto, fallback, send_proxy,
 * observe), made once per server by Python.  Everything here is single-threaded and
 * runs with the GIL held; sockets are registered edge-triggered once, for life.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#include <arpa/inet.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "_convert.h"

#ifndef BURST
#define BURST 16 /* default reads per leg per event before other sockets get a turn */
#endif
#define EVENTS 512        /* epoll events per poll() */
#define MIN_READ 16384    /* a read of a leg whose traffic is small (not bulk) */
#define MIN_ROOM 4096     /* a bulk read when the destination has little or no room */
#define ACCEPT_BATCH 64   /* connections accepted per listener wakeup */
#define INSPECT_LIMIT 65536 /* bytes peeked at most for a ClientHello (router.py) */
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define SOL_MPTCP 284
#define MPTCP_INFO 1
#define MPTCP_INFO_LEN 96
#define SUBFLOWS_TOTAL 80 /* offsetof(struct mptcp_info, mptcpi_subflows_total), 6.8+ */
#ifndef TCP_FASTOPEN_CONNECT
#define TCP_FASTOPEN_CONNECT 30
#endif
#define SO_ORIGINAL_DST 80 /* SOL_IP; IP6T_SO_ORIGINAL_DST is 80 at SOL_IPV6 too */

#define WATCH (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
#define WATCH_IN (EPOLLIN | EPOLLRDHUP | EPOLLET)
#define READABLE (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)
#define HANGUPS (EPOLLRDHUP | EPOLLHUP | EPOLLERR)

enum kind { K_LISTENER = 1, K_LEG, K_TIMER };

typedef struct Engine Engine;
typedef struct Frontend Frontend;
typedef struct Conn Conn;

/* An IPv4 or IPv6 socket address in 28 bytes, not sockaddr_storage's 128: the addresses
 * a connection keeps (its client's, a converter's destination) are IP ones.  A longer
 * one (a unix client bound to a path) is turned into Python at accept instead. */
typedef union {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
} Addr;

/* A converter's per-connection state (bonding, RFC 8803): where the client was going,
 * and the remote gateway's reply so far.  Allocated by the connections that need it
 * (conv_state()), freed with the connection: others do not carry it. */
typedef struct {
    Addr dest;
    socklen_t destlen;    /* 0: not known */
    unsigned char *reply; /* site: the remote gateway's Convert reply so far */
    size_t reply_len;
} Conv;

typedef struct {
    int kind;             /* K_LEG: first, so an epoll pointer says what it points to */
    int fd;               /* -1: no socket (not connected yet, or closed) */
    uint64_t born;        /* poll() batch it was registered in: older events are stale */
    unsigned client : 1, eof : 1, shut : 1, hup : 1, waiting : 1, connecting : 1, out : 1;
    unsigned big : 1;     /* its last read was full or >= MIN_READ: bulk, reads sized by room() */
    int sndbuf;           /* SO_SNDBUF as last read (0: read it again), for room() */
    long credit;          /* room() as last measured, less what was sent here since */
    char *pend;           /* bytes owed to this leg (one read at most), or NULL */
    size_t pend_off, pend_len;
    Conn *conn;
} Leg;

typedef struct {
    int kind;             /* K_LISTENER */
    int fd;
    int mptcp;            /* an MPTCP listener: its clients asked for MPTCP */
    int port;             /* the port it is bound to: dst_port of its connections, and not an intercepted one's */
    int wild;             /* intercepting: bound to any address (else to `bound`, unmapped) */
    Addr bound;
    Frontend *fe;
} Listener;

struct Conn {
    Leg c, s;
    Frontend *fe;
    Conn *prev, *next;    /* the frontend's live connections */
    Conn *tprev, *tnext;  /* the frontend's connect-timeout queue, while connecting */
    double deadline;
    Conn *pprev, *pnext;  /* the frontend's server queue, while parked (queue.py) */
    double parked;        /* waiting for a server slot since (monotonic), 0: not */
    PyObject *src;        /* its address as maxconn-per-source counts it, or NULL */
    PyObject *server;     /* the ServerState connected (or being connected) to */
    PyObject *tried;      /* list of states that failed, or NULL */
    PyObject *hdr;        /* bytearray while a PROXY header is read, else NULL */
    PyObject *early;      /* bytes that came after the PROXY header, or NULL */
    PyObject *caddr;      /* the client's address as Python sees it (made lazily) */
    PyObject *daddr;      /* the destination a PROXY header carried, or NULL */
    PyObject *how;        /* how it ended */
    PyObject *c_state, *s_state;
    PyObject *be;         /* the backend use_backend rules chose, NULL: the frontend's */
    Conv *cv;             /* a converter's state, or NULL (conv_state() makes it) */
    long c_sub, s_sub;
    double idle, start;
    double t_connect, connect_time; /* first attempt (monotonic); to established, -1: not */
    unsigned long long bytes_in, bytes_out;
    Conn *free_next;
    Addr ca;              /* the client's address (calen 0: caddr was made at accept) */
    socklen_t calen;
    int dport;            /* the port it connected to (dst_port) */
    int queued;           /* its legs in e->again (run_again): not freed while > 0 */
    /* flags, a byte each: an idle connection's size is the proxy's idle memory */
    unsigned char timed;  /* in the timeout queue */
    unsigned char inspecting; /* waiting for a ClientHello (tcp-request inspect-delay) */
    unsigned char c_req, send_proxy, s_observe, active, done;
    unsigned char retry;  /* in the timeout queue waiting to retry a server (retry.py) */
    unsigned char conv;   /* CV_* flags below (converters, bonding, RFC 8803) */
};

#define CV_ANSWER 1 /* remote: the Convert reply goes to the client before the server's bytes */
#define CV_REPLY 2  /* site: the server (remote gateway) starts with a Convert reply */
#define CV_DEST 4   /* dest is what the server leg connects to (server 0.0.0.0:0) */
#define CV_WAIT 8   /* site with TFO: waiting for the client's first bytes (they ride the SYN) */
#define CV_HOLD 16  /* remote: the client's MPTCP handshake is not complete (conv_syn_recv) */

struct Frontend {
    PyObject *key;        /* the Python frontend: callbacks go to its methods */
    int id, accept_proxy, needs_caddr, paused, closed;
    long maxconn, count;
    unsigned long long bytes_in, bytes_out; /* relayed, not yet taken (take_bytes) */
    double connect_timeout, client_timeout, idle_limit; /* < 0: none */
    PyObject *idle_how;   /* "client timeout (5s idle)" or the server's, or tunnel's */
    double fin_limit;     /* half-closed: client-fin/server-fin (timeouts.py), < 0: none */
    PyObject *fin_how;
    double queue_timeout; /* how long a parked connection waits, < 0: none */
    PyObject *queue_how;
    Conn *pq_head, *pq_tail; /* parked: every server at its maxconn (queue.py) */
    long nparked;
    long rate_limit, rate_n; /* maxconnrate: accepts per window (abuse.py), 0: none */
    int rate_held;        /* the rate stopped accepting in this window */
    int per_source;       /* ask fe.admit(address) on accept (maxconn-per-source) */
    int convert;          /* accept-convert: clients start with a Convert message */
    int intercept;        /* 1 redirect, 2 tproxy: a client's destination is its own */
    int names_dest;       /* clients name their destination (accept-convert/-proxy) */
    double first_wait;    /* TFO site: wait this long for the client's first bytes, < 0: no */
    int route;            /* use_backend rules: ask fe.route() before connecting */
    double inspect_delay; /* wait this long for a ClientHello first, < 0: no waiting */
    Listener **listeners; /* a port range binds many */
    int nlisteners, caplisteners;
    Conn head;            /* sentinel of the live list */
    Conn *tq_head, *tq_tail;
};

struct Engine {
    PyObject_HEAD
    int ep, tfd;
    int observing;
    char *buf;
    size_t size;
    int burst;            /* reads per leg per event (MPTCPKIT_PROXY_BURST, see datapath.py) */
    uint64_t batch;
    double armed;         /* deadline the timerfd is set for, 0: disarmed */
    Frontend **fes;
    int nfes, capfes;
    Leg **again;          /* legs with data left after a burst */
    size_t nagain, capagain;
    Conn *to_free;
    int timer_kind;       /* K_TIMER: epoll pointer of the timerfd */
    PyObject *call_soon;  /* the loop's call_soon, and our poll, for work cut short */
    PyObject *poll;
};

/* ---- module state: interned names and fixed reasons ------------------------------ */

static PyObject *s_pick, *s_failed, *s_header, *s_parse, *s_leg_state, *s_done,
    *s_accept_failed, *s_both_closed, *s_internal, *s_no_header, *s_closed_before_header,
    *s_tcp, *s_mptcp, *s_question, *s_dash, *s_errorcode, *s_admit, *s_release, *s_route;
/* converters (the section "converters" below) */
static PyObject *s_convert, *s_refuse, *s_dest_failed, *s_not_intercepted, *s_remote_refused,
    *s_info_answered, *s_no_convert, *s_closed_before_convert, *s_reply_eof;

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double wallclock(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int would_block(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

/* A failed callback: say so on stderr (as asyncio does for a failing callback). */
static void report(const char *what) {
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, what);
    PyObject *msg = PyUnicode_FromFormat("mptcpkit proxy engine: %s", what);
    PyErr_WriteUnraisable(msg);
    Py_XDECREF(msg);
}

static PyObject *errname(int err) {
    PyObject *code = PyLong_FromLong(err);
    PyObject *name = code ? PyDict_GetItemWithError(s_errorcode, code) : NULL;
    Py_XDECREF(code);
    if (name) {
        Py_INCREF(name);
        return name;
    }
    PyErr_Clear();
    return PyUnicode_FromFormat("%d", err);
}

/* ---- forward declarations ---------------------------------------------------------- */

static void pump(Engine *e, Conn *c, Leg *src);
static void flush(Engine *e, Conn *c, Leg *dst);
static void do_connect(Engine *e, Conn *c);
static void close_conn(Engine *e, Conn *c, PyObject *how, int abort);
static void fail(Engine *e, Conn *c, Leg *leg, int err);
static void pause_frontend(Engine *e, Frontend *fe, int paused);
static void convert_request(Engine *e, Conn *c);
static int conv_server_first(Engine *e, Conn *c, Leg *s);
static int conv_connect_failed(Engine *e, Conn *c, int err);
static int conv_intercepted(Engine *e, Conn *c);
static void conv_first_bytes(Engine *e, Conn *c);
static int conv_syn_recv(Conn *c);
static void conv_take_first(Engine *e, Conn *c);
static int conv_target(Conn *c, int flags, int *family, const struct sockaddr **to,
                       socklen_t *tolen);
static Conv *conv_state(Conn *c);

static void end(Engine *e, Conn *c, PyObject *how) { close_conn(e, c, how, 0); }
static void abort_conn(Engine *e, Conn *c, PyObject *how) { close_conn(e, c, how, 1); }

/* ---- the client's address, as Python's socket module would give it ---------------- */

static PyObject *sockaddr_to_py(const struct sockaddr *sa, socklen_t len) {
    char host[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    if (sa->sa_family == AF_UNIX) {
        const struct sockaddr_un *a = (const struct sockaddr_un *)sa;
        size_t n = len > offsetof(struct sockaddr_un, sun_path)
                       ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (n && a->sun_path[0] != '\0')
            n = strnlen(a->sun_path, n);
        return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, (Py_ssize_t)n);
    }
    Py_RETURN_NONE;
}

static PyObject *client_addr(Conn *c) {
    if (!c->caddr) {
        c->caddr = sockaddr_to_py(&c->ca.sa, c->calen);
        if (!c->caddr) {
            PyErr_Clear();
            c->caddr = Py_NewRef(Py_None);
        }
    }
    return c->caddr;
}

/* ---- the timer queue: per frontend, in deadline order (connects, retries, inspect-delay) */

static void arm(Engine *e, double deadline) {
    if (e->armed && e->armed <= deadline)
        return;
    struct itimerspec its = {0}; /* an absolute CLOCK_MONOTONIC time, as monotonic() */
    double d = deadline > 0 ? deadline : 0;
    its.it_value.tv_sec = (time_t)d;
    its.it_value.tv_nsec = (long)((d - (double)(time_t)d) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;
    timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    e->armed = deadline;
}

/* Into the frontend's queue, in deadline order (from the tail: usually at once). */
static void timer_insert(Engine *e, Conn *c, double deadline) {
    Frontend *fe = c->fe;
    c->deadline = deadline;
    Conn *after = fe->tq_tail;
    while (after && after->deadline > c->deadline)
        after = after->tprev;
    c->tprev = after;
    c->tnext = after ? after->tnext : fe->tq_head;
    if (c->tnext)
        c->tnext->tprev = c;
    else
        fe->tq_tail = c;
    if (after)
        after->tnext = c;
    else
        fe->tq_head = c;
    c->timed = 1;
    arm(e, c->deadline);
}

static void timeout_add(Engine *e, Conn *c) {
    timer_insert(e, c, monotonic() + c->fe->connect_timeout);
}

/* Wait `delay` seconds before the next connect attempt: in the same queue, in order. */
static void retry_later(Engine *e, Conn *c, double delay) {
    timer_insert(e, c, monotonic() + delay);
    c->retry = 1;
}

/* ---- the server queue: connections waiting for a server slot, oldest first */

static void park(Conn *c) {
    Frontend *fe = c->fe;
    c->parked = monotonic();
    c->pnext = NULL;
    c->pprev = fe->pq_tail;
    if (fe->pq_tail)
        fe->pq_tail->pnext = c;
    else
        fe->pq_head = c;
    fe->pq_tail = c;
    fe->nparked++;
}

/* Take `c` out of a frontend's doubly linked queue (head/tail, its prev/next fields). */
#define UNLINK(c, head, tail, prev, next)                                                   \
    do {                                                                                     \
        if ((c)->prev)                                                                       \
            (c)->prev->next = (c)->next;                                                     \
        else                                                                                 \
            (head) = (c)->next;                                                              \
        if ((c)->next)                                                                       \
            (c)->next->prev = (c)->prev;                                                     \
        else                                                                                 \
            (tail) = (c)->prev;                                                              \
        (c)->prev = (c)->next = NULL;                                                        \
    } while (0)

static void unpark_remove(Conn *c) {
    if (!c->parked)
        return;
    UNLINK(c, c->fe->pq_head, c->fe->pq_tail, pprev, pnext);
    c->parked = 0;
    c->fe->nparked--;
}

static void timeout_remove(Conn *c) {
    if (!c->timed)
        return;
    UNLINK(c, c->fe->tq_head, c->fe->tq_tail, tprev, tnext);
    c->timed = 0;
}

/* ---- moving bytes ------------------------------------------------------------------ */

static int set_pending(Leg *leg, const char *data, size_t n) {
    char *p = PyMem_RawMalloc(n ? n : 1);
    if (!p)
        return -1;
    memcpy(p, data, n);
    leg->pend = p;
    leg->pend_off = 0;
    leg->pend_len = n;
    return 0;
}

static void clear_pending(Leg *leg) {
    PyMem_RawFree(leg->pend);
    leg->pend = NULL;
    leg->pend_off = leg->pend_len = 0;
}

static void later(Engine *e, Conn *c, Leg *src) {
    src->waiting = 1;
    if (e->nagain == e->capagain) {
        size_t cap = e->capagain ? e->capagain * 2 : 64;
        Leg **a = PyMem_RawRealloc(e->again, cap * sizeof *a);
        if (!a)
            return; /* still waiting: the next event or flush reads it */
        e->again = a;
        e->capagain = cap;
    }
    e->again[e->nagain++] = src;
    c->queued++;
}

static void sample(Engine *e, Conn *c);

/* Client legs are watched for EPOLLOUT only once they are owed bytes: a new socket is
 * writable at once, and that event would wake the worker for nothing. */
static void want_out(Engine *e, Leg *leg) {
    if (leg->out)
        return;
    struct epoll_event ev = {.events = WATCH, .data.ptr = leg};
    if (epoll_ctl(e->ep, EPOLL_CTL_MOD, leg->fd, &ev) == 0)
        leg->out = 1;
}

static void shut(Engine *e, Conn *c, Leg *leg) {
    Leg *other = leg->client ? &c->s : &c->c;
    if (other->shut) {
        end(e, c, s_both_closed);
        return;
    }
    if (shutdown(leg->fd, SHUT_WR) < 0) {
        fail(e, c, leg, errno);
        return;
    }
    leg->shut = 1;
}

static void on_eof(Engine *e, Conn *c, Leg *src, Leg *dst) {
    src->eof = 1;
    src->waiting = 0;
    sample(e, c);
    if (!dst->pend)
        shut(e, c, dst);
}

static void proxy_header(Engine *e, Conn *c);
static void inspect(Engine *e, Conn *c, int final);
static void route(Engine *e, Conn *c);

/* How much to read for `dst`: what its socket can still take (SO_SNDBUF less what it
 * holds, SIOCOUTQ, less an eighth for the kernel's per-packet overhead), at least
 * MIN_ROOM, at most the buffer.  So a destination that stops reading leaves at most
 * MIN_ROOM copied here per direction, and the rest in the source's socket.  The room
 * is measured (one ioctl) only when the last measure, less what was sent since, no
 * longer covers a full read: a destination that drains takes 1 MiB reads unmeasured
 * (the room only grows as it drains, so the credit never overstates it). */
static size_t room(Leg *dst, size_t size) {
    if (dst->credit >= (long)size)
        return size;
    int outq = 0;
    if (ioctl(dst->fd, SIOCOUTQ, &outq) < 0)
        return size;
    if (!dst->sndbuf) {
        socklen_t len = sizeof dst->sndbuf;
        if (getsockopt(dst->fd, SOL_SOCKET, SO_SNDBUF, &dst->sndbuf, &len) < 0)
            return size;
    }
    long free_ = (long)dst->sndbuf - dst->sndbuf / 8 - outq;
    dst->credit = free_;
    if (free_ < MIN_ROOM)
        return MIN_ROOM;
    return (size_t)free_ < size ? (size_t)free_ : size;
}

static void pump(Engine *e, Conn *c, Leg *src) {
    if (src->eof)
        return;
    Leg *dst;
    if (src->client) {
        dst = &c->s;
        if (c->hdr) {
            if (c->fe->convert)
                convert_request(e, c);
            else
                proxy_header(e, c);
            return;
        }
        if (c->inspecting) {
            inspect(e, c, 0);
            return;
        }
        if (c->conv & CV_WAIT) {
            conv_first_bytes(e, c);
            return;
        }
    } else {
        if ((c->conv & (CV_ANSWER | CV_REPLY)) && conv_server_first(e, c, src))
            return;
        dst = &c->c;
    }
    if (dst->fd < 0 || dst->connecting || dst->pend) {
        src->waiting = 1;
        return;
    }
    src->waiting = 0;
    char *buf = e->buf;
    size_t size = e->size;
    for (int i = 0; i < e->burst; i++) {
        size_t want = src->big ? room(dst, size) : MIN_READ;
        ssize_t n = recv(src->fd, buf, want, MSG_DONTWAIT);
        if (n < 0) {
            if (would_block(errno))
                return;
            if (errno == EINTR)
                continue;
            fail(e, c, src, errno);
            return;
        }
        if (n == 0) {
            on_eof(e, c, src, dst);
            return;
        }
        c->active = 1;
        src->big = (size_t)n >= MIN_READ || (size_t)n == want; /* a full read: more waits */
        if (src->client) {
            c->bytes_in += (unsigned long long)n;
            c->fe->bytes_in += (unsigned long long)n;
        } else {
            c->bytes_out += (unsigned long long)n;
            c->fe->bytes_out += (unsigned long long)n;
        }
        ssize_t sent = send(dst->fd, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (!would_block(errno)) {
                fail(e, c, dst, errno);
                return;
            }
            sent = 0;
        }
        dst->credit -= sent;
        if (sent < n) {
            dst->sndbuf = 0; /* full: autotuning may have grown it since */
            dst->credit = 0;
            if (set_pending(dst, buf + sent, (size_t)(n - sent)) < 0) {
                fail(e, c, dst, ENOMEM);
                return;
            }
            want_out(e, dst);
            src->waiting = 1;
            return;
        }
        if ((size_t)n < want && !src->hup)
            return; /* a short read: drained; the next edge (data or FIN) says more */
    }
    later(e, c, src);
}

static void flush(Engine *e, Conn *c, Leg *dst) {
    ssize_t sent = send(dst->fd, dst->pend + dst->pend_off, dst->pend_len - dst->pend_off,
                        MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0) {
        if (!would_block(errno))
            fail(e, c, dst, errno);
        return;
    }
    dst->pend_off += (size_t)sent;
    dst->credit -= sent;
    if (dst->pend_off < dst->pend_len)
        return;
    clear_pending(dst);
    Leg *src = dst->client ? &c->s : &c->c;
    if (src->eof)
        shut(e, c, dst);
    else if (src->waiting)
        pump(e, c, src);
}

static int check_error(Engine *e, Conn *c, Leg *leg) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(leg->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        fail(e, c, leg, err);
        return 0;
    }
    return 1;
}

/* ---- the server leg ----------------------------------------------------------------- */

static int watch(Engine *e, Leg *leg, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = leg};
    leg->born = e->batch;
    leg->out = (events & EPOLLOUT) != 0;
    return epoll_ctl(e->ep, EPOLL_CTL_ADD, leg->fd, &ev);
}

static void drop_server_socket(Conn *c) {
    if (c->s.fd >= 0) {
        close(c->s.fd); /* also leaves the epoll set: the engine never dup()s */
        c->s.fd = -1;
        c->s.connecting = 0;
    }
    timeout_remove(c);
}

/* A failed attempt (err 0: timed out); 1 if another server may be tried. */
static int connect_failed(Engine *e, Conn *c, int err) {
    if (c->fe->names_dest) /* the client's own destination: no other server to try */
        return conv_connect_failed(e, c, err);
    PyObject *state = c->server;
    c->server = NULL;
    if (!c->tried && !(c->tried = PyList_New(0))) {
        PyErr_Clear();
        Py_XDECREF(state);
        abort_conn(e, c, s_internal);
        return 0;
    }
    PyObject *errobj = PyLong_FromLong(err);
    PyObject *r = errobj ? PyObject_CallMethodObjArgs(c->fe->key, s_failed,
                                                      state ? state : Py_None, errobj,
                                                      c->tried, NULL)
                         : NULL;
    Py_XDECREF(errobj);
    Py_XDECREF(state);
    if (!r) {
        report("failed() raised");
        abort_conn(e, c, s_internal);
        return 0;
    }
    if (r == Py_None) {
        Py_DECREF(r);
        return 1;
    }
    if (PyFloat_Check(r)) { /* retry the same server after a pause */
        double delay = PyFloat_AS_DOUBLE(r);
        Py_DECREF(r);
        retry_later(e, c, delay);
        return 0;
    }
    end(e, c, r);
    Py_DECREF(r);
    return 0;
}

static void established(Engine *e, Conn *c, uint32_t events) {
    Leg *s = &c->s;
    Py_CLEAR(c->tried);
    if (e->observing)
        c->connect_time = monotonic() - c->t_connect;
    PyObject *head = NULL;
    if (c->send_proxy) {
        struct sockaddr_storage local;
        socklen_t llen = sizeof local;
        PyObject *lo = c->daddr ? Py_NewRef(c->daddr)
                       : getsockname(c->c.fd, (struct sockaddr *)&local, &llen) == 0
                           ? sockaddr_to_py((struct sockaddr *)&local, llen) : Py_NewRef(Py_None);
        head = lo ? PyObject_CallMethodObjArgs(c->fe->key, s_header, c->server,
                                               client_addr(c), lo, NULL)
                  : NULL;
        Py_XDECREF(lo);
        if (!head || !PyBytes_Check(head)) {
            Py_XDECREF(head);
            report("header() failed");
            abort_conn(e, c, s_internal);
            return;
        }
    }
    if (c->early) {
        if (head) {
            PyBytes_Concat(&head, c->early);
            if (!head) {
                report("PROXY header concat failed");
                abort_conn(e, c, s_internal);
                return;
            }
        } else {
            head = Py_NewRef(c->early);
        }
        Py_CLEAR(c->early);
    }
    if (head && PyBytes_GET_SIZE(head)) {
        int r = set_pending(s, PyBytes_AS_STRING(head), (size_t)PyBytes_GET_SIZE(head));
        Py_DECREF(head);
        if (r < 0) {
            fail(e, c, s, ENOMEM);
            return;
        }
        flush(e, c, s);
    } else {
        Py_XDECREF(head);
    }
    if (c->done)
        return;
    if (c->c.waiting)
        pump(e, c, &c->c);
    if (!c->done && (events & READABLE))
        pump(e, c, s);
}

static void connected(Engine *e, Conn *c, uint32_t events) {
    int err = 0;
    if (events & (EPOLLERR | EPOLLHUP)) {
        socklen_t len = sizeof err;
        if (getsockopt(c->s.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
    }
    if (err) {
        drop_server_socket(c);
        if (connect_failed(e, c, err))
            do_connect(e, c);
        return;
    }
    timeout_remove(c);
    c->s.connecting = 0;
    if (c->fe->intercept)
        conv_take_first(e, c);
    established(e, c, events);
}

static void connect_timeout(Engine *e, Conn *c) {
    if (c->done)
        return;
    if (c->conv & CV_WAIT) { /* the client said nothing yet: connect without its bytes */
        conv_first_bytes(e, c);
        return;
    }
    if (c->inspecting) { /* tcp-request inspect-delay passed: route with what came */
        inspect(e, c, 1);
        return;
    }
    if (c->retry) {
        c->retry = 0;
        do_connect(e, c);
        return;
    }
    if (!c->s.connecting)
        return;
    drop_server_socket(c);
    if (connect_failed(e, c, 0))
        do_connect(e, c);
}

/* Pick a server and start a non-blocking connect; on failure try the next one. */
static void do_connect(Engine *e, Conn *c) {
    Frontend *fe = c->fe;
    int fd = -1, err = 0;
    if (e->observing && !c->t_connect)
        c->t_connect = monotonic();
    for (;;) {
        PyObject *caddr = fe->needs_caddr ? client_addr(c) : Py_None;
        PyObject *tried = c->tried ? c->tried : Py_None;
        PyObject *r = c->be ? PyObject_CallMethodObjArgs(fe->key, s_pick, caddr, tried, c->be, NULL)
                            : PyObject_CallMethodObjArgs(fe->key, s_pick, caddr, tried, NULL);
        if (!r) {
            report("pick() raised");
            abort_conn(e, c, s_internal);
            return;
        }
        if (PyUnicode_Check(r)) {
            end(e, c, r);
            Py_DECREF(r);
            return;
        }
        if (r == Py_None) { /* every server at its maxconn: wait for a slot */
            Py_DECREF(r);
            park(c);
            return;
        }
        PyObject *state, *sa, *src = Py_None;
        int family, proto, fallback, send_proxy, observe, flags = 0;
        if (!PyArg_ParseTuple(r, "OiSipip|Oi", &state, &family, &sa, &proto, &fallback,
                              &send_proxy, &observe, &src, &flags) ||
            (src != Py_None && !PyBytes_Check(src))) {
            Py_DECREF(r);
            report("pick() returned a bad target");
            abort_conn(e, c, s_internal);
            return;
        }
        Py_XSETREF(c->server, Py_NewRef(state));
        c->send_proxy = send_proxy;
        c->s_observe = observe;
        const struct sockaddr *to = (const struct sockaddr *)PyBytes_AS_STRING(sa);
        socklen_t tolen = (socklen_t)PyBytes_GET_SIZE(sa);
        if (flags || !tolen) { /* a converter's server (flags: WIRE_* in compiledconvert.py) */
            err = conv_target(c, flags, &family, &to, &tolen);
            if (err) {
                Py_DECREF(r);
                if (!connect_failed(e, c, err))
                    return;
                continue;
            }
        }
        fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, proto);
        if (fd < 0 && proto == IPPROTO_MPTCP && fallback)
            fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
        if (fd < 0) {
            err = errno;
        } else {
            err = 0;
            if (family != AF_UNIX) {
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                if (flags & 1) /* TFO: with a cookie, connect() is done at once, data rides the SYN */
                    setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, &one, sizeof one);
            }
            if (src != Py_None) { /* HAProxy's `source` (source.py): the address, any port */
                int one = 1;
                setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
                if (bind(fd, (struct sockaddr *)PyBytes_AS_STRING(src),
                         (socklen_t)PyBytes_GET_SIZE(src)) < 0)
                    err = errno;
            }
            if (!err)
                err = connect(fd, to, tolen) == 0 ? 0 : errno;
        }
        Py_DECREF(r);
        if (err == 0 || err == EINPROGRESS || err == EALREADY)
            break;
        if (fd >= 0)
            close(fd);
        if (!connect_failed(e, c, err))
            return;
    }
    Leg *s = &c->s;
    s->fd = fd;
    s->hup = 0;
    if (watch(e, s, WATCH) < 0) {
        int werr = errno;
        close(fd);
        s->fd = -1;
        fail(e, c, s, werr);
        return;
    }
    if (err) {
        s->connecting = 1;
        timeout_add(e, c);
    } else {
        established(e, c, READABLE);
    }
}

/* What the client sent next, appended to c->hdr (a header being read): 1 if bytes came,
 * 0 if none are there yet or the connection ended (failed, or `closed_before` on EOF). */
static int read_header_bytes(Engine *e, Conn *c, PyObject *closed_before) {
    for (;;) {
        ssize_t n = recv(c->c.fd, e->buf, e->size, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (!would_block(errno))
                fail(e, c, &c->c, errno);
            return 0;
        }
        if (n == 0) {
            abort_conn(e, c, closed_before);
            return 0;
        }
        Py_ssize_t old = PyByteArray_GET_SIZE(c->hdr);
        if (PyByteArray_Resize(c->hdr, old + n) < 0) {
            PyErr_Clear();
            fail(e, c, &c->c, ENOMEM);
            return 0;
        }
        memcpy(PyByteArray_AS_STRING(c->hdr) + old, e->buf, (size_t)n);
        return 1;
    }
}

/* Read the client's PROXY header; then connect, holding what came after it. */
static void proxy_header(Engine *e, Conn *c) {
    PyObject *parsed = NULL;
    for (;;) {
        if (!read_header_bytes(e, c, s_closed_before_header))
            return;
        parsed = c->fe->names_dest /* a converter checks the peer and names the destination */
                     ? PyObject_CallMethodObjArgs(c->fe->key, s_parse, c->hdr, client_addr(c), NULL)
                     : PyObject_CallMethodObjArgs(c->fe->key, s_parse, c->hdr, NULL);
        if (!parsed) {
            report("parse() raised");
            abort_conn(e, c, s_internal);
            return;
        }
        if (parsed != Py_None)
            break;
        Py_DECREF(parsed);
    }
    if (PyUnicode_Check(parsed)) {
        abort_conn(e, c, parsed);
        Py_DECREF(parsed);
        return;
    }
    PyObject *source, *destination, *dsa = NULL;
    Py_ssize_t used;
    if (!PyArg_ParseTuple(parsed, "OOn|S", &source, &destination, &used, &dsa) ||
        (dsa && (size_t)PyBytes_GET_SIZE(dsa) > sizeof(Addr))) {
        Py_DECREF(parsed);
        report("parse() returned a bad value");
        abort_conn(e, c, s_internal);
        return;
    }
    if (dsa) { /* a converter: where the header says the client goes */
        Conv *cv = conv_state(c);
        if (!cv) {
            Py_DECREF(parsed);
            fail(e, c, &c->c, ENOMEM);
            return;
        }
        memcpy(&cv->dest, PyBytes_AS_STRING(dsa), (size_t)PyBytes_GET_SIZE(dsa));
        cv->destlen = (socklen_t)PyBytes_GET_SIZE(dsa);
    }
    if (source != Py_None) {
        Py_XSETREF(c->caddr, Py_NewRef(source));
        if (destination != Py_None) {
            Py_XSETREF(c->daddr, Py_NewRef(destination));
            if (PyTuple_Check(destination) && PyTuple_GET_SIZE(destination) > 1) {
                long port = PyLong_AsLong(PyTuple_GET_ITEM(destination, 1));
                if (port >= 0)
                    c->dport = (int)port; /* dst_port: where the header says it went */
                PyErr_Clear();
            }
        }
    }
    Py_DECREF(parsed);
    Py_ssize_t total = PyByteArray_GET_SIZE(c->hdr);
    if (used < total) {
        c->early = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(c->hdr) + used, total - used);
        if (!c->early)
            PyErr_Clear();
        c->bytes_in += (unsigned long long)(total - used);
        c->fe->bytes_in += (unsigned long long)(total - used);
    }
    Py_CLEAR(c->hdr);
    c->c.waiting = 1; /* more may follow the header: read it once connected */
    route(e, c);
}

/* ---- use_backend: choosing the backend (router.py decides) ----------------------------- */

/* Ask fe.route(); 1 once a backend is chosen (and the connect started), 0 to wait. */
static int decide(Engine *e, Conn *c, PyObject *data, int final) {
    Frontend *fe = c->fe;
    PyObject *port = PyLong_FromLong(c->dport);
    PyObject *r = port ? PyObject_CallMethodObjArgs(fe->key, s_route, client_addr(c), port,
                                                    data ? data : Py_None,
                                                    final ? Py_True : Py_False, NULL)
                       : NULL;
    Py_XDECREF(port);
    if (!r) {
        report("route() raised");
        abort_conn(e, c, s_internal);
        return 1;
    }
    if (r == Py_None) {
        Py_DECREF(r);
        return 0;
    }
    Py_XSETREF(c->be, r);
    if (c->inspecting) {
        c->inspecting = 0;
        timeout_remove(c);
        c->c.waiting = 1; /* what was peeked is read once connected */
    }
    do_connect(e, c);
    return 1;
}

/* Peek at what the client sent (it stays in the socket and is relayed as usual), with
 * what came after a PROXY header; route once the ClientHello is whole, is not one, or
 * `final` (the delay passed). */
static void inspect(Engine *e, Conn *c, int final) {
    size_t have = 0, cap = e->size < INSPECT_LIMIT ? e->size : INSPECT_LIMIT;
    if (c->early) {
        have = (size_t)PyBytes_GET_SIZE(c->early);
        if (have > cap)
            have = cap;
        memcpy(e->buf, PyBytes_AS_STRING(c->early), have);
    }
    ssize_t n;
    do
        n = recv(c->c.fd, e->buf + have, cap - have, MSG_PEEK | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (!would_block(errno)) {
            fail(e, c, &c->c, errno);
            return;
        }
        n = 0;
    } else if (n == 0 || c->c.hup) {
        final = 1; /* the client sent FIN: nothing more comes */
    }
    PyObject *data = PyBytes_FromStringAndSize(e->buf, (Py_ssize_t)(have + (size_t)n));
    if (!data) {
        PyErr_Clear();
        fail(e, c, &c->c, ENOMEM);
        return;
    }
    decide(e, c, data, final);
    Py_DECREF(data);
}

/* After accept (and a PROXY header): choose the backend, then connect. */
static void route(Engine *e, Conn *c) {
    Frontend *fe = c->fe;
    if (!fe->route) {
        do_connect(e, c);
        return;
    }
    if (fe->inspect_delay < 0) {
        decide(e, c, NULL, 1);
        return;
    }
    c->inspecting = 1;
    timer_insert(e, c, monotonic() + fe->inspect_delay);
    if (c->early) /* the hello may have come whole with the header */
        inspect(e, c, 0);
}

/* ---- the end -------------------------------------------------------------------------- */

static long subflows(int fd) {
    unsigned char raw[MPTCP_INFO_LEN];
    socklen_t len = sizeof raw;
    if (getsockopt(fd, SOL_MPTCP, MPTCP_INFO, raw, &len) < 0 || len == 0)
        return 0;
    if (len > SUBFLOWS_TOTAL && raw[SUBFLOWS_TOTAL])
        return raw[SUBFLOWS_TOTAL];
    return raw[0] + 1;
}

/* A leg's MPTCP state and subflows: one getsockopt if MPTCP, else Python tells. */
static void observe(Conn *c, int fd, PyObject **state, long *sub) {
    long n = subflows(fd);
    if (n) {
        Py_XSETREF(*state, Py_NewRef(s_mptcp));
        if (n > *sub)
            *sub = n;
        return;
    }
    PyObject *fdo = PyLong_FromLong(fd);
    PyObject *r = fdo ? PyObject_CallMethodObjArgs(c->fe->key, s_leg_state, fdo, NULL) : NULL;
    Py_XDECREF(fdo);
    if (!r) {
        report("leg_state() raised");
        return;
    }
    if (r == Py_None)
        Py_DECREF(r);
    else
        Py_XSETREF(*state, r);
}

static void sample(Engine *e, Conn *c) {
    if (!e->observing)
        return;
    if (!c->c_state && c->c.fd >= 0) {
        if (c->c_req)
            observe(c, c->c.fd, &c->c_state, &c->c_sub);
        else
            c->c_state = Py_NewRef(s_tcp);
    }
    if (!c->s_state && c->s.fd >= 0 && !c->s.connecting) {
        if (c->s_observe)
            observe(c, c->s.fd, &c->s_state, &c->s_sub);
        else
            c->s_state = Py_NewRef(s_tcp);
    }
}

static void fail(Engine *e, Conn *c, Leg *leg, int err) {
    if (!c->how) {
        PyObject *name = errname(err);
        c->how = PyUnicode_FromFormat("%s error: %U", leg->client ? "client" : "server", name);
        Py_XDECREF(name);
        if (!c->how)
            PyErr_Clear();
    }
    abort_conn(e, c, c->how ? c->how : s_internal);
}

static void discard_input(Engine *e, Leg *leg) {
    for (int i = 0; i < e->burst; i++)
        if (recv(leg->fd, e->buf, e->size, MSG_DONTWAIT) <= 0)
            return;
}

static PyObject *state_or(PyObject *state, PyObject *dflt) { return state ? state : dflt; }

static void finished(Engine *e, Conn *c) {
    Frontend *fe = c->fe;
    c->done = 1;
    c->prev->next = c->next;
    c->next->prev = c->prev;
    fe->count--;
    PyObject *rec = Py_None;
    Py_INCREF(rec);
    if (e->observing) {
        Py_DECREF(rec);
        rec = Py_BuildValue("(OdOlOlKKOdO)", client_addr(c), c->start,
                            state_or(c->c_state, c->c_req ? s_question : s_tcp), c->c_sub,
                            state_or(c->s_state, c->server ? s_question : s_dash), c->s_sub,
                            c->bytes_in, c->bytes_out, c->how ? c->how : s_both_closed,
                            c->connect_time, c->be ? c->be : Py_None);
        if (!rec) {
            report("record failed");
            rec = Py_NewRef(Py_None);
        }
    }
    PyObject *r = PyObject_CallMethodObjArgs(fe->key, s_done, c->server ? c->server : Py_None,
                                             rec, NULL);
    Py_DECREF(rec);
    if (!r)
        report("done() raised");
    Py_XDECREF(r);
    if (c->src) {
        r = PyObject_CallMethodObjArgs(fe->key, s_release, c->src, NULL);
        if (!r)
            report("release() raised");
        Py_XDECREF(r);
        Py_CLEAR(c->src);
    }
    if (fe->paused && fe->count < fe->maxconn)
        pause_frontend(e, fe, 0);
    c->free_next = e->to_free;
    e->to_free = c;
}

static void close_conn(Engine *e, Conn *c, PyObject *how, int abort) {
    if (c->done)
        return;
    if (!c->how)
        c->how = Py_NewRef(how);
    sample(e, c);
    timeout_remove(c);
    unpark_remove(c);
    Leg *legs[2] = {&c->c, &c->s};
    for (int i = 0; i < 2; i++) {
        Leg *leg = legs[i];
        if (leg->fd < 0)
            continue;
        if (abort) {
            struct linger lg = {1, 0}; /* close() sends RST */
            setsockopt(leg->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        } else if (!leg->eof) {
            discard_input(e, leg); /* unread bytes would make close() send RST */
        }
        close(leg->fd);
        leg->fd = -1;
        clear_pending(leg);
    }
    finished(e, c);
}

static void free_conn(Conn *c) {
    Py_CLEAR(c->server);
    Py_CLEAR(c->tried);
    Py_CLEAR(c->hdr);
    Py_CLEAR(c->early);
    Py_CLEAR(c->caddr);
    Py_CLEAR(c->daddr);
    Py_CLEAR(c->how);
    Py_CLEAR(c->src);
    Py_CLEAR(c->c_state);
    Py_CLEAR(c->s_state);
    Py_CLEAR(c->be);
    clear_pending(&c->c);
    clear_pending(&c->s);
    if (c->cv) {
        PyMem_RawFree(c->cv->reply);
        PyMem_RawFree(c->cv);
    }
    PyMem_RawFree(c);
}

/* Free what ended: only between batches, so no event still points at it. */
static void reap(Engine *e) {
    Conn **p = &e->to_free;
    while (*p) {
        Conn *c = *p;
        if (c->queued) {
            p = &c->free_next;
            continue;
        }
        *p = c->free_next;
        free_conn(c);
    }
}

/* ---- converters (bonding): RFC 8803 and intercepted connections ----------------------
 *
 * converter.py's behaviour on the engine.  The Convert message is parsed here
 * (_convert.h, the rules of convertproto.py); every decision goes to Python, once per
 * connection, through the frontend (compiledconvert.py):
 *
 *   fe.convert(peer, host, port, cookie)   -> None: go; or (how, reply): refused
 *   fe.refuse(peer, dest, code, why, value) -> (how, reply): a bad Convert message
 *   fe.dest_failed(state, err, peer, dest)  -> (how, reply): the connect failed
 *   fe.not_intercepted(caddr, dest)         -> how: a connection to the gateway itself
 *   fe.remote_refused(caddr, dest, code)    -> how: the remote gateway sent an Error
 *
 * A reply (bytes) goes to the client before FIN; None: the client is reset (PROXY). */

static const unsigned char conv_ok[4] = {CONV_VERSION, 1, 0, 0}; /* success: a bare header */
/* Info answered: Supported TCP Extensions, MPTCP (kind 30) */
static const unsigned char conv_supported[12] = {CONV_VERSION, 3, 0, 0, CT_SUPPORTED, 2, 0, 0,
                                                 30, 0, 0, 0};

/* The connection's converter state, made the first time it is needed; NULL: no memory. */
static Conv *conv_state(Conn *c) {
    if (!c->cv)
        c->cv = PyMem_RawCalloc(1, sizeof *c->cv);
    return c->cv;
}

static PyObject *conv_dest_py(Conn *c) {
    if (!c->cv || !c->cv->destlen)
        Py_RETURN_NONE;
    return sockaddr_to_py(&c->cv->dest.sa, c->cv->destlen);
}

/* Where the server leg goes: the client's destination for a server 0.0.0.0:0; and what
 * the server says first (flags: 1 TFO, 2 a Convert reply).  0, or why not (errno). */
static int conv_target(Conn *c, int flags, int *family, const struct sockaddr **to,
                       socklen_t *tolen) {
    c->conv = (c->conv & ~CV_REPLY) | ((flags & 2) ? CV_REPLY : 0);
    if (*tolen)
        return 0;
    if (!c->cv || !c->cv->destlen)
        return EDESTADDRREQ;
    *family = c->cv->dest.sa.sa_family;
    *to = &c->cv->dest.sa;
    *tolen = c->cv->destlen;
    return 0;
}

/* Close the client after a verdict (how, reply): the reply then FIN, or RST if None. */
static void conv_close(Engine *e, Conn *c, PyObject *verdict) {
    PyObject *how, *reply;
    if (!PyTuple_Check(verdict) || !PyArg_ParseTuple(verdict, "UO", &how, &reply)) {
        report("a converter verdict is not (how, reply)");
        abort_conn(e, c, s_internal);
        return;
    }
    if (!PyBytes_Check(reply) || send(c->c.fd, PyBytes_AS_STRING(reply),
                                      (size_t)PyBytes_GET_SIZE(reply),
                                      MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        abort_conn(e, c, how);
    else
        end(e, c, how);
}

static void conv_verdict(Engine *e, Conn *c, PyObject *verdict, const char *what) {
    if (!verdict) {
        report(what);
        abort_conn(e, c, s_internal);
        return;
    }
    conv_close(e, c, verdict);
    Py_DECREF(verdict);
}

static void conv_refuse(Engine *e, Conn *c, int code, const char *why, int value) {
    unsigned char v = (unsigned char)value;
    PyObject *dest = conv_dest_py(c);
    PyObject *r = dest ? PyObject_CallMethod(c->fe->key, "refuse", "OOisy#", client_addr(c), dest,
                                             code, why, (const char *)&v,
                                             (Py_ssize_t)(value >= 0))
                       : NULL;
    Py_XDECREF(dest);
    conv_verdict(e, c, r, "refuse() failed");
}

/* The remote gateway reads the client's Convert message; then asks the policy, and
 * connects where it says, holding what came after it. */
static void convert_request(Engine *e, Conn *c) {
    ConvMsg m;
    int r;
    for (;;) {
        if (!read_header_bytes(e, c, s_closed_before_convert))
            return;
        r = conv_parse((const unsigned char *)PyByteArray_AS_STRING(c->hdr),
                       (size_t)PyByteArray_GET_SIZE(c->hdr), 1, &m);
        if (r != CONV_NEED)
            break;
    }
    if (r == CONV_ERR) {
        conv_refuse(e, c, m.code, m.reason, m.value);
        return;
    }
    if (!m.connects) { /* Info: say what we support, and close */
        if (send(c->c.fd, conv_supported, sizeof conv_supported, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
            abort_conn(e, c, s_info_answered);
        else
            end(e, c, s_info_answered);
        return;
    }
    Conv *cv = conv_state(c);
    if (!cv) {
        fail(e, c, &c->c, ENOMEM);
        return;
    }
    memset(&cv->dest, 0, sizeof cv->dest);
    if (m.v4) {
        struct sockaddr_in *a = &cv->dest.in;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)m.port);
        memcpy(&a->sin_addr, m.addr + 12, 4);
        cv->destlen = sizeof *a;
    } else {
        struct sockaddr_in6 *a = &cv->dest.in6;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)m.port);
        memcpy(&a->sin6_addr, m.addr, 16);
        cv->destlen = sizeof *a;
    }
    int kind = conv_refused_option(&m);
    if (kind) {
        char why[40];
        snprintf(why, sizeof why, "TCP option %d asked", kind);
        conv_refuse(e, c, CE_UNSUPPORTED_OPTION, why, kind);
        return;
    }
    char host[INET6_ADDRSTRLEN];
    inet_ntop(m.v4 ? AF_INET : AF_INET6, m.v4 ? (const void *)(m.addr + 12) : m.addr, host,
              sizeof host);
    PyObject *cookie = m.cookie ? PyBytes_FromStringAndSize((const char *)m.cookie,
                                                            (Py_ssize_t)m.cookie_len)
                                : Py_NewRef(Py_None);
    PyObject *hosto = PyUnicode_FromString(host), *porto = PyLong_FromUnsignedLong(m.port);
    PyObject *v = cookie && hosto && porto
                      ? PyObject_CallMethodObjArgs(c->fe->key, s_convert, client_addr(c), hosto,
                                                   porto, cookie, NULL)
                      : NULL;
    Py_XDECREF(cookie);
    Py_XDECREF(hosto);
    Py_XDECREF(porto);
    if (v != Py_None) {
        conv_verdict(e, c, v, "convert() failed");
        return;
    }
    Py_DECREF(v);
    Py_ssize_t total = PyByteArray_GET_SIZE(c->hdr), used = (Py_ssize_t)m.used;
    if (used < total) {
        c->early = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(c->hdr) + used, total - used);
        if (!c->early)
            PyErr_Clear();
        c->bytes_in += (unsigned long long)(total - used);
        c->fe->bytes_in += (unsigned long long)(total - used);
    }
    Py_CLEAR(c->hdr);
    c->conv |= CV_ANSWER;
    c->c.waiting = 1; /* more may follow: read it once connected */
    do_connect(e, c);
}

/* Remote: the Convert reply goes out with the destination's first bytes, in one
 * sendmsg, or alone before FIN if it closes silently.  1: pump stops here. */
/* Linux (6.18): what is written to an MPTCP socket accepted with data in its SYN (TCP
 * Fast Open) before the client's third ACK came is never sent, until the client sends
 * again; a site gateway waiting for the answer never does.  So a remote gateway holds
 * its answer while the client leg is in SYN_RECV: the third ACK makes it writable, an
 * EPOLLOUT edge (on_leg), and the answer goes then.  relay.py's converter does the same. */
static int conv_syn_recv(Conn *c) {
    if (!c->c_req)
        return 0;
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    return getsockopt(c->c.fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 && ti.tcpi_state == 3;
}

static int conv_answer(Engine *e, Conn *c, Leg *s) {
    Leg *cl = &c->c;
    ssize_t n;
    if (conv_syn_recv(c)) { /* TCP_SYN_RECV: hold (see above) */
        c->conv |= CV_HOLD;
        s->waiting = 1;
        want_out(e, cl);
        return 1;
    }
    do
        n = recv(s->fd, e->buf, MIN_READ, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (!would_block(errno))
            fail(e, c, s, errno);
        return 1;
    }
    c->conv &= ~CV_ANSWER;
    if (n == 0) {
        if (set_pending(cl, (const char *)conv_ok, sizeof conv_ok) < 0) {
            fail(e, c, cl, ENOMEM);
            return 1;
        }
        want_out(e, cl);
        on_eof(e, c, s, cl);
        if (!c->done && cl->pend)
            flush(e, c, cl);
        return 1;
    }
    c->active = 1;
    c->bytes_out += (unsigned long long)n;
    c->fe->bytes_out += (unsigned long long)n;
    struct iovec iov[2] = {{(void *)conv_ok, sizeof conv_ok}, {e->buf, (size_t)n}};
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
    ssize_t sent = sendmsg(cl->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0) {
        if (!would_block(errno)) {
            fail(e, c, cl, errno);
            return 1;
        }
        sent = 0;
    }
    size_t total = sizeof conv_ok + (size_t)n;
    if ((size_t)sent == total) /* a short read: drained, the next edge says more (as pump) */
        return (size_t)n < MIN_READ && !s->hup ? 1 : 0;
    char *rest = PyMem_RawMalloc(total);
    if (!rest) {
        fail(e, c, cl, ENOMEM);
        return 1;
    }
    memcpy(rest, conv_ok, sizeof conv_ok);
    memcpy(rest + sizeof conv_ok, e->buf, (size_t)n);
    int r = set_pending(cl, rest + sent, total - (size_t)sent);
    PyMem_RawFree(rest);
    if (r < 0) {
        fail(e, c, cl, ENOMEM);
        return 1;
    }
    want_out(e, cl);
    s->waiting = 1;
    return 1;
}

/* Site: the remote gateway's Convert reply comes first; an Error TLV resets the client
 * (RFC 8803: errors become RST), else what follows it is relayed.  1: pump stops here. */
static int conv_reply(Engine *e, Conn *c, Leg *s) {
    ConvMsg m;
    int r;
    Conv *cv = conv_state(c);
    if (!cv) {
        fail(e, c, s, ENOMEM);
        return 1;
    }
    for (;;) {
        ssize_t n = recv(s->fd, e->buf, MIN_READ, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (!would_block(errno))
                fail(e, c, s, errno);
            return 1;
        }
        if (n == 0) {
            abort_conn(e, c, s_reply_eof);
            return 1;
        }
        unsigned char *p = PyMem_RawRealloc(cv->reply, cv->reply_len + (size_t)n);
        if (!p) {
            fail(e, c, s, ENOMEM);
            return 1;
        }
        memcpy(p + cv->reply_len, e->buf, (size_t)n);
        cv->reply = p;
        cv->reply_len += (size_t)n;
        r = conv_parse(cv->reply, cv->reply_len, 0, &m);
        if (r != CONV_NEED)
            break;
    }
    if (r == CONV_ERR || m.error >= 0) {
        PyObject *how;
        if (r == CONV_ERR) {
            how = PyUnicode_FromFormat("bad Convert reply: %s", m.reason);
        } else {
            PyObject *dest = conv_dest_py(c);
            how = dest ? PyObject_CallMethod(c->fe->key, "remote_refused", "OOi", client_addr(c),
                                             dest, m.error)
                       : NULL;
            Py_XDECREF(dest);
        }
        if (!how || !PyUnicode_Check(how)) {
            report("remote_refused() failed");
            abort_conn(e, c, s_internal);
        } else {
            abort_conn(e, c, how);
        }
        Py_XDECREF(how);
        return 1;
    }
    c->conv &= ~CV_REPLY;
    size_t rest = cv->reply_len - m.used;
    if (rest) {
        c->active = 1;
        c->bytes_out += rest;
        c->fe->bytes_out += rest;
        if (set_pending(&c->c, (const char *)cv->reply + m.used, rest) < 0) {
            fail(e, c, &c->c, ENOMEM);
            return 1;
        }
    }
    PyMem_RawFree(cv->reply);
    cv->reply = NULL;
    cv->reply_len = 0;
    if (!rest)
        return 0;
    want_out(e, &c->c);
    flush(e, c, &c->c);
    if (c->done)
        return 1;
    if (c->c.pend) {
        s->waiting = 1; /* read on once the client took the rest */
        return 1;
    }
    return 0;
}

/* Site with TFO: the client's first bytes came (or the wait is over): connect, and they
 * go with the Connect TLV in the first send, the SYN's data. */
static void conv_first_bytes(Engine *e, Conn *c) {
    c->conv &= ~CV_WAIT;
    timeout_remove(c);
    ssize_t n;
    do
        n = recv(c->c.fd, e->buf, MIN_READ, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && !would_block(errno)) {
        fail(e, c, &c->c, errno);
        return;
    }
    if (n > 0) { /* 0: FIN, left in the socket for pump to see once connected */
        c->early = PyBytes_FromStringAndSize(e->buf, n);
        if (!c->early) {
            PyErr_Clear();
            fail(e, c, &c->c, ENOMEM);
            return;
        }
        c->bytes_in += (unsigned long long)n;
        c->fe->bytes_in += (unsigned long long)n;
    }
    c->c.waiting = 1; /* more may follow: read it once connected */
    route(e, c);
}

/* Site: the client's bytes that came while connecting go in the same send as the
 * Connect TLV (established() joins them).  MPTCP holds a second small segment back
 * while the first is in flight (measured: half a WAN round trip more), so two sends
 * would cost the client's bytes that much. */
static void conv_take_first(Engine *e, Conn *c) {
    if (!c->c.waiting || c->early || c->c.fd < 0)
        return;
    ssize_t n;
    do
        n = recv(c->c.fd, e->buf, MIN_READ, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n <= 0) /* nothing, FIN or an error: pump sees it as usual */
        return;
    c->early = PyBytes_FromStringAndSize(e->buf, n);
    if (!c->early) {
        PyErr_Clear();
        fail(e, c, &c->c, ENOMEM);
        return;
    }
    c->bytes_in += (unsigned long long)n;
    c->fe->bytes_in += (unsigned long long)n;
}

static int conv_server_first(Engine *e, Conn *c, Leg *s) {
    return (c->conv & CV_REPLY) ? conv_reply(e, c, s) : conv_answer(e, c, s);
}

/* The connect to a client's destination failed: counted and logged as any failed
 * connect, then answered as RFC 8803 says (no other server to try). */
static int conv_connect_failed(Engine *e, Conn *c, int err) {
    PyObject *state = c->server;
    c->server = NULL;
    PyObject *dest = conv_dest_py(c);
    PyObject *r = dest ? PyObject_CallMethod(c->fe->key, "dest_failed", "OiOO",
                                             state ? state : Py_None, err, client_addr(c), dest)
                       : NULL;
    Py_XDECREF(dest);
    Py_XDECREF(state);
    conv_verdict(e, c, r, "dest_failed() failed");
    return 0;
}

/* An IPv4-mapped IPv6 address as the IPv4 one it is (conntrack's and a probe's form). */
static void unmap_addr(Addr *a, socklen_t *len) {
    if (a->sa.sa_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&a->in6.sin6_addr))
        return;
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = a->in6.sin6_port};
    memcpy(&v4.sin_addr, &a->in6.sin6_addr.s6_addr[12], 4);
    memset(a, 0, sizeof *a);
    memcpy(&a->in, &v4, sizeof v4);
    *len = sizeof v4;
}

static int same_host(const Addr *a, const Addr *b) {
    if (a->sa.sa_family != b->sa.sa_family)
        return 0;
    if (a->sa.sa_family == AF_INET)
        return a->in.sin_addr.s_addr == b->in.sin_addr.s_addr;
    return memcmp(&a->in6.sin6_addr, &b->in6.sin6_addr, sizeof a->in6.sin6_addr) == 0;
}

static int addr_port(const Addr *a) {
    return ntohs(a->sa.sa_family == AF_INET ? a->in.sin_port : a->in6.sin6_port);
}

/* Whether an address is one of this host's own (intercept.is_local_address): bind() to
 * it succeeds.  1 too when the probe cannot tell (a reset is safe, a loop is not). */
static int local_address(const Addr *a, socklen_t len) {
    Addr b = *a;
    if (b.sa.sa_family == AF_INET)
        b.in.sin_port = 0;
    else
        b.in6.sin6_port = 0;
    int fd = socket(b.sa.sa_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 1;
    int r = bind(fd, &b.sa, len), err = errno;
    close(fd);
    return r == 0 || err != EADDRNOTAVAIL;
}

/* tproxy: a connection a listener takes without TPROXY, to the gateway itself: to a
 * listener's port, and its address (bound to one) or one of the host's (bound to any). */
static int own_address(Frontend *fe, const Addr *local, socklen_t len) {
    int port = addr_port(local);
    for (int i = 0; i < fe->nlisteners; i++) {
        Listener *l = fe->listeners[i];
        if (l->port != port)
            continue;
        if (l->wild)
            return local_address(local, len);
        if (same_host(&l->bound, local))
            return 1;
    }
    return 0;
}

/* Where an intercepted connection was going: SO_ORIGINAL_DST (redirect), else (tproxy)
 * the accepted socket's own address.  0 (and the client reset) if it was not
 * intercepted (intercept.intercepted, the same test): under redirect no NAT entry, or
 * an original destination that is the socket's own address; under tproxy a connection
 * to the gateway itself (own_address). */
static int conv_intercepted(Engine *e, Conn *c) {
    Frontend *fe = c->fe;
    int fd = c->c.fd, got = 0, nat = 0;
    Conv *cv = conv_state(c);
    if (!cv) {
        fail(e, c, &c->c, ENOMEM);
        return 0;
    }
    struct sockaddr_storage ss;
    socklen_t llen = sizeof ss;
    Addr local;
    if (getsockname(fd, (struct sockaddr *)&ss, &llen) == 0 && llen <= sizeof local) {
        memcpy(&local, &ss, llen);
        unmap_addr(&local, &llen);
        int v4 = local.sa.sa_family == AF_INET;
        socklen_t dlen = v4 ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
        memset(&cv->dest, 0, sizeof cv->dest);
        if (getsockopt(fd, v4 ? SOL_IP : SOL_IPV6, SO_ORIGINAL_DST, &cv->dest, &dlen) == 0 &&
            dlen <= sizeof cv->dest) {
            cv->destlen = dlen;
            unmap_addr(&cv->dest, &cv->destlen);
            got = 1;
            nat = !same_host(&cv->dest, &local) || addr_port(&cv->dest) != addr_port(&local);
        } else if (fe->intercept == 2) { /* tproxy: the packets' own destination */
            memcpy(&cv->dest, &local, llen);
            cv->destlen = llen;
            got = 1;
        }
    }
    int intercepted = got && (nat || (fe->intercept == 2 && !own_address(fe, &local, llen)));
    if (intercepted) {
        c->daddr = sockaddr_to_py(&cv->dest.sa, cv->destlen); /* for fe.header() */
        if (c->daddr)
            return 1;
        PyErr_Clear();
    }
    cv->destlen = got ? cv->destlen : 0;
    PyObject *dest = conv_dest_py(c);
    PyObject *how = dest ? PyObject_CallMethodObjArgs(fe->key, s_not_intercepted, client_addr(c),
                                                      dest, NULL)
                         : NULL;
    Py_XDECREF(dest);
    if (!how || !PyUnicode_Check(how)) {
        report("not_intercepted() failed");
        abort_conn(e, c, s_internal);
    } else {
        abort_conn(e, c, how);
    }
    Py_XDECREF(how);
    return 0;
}

/* ---- accepting ---------------------------------------------------------------------- */

static void pause_frontend(Engine *e, Frontend *fe, int paused) {
    if (fe->paused == paused || fe->closed)
        return;
    fe->paused = paused;
    for (int i = 0; i < fe->nlisteners; i++) {
        struct epoll_event ev = {.events = paused ? 0 : EPOLLIN, .data.ptr = fe->listeners[i]};
        epoll_ctl(e->ep, EPOLL_CTL_MOD, fe->listeners[i]->fd, &ev);
    }
}

/* Take waiting connections, up to ACCEPT_BATCH; 1 once nothing more can be taken now
 * (the queue is empty, maxconn is reached, or accept() failed), 0 if more may wait. */
static int on_accept(Engine *e, Listener *l) {
    Frontend *fe = l->fe;
    for (int i = 0; i < ACCEPT_BATCH && !fe->closed; i++) {
        if (fe->count >= fe->maxconn) {
            pause_frontend(e, fe, 1);
            return 1;
        }
        if (fe->rate_limit && fe->rate_n >= fe->rate_limit) {
            fe->rate_held = 1; /* rate_window() accepts again */
            pause_frontend(e, fe, 1);
            return 1;
        }
        struct sockaddr_storage sa;
        socklen_t salen = sizeof sa;
        int fd = accept4(l->fd, (struct sockaddr *)&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EINTR || err == ECONNABORTED)
                continue; /* that one is gone: the next may be waiting */
            if (would_block(err))
                return 1;
            PyObject *eo = PyLong_FromLong(err);
            PyObject *r = eo ? PyObject_CallMethodObjArgs(fe->key, s_accept_failed, eo, NULL)
                             : NULL;
            Py_XDECREF(eo);
            if (!r)
                report("accept_failed() raised");
            Py_XDECREF(r);
            return 1;
        }
        fe->rate_n++;
        PyObject *src = NULL;
        if (fe->per_source && (sa.ss_family == AF_INET || sa.ss_family == AF_INET6)) {
            src = sa.ss_family == AF_INET
                      ? PyBytes_FromStringAndSize(
                            (const char *)&((struct sockaddr_in *)&sa)->sin_addr, 4)
                      : PyBytes_FromStringAndSize(
                            (const char *)&((struct sockaddr_in6 *)&sa)->sin6_addr, 16);
            PyObject *r = src ? PyObject_CallMethodObjArgs(fe->key, s_admit, src, NULL) : NULL;
            int ok = r ? PyObject_IsTrue(r) : -1;
            Py_XDECREF(r);
            if (ok < 0)
                report("admit() raised");
            if (ok == 0) { /* tcp-request connection reject: reset at once */
                struct linger lg = {1, 0};
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
                close(fd);
                Py_XDECREF(src);
                continue;
            }
            if (ok < 0)
                Py_CLEAR(src); /* admitted, not counted */
        }
        Conn *c = PyMem_RawCalloc(1, sizeof *c);
        if (!c) {
            Py_XDECREF(src);
            close(fd);
            return 1;
        }
        c->src = src;
        c->fe = fe;
        c->c.kind = c->s.kind = K_LEG;
        c->c.conn = c->s.conn = c;
        c->c.client = 1;
        c->c.fd = fd;
        c->c_req = l->mptcp;
        c->s.fd = -1;
        if (salen <= sizeof c->ca) { /* an IP address (or an unnamed unix one) */
            memcpy(&c->ca, &sa, salen);
            c->calen = salen;
        } else { /* a unix client bound to a path: Python's form now, 128 bytes less kept */
            c->caddr = sockaddr_to_py((struct sockaddr *)&sa, salen);
            if (!c->caddr) {
                PyErr_Clear();
                c->caddr = Py_NewRef(Py_None);
            }
        }
        c->dport = l->port;
        c->active = 1;
        c->connect_time = -1;
        if (e->observing)
            c->start = wallclock();
        c->next = &fe->head;
        c->prev = fe->head.prev;
        fe->head.prev->next = c;
        fe->head.prev = c;
        fe->count++;
        if (fe->intercept && !conv_intercepted(e, c))
            continue; /* not intercepted: reset */
        if (fe->accept_proxy || fe->convert) {
            c->hdr = PyByteArray_FromStringAndSize(NULL, 0);
            if (!c->hdr) {
                PyErr_Clear();
                abort_conn(e, c, s_internal);
                continue;
            }
        } else if (fe->first_wait >= 0) { /* TFO: the client's first bytes ride the SYN */
            c->conv |= CV_WAIT;
            timer_insert(e, c, monotonic() + fe->first_wait);
        } else {
            /* Server leg first: on loopback its connect is usually done at once, and
             * epoll then reports it before the client's bytes, which go straight on. */
            route(e, c);
        }
        if (!c->done && watch(e, &c->c, WATCH_IN) < 0)
            fail(e, c, &c->c, errno);
    }
    return fe->closed;
}

/* ---- events --------------------------------------------------------------------------- */

static void on_leg(Engine *e, Leg *l, uint32_t events) {
    Conn *c = l->conn;
    if (c->done || l->fd < 0)
        return;
    if (events & HANGUPS)
        l->hup = 1; /* also on a connect's first event: a server may say hello and go */
    if (l->connecting) {
        connected(e, c, events);
        return;
    }
    if ((c->conv & CV_HOLD) && l->client && !conv_syn_recv(c)) { /* its third ACK came */
        c->conv &= ~CV_HOLD;
        pump(e, c, &c->s);
        if (c->done || l->fd < 0)
            return;
    }
    if (l->pend)
        flush(e, c, l);
    if (c->done || l->fd < 0)
        return;
    if (events & READABLE) {
        if ((events & EPOLLERR) && !check_error(e, c, l))
            return;
        pump(e, c, l);
    }
}

static void on_timer(Engine *e) {
    uint64_t ticks;
    if (read(e->tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
        return;
    e->armed = 0;
    double now = monotonic(), next = 0;
    for (int i = 0; i < e->nfes; i++) {
        Frontend *fe = e->fes[i];
        if (!fe)
            continue;
        while (fe->tq_head && fe->tq_head->deadline <= now) {
            Conn *c = fe->tq_head;
            timeout_remove(c);
            connect_timeout(e, c);
        }
        if (fe->tq_head && (!next || fe->tq_head->deadline < next))
            next = fe->tq_head->deadline;
    }
    if (next)
        arm(e, next);
}

static void run_again(Engine *e) {
    size_t n = e->nagain;
    if (!n)
        return;
    Leg **todo = PyMem_RawMalloc(n * sizeof *todo);
    if (!todo)
        return;
    memcpy(todo, e->again, n * sizeof *todo);
    e->nagain = 0;
    for (size_t i = 0; i < n; i++) {
        Leg *src = todo[i];
        Conn *c = src->conn;
        c->queued--;
        if (src->waiting && !c->done && src->fd >= 0)
            pump(e, c, src);
    }
    PyMem_RawFree(todo);
}

/* ---- the Python type ---------------------------------------------------------------- */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"read_size", "observing", "call_soon", "burst", NULL};
    Py_ssize_t size;
    int observing;
    PyObject *call_soon;
    int burst = BURST;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "npO|i", kwlist, &size, &observing, &call_soon,
                                     &burst))
        return NULL;
    if (size < 1024) {
        PyErr_SetString(PyExc_ValueError, "read_size must be at least 1024");
        return NULL;
    }
    if (burst < 1) {
        PyErr_SetString(PyExc_ValueError, "burst must be at least 1");
        return NULL;
    }
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e)
        return NULL;
    e->ep = e->tfd = -1;
    e->observing = observing;
    e->size = (size_t)size;
    e->burst = burst;
    e->timer_kind = K_TIMER;
    e->buf = PyMem_RawMalloc(e->size);
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    e->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (!e->buf || e->ep < 0 || e->tfd < 0) {
        if (e->buf)
            PyErr_SetFromErrno(PyExc_OSError);
        else
            PyErr_NoMemory();
        Py_DECREF(e);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &e->timer_kind};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->tfd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    e->call_soon = Py_NewRef(call_soon);
    e->poll = PyObject_GetAttrString((PyObject *)e, "poll"); /* a cycle until close() */
    if (!e->poll) {
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

static void abort_all(Engine *e, Frontend *fe, PyObject *how) {
    while (fe->head.next != &fe->head)
        abort_conn(e, fe->head.next, how);
}

/* Reset every connection, drop the frontends (and the references to them), close. */
static void shutdown_engine(Engine *e) {
    for (int i = 0; i < e->nfes; i++) {
        Frontend *fe = e->fes[i];
        if (!fe)
            continue;
        abort_all(e, fe, s_internal);
        for (int j = 0; j < fe->nlisteners; j++)
            PyMem_RawFree(fe->listeners[j]);
        PyMem_RawFree(fe->listeners);
        Py_XDECREF(fe->key);
        Py_XDECREF(fe->idle_how);
        Py_XDECREF(fe->fin_how);
        Py_XDECREF(fe->queue_how);
        PyMem_RawFree(fe);
        e->fes[i] = NULL;
    }
    e->nfes = 0;
    e->nagain = 0;
    for (Conn *c = e->to_free; c;) {
        Conn *next = c->free_next;
        free_conn(c);
        c = next;
    }
    e->to_free = NULL;
    if (e->ep >= 0)
        close(e->ep);
    if (e->tfd >= 0)
        close(e->tfd);
    e->ep = e->tfd = -1;
    Py_CLEAR(e->call_soon);
    Py_CLEAR(e->poll);
}

static void Engine_dealloc(Engine *e) {
    shutdown_engine(e);
    PyErr_Clear();
    PyMem_RawFree(e->buf);
    PyMem_RawFree(e->again);
    PyMem_RawFree(e->fes);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_close(Engine *e, PyObject *Py_UNUSED(ignored)) {
    shutdown_engine(e);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static Frontend *get_fe(Engine *e, int id) {
    if (id < 0 || id >= e->nfes || !e->fes[id]) {
        PyErr_Format(PyExc_ValueError, "no frontend %d", id);
        return NULL;
    }
    return e->fes[id];
}

static PyObject *Engine_frontend(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"key", "maxconn", "accept_proxy", "needs_caddr",
                             "connect_timeout", "client_timeout", "idle_limit", "idle_how",
                             "fin_limit", "fin_how", "queue_timeout", "queue_how",
                             "rate_limit", "per_source", "route", "inspect_delay", "convert",
                             "intercept", "names_dest", "first_wait", NULL};
    PyObject *key, *idle_how, *fin_how = NULL, *queue_how = NULL;
    long maxconn, rate_limit = 0;
    int accept_proxy, needs_caddr, per_source = 0, route_ = 0;
    int convert = 0, intercept = 0, names_dest = 0;
    double ct, cl, il, fl = -2.0, qt = -1.0, inspect_delay = -1.0, first_wait = -1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OlppdddU|dUdUlppdpipd", kwlist, &key, &maxconn,
                                     &accept_proxy, &needs_caddr, &ct, &cl, &il, &idle_how,
                                     &fl, &fin_how, &qt, &queue_how, &rate_limit, &per_source,
                                     &route_, &inspect_delay, &convert, &intercept, &names_dest,
                                     &first_wait))
        return NULL;
    if (!queue_how) /* no queue: nothing is ever parked */
        qt = -1.0;
    if (fl == -2.0 || !fin_how) { /* no half-closed rule: the open one */
        fl = il;
        fin_how = idle_how;
    }
    if (e->nfes == e->capfes) {
        int cap = e->capfes ? e->capfes * 2 : 4;
        Frontend **a = PyMem_RawRealloc(e->fes, (size_t)cap * sizeof *a);
        if (!a)
            return PyErr_NoMemory();
        e->fes = a;
        e->capfes = cap;
    }
    Frontend *fe = PyMem_RawCalloc(1, sizeof *fe);
    if (!fe)
        return PyErr_NoMemory();
    fe->key = Py_NewRef(key);
    fe->idle_how = Py_NewRef(idle_how);
    fe->fin_how = Py_NewRef(fin_how);
    fe->fin_limit = fl;
    fe->queue_timeout = qt;
    fe->rate_limit = rate_limit;
    fe->per_source = per_source;
    fe->route = route_;
    fe->inspect_delay = inspect_delay;
    fe->convert = convert;
    fe->intercept = intercept;
    fe->names_dest = names_dest || convert;
    fe->first_wait = first_wait;
    fe->queue_how = Py_XNewRef(queue_how);
    fe->id = e->nfes;
    fe->maxconn = maxconn;
    fe->accept_proxy = accept_proxy;
    fe->needs_caddr = needs_caddr;
    fe->connect_timeout = ct;
    fe->client_timeout = cl;
    fe->idle_limit = il;
    fe->head.next = fe->head.prev = &fe->head;
    e->fes[e->nfes++] = fe;
    return PyLong_FromLong(fe->id);
}

static PyObject *Engine_listen(Engine *e, PyObject *args) {
    int id, fd, mptcp, port = 0;
    if (!PyArg_ParseTuple(args, "iip|i", &id, &fd, &mptcp, &port))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    if (fe->nlisteners == fe->caplisteners) {
        int cap = fe->caplisteners ? fe->caplisteners * 2 : 4;
        Listener **a = PyMem_RawRealloc(fe->listeners, (size_t)cap * sizeof *a);
        if (!a)
            return PyErr_NoMemory();
        fe->listeners = a;
        fe->caplisteners = cap;
    }
    Listener *l = PyMem_RawCalloc(1, sizeof *l);
    if (!l)
        return PyErr_NoMemory();
    l->kind = K_LISTENER;
    l->fd = fd;
    l->mptcp = mptcp;
    l->port = port;
    l->fe = fe;
    if (fe->intercept) { /* own_address(): where it takes connections to the gateway */
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && len <= sizeof l->bound &&
            (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)) {
            memcpy(&l->bound, &ss, len);
            unmap_addr(&l->bound, &len);
            l->wild = l->bound.sa.sa_family == AF_INET
                          ? l->bound.in.sin_addr.s_addr == htonl(INADDR_ANY)
                          : IN6_IS_ADDR_UNSPECIFIED(&l->bound.in6.sin6_addr);
        } else {
            l->wild = 1;
        }
    }
    struct epoll_event ev = {.events = fe->paused ? 0 : EPOLLIN, .data.ptr = l};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        PyMem_RawFree(l);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    fe->listeners[fe->nlisteners++] = l;
    Py_RETURN_NONE;
}

/* Stop accepting for good (the caller closes the listening sockets); first take what
 * the listeners queued (up to maxconn): closing them would reset those connections. */
static PyObject *Engine_close_frontend(Engine *e, PyObject *args) {
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    for (int i = 0; i < fe->nlisteners && !fe->closed; i++)
        while (!on_accept(e, fe->listeners[i]))
            ;
    for (int i = 0; i < fe->nlisteners; i++) {
        epoll_ctl(e->ep, EPOLL_CTL_DEL, fe->listeners[i]->fd, NULL);
        PyMem_RawFree(fe->listeners[i]);
    }
    fe->nlisteners = 0;
    fe->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_pause(Engine *e, PyObject *args) {
    int id, paused;
    if (!PyArg_ParseTuple(args, "ip", &id, &paused))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    pause_frontend(e, fe, paused);
    Py_RETURN_NONE;
}

static PyObject *Engine_count(Engine *e, PyObject *args) {
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if (e->ep < 0)
        return PyLong_FromLong(0); /* closed: nothing is left */
    Frontend *fe = get_fe(e, id);
    return fe ? PyLong_FromLong(fe->count) : NULL;
}

static PyObject *Engine_abort_all(Engine *e, PyObject *args) {
    int id;
    PyObject *how;
    if (!PyArg_ParseTuple(args, "iU", &id, &how))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    abort_all(e, fe, how);
    reap(e);
    Py_RETURN_NONE;
}

/* Run one batch of events; True if work was cut short (call again soon). */
static PyObject *Engine_poll(Engine *e, PyObject *Py_UNUSED(ignored)) {
    struct epoll_event evs[EVENTS];
    if (e->ep < 0)
        Py_RETURN_NONE;
    run_again(e);
    e->batch++;
    int n = epoll_wait(e->ep, evs, EVENTS, 0);
    for (int i = 0; i < n; i++) {
        int kind = *(int *)evs[i].data.ptr;
        if (kind == K_LEG) {
            Leg *l = evs[i].data.ptr;
            if (l->born != e->batch)
                on_leg(e, l, evs[i].events);
        } else if (kind == K_LISTENER) {
            on_accept(e, evs[i].data.ptr);
        } else {
            on_timer(e);
        }
    }
    reap(e);
    if (PyErr_Occurred())
        PyErr_Clear();
    if (e->nagain && e->call_soon) { /* work was cut short to let others in: go on soon */
        PyObject *r = PyObject_CallOneArg(e->call_soon, e->poll);
        if (!r)
            report("call_soon() failed");
        Py_XDECREF(r);
    }
    Py_RETURN_NONE;
}

/* Idle timeouts and subflow sampling: the runtime calls this every `interval` s. */
static PyObject *Engine_sweep(Engine *e, PyObject *args) {
    int id;
    double interval;
    if (!PyArg_ParseTuple(args, "id", &id, &interval))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    {
        double now = fe->nparked ? monotonic() : 0;
        Conn *c = fe->head.next;
        while (c != &fe->head) {
            Conn *next = c->next;
            int connected = c->s.fd >= 0 && !c->s.connecting;
            if (c->parked && fe->queue_timeout >= 0 && now - c->parked >= fe->queue_timeout) {
                end(e, c, fe->queue_how);
                c = next;
                continue;
            }
            if (c->active) {
                c->active = 0;
                c->idle = 0;
                if (e->observing && connected) {
                    if (c->c_req && c->c.fd >= 0 && !c->c_state) {
                        long n = subflows(c->c.fd);
                        if (n > c->c_sub)
                            c->c_sub = n;
                    }
                    if (c->s_observe && !c->s_state) {
                        long n = subflows(c->s.fd);
                        if (n > c->s_sub)
                            c->s_sub = n;
                    }
                }
            } else {
                c->idle += interval;
                if (c->hdr && fe->client_timeout >= 0 && c->idle >= fe->client_timeout)
                    abort_conn(e, c, fe->convert ? s_no_convert : s_no_header);
                else if (connected) {
                    int half = c->c.eof || c->s.eof; /* a FIN crossed: client-/server-fin */
                    double limit = half ? fe->fin_limit : fe->idle_limit;
                    if (limit >= 0 && c->idle >= limit)
                        end(e, c, half ? fe->fin_how : fe->idle_how);
                }
            }
            c = next;
        }
    }
    reap(e);
    Py_RETURN_NONE;
}

/* Let the oldest parked connection connect: a server slot freed (queue.py); with `be`,
 * the oldest one routed to that backend (use_backend rules park several in one FIFO). */
static PyObject *Engine_unpark(Engine *e, PyObject *args) {
    int id;
    PyObject *be = Py_None;
    if (!PyArg_ParseTuple(args, "i|O", &id, &be))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    Conn *c = fe->pq_head;
    while (c && be != Py_None && c->be != be)
        c = c->pnext;
    if (!c || e->ep < 0)
        Py_RETURN_FALSE;
    unpark_remove(c);
    do_connect(e, c);
    reap(e);
    Py_RETURN_TRUE;
}

/* A new maxconnrate window: accept again; True if the last one was cut short. */
static PyObject *Engine_rate_window(Engine *e, PyObject *args) {
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    int held = fe->rate_held;
    fe->rate_n = 0;
    fe->rate_held = 0;
    if (e->ep >= 0 && fe->paused && fe->count < fe->maxconn)
        pause_frontend(e, fe, 0);
    return PyBool_FromLong(held);
}

static PyObject *Engine_parked(Engine *e, PyObject *args) {
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    return PyLong_FromLong(fe->nparked);
}

/* Bytes relayed since the last call, live connections' included: (in, out). */
static PyObject *Engine_take_bytes(Engine *e, PyObject *args) {
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if (e->ep < 0)
        return Py_BuildValue("(ii)", 0, 0); /* closed */
    Frontend *fe = get_fe(e, id);
    if (!fe)
        return NULL;
    PyObject *r = Py_BuildValue("(KK)", fe->bytes_in, fe->bytes_out);
    fe->bytes_in = fe->bytes_out = 0;
    return r;
}

/* Live connections, for the runtime API: [(client, server state or None, client fd,
   server fd or -1 while connecting, bytes in, bytes out, start, client asked MPTCP)]. */
static PyObject *Engine_sessions(Engine *e, PyObject *args) {
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out || e->ep < 0)
        return out;
    Frontend *fe = get_fe(e, id);
    if (!fe) {
        Py_DECREF(out);
        return NULL;
    }
    for (Conn *c = fe->head.next; c != &fe->head; c = c->next) {
        if (c->done)
            continue;
        PyObject *t = Py_BuildValue("(OOiiKKdiO)", client_addr(c),
                                    c->server ? c->server : Py_None, c->c.fd,
                                    c->s.connecting ? -1 : c->s.fd, c->bytes_in, c->bytes_out,
                                    c->start, c->c_req, c->be ? c->be : Py_None);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *Engine_fileno(Engine *e, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(e->ep);
}

static PyMethodDef Engine_methods[] = {
    {"frontend", (PyCFunction)(void (*)(void))Engine_frontend, METH_VARARGS | METH_KEYWORDS,
     "Register a frontend; returns its id."},
    {"listen", (PyCFunction)Engine_listen, METH_VARARGS, "listen(id, fd, mptcp): accept on fd."},
    {"close_frontend", (PyCFunction)Engine_close_frontend, METH_VARARGS,
     "close_frontend(id): take what was queued, stop accepting; connections go on."},
    {"pause", (PyCFunction)Engine_pause, METH_VARARGS, "pause(id, paused): hold accepts."},
    {"count", (PyCFunction)Engine_count, METH_VARARGS, "count(id): live connections."},
    {"abort_all", (PyCFunction)Engine_abort_all, METH_VARARGS,
     "abort_all(id, how): reset every connection of a frontend."},
    {"poll", (PyCFunction)Engine_poll, METH_NOARGS, "Run the ready events."},
    {"unpark", (PyCFunction)Engine_unpark, METH_VARARGS,
     "unpark(id[, backend]): let the oldest connection waiting for a server slot (of that"
     " backend) connect; False if none."},
    {"rate_window", (PyCFunction)Engine_rate_window, METH_VARARGS,
     "rate_window(id): a new maxconnrate window; True if the last one stopped accepting."},
    {"parked", (PyCFunction)Engine_parked, METH_VARARGS,
     "parked(id): connections waiting for a server slot (queue.py)."},
    {"sweep", (PyCFunction)Engine_sweep, METH_VARARGS,
     "sweep(id, interval): idle timeouts and subflow sampling of one frontend."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS,
     "Reset every connection and close; the engine is unusable after."},
    {"take_bytes", (PyCFunction)Engine_take_bytes, METH_VARARGS,
     "take_bytes(id): (in, out) bytes relayed since the last call."},
    {"sessions", (PyCFunction)Engine_sessions, METH_VARARGS,
     "sessions(id): the live connections, for the runtime API."},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll fd to wait on."},
    {NULL, NULL, 0, NULL},
};

/* The engine's RFC 8803 parser, for tests (hypothesis checks it against
 * convertproto.py): None: need more; ("error", code, value byte, reason); or ("ok",
 * used, Connect TLVs, Info seen, port, address (16 bytes), options, cookie or None,
 * first Error code or -1, the first TCP option refused or 0). */
static PyObject *parse_convert(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer b;
    int request;
    if (!PyArg_ParseTuple(args, "y*p", &b, &request))
        return NULL;
    ConvMsg m;
    int r = conv_parse(b.buf, (size_t)b.len, request, &m);
    PyObject *out;
    if (r == CONV_NEED)
        out = Py_NewRef(Py_None);
    else if (r == CONV_ERR)
        out = Py_BuildValue("(siis)", "error", m.code, m.value, m.reason);
    else {
        const char *opts = m.options ? (const char *)m.options : "";
        if (m.cookie)
            out = Py_BuildValue("(sniiIy#y#y#ii)", "ok", (Py_ssize_t)m.used, m.connects, m.info,
                                m.port, m.addr, (Py_ssize_t)16, opts,
                                (Py_ssize_t)m.options_len, m.cookie, (Py_ssize_t)m.cookie_len,
                                m.error, conv_refused_option(&m));
        else
            out = Py_BuildValue("(sniiIy#y#Oii)", "ok", (Py_ssize_t)m.used, m.connects, m.info,
                                m.port, m.addr, (Py_ssize_t)16, opts, (Py_ssize_t)m.options_len,
                                Py_None, m.error, conv_refused_option(&m));
    }
    PyBuffer_Release(&b);
    return out;
}

static PyMethodDef module_methods[] = {
    {"parse_convert", parse_convert, METH_VARARGS,
     "parse_convert(data, request): the engine's verdict on an RFC 8803 message (tests)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mptcpkit.proxy._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The proxy's compiled data path for one worker.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_engine", "The proxy's compiled data path.", -1, module_methods,
};

#define INTERN(var, text)                                   \
    if (!((var) = PyUnicode_InternFromString(text))) return NULL

PyMODINIT_FUNC PyInit__engine(void) {
    INTERN(s_pick, "pick");
    INTERN(s_failed, "failed");
    INTERN(s_header, "header");
    INTERN(s_parse, "parse");
    INTERN(s_leg_state, "leg_state");
    INTERN(s_done, "done");
    INTERN(s_admit, "admit");
    INTERN(s_release, "release");
    INTERN(s_route, "route");
    INTERN(s_accept_failed, "accept_failed");
    INTERN(s_both_closed, "both closed");
    INTERN(s_internal, "internal error");
    INTERN(s_no_header, "client timeout (no PROXY header)");
    INTERN(s_closed_before_header, "client closed before its PROXY header");
    INTERN(s_tcp, "TCP");
    INTERN(s_mptcp, "MPTCP");
    INTERN(s_question, "?");
    INTERN(s_dash, "-");
    INTERN(s_convert, "convert");
    INTERN(s_refuse, "refuse");
    INTERN(s_dest_failed, "dest_failed");
    INTERN(s_not_intercepted, "not_intercepted");
    INTERN(s_remote_refused, "remote_refused");
    INTERN(s_info_answered, "Info answered");
    INTERN(s_no_convert, "client timeout (no Convert message)");
    INTERN(s_closed_before_convert, "client closed before its Convert message");
    INTERN(s_reply_eof, "remote gateway closed before its Convert reply");
    PyObject *errno_mod = PyImport_ImportModule("errno");
    if (!errno_mod)
        return NULL;
    s_errorcode = PyObject_GetAttrString(errno_mod, "errorcode");
    Py_DECREF(errno_mod);
    if (!s_errorcode)
        return NULL;
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    /* what each connection costs the engine, idle (tests/test_engine_memory.py) */
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "CONN_BYTES", (long)sizeof(Conn)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
