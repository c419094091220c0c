"""PROXY protocol v1 and v2 (HAProxy's spec): carry the client's address across a relay.

I/O-free: `parse()` takes the bytes received so far and says "need more", "here is the
header and its length", or raises `ProxyProtocolError`; `build_v1()`/`build_v2()` make
the bytes. The relay uses it for `accept-proxy` (frontends) and `send-proxy` (servers).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "build",
    "build_v1",
    "build_v2",
    "parse",
    "read_proxy_header",
]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEAD = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_UNIX = struct.Struct("!108s108s")
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_V2_FAMILIES = {0x1: socket.AF_INET, 0x2: socket.AF_INET6, 0x3: socket.AF_UNIX}
_V2_FAMILY_CODES = {v: k for k, v in _V2_FAMILIES.items()}
_V2_STREAM = 0x1
_V2_DGRAM = 0x2

Endpoint = tuple[str, int] | str | None
PROXY_HEADER_LIMIT = 16 + 65535  # bytes a client may send before its header is whole


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says what is wrong."""


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded header.

    `local` is True for v2 LOCAL (health checks from the load balancer) and v1
    UNKNOWN: the addresses are then not the client's and must be ignored.
    `source`/`destination` are (host, port) for AF_INET/AF_INET6, a path for AF_UNIX,
    None when unknown. `tlvs` are v2 type-length-value extensions, in order.
    """

    version: int
    family: int
    source: Endpoint = None
    destination: Endpoint = None
    local: bool = False
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Decode a header at the start of `data`: (header, bytes used), or None if incomplete."""
    buf = bytes(data[: 16 + 65535])
    if not buf:
        return None
    if buf[:1] == b"\r":
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError("not a PROXY protocol header (bad v2 signature)")
        return _parse_v2(buf)
    n = min(len(buf), len(V1_PREFIX))
    if buf[:n] != V1_PREFIX[:n]:
        raise ProxyProtocolError("not a PROXY protocol header (expected 'PROXY ' or v2 signature)")
    return _parse_v1(buf)


def read_proxy_header(hdr: bytearray) -> tuple[Endpoint, Endpoint, int] | str | None:
    """A client's PROXY header so far: None while incomplete, (source, destination,
    bytes used) once read (None, None for LOCAL/UNKNOWN: the connection's own addresses
    stand), or why the connection must be reset."""
    try:
        parsed = parse(hdr)
    except ProxyProtocolError as exc:
        return f"bad PROXY header: {exc}"
    if parsed is None:
        return "PROXY header too long" if len(hdr) > PROXY_HEADER_LIMIT else None
    header, used = parsed
    if header.local:
        return None, None, used
    return header.source, header.destination, used


def _parse_v1(buf: bytes) -> tuple[ProxyHeader, int] | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyProtocolError(f"v1 header has no CRLF within {V1_MAX} bytes")
        if b"\n" in buf:
            raise ProxyProtocolError("v1 header line must end with CRLF")
        return None
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    parts = line.split(" ")
    used = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, socket.AF_UNSPEC, local=True), used
    if len(parts) != 6:
        raise ProxyProtocolError(
            f"v1 header needs 6 fields 'PROXY TCP4|TCP6 SRC DST SPORT DPORT', got {len(parts)}"
        )
    _, proto, src, dst, sport, dport = parts
    if proto == "TCP4":
        family, cls = socket.AF_INET, ipaddress.IPv4Address
    elif proto == "TCP6":
        family, cls = socket.AF_INET6, ipaddress.IPv6Address  # type: ignore[assignment]
    else:
        raise ProxyProtocolError(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, got {proto!r}")
    try:
        src_ip, dst_ip = str(cls(src)), str(cls(dst))
    except ValueError:
        raise ProxyProtocolError(f"v1 addresses {src!r} {dst!r} are not {proto}") from None
    return ProxyHeader(1, family, (src_ip, _port(sport)), (dst_ip, _port(dport))), used


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"v1 port {text!r} is not a number 0-65535")
    return int(text)


