"""Setting a TCP-only option on an MPTCP socket: turn it into plain TCP, in place.

Go issue 74643: once sockets default to MPTCP, TCP_MD5SIG fails with ENOPROTOOPT and
BGP speakers break. While a socket is not connected yet (or is a listener with nothing
waiting to be accepted), nothing is lost by making it plain TCP instead: a new TCP
socket gets every option the MPTCP one had, then the option asked for, then the bound
address (bound beside the old socket, so the port is never free) and, for a listener,
the backlog (see `mptcpkit.handover`); only then does it take the same descriptor
number (dup2). Any failure before that leaves the MPTCP socket exactly as it was.
Once connected, the error names the option and the way out.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import socket
import struct

from mptcpkit.abi import constants as c
from mptcpkit.errors import TCPOnlyOptionError
from mptcpkit.handover import (
    FILTER_OPTIONS,
    HandoverRefused,
    finish_handover,
    hand_over,
    settled_queue,
)
from mptcpkit.options import OptionInfo, option_name, tcp_only_options
from mptcpkit.policy import Policy
from mptcpkit.status import record_note

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


_REJECTION_ERRNOS = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_S, _IP, _IP6, _TCP = c.SOL_SOCKET, c.SOL_IP, c.SOL_IPV6, c.SOL_TCP

# Every option an MPTCP socket takes and reports back (tests/test_downgrade.py checks
# that no other one does; SO_BINDTOIFINDEX is SO_BINDTODEVICE's state):
# (level, optname) -> buffer size, or 0 for an int.
CARRIED: dict[tuple[int, int], int] = {
    (_S, 1): 0,  # SO_DEBUG
    (_S, 2): 0,  # SO_REUSEADDR
    (_S, 15): 0,  # SO_REUSEPORT
    (_S, 9): 0,  # SO_KEEPALIVE
    (_S, 8): 0,  # SO_RCVBUF
    (_S, 7): 0,  # SO_SNDBUF
    (_S, 18): 0,  # SO_RCVLOWAT
    (_S, 12): 0,  # SO_PRIORITY
    (_S, 36): 0,  # SO_MARK
    (_S, 13): 8,  # SO_LINGER
    (_S, 25): 16,  # SO_BINDTODEVICE
    (_S, 20): 16,  # SO_RCVTIMEO
    (_S, 21): 16,  # SO_SNDTIMEO
    (_S, 29): 0,  # SO_TIMESTAMP
    (_S, 35): 0,  # SO_TIMESTAMPNS
    (_S, 37): 0,  # SO_TIMESTAMPING
    (_S, 63): 0,  # SO_TIMESTAMP_NEW
    (_S, 64): 0,  # SO_TIMESTAMPNS_NEW
    (_S, 65): 0,  # SO_TIMESTAMPING_NEW
    (_S, 46): 0,  # SO_BUSY_POLL
    (_S, 69): 0,  # SO_PREFER_BUSY_POLL
    (_S, 70): 0,  # SO_BUSY_POLL_BUDGET
    (_S, 49): 0,  # SO_INCOMING_CPU
    (_IP, 1): 0,  # IP_TOS
    (_IP, 15): 0,  # IP_FREEBIND
    (_IP, 19): 0,  # IP_TRANSPARENT
    (_IP, 24): 0,  # IP_BIND_ADDRESS_NO_PORT
    (_IP, 51): 0,  # IP_LOCAL_PORT_RANGE
    (_IP6, 26): 0,  # IPV6_V6ONLY
    (_IP6, 78): 0,  # IPV6_FREEBIND
    (_IP6, 75): 0,  # IPV6_TRANSPARENT
    (_TCP, 1): 0,  # TCP_NODELAY
    (_TCP, 3): 0,  # TCP_CORK
    (_TCP, 4): 0,  # TCP_KEEPIDLE
    (_TCP, 5): 0,  # TCP_KEEPINTVL
    (_TCP, 6): 0,  # TCP_KEEPCNT
    (_TCP, 2): 0,  # TCP_MAXSEG
    (_TCP, 9): 0,  # TCP_DEFER_ACCEPT
    (_TCP, 13): 16,  # TCP_CONGESTION
    (_TCP, 23): 0,  # TCP_FASTOPEN
    (_TCP, 30): 0,  # TCP_FASTOPEN_CONNECT
    (_TCP, 34): 0,  # TCP_FASTOPEN_NO_COOKIE
    (_TCP, 25): 0,  # TCP_NOTSENT_LOWAT
    (_TCP, 36): 0,  # TCP_INQ
}
_STRINGS = frozenset({(_S, 25), (_TCP, 13)})  # SO_BINDTODEVICE, TCP_CONGESTION: NUL-padded
# The kernel doubles what is set for these and reports the doubled value.
_DOUBLED = frozenset({(_S, 8), (_S, 7)})
_TCP_STATE = struct.Struct("<B23xII")
_FAMILY = _socket.socket.family  # the C member: an int, without the enum conversion
_UNSPECIFIED = frozenset({"0.0.0.0", "::"})


class Plan:
    """Per family: the getsockopt arguments of each option to carry, and what a fresh
    MPTCP socket reports for each (nobody set it)."""

    __slots__ = ("defaults", "reads")

    def __init__(self, reads: list[tuple[int, ...]], defaults: list[int | bytes | None]):
        self.reads = reads
        self.defaults = defaults


_plans: dict[int, Plan] = {}


def setsockopt(sock: socket.socket, level: int, optname: int, *args: Any) -> None:
    """`sock.setsockopt(level, optname, *args)`, downgrading MPTCP to plain TCP when
    the option needs it and the socket can still change."""
    try:
        socket.socket.setsockopt(sock, level, optname, *args)
    except OSError as exc:
        policy = getattr(sock, "mptcp_policy", Policy.PREFER)
        retry_after_downgrade(sock, exc, level, optname, args, policy)


def retry_after_downgrade(
    sock: socket.socket,
    exc: OSError,
    level: int,
    optname: int,
    args: Sequence[Any],
    policy: Policy,
) -> None:
    """Handle a failed setsockopt: re-raise unless MPTCP was the cause; else downgrade
    (if `policy` allows and the socket can still change) with the option set."""
    if exc.errno not in _REJECTION_ERRNOS:
        raise exc
    option = tcp_only_options().get((level, optname))
    if option is None or sock.getsockopt(_S, c.SO_PROTOCOL) != c.IPPROTO_MPTCP:
        raise exc
    if policy is Policy.REQUIRE:
        raise TCPOnlyOptionError(
            exc.errno,
            f"{option.name} is not supported on MPTCP sockets, and mptcp='require' forbids "
            "turning this socket into plain TCP; create it with mptcp='prefer' or 'off'",
        ) from exc
    downgrade(sock, option, args)


def _refuse(option: OptionInfo, why: str) -> TCPOnlyOptionError:
    if option.level == -1:  # not an option: become_plain_tcp()
        return TCPOnlyOptionError(
            errno.EOPNOTSUPP,
            f"{option.name} asks for plain TCP here ({option.why}), but this socket cannot "
            f"become plain TCP now: {why}; pass mptcp='off' or 'prefer' explicitly",
        )
    return TCPOnlyOptionError(
        errno.ENOPROTOOPT,
        f"{option.name} is not supported on MPTCP sockets, and this socket cannot become "
        f"plain TCP now: {why}; create it with mptcp='off' to use {option.name}",
    )


def downgrade_before_connect(
    sock: socket.socket, level: int, optname: int, args: Sequence[Any], policy: Policy
) -> bool:
    """Set an option of `options.refused_before_connect()` without asking MPTCP first
    (it would refuse): downgrade `sock` if it is an unconnected MPTCP socket that
    `policy` lets change. False, having done nothing, when that is not the case: then
    set the option the usual way (try, and downgrade on refusal)."""
    if policy is Policy.REQUIRE or sock.getsockopt(_S, c.SO_PROTOCOL) != c.IPPROTO_MPTCP:
        return False
    return downgrade(sock, tcp_only_options()[(level, optname)], args, unconnected_only=True)


def downgrade(
    sock: socket.socket,
    option: OptionInfo,
    args: Sequence[Any] | None = None,
    *,
    unconnected_only: bool = False,
) -> bool:
    """Replace the MPTCP socket behind `sock` by a plain TCP one, keeping what it had,
    with `option` set to `args` when given. On any error `sock` is left as it was: the
    error is TCP's own for the option (e.g. ENOENT for TCP_ULP "tls" before connect),
    else a TCPOnlyOptionError that says why. With `unconnected_only`, a socket that is
    listening or connected is left alone and False returned; else True."""
    # tcpi_state, and for a listener tcpi_unacked (accept queue) and tcpi_sacked (backlog)
    state, queued, backlog = _TCP_STATE.unpack(sock.getsockopt(c.SOL_TCP, c.TCP_INFO, 32))
    if unconnected_only and state != c.TCP_CLOSE:
        return False
    listening = state == c.TCP_LISTEN
    if listening and settled_queue(sock, queued):
        raise _refuse(option, f"the listener has {queued} connection(s) waiting in its queue")
    if not listening and state != c.TCP_CLOSE:
        name = c.TCP_STATES.get(state, str(state)).lower().replace("_", "-")
        raise _refuse(option, f"it is already {name}")
    if listening and (option.level, option.optname) in FILTER_OPTIONS:
        raise _refuse(option, "it is listening (set socket filters before listen())")
    fd = sock.fileno()
    bound = sock.getsockname()
    is_bound = bound[1] != 0 or bound[0] not in _UNSPECIFIED
    file_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    inheritable = os.get_inheritable(fd)
    timeout = sock.gettimeout()
    family = _FAMILY.__get__(sock)  # the int: socket.socket.family converts to an enum
    replacement = _socket.socket(family, socket.SOCK_STREAM, c.IPPROTO_TCP)  # no wrapper: cheaper
    try:
        try:
            carry_options(sock, None, replacement)
        except OSError as exc:
            raise _refuse(option, str(exc)) from exc
        if args is not None:
            replacement.setsockopt(option.level, option.optname, *args)
        if listening:
            try:
                registrations = hand_over(sock, replacement, bound, backlog)
            except HandoverRefused as exc:
                raise _refuse(option, str(exc)) from None
        elif is_bound:
            _bind_beside(sock, replacement, bound, option)
        os.dup2(replacement.fileno(), fd, inheritable=inheritable)
    finally:
        replacement.close()
    if listening:
        finish_handover(sock, registrations)
    # The socket object now describes a TCP socket: `proto` (and repr) say 6, like
    # the kernel; re-initialising the C object resets its timeout, so that comes back.
    # A blocking socket needs nothing more: the new descriptor is blocking already and
    # re-initialising left the object blocking (unless a default timeout is set).
    _socket.socket.__init__(sock, family, socket.SOCK_STREAM, c.IPPROTO_TCP, fd)
    if timeout is not None or _socket.getdefaulttimeout() is not None:
        sock.settimeout(timeout)  # O_NONBLOCK as it was for Python; other flags if any:
    if file_flags != os.O_RDWR | (os.O_NONBLOCK if timeout is not None else 0):
        fcntl.fcntl(fd, fcntl.F_SETFL, file_flags)
    record_note(sock, f"turned into plain TCP for {option.name} ({option.why})")
    return True


def become_plain_tcp(sock: socket.socket, name: str, why: str) -> None:
    """Turn a fresh MPTCP socket into plain TCP in place, for `name` (`why`), as a
    TCP-only option would."""
    downgrade(sock, OptionInfo(name, -1, -1, 0, why))


def _bind_beside(
    old: socket.socket, new: _socket.socket, address: tuple[Any, ...], option: OptionInfo
) -> None:
    """Bind `new` to the address `old` holds, while it still holds it (SO_REUSEADDR on
    both for the moment: neither listens), so the port is never free for others."""
    reuse = new.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    old_reuse = old.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        new.bind(address)
    except OSError as exc:
        raise _refuse(
            option, f"a TCP socket could not bind beside it to {address}: {exc.strerror}"
        ) from exc
    finally:
        if not old_reuse:
            old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    if not reuse:
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)


def _plan(family: int, reference: socket.socket | None = None) -> Plan:
    """What to read for each option to carry on a socket of `family`, and its value on a
    fresh socket; from `reference` when given, else measured once per process (a
    downgrade runs it ~40 times: it is kept to one syscall each)."""
    plan = _plans.get(family) if reference is None else None
    if plan is None:
        fresh = reference or socket.socket(family, socket.SOCK_STREAM, c.IPPROTO_MPTCP)
        reads: list[tuple[int, ...]] = []
        defaults: list[int | bytes | None] = []
        try:
            for (level, optname), size in CARRIED.items():
                if family == socket.AF_INET and level == _IP6:
                    continue  # TCP has none there
                args = (level, optname, size) if size else (level, optname)
                # what MPTCP cannot report (SO_BUSY_POLL_BUDGET) cannot be carried
                if (default := _get(fresh, *args)) is not None:
                    reads.append(args)
                    defaults.append(default)
        finally:
            if reference is None:
                fresh.close()
        plan = Plan(reads, defaults)
        if reference is None:
            _plans[family] = plan
    return plan


def _get(sock: socket.socket, *args: int) -> int | bytes | None:
    try:
        return sock.getsockopt(*args)
    except OSError:
        return None


def carry_options(old: socket.socket, reference: socket.socket | None, new: _socket.socket) -> None:
    """Set on `new` every option of `old` that differs from a fresh MPTCP socket's (the
    `reference` socket's when given, else measured once per process). An option `new`
    refuses raises OSError naming it."""
    plan = _plan(_FAMILY.__get__(old), reference)
    get = old.getsockopt
    values: list[int | bytes | None]
    try:  # one comprehension: the ~40 reads are most of a downgrade's cost
        values = [get(*args) for args in plan.reads]
    except OSError:  # MPTCP cannot report one now, so it cannot have been set either
        values = [_get(old, *args) for args in plan.reads]
    if values == plan.defaults:
        return
    for args, default, value in zip(plan.reads, plan.defaults, values, strict=True):
        if value is None or value == default:
            continue
        key = (args[0], args[1])
        if key in _DOUBLED and isinstance(value, int):
            value //= 2
        elif key in _STRINGS and isinstance(value, bytes):
            value = value.rstrip(b"\0")
        try:
            new.setsockopt(key[0], key[1], value)
        except OSError as exc:
            raise OSError(
                exc.errno, f"{option_name(*key)} could not be carried over: {exc.strerror}"
            ) from exc
