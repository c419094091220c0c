"""`struct tcp_md5sig` (include/uapi/linux/tcp.h), for TCP_MD5SIG / TCP_MD5SIG_EXT."""

from __future__ import annotations

import socket
import struct

from mptcpkit.abi.sockaddr import encode_sockaddr, pack_ip

TCP_MD5SIG_MAXKEYLEN = 80
TCP_MD5SIG_FLAG_PREFIX = 0x1
TCP_MD5SIG_FLAG_IFINDEX = 0x2
TCP_MD5SIG_SIZE = 216


def encode_tcp_md5sig(
    peer: str, key: bytes, *, prefixlen: int | None = None, ifindex: int = 0
) -> bytes:
    """The option value that installs `key` for `peer` (an IP literal).

    With `prefixlen`, the key covers the peer's whole prefix (use TCP_MD5SIG_EXT).
    The key is bytes, as everywhere in the socket module: encode a text key first.
    """
    if isinstance(key, str):
        raise TypeError(
            "the TCP-MD5 key must be bytes, not str: pass b'...' or key.encode() "
            "(the kernel compares the bytes, so the encoding is part of the key)"
        )
    key = bytes(key)
    if len(key) > TCP_MD5SIG_MAXKEYLEN:
        raise ValueError(f"TCP-MD5 key is {len(key)} bytes; the kernel takes at most 80")
    family, _ = pack_ip(peer)
    flags = 0
    if prefixlen is not None:
        if not 0 <= prefixlen <= (32 if family == socket.AF_INET else 128):
            raise ValueError(f"prefix length {prefixlen} is out of range for {peer}")
        flags |= TCP_MD5SIG_FLAG_PREFIX
    if ifindex:
        flags |= TCP_MD5SIG_FLAG_IFINDEX
    return (
        encode_sockaddr(peer, 0)
        + struct.pack("<BBHi", flags, prefixlen or 0, len(key), ifindex)
        + key.ljust(TCP_MD5SIG_MAXKEYLEN, b"\0")
    )
