/* The seccomp supervisor's common case, compiled: see src/mptcpkit/run/fastpath.py.
 *
 * Server.serve() receives notifications and answers, without the interpreter, every
 * socket() call of a thread that shares the supervisor's network namespace and
 * credentials: it makes the MPTCP socket and installs it as the call's result, exactly
 * as Supervisor._on_socket does in Python (context from the thread's pidfd where the
 * kernel has pidfs ioctls, else /proc/<tid>/status and /proc/<tid>/ns/net; confirmed
 * with SECCOMP_IOCTL_NOTIF_ID_VALID). It keeps going
 * while more notifications are pending, and hands anything else back to Python: any
 * other call, another namespace or credentials, MPTCP refused, a socket that cannot
 * be installed. Nothing irreversible is done to a call it hands back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

#define MAX_GROUPS 256
#define PIDFD_CACHE 16
#define MAX_BATCH 64 /* then back to Python's loop, which also watches the program */
#define STATUS_SIZE 8192

/* pidfs (6.11+, 6.13+): a thread's credentials and network namespace from its pidfd,
 * a few cheap calls instead of formatting /proc/<tid>/status (include/uapi/linux/pidfd.h) */
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#define PIDFD_THREAD O_EXCL
#define PIDFS_IOCTL_MAGIC 0xFF
#define PIDFD_GET_NET_NAMESPACE _IO(PIDFS_IOCTL_MAGIC, 4)
struct pidfd_info_v0 {
    uint64_t mask;
    uint64_t cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    uint32_t spare0;
};
#define PIDFD_GET_INFO _IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info_v0)
#define PIDFD_INFO_CREDS (1UL << 1)

/* 6.6+: the kernel switches between the trapped thread and the supervisor on one CPU
 * (a synchronous wake-up) instead of waking the other side elsewhere. */
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS _IOW('!', 4, uint64_t)
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1ULL

enum { DONE, GONE, SLOW };
enum { KIND_IDLE, KIND_SLOW, KIND_ERROR };

typedef struct {
    PyObject_HEAD
    int listener;
    Py_ssize_t recv_size;
    uint32_t audit_arch;
    int32_t nr_socket;
    dev_t ns_dev;
    ino_t ns_ino;
    long uids[3], gids[3];
    long groups[MAX_GROUPS];
    int ngroups;
    int killable;
    int use_pidfd; /* 1: pidfs ioctls work here; 0: /proc */
    int sync_wakeup;
    int pidfds[PIDFD_CACHE];
    uint32_t pidfd_tids[PIDFD_CACHE];
    unsigned pidfd_next;
    unsigned long io_recv, io_send, io_addfd, io_id_valid;
    uint32_t addfd_flag_send;
    unsigned char *buf;
    /* forced sockets since the last serve(): (st_dev, st_ino) */
    unsigned long long *keys;
    size_t nkeys, capkeys;
} Server;

struct notif_resp {
    uint64_t id;
    int64_t val;
    int32_t error;
    uint32_t flags;
};

struct notif_addfd {
    uint64_t id;
    uint32_t flags;
    uint32_t srcfd;
    uint32_t newfd;
    uint32_t newfd_flags;
};

/* The numbers after "Name:" on one line of /proc/<tid>/status; -1 if absent. */
static int fields(const char *status, const char *name, long *out, int max) {
    const char *p = strstr(status, name);
    if (p == NULL)
        return -1;
    p += strlen(name);
    int n = 0;
    while (*p && *p != '\n') {
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\n' || *p == '\0')
            break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p)
            return -1;
        if (n == max)
            return -1; /* more groups than we compare: let Python decide */
        out[n++] = v;
        p = end;
    }
    return n;
}

/* Through pidfs: uids, gids and network namespace (supplementary groups are not
 * there; a socket does not record them). -1 if pidfs cannot say. */
/* A pidfd per recent caller, kept: a pidfd names one task, never a later one that
 * reuses its id, so a stale one fails (ESRCH) and is opened again. */
