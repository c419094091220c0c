"""Hand a listening port from one socket to another without dropping a connection.

Closing a listener resets every connection in its accept queue and every handshake
still in flight, and re-binding after the close can find the port taken. So the new
listener is bound and listening *before* the old one goes, both in one SO_REUSEPORT
group, in this order (each step checked on Linux 6.18, tests/test_downgrade.py):

1. the new socket drops every packet (a socket filter): a SYN sent to it is lost and
   the client sends it again a second later, so nothing can queue there yet;
2. it binds and listens beside the old one (SO_REUSEPORT on both, for the moment);
3. a reuseport program sends every new SYN to the new socket, so the old one gets no
   more handshakes;
4. the old one's accept queue and its half-open handshakes are waited for (the
   program's own accept() drains them); if they do not drain, everything is undone
   (the old listener never stopped listening) and the caller is told why;
5. the filter goes, the new socket takes the old one's descriptor (dup2), which closes
   the old one, empty; only then does the program go.

`divert` is the same first steps for listeners that are going away for good (a proxy
that stops): every new SYN goes to sockets that drop it, while the listeners are
emptied and closed; nothing takes their place.

A thread blocked in accept() on the old listener would keep waiting on the old socket
after the swap; then the handover is refused before anything changes. An event loop
that watches the old listener (epoll: asyncio, uvloop) is made to watch the new one,
with the same events.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import socket
import struct
import time

from mptcpkit.abi import constants as c

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27
SO_ATTACH_REUSEPORT_CBPF, SO_DETACH_REUSEPORT_BPF = 51, 68
# Options a handover cannot carry: it uses the socket filter and reuseport program.
FILTER_OPTIONS = frozenset(
    (c.SOL_SOCKET, n) for n in (SO_ATTACH_FILTER, SO_DETACH_FILTER, 44, 50, 51, 52, 68)
)
_DRAIN_SECONDS = 0.25  # how long the old listener's queue may take to empty
_ACCEPT_SYSCALLS = {"x86_64": (43, 288), "aarch64": (202, 242)}.get(os.uname().machine, ())


class HandoverRefused(Exception):
    """The handover did not start, or was undone; the old listener is as it was."""


def _program(ret: int) -> tuple[object, bytes]:
    """A one-instruction classic BPF program `ret #ret`, as a struct sock_fprog (and the
    buffer its pointer refers to, which must outlive the setsockopt)."""
    import ctypes  # here: importing ctypes costs every `import mptcpkit` ~5 ms

    insn = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, ret), 8)
    return insn, struct.pack("=HxxxxxxQ", 1, ctypes.addressof(insn))


def _waiting_threads(fd: int) -> bool:
    """Is another thread of this process blocked in accept() on `fd`?"""
    if not _ACCEPT_SYSCALLS:
        return False
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if (
            len(fields) > 1
            and fields[0].isdigit()
            and int(fields[0]) in _ACCEPT_SYSCALLS
            and int(fields[1], 16) == fd
        ):
            return True
    return False


def epoll_registrations(fd: int) -> list[tuple[int, int]]:
    """(epoll descriptor, event mask) of each epoll instance of this process that
    watches `fd` (an event loop), read from /proc/self/fdinfo."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                lines = [line.split() for line in f if line.startswith("tfd:")]
        except OSError:
            continue
        for words in lines:  # tfd: N events: HEX data: HEX pos: ...
            if int(words[1]) != fd:
                continue
            if int(words[5], 16) & 0xFFFFFFFF != fd:  # epoll_data.fd: the union's low half
                raise HandoverRefused(
                    "an event loop watches it with data other than its descriptor, and "
                    "could not be told about the new socket; set the option before serving"
                )
            found.append((int(name), int(words[3], 16)))
    return found


def reregister(fd: int, registrations: list[tuple[int, int]]) -> None:
    """Watch the socket now behind `fd` in the same epoll instances, with the same
    events (the old socket's registrations went with it)."""
    import select

    for epfd, events in registrations:
        watcher = select.epoll.fromfd(os.dup(epfd))
        try:
            watcher.register(fd, events)
        except FileExistsError:
            watcher.modify(fd, events)
        finally:
            watcher.close()


def _half_open(family: int, port: int) -> int:
    """Handshakes in flight (SYN_RECV) to local `port`, from the kernel's sock_diag."""
    return sum(sport == port for sport in _syn_recv_ports(family))


