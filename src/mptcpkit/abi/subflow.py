"""The per-subflow getsockopt structs of include/uapi/linux/mptcp.h.

MPTCP_TCPINFO and MPTCP_SUBFLOW_ADDRS take a `struct mptcp_subflow_data` header that
the caller fills in (so Python's socket.getsockopt, which cannot pass input bytes, is
useless for them). MPTCP_FULL_INFO (6.5+) takes a `struct mptcp_full_info` holding two
user-space pointers to arrays the caller allocates, and fills all of it in one call.
"""

from __future__ import annotations

import struct

from mptcpkit.abi._decode import require_length
from mptcpkit.abi._record import record
from mptcpkit.abi.mptcp_info import MPTCPInfo, decode_mptcp_info
from mptcpkit.abi.sockaddr import SOCKADDR_STORAGE_SIZE, SockAddr, decode_sockaddr

# struct mptcp_subflow_data {u32 size_subflow_data, num_subflows, size_kernel, size_user;}
SUBFLOW_DATA = struct.Struct("<IIII")
SUBFLOW_DATA_SIZE = SUBFLOW_DATA.size  # 16, and 8-byte aligned: elements follow directly

# struct mptcp_subflow_addrs: two sockaddr_storage unions, local then remote.
SUBFLOW_ADDRS_SIZE = 2 * SOCKADDR_STORAGE_SIZE
# struct mptcp_subflow_info {u32 id; (pad to 8) struct mptcp_subflow_addrs addrs;}
SUBFLOW_INFO_SIZE = 8 + SUBFLOW_ADDRS_SIZE

# struct mptcp_full_info: six u32, two u64 pointers, then struct mptcp_info.
FULL_INFO_HEADER = struct.Struct("<IIIIIIQQ")
FULL_INFO_HEADER_SIZE = FULL_INFO_HEADER.size  # 40


@record
class SubflowData:
    """The header the kernel writes back: how many subflows, and its element size."""

    size_subflow_data: int
    num_subflows: int
    size_kernel: int
    size_user: int


def encode_subflow_data(element_size: int) -> bytes:
    """The request header: 'I understand this header; give me elements this large'."""
    return SUBFLOW_DATA.pack(SUBFLOW_DATA_SIZE, 0, 0, element_size)


def decode_subflow_data(data: bytes) -> SubflowData:
    require_length(data, SUBFLOW_DATA_SIZE, "struct mptcp_subflow_data")
    return SubflowData(*SUBFLOW_DATA.unpack_from(data, 0))


def split_elements(data: bytes, header: SubflowData) -> list[bytes]:
    """The array elements after the header, as many as both the kernel and buffer hold."""
    size = header.size_user
    if size <= 0:
        return []
    body = data[SUBFLOW_DATA_SIZE:]
    count = min(header.num_subflows, len(body) // size)
    return [body[i * size : (i + 1) * size] for i in range(count)]


def decode_subflow_addrs(data: bytes) -> tuple[SockAddr, SockAddr]:
    """(local, remote) of one `struct mptcp_subflow_addrs`."""
    require_length(data, SUBFLOW_ADDRS_SIZE, "struct mptcp_subflow_addrs")
    local = decode_sockaddr(data[:SOCKADDR_STORAGE_SIZE])
    remote = decode_sockaddr(data[SOCKADDR_STORAGE_SIZE:SUBFLOW_ADDRS_SIZE])
    return local, remote


def decode_subflow_info(data: bytes) -> tuple[int, SockAddr, SockAddr]:
    """(id, local, remote) of one `struct mptcp_subflow_info`."""
    require_length(data, SUBFLOW_INFO_SIZE, "struct mptcp_subflow_info")
    (subflow_id,) = struct.unpack_from("<I", data, 0)
    local, remote = decode_subflow_addrs(data[8:SUBFLOW_INFO_SIZE])
    return subflow_id, local, remote


@record
class FullInfoHeader:
    size_tcpinfo_kernel: int
    size_tcpinfo_user: int
    size_sfinfo_kernel: int
    size_sfinfo_user: int
    num_subflows: int
    size_arrays_user: int
    subflow_info: int
    tcp_info: int


def encode_full_info(
    tcpinfo_size: int, sfinfo_size: int, count: int, sfinfo_addr: int, tcpinfo_addr: int
) -> bytes:
    """The request: element sizes, array capacity and the two arrays' user addresses."""
    return FULL_INFO_HEADER.pack(
        0, tcpinfo_size, 0, sfinfo_size, 0, count, sfinfo_addr, tcpinfo_addr
    )


def decode_full_info(data: bytes) -> tuple[FullInfoHeader, MPTCPInfo]:
    require_length(data, FULL_INFO_HEADER_SIZE, "struct mptcp_full_info")
    header = FullInfoHeader(*FULL_INFO_HEADER.unpack_from(data, 0))
    return header, decode_mptcp_info(data[FULL_INFO_HEADER_SIZE:])
