"""HAProxy-style addresses: examples, errors that quote the bad part, properties."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcpkit import Policy, parse_address


@pytest.mark.parametrize(
    ("text", "protocol", "family", "host", "ports"),
    [
        ("mptcp4@0.0.0.0:8000-8010", "mptcp", socket.AF_INET, "0.0.0.0", range(8000, 8011)),
        ("mptcp@[::]:5000", "mptcp", socket.AF_INET6, "::", range(5000, 5001)),
        ("mptcp6@:443", "mptcp", socket.AF_INET6, "", range(443, 444)),
        ("mptcp@:8443", "mptcp", socket.AF_INET, "", range(8443, 8444)),
        ("*:80", "tcp", socket.AF_INET, "", range(80, 81)),
        ("tcp@example.net:443", "tcp", socket.AF_UNSPEC, "example.net", range(443, 444)),
        ("tcp4@Example.NET:443", "tcp", socket.AF_INET, "example.net", range(443, 444)),
        ("ipv6@[2001:db8::1]:22", "tcp", socket.AF_INET6, "2001:db8::1", range(22, 23)),
        ("ipv4@10.0.0.5", "tcp", socket.AF_INET, "10.0.0.5", range(0)),
        ("mptcp@127.0.0.1:0", "mptcp", socket.AF_INET, "127.0.0.1", range(0, 1)),
        # HAProxy's reading: the last ':' is the port's, brackets are optional
        (":::80", "tcp", socket.AF_INET6, "::", range(80, 81)),
        ("ipv6@::1:80", "tcp", socket.AF_INET6, "::1", range(80, 81)),
        ("tcp4@[127.0.0.1]:80", "tcp", socket.AF_INET, "127.0.0.1", range(80, 81)),
        ("127.0.0.1:041018", "tcp", socket.AF_INET, "127.0.0.1", range(41018, 41019)),
        ("127.1:80", "tcp", socket.AF_INET, "127.0.0.1", range(80, 81)),  # inet_aton
        # v4-mapped addresses written as the socket module writes them
        ("[::ffff:7f00:1]:80", "tcp", socket.AF_INET6, "::ffff:127.0.0.1", range(80, 81)),
        ("[::ffff:127.0.0.1]:80", "tcp", socket.AF_INET6, "::ffff:127.0.0.1", range(80, 81)),
    ],
)
def test_examples(text: str, protocol: str, family: int, host: str, ports: range) -> None:
    addr = parse_address(text)
    assert (addr.protocol, addr.family, addr.host, addr.ports) == (protocol, family, host, ports)
    assert parse_address(str(addr)) == addr


def test_unix_and_policy() -> None:
    addr = parse_address("unix@/run/app.sock")
    assert (addr.family, addr.path, str(addr)) == (
        socket.AF_UNIX,
        "/run/app.sock",
        "unix@/run/app.sock",
    )
    bare = parse_address("/run/app.sock")  # as in HAProxy, a path is a unix socket
    assert (bare.protocol, bare.path, str(bare)) == ("unix", "/run/app.sock", "/run/app.sock")
    assert parse_address("mptcp@:1").policy is Policy.PREFER
    assert parse_address("tcp@:1").policy is Policy.OFF


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("mptpc@1.2.3.4:80", "'mptpc@'"),
        ("mptcp4@[::1]:80", "'[::1]'"),
        ("mptcp6@10.0.0.1:80", "'10.0.0.1'"),
        ("MPTCP@1.2.3.4:80", "'MPTCP@'"),  # prefixes are lower-case, as in HAProxy
        ("@1.2.3.4:80", "'@'"),
        ("999.1.1.1:80", "'999.1.1.1'"),
        ("ipv4@999.1.1.1:80", "'999.1.1.1'"),
        ("2001:db8::1", "'2001:db8:'"),  # the last ':' is the port's
        ("[fe80::1%lo]:80", "'[fe80::1%lo]'"),
        ("1.2.3.4:80x", "'80x'"),
        ("1.2.3.4:+80", "'+80'"),
        ("1.2.3.4:99999", "'99999'"),
        ("1.2.3.4:80-70", "'80-70'"),
        ("1.2.3.4:0-5", "'0'"),
        ("1.2.3.4:", "'1.2.3.4:'"),
        ("[::1:80", "'[::1:80'"),
        ("[fe80::zz]:80", "'[fe80::zz]'"),
        ("[::1]x80", "'x80'"),
        ("bad host!:80", "'bad host!'"),
        ("unix@", "''"),
        ("unix@/" + "x" * 107, "at most 107 bytes"),
        ("mptcp@", "''"),
    ],
)
def test_errors_quote_the_bad_part(text: str, quoted: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    message = str(info.value)
    assert repr(text) in message and quoted in message


_hosts = st.one_of(
    st.just(""),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9]{0,5}){0,2}", fullmatch=True),
)
_prefixes = st.sampled_from(["", "mptcp@", "tcp@", "mptcp4@", "tcp6@", "ipv4@", "ipv6@"])


@given(_prefixes, _hosts, st.integers(1, 65535), st.integers(0, 50))
def test_round_trip(prefix: str, host: str, port: int, span: int) -> None:
    high = min(port + span, 65535)
    text = f"{prefix}{host}:{port}-{high}"
    try:
        addr = parse_address(text)
    except ValueError as exc:
        assert repr(text) in str(exc)  # family mismatches, e.g. tcp6@ with an IPv4 host
        return
    assert addr.ports == range(port, high + 1)
    assert parse_address(str(addr)) == addr


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_valueerror(text: str) -> None:
    try:
        parse_address(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