def handshakes_in_flight(ports: Collection[int], netns_fd: int | None = None) -> int:
    """Handshakes in flight (SYN_RECV, IPv4 and IPv6) to any of local `ports`, in this
    network namespace or the one open at `netns_fd`; OSError when sock_diag cannot
    tell."""
    return sum(
        sport in ports
        for family in (socket.AF_INET, socket.AF_INET6)
        for sport in _syn_recv_ports(family, netns_fd)
    )


def ports_by_namespace(listeners: Sequence[socket.socket]) -> list[tuple[int | None, set[int]]]:
    """The ports of `listeners` per network namespace they live in (a proxy bind's
    `namespace`): (a descriptor of it, None for this thread's own; the caller closes
    it), their ports. For `handshakes_in_flight`, which must look where they are."""
    own = os.stat("/proc/thread-self/ns/net")
    groups: dict[tuple[int, int], tuple[int | None, set[int]]] = {}
    try:
        for ls in listeners:
            try:
                fd: int | None = fcntl.ioctl(ls.fileno(), c.SIOCGSKNS)
            except OSError:  # EPERM without CAP_NET_ADMIN (a worker that dropped root)
                fd = None  # cannot tell: looked for here, as before
            if fd is None:
                groups.setdefault((own.st_dev, own.st_ino), (None, set()))[1].add(
                    ls.getsockname()[1]
                )
                continue
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in groups or key == (own.st_dev, own.st_ino):
                os.close(fd)
                fd = None
            groups.setdefault(key, (fd, set()))[1].add(ls.getsockname()[1])
    except BaseException:
        for ns, _ in groups.values():
            if ns is not None:
                os.close(ns)
        raise
    return list(groups.values())


def _diag_socket(netns_fd: int | None) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket; made in namespace `netns_fd` (this thread comes back)."""
    if netns_fd is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)
    from mptcpkit import netns

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns(netns_fd)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)
        finally:
            netns.setns(home)
    finally:
        os.close(home)


def _syn_recv_ports(family: int, netns_fd: int | None = None) -> list[int]:
    """The local port of each handshake in flight (SYN_RECV) of `family` (sock_diag)."""
    states = 1 << 3 | 1 << 12  # TCP_SYN_RECV, TCP_NEW_SYN_RECV
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, states) + bytes(48)
    msg = struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req  # DUMP|REQUEST
    found: list[int] = []
    with _diag_socket(netns_fd) as nl:
        nl.settimeout(1.0)
        nl.sendto(msg, (0, 0))
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == 3:  # NLMSG_DONE
                    return found
                if kind == 2:  # NLMSG_ERROR
                    raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "sock_diag")
                found.append(struct.unpack_from("!H", data, offset + 16 + 4)[0])
                offset += (length + 3) & ~3
            if not data:
                return found


# Options of a listener that its reuseport group's members must share, or that its
# address needs to be bound at all: copied to the sockets `divert` adds to the group.
_GROUP_OPTIONS = (
    (c.SOL_IPV6, 26),  # IPV6_V6ONLY
    (c.SOL_IP, 15),  # IP_FREEBIND
    (c.SOL_IP, 19),  # IP_TRANSPARENT
    (c.SOL_IPV6, 75),  # IPV6_TRANSPARENT
)


def divert(members: Sequence[socket.socket]) -> list[socket.socket]:
    """Send the new SYNs for `members` (every listener of one SO_REUSEPORT group) to
    sockets that drop them, so that the members can be drained and closed without
    resetting a connection: a dropped SYN is sent again a second later and meets
    whatever listens then (the next process, or a refusal).

    len(members) + 1 plain TCP sockets join the group, each with a socket filter that
    drops every packet (MPTCP listeners take no filter; a TCP socket shares their
    group), and a reuseport program sends every SYN to index len(members): the first
    of them. Closing a member moves the group's last socket into its slot, so with one
    more dropper than members that index stays a dropper whatever order the members
    close in. Returns the droppers, to close once the members are closed; on failure
    nothing was changed (OSError, the droppers made so far closed)."""
    first = members[0]
    family = first.family
    address = first.getsockname()
    drop, drop_prog = _program(0)
    pick, pick_prog = _program(len(members))
    carried: list[tuple[int, int, int | bytes]] = []
    if first.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0"):
        dev = first.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
        carried.append((socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.rstrip(b"\0")))
    for level, opt in _GROUP_OPTIONS:
        if (level == c.SOL_IPV6) != (family == socket.AF_INET6):
            continue
        try:
            value = first.getsockopt(level, opt)
        except OSError:
            continue
        if value:
            carried.append((level, opt, value))
    droppers: list[socket.socket] = []
    try:
        for _ in range(len(members) + 1):
            s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            droppers.append(s)
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, drop_prog)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for level, opt, setting in carried:
                s.setsockopt(level, opt, setting)
            s.bind(address)
            s.listen(1)
        droppers[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, pick_prog)
    except BaseException:
        for s in droppers:
            s.close()
        raise
    del drop, pick
    return droppers


def undivert(droppers: Sequence[socket.socket]) -> None:
    """Close what `divert` made, its program first: a group that lives on (another
    process's listeners joined it) must not keep sending every SYN to one index."""
    for s in droppers:
        # ENOENT: this group's program went with an earlier dropper
        try:  # noqa: SIM105 (contextlib is not imported by `import mptcpkit`)
            s.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        except OSError:
            pass
        s.close()


def check_can_hand_over(old: socket.socket) -> list[tuple[int, int]]:
    """Refuse early (nothing changed yet) what a handover cannot do safely; return the
    event loops' registrations of the old listener, to be repeated for the new one."""
    fd = old.fileno()
    if old.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        raise HandoverRefused(
            "it shares its port with other sockets through SO_REUSEPORT, and a new "
            "socket cannot take its place in that group without its connections"
        )
    if _waiting_threads(fd):
        raise HandoverRefused(
            "a thread is waiting in accept() on it and would keep waiting on the old "
            "socket; set the option before serving"
        )
    return epoll_registrations(fd)


def hand_over(
    old: socket.socket, new: _socket.socket, address: tuple[object, ...], backlog: int
) -> list[tuple[int, int]]:
    """Make `new` listen on `old`'s address with `backlog`, old's queue drained and
    old no longer receiving, ready for dup2 onto old's descriptor; HandoverRefused
    (with `new` closed by the caller and `old` untouched) when that cannot be done.
    Returns the event loops' registrations of `old`, for `finish_handover`."""
    registrations = check_can_hand_over(old)
    drop, drop_prog = _program(0)
    pick_new, pick_new_prog = _program(1)  # the group is [old, new]: old made it first
    old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        new.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, drop_prog)
        try:
            new.bind(address)
            new.listen(backlog)
        except OSError as exc:
            raise HandoverRefused(
                f"a TCP socket could not listen beside it on {address}: {exc.strerror}"
            ) from exc
        new.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, pick_new_prog)
        _drain(old, address)
        new.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except BaseException:
        old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        raise
    del drop, pick_new
    return registrations


