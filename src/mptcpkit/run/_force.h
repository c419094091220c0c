/* The seccomp supervisor's compiled common case, shared by the `_fastpath` extension
 * (inside the Python supervisor) and the `_supervise` executable (the background
 * supervisor itself): see src/mptcpkit/run/fastpath.py and supervise.py.
 *
 * force() answers a socket() call of a thread that shares the supervisor's network
 * namespace and credentials: it makes the MPTCP socket and installs it as the call's
 * result, exactly as Supervisor._on_socket does in Python (context from the thread's
 * pidfd where the kernel has pidfs ioctls, else /proc/<tid>/status and
 * /proc/<tid>/ns/net; confirmed with SECCOMP_IOCTL_NOTIF_ID_VALID). exec_check()
 * answers an execve()/execveat() of a program that is not setuid, setgid or
 * file-capability, as Supervisor._on_exec does. Anything else is SLOW: nothing
 * irreversible was done to the call, Python decides.
 */
#ifndef MPTCPKIT_RUN_FORCE_H
#define MPTCPKIT_RUN_FORCE_H

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

#define MAX_GROUPS 256
#define PIDFD_CACHE 16
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
#define FORCE_NOTIF_SET_FLAGS _IOW('!', 4, uint64_t)
#define FORCE_SYNC_WAKE_UP 1ULL
#define FORCE_FLAG_CONTINUE 1U /* SECCOMP_USER_NOTIF_FLAG_CONTINUE */

#define FORCE_AT_FDCWD (-100)
#define FORCE_AT_EMPTY_PATH 0x1000

enum { DONE, GONE, SLOW };

struct forcer {
    int listener;
    size_t recv_size;
    uint32_t audit_arch;
    int32_t nr_socket, nr_execve, nr_execveat; /* -1: not handled here */
    int32_t nr_setns, nr_unshare;
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
    /* ns_epoch + 1 when that caller's network namespace was last found to be ours */
    unsigned long pidfd_ns_ok[PIDFD_CACHE];
    unsigned pidfd_next;
    /* Bumped by every call that may move a thread to another network namespace
     * (setns, unshare: the filter traps them; and any call handed to Python). */
    unsigned long ns_epoch;
    /* set by force_same_context: the caller is a task whose pidfd was kept from an
     * earlier call and still answers, so its id was not reused (see force_socket) */
    int caller_known;
    unsigned long io_recv, io_send, io_addfd, io_id_valid;
    uint32_t addfd_flag_send;
};

struct force_resp {
    uint64_t id;
    int64_t val;
    int32_t error;
    uint32_t flags;
};

struct force_addfd {
    uint64_t id;
    uint32_t flags;
    uint32_t srcfd;
    uint32_t newfd;
    uint32_t newfd_flags;
};

/* The numbers after "Name:" on one line of /proc/<tid>/status; -1 if absent. */
static int force_fields(const char *status, const char *name, long *out, int max) {
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

/* A pidfd per recent caller, kept: a pidfd names one task, never a later one that
 * reuses its id, so a stale one fails (ESRCH) and is opened again. */
static int force_caller_pidfd(struct forcer *s, uint32_t tid, int *fresh, int *slot_out) {
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] >= 0 && s->pidfd_tids[i] == tid) {
            *fresh = 0;
            *slot_out = i;
            return s->pidfds[i];
        }
    }
    int fd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (fd < 0)
        return -1;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) { /* pidfd_open sets it; be sure */
        close(fd);
        return -1;
    }
    int slot = s->pidfd_next++ % PIDFD_CACHE;
    if (s->pidfds[slot] >= 0)
        close(s->pidfds[slot]);
    s->pidfds[slot] = fd;
    s->pidfd_tids[slot] = tid;
    s->pidfd_ns_ok[slot] = 0;
    *fresh = 1;
    *slot_out = slot;
    return fd;
}

static void force_forget_pidfd(struct forcer *s, int fd) {
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] == fd) {
            close(fd);
            s->pidfds[i] = -1;
        }
    }
}

static void force_forget_all(struct forcer *s) {
    for (int i = 0; i < PIDFD_CACHE; i++) {
        if (s->pidfds[i] >= 0)
            close(s->pidfds[i]);
        s->pidfds[i] = -1;
    }
}

/* Through pidfs: uids, gids and network namespace (supplementary groups are not
 * there; a socket does not record them). -1 if pidfs cannot say.
 *
 * The credentials are read on every call (one cheap ioctl). The network namespace
 * costs a descriptor opened, stat'ed and closed (about as much as a socket()), so
 * it is read once per caller's pidfd and trusted until a call that may change it:
 * a live task changes its network namespace only by its own setns() or unshare(),
 * which the filter traps (ns_epoch); a new task, or a new one reusing the id, has a
 * new pidfd (the old one fails). */
