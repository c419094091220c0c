"""The TCP-only option table: probed on the running kernel, and the static fallback
checked against that probe (a kernel that changes MPTCP's answers fails here)."""

from __future__ import annotations

import errno
import os
import socket
import sys

import pytest

import mptcpkit
from mptcpkit import State, lab
from mptcpkit.abi.optnames import NAMED_OPTIONS, SOL_IP, SOL_IPV6, SOL_SOCKET, SOL_TCP
from mptcpkit.options import (
    TCP_ONLY_OPTIONS,
    OptionInfo,
    option_name,
    probe_tcp_only_options,
    tcp_only_options,
    tcp_only_options_probed,
)


def test_static_table_is_what_this_kernel_says(no_fd_leak: None) -> None:
    live = probe_tcp_only_options()
    assert live is not None, "the probe could not make an MPTCP socket"
    added = sorted(o.name for k, o in live.items() if k not in TCP_ONLY_OPTIONS)
    gone = sorted(o.name for k, o in TCP_ONLY_OPTIONS.items() if k not in live)
    changed = sorted(
        f"{o.name}: {errno.errorcode[TCP_ONLY_OPTIONS[k].errno]} -> {errno.errorcode[o.errno]}"
        for k, o in live.items()
        if k in TCP_ONLY_OPTIONS and TCP_ONLY_OPTIONS[k].errno != o.errno
    )
    assert (added, gone, changed) == ([], [], []), (
        "this kernel disagrees with mptcpkit.options.TCP_ONLY_OPTIONS: "
        f"newly TCP-only {added}, no longer {gone}, other errno {changed}"
    )


def test_tcp_only_options_is_the_live_probe_cached() -> None:
    table = tcp_only_options()
    assert tcp_only_options() is table and tcp_only_options_probed()
    assert dict(table) == probe_tcp_only_options()
    with pytest.raises(TypeError):
        table[(0, 0)] = table[(SOL_TCP, 14)]  # type: ignore[index]
    md5 = table[(SOL_TCP, 14)]
    assert isinstance(md5, OptionInfo)
    assert (md5.name, md5.level, md5.optname, md5.errno) == (
        "TCP_MD5SIG",
        SOL_TCP,
        14,
        errno.ENOPROTOOPT,
    )


def test_options_named_by_level_and_number() -> None:
    assert option_name(SOL_SOCKET, 13) == "SO_LINGER"
    assert option_name(SOL_TCP, 13) == "TCP_CONGESTION"
    assert option_name(SOL_IPV6, 67) == "IPV6_TCLASS"
    assert option_name(SOL_IP, 2) == "IP_TTL"
    assert option_name(SOL_TCP, 999) == "option 999 at level SOL_TCP"


# The examples: refused by MPTCP, taken by TCP, missing from the old table.
_MISSING_BEFORE = {
    "IPV6_TCLASS": 0x10,
    "IPV6_UNICAST_HOPS": 7,
    "IPV6_MINHOPCOUNT": 255,
    "IPV6_MTU_DISCOVER": 2,
    "IPV6_DONTFRAG": 1,
    "IPV6_RECVPKTINFO": 1,
    "TCP_SYNCNT": 3,
    "TCP_RTO_MAX_MS": 5000,
    "IP_RECVTOS": 1,
    "SO_PEEK_OFF": 5,
    "SO_TXREHASH": 1,
    "SO_RCVMARK": 1,
}


@pytest.mark.parametrize("name", list(_MISSING_BEFORE))
def test_newly_found_options_downgrade_instead_of_failing(name: str, no_fd_leak: None) -> None:
    level, optname = NAMED_OPTIONS[name]
    value = _MISSING_BEFORE[name]
    with mptcpkit.socket(socket.AF_INET6) as sock:
        assert mptcpkit.status(sock).is_mptcp
        sock.setsockopt(level, optname, value)
        status = mptcpkit.status(sock)
        assert status.state is State.TCP and name in (status.reason or "")
        assert sock.getsockopt(level, optname) == value


@pytest.mark.root
def test_static_table_stands_in_where_no_mptcp_socket_can_be_made(lab_factory) -> None:  # type: ignore[no-untyped-def]
    """net.mptcp.enabled=0 in a namespace: no probe, the static table, and check says so."""
    net = lab.two_paths(paths=1, endpoints=None)
    lab_factory(net)
    client = net.host("client")
    client.sysctl("net.mptcp.enabled", 0)
    code = (
        "from mptcpkit.options import TCP_ONLY_OPTIONS, tcp_only_options, "
        "tcp_only_options_probed as probed\n"
        "print(probed(), len(tcp_only_options()), dict(tcp_only_options()) == TCP_ONLY_OPTIONS)"
    )
    done = client.run([sys.executable, "-c", code], env=dict(os.environ))
    assert done.stdout.split() == ["False", str(len(TCP_ONLY_OPTIONS)), "True"], done.stderr
