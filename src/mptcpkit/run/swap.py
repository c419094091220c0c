"""Rebuild a not-yet-connected MPTCP socket as plain TCP, keeping what the program set.

The supervisor swaps a forced socket for plain TCP when the program needs something
MPTCP cannot give (a TCP-only option, or `--only`). The replacement must look like
the original to the program: same bound address, same options, same file flags.
Options are copied only when they differ from a fresh socket's default, so nothing
the program did not ask for is set.
"""

from __future__ import annotations

import errno
import socket

from mptcpkit.abi import constants as c

# (level, optname, buffer size or 0 for an int) copied from the MPTCP socket.
COPIED_OPTIONS: tuple[tuple[int, int, int], ...] = (
    (c.SOL_SOCKET, socket.SO_REUSEADDR, 0),
    (c.SOL_SOCKET, socket.SO_REUSEPORT, 0),
    (c.SOL_SOCKET, socket.SO_KEEPALIVE, 0),
    (c.SOL_SOCKET, socket.SO_SNDBUF, 0),
    (c.SOL_SOCKET, socket.SO_RCVBUF, 0),
    (c.SOL_SOCKET, c.SO_MARK, 0),
    (c.SOL_SOCKET, c.SO_PRIORITY, 0),
    (c.SOL_SOCKET, socket.SO_LINGER, 8),
    (c.SOL_SOCKET, c.SO_BINDTODEVICE, 16),
    (c.SOL_TCP, c.TCP_NODELAY, 0),
    (c.SOL_TCP, c.TCP_CORK, 0),
    (c.SOL_TCP, c.TCP_KEEPIDLE, 0),
    (c.SOL_TCP, c.TCP_KEEPINTVL, 0),
    (c.SOL_TCP, c.TCP_KEEPCNT, 0),
    (c.SOL_TCP, c.TCP_MAXSEG, 0),
    (c.SOL_TCP, c.TCP_CONGESTION, 16),
    (c.SOL_TCP, c.TCP_NOTSENT_LOWAT, 0),
    (c.SOL_TCP, c.TCP_DEFER_ACCEPT, 0),
    (c.SOL_TCP, c.TCP_FASTOPEN, 0),
    (c.SOL_TCP, c.TCP_FASTOPEN_CONNECT, 0),
    (c.SOL_TCP, c.TCP_INQ, 0),
)
V4_OPTIONS = (
    (c.SOL_IP, c.IP_TOS, 0),
    (c.SOL_IP, c.IP_FREEBIND, 0),
    (c.SOL_IP, c.IP_TRANSPARENT, 0),
    (c.SOL_IP, c.IP_BIND_ADDRESS_NO_PORT, 0),
)
V6_OPTIONS = (
    (c.SOL_IPV6, c.IPV6_V6ONLY, 0),
    (c.SOL_IPV6, c.IPV6_TCLASS, 0),
    (c.SOL_IPV6, c.IPV6_FREEBIND, 0),
    (c.SOL_IPV6, c.IPV6_TRANSPARENT, 0),
)
# The kernel reports twice what was set (bookkeeping overhead): set half back.
DOUBLED = {(c.SOL_SOCKET, socket.SO_SNDBUF), (c.SOL_SOCKET, socket.SO_RCVBUF)}


def _get(sock: socket.socket, level: int, opt: int, size: int) -> bytes | int | None:
    try:
        return sock.getsockopt(level, opt, size) if size else sock.getsockopt(level, opt)
    except OSError:
        return None


def options_to_copy(old: socket.socket, fresh: socket.socket) -> list[tuple[int, int, bytes | int]]:
    """Options whose value on `old` differs from the default on `fresh` (same family)."""
    table = COPIED_OPTIONS + (V6_OPTIONS if old.family == socket.AF_INET6 else V4_OPTIONS)
    out: list[tuple[int, int, bytes | int]] = []
    for level, opt, size in table:
        value = _get(old, level, opt, size)
        if value is None or value == _get(fresh, level, opt, size):
            continue
        if (level, opt) in DOUBLED and isinstance(value, int):
            value //= 2
        if opt == c.SO_BINDTODEVICE and isinstance(value, bytes):
            value = value.rstrip(b"\0")
        out.append((level, opt, value))
    return out


def is_unconnected(sock: socket.socket) -> bool:
    """Neither listening nor connected: the only state a swap is invisible in."""
    if sock.getsockopt(c.SOL_SOCKET, c.SO_ACCEPTCONN):
        return False
    try:
        sock.getpeername()
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def bound_address(sock: socket.socket) -> tuple[object, ...] | None:
    """The address to bind the replacement to, or None when the original is unbound."""
    addr = sock.getsockname()
    host, port = addr[0], addr[1]
    if port == 0 and host in ("0.0.0.0", "::"):
        return None
    return tuple(addr)


def apply_options(sock: socket.socket, options: list[tuple[int, int, bytes | int]]) -> list[str]:
    """Set options on the replacement; returns a description of each one refused."""
    refused = []
    for level, opt, value in options:
        try:
            sock.setsockopt(level, opt, value)
        except OSError as exc:
            refused.append(f"({level}, {opt}): {exc.strerror}")
    return refused