def _parse_v2(buf: bytes) -> tuple[ProxyHeader, int] | None:
    if len(buf) < _V2_HEAD.size:
        return None
    _, ver_cmd, fam_proto, length = _V2_HEAD.unpack_from(buf)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header has version {ver_cmd >> 4}, expected 2")
    cmd = ver_cmd & 0xF
    if cmd not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyProtocolError(f"v2 header has unknown command {cmd}")
    total = _V2_HEAD.size + length
    if len(buf) < total:
        return None
    body = buf[_V2_HEAD.size : total]
    fam_code, proto = fam_proto >> 4, fam_proto & 0xF
    family = _V2_FAMILIES.get(fam_code, socket.AF_UNSPEC)
    if fam_code and fam_code not in _V2_FAMILIES:
        raise ProxyProtocolError(f"v2 header has unknown address family {fam_code}")
    if proto not in (0, _V2_STREAM, _V2_DGRAM):
        raise ProxyProtocolError(f"v2 header has unknown transport protocol {proto}")
    src: Endpoint = None
    dst: Endpoint = None
    offset = 0
    if family == socket.AF_INET:
        offset = _need(body, _V2_INET.size, "IPv4")
        s, d, sp, dp = _V2_INET.unpack_from(body)
        src, dst = (socket.inet_ntop(family, s), sp), (socket.inet_ntop(family, d), dp)
    elif family == socket.AF_INET6:
        offset = _need(body, _V2_INET6.size, "IPv6")
        s, d, sp, dp = _V2_INET6.unpack_from(body)
        # ipaddress, not inet_ntop: glibc writes ::1:0 as ::0.1.0.0
        src, dst = (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp)
    elif family == socket.AF_UNIX:
        offset = _need(body, _V2_UNIX.size, "unix")
        s, d = _V2_UNIX.unpack_from(body)
        src, dst = _unix_path(s), _unix_path(d)
    tlvs = _parse_tlvs(body[offset:])
    local = cmd == _V2_CMD_LOCAL
    if local or fam_code == 0:
        return ProxyHeader(2, socket.AF_UNSPEC, local=True, tlvs=tlvs), total
    return ProxyHeader(2, family, src, dst, tlvs=tlvs), total


def _need(body: bytes, size: int, what: str) -> int:
    if len(body) < size:
        raise ProxyProtocolError(f"v2 {what} addresses need {size} bytes, header has {len(body)}")
    return size


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_tlvs(rest: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    i = 0
    while i < len(rest):
        if len(rest) - i < 3:
            raise ProxyProtocolError("v2 TLV truncated (needs type and 2-byte length)")
        kind, size = rest[i], int.from_bytes(rest[i + 1 : i + 3], "big")
        if i + 3 + size > len(rest):
            raise ProxyProtocolError(f"v2 TLV type {kind:#x} claims {size} bytes past the header")
        tlvs.append((kind, rest[i + 3 : i + 3 + size]))
        i += 3 + size
    return tuple(tlvs)


def build_v1(source: Endpoint, destination: Endpoint) -> bytes:
    """`PROXY TCP4|TCP6 ...\\r\\n`, or `PROXY UNKNOWN\\r\\n` when an address is not IP."""
    if not isinstance(source, tuple) or not isinstance(destination, tuple):
        return b"PROXY UNKNOWN\r\n"
    src, dst = _same_family(source[0], destination[0])
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {_text(src)} {_text(dst)} {source[1]} {destination[1]}\r\n".encode(
        "ascii"
    )


def _text(ip: _IP) -> str:
    """IPv4-mapped IPv6 as ::ffff:a.b.c.d, as inet_ntop (and HAProxy) writes it."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _same_family(source: str, destination: str) -> tuple[_IP, _IP]:
    """Both addresses in one family: when they differ, the IPv4 one becomes ::ffff:a.b.c.d
    (as HAProxy does)."""
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address(destination)
    if src.version == dst.version:
        return src, dst
    return _mapped(src), _mapped(dst)


def _mapped(ip: _IP) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return ip


def build_v2(
    source: Endpoint,
    destination: Endpoint,
    *,
    local: bool = False,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """The binary header; LOCAL (or non-IP/unix endpoints) carries no addresses."""
    body = b""
    fam_proto = 0
    if not local and isinstance(source, tuple) and isinstance(destination, tuple):
        src, dst = _same_family(source[0], destination[0])
        packer = _V2_INET if src.version == 4 else _V2_INET6
        family = socket.AF_INET if src.version == 4 else socket.AF_INET6
        body = packer.pack(src.packed, dst.packed, source[1], destination[1])
        fam_proto = (_V2_FAMILY_CODES[family] << 4) | _V2_STREAM
    elif not local and isinstance(source, str) and isinstance(destination, str):
        s, d = source.encode(), destination.encode()
        if len(s) > 108 or len(d) > 108:
            raise ProxyProtocolError("unix paths longer than 108 bytes do not fit a v2 header")
        body = _V2_UNIX.pack(s, d)
        fam_proto = (_V2_FAMILY_CODES[socket.AF_UNIX] << 4) | _V2_STREAM
    for kind, value in tlvs:
        if not 0 <= kind <= 255 or len(value) > 65535:
            raise ProxyProtocolError(f"v2 TLV type {kind} / length {len(value)} out of range")
        body += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if len(body) > 65535:
        raise ProxyProtocolError("v2 header body longer than 65535 bytes")
    cmd = _V2_CMD_LOCAL if local or fam_proto == 0 else _V2_CMD_PROXY
    return _V2_HEAD.pack(V2_SIGNATURE, 0x20 | cmd, fam_proto, len(body)) + body


def build(version: int, source: Endpoint, destination: Endpoint) -> bytes:
    """`send-proxy` (1) or `send-proxy-v2` (2) for a connection from source to destination."""
    if version == 1:
        return build_v1(source, destination)
    if version == 2:
        return build_v2(source, destination)
    raise ValueError(f"PROXY protocol version must be 1 or 2, got {version}")