def finish_handover(sock: socket.socket, registrations: list[tuple[int, int]]) -> None:
    """After dup2 (the old listener is gone): drop the program and SO_REUSEPORT, which
    the old listener did not have, and have the event loops watch the new socket."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    reregister(sock.fileno(), registrations)


def _drain(old: socket.socket, address: tuple[object, ...]) -> None:
    """Wait until the old listener holds nothing: no queued connection, no handshake
    in flight; a SYN being handled on another CPU as the program switched is given a
    millisecond to become visible first."""
    port = int(address[1])  # type: ignore[call-overload]
    deadline = time.monotonic() + _DRAIN_SECONDS
    time.sleep(0.001)
    while True:
        queued = _queue_length(old)
        try:
            half_open = _half_open(old.family, port) if not queued else 0
        except OSError as exc:
            raise HandoverRefused(
                f"the handshakes in flight to it cannot be seen (sock_diag: {exc})"
            ) from exc
        if not queued and not half_open:
            if _waiting_threads(old.fileno()):
                raise HandoverRefused(
                    "a thread started waiting in accept() on it while switching; set the "
                    "option before serving"
                )
            return
        if time.monotonic() >= deadline:
            waiting = f"{queued} connection(s)" if queued else f"{half_open} handshake(s)"
            raise HandoverRefused(
                f"{waiting} reached it while switching and were not accepted in "
                f"{_DRAIN_SECONDS:g} s"
            )
        time.sleep(0.005)


def settled_queue(sock: socket.socket, queued: int) -> int:
    """The accept queue of listener `sock` once the program's own accept() had a moment
    to empty it (up to a quarter second); `queued` is its length now."""
    deadline = time.monotonic() + _DRAIN_SECONDS
    while queued and time.monotonic() < deadline:
        time.sleep(0.002)
        queued = _queue_length(sock)
    return queued


def _queue_length(sock: socket.socket) -> int:
    raw = sock.getsockopt(c.SOL_TCP, c.TCP_INFO, 32)
    return int.from_bytes(raw[24:28], "little")  # tcpi_unacked: the accept queue
