"""The 0-RTT TCP Convert Protocol (RFC 8803): how a site gateway names a destination.

I/O-free. A client of a Transport Converter starts its connection with a Convert
message — a 4-byte header, then TLVs — and the converter answers with a Convert
message of its own (empty on success, an Error TLV on refusal) before the server's
bytes. `parse()` takes the bytes received so far and says "need more" (None), "here
is the message and its length", or raises `ConvertError` carrying the error code the
converter must answer with. `build()` makes the bytes.

Layouts (RFC 8803 §4; every length counts 32-bit words and includes its own header):

    header:  version=1 (8) | total length (8, header included) | unassigned (16)
    TLV:     type (8) | length (8) | value, padded to a multiple of 4 bytes
    Info 0x01:                unassigned (16)
    Connect 0x0A:             remote port (16) | remote address (128; IPv4 as
                              ::ffff:a.b.c.d) | TCP options (variable)
    Extended TCP Header 0x14: unassigned (16) | the server's SYN+ACK TCP header
    Supported TCP Ext. 0x15:  unassigned (16) | option kinds, one byte each
    Cookie 0x16:              zero (16) | opaque cookie
    Error 0x1E:               error code (8) | value (variable)
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_MESSAGE",
    "VERSION",
    "Connect",
    "ConvertError",
    "Cookie",
    "Error",
    "ErrorCode",
    "ExtendedTCPHeader",
    "Info",
    "Message",
    "SupportedTCPExtensions",
    "TLVType",
    "build",
    "connect_request",
    "error_reply",
    "parse",
    "parse_reply",
    "parse_request",
]

VERSION = 1
MAX_MESSAGE = 255 * 4  # the total length is 8 bits of 32-bit words
_HEAD = struct.Struct("!BBH")
_CONNECT = struct.Struct("!BBH16s")
_MAPPED = b"\x00" * 10 + b"\xff\xff"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TLVType(enum.IntEnum):
    INFO = 0x01
    CONNECT = 0x0A
    EXTENDED_TCP_HEADER = 0x14
    SUPPORTED_TCP_EXTENSIONS = 0x15
    COOKIE = 0x16
    ERROR = 0x1E


class ErrorCode(enum.IntEnum):
    """IANA "TCP Convert Protocol Parameters", Convert Error Messages."""

    UNSUPPORTED_VERSION = 0x00
    MALFORMED_MESSAGE = 0x01
    UNSUPPORTED_MESSAGE = 0x02
    MISSING_COOKIE = 0x03
    NOT_AUTHORIZED = 0x20
    UNSUPPORTED_TCP_OPTION = 0x21
    RESOURCE_EXCEEDED = 0x40
    NETWORK_FAILURE = 0x41
    CONNECTION_RESET = 0x60
    DESTINATION_UNREACHABLE = 0x61


class ConvertError(ValueError):
    """A Convert message that cannot be accepted: the code to answer with, and why."""

    def __init__(self, code: ErrorCode, reason: str, value: bytes = b"") -> None:
        self.code = code
        self.reason = reason
        self.value = value
        super().__init__(f"{code.name.lower().replace('_', ' ')}: {reason}")


@dataclass(frozen=True)
class Info:
    """Asks the converter which TCP extensions it supports."""


@dataclass(frozen=True)
class Connect:
    """The destination; `options` are TCP options for the converter's SYN to it."""

    address: IPAddress
    port: int
    options: bytes = b""


@dataclass(frozen=True)
class ExtendedTCPHeader:
    """The TCP header (options included) of the SYN+ACK the converter got back."""

    header: bytes


@dataclass(frozen=True)
class SupportedTCPExtensions:
    kinds: tuple[int, ...]


@dataclass(frozen=True)
class Cookie:
    opaque: bytes


@dataclass(frozen=True)
class Error:
    """A refusal; `value` (error-specific) is zero-padded to whole words on the wire."""

    code: int
    value: bytes = b""

    @property
    def name(self) -> str:
        try:
            return ErrorCode(self.code).name.lower().replace("_", " ")
        except ValueError:
            return f"error 0x{self.code:02x}"


