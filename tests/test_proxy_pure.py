"""The proxy's pure parts: config validation, PROXY protocol codec, balancer."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import string
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mptcpkit.address import parse_address
from mptcpkit.policy import Policy
from mptcpkit.proxy import config, proxyproto
from mptcpkit.proxy.balance import Balancer
from mptcpkit.proxy.config import ConfigError, parse_text, quick
from mptcpkit.proxy.configmodel import BALANCE_ALGORITHMS, UnixPerms
from mptcpkit.proxy.configread import parse_duration

GOOD = """
[global]
workers = 2
metrics = "127.0.0.1:9464"
log-format = "json"
stop-timeout = "3s"

[frontend.web]
bind = ["mptcp@:8443", "mptcp4@127.0.0.1:9000-9002"]
backend = "app"
maxconn = 100
accept-proxy = true
timeout = { client = "30s", connect = "500ms", server = "1m" }

[backend.app]
balance = "leastconn"
retries = 1
check = { interval = "2s", rise = 2, fall = 3 }
server.s1 = "tcp@10.0.0.5:443"
server.s2 = { address = "mptcp@10.0.0.6:443", weight = 3, backup = true, send-proxy = "v2" }
server.s3 = { address = "mptcp@10.0.0.7:443", mptcp = "require", send-proxy = true }
"""


def test_full_config() -> None:
    cfg = parse_text(GOOD, "p.toml")
    assert cfg.global_.workers == 2 and cfg.global_.log_format == "json"
    assert cfg.global_.stop_timeout == 3.0
    assert cfg.global_.metrics is not None and cfg.global_.metrics.port == 9464
    (fe,) = cfg.frontends
    assert fe.name == "web" and fe.backend == "app" and fe.maxconn == 100 and fe.accept_proxy
    assert [b.protocol for b in fe.binds] == ["mptcp", "mptcp"]
    assert list(fe.binds[1].ports) == [9000, 9001, 9002]
    assert fe.timeouts.client == 30 and fe.timeouts.connect == 0.5 and fe.timeouts.server == 60
    be = cfg.backends["app"]
    assert be.balance == "leastconn" and be.retries == 1
    assert be.check is not None and (be.check.interval, be.check.rise, be.check.fall) == (2, 2, 3)
    s1, s2, s3 = be.servers
    assert (s1.policy, s1.send_proxy, s1.weight, s1.backup) == (Policy.OFF, 0, 1, False)
    assert (s2.policy, s2.send_proxy, s2.weight, s2.backup) == (Policy.PREFER, 2, 3, True)
    assert (s3.policy, s3.send_proxy) == (Policy.REQUIRE, 1)


def test_defaults() -> None:
    cfg = parse_text(
        '[frontend.f]\nbind = "mptcp@:1"\nbackend = "b"\n[backend.b]\nserver.a = "tcp@h:2"'
    )
    assert cfg.global_.workers >= 1
    assert cfg.global_.metrics is not None and cfg.global_.metrics.host == "127.0.0.1"
    assert cfg.backends["b"].check is None and cfg.backends["b"].balance == "roundrobin"


BAD = [
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\nbakcend='x'\n[backend.b]\nserver.a='h:1'",
        "frontend.f.bakcend",
        "unknown key (did you mean 'backend'?)",
    ),
    (
        "[frontend.f]\nbind=['mptcp@:1', 'mptcp@nope@:2']\nbackend='b'\n"
        "[backend.b]\nserver.a='h:1'",
        "frontend.f.bind[1]",
        "bad address",
    ),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='ap'\n[backend.app]\nserver.a='h:1'",
        "frontend.f.backend",
        "no backend named 'ap' (have: app)",
    ),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\n[backend.b]\nserver.a='h:1-5'",
        "backend.b.server.a.address",
        "one port, not a range",
    ),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\n[backend.b]\nbalance='random'\nserver.a='h:1'",
        "backend.b.balance",
        "must be one of roundrobin, leastconn, source",
    ),
    ("[frontend.f]\nbind='mptcp@:1'\nbackend='b'\n[backend.b]", "backend.b.server", "missing"),
    ("[frontend.f]\nbackend='b'\n[backend.b]\nserver.a='h:1'", "frontend.f.bind", "missing"),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\ntimeout={client='5 parsecs'}\n"
        "[backend.b]\nserver.a='h:1'",
        "frontend.f.timeout.client",
        "expected a duration",
    ),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\nmaxconn=0\n[backend.b]\nserver.a='h:1'",
        "frontend.f.maxconn",
        "between 1",
    ),
    (
        "[global]\nworkers='two'\n[frontend.f]\nbind='mptcp@:1'\nbackend='b'\n[backend.b]\nserver.a='h:1'",
        "global.workers",
        "expected an integer",
    ),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\n[backend.b]\n"
        "server.a={address='h:1', send-proxy='v3'}",
        "backend.b.server.a.send-proxy",
        "must be false",
    ),
    (
        "[frontend.f]\nbind='mptcp@host'\nbackend='b'\n[backend.b]\nserver.a='h:1'",
        "frontend.f.bind",
        "a port is needed",
    ),
    (
        "[frontend.f]\nbind='mptcp@:1'\nbackend='b'\n[frontend.g]\nbind='mptcp@:1'\nbackend='b'\n"
        "[backend.b]\nserver.a='h:1'",
        "frontend.g.bind",
        "mptcp@:1 overlaps mptcp@:1 (frontend.f.bind)",
    ),
    ("[frontend.f\nbind=1", "", "not valid TOML"),
    ("", "frontend", "nothing to listen on"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD)
def test_errors_name_file_key_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_text(text, "conf/p.toml")
    e = ei.value
    assert e.source == "conf/p.toml" and e.key == key and reason in e.reason, str(e)
    assert str(e).startswith(f"conf/p.toml: {key + ': ' if key else ''}")


def test_load_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "none.toml")


def test_quick_form() -> None:
    cfg = quick(
        [("mptcp@:8443", ["tcp@10.0.0.5:443", "tcp@10.0.0.6:443"]), ("tcp@:80", ["mptcp@h:80"])]
    )
    assert [f.name for f in cfg.frontends] == ["listen1", "listen2"]
    assert [s.name for s in cfg.backends["listen1"].servers] == ["s1", "s2"]
    assert cfg.backends["listen2"].servers[0].policy is Policy.PREFER
    with pytest.raises(ConfigError) as ei:
        quick([("mptcp@:8443", ["tcp@10.0.0.5"])])
    assert ei.value.key == "--to" and "port" in ei.value.reason
    with pytest.raises(ConfigError) as ei:
        quick([("bogus@:1", ["h:1"])])
    assert ei.value.key == "--listen"


# --- property tests ----------------------------------------------------------------

names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12).filter(
    lambda s: s[0].isalnum()
)
ports = st.integers(1, 65535)
durations = st.one_of(st.integers(0, 10_000), st.sampled_from(["500ms", "5s", "2m", "1h", "1.5s"]))


@st.composite
def documents(draw):  # type: ignore[no-untyped-def]
    backends = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    fe_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    used_ports = draw(st.lists(ports, min_size=len(fe_names), max_size=len(fe_names), unique=True))
    lines = []
    for b in backends:
        lines.append(f"[backend.{b}]")
        lines.append(f"balance = '{draw(st.sampled_from(BALANCE_ALGORITHMS))}'")
        for i in range(draw(st.integers(1, 3))):
            proto = draw(st.sampled_from(["tcp", "mptcp", "tcp4", "mptcp4"]))
            lines.append(
                f"server.s{i} = {{ address = '{proto}@10.0.0.{i + 1}:{draw(ports)}', "
                f"weight = {draw(st.integers(1, 9))} }}"
            )
    for f, p in zip(fe_names, used_ports, strict=True):
        lines.append(f"[frontend.{f}]")
        lines.append(f"bind = 'mptcp@127.0.0.1:{p}'")
        lines.append(f"backend = '{draw(st.sampled_from(backends))}'")
        t = draw(durations)
        lines.append(f"timeout = {{ client = {t!r} }}".replace("'", '"'))
    return "\n".join(lines), fe_names, backends


@given(documents())
@settings(max_examples=60, deadline=None)
def test_generated_configs_parse(doc) -> None:  # type: ignore[no-untyped-def]
    text, fe_names, backends = doc
    cfg = parse_text(text)
    assert [f.name for f in cfg.frontends] == fe_names
    assert set(cfg.backends) == set(backends)
    for f in cfg.frontends:
        assert f.backend in cfg.backends


@given(documents(), st.sampled_from(["frontend", "backend"]), names)
@settings(max_examples=60, deadline=None)
def test_unknown_key_always_named(doc, section, key) -> None:  # type: ignore[no-untyped-def]
    text, fe_names, backends = doc
    assume(
        key
        not in (
            "bind",
            "backend",
            "maxconn",
            "timeout",
            "accept-proxy",
            "server",
            "balance",
            "retries",
            "check",
        )
    )
    target = fe_names[0] if section == "frontend" else backends[0]
    text = text.replace(f"[{section}.{target}]", f"[{section}.{target}]\n{key} = 1", 1)
    with pytest.raises(ConfigError) as ei:
        parse_text(text, "x.toml")
    assert ei.value.key == f"{section}.{target}.{key}" and "unknown key" in ei.value.reason


@given(st.text(max_size=30))
def test_garbage_toml_never_crashes(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_text(text)


@given(st.one_of(st.floats(0, 1e6), st.integers(0, 10**6)))
def test_duration_numbers(v: float) -> None:
    assert parse_duration(v) == float(v)


# --- PROXY protocol ------------------------------------------------------------------

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
endpoints4 = st.tuples(ipv4, st.integers(0, 65535))
endpoints6 = st.tuples(ipv6, st.integers(0, 65535))


@given(
    st.one_of(st.tuples(endpoints4, endpoints4), st.tuples(endpoints6, endpoints6)),
    st.sampled_from([1, 2]),
    st.binary(max_size=40),
)
def test_proxy_round_trip(pair, version, trailer) -> None:  # type: ignore[no-untyped-def]
    src, dst = pair
    assume(
        version == 2
        or not (
            ipaddress.ip_address(src[0]).version == 6 and ipaddress.ip_address(src[0]).ipv4_mapped
        )
    )
    raw = proxyproto.build(version, src, dst)
    hdr, used = proxyproto.parse(raw + trailer)  # type: ignore[misc]
    assert used == len(raw)
    assert hdr.version == version and not hdr.local
    assert hdr.source == src and hdr.destination == dst
    assert hdr.family == (
        socket.AF_INET if "." in src[0] and ":" not in src[0] else socket.AF_INET6
    )
    # every strict prefix is "need more", never an error
    for cut in range(len(raw)):
        assert proxyproto.parse(raw[:cut]) is None


@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=50)), max_size=4),
    endpoints4,
    endpoints4,
)
def test_proxy_v2_tlvs(tlvs, src, dst) -> None:  # type: ignore[no-untyped-def]
    raw = proxyproto.build_v2(src, dst, tlvs=tuple(tlvs))
    hdr, used = proxyproto.parse(raw)  # type: ignore[misc]
    assert used == len(raw) and hdr.tlvs == tuple(tlvs)


@given(st.binary(min_size=1, max_size=120))
def test_proxy_parse_garbage(data: bytes) -> None:
    try:
        r = proxyproto.parse(data)
    except proxyproto.ProxyProtocolError:
        return
    if r is not None:
        assert 0 < r[1] <= len(data)


def test_proxy_fixed_vectors() -> None:
    assert proxyproto.build_v1(("192.0.2.1", 5000), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n"
    )
    assert proxyproto.build_v1("/a", "/b") == b"PROXY UNKNOWN\r\n"
    hdr, _ = proxyproto.parse(b"PROXY UNKNOWN\r\n")  # type: ignore[misc]
    assert hdr.local
    local = proxyproto.build_v2(None, None, local=True)
    assert local == proxyproto.V2_SIGNATURE + b"\x20\x00\x00\x00"
    hdr, _ = proxyproto.parse(local)  # type: ignore[misc]
    assert hdr.local and hdr.version == 2
    hdr, _ = proxyproto.parse(proxyproto.build_v2("/tmp/a", "/tmp/b"))  # type: ignore[misc]
    assert hdr.family == socket.AF_UNIX and hdr.source == "/tmp/a"
    for bad, why in [
        (b"GET / HTTP/1.1\r\n", "not a PROXY"),
        (b"PROXY TCP5 a b 1 2\r\n", "TCP4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "port"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not TCP4"),
        (proxyproto.V2_SIGNATURE + b"\x31\x11\x00\x00", "version 3"),
    ]:
        with pytest.raises(proxyproto.ProxyProtocolError, match=why):
            proxyproto.parse(bad)


# --- balancer ------------------------------------------------------------------------


def _backend(balance: str, weights: list[int], backup: list[bool] | None = None) -> Balancer:
    servers = "\n".join(
        f"server.s{i} = {{ address = 'tcp@10.0.0.{i + 1}:80', weight = {w}, "
        f"backup = {str((backup or [False] * len(weights))[i]).lower()} }}"
        for i, w in enumerate(weights)
    )
    cfg = parse_text(
        f"[frontend.f]\nbind='tcp@:1'\nbackend='b'\n[backend.b]\nbalance='{balance}'\n"
        f"check=true\n{servers}"
    )
    return Balancer(cfg.backends["b"])


@given(st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_roundrobin_follows_weights(weights: list[int]) -> None:
    b = _backend("roundrobin", weights)
    total = sum(weights)
    picks = Counter(b.pick().server.name for _ in range(total * 3))  # type: ignore[union-attr]
    assert picks == Counter({f"s{i}": w * 3 for i, w in enumerate(weights)})


def test_leastconn_source_backup_and_health() -> None:
    b = _backend("leastconn", [1, 1, 1])
    b.states[0].active = 5
    b.states[1].active = 1
    assert b.pick() is b.states[2]
    s = _backend("source", [1, 1, 1])
    assert all(s.pick("192.0.2.7") is s.pick("192.0.2.7") for _ in range(10))
    bk = _backend("roundrobin", [1, 1], backup=[False, True])
    assert {bk.pick().server.name for _ in range(4)} == {"s0"}  # type: ignore[union-attr]
    st0 = bk.states[0]
    assert [st0.observe(False) for _ in range(3)] == [False, False, True] and not st0.up
    assert bk.pick() is bk.states[1]  # the backup takes over
    assert bk.pick(exclude=[bk.states[1]]) is None
    assert [st0.observe(True) for _ in range(2)] == [False, True] and st0.up


def test_example_config_is_valid() -> None:
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "proxy.toml"
    cfg = config.load(path)
    assert [f.name for f in cfg.frontends] == ["web", "to-site-b", "edge"]
    assert cfg.backends["site-b"].servers[0].policy is Policy.REQUIRE
    edge = cfg.frontends[2]
    assert [r.backend for r in edge.rules] == ["api", "web"] and edge.backend == "web"


def test_log_line_formats() -> None:
    import json

    from mptcpkit.proxy.logging import ConnRecord, format_conn

    rec = ConnRecord(
        start=0.5,
        duration=1.25,
        frontend="web",
        client=("2001:db8::1", 4242),
        backend="app",
        server="s1",
        server_address="tcp@10.0.0.5:443",
        client_state="MPTCP",
        client_subflows=2,
        server_state="TCP",
        server_subflows=0,
        bytes_in=10,
        bytes_out=20,
        ended="both closed",
    )
    text = format_conn(rec)
    assert text == (
        "1970-01-01T00:00:00.500Z conn web [2001:db8::1]:4242 -> app/s1 "
        "client=MPTCP(2) server=TCP in=10 out=20 time=1.250s ended='both closed'"
    )
    d = json.loads(format_conn(rec, "json"))
    assert d["client"] == "[2001:db8::1]:4242" and d["client_subflows"] == 2
    assert d["ended"] == "both closed" and d["start"] == "1970-01-01T00:00:00.500Z"


def test_proxy_mixed_families_map_ipv4_into_ipv6() -> None:
    """Source and destination of different families: the IPv4 one goes as ::ffff:a.b.c.d
    (HAProxy does the same), not PROXY UNKNOWN / LOCAL."""
    src, dst = ("203.0.113.7", 40000), ("2001:db8::2", 443)
    assert (
        proxyproto.build_v1(src, dst) == b"PROXY TCP6 ::ffff:203.0.113.7 2001:db8::2 40000 443\r\n"
    )
    hdr, _ = proxyproto.parse(proxyproto.build_v2(src, dst))  # type: ignore[misc]
    assert not hdr.local and hdr.family == socket.AF_INET6
    assert ipaddress.ip_address(hdr.source[0]) == ipaddress.ip_address("::ffff:203.0.113.7")
    assert hdr.destination == dst
    # the same family stays as it is, IPv4-mapped included (a dual-stack listener's view)
    mapped = ("::ffff:127.0.0.1", 5), ("::ffff:127.0.0.2", 6)
    assert proxyproto.build_v1(*mapped).startswith(b"PROXY TCP6 ::ffff:127.0.0.1 ")


def _two_frontends(a: str, b: str) -> str:
    return (
        f"[frontend.one]\nbind='{a}'\nbackend='b'\n"
        f"[frontend.two]\nbind=['tcp@127.0.0.1:0', '{b}']\n"
        "backend='b'\n[backend.b]\nserver.s='tcp@127.0.0.1:1'\n"
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tcp@127.0.0.1:42470-42473", "tcp@127.0.0.1:42472"),  # inside a range
        ("tcp@127.0.0.1:42470-42473", "mptcp@127.0.0.1:42473-42480"),  # ranges crossing
        ("tcp@127.0.0.1:42472", "tcp@:42472"),  # the IPv4 wildcard covers it
        ("tcp@0.0.0.0:42472", "mptcp4@10.1.2.3:42472"),
        ("tcp@127.0.0.1:42472", "mptcp@[::]:42472"),  # [::] is dual-stack
        ("tcp6@[::1]:42472", "tcp@[::]:42470-42479"),
        ("tcp@127.0.0.1:42472", "tcp@[::ffff:127.0.0.1]:42472"),
        ("unix@/run/p.sock", "unix@/run/p.sock"),
    ],
)
def test_overlapping_binds_are_an_error_naming_both(a: str, b: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_text(_two_frontends(a, b), "p.toml")
    e = ei.value
    assert e.key == "frontend.two.bind[1]", str(e)
    assert f"{parse_address(b)} overlaps {parse_address(a)}" in e.reason, str(e)
    assert "(frontend.one.bind)" in e.reason, str(e)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("tcp@127.0.0.1:42470-42471", "tcp@127.0.0.1:42472"),
        ("tcp@127.0.0.1:42472", "tcp@127.0.0.2:42472"),
        ("tcp@127.0.0.1:0", "tcp@127.0.0.1:0"),  # the kernel picks two ports
        ("tcp@[::1]:42472", "tcp@:42472"),  # IPv4 wildcard, IPv6 loopback
        ("unix@/run/a.sock", "unix@/run/b.sock"),
    ],
)
def test_disjoint_binds_pass(a: str, b: str) -> None:
    assert len(parse_text(_two_frontends(a, b)).frontends) == 2


def test_maxconn_is_shared_out_between_workers() -> None:
    cfg = parse_text(
        "[global]\nworkers=3\n[frontend.f]\nbind='mptcp@:1'\nbackend='b'\nmaxconn=10\n"
        "[backend.b]\nserver.a='h:1'"
    )
    (f,) = cfg.frontends
    assert [cfg.maxconn_share(f, w) for w in range(3)] == [4, 3, 3]
    with pytest.raises(ConfigError, match=r"frontend.f.maxconn: 2 is fewer than global.workers"):
        parse_text(
            "[global]\nworkers=3\n[frontend.f]\nbind='mptcp@:1'\nbackend='b'\nmaxconn=2\n"
            "[backend.b]\nserver.a='h:1'"
        )


@pytest.mark.parametrize(
    ("bind", "reason"),
    [
        ("mptcp@:1 mode 600", "mode applies to unix socket files, mptcp@:1 is not one"),
        ("unix@@abstract mode 600", "mode applies to unix socket files"),
        ("unix@/run/p.sock mode", "bind option mode needs a value"),
        ("unix@/run/p.sock mode 999", "mode must be octal like 660, got '999'"),
        ("unix@/run/p.sock owner x", "unknown bind option 'owner'"),
    ],
)
def test_unix_bind_option_errors(bind: str, reason: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_text(f"[frontend.f]\nbind='{bind}'\nbackend='b'\n[backend.b]\nserver.a='h:1'")
    assert ei.value.key == "frontend.f.bind" and reason in ei.value.reason, str(ei.value)


def test_unix_bind_options_parsed() -> None:
    cfg = parse_text(
        "[frontend.f]\nbind='unix@/run/p.sock mode 0660 user www group web'\nbackend='b'\n"
        "[backend.b]\nserver.a='h:1'"
    )
    assert cfg.frontends[0].unix_perms == (UnixPerms(0o660, "www", "web"),)
