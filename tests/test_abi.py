"""Struct decoders: captured kernel bytes, and properties (a value or ValueError)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import captured
from mptcpkit.abi.md5sig import TCP_MD5SIG_SIZE, encode_tcp_md5sig
from mptcpkit.abi.mptcp_info import MPTCP_INFO_MIN_SIZE, decode_mptcp_info
from mptcpkit.abi.sockaddr import decode_sockaddr, encode_address, encode_sockaddr
from mptcpkit.abi.subflow import (
    SUBFLOW_INFO_SIZE,
    decode_full_info,
    decode_subflow_addrs,
    decode_subflow_data,
    decode_subflow_info,
    encode_full_info,
    encode_subflow_data,
    split_elements,
)
from mptcpkit.abi.tcp_info import TCP_INFO_MIN_SIZE, decode_tcp_info


def test_mptcp_info_captured() -> None:
    info = decode_mptcp_info(captured.MPTCP_INFO_6_18)
    assert info.subflows_max == 2
    assert info.token == 0xDD2BB7CE
    assert info.bytes_sent == 5000 and info.bytes_acked == 5000
    assert info.subflows_total == 1 and info.subflow_count == 1
    assert info.remote_key_received and not info.fallback
    assert info.last_ack_recv == 0


def test_mptcp_info_older_kernel_lengths() -> None:
    # A 5.9 kernel returns 40 bytes: later fields are None, the count still works.
    old = decode_mptcp_info(captured.MPTCP_INFO_6_18[:MPTCP_INFO_MIN_SIZE])
    assert old.token == 0xDD2BB7CE
    assert old.local_addr_used is None and old.bytes_sent is None and old.subflows_total is None
    assert old.subflow_count == 1
    # 6.5 (80 bytes) has the byte counters but not subflows_total.
    mid = decode_mptcp_info(captured.MPTCP_INFO_6_18[:80])
    assert mid.bytes_sent == 5000 and mid.subflows_total is None


def test_tcp_info_captured() -> None:
    tcp = decode_tcp_info(captured.TCP_INFO_232)
    assert tcp.state_name == "ESTABLISHED"
    assert (tcp.rtt_us, tcp.rttvar_us, tcp.cwnd) == (33, 17, 11)
    assert tcp.bytes_sent == 5000 and tcp.bytes_acked == 5001
    assert tcp.delivery_rate == 1637050000
    short = decode_tcp_info(captured.TCP_INFO_232[:TCP_INFO_MIN_SIZE])
    assert short.cwnd == 11 and short.bytes_acked is None


@pytest.mark.parametrize(
    ("raw", "local", "remote"),
    [
        (captured.SUBFLOW_ADDRS_V4, ("127.0.0.1", 46714), ("127.0.0.1", 45713)),
        (captured.SUBFLOW_ADDRS_V6, ("::1", 34310), ("::1", 40077)),
    ],
)
def test_subflow_addrs_captured(
    raw: bytes, local: tuple[str, int], remote: tuple[str, int]
) -> None:
    header = decode_subflow_data(raw)
    assert (header.num_subflows, header.size_kernel, header.size_user) == (1, 256, 256)
    (element,) = split_elements(raw, header)
    assert decode_subflow_addrs(element) == (local, remote)


def test_subflow_info_layout() -> None:
    element = struct.pack("<I4x", 7) + encode_sockaddr("10.0.0.1", 1) + encode_sockaddr("::2", 2)
    assert len(element) == SUBFLOW_INFO_SIZE == 264
    assert decode_subflow_info(element) == (7, ("10.0.0.1", 1), ("::2", 2))


def test_full_info_round_trip() -> None:
    request = encode_full_info(232, 264, 4, 0x1000, 0x2000)
    header, info = decode_full_info(request + captured.MPTCP_INFO_6_18)
    assert (header.size_tcpinfo_user, header.size_sfinfo_user, header.size_arrays_user) == (
        232,
        264,
        4,
    )
    assert (header.subflow_info, header.tcp_info) == (0x1000, 0x2000)
    assert info.token == 0xDD2BB7CE


def test_subflow_request_header() -> None:
    assert decode_subflow_data(encode_subflow_data(232)).size_user == 232


def test_md5sig_layout() -> None:
    raw = encode_tcp_md5sig("192.0.2.1", b"key")
    assert len(raw) == TCP_MD5SIG_SIZE
    assert decode_sockaddr(raw[:128]) == ("192.0.2.1", 0)
    assert struct.unpack_from("<BBHi", raw, 128) == (0, 0, 3, 0)
    assert raw[136:139] == b"key"
    with pytest.raises(ValueError, match="at most 80"):
        encode_tcp_md5sig("192.0.2.1", b"k" * 81)


@given(st.binary(max_size=300))
def test_decoders_return_or_raise_valueerror(data: bytes) -> None:
    decoders = (
        decode_mptcp_info,
        decode_tcp_info,
        decode_sockaddr,
        decode_subflow_data,
        decode_subflow_addrs,
        decode_subflow_info,
        decode_full_info,
    )
    for decode in decoders:
        with contextlib.suppress(ValueError):
            decode(data)


@given(st.binary(min_size=16, max_size=2000))
def test_split_elements_never_overreads(data: bytes) -> None:
    header = decode_subflow_data(data)
    elements = split_elements(data, header)
    assert all(len(e) == header.size_user for e in elements)
    assert len(elements) <= header.num_subflows


@given(st.ip_addresses(), st.integers(0, 65535))
def test_sockaddr_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    host, got_port = decode_sockaddr(encode_sockaddr(str(ip), port))
    assert ipaddress.ip_address(host) == ip and got_port == port
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    assert host == socket.inet_ntop(family, ip.packed)  # the socket module's spelling


def test_v4_mapped_addresses_read_as_the_socket_module_writes_them() -> None:
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::ffff:127.0.0.1", 0))
        mapped = server.getsockname()[:2]
    assert mapped[0] == "::ffff:127.0.0.1"
    assert decode_sockaddr(encode_sockaddr(*mapped)) == mapped


@given(st.ip_addresses(), st.integers(0, 65535))
def test_connect_address_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    raw = encode_address(family, (str(ip), port))
    assert len(raw) == (16 if ip.version == 4 else 28)  # sizeof sockaddr_in / sockaddr_in6
    host, got_port = decode_sockaddr(raw)
    assert ipaddress.ip_address(host) == ip and got_port == port


def test_connect_address_scope_and_unix_paths() -> None:
    raw = encode_address(socket.AF_INET6, ("fe80::1", 80, 0, 7))
    assert struct.unpack_from("=I", raw, 24) == (7,)  # scope id in host order
    family = struct.pack("=H", socket.AF_UNIX)
    assert encode_address(socket.AF_UNIX, "/tmp/s") == family + b"/tmp/s\0"
    assert encode_address(socket.AF_UNIX, "\0abstract") == family + b"\0abstract"
    with pytest.raises(ValueError, match="longer than 108 bytes"):
        encode_address(socket.AF_UNIX, "/" + "x" * 200)
    with pytest.raises(ValueError, match="not AF_INET, AF_INET6 or AF_UNIX"):
        encode_address(socket.AF_PACKET, ("eth0", 0))
