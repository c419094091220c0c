"""Setting a TCP-only option on an MPTCP socket: turn it into plain TCP, in place.

Go issue 74643: once sockets default to MPTCP, TCP_MD5SIG fails with ENOPROTOOPT and
BGP speakers break. While a socket is not connected yet (or is a listener with nothing
waiting to be accepted), nothing is lost by making it plain TCP instead: a new TCP
socket takes over the same descriptor number (dup2), with the options already set, the
bound address and, for a listener, the backlog. Then the option is applied. Once
connected, the error names the option and the way out.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import Any

from mptcpkit.abi import constants as c
from mptcpkit.abi.tcp_info import TCP_INFO_MIN_SIZE, decode_tcp_info
from mptcpkit.errors import TCPOnlyOptionError
from mptcpkit.options import OptionInfo, tcp_only_options
from mptcpkit.policy import Policy
from mptcpkit.status import protocol, record_note

_REJECTION_ERRNOS = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP})

# Options carried over to the replacement socket when they differ from a fresh MPTCP
# socket's: (level, optname, buffer size or 0 for an int, families or None for all).
_CARRIED: tuple[tuple[int, int, int, tuple[int, ...] | None], ...] = (
    (c.SOL_SOCKET, socket.SO_REUSEADDR, 0, None),
    (c.SOL_SOCKET, socket.SO_REUSEPORT, 0, None),
    (c.SOL_SOCKET, socket.SO_KEEPALIVE, 0, None),
    (c.SOL_SOCKET, socket.SO_RCVBUF, 0, None),
    (c.SOL_SOCKET, socket.SO_SNDBUF, 0, None),
    (c.SOL_SOCKET, socket.SO_RCVLOWAT, 0, None),
    (c.SOL_SOCKET, c.SO_PRIORITY, 0, None),
    (c.SOL_SOCKET, c.SO_MARK, 0, None),
    (c.SOL_SOCKET, socket.SO_LINGER, 8, None),
    (c.SOL_SOCKET, c.SO_BINDTODEVICE, 16, None),
    (c.SOL_IP, c.IP_TOS, 0, (socket.AF_INET,)),
    (c.SOL_IP, c.IP_FREEBIND, 0, (socket.AF_INET,)),
    (c.SOL_IP, c.IP_TRANSPARENT, 0, (socket.AF_INET,)),
    (c.SOL_IP, c.IP_BIND_ADDRESS_NO_PORT, 0, None),
    (c.SOL_IPV6, c.IPV6_V6ONLY, 0, (socket.AF_INET6,)),
    (c.SOL_IPV6, c.IPV6_FREEBIND, 0, (socket.AF_INET6,)),
    (c.SOL_IPV6, c.IPV6_TRANSPARENT, 0, (socket.AF_INET6,)),
    (c.SOL_TCP, c.TCP_NODELAY, 0, None),
    (c.SOL_TCP, c.TCP_CORK, 0, None),
    (c.SOL_TCP, c.TCP_KEEPIDLE, 0, None),
    (c.SOL_TCP, c.TCP_KEEPINTVL, 0, None),
    (c.SOL_TCP, c.TCP_KEEPCNT, 0, None),
    (c.SOL_TCP, c.TCP_MAXSEG, 0, None),
    (c.SOL_TCP, c.TCP_DEFER_ACCEPT, 0, None),
    (c.SOL_TCP, c.TCP_CONGESTION, 16, None),
    (c.SOL_TCP, c.TCP_FASTOPEN, 0, None),
    (c.SOL_TCP, c.TCP_FASTOPEN_CONNECT, 0, None),
    (c.SOL_TCP, c.TCP_NOTSENT_LOWAT, 0, None),
    (c.SOL_TCP, c.TCP_INQ, 0, None),
)
# The kernel doubles what is set for these and reports the doubled value.
_DOUBLED = frozenset({(c.SOL_SOCKET, socket.SO_RCVBUF), (c.SOL_SOCKET, socket.SO_SNDBUF)})


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
    (if `policy` allows and the socket can still change) and set the option again."""
    option = tcp_only_options().get((level, optname))
    if option is None or exc.errno not in _REJECTION_ERRNOS or protocol(sock) != c.IPPROTO_MPTCP:
        raise exc
    if policy is Policy.REQUIRE:
        raise TCPOnlyOptionError(
            exc.errno,
            f"{option.name} is not supported on MPTCP sockets, and mptcp='require' forbids "
            "turning this socket into plain TCP; create it with mptcp='prefer' or 'off'",
        ) from exc
    downgrade(sock, option)
    socket.socket.setsockopt(sock, level, optname, *args)


def _refuse(option: OptionInfo, why: str) -> TCPOnlyOptionError:
    return TCPOnlyOptionError(
        errno.ENOPROTOOPT,
        f"{option.name} is not supported on MPTCP sockets, and this socket can no longer "
        f"become plain TCP: {why}; create it with mptcp='off' to use {option.name}",
    )


def downgrade(sock: socket.socket, option: OptionInfo) -> None:
    """Replace the MPTCP socket behind `sock` by a plain TCP one, keeping what it had."""
    tcp = decode_tcp_info(sock.getsockopt(c.SOL_TCP, c.TCP_INFO, TCP_INFO_MIN_SIZE))
    listening = tcp.state == c.TCP_LISTEN
    if listening and tcp.unacked:
        raise _refuse(option, f"the listener has {tcp.unacked} connection(s) waiting in its queue")
    if not listening and tcp.state != c.TCP_CLOSE:
        raise _refuse(option, f"it is already {tcp.state_name.lower().replace('_', '-')}")
    fd = sock.fileno()
    bound = sock.getsockname()
    is_bound = bound[1] != 0 or not ipaddress.ip_address(bound[0]).is_unspecified
    file_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    inheritable = os.get_inheritable(fd)
    with (
        socket.socket(sock.family, socket.SOCK_STREAM, c.IPPROTO_MPTCP) as reference,
        socket.socket(sock.family, socket.SOCK_STREAM, c.IPPROTO_TCP) as replacement,
    ):
        carry_options(sock, reference, replacement)
        os.dup2(replacement.fileno(), fd, inheritable=inheritable)
    fcntl.fcntl(fd, fcntl.F_SETFL, file_flags)
    reason = f"turned into plain TCP for {option.name} ({option.why})"
    record_note(sock, reason)
    try:
        if is_bound:
            sock.bind(bound)
        if listening:
            sock.listen(tcp.sacked)
    except OSError as exc:
        record_note(sock, reason + f"; re-binding {bound} failed")
        raise OSError(
            exc.errno,
            f"the socket was turned into plain TCP for {option.name}, but re-binding it to "
            f"{bound} failed: {exc.strerror}",
        ) from exc


def carry_options(old: socket.socket, reference: socket.socket, new: socket.socket) -> None:
    """Set on `new` every option of `old` that differs from a fresh MPTCP socket's."""
    for level, optname, size, families in _CARRIED:
        if families is not None and old.family not in families:
            continue
        try:
            value: int | bytes = (
                old.getsockopt(level, optname, size) if size else old.getsockopt(level, optname)
            )
            default = (
                reference.getsockopt(level, optname, size)
                if size
                else reference.getsockopt(level, optname)
            )
        except OSError:
            continue  # MPTCP cannot report it, so it cannot have been set either
        if value == default:
            continue
        if (level, optname) in _DOUBLED and isinstance(value, int):
            value //= 2
        if isinstance(value, bytes) and optname in (c.SO_BINDTODEVICE, c.TCP_CONGESTION):
            value = value.rstrip(b"\0")
        new.setsockopt(level, optname, value)
