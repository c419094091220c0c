/* The background seccomp supervisor, compiled: see src/mptcpkit/run/supervise.py.
 *
 * `mptcpkit run` spawns this program (the socketpair to it on descriptor 3); it forks
 * into the background (the caller reaps the first process at once), takes the
 * listener descriptor and answers what the compiled core answers (_force.h: socket()
 * from the supervisor's own namespace and credentials, exec of unprivileged
 * programs), without an interpreter. On the first call it cannot answer, or when the
 * program exits and `--stats` was asked for, it execs the Python supervisor in its
 * own process (python -I -c ... mptcpkit.run.supervise), handing over the listener,
 * the call it received, the program's pidfd, what it forced and the settings: Python
 * then decides, counts and warns, as it does for everything else.
 *
 * The main thread waits in SECCOMP_IOCTL_NOTIF_RECV itself (no poll() per call); a
 * second thread waits for the program's exit, lets go of its standard error and, for
 * --stats, interrupts the main thread (SIGUSR1, no SA_RESTART) so that it hands over
 * between two calls, never with one received and unanswered.
 *
 *   _supervise pid=PID python=EXE root=DIR [stats=text|json] [only=MODE]
 *              [tcponly=SPEC] [context=pidfd|proc]
 */
#define _GNU_SOURCE
#include "_force.h"

#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/types.h>

#if defined(__x86_64__)
#define NATIVE_AUDIT_ARCH 0xC000003EU
#elif defined(__aarch64__)
#define NATIVE_AUDIT_ARCH 0xC00000B7U
#else
#error "seccomp forcing supports x86_64 and aarch64"
#endif

#define FORCED_MEMORY (1 << 16) /* as supervisor.FORCED_MEMORY */
#define SOCK_FD 3

static const char BOOT[] =
    "import sys; sys.path[:0] = sys.argv[1:2]; from mptcpkit.run.supervise import main; "
    "main(sys.argv[2:])";

struct settings {
    const char *python, *root, *stats, *only, *tcponly, *context;
    long pid;
};

static struct forcer F;
static unsigned long long *keys; /* a ring of (dev, ino) of the forced sockets */
static size_t nkeys, capkeys, headkey;
static unsigned long long forced_count;
static int degraded; /* Python could not be started: what it would decide goes ahead */

static void remember(unsigned long long dev, unsigned long long ino) {
    if (nkeys == capkeys && capkeys < FORCED_MEMORY) {
        size_t cap = capkeys ? capkeys * 2 : 256;
        unsigned long long *k = realloc(keys, cap * 2 * sizeof *k);
        if (k != NULL) {
            keys = k;
            capkeys = cap;
        }
    }
    if (capkeys == 0)
        return;
    size_t slot = (headkey + nkeys) % capkeys;
    if (nkeys == capkeys)
        headkey = (headkey + 1) % capkeys; /* the oldest is forgotten */
    else
        nkeys++;
    keys[2 * slot] = dev;
    keys[2 * slot + 1] = ino;
}