TLV = Info | Connect | ExtendedTCPHeader | SupportedTCPExtensions | Cookie | Error


@dataclass(frozen=True)
class Message:
    tlvs: tuple[TLV, ...] = ()

    def find(self, kind: type[TLV]) -> TLV | None:
        for t in self.tlvs:
            if isinstance(t, kind):
                return t
        return None


# --- building -----------------------------------------------------------------------


def _pad(b: bytes) -> bytes:
    return b + b"\x00" * (-len(b) % 4)


def _tlv(kind: int, body: bytes) -> bytes:
    """`body` follows the type and length bytes; padded to whole words."""
    raw = _pad(bytes(2) + body)
    words = len(raw) // 4
    if words > 255:
        raise ValueError(f"TLV 0x{kind:02x} too long ({len(raw)} bytes, at most 1020)")
    return bytes((kind, words)) + raw[2:]


def _address16(address: IPAddress) -> bytes:
    if isinstance(address, ipaddress.IPv4Address):
        return _MAPPED + address.packed
    return address.packed


def _encode(t: TLV) -> bytes:
    if isinstance(t, Info):
        return _tlv(TLVType.INFO, b"\x00\x00")
    if isinstance(t, Connect):
        if not 0 <= t.port <= 0xFFFF:
            raise ValueError(f"port {t.port} out of range")
        if len(t.options) % 4:
            raise ValueError("Connect TCP options must be padded to 4 bytes (NOP/EOL)")
        return _tlv(TLVType.CONNECT, struct.pack("!H", t.port) + _address16(t.address) + t.options)
    if isinstance(t, ExtendedTCPHeader):
        if len(t.header) % 4:
            raise ValueError("a TCP header is whole 32-bit words")
        return _tlv(TLVType.EXTENDED_TCP_HEADER, b"\x00\x00" + t.header)
    if isinstance(t, SupportedTCPExtensions):
        if any(not 1 <= k <= 255 for k in t.kinds):
            raise ValueError("TCP option kinds are 1..255")
        return _tlv(TLVType.SUPPORTED_TCP_EXTENSIONS, b"\x00\x00" + bytes(t.kinds))
    if isinstance(t, Cookie):
        if len(t.opaque) % 4:
            raise ValueError("a cookie is whole 32-bit words")
        return _tlv(TLVType.COOKIE, b"\x00\x00" + t.opaque)
    if not 0 <= t.code <= 255:
        raise ValueError(f"error code {t.code} out of range")
    return _tlv(TLVType.ERROR, bytes((t.code,)) + t.value)