static int force_same_context_pidfd(struct forcer *s, uint32_t tid) {
    struct pidfd_info_v0 info;
    int pfd, fresh, slot;
    s->caller_known = 0;
    for (;;) {
        pfd = force_caller_pidfd(s, tid, &fresh, &slot);
        if (pfd < 0)
            return -1;
        memset(&info, 0, sizeof info);
        info.mask = PIDFD_INFO_CREDS;
        if (ioctl(pfd, PIDFD_GET_INFO, &info) == 0 && (info.mask & PIDFD_INFO_CREDS))
            break;
        force_forget_pidfd(s, pfd);
        if (fresh)
            return -1;
    }
    if (s->pidfd_ns_ok[slot] != s->ns_epoch + 1) {
        int ns = ioctl(pfd, PIDFD_GET_NET_NAMESPACE, 0);
        if (ns < 0)
            return -1;
        struct stat st;
        int ok = fstat(ns, &st) == 0 && st.st_dev == s->ns_dev && st.st_ino == s->ns_ino;
        close(ns);
        if (!ok)
            return 0;
        s->pidfd_ns_ok[slot] = s->ns_epoch + 1;
    }
    s->caller_known = !fresh;
    return info.ruid == (uint32_t)s->uids[0] && info.euid == (uint32_t)s->uids[1] &&
           info.suid == (uint32_t)s->uids[2] && info.rgid == (uint32_t)s->gids[0] &&
           info.egid == (uint32_t)s->gids[1] && info.sgid == (uint32_t)s->gids[2];
}

