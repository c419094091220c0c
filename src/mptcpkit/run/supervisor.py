"""The seccomp supervisor: answers a forced program's trapped calls.

For each trapped socket() it makes the socket itself, MPTCP first, in the calling
thread's network namespace and with its credentials, and injects it as socket()'s
return value (SECCOMP_IOCTL_NOTIF_ADDFD; nothing is injected into a program that
died or whose call was interrupted meanwhile). When
MPTCP cannot be made, the call proceeds in the kernel and the program gets plain
TCP. For a TCP-only option, or `--only`, it swaps a forced socket that is not yet
connected for plain TCP (SECCOMP_ADDFD_FLAG_SETFD) and lets the call proceed.

Every piece of information read from /proc is confirmed afterwards with
SECCOMP_IOCTL_NOTIF_ID_VALID, so a recycled thread id cannot redirect a socket.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import fcntl
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TextIO

from mptcpkit.abi.constants import IPPROTO_MPTCP
from mptcpkit.run import abi, binary, execwatch, fastpath, swap, syscalls
from mptcpkit.run.bpf import Only
from mptcpkit.run.bpf import filter_program as filter_program  # (moved to bpf.py)
from mptcpkit.run.bpf import filter_spec as filter_spec
from mptcpkit.run.context import Context, ContextError, TaskContext, read_task
from mptcpkit.run.options import tcp_only_options
from mptcpkit.run.procfd import epoll_watches, fd_cloexec, pidfd_of_thread, process_fds
from mptcpkit.run.stats import Stats
from mptcpkit.status import State, status

SOCK_CLOEXEC = socket.SOCK_CLOEXEC
SOCK_NONBLOCK = socket.SOCK_NONBLOCK
FORCED_MEMORY = 1 << 16  # forced sockets remembered for a later swap (oldest forgotten)
MAX_CONTEXTS = 32  # worker threads kept for other namespaces / credentials


class Swap(enum.Enum):
    """What became of a socket the program needs as plain TCP."""

    DONE = "swapped"
    NOT_MPTCP = "not an MPTCP socket (or not one of ours)"
    TOO_LATE = "already connected, accepted or with connections waiting"
    FAILED = "gone, or not reachable"


class _Gone(Exception):
    """The notification is no longer valid: the thread died or its call was interrupted."""


class Supervisor:
    """Serves one seccomp listener. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        listener: int,
        arch: abi.Arch,
        *,
        only: Only | None = None,
        tcp_only: Mapping[tuple[int, int], str] | None = None,
        stats: Stats | None = None,
        warn: TextIO | None = sys.stderr,
        killable: bool = False,
    ) -> None:
        self.listener = listener
        # Received calls wait killable: a socket can be installed first and the call
        # answered after our copy is closed, so the program's close() is the last one.
        self.killable = killable
        self.arch = arch
        self.only = only
        self.tcp_only = dict(tcp_only_options() if tcp_only is None else tcp_only)
        self.stats = stats or Stats()
        self._warn_to = warn
        self._warned: set[str] = set()
        sizes = syscalls.notif_sizes(arch)
        self._recv_size = max(abi.NOTIF_SIZE, sizes[0])
        self._own = read_task(threading.get_native_id())
        self._contexts: collections.OrderedDict[tuple[object, ...], Context] = (
            collections.OrderedDict()
        )
        self._forced: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        # The common socket() calls answered in C (run/fastpath.py), the rest here.
        self._fast = fastpath.open_fastpath(
            listener,
            arch,
            recv_size=self._recv_size,
            netns=self._own.netns,
            uids=self._own.uids,
            gids=self._own.gids,
            groups=self._own.groups,
            killable=killable,
        )

    # -- the loop ----------------------------------------------------------------

    def fileno(self) -> int:
        return self.listener

    def handle_one(self) -> bool:
        """Receive and answer one notification (with the compiled path: every pending
        one it can answer, up to one it cannot); False if there was none to receive."""
        if self._fast is not None:
            _kind, payload, forced = self._fast.serve()
            for key in forced:
                self.remember(key)
            self.stats.forced += len(forced)
            if isinstance(payload, int):  # the receive failed
                if payload in (errno.ENOENT, errno.EAGAIN):
                    return bool(forced)
                raise OSError(payload, os.strerror(payload))
            if payload is None:
                return True
            buf = payload
        else:
            try:
                _, buf = syscalls.ioctl(
                    self.listener, abi.SECCOMP_IOCTL_NOTIF_RECV, b"", self._recv_size
                )
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EAGAIN):
                    return False  # the thread died between poll and receive
                raise
        self.answer(buf)
        return True

    def answer(self, buf: bytes) -> None:
        """Answer one received notification (a `struct seccomp_notif`)."""
        notif = abi.decode_notif(buf)
        try:
            self.handle(notif)
        except _Gone:
            pass
        except Exception as exc:  # never leave the program hanging on a call
            self.warn(
                f"error-{type(exc).__name__}",
                f"supervisor error ({exc}); the call went ahead unforced",
            )
            self.stats.left_alone += 1
            self.stats.reasons["supervisor error"] += 1
            with contextlib.suppress(OSError):
                self._continue(notif)

    def mute(self) -> None:
        """Stop printing warnings (they are still counted)."""
        self._warn_to = None

    def close(self) -> None:
        for ctx in self._contexts.values():
            ctx.close()
        self._contexts.clear()
        os.close(self.listener)

    # -- dispatch ----------------------------------------------------------------

    def handle(self, n: abi.Notification) -> None:
        nr = n.nr
        if n.arch != self.arch.audit_arch:
            if self.arch.compat is not None and n.nr in self.arch.compat[1:]:
                self.warn(
                    "compat",
                    f"a 32-bit program (audit arch {n.arch:#x}) is running: its sockets are "
                    "not forced",
                )
            self._continue(n)  # (and its setns()/unshare(), reported to the compiled path)
        elif nr == self.arch.socket:
            self._on_socket(n)
        elif nr == self.arch.setsockopt:
            self._on_setsockopt(n)
        elif nr == self.arch.connect:
            self._on_use(n, Only.LISTEN, "--only listen")
        elif nr == self.arch.listen:
            self._on_use(n, Only.CONNECT, "--only connect")
        elif nr == self.arch.io_uring_setup:
            self.warn(
                "io_uring",
                "the program uses io_uring: sockets it makes through io_uring are not forced",
            )
            self._continue(n)
        elif nr in (self.arch.execve, self.arch.execveat):
            self._on_exec(n)
        elif nr == self.arch.seccomp:
            self.warn(
                "seccomp",
                "the program installs its own seccomp listener, which the kernel refuses "
                "under mptcpkit run (EBUSY)",
            )
            self._continue(n)
        else:
            self._continue(n)

    def _on_exec(self, n: abi.Notification) -> None:
        """A setuid/file-capability program exec'd under forcing starts unprivileged."""
        try:
            found = execwatch.privileged_exec(n, self.arch)
            if found is not None:
                shown, path = found
                ctx = read_task(n.pid)
                why = binary.privilege(path, euid=ctx.uids[1], egid=ctx.gids[1], groups=ctx.groups)
                self._check_valid(n)  # the memory and /proc reads were the caller's
                if why is not None:
                    self.warn(
                        f"exec-{shown}",
                        f"{shown} is {why}: under forcing (no_new_privs) it runs without its "
                        "privileges and may fail; run it outside mptcpkit run",
                    )
        except (ProcessLookupError, _Gone):
            pass
        self._continue(n)

    def warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        self.stats.warnings.append(message)
        if self._warn_to is not None:
            print(f"mptcpkit run: warning: {message}", file=self._warn_to, flush=True)

    # -- socket() ----------------------------------------------------------------

    def _on_socket(self, n: abi.Notification) -> None:
        family, type_, _proto = (abi.signed32(a) for a in n.args[:3])
        try:
            ctx = read_task(n.pid)
        except ProcessLookupError:
            self._check_valid(n)  # gone, or /proc hides it (hidepid): then let it be
            self._leave(n, "cannot read the program's /proc entry")
            return
        make = self._maker(n, ctx)
        try:
            sock = make(family, (type_ | SOCK_CLOEXEC), IPPROTO_MPTCP)
        except ContextError as exc:
            self._leave(n, f"cannot enter the program's namespace or credentials ({exc.strerror})")
            return
        except OSError as exc:
            self.stats.fell_back += 1
            self.stats.reasons[
                f"MPTCP refused: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
            ] += 1
            self._continue(n)
            return
        try:
            st = os.fstat(sock.fileno())
            flags = os.O_CLOEXEC if type_ & SOCK_CLOEXEC else 0
            if self.killable:
                newfd = self._addfd(n, sock.fileno(), 0, 0, flags)
            else:  # atomic, but our copy may outlive the program's for a moment
                self._addfd(n, sock.fileno(), abi.SECCOMP_ADDFD_FLAG_SEND, 0, flags)
        except OSError as exc:  # EMFILE and the like: the kernel's own call reports it
            self._leave(n, f"could not install the socket: {errno.errorcode.get(exc.errno or 0)}")
            return
        finally:
            sock.close()
        if self.killable:
            self._send(n, newfd)
        self.stats.forced += 1
        self.remember((st.st_dev, st.st_ino))

    def _maker(
        self, n: abi.Notification, ctx: TaskContext
    ) -> Callable[[int, int, int], socket.socket]:
        """socket() in the thread's namespace with its credentials (checked still valid)."""
        other_ns = ctx.netns != self._own.netns
        other_creds = (ctx.uids, ctx.gids, ctx.groups) != (
            self._own.uids,
            self._own.gids,
            self._own.groups,
        )
        if not other_ns and not other_creds:
            self._check_valid(n)
            return socket.socket
        key = (ctx.netns if other_ns else None, ctx.uids, ctx.gids, ctx.groups)
        worker = self._contexts.get(key)
        if worker is None:
            ns_fd = None
            if other_ns:
                try:
                    ns_fd = os.open(f"/proc/{n.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    self._check_valid(n)
                    raise  # still waiting, yet unreadable: the handler lets it go ahead
                try:
                    self._check_valid(n)  # the tid was still the caller's: ns_fd is its
                    if os.fstat(ns_fd).st_ino != ctx.netns[1]:
                        # a thread blocked in socket() cannot have moved; never hang it
                        raise OSError(errno.ESTALE, "network namespace changed while read")
                except BaseException:
                    os.close(ns_fd)
                    raise
            worker = Context(self.arch, ns_fd, ctx, other_creds)
            self._contexts[key] = worker
            while len(self._contexts) > MAX_CONTEXTS:
                self._contexts.popitem(last=False)[1].close()
        else:
            self._contexts.move_to_end(key)
        self._check_valid(n)

        def make(f: int, t: int, p: int) -> socket.socket:
            # a worker that could not enter stays cached: it fails at once next time
            return worker.call(lambda: socket.socket(f, t, p))

        return make

    # -- swaps: setsockopt() of a TCP-only option, connect()/listen() with --only --

    def _on_setsockopt(self, n: abi.Notification) -> None:
        """A TCP-only option: make the socket plain TCP if it is MPTCP and can still change,
        whoever made it (the program may ask for MPTCP itself, as Go 1.24+ listeners do)."""
        level, opt = abi.signed32(n.args[1]), abi.signed32(n.args[2])
        name = self.tcp_only.get((level, opt))
        if name is None:
            self._continue(n)
            return
        outcome = self._swap(n, abi.signed32(n.args[0]), level=level)
        if outcome is Swap.DONE:
            self.stats.reasons[f"swapped to TCP for {name}"] += 1
        elif outcome is Swap.TOO_LATE:
            self.stats.lost[name] += 1
            self.warn(
                f"lost-{name}",
                f"{name} cannot be set on an MPTCP socket that is already connected or "
                "accepted: the program's setting is lost on such sockets (counted in --stats)",
            )
        self._continue(n)

    def _on_use(self, n: abi.Notification, swap_when: Only, reason: str) -> None:
        """connect() under `--only listen`, listen() under `--only connect`: plain TCP."""
        if self.only is not swap_when or not self._forced:
            self._continue(n)
            return
        if self._swap(n, abi.signed32(n.args[0]), forced_only=True) is Swap.DONE:
            self.stats.reasons[reason] += 1
        self._continue(n)

    def _swap(
        self, n: abi.Notification, fd: int, *, forced_only: bool = False, level: int = -1
    ) -> Swap:
        """Replace the program's MPTCP socket `fd` by plain TCP while it can still change."""
        try:
            ctx = read_task(n.pid)
            pidfd = pidfd_of_thread(n.pid, ctx.tgid)
        except (ProcessLookupError, FileNotFoundError):
            self._check_valid(n)  # gone, or hidden from us: leave the socket as it is
            return Swap.FAILED
        try:
            self._check_valid(n)
            try:
                old_fd = syscalls.pidfd_getfd(pidfd, fd)
            except OSError:
                return Swap.FAILED
            with socket.socket(fileno=old_fd) as old:
                return self._replace(n, ctx, pidfd, fd, old, forced_only, level)
        finally:
            os.close(pidfd)

    def _replace(
        self,
        n: abi.Notification,
        ctx: TaskContext,
        pidfd: int,
        fd: int,
        old: socket.socket,
        forced_only: bool,
        level: int,
    ) -> Swap:
        st = os.fstat(old.fileno())
        key = (st.st_dev, st.st_ino)
        if (forced_only and key not in self._forced) or old.proto != IPPROTO_MPTCP:
            return Swap.NOT_MPTCP
        how = swap.plan(old)
        if how is None:
            if level != socket.SOL_SOCKET and status(old).state is State.FALLBACK:
                return Swap.NOT_MPTCP  # the kernel passes it to the TCP subflow
            return Swap.TOO_LATE
        make = self._maker(n, ctx)
        nonblock = fcntl.fcntl(old.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        with make(
            old.family,
            socket.SOCK_STREAM | SOCK_CLOEXEC | (SOCK_NONBLOCK if nonblock else 0),
            socket.IPPROTO_TCP,
        ) as new:
            try:
                with make(old.family, socket.SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_MPTCP) as ref:
                    swap.carry_options(old, ref, new)
            except OSError as exc:
                self.warn("carry", f"could not carry an option to plain TCP: {exc.strerror}")
                return Swap.FAILED
            # Every descriptor of this socket in the calling process (dup, Go's File())
            # gets the plain TCP socket, and every epoll set watching one of them (Go's
            # netpoller, libuv, asyncio) watches the new socket the same way.
            fds = process_fds(n.pid, st.st_ino, fd)
            for target in fds:
                self._addfd(
                    n,
                    new.fileno(),
                    abi.SECCOMP_ADDFD_FLAG_SETFD,
                    target,
                    fd_cloexec(n.pid, target),
                )
            self._rewatch(pidfd, n.pid, fds, st.st_ino, new.fileno())
            # The program's descriptor now holds the plain TCP socket. The MPTCP one
            # is only released when the program's call returns (the kernel closes
            # it in the program's context), so it must let go of its port first.
            if key in self._forced:
                self._forced.pop(key)
                self.stats.swapped += 1
            else:
                self.stats.repaired += 1  # an MPTCP socket the program asked for itself
            try:
                swap.rebind(old, new, how)
            except OSError as exc:
                self.warn(
                    f"bind-{how.address}",
                    f"could not re-bind the socket made plain TCP to {how.address}: "
                    f"{exc.strerror} (is the descriptor shared with another process?)",
                )
        return Swap.DONE

    def _rewatch(self, pidfd: int, pid: int, fds: list[int], ino: int, new_fd: int) -> None:
        """Add `new_fd` to each epoll set of `pid` that watched the old socket."""
        held: list[int] = []  # epoll keys a watch by (file, fd number): one number per watch
        try:
            for epfd, events, data in epoll_watches(pid, set(fds), ino):
                try:
                    ours = syscalls.pidfd_getfd(pidfd, epfd)
                except OSError:
                    continue
                held.append(ours)
                held.append(os.dup(new_fd))
                try:
                    syscalls.epoll_ctl(ours, syscalls.EPOLL_CTL_ADD, held[-1], events, data)
                except OSError as exc:
                    self.warn("epoll", f"could not watch the plain TCP socket: {exc.strerror}")
        finally:
            for fd in held:
                os.close(fd)

    # -- kernel calls ------------------------------------------------------------

    def remember(self, key: tuple[int, int]) -> None:
        self._forced[key] = None
        if len(self._forced) > FORCED_MEMORY:
            self._forced.popitem(last=False)

    def _leave(self, n: abi.Notification, reason: str) -> None:
        self.stats.left_alone += 1
        self.stats.reasons[reason] += 1
        self._continue(n)

    def _check_valid(self, n: abi.Notification) -> None:
        try:
            syscalls.ioctl(
                self.listener, abi.SECCOMP_IOCTL_NOTIF_ID_VALID, n.id.to_bytes(8, "little")
            )
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise _Gone from None
            raise

    def _send(self, n: abi.Notification, val: int) -> None:
        try:
            syscalls.ioctl(self.listener, abi.SECCOMP_IOCTL_NOTIF_SEND, abi.encode_resp(n.id, val))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise _Gone from None  # killed: its descriptors went with it
            raise

    def _continue(self, n: abi.Notification) -> None:
        resp = abi.encode_resp(n.id, flags=abi.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        try:
            syscalls.ioctl(self.listener, abi.SECCOMP_IOCTL_NOTIF_SEND, resp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _addfd(
        self, n: abi.Notification, srcfd: int, flags: int, newfd: int, newfd_flags: int
    ) -> int:
        req = abi.encode_addfd(n.id, srcfd, flags=flags, newfd=newfd, newfd_flags=newfd_flags)
        try:
            ret, _ = syscalls.ioctl(self.listener, abi.SECCOMP_IOCTL_NOTIF_ADDFD, req)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise _Gone from None
            raise
        return ret
