"""`struct sockaddr_in` / `sockaddr_in6` inside a `sockaddr_storage`, to (host, port)."""

from __future__ import annotations

import ipaddress
import socket
import struct

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
        return str(ipaddress.IPv4Address(raw)), port
    if family == socket.AF_INET6:
        if len(data) < 24:
            raise ValueError(f"sockaddr_in6: {len(data)} bytes, need 24")
        port, _flowinfo, raw = struct.unpack_from("!HI16s", data, 2)
        return str(ipaddress.IPv6Address(raw)), port
    raise ValueError(f"sockaddr: address family {family} is neither AF_INET nor AF_INET6")


def encode_sockaddr(host: str, port: int) -> bytes:
    """A sockaddr_storage-sized buffer for an IPv4 or IPv6 literal."""
    ip = ipaddress.ip_address(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range 0-65535")
    if ip.version == 4:
        raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s", port, ip.packed)
    else:
        raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI16sI", port, 0, ip.packed, 0)
    return raw.ljust(SOCKADDR_STORAGE_SIZE, b"\0")