static int caller_pidfd(Server *s, uint32_t tid, int *fresh) {
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] >= 0 && s->pidfd_tids[i] == tid) {
            *fresh = 0;
            return s->pidfds[i];
        }
    }
    int fd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (fd < 0)
        return -1;
    int slot = s->pidfd_next++ % PIDFD_CACHE;
    if (s->pidfds[slot] >= 0)
        close(s->pidfds[slot]);
    s->pidfds[slot] = fd;
    s->pidfd_tids[slot] = tid;
    *fresh = 1;
    return fd;
}

static void forget_pidfd(Server *s, int fd) {
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] == fd) {
            close(fd);
            s->pidfds[i] = -1;
        }
    }
}

static int same_context_pidfd(Server *s, uint32_t tid) {
    struct pidfd_info_v0 info;
    int pfd, fresh;
    for (;;) {
        pfd = caller_pidfd(s, tid, &fresh);
        if (pfd < 0)
            return -1;
        memset(&info, 0, sizeof info);
        info.mask = PIDFD_INFO_CREDS;
        if (ioctl(pfd, PIDFD_GET_INFO, &info) == 0 && (info.mask & PIDFD_INFO_CREDS))
            break;
        forget_pidfd(s, pfd);
        if (fresh)
            return -1;
    }
    int ns = ioctl(pfd, PIDFD_GET_NET_NAMESPACE, 0);
    if (ns < 0)
        return -1;
    struct stat st;
    int ok = fstat(ns, &st) == 0 && st.st_dev == s->ns_dev && st.st_ino == s->ns_ino;
    close(ns);
    return ok && info.ruid == (uint32_t)s->uids[0] && info.euid == (uint32_t)s->uids[1] &&
           info.suid == (uint32_t)s->uids[2] && info.rgid == (uint32_t)s->gids[0] &&
           info.egid == (uint32_t)s->gids[1] && info.sgid == (uint32_t)s->gids[2];
}

/* Does thread `tid` run in our network namespace with our credentials? */
static int same_context(Server *s, uint32_t tid) {
    if (s->use_pidfd) {
        int same = same_context_pidfd(s, tid);
        if (same >= 0)
            return same;
    }
    char path[64], status[STATUS_SIZE];
    snprintf(path, sizeof path, "/proc/%u/status", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, status, sizeof status - 1);
    close(fd);
    if (n <= 0 || n >= (ssize_t)sizeof status - 1)
        return 0;
    status[n] = '\0';
    long ids[4], groups[MAX_GROUPS];
    if (fields(status, "\nUid:", ids, 4) < 3 || memcmp(ids, s->uids, sizeof s->uids))
        return 0;
    if (fields(status, "\nGid:", ids, 4) < 3 || memcmp(ids, s->gids, sizeof s->gids))
        return 0;
    int ng = fields(status, "\nGroups:", groups, MAX_GROUPS);
    if (ng != s->ngroups || memcmp(groups, s->groups, sizeof(long) * ng))
        return 0;
    struct stat st;
    snprintf(path, sizeof path, "/proc/%u/ns/net", tid);
    if (stat(path, &st) < 0 || st.st_dev != s->ns_dev || st.st_ino != s->ns_ino)
        return 0;
    return 1;
}

static int remember(Server *s, dev_t dev, ino_t ino) {
    if (s->nkeys + 2 > s->capkeys) {
        size_t cap = s->capkeys ? s->capkeys * 2 : 64;
        unsigned long long *k = realloc(s->keys, cap * sizeof *k);
        if (k == NULL)
            return -1;
        s->keys = k;
        s->capkeys = cap;
    }
    s->keys[s->nkeys++] = (unsigned long long)dev;
    s->keys[s->nkeys++] = (unsigned long long)ino;
    return 0;
}