def build(tlvs: tuple[TLV, ...] | list[TLV] = ()) -> bytes:
    """A Convert message: header and TLVs."""
    body = b"".join(_encode(t) for t in tlvs)
    total = 4 + len(body)
    if total > MAX_MESSAGE:
        raise ValueError(f"Convert message too long ({total} bytes, at most {MAX_MESSAGE})")
    return _HEAD.pack(VERSION, total // 4, 0) + body


def connect_request(host: str, port: int, cookie: bytes | None = None) -> bytes:
    """What a site gateway sends first: Connect to (host, port), with the cookie if any."""
    tlvs: list[TLV] = [Connect(ipaddress.ip_address(host.split("%")[0]), port)]
    if cookie is not None:
        tlvs.append(Cookie(cookie))
    return build(tlvs)


def error_reply(code: ErrorCode, value: bytes = b"") -> bytes:
    return build([Error(code, value)])


# --- parsing ------------------------------------------------------------------------


def parse(data: bytes | bytearray | memoryview) -> tuple[Message, int] | None:
    """Decode the message at the start of `data`: (message, bytes used), None if incomplete."""
    buf = bytes(data[:MAX_MESSAGE])
    if not buf:
        return None
    if buf[0] != VERSION:
        raise ConvertError(
            ErrorCode.UNSUPPORTED_VERSION, f"version {buf[0]}, not {VERSION}", bytes((VERSION,))
        )
    if len(buf) < 4:
        return None
    _, words, _ = _HEAD.unpack_from(buf)
    if words < 1:
        raise ConvertError(ErrorCode.MALFORMED_MESSAGE, "total length 0", b"\x01")
    total = words * 4
    if len(buf) < total:
        return None
    tlvs: list[TLV] = []
    off = 4
    while off < total:
        if off + 2 > total:
            raise _malformed(off, "TLV header past the total length")
        kind, length = buf[off], buf[off + 1]
        end = off + length * 4
        if length == 0 or end > total:
            raise _malformed(off, f"TLV 0x{kind:02x} of {length} words past the total length")
        tlvs.append(_decode(kind, buf[off:end], off))
        off = end
    return Message(tuple(tlvs)), total


def _malformed(offset: int, reason: str) -> ConvertError:
    return ConvertError(
        ErrorCode.MALFORMED_MESSAGE, f"{reason} (byte {offset})", bytes((min(offset // 4, 255),))
    )


def _decode(kind: int, raw: bytes, off: int) -> TLV:
    if kind == TLVType.INFO:
        return Info()
    if kind == TLVType.CONNECT:
        if len(raw) < _CONNECT.size:
            raise _malformed(off, f"Connect TLV of {len(raw)} bytes (at least {_CONNECT.size})")
        _, _, port, addr = _CONNECT.unpack_from(raw)
        address: IPAddress = (
            ipaddress.IPv4Address(addr[12:])
            if addr[:12] == _MAPPED
            else ipaddress.IPv6Address(addr)
        )
        return Connect(address, port, raw[_CONNECT.size :])
    if kind == TLVType.EXTENDED_TCP_HEADER:
        return ExtendedTCPHeader(raw[4:])
    if kind == TLVType.SUPPORTED_TCP_EXTENSIONS:
        return SupportedTCPExtensions(tuple(k for k in raw[4:] if k))
    if kind == TLVType.COOKIE:
        return Cookie(raw[4:])
    if kind == TLVType.ERROR:
        return Error(raw[2], raw[3:])
    raise ConvertError(
        ErrorCode.UNSUPPORTED_MESSAGE, f"unknown TLV type 0x{kind:02x} (byte {off})", bytes((kind,))
    )


def parse_request(data: bytes | bytearray | memoryview) -> tuple[Message, int] | None:
    """A client's message, as a converter reads it: Info, or one Connect (with an
    optional Cookie); a TLV only a converter sends is an unsupported message."""
    parsed = parse(data)
    if parsed is None:
        return None
    msg, used = parsed
    connects = info = 0
    for t in msg.tlvs:  # one pass: this runs once per converted connection
        if isinstance(t, Connect):
            connects += 1
        elif isinstance(t, Info):
            info = 1
        elif isinstance(t, _CONVERTER_ONLY):
            kind = _kind_of(t)
            raise ConvertError(
                ErrorCode.UNSUPPORTED_MESSAGE,
                f"TLV 0x{kind:02x} is not sent by a client",
                bytes((kind,)),
            )
    if connects > 1:
        raise ConvertError(ErrorCode.MALFORMED_MESSAGE, "more than one Connect TLV", b"\x01")
    if not connects and not info:
        raise ConvertError(ErrorCode.MALFORMED_MESSAGE, "neither Connect nor Info TLV", b"\x01")
    return msg, used


_CONVERTER_ONLY = (ExtendedTCPHeader, SupportedTCPExtensions, Error)


def parse_reply(data: bytes | bytearray | memoryview) -> tuple[Message, int] | None:
    """A converter's answer, as a client reads it (any TLV; an Error says it refused)."""
    return parse(data)


def _kind_of(t: TLV) -> int:
    return {
        Info: TLVType.INFO,
        Connect: TLVType.CONNECT,
        ExtendedTCPHeader: TLVType.EXTENDED_TCP_HEADER,
        SupportedTCPExtensions: TLVType.SUPPORTED_TCP_EXTENSIONS,
        Cookie: TLVType.COOKIE,
        Error: TLVType.ERROR,
    }[type(t)]