/* The forced sockets, oldest first, in a memfd for Python; -1 if there are none. */
static int keys_fd(void) {
    if (nkeys == 0)
        return -1;
    int fd = (int)syscall(SYS_memfd_create, "mptcpkit-forced", 0);
    if (fd < 0)
        return -1;
    for (size_t i = 0; i < nkeys; i++) {
        size_t slot = (headkey + i) % capkeys;
        if (write(fd, &keys[2 * slot], 2 * sizeof *keys) != 2 * sizeof *keys) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

static void warn(const char *message) {
    dprintf(2, "mptcpkit run: warning: %s\n", message);
}

static int inheritable(int fd) {
    return fd < 0 || fcntl(fd, F_SETFD, 0) == 0 ? 0 : -1;
}

/* Exec the Python supervisor with everything it needs. Returns only if that failed. */
static void handover(const struct settings *set, const unsigned char *pending, int pidfd) {
    char a_listener[32], a_killable[16], a_pidfd[32], a_forced[48], a_keys[32];
    char a_stats[32], a_only[32];
    static char a_pending[16 + 2 * 512];
    int kfd = keys_fd();
    snprintf(a_listener, sizeof a_listener, "listener=%d", F.listener);
    snprintf(a_killable, sizeof a_killable, "killable=%d", F.killable);
    snprintf(a_pidfd, sizeof a_pidfd, "pidfd=%d", pidfd);
    snprintf(a_forced, sizeof a_forced, "forced=%llu", forced_count);
    snprintf(a_keys, sizeof a_keys, "keys=%d", kfd);
    snprintf(a_stats, sizeof a_stats, "stats=%s", set->stats);
    snprintf(a_only, sizeof a_only, "only=%s", set->only);
    strcpy(a_pending, "pending=");
    if (pending != NULL) {
        size_t n = F.recv_size < 512 ? F.recv_size : 512;
        for (size_t i = 0; i < n; i++)
            sprintf(a_pending + 8 + 2 * i, "%02x", pending[i]);
    }
    size_t tlen = strlen(set->tcponly) + 16;
    char *a_tcponly = malloc(tlen);
    if (a_tcponly == NULL) {
        degraded = 1; /* the caller answers what Python would have (never left pending) */
        return;
    }
    snprintf(a_tcponly, tlen, "tcponly=%s", set->tcponly);
    char *argv[] = {(char *)set->python, "-I", "-c", (char *)BOOT, (char *)set->root,
                    a_listener, a_killable, a_pidfd, a_forced, a_keys, a_stats, a_only,
                    a_tcponly, a_pending, NULL};
    /* The watcher's SIGUSR1 may come while execve() runs: left pending, exec would turn
     * it into the default action (termination) for Python. Ignored, it is discarded
     * now and later, and Python inherits the ignoring. */
    struct sigaction ign = {0}, usr1;
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGUSR1, &ign, &usr1);
    if (inheritable(F.listener) == 0 && inheritable(pidfd) == 0 && inheritable(kfd) == 0) {
        force_forget_all(&F);
        execv(set->python, argv);
    }
    int err = errno;
    sigaction(SIGUSR1, &usr1, NULL);
    free(a_tcponly);
    if (kfd >= 0)
        close(kfd);
    fcntl(F.listener, F_SETFD, FD_CLOEXEC);
    if (pidfd >= 0)
        fcntl(pidfd, F_SETFD, FD_CLOEXEC);
    char message[512];
    snprintf(message, sizeof message,
             "cannot start the Python supervisor %s (%s): calls other than plain socket() "
             "now go ahead unchanged, and --stats is not printed",
             set->python, strerror(err));
    warn(message);
    degraded = 1;
}

static int setting(struct settings *set, const char *arg) {
    const char *eq = strchr(arg, '=');
    if (eq == NULL)
        return -1;
    size_t k = (size_t)(eq - arg);
    const char *v = eq + 1;
    if (k == 3 && !strncmp(arg, "pid", 3))
        set->pid = strtol(v, NULL, 10);
    else if (k == 6 && !strncmp(arg, "python", 6))
        set->python = v;
    else if (k == 4 && !strncmp(arg, "root", 4))
        set->root = v;
    else if (k == 5 && !strncmp(arg, "stats", 5))
        set->stats = v;
    else if (k == 4 && !strncmp(arg, "only", 4))
        set->only = v;
    else if (k == 7 && !strncmp(arg, "tcponly", 7))
        set->tcponly = v;
    else if (k == 7 && !strncmp(arg, "context", 7))
        set->context = v;
    else
        return -1;
    return 0;
}

/* Take the listener from `mptcpkit run` (our pid was told by our first process). */
static int receive_listener(int *killable) {
    char byte = 0;
    struct iovec iov = {&byte, 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t n;
    do {
        n = recvmsg(SOCK_FD, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (n <= 0 || c == NULL || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    *killable = byte == 'K';
    close(SOCK_FD);
    return fd;
}

/* The program's descriptors (socket activation's, a pipe the caller reads) are not
 * ours to hold: a reader would wait for its end as long as the supervisor lives. */
static void close_inherited(void) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, SOCK_FD + 1, ~0U, 0) == 0)
        return;
#endif
    int top = (int)sysconf(_SC_OPEN_MAX);
    for (int fd = SOCK_FD + 1; fd < (top > 0 ? top : 1024); fd++)
        close(fd);
}

static int own_context(struct forcer *f) {
    uid_t r, e, s;
    gid_t rg, eg, sg;
    if (getresuid(&r, &e, &s) < 0 || getresgid(&rg, &eg, &sg) < 0)
        return -1;
    f->uids[0] = r, f->uids[1] = e, f->uids[2] = s;
    f->gids[0] = rg, f->gids[1] = eg, f->gids[2] = sg;
    gid_t groups[MAX_GROUPS];
    int ng = getgroups(MAX_GROUPS, groups);
    if (ng < 0)
        return -1;
    for (int i = 0; i < ng; i++)
        f->groups[i] = groups[i];
    f->ngroups = ng;
    struct stat st;
    if (stat("/proc/thread-self/ns/net", &st) < 0)
        return -1;
    f->ns_dev = st.st_dev;
    f->ns_ino = st.st_ino;
    struct seccomp_notif_sizes sizes;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0)
        return -1;
    f->recv_size = sizes.seccomp_notif > 80 ? sizes.seccomp_notif : 80;
    return 0;
}

/* The program's exit: 0 alive, 1 exited and the main thread must hand over for
 * --stats, 2 exited and nothing more to do. */
static atomic_int program_state;
static atomic_int handed; /* the main thread saw state 1 */
static int watch_pidfd = -1, watch_devnull = -1, watch_stats;
static pthread_t main_thread;

static void on_usr1(int sig) { (void)sig; }

static void *watch_program(void *unused) {
    (void)unused;
    struct pollfd p = {watch_pidfd, POLLIN, 0};
    while (poll(&p, 1, -1) < 0 && errno == EINTR)
        ;
    if (!watch_stats) {
        /* keep serving what the program left behind, without holding its stderr */
        dup2(watch_devnull, 2);
        atomic_store(&program_state, 2);
        return NULL;
    }
    atomic_store(&program_state, 1);
    while (!atomic_load(&handed)) { /* until the main thread has seen it */
        pthread_kill(main_thread, SIGUSR1);
        usleep(2000);
    }
    return NULL;
}

static int start_watch(int pidfd, int devnull, int stats) {
    watch_pidfd = pidfd;
    watch_devnull = devnull;
    watch_stats = stats;
    main_thread = pthread_self();
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1; /* no SA_RESTART: the receive returns EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) < 0)
        return -1;
    pthread_attr_t attr;
    pthread_t thread;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int r = pthread_create(&thread, &attr, watch_program, NULL);
    pthread_attr_destroy(&attr);
    return r == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    struct settings set = {NULL, NULL, "", "", "", "pidfd", 0};
    for (int i = 1; i < argc; i++) {
        if (setting(&set, argv[i]) < 0) {
            dprintf(2, "mptcpkit run: _supervise: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (set.pid <= 0 || set.python == NULL || set.root == NULL) {
        dprintf(2, "mptcpkit run: _supervise: pid=, python= and root= are needed\n");
        return 2;
    }
    pid_t child = fork();
    if (child < 0)
        return 1;
    if (child > 0) {
        /* the caller reaps us: the supervisor is nobody's child it waits for; it
         * needs the supervisor's pid (PR_SET_PTRACER), not to wait for it to run */
        char pid[32];
        int len = snprintf(pid, sizeof pid, "%d", (int)child);
        _exit(write(SOCK_FD, pid, (size_t)len) == len ? 0 : 1);
    }
    /* its own process group, not its own session: see launch.py (_supervise) */
    setpgid(0, 0);
    close_inherited();
    prctl(PR_SET_NAME, "mptcpkit-run", 0, 0, 0);
    /* systemd's stop signals every process of the unit: the supervisor must outlive
     * the program's shutdown, it leaves when the program does (launch.py) */
    int ignored[] = {SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTSTP, SIGTTIN, SIGTTOU, SIGPIPE};
    for (size_t i = 0; i < sizeof ignored / sizeof *ignored; i++)
        signal(ignored[i], SIG_IGN);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0)
        _exit(1);
    dup2(devnull, 0);
    dup2(devnull, 1);
    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)set.pid, 0);
    int killable = 0;
    F.listener = receive_listener(&killable);
    if (F.listener < 0)
        _exit(0); /* the filter could not be installed: nothing to serve */
    F.killable = killable;
    F.audit_arch = NATIVE_AUDIT_ARCH;
    F.nr_socket = SYS_socket;
    F.nr_execve = SYS_execve;
    F.nr_execveat = SYS_execveat;
    F.nr_setns = SYS_setns;
    F.nr_unshare = SYS_unshare;
    F.io_recv = SECCOMP_IOCTL_NOTIF_RECV;
    F.io_send = SECCOMP_IOCTL_NOTIF_SEND;
    F.io_addfd = SECCOMP_IOCTL_NOTIF_ADDFD;
    F.io_id_valid = SECCOMP_IOCTL_NOTIF_ID_VALID;
    F.addfd_flag_send = SECCOMP_ADDFD_FLAG_SEND;
    int wants_stats = set.stats[0] != '\0';
    if (own_context(&F) < 0 || pidfd < 0 || start_watch(pidfd, devnull, wants_stats) < 0)
        handover(&set, NULL, pidfd); /* Python reads them its own way */
    force_setup(&F, strcmp(set.context, "proc") != 0, 1);
    if (F.recv_size < 80) /* own_context failed before reading it, and Python did not start */
        _exit(1);
    unsigned char *buf = malloc(F.recv_size);
    if (buf == NULL)
        _exit(1);
    for (;;) {
        if (atomic_load(&program_state) == 1 && !atomic_load(&handed)) {
            atomic_store(&handed, 1);
            if (!degraded)
                handover(&set, NULL, pidfd); /* Python prints the report */
            dup2(devnull, 2);
        }
        memset(buf, 0, F.recv_size);
        if (ioctl(F.listener, F.io_recv, buf) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            if (errno != ENOENT)
                _exit(1);
            /* the caller died before we took its call, or no task uses the filter */
            struct pollfd p = {F.listener, POLLIN, 0};
            if (poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR)) &&
                !(p.revents & POLLIN)) {
                if (wants_stats && !degraded && atomic_load(&program_state) != 2 &&
                    !atomic_load(&handed)) {
                    atomic_store(&handed, 1);
                    handover(&set, NULL, pidfd); /* its exit is the last thing to report */
                }
                _exit(0);
            }
            continue;
        }
        int forced;
        unsigned long long dev, ino;
        int r = force_one(&F, buf, &forced, &dev, &ino);
        if (forced) {
            forced_count++;
            remember(dev, ino);
        }
        if (r == SLOW && !degraded)
            handover(&set, buf, pidfd);
        if (r == SLOW && degraded) {
            uint64_t id;
            memcpy(&id, buf, 8);
            force_send(&F, id, 0, FORCE_FLAG_CONTINUE);
        }
    }
}
