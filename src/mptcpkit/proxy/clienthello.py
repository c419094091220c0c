"""The server name (SNI) of a TLS ClientHello, read without terminating TLS.

HAProxy's `req.ssl_sni`: a frontend routing on the name the client asks for looks at
the first bytes the client sent, and never answers them. This module is that look,
and nothing else: pure, no I/O (h11 style), fed whatever has arrived so far.

`parse(data)` says one of three things:

- `None`: not enough yet (a ClientHello may come in several TCP segments, and its
  handshake message in several TLS records);
- `Hello(sni)`: a whole ClientHello; `sni` is its first `host_name` in the
  server_name extension (RFC 6066), or None when it names none. With Encrypted
  Client Hello the outer hello's name (the client-facing server's) is read, as
  HAProxy does; GREASE values (RFC 8701) are extensions like any other;
- `NotTLS(why)`: these bytes are not a TLS ClientHello (plain text, SSLv2, a record
  too long, a malformed hello), so waiting longer would not help.

The reader never raises on any input, and gives up after `LIMIT` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LIMIT", "Hello", "NotTLS", "parse"]

LIMIT = 65536  # bytes of records read at most before giving up on a hello
_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_MAX_RECORD = 16384 + 2048  # TLSCiphertext's limit; a ClientHello record is plaintext


@dataclass(frozen=True)
class Hello:
    """A whole ClientHello: the name it asks for, or None."""

    sni: str | None


@dataclass(frozen=True)
class NotTLS:
    """The bytes are not (or cannot be) a TLS ClientHello: why."""

    why: str


def parse(data: bytes | bytearray | memoryview) -> Hello | NotTLS | None:
    """The ClientHello at the start of `data`: None while incomplete (see module doc)."""
    msg = _handshake(bytes(data[:LIMIT]))
    if msg is None or isinstance(msg, NotTLS):
        if msg is None and len(data) >= LIMIT:
            return NotTLS(f"no whole ClientHello in the first {LIMIT} bytes")
        return msg
    return _client_hello(msg)


def _handshake(data: bytes) -> bytes | NotTLS | None:
    """The first handshake message, put together from as many records as it takes."""
    body = bytearray()
    pos = 0
    need = -1  # the message's length once its 4-byte header is in
    while True:
        if len(data) - pos < 5:
            if pos == 0 and data and not _tls_start(data):
                return NotTLS("not a TLS handshake record")
            return None
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != _HANDSHAKE:
            return NotTLS(f"record type {ctype} before the ClientHello was whole")
        if major != 3 or minor > 4:
            return NotTLS(f"record version {major}.{minor} is not TLS")
        if length == 0 or length > _MAX_RECORD:
            return NotTLS(f"handshake record of {length} bytes")
        end = pos + 5 + length
        body += data[pos + 5 : end]  # the part that came, if the record is cut short
        if need < 0 and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                return NotTLS(f"handshake message type {body[0]}, not a ClientHello")
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > LIMIT:
                return NotTLS(f"a ClientHello of {need} bytes, more than {LIMIT}")
        if need >= 0 and len(body) >= need:
            return bytes(body[4:need])
        if end > len(data):
            return None
        pos = end


def _tls_start(data: bytes) -> bool:
    """Whether a prefix shorter than a record header may still be one."""
    if data[0] != _HANDSHAKE:
        return False
    return len(data) < 2 or data[1] == 3


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def num(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        return self.take(self.num(n))

    def left(self) -> int:
        return len(self.data) - self.pos


def _client_hello(msg: bytes) -> Hello | NotTLS:
    c = _Cursor(msg)
    try:
        c.take(2 + 32)  # legacy_version, random
        if len(c.vector(1)) > 32:
            return NotTLS("session id longer than 32 bytes")
        suites = c.vector(2)
        if not suites or len(suites) % 2:
            return NotTLS("bad cipher suite list")
        if not c.vector(1):
            return NotTLS("no compression method")
        if not c.left():
            return Hello(None)  # no extensions at all (TLS 1.0 style)
        ext = _Cursor(c.vector(2))
        if c.left():
            return NotTLS("bytes after the extensions")
        while ext.left():
            kind = ext.num(2)
            value = ext.vector(2)
            if kind == _SERVER_NAME:
                return _server_name(value)
        return Hello(None)
    except ValueError:
        return NotTLS("truncated ClientHello")


def _server_name(value: bytes) -> Hello | NotTLS:
    names = _Cursor(value)
    entries = _Cursor(names.vector(2))
    if names.left():
        return NotTLS("bytes after the server name list")
    while entries.left():
        kind = entries.num(1)
        name = entries.vector(2)
        if kind == _HOST_NAME:
            if not name or b"\0" in name or any(b > 0x7E or b < 0x21 for b in name):
                return NotTLS("a server name that is not a printable ASCII host name")
            return Hello(name.decode("ascii"))
    return Hello(None)
