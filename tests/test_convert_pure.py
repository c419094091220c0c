"""The converter's pure parts: RFC 8803 codec and the destination policy."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcpkit.proxy import config
from mptcpkit.proxy import convertproto as cp
from mptcpkit.proxy.convertdecide import needed
from mptcpkit.proxy.destpolicy import DestinationPolicy, networks

v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(
    lambda a: a.ipv4_mapped is None
)
words = st.integers(0, 8).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
tlvs = st.one_of(
    st.builds(cp.Info),
    st.builds(cp.Connect, st.one_of(v4, v6), st.integers(0, 65535), words),
    st.builds(cp.ExtendedTCPHeader, words),
    st.builds(cp.SupportedTCPExtensions, st.lists(st.integers(1, 255), max_size=12).map(tuple)),
    st.builds(cp.Cookie, words),
    st.builds(
        cp.Error,
        st.sampled_from(list(cp.ErrorCode)),
        st.integers(0, 4).flatmap(lambda n: st.binary(min_size=4 * n + 1, max_size=4 * n + 1)),
    ),
)


@given(st.lists(tlvs, max_size=6), st.binary(max_size=16))
def test_round_trip_and_rest(items: list[cp.TLV], rest: bytes) -> None:
    raw = cp.build(items)
    assert raw[0] == 1 and raw[1] * 4 == len(raw) and raw[2:4] == b"\0\0"
    parsed = cp.parse(raw + rest)
    assert parsed is not None
    msg, used = parsed
    assert used == len(raw)
    assert list(msg.tlvs) == items
    for cut in range(len(raw)):  # every prefix is "need more", never an error
        assert cp.parse(raw[:cut]) is None


def test_connect_layout_matches_rfc() -> None:
    raw = cp.connect_request("192.0.2.7", 443)
    # header: v1, 6 words; Connect: type 0x0A, 5 words, port, ::ffff:192.0.2.7
    assert raw == (
        bytes([1, 6, 0, 0, 0x0A, 5]) + (443).to_bytes(2, "big") + bytes(10) + b"\xff\xff"
        + bytes([192, 0, 2, 7])
    )  # fmt: skip
    raw6 = cp.connect_request("2001:db8::1", 80, cookie=b"k3y!")
    msg, used = cp.parse_request(raw6) or (None, 0)
    assert used == len(raw6) == 4 + 20 + 8
    assert msg is not None and msg.tlvs == (
        cp.Connect(ipaddress.ip_address("2001:db8::1"), 80),
        cp.Cookie(b"k3y!"),
    )
    assert cp.error_reply(cp.ErrorCode.NOT_AUTHORIZED) == bytes([1, 2, 0, 0, 0x1E, 1, 0x20, 0])


def test_iana_error_codes() -> None:
    assert {c.name: c.value for c in cp.ErrorCode} == {
        "UNSUPPORTED_VERSION": 0x00,
        "MALFORMED_MESSAGE": 0x01,
        "UNSUPPORTED_MESSAGE": 0x02,
        "MISSING_COOKIE": 0x03,
        "NOT_AUTHORIZED": 0x20,
        "UNSUPPORTED_TCP_OPTION": 0x21,
        "RESOURCE_EXCEEDED": 0x40,
        "NETWORK_FAILURE": 0x41,
        "CONNECTION_RESET": 0x60,
        "DESTINATION_UNREACHABLE": 0x61,
    }
    assert [t.value for t in cp.TLVType] == [0x01, 0x0A, 0x14, 0x15, 0x16, 0x1E]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (bytes([2, 1, 0, 0]), cp.ErrorCode.UNSUPPORTED_VERSION),
        (bytes([1, 0, 0, 0]), cp.ErrorCode.MALFORMED_MESSAGE),
        (bytes([1, 2, 0, 0, 0x0A, 0, 0, 0]), cp.ErrorCode.MALFORMED_MESSAGE),  # length 0
        (bytes([1, 2, 0, 0, 0x0A, 2, 0, 0]), cp.ErrorCode.MALFORMED_MESSAGE),  # past total
        (bytes([1, 2, 0, 0, 0x0A, 1, 0, 80]), cp.ErrorCode.MALFORMED_MESSAGE),  # short Connect
        (bytes([1, 2, 0, 0, 0x42, 1, 0, 0]), cp.ErrorCode.UNSUPPORTED_MESSAGE),
    ],
)
def test_bad_messages_name_their_error(raw: bytes, code: cp.ErrorCode) -> None:
    with pytest.raises(cp.ConvertError) as info:
        cp.parse(raw)
    assert info.value.code is code


def test_request_rules() -> None:
    two = cp.build([cp.Connect(ipaddress.ip_address("1.2.3.4"), 1)] * 2)
    with pytest.raises(cp.ConvertError, match="more than one Connect"):
        cp.parse_request(two)
    with pytest.raises(cp.ConvertError) as info:
        cp.parse_request(cp.error_reply(cp.ErrorCode.NETWORK_FAILURE))
    assert info.value.code is cp.ErrorCode.UNSUPPORTED_MESSAGE
    with pytest.raises(cp.ConvertError, match="neither"):
        cp.parse_request(cp.build([]))
    assert cp.parse_request(cp.build([cp.Info()])) is not None


@given(st.binary(max_size=64))
def test_parse_never_crashes(data: bytes) -> None:
    try:
        out = cp.parse(data)
    except cp.ConvertError as exc:
        assert isinstance(exc.code, cp.ErrorCode)
        return
    if out is not None:
        assert 4 <= out[1] <= len(data)


# --- the destination policy -----------------------------------------------------------

POL = DestinationPolicy(
    clients=networks(["10.1.0.0/16", "fd01::/64"]),
    own=networks(["10.9.0.0/24"]),
    deny=networks(["203.0.113.0/24"]),
)


@pytest.mark.parametrize(
    ("dest", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("10.9.0.5", "own network"),
        ("203.0.113.9", "denied"),
    ],
)
def test_refused_destinations(dest: str, why: str) -> None:
    r = POL.check_destination(dest, 80)
    assert r is not None and why in r.reason and r.code is cp.ErrorCode.NOT_AUTHORIZED


def test_allowed_destinations_and_overrides() -> None:
    assert POL.check_destination("198.51.100.1", 443) is None
    assert POL.check_destination("2001:db8::1", 443) is None
    assert POL.check_destination("198.51.100.1", 0) is not None
    opened = DestinationPolicy(allow=networks(["127.0.0.0/8"]))
    assert opened.check_destination("127.0.0.1", 80) is None
    r = opened.check_destination("198.51.100.1", 80)
    assert r is not None and "allow list" in r.reason
    # deny wins over allow
    both = DestinationPolicy(allow=networks(["10.0.0.0/8"]), deny=networks(["10.5.0.0/16"]))
    assert both.check_destination("10.5.0.1", 80) is not None
    assert both.check_destination("10.6.0.1", 80) is None


def test_clients_and_psk() -> None:
    assert POL.check_client("10.1.2.3", None) is None
    assert POL.check_client("::ffff:10.1.2.3", None) is None
    r = POL.check_client("10.2.0.1", None)
    assert r is not None and "not in an allowed network" in r.reason
    assert DestinationPolicy().check_client("10.1.2.3", None) is not None  # nobody by default
    keyed = DestinationPolicy(clients=networks(["0.0.0.0/0"]), psk=b"abcd")
    missing = keyed.check_client("1.2.3.4", None)
    assert missing is not None and missing.code is cp.ErrorCode.MISSING_COOKIE
    wrong = keyed.check_client("1.2.3.4", b"abce")
    assert wrong is not None and wrong.code is cp.ErrorCode.NOT_AUTHORIZED
    assert keyed.check_client("1.2.3.4", b"abcd") is None
    with pytest.raises(ValueError, match="'nope'"):
        networks(["nope"])


@given(v4 | v6, st.integers(1, 65535))
def test_policy_is_total(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    r = POL.check_destination(str(ip), port)
    special = ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast
    if special:
        assert r is not None
    everything = DestinationPolicy(allow=networks(["0.0.0.0/0", "::/0"]))
    assert everything.check_destination(str(ip), port) is None


# Addresses and networks near the edges the policy cares about: special ranges, the
# IPv4-mapped form, networks of every size.
_EDGES = [
    "127.0.0.1", "169.254.1.1", "0.0.0.0", "224.0.0.1", "10.0.0.1", "192.0.2.1",
    "::1", "fe80::1", "::", "ff02::1", "2001:db8::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
]  # fmt: skip
addresses = st.sampled_from(_EDGES) | (v4 | v6).map(str)
nets = st.lists(
    st.tuples(st.sampled_from(_EDGES) | (v4 | v6).map(str), st.integers(0, 128)).map(
        lambda t: ipaddress.ip_network(
            f"{ipaddress.ip_address(t[0])}/{min(t[1], ipaddress.ip_address(t[0]).max_prefixlen)}",
            strict=False,
        )
    ),
    max_size=4,
).map(tuple)
keys = st.sampled_from([None, b"abcd", b"abce", b""])


@settings(max_examples=200)
@given(nets, keys, nets, nets, nets, addresses, keys, addresses, st.integers(0, 65536))
def test_fast_path_agrees_with_the_checks(
    clients: Any, psk: Any, allow: Any, deny: Any, own: Any,
    client: str, cookie: bytes | None, dest: str, port: int,
) -> None:  # fmt: skip
    """`allows()` (ranges, made once) says yes exactly where both checks accept: never
    a relay the checks would refuse."""
    pol = DestinationPolicy(clients=clients, psk=psk, allow=allow, deny=deny, own=own)
    slow = pol.check_client(client, cookie) is None and pol.check_destination(dest, port) is None
    assert pol.allows(client, cookie, dest, port) == slow


# --- the converter's configuration ------------------------------------------------------

SITE = """
[frontend.lan]
bind = ["tcp@0.0.0.0:0", "tcp@[::]:0"]
backend = "bond"
intercept = "redirect"
[backend.bond]
server.remote = { address = "mptcp@192.0.2.1:4443", send-convert = true, psk = "k3y-k3y-" }
"""
POLICY = (
    'destinations = { clients = ["192.0.2.0/24"], deny = ["10.0.0.0/8"], own = ["192.0.2.0/24"],'
    ' psk = "k3y-k3y-" }'
)
REMOTE = f"""
[frontend.bond]
bind = "mptcp@0.0.0.0:4443"
backend = "out"
accept-convert = true
{POLICY}
[backend.out]
server.dest = "mptcp@0.0.0.0:0"
"""


def test_converter_configs() -> None:
    site = config.parse_text(SITE)
    f = site.frontends[0]
    assert f.intercept == "redirect" and not f.transparent
    s = site.backends["bond"].servers[0]
    assert s.send_convert and s.psk == b"k3y-k3y-" and not s.original_destination
    assert needed(f, site.backends["bond"])
    remote = config.parse_text(REMOTE)
    f = remote.frontends[0]
    assert f.accept_convert and f.destinations is not None
    assert f.destinations.psk == b"k3y-k3y-"
    assert f.destinations.check_destination("10.1.2.3", 80) is not None
    assert remote.backends["out"].servers[0].original_destination
    fast = config.parse_text(
        SITE.replace('psk = "k3y-k3y-"', 'psk = "k3y-k3y-", tfo = true').replace(
            'intercept = "redirect"', 'intercept = "redirect"\ntfo = true'
        )
    )
    assert fast.frontends[0].tfo and fast.backends["bond"].servers[0].tfo
    tp = config.parse_text(SITE.replace('intercept = "redirect"', "transparent = true"))
    assert tp.frontends[0].intercept == "tproxy" and tp.frontends[0].transparent
    plain = config.parse_text(SITE.replace('intercept = "redirect"', "").replace(
        "send-convert = true, psk = \"k3y-k3y-\"", 'send-proxy = "v2"'))  # fmt: skip
    assert not needed(plain.frontends[0], plain.backends["bond"])  # stays on the engine


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        (REMOTE.replace(POLICY, ""), "destinations", "open relay"),
        (REMOTE.replace('clients = ["192.0.2.0/24"]', "clients = []"), "clients", "missing"),
        (REMOTE.replace('psk = "k3y-k3y-"', 'psk = "abc"'), "psk", "multiple of 4"),
        (REMOTE.replace('deny = ["10.0.0.0/8"]', 'deny = ["nope"]'), "deny", "'nope'"),
        (REMOTE.replace('"mptcp@0.0.0.0:0"', '"tcp@10.0.0.1:80"'), "accept-convert", "0.0.0.0:0"),
        (
            REMOTE.replace("accept-convert = true", "accept-convert = true\naccept-proxy = true"),
            "accept-convert",
            "not both",
        ),
        (
            SITE.replace('intercept = "redirect"', "").replace(
                '"mptcp@192.0.2.1:4443"', '"tcp@0.0.0.0:0"'
            ),
            "backend",
            "learns none",
        ),
        (SITE.replace('"redirect"', '"redirect"\ntransparent = true'), "transparent", "tproxy"),
        (SITE.replace('"redirect"', '"nat"'), "intercept", "must be one of"),
        (SITE.replace('psk = "k3y-k3y-"', 'psk = "k3y"'), "psk", "multiple of 4"),
    ],
)
def test_converter_config_errors(text: str, key: str, why: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse_text(text)
    assert key in info.value.key and why in info.value.reason, info.value


def test_docs_bonding_configs_are_valid() -> None:
    """The site and remote gateway configurations of docs/bonding.md parse as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "bonding.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[frontend." in b]
    assert len(blocks) == 2
    remote, site = (config.parse_text(b, "docs/bonding.md") for b in blocks)
    assert site.frontends[0].intercept == "redirect"
    assert site.backends["bond"].servers[0].send_convert
    assert remote.frontends[0].accept_convert and remote.frontends[0].destinations is not None
    assert needed(remote.frontends[0], remote.backends["out"])
