"""The namespace's MPTCP connections and their subflows, read from sock_diag (`ss -M`).

A path manager that starts while connections are already open (after a crash, say)
learns them here instead of from events it never saw: each MPTCP socket with its
token and addresses (the `mptcp` inet_diag handler, asked for with the
INET_DIAG_REQ_PROTOCOL attribute since 262 does not fit the request's byte), and each
TCP subflow with the token of its connection (the `mptcp` ULP info of a TCP dump,
as `ss -ti` shows it). Parsing is plain functions over bytes; `connections()` does
the two dumps on a socket opened in the calling thread's namespace.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import struct
from collections.abc import Iterator

from mptcpkit.abi.constants import IPPROTO_MPTCP
from mptcpkit.abi.mptcp_info import MPTCP_INFO_MIN_SIZE, decode_mptcp_info

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_INFO = 2
INET_DIAG_ULP_INFO = 19
INET_DIAG_REQ_PROTOCOL = 3
INET_ULP_INFO_NAME = 1
INET_ULP_INFO_MPTCP = 3
MPTCP_SUBFLOW_ATTR_TOKEN_LOC = 2
MPTCP_SUBFLOW_ATTR_ID_REM = 9
MPTCP_SUBFLOW_ATTR_ID_LOC = 10
TCP_ESTABLISHED = 1
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48s")  # inet_diag_req_v2
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg
_RTA = struct.Struct("=HH")
_seq = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class DiagSocket:
    """One socket as inet_diag lists it: addresses, state and its attributes."""

    family: int
    state: int
    local: tuple[str, int]
    remote: tuple[str, int]
    attrs: dict[int, bytes]


@dataclasses.dataclass(frozen=True)
class SubflowEntry:
    token: int
    local: tuple[str, int]
    remote: tuple[str, int]
    local_id: int | None
    remote_id: int | None


@dataclasses.dataclass
class Connection:
    """An open MPTCP connection: its token, initial addresses and live subflows."""

    token: int
    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    server_side: bool
    subflows: list[SubflowEntry] = dataclasses.field(default_factory=list)


def _align(n: int) -> int:
    return (n + 3) & ~3


def attributes(data: bytes) -> dict[int, bytes]:
    """A run of rtattrs -> {type (nested bit cleared): payload}."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, pos)
        if length < _RTA.size or pos + length > len(data):
            break
        out[kind & 0x3FFF] = data[pos + _RTA.size : pos + length]
        pos += _align(length)
    return out


def _address(family: int, raw: bytes) -> str:
    """As the events name it: IPv4 (also when v4-mapped on an IPv6 socket) or IPv6."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def request(family: int, protocol: int, states: int = ALL_STATES) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request for `protocol` (MPTCP through the attribute)."""
    ext = 1 << (INET_DIAG_INFO - 1)
    body = _REQ.pack(family, protocol & 0xFF, ext, 0, states, b"\0" * 48)
    if protocol > 0xFF:
        body += _RTA.pack(8, INET_DIAG_REQ_PROTOCOL) + struct.pack("=I", protocol)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, next(_seq), 0
    )
    return header + body


def parse_messages(data: bytes) -> Iterator[DiagSocket | None]:
    """Replies of one datagram; None marks the end of the dump. OSError on a netlink error."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq_no, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size:
            return
        body = data[pos + _NLMSGHDR.size : pos + length]
        pos += _align(length)
        if kind == NLMSG_DONE:
            yield None
            return
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", body)
            if code:
                raise OSError(-code, f"sock_diag dump: {os.strerror(-code)}")
            yield None
            return
        if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
            continue
        (family, state, _t, _r, sport, dport, src, dst, _if, _cookie, *_rest) = _MSG.unpack_from(
            body
        )
        yield DiagSocket(
            family=family,
            state=state,
            local=(_address(family, src), int.from_bytes(sport, "big")),
            remote=(_address(family, dst), int.from_bytes(dport, "big")),
            attrs=attributes(body[_MSG.size :]),
        )


def subflow_entry(sock: DiagSocket) -> SubflowEntry | None:
    """The MPTCP side of a TCP socket (None if it is not a subflow)."""
    ulp = attributes(sock.attrs.get(INET_DIAG_ULP_INFO, b""))
    if ulp.get(INET_ULP_INFO_NAME, b"").rstrip(b"\0") != b"mptcp":
        return None
    mp = attributes(ulp.get(INET_ULP_INFO_MPTCP, b""))
    token = mp.get(MPTCP_SUBFLOW_ATTR_TOKEN_LOC)
    if token is None or len(token) < 4:
        return None

    def u8(key: int) -> int | None:
        value = mp.get(key)
        return value[0] if value else None

    return SubflowEntry(
        token=struct.unpack("=I", token[:4])[0],
        local=sock.local,
        remote=sock.remote,
        local_id=u8(MPTCP_SUBFLOW_ATTR_ID_LOC),
        remote_id=u8(MPTCP_SUBFLOW_ATTR_ID_REM),
    )


def _dump(protocol: int, family: int) -> list[DiagSocket]:
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as sock:
        sock.bind((0, 0))
        sock.send(request(family, protocol))
        out: list[DiagSocket] = []
        while True:
            for entry in parse_messages(sock.recv(1 << 16)):
                if entry is None:
                    return out
                out.append(entry)


def connections() -> list[Connection]:
    """Open MPTCP connections of this thread's namespace, with their subflows.

    A connection is `server_side` when its local port is one an MPTCP listener holds.
    """
    msks: list[DiagSocket] = []
    tcp: list[DiagSocket] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        msks += _dump(IPPROTO_MPTCP, family)
        tcp += _dump(socket.IPPROTO_TCP, family)
    listening = {s.local[1] for s in msks if s.state == TCP_LISTEN}
    conns: dict[int, Connection] = {}
    for s in msks:
        raw = s.attrs.get(INET_DIAG_INFO, b"")
        if s.state == TCP_LISTEN or len(raw) < MPTCP_INFO_MIN_SIZE:
            continue
        info = decode_mptcp_info(raw)
        if not info.token:
            continue
        conns[info.token] = Connection(
            token=info.token,
            family=socket.AF_INET6 if ":" in s.local[0] else socket.AF_INET,
            local=s.local,
            remote=s.remote,
            server_side=s.local[1] in listening,
        )
    for s in tcp:
        entry = subflow_entry(s)
        if entry is not None and entry.token in conns and s.state == TCP_ESTABLISHED:
            conns[entry.token].subflows.append(entry)
    return list(conns.values())
