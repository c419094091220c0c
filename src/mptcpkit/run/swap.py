"""Decide whether a forced socket can still become plain TCP, and what to carry over.

The supervisor swaps a forced socket for plain TCP when the program needs something
MPTCP cannot give (a TCP-only option, or `--only`). Same rule as the library's own
downgrade (`mptcpkit.downgrade`): only while the socket is unconnected, or listening
with nothing in its accept queue; the replacement gets the same bound address, the
options that differ from a fresh MPTCP socket's, the same file flags and, for a
listener, the same backlog.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket

from mptcpkit.abi import constants as c
from mptcpkit.abi.tcp_info import TCP_INFO_MIN_SIZE, decode_tcp_info
from mptcpkit.downgrade import carry_options

__all__ = ["Plan", "carry_options", "plan", "rebind"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to rebuild the socket: where to bind it and whether to listen again."""

    address: tuple[object, ...] | None  # None: the original was not bound
    backlog: int | None  # None: the original was not listening


def plan(sock: socket.socket) -> Plan | None:
    """A Plan for an MPTCP socket that can still change, else None."""
    try:
        tcp = decode_tcp_info(sock.getsockopt(c.SOL_TCP, c.TCP_INFO, TCP_INFO_MIN_SIZE))
    except OSError:
        return None
    listening = tcp.state == c.TCP_LISTEN
    if (listening and tcp.unacked) or (not listening and tcp.state != c.TCP_CLOSE):
        return None
    addr = sock.getsockname()
    bound = addr[1] != 0 or not ipaddress.ip_address(addr[0]).is_unspecified
    return Plan(tuple(addr) if bound else None, tcp.sacked if listening else None)


def rebind(old: socket.socket, new: socket.socket, how: Plan) -> None:
    """Give `new` the address (and listen state) of `old`, which still holds them.

    `old` stops listening and both sockets get SO_REUSEADDR, so the address can be
    shared for the moment until `old` is closed; `new` gets its own SO_REUSEADDR
    value back afterwards.
    """
    if how.address is None and how.backlog is None:
        return
    reuse = new.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if how.backlog is not None:
        with contextlib.suppress(OSError):
            old.shutdown(socket.SHUT_RD)  # stops listening; the queue was empty
    new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if how.address is not None:
            new.bind(how.address)
        if how.backlog is not None:
            new.listen(how.backlog)
    finally:
        if not reuse:
            new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
