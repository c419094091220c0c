/* The seccomp supervisor's common case, compiled: see src/mptcpkit/run/fastpath.py.
 *
 * Server.serve() receives notifications and answers, without the interpreter, every
 * socket() call of a thread that shares the supervisor's network namespace and
 * credentials: it makes the MPTCP socket and installs it as the call's result, exactly
 * as Supervisor._on_socket does in Python (context from the thread's pidfd where the
 * kernel has pidfs ioctls, else /proc/<tid>/status and /proc/<tid>/ns/net; confirmed
 * with SECCOMP_IOCTL_NOTIF_ID_VALID), and an exec of a program that is not privileged
 * (the core is _force.h, shared with the _supervise executable). It keeps going
 * while more notifications are pending, and hands anything else back to Python: any
 * other call, another namespace or credentials, MPTCP refused, a socket that cannot
 * be installed. Nothing irreversible is done to a call it hands back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <poll.h>

#include "_force.h"

#define MAX_BATCH 64 /* then back to Python's loop, which also watches the program */

enum { KIND_IDLE, KIND_SLOW, KIND_ERROR };

typedef struct {
    PyObject_HEAD
    struct forcer f;
    unsigned char *buf;
    /* forced sockets since the last serve(): (st_dev, st_ino) */
    unsigned long long *keys;
    size_t nkeys, capkeys;
} Server;

static int remember(Server *s, unsigned long long dev, unsigned long long ino) {
    if (s->nkeys + 2 > s->capkeys) {
        size_t cap = s->capkeys ? s->capkeys * 2 : 64;
        unsigned long long *k = realloc(s->keys, cap * sizeof *k);
        if (k == NULL)
            return -1;
        s->keys = k;
        s->capkeys = cap;
    }
    s->keys[s->nkeys++] = dev;
    s->keys[s->nkeys++] = ino;
    return 0;
}

static PyObject *Server_serve(Server *s, PyObject *Py_UNUSED(ignored)) {
    int kind = KIND_IDLE, err = 0;
    s->nkeys = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int served = 0; served < MAX_BATCH; served++) {
        memset(s->buf, 0, s->f.recv_size);
        if (ioctl(s->f.listener, s->f.io_recv, s->buf) < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            kind = KIND_ERROR;
            break;
        }
        int forced;
        unsigned long long dev, ino;
        if (force_one(&s->f, s->buf, &forced, &dev, &ino) == SLOW) {
            kind = KIND_SLOW;
            break;
        }
        if (forced)
            remember(s, dev, ino); /* out of memory: forgotten for a later swap */
        struct pollfd p = {s->f.listener, POLLIN, 0};
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
        return Py_BuildValue("(iy#N)", kind, (const char *)s->buf, (Py_ssize_t)s->f.recv_size,
                             keys);
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
    static char *kw[] = {"listener", "recv_size", "audit_arch", "nr_socket",   "netns",
                         "uids",     "gids",      "groups",     "killable",    "ioctls",
                         "addfd_flag_send", "pidfd", "sync_wakeup", "nr_execve", "nr_execveat",
                         "nr_setns", "nr_unshare", NULL};
    unsigned long long ns_dev, ns_ino;
    PyObject *uids, *gids, *groups;
    unsigned int audit_arch, flag_send;
    Py_ssize_t recv_size;
    int killable, pidfd = 1, sync_wakeup = 1, listener, nr_socket, nr_execve = -1,
                  nr_execveat = -1, nr_setns = -1, nr_unshare = -1;
    struct forcer *f = &s->f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inIi(KK)O!O!O!p(kkkk)I|ppiiii", kw, &listener,
                                     &recv_size, &audit_arch, &nr_socket, &ns_dev, &ns_ino,
                                     &PyTuple_Type, &uids, &PyTuple_Type, &gids, &PyTuple_Type,
                                     &groups, &killable, &f->io_recv, &f->io_send,
                                     &f->io_addfd, &f->io_id_valid, &flag_send, &pidfd,
                                     &sync_wakeup, &nr_execve, &nr_execveat, &nr_setns,
                                     &nr_unshare))
        return -1;
    if (long3(uids, f->uids) < 0 || long3(gids, f->gids) < 0)
        return -1;
    Py_ssize_t ng = PyTuple_GET_SIZE(groups);
    if (ng > MAX_GROUPS) {
        PyErr_SetString(PyExc_ValueError, "too many supplementary groups");
        return -1;
    }
    for (Py_ssize_t i = 0; i < ng; i++) {
        f->groups[i] = PyLong_AsLong(PyTuple_GET_ITEM(groups, i));
        if (f->groups[i] == -1 && PyErr_Occurred())
            return -1;
    }
    if (recv_size < 80) {
        PyErr_SetString(PyExc_ValueError, "recv_size below struct seccomp_notif");
        return -1;
    }
    if (s->buf != NULL) /* a second __init__ */
        force_forget_all(f);
    f->listener = listener;
    f->recv_size = (size_t)recv_size;
    f->nr_socket = nr_socket;
    f->nr_execve = nr_execve;
    f->nr_execveat = nr_execveat;
    f->nr_setns = nr_setns;
    f->nr_unshare = nr_unshare;
    f->ngroups = (int)ng;
    f->audit_arch = audit_arch;
    f->addfd_flag_send = flag_send;
    f->ns_dev = (dev_t)ns_dev;
    f->ns_ino = (ino_t)ns_ino;
    f->killable = killable;
    force_setup(f, pidfd, sync_wakeup);
    PyMem_Free(s->buf);
    s->buf = PyMem_Malloc(f->recv_size);
    if (s->buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Server_dealloc(Server *s) {
    if (s->buf != NULL)
        force_forget_all(&s->f);
    PyMem_Free(s->buf);
    free(s->keys);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Server_context_source(Server *s, PyObject *Py_UNUSED(ignored)) {
    return PyUnicode_FromString(s->f.use_pidfd ? "pidfd" : "proc");
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

/* What `mptcpkit run` itself needs before exec, without loading ctypes (about 1 ms
 * of every run's start): see run/syscalls.py, which falls back to ctypes. */
#include <linux/filter.h>
#include <sys/prctl.h>

static PyObject *fp_prctl(PyObject *self, PyObject *args) {
    int option;
    unsigned long arg2;
    if (!PyArg_ParseTuple(args, "ik", &option, &arg2))
        return NULL;
    int r = prctl(option, arg2, 0UL, 0UL, 0UL);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

static PyObject *fp_seccomp_filter(PyObject *self, PyObject *args) {
    long nr;
    unsigned int flags;
    Py_buffer prog;
    if (!PyArg_ParseTuple(args, "lIy*", &nr, &flags, &prog))
        return NULL;
    struct sock_fprog fprog = {(unsigned short)(prog.len / sizeof(struct sock_filter)),
                               (struct sock_filter *)prog.buf};
    long r = syscall(nr, 1L /* SECCOMP_SET_MODE_FILTER */, (unsigned long)flags, &fprog);
    PyBuffer_Release(&prog);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

static PyMethodDef module_methods[] = {
    {"prctl", fp_prctl, METH_VARARGS, "prctl(option, arg2) -> int; OSError on failure."},
    {"seccomp_filter", fp_seccomp_filter, METH_VARARGS,
     "seccomp_filter(nr, flags, program) -> fd or 0: seccomp(SECCOMP_SET_MODE_FILTER)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The seccomp supervisor's compiled socket() path.", -1,
    module_methods,
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
