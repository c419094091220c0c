"""What an MPTCP connection is doing: `info()` and `subflows()`.

`subflows()` uses MPTCP_FULL_INFO (6.5+: one call, one consistent snapshot) and falls
back to MPTCP_TCPINFO + MPTCP_SUBFLOW_ADDRS (5.16+) on older kernels.
"""

from __future__ import annotations

import errno
import socket

from mptcpkit._libc import getsockopt_inout, getsockopt_into
from mptcpkit.abi import constants as c
from mptcpkit.abi._record import record
from mptcpkit.abi.mptcp_info import MPTCP_INFO_SIZE, MPTCPInfo, decode_mptcp_info
from mptcpkit.abi.sockaddr import SockAddr
from mptcpkit.abi.subflow import (
    FULL_INFO_HEADER_SIZE,
    SUBFLOW_ADDRS_SIZE,
    SUBFLOW_DATA_SIZE,
    SUBFLOW_INFO_SIZE,
    decode_full_info,
    decode_subflow_addrs,
    decode_subflow_data,
    decode_subflow_info,
    encode_full_info,
    encode_subflow_data,
    split_elements,
)
from mptcpkit.abi.tcp_info import TCP_INFO_SIZE, TCPInfo, decode_tcp_info
from mptcpkit.status import SocketLike, file_descriptor
from mptcpkit.support import kernel_features

_NOT_MPTCP = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT})
_MAX_SUBFLOWS = 256  # the kernel's own limit on subflows per connection is far lower


@record
class Subflow:
    """One TCP subflow of an MPTCP connection, with the `tcp_info` fields worth watching.

    `id` is the kernel's subflow id (None on kernels before 6.5); rates are bytes/s,
    times microseconds. The whole `tcp_info` is in `tcp`.
    """

    id: int | None
    local: SockAddr
    remote: SockAddr
    state: str
    rtt_us: int
    rttvar_us: int
    cwnd: int
    retransmits: int
    bytes_acked: int | None
    bytes_received: int | None
    bytes_sent: int | None
    delivery_rate: int | None
    tcp: TCPInfo

    @classmethod
    def from_tcp_info(
        cls, subflow_id: int | None, local: SockAddr, remote: SockAddr, tcp: TCPInfo
    ) -> Subflow:
        return cls(
            subflow_id,
            local,
            remote,
            tcp.state_name,
            tcp.rtt_us,
            tcp.rttvar_us,
            tcp.cwnd,
            tcp.total_retrans,
            tcp.bytes_acked,
            tcp.bytes_received,
            tcp.bytes_sent,
            tcp.delivery_rate,
            tcp,
        )


def info(sock: SocketLike) -> MPTCPInfo | None:
    """The connection's `struct mptcp_info`, or None when the socket is not (or no
    longer) MPTCP."""
    try:
        if isinstance(sock, socket.socket):
            raw = sock.getsockopt(c.SOL_MPTCP, c.MPTCP_INFO, MPTCP_INFO_SIZE)
        else:
            fd = file_descriptor(sock)
            raw = getsockopt_inout(fd, c.SOL_MPTCP, c.MPTCP_INFO, b"", MPTCP_INFO_SIZE)
    except OSError as exc:
        if exc.errno in _NOT_MPTCP:
            return None
        raise
    return decode_mptcp_info(raw)


def subflows(sock: SocketLike) -> list[Subflow]:
    """Every subflow of an MPTCP connection; [] when the socket is not MPTCP."""
    fd = file_descriptor(sock)
    try:
        if kernel_features().full_info:
            return _subflows_full_info(fd)
        return _subflows_split(fd)
    except OSError as exc:
        if exc.errno in _NOT_MPTCP:
            return []
        raise


def _subflows_full_info(fd: int) -> list[Subflow]:
    import ctypes  # here, not at the top: it costs every `import mptcpkit` several ms

    capacity = 4
    while True:
        sfinfo = ctypes.create_string_buffer(capacity * SUBFLOW_INFO_SIZE)
        tcpinfo = ctypes.create_string_buffer(capacity * TCP_INFO_SIZE)
        request = encode_full_info(
            TCP_INFO_SIZE,
            SUBFLOW_INFO_SIZE,
            capacity,
            ctypes.addressof(sfinfo),
            ctypes.addressof(tcpinfo),
        )
        buf = ctypes.create_string_buffer(request, FULL_INFO_HEADER_SIZE + MPTCP_INFO_SIZE)
        length = getsockopt_into(fd, c.SOL_MPTCP, c.MPTCP_FULL_INFO, buf)
        header, _ = decode_full_info(buf.raw[:length])
        if header.num_subflows <= capacity or capacity >= _MAX_SUBFLOWS:
            break
        capacity *= 2
    tcp_stride, sf_stride = header.size_tcpinfo_user, header.size_sfinfo_user
    result = []
    for i in range(min(header.num_subflows, capacity)):
        sf = sfinfo.raw[i * sf_stride : (i + 1) * sf_stride]
        tcp = tcpinfo.raw[i * tcp_stride : (i + 1) * tcp_stride]
        subflow_id, local, remote = decode_subflow_info(sf)
        result.append(Subflow.from_tcp_info(subflow_id, local, remote, decode_tcp_info(tcp)))
    return result


def _subflow_array(fd: int, optname: int, element: int) -> list[bytes]:
    capacity = 4
    while True:
        raw = getsockopt_inout(
            fd,
            c.SOL_MPTCP,
            optname,
            encode_subflow_data(element),
            SUBFLOW_DATA_SIZE + capacity * element,
        )
        header = decode_subflow_data(raw)
        if header.num_subflows <= capacity or capacity >= _MAX_SUBFLOWS:
            return split_elements(raw, header)
        capacity *= 2


def _subflows_split(fd: int) -> list[Subflow]:
    tcp_infos = _subflow_array(fd, c.MPTCP_TCPINFO, TCP_INFO_SIZE)
    addrs = _subflow_array(fd, c.MPTCP_SUBFLOW_ADDRS, SUBFLOW_ADDRS_SIZE)
    # Two calls, two snapshots: a subflow may come or go in between; pair what both saw.
    return [
        Subflow.from_tcp_info(None, *decode_subflow_addrs(a), decode_tcp_info(t))
        for t, a in zip(tcp_infos, addrs, strict=False)
    ]
