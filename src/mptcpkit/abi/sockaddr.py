"""`struct sockaddr_in` / `sockaddr_in6` inside a `sockaddr_storage`, to (host, port);
and the sockaddr that connect() takes for a Python socket address."""

from __future__ import annotations

import os
import socket
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any


SOCKADDR_STORAGE_SIZE = 128

SockAddr = tuple[str, int]


def decode_sockaddr(data: bytes) -> SockAddr:
    """(host, port) from a sockaddr; ValueError for families other than AF_INET/AF_INET6."""
    if len(data) < 2:
        raise ValueError(f"sockaddr: {len(data)} bytes is too short for a family")
    (family,) = struct.unpack_from("=H", data, 0)
    if family == socket.AF_INET:
        if len(data) < 8:
            raise ValueError(f"sockaddr_in: {len(data)} bytes, need 8")
        port, raw = struct.unpack_from("!H4s", data, 2)
        return socket.inet_ntop(socket.AF_INET, raw), port
    if family == socket.AF_INET6:
        if len(data) < 24:
            raise ValueError(f"sockaddr_in6: {len(data)} bytes, need 24")
        port, _flowinfo, raw = struct.unpack_from("!HI16s", data, 2)
        return socket.inet_ntop(socket.AF_INET6, raw), port  # ::ffff:127.0.0.1, as socket
    raise ValueError(f"sockaddr: address family {family} is neither AF_INET nor AF_INET6")


def pack_ip(host: str) -> tuple[int, bytes]:
    """(AF_INET or AF_INET6, the packed address) of an IP literal; ValueError else."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, host)
        except OSError:
            continue
    raise ValueError(f"{host!r} does not appear to be an IPv4 or IPv6 address")


def encode_sockaddr(host: str, port: int) -> bytes:
    """A sockaddr_storage-sized buffer for an IPv4 or IPv6 literal."""
    family, packed = pack_ip(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range 0-65535")
    if family == socket.AF_INET:
        raw = struct.pack("=H", family) + struct.pack("!H4s", port, packed)
    else:
        raw = struct.pack("=H", family) + struct.pack("!HI16sI", port, 0, packed, 0)
    return raw.ljust(SOCKADDR_STORAGE_SIZE, b"\0")


def encode_address(family: int, address: Any) -> bytes:
    """The exact `struct sockaddr` connect() takes for a Python socket address.

    `address` is what the socket module uses: (host, port) for AF_INET, (host, port[,
    flowinfo, scope_id]) for AF_INET6 with an IP literal as host, a path for AF_UNIX
    (a leading NUL makes it abstract).
    """
    if family == socket.AF_UNIX:
        path = os.fsencode(address)
        tail = b"" if path.startswith(b"\0") else b"\0"
        if len(path) + len(tail) > 108:
            raise ValueError(f"AF_UNIX path is longer than 108 bytes: {address!r}")
        return struct.pack("=H", socket.AF_UNIX) + path + tail
    host, port = address[0], address[1]
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H4s8x", port, socket.inet_aton(host))
    if family == socket.AF_INET6:
        flow, scope = (address[2], address[3]) if len(address) >= 4 else (0, 0)
        packed = socket.inet_pton(socket.AF_INET6, host)
        return (
            struct.pack("=H", family)
            + struct.pack("!HI16s", port, flow, packed)
            + struct.pack("=I", scope)
        )
    raise ValueError(f"address family {family} is not AF_INET, AF_INET6 or AF_UNIX")