/* Does thread `tid` run in our network namespace with our credentials? */
static int force_same_context(struct forcer *s, uint32_t tid) {
    s->caller_known = 0;
    if (s->use_pidfd) {
        int same = force_same_context_pidfd(s, tid);
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
    if (force_fields(status, "\nUid:", ids, 4) < 3 || memcmp(ids, s->uids, sizeof s->uids))
        return 0;
    if (force_fields(status, "\nGid:", ids, 4) < 3 || memcmp(ids, s->gids, sizeof s->gids))
        return 0;
    int ng = force_fields(status, "\nGroups:", groups, MAX_GROUPS);
    if (ng != s->ngroups || memcmp(groups, s->groups, sizeof(long) * ng))
        return 0;
    struct stat st;
    snprintf(path, sizeof path, "/proc/%u/ns/net", tid);
    if (stat(path, &st) < 0 || st.st_dev != s->ns_dev || st.st_ino != s->ns_ino)
        return 0;
    return 1;
}

static int force_send(struct forcer *s, uint64_t id, int64_t val, uint32_t flags) {
    struct force_resp resp = {id, val, 0, flags};
    while (ioctl(s->listener, s->io_send, &resp) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

static int force_valid(struct forcer *s, uint64_t id) {
    uint64_t check = id;
    int r;
    do {
        r = ioctl(s->listener, s->io_id_valid, &check);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* A received socket() call: DONE (answered; the socket's (dev, ino) in *dev, *ino),
 * GONE (caller died or was interrupted), SLOW (untouched). */
static int force_socket(struct forcer *s, uint64_t id, uint32_t tid, const uint64_t *args,
                        unsigned long long *dev, unsigned long long *ino) {
    int family = (int)args[0], type = (int)args[1], proto = (int)args[2];
    if ((family != AF_INET && family != AF_INET6) || (type & 0xf) != SOCK_STREAM ||
        (proto != 0 && proto != IPPROTO_TCP))
        return SLOW;
    if (!force_same_context(s, tid))
        return SLOW;
    /* What was read is the caller's if the id was still its own: confirmed by the
     * notification still pending. A pidfd kept from an earlier call that still
     * answers already says so (a live task keeps its id; one reusing the id after its
     * death has another pidfd), so that check is only made for a new pidfd or /proc. */
    if (!s->caller_known && force_valid(s, id) < 0)
        return errno == ENOENT ? GONE : SLOW;
    int sock = socket(family, type | SOCK_CLOEXEC, IPPROTO_MPTCP);
    if (sock < 0)
        return SLOW; /* Python counts the refusal and lets the call make TCP */
    struct stat st;
    if (fstat(sock, &st) < 0) {
        close(sock);
        return SLOW;
    }
    struct force_addfd add = {id, 0, (uint32_t)sock, 0, (type & SOCK_CLOEXEC) ? O_CLOEXEC : 0};
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
    if (s->killable && force_send(s, id, newfd, 0) < 0) {
        /* ENOENT: killed, its descriptors went with it; else let the call go ahead,
         * as Python does after an unexpected error */
        if (errno != ENOENT)
            force_send(s, id, 0, FORCE_FLAG_CONTINUE);
        return GONE;
    }
    *dev = (unsigned long long)st.st_dev;
    *ino = (unsigned long long)st.st_ino;
    return DONE;
}

/* A NUL-terminated string of `pid`'s memory (execwatch.read_string); 0 or -1. */
static int force_read_string(uint32_t pid, uint64_t address, char *out, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/mem", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t have = 0;
    while (have < size - 1) {
        size_t chunk = 4096 - (size_t)((address + have) % 4096); /* never cross a page */
        if (chunk > size - 1 - have)
            chunk = size - 1 - have;
        ssize_t n = pread(fd, out + have, chunk, (off_t)(address + have));
        if (n <= 0)
            break;
        void *nul = memchr(out + have, '\0', (size_t)n);
        if (nul != NULL) {
            close(fd);
            return 0;
        }
        have += (size_t)n;
    }
    close(fd);
    return -1;
}

/* execve()/execveat(): CONTINUE (DONE) when the file is not setuid, setgid or
 * file-capability, as execwatch.privileged_exec finds (the common case: a stat and a
 * getxattr); SLOW when it may be one, or cannot be read: Python decides and warns. */
static int force_exec(struct forcer *s, uint64_t id, uint32_t pid, int32_t nr,
                      const uint64_t *args) {
    int dirfd = FORCE_AT_FDCWD, flags = 0;
    uint64_t address = args[0];
    if (nr == s->nr_execveat) {
        dirfd = (int)args[0];
        address = args[1];
        flags = (int)args[4];
    }
    char name[4096], path[4096 + 64];
    if (force_read_string(pid, address, name, sizeof name) < 0)
        return SLOW;
    if (name[0] == '\0' && (flags & FORCE_AT_EMPTY_PATH) && dirfd >= 0)
        snprintf(path, sizeof path, "/proc/%u/fd/%d", pid, dirfd);
    else if (name[0] == '/')
        snprintf(path, sizeof path, "%s", name);
    else if (dirfd == FORCE_AT_FDCWD)
        snprintf(path, sizeof path, "/proc/%u/cwd/%s", pid, name);
    else
        snprintf(path, sizeof path, "/proc/%u/fd/%d/%s", pid, dirfd, name);
    struct stat st;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111)) {
        if (st.st_mode & (S_ISUID | S_ISGID))
            return SLOW;
        if (getxattr(path, "security.capability", NULL, 0) >= 0 || errno == ERANGE)
            return SLOW;
    }
    if (force_send(s, id, 0, FORCE_FLAG_CONTINUE) < 0 && errno != ENOENT)
        return SLOW;
    return DONE;
}

/* One received notification: DONE, GONE or SLOW (see above). *forced is set to 1 with
 * the socket's (dev, ino) when a socket was forced. */
static int force_one(struct forcer *s, const unsigned char *buf, int *forced,
                     unsigned long long *dev, unsigned long long *ino) {
    uint64_t id;
    uint32_t tid, arch;
    int32_t nr;
    uint64_t args[6];
    memcpy(&id, buf, 8);
    memcpy(&tid, buf + 8, 4);
    memcpy(&nr, buf + 16, 4);
    memcpy(&arch, buf + 20, 4);
    memcpy(args, buf + 32, sizeof args);
    *forced = 0;
    if (arch == s->audit_arch && nr == s->nr_socket) {
        int r = force_socket(s, id, tid, args, dev, ino);
        *forced = r == DONE;
        return r;
    }
    if (arch == s->audit_arch && nr >= 0 && (nr == s->nr_execve || nr == s->nr_execveat))
        return force_exec(s, id, tid, nr, args);
    /* setns(), unshare() (of any ABI) and whatever Python decides may move a thread
     * to another network namespace: every caller's is read again */
    s->ns_epoch++;
    if (arch == s->audit_arch && nr >= 0 && (nr == s->nr_setns || nr == s->nr_unshare)) {
        if (force_send(s, id, 0, FORCE_FLAG_CONTINUE) < 0 && errno != ENOENT)
            return SLOW;
        return DONE;
    }
    return SLOW;
}

/* After the fields are filled in: the pidfd cache emptied, synchronous wake-ups asked
 * for, and pidfs used only if it describes this very thread as the caller saw it. */
static void force_setup(struct forcer *s, int want_pidfd, int want_sync) {
    for (int i = 0; i < PIDFD_CACHE; i++)
        s->pidfds[i] = -1;
    uint64_t sync = FORCE_SYNC_WAKE_UP;
    s->sync_wakeup = want_sync && ioctl(s->listener, FORCE_NOTIF_SET_FLAGS, sync) == 0;
    s->use_pidfd = want_pidfd && force_same_context_pidfd(s, (uint32_t)syscall(SYS_gettid)) == 1;
    force_forget_all(s); /* our own pidfd is no caller's */
}

#endif