static int send_resp(Server *s, uint64_t id, int64_t val, uint32_t flags) {
    struct notif_resp resp = {id, val, 0, flags};
    while (ioctl(s->listener, s->io_send, &resp) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

/* One received socket() call: DONE (answered), GONE (caller died), SLOW (untouched). */
static int force(Server *s, const unsigned char *buf) {
    uint64_t id;
    uint32_t tid, arch;
    int32_t nr;
    uint64_t args[3];
    memcpy(&id, buf, 8);
    memcpy(&tid, buf + 8, 4);
    memcpy(&nr, buf + 16, 4);
    memcpy(&arch, buf + 20, 4);
    memcpy(args, buf + 32, sizeof args);
    int family = (int)args[0], type = (int)args[1], proto = (int)args[2];
    if (arch != s->audit_arch || nr != s->nr_socket)
        return SLOW;
    if ((family != AF_INET && family != AF_INET6) || (type & 0xf) != SOCK_STREAM ||
        (proto != 0 && proto != IPPROTO_TCP))
        return SLOW;
    if (!same_context(s, tid))
        return SLOW;
    uint64_t check = id;
    if (ioctl(s->listener, s->io_id_valid, &check) < 0)
        return errno == ENOENT ? GONE : SLOW;
    int sock = socket(family, type | SOCK_CLOEXEC, IPPROTO_MPTCP);
    if (sock < 0)
        return SLOW; /* Python counts the refusal and lets the call make TCP */
    struct stat st;
    if (fstat(sock, &st) < 0) {
        close(sock);
        return SLOW;
    }
    struct notif_addfd add = {id, 0, (uint32_t)sock, 0, (type & SOCK_CLOEXEC) ? O_CLOEXEC : 0};
    if (!s->killable)
        add.flags = s->addfd_flag_send; /* install and answer in one step */
    int newfd;
    do {
        newfd = ioctl(s->listener, s->io_addfd, &add);
    } while (newfd < 0 && errno == EINTR);
    int err = errno;
    close(sock); /* the program's close() is then the last reference */
    if (newfd < 0)
        return err == ENOENT ? GONE : SLOW;
    if (s->killable && send_resp(s, id, newfd, 0) < 0) {
        /* ENOENT: killed, its descriptors went with it; else let the call go ahead,
         * as Python does after an unexpected error */
        if (errno != ENOENT)
            send_resp(s, id, 0, 1 /* SECCOMP_USER_NOTIF_FLAG_CONTINUE */);
        return GONE;
    }
    remember(s, st.st_dev, st.st_ino); /* out of memory: forgotten for a later swap */
    return DONE;
}

static PyObject *Server_serve(Server *s, PyObject *Py_UNUSED(ignored)) {
    int kind = KIND_IDLE, err = 0;
    s->nkeys = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int served = 0; served < MAX_BATCH; served++) {
        memset(s->buf, 0, s->recv_size);
        if (ioctl(s->listener, s->io_recv, s->buf) < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            kind = KIND_ERROR;
            break;
        }
        if (force(s, s->buf) == SLOW) {
            kind = KIND_SLOW;
            break;
        }
        struct pollfd p = {s->listener, POLLIN, 0};
        if (poll(&p, 1, 0) <= 0 || !(p.revents & POLLIN))
            break;
    }
    Py_END_ALLOW_THREADS
    PyObject *keys = PyList_New((Py_ssize_t)(s->nkeys / 2));
    if (keys == NULL)
        return NULL;
    for (size_t i = 0; i < s->nkeys / 2; i++) {
        PyObject *key = Py_BuildValue("(KK)", s->keys[2 * i], s->keys[2 * i + 1]);
        if (key == NULL) {
            Py_DECREF(keys);
            return NULL;
        }
        PyList_SET_ITEM(keys, (Py_ssize_t)i, key);
    }
    if (kind == KIND_SLOW)
        return Py_BuildValue("(iy#N)", kind, (const char *)s->buf, s->recv_size, keys);
    if (kind == KIND_ERROR)
        return Py_BuildValue("(iiN)", kind, err, keys);
    return Py_BuildValue("(iON)", kind, Py_None, keys);
}

static int long3(PyObject *seq, long *out) {
    if (!PyArg_ParseTuple(seq, "lll", &out[0], &out[1], &out[2]))
        return -1;
    return 0;
}

static int Server_init(Server *s, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"listener", "recv_size", "audit_arch", "nr_socket", "netns",
                         "uids",     "gids",      "groups",     "killable",  "ioctls",
                         "addfd_flag_send", "pidfd", "sync_wakeup", NULL};
    unsigned long long ns_dev, ns_ino;
    PyObject *uids, *gids, *groups;
    unsigned int audit_arch, flag_send;
    int killable, pidfd = 1, sync_wakeup = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inIi(KK)O!O!O!p(kkkk)I|pp", kw, &s->listener,
                                     &s->recv_size, &audit_arch, &s->nr_socket, &ns_dev,
                                     &ns_ino, &PyTuple_Type, &uids, &PyTuple_Type, &gids,
                                     &PyTuple_Type, &groups, &killable, &s->io_recv,
                                     &s->io_send, &s->io_addfd, &s->io_id_valid, &flag_send,
                                     &pidfd, &sync_wakeup))
        return -1;
    if (long3(uids, s->uids) < 0 || long3(gids, s->gids) < 0)
        return -1;
    Py_ssize_t ng = PyTuple_GET_SIZE(groups);
    if (ng > MAX_GROUPS) {
        PyErr_SetString(PyExc_ValueError, "too many supplementary groups");
        return -1;
    }
    for (Py_ssize_t i = 0; i < ng; i++) {
        s->groups[i] = PyLong_AsLong(PyTuple_GET_ITEM(groups, i));
        if (s->groups[i] == -1 && PyErr_Occurred())
            return -1;
    }
    if (s->recv_size < 80) {
        PyErr_SetString(PyExc_ValueError, "recv_size below struct seccomp_notif");
        return -1;
    }
    s->ngroups = (int)ng;
    s->audit_arch = audit_arch;
    s->addfd_flag_send = flag_send;
    s->ns_dev = (dev_t)ns_dev;
    s->ns_ino = (ino_t)ns_ino;
    s->killable = killable;
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] > 0) /* zeroed by tp_alloc; a second __init__ closes them */
            close(s->pidfds[i]);
        s->pidfds[i] = -1;
    }
    uint64_t sync = SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP;
    s->sync_wakeup = sync_wakeup && ioctl(s->listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, sync) == 0;
    /* pidfs only if it describes this very thread as Python saw it */
    s->use_pidfd = pidfd && same_context_pidfd(s, (uint32_t)syscall(SYS_gettid)) == 1;
    for (int i = 0; i < PIDFD_CACHE; i++) { /* our own pidfd is no caller's */
        if (s->pidfds[i] >= 0)
            close(s->pidfds[i]);
        s->pidfds[i] = -1;
    }
    PyMem_Free(s->buf);
    s->buf = PyMem_Malloc(s->recv_size);
    if (s->buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Server_dealloc(Server *s) {
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] > 0)
            close(s->pidfds[i]);
    }
    PyMem_Free(s->buf);
    free(s->keys);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Server_context_source(Server *s, PyObject *Py_UNUSED(ignored)) {
    return PyUnicode_FromString(s->use_pidfd ? "pidfd" : "proc");
}

static PyMethodDef Server_methods[] = {
    {"context_source", (PyCFunction)Server_context_source, METH_NOARGS,
     "Where a caller's credentials and namespace are read: 'pidfd' or 'proc'."},
    {"serve", (PyCFunction)Server_serve, METH_NOARGS,
     "serve() -> (kind, payload, forced keys): 0 idle (None), 1 a notification for "
     "Python (bytes), 2 the receive failed (errno)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mptcpkit.run._fastpath.Server",
    .tp_basicsize = sizeof(Server),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Answers a seccomp listener's plain socket() calls in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Server_init,
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = Server_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The seccomp supervisor's compiled socket() path.", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&ServerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ServerType);
    if (PyModule_AddObject(m, "Server", (PyObject *)&ServerType) < 0) {
        Py_DECREF(&ServerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
