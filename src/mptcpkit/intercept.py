"""Transparent interception: where an intercepted connection was really going.

A router that hands its LAN's outgoing TCP connections to a local proxy does it one of
two ways (nftables):

- `redirect` (NAT): the connection is rewritten to a local port; the original
  destination is kept by conntrack and read back with `getsockopt(SOL_IP,
  SO_ORIGINAL_DST)` (IPv6: `SOL_IPV6, IP6T_SO_ORIGINAL_DST`), both 80.
- `tproxy`: the packets are delivered unchanged to a listener with `IP_TRANSPARENT`
  (`IPV6_TRANSPARENT`); the accepted socket's local address *is* the destination.

Sync socket code, no event loop. `destination()` works for both: SO_ORIGINAL_DST when
conntrack has an entry, else the local address.
"""

from __future__ import annotations

import errno
import socket
import struct

__all__ = [
    "IP6T_SO_ORIGINAL_DST",
    "IPV6_TRANSPARENT",
    "IP_TRANSPARENT",
    "SO_ORIGINAL_DST",
    "destination",
    "make_transparent",
    "original_dst",
]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6
IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, addr, scope


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The destination a REDIRECTed (NATed) connection had before it was rewritten.

    None when conntrack has no NAT entry for it (not redirected: e.g. TPROXY, no conntrack, or a
    direct connection). Other errors raise OSError.
    """
    fd_family = sock.family
    if fd_family == socket.AF_INET6 and _unmap(sock.getsockname()[0]).count(".") == 3:
        fd_family = socket.AF_INET  # IPv4 on a dual-stack socket: conntrack's entry is IPv4
    try:
        if fd_family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
            port, addr = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
            return socket.inet_ntop(socket.AF_INET, addr), port
        if fd_family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, _, addr6, _ = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
            return _unmap(socket.inet_ntop(socket.AF_INET6, addr6)), port
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTCONN, errno.ENOPROTOOPT):
            return None
        raise
    raise OSError(errno.EAFNOSUPPORT, f"no original destination for family {fd_family!r}")


def destination(sock: socket.socket) -> tuple[str, int]:
    """Where an intercepted (redirect or tproxy) connection was going: (host, port)."""
    dst = original_dst(sock)
    if dst is not None:
        return dst
    host, port = sock.getsockname()[:2]
    return _unmap(host), port


def make_transparent(sock: socket.socket) -> None:
    """Let a listener take connections for any address (TPROXY); needs CAP_NET_ADMIN.

    Set before bind(). MPTCP sockets take it too (kernel 6.x).
    """
    if sock.family == socket.AF_INET6:  # the same flag; covers IPv4 on a dual-stack socket
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def _unmap(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host
