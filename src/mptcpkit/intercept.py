"""Transparent interception: where an intercepted connection was really going.

A router that hands its LAN's outgoing TCP connections to a local proxy does it one of
two ways (nftables):

- `redirect` (NAT): the connection is rewritten to a local port; the original
  destination is kept by conntrack and read back with `getsockopt(SOL_IP,
  SO_ORIGINAL_DST)` (IPv6: `SOL_IPV6, IP6T_SO_ORIGINAL_DST`), both 80.
- `tproxy`: the packets are delivered unchanged to a listener with `IP_TRANSPARENT`
  (`IPV6_TRANSPARENT`); the accepted socket's local address *is* the destination.

Sync socket code, no event loop. `destination()` works for both: SO_ORIGINAL_DST when
conntrack has an entry, else the local address. `intercepted()` also tells a connection
that was intercepted from one made to the gateway itself (relaying that one would loop):

- redirect: SO_ORIGINAL_DST of a tracked but not NATed connection is the socket's own
  local address; a redirected one's is the original, foreign, destination. So: not
  intercepted when conntrack has no entry or the original destination is the local one.
- tproxy: the local address is the packet's own destination either way. A connection to
  the gateway itself is one a listener would take without TPROXY: to a listener's port,
  and to its address (a listener bound to one address), or to one of the host's own
  addresses (a wildcard listener): a bind() probe asks the kernel, as `fib daddr type
  local` does. The probe runs only for connections to a listener's port.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

__all__ = [
    "IP6T_SO_ORIGINAL_DST",
    "IPV6_TRANSPARENT",
    "IP_TRANSPARENT",
    "SO_ORIGINAL_DST",
    "Bind",
    "destination",
    "intercepted",
    "is_local_address",
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
    return _original_dst(sock, sock.getsockname())


def _original_dst(sock: socket.socket, local: tuple[str, int]) -> tuple[str, int] | None:
    fd_family = sock.family
    if fd_family == socket.AF_INET6 and _unmap(local[0]).count(".") == 3:
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


Bind = tuple[str, int]  # a listener's bound address: (host, port), host "::"/"0.0.0.0": any


def intercepted(
    sock: socket.socket, mode: str, binds: Sequence[Bind] = ()
) -> tuple[tuple[str, int] | None, bool]:
    """(where the connection was going, whether it was intercepted) under `mode`
    ("redirect" or "tproxy"), for a connection accepted by listeners bound to `binds`.

    Not intercepted: a connection to the gateway itself (the module's docstring says how
    each mode tells); the destination is then what is known of it, or None.
    """
    local = sock.getsockname()
    here = (_unmap(local[0]), int(local[1]))
    try:
        orig = _original_dst(sock, local)
    except OSError:
        orig = None
    if orig is not None and orig != here:
        return orig, True  # NATed: redirected
    if mode == "redirect":
        return orig, False  # no conntrack entry, or a connection to the socket's own address
    for host, port in binds:
        if port != here[1]:
            continue
        host = _unmap(host)
        if host not in ("0.0.0.0", "::"):
            if host == here[0]:
                return here, False
            continue
        scope = local[3] if len(local) > 3 else 0
        return here, not is_local_address(here[0], scope)
    return here, True


def is_local_address(host: str, scope_id: int = 0) -> bool:
    """Whether `host` is one of this host's (network namespace's) own addresses: bind()
    to it succeeds (no IP_FREEBIND, no IP_TRANSPARENT). With `net.ipv4.ip_nonlocal_bind`
    (`net.ipv6.ip_nonlocal_bind`) set every address binds: True for all; and True when
    the probe fails otherwise (the safe answer for a gateway: reset, never a loop)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr: tuple[str, int] | tuple[str, int, int, int]
    addr = (host, 0, 0, scope_id) if family == socket.AF_INET6 else (host, 0)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind(addr)
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


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
