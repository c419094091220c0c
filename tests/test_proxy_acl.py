"""use_backend rules (proxy/acl.py) and their config (`--check`): HAProxy's syntax, with
`haproxy -c` as the oracle of what is valid; evaluation; rules that are never met."""

from __future__ import annotations

import ipaddress
import select
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcpkit.proxy import acl, router
from mptcpkit.proxy.acl import AclError, Facts, parse_acl, parse_rule
from mptcpkit.proxy.config import ConfigError, parse_text
from proxy_harness import PROXY_CMD, free_port

ACLS = {"is_api": (parse_acl(["req.ssl_sni", "-i", "api.example.com"]),)}

# Conditions we accept; HAProxy must accept each too (the oracle below).
GOOD = [
    "{ dst_port 8443 }",
    "{ dst_port 8000:8010 9000 }",
    "{ dst_port :1024 }",
    "{ src 10.0.0.0/8 192.168.1.7 2001:db8::/32 }",
    "{ src 10.0.0.0/255.0.0.0 }",
    "{ req.ssl_sni -i api.example.com www.example.com }",
    "{ req_ssl_sni -m end .example.org }",
    "{ req.ssl_sni -m beg api. } { dst_port 443 }",
    "{ req.ssl_sni -m dom example } || { src 127.0.0.2 }",
    "!{ src 10.0.0.0/8 } { dst_port 443 }",
    "is_api or { src 127.0.0.1 }",
    "! is_api",
    "{ req.ssl_sni -i -- -odd-name.example }",
]
# Conditions HAProxy refuses (or warns about) as well: we say what is wrong.
BAD = [
    ("{ dst_port 8443", "without its '}'"),
    ("{dst_port 8443 }", "braces are words of their own"),
    ("{ dst_prt 8443 }", "unknown fetch 'dst_prt'"),
    ("{ src 10.0.0.300 }", "an address or a network"),
    ("{ src }", "at least one pattern"),
    ("no_such_acl", "no ACL named 'no_such_acl'"),
    ("{ req.ssl_sni -m nope x }", "-m nope"),
]
# Refused here though HAProxy takes them: never met, or a typo.
STRICTER = [
    ("{ dst_port 70000 }", "ports are 0 to 65535"),
    ("{ dst_port 90:80 }", "low to high"),
    ("{ src 127.0.0.1 } ||", "ends with '||'"),  # HAProxy ignores the dangling OR
]


@pytest.mark.parametrize("cond", GOOD)
def test_good_conditions_parse(cond: str) -> None:
    rule = parse_rule(f"be if {cond}", ACLS)
    assert rule.backend == "be" and rule.condition


@pytest.mark.parametrize(("cond", "why"), BAD + STRICTER)
def test_bad_conditions_say_why(cond: str, why: str) -> None:
    with pytest.raises(AclError, match=why.replace("(", r"\(").replace("|", r"\|")):
        parse_rule(f"be if {cond}", ACLS)


def _haproxy_ok(tmp: Path, conds: list[str]) -> tuple[bool, str]:
    lines = [
        "defaults",
        "    mode tcp",
        "    timeout client 5s",
        "    timeout server 5s",
        "    timeout connect 5s",
        "frontend fe",
        "    bind 127.0.0.1:45900",
        "    tcp-request inspect-delay 5s",
        "    acl is_api req.ssl_sni -i api.example.com",
        *(f"    use_backend be if {c}" for c in conds),
        "    default_backend be",
        "backend be",
        "    server s 127.0.0.1:1",
    ]
    cfg = tmp / "haproxy.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    p = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    out = p.stdout + p.stderr
    return p.returncode == 0 and "[WARNING]" not in out, out


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_agrees(tmp_path: Path) -> None:
    """HAProxy (haproxy -c) accepts every condition we accept without a warning, and
    refuses (or warns about) those we refuse."""
    ok, out = _haproxy_ok(tmp_path, GOOD)
    assert ok, out
    for cond, _ in BAD:
        ok, out = _haproxy_ok(tmp_path, [cond])
        assert not ok, f"haproxy accepts {cond!r}, we do not:\n{out}"


def test_evaluation() -> None:
    rules = [
        parse_rule("api if is_api", ACLS),
        parse_rule("lan if { src 10.0.0.0/8 } !{ dst_port 22 }", ACLS),
        parse_rule("web if { dst_port 80 } || { dst_port 8080:8090 }", ACLS),
        parse_rule("other unless { src 0.0.0.0/0 ::/0 }", ACLS),
    ]
    ip = ipaddress.ip_address
    assert acl.choose(rules, Facts(sni="API.example.COM")) == "api"
    assert acl.choose(rules, Facts(ip("10.1.2.3"), 443)) == "lan"
    assert acl.choose(rules, Facts(ip("10.1.2.3"), 22)) is None  # `!` of a test that holds
    assert acl.choose(rules, Facts(ip("192.0.2.1"), 8085)) == "web"
    assert acl.choose(rules, Facts(None, 22)) == "other"  # a unix client: no src at all
    dom = parse_rule("d if { req.ssl_sni -m dom example }", {})
    assert dom.matches(Facts(sni="www.example.com")) and not dom.matches(Facts(sni="examples.com"))


facts = st.builds(
    Facts,
    st.one_of(st.none(), st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.one_of(st.none(), st.integers(0, 65535)),
    st.one_of(st.none(), st.sampled_from(["a.example.com", "A.example.com", "b.example.org"])),
)
single = st.one_of(
    st.tuples(st.integers(0, 3000), st.integers(0, 3000)).map(
        lambda t: f"{{ dst_port {min(t)}:{max(t)} }}"
    ),
    st.tuples(st.sampled_from(["10.0.0.0", "10.1.0.0", "10.1.2.0"]), st.integers(8, 24)).map(
        lambda t: f"{{ src {t[0]}/{t[1]} }}"
    ),
    st.sampled_from(
        [
            "{ req.ssl_sni a.example.com }",
            "{ req.ssl_sni -i a.example.com }",
            "{ req.ssl_sni -m end .example.com }",
            "{ req.ssl_sni -i -m end .example.com }",
            "{ req.ssl_sni -m beg a. }",
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(single, min_size=2, max_size=4), st.lists(facts, max_size=30))
def test_a_rule_called_never_met_is_never_met(conds: list[str], seen: list[Facts]) -> None:
    rules = [parse_rule(f"b{i} if {c}", {}) for i, c in enumerate(conds)]
    found = acl.shadowing(rules)
    if found is None:
        return
    j, i = found
    for f in seen:
        if rules[j].matches(f):
            assert rules[i].matches(f), (conds, f)


# --- the config (--check) ----------------------------------------------------------------


def _conf(fe: str, backends: tuple[str, ...] = ("app", "api", "alt")) -> str:
    head = '[global]\nworkers = 1\nmetrics = ""\n[frontend.web]\n'
    head += 'bind = ["tcp@127.0.0.1:45000-45003", "unix@/tmp/x.sock"]\n'
    return head + fe + "".join(f'\n[backend.{b}]\nserver.s = "tcp@127.0.0.1:1"\n' for b in backends)


def test_config_reads_like_haproxy() -> None:
    cfg = parse_text(
        _conf(
            'tcp-request.inspect-delay = "2s"\n'
            'acl.is_api = ["req.ssl_sni -i api.example.com", "req.ssl_sni -i api2.example.com"]\n'
            'use_backend = ["api if is_api", "alt if { dst_port 45001 }"]\n'
            'default_backend = "app"\n'
        ),
        "p.toml",
    )
    (fe,) = cfg.frontends
    assert fe.backend == "app" and fe.inspect_delay == 2.0 and fe.reads_sni
    assert [r.backend for r in fe.rules] == ["api", "alt"]
    assert fe.backends_used == ("app", "api", "alt")
    assert fe.rules[0].matches(Facts(sni="API2.example.com"))


@pytest.mark.parametrize(
    ("fe", "key", "why"),
    [
        (
            'use_backend = ["nope if { src 10.0.0.0/8 }"]\ndefault_backend = "app"',
            "frontend.web.use_backend[0]",
            "no backend named 'nope' (have: alt, api, app)",
        ),
        (
            'use_backend = ["alt if { src 10.0.0.0/8 }"]\ndefault_backend = "nope"',
            "frontend.web.default_backend",
            "no backend named 'nope'",
        ),
        (
            'use_backend = ["alt if { dst_port 45000:45003 }", "api if { dst_port 45002 }"]\n'
            'default_backend = "app"',
            "frontend.web.use_backend[1]",
            "is never met: use_backend[0]",
        ),
        (
            'use_backend = ["alt if { src 10.0.0.0/8 }", "api if { src 10.1.0.0/16 }"]\n'
            'default_backend = "app"',
            "frontend.web.use_backend[1]",
            "is never met",
        ),
        (
            'tcp-request.inspect-delay = "5s"\nuse_backend = ["alt if { src 10.0.0.0/8 }"]\n'
            'default_backend = "app"',
            "frontend.web.tcp-request.inspect-delay",
            "no use_backend rule reads req.ssl_sni",
        ),
        (
            'use_backend = ["alt if { src 10.0.0.0/8 }", "api if { req.ssl_sni a.example }"]\n'
            'default_backend = "app"',
            "frontend.web.use_backend[1]",
            "tcp-request.inspect-delay is not set",
        ),
        (
            'use_backend = ["alt if { dst_port 443 }"]\ndefault_backend = "app"',
            "frontend.web.use_backend[0]",
            "dst_port matches none of this frontend's binds",
        ),
        (
            'use_backend = ["alt if { dst_port 45001 }"]',
            "frontend.web.default_backend",
            "missing: where do connections go that no use_backend rule picks?",
        ),
        (
            'backend = "app"\ndefault_backend = "app"',
            "frontend.web.default_backend",
            "not both",
        ),
        (
            'use_backend = ["alt if {src 10.0.0.0/8}"]\ndefault_backend = "app"',
            "frontend.web.use_backend[0]",
            "braces are words of their own",
        ),
        (
            'use_backend = ["alt when { src 10.0.0.0/8 }"]\ndefault_backend = "app"',
            "frontend.web.use_backend[0]",
            "expected 'BACKEND if CONDITION'",
        ),
        (
            'acl.bad = "dst_port x"\nuse_backend = ["alt if bad"]\ndefault_backend = "app"',
            "frontend.web.acl.bad",
            "a port or a range",
        ),
        (
            'intercept = "redirect"\nuse_backend = ["alt if { src 10.0.0.0/8 }"]\n'
            'default_backend = "app"',
            "frontend.web.use_backend",
            "routing is not offered with an intercepting",
        ),
    ],
)
def test_config_errors_name_the_rule(fe: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_text(_conf(fe), "p.toml")
    assert err.value.key == key and why in err.value.reason, err.value


def test_check_exits_2_naming_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        _conf(
            'use_backend = ["alt if { src 10.0.0.0/8 }", "api if { src 10.9.0.0/16 }"]\n'
            'default_backend = "app"\n'
        )
    )
    p = subprocess.run([*PROXY_CMD, "--check", "-c", str(path)], capture_output=True, text=True)
    assert p.returncode == 2, p
    assert "frontend.web.use_backend[1]: 'api if { src 10.9.0.0/16 }' is never met" in p.stderr
    assert p.stdout == ""


def test_the_docs_example_is_valid_here_and_for_haproxy(tmp_path: Path) -> None:
    """docs/proxy.md shows HAProxy's configuration next to ours: both are valid."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "proxy.md").read_text()
    section = doc[doc.index("### Routing (`use_backend`)") :]
    hap = section[section.index("```\n") + 4 : section.index("```", section.index("```\n") + 4)]
    ours = section[section.index("```toml\n") + 8 :]
    ours = ours[: ours.index("```")]
    backends = ("api", "admin", "legacy", "app")
    cfg = parse_text(
        ours + "".join(f'[backend.{b}]\nserver.s = "tcp@127.0.0.1:1"\n' for b in backends)
    )
    assert [r.backend for r in cfg.frontends[0].rules] == ["api", "admin", "legacy"]
    if shutil.which("haproxy") is None:
        return
    hcfg = tmp_path / "h.cfg"
    hcfg.write_text(
        "defaults\n    mode tcp\n    timeout client 5s\n    timeout server 5s\n"
        "    timeout connect 5s\n"
        + hap.replace(":443", "127.0.0.1:45901").replace(":8000-8010", "127.0.0.1:45910-45920")
        + "".join(f"backend {b}\n    server s 127.0.0.1:1\n" for b in backends)
    )
    p = subprocess.run(["haproxy", "-c", "-f", str(hcfg)], capture_output=True, text=True)
    assert p.returncode == 0 and "[WARNING]" not in p.stdout + p.stderr, p.stdout + p.stderr


# `src` on an IPv4 client against IPv6 patterns, and on an IPv4-mapped one (a dual-stack
# listener's) against both: HAProxy maps the address to the other family when the
# patterns of its own do not match (pattern.c, pat_match_ip).
SRC_FAMILIES = [
    "{ src 127.0.0.0/8 }",
    "{ src ::ffff:127.0.0.0/104 }",
    "{ src ::ffff:127.0.0.1 }",
    "{ src ::ffff:10.0.0.0/104 }",
    "{ src ::/0 }",
    "!{ src ::ffff:0:0/96 }",
    "{ src 2001:db8::/32 } || { src ::ffff:127.0.0.1/128 }",
]


def _haproxy_routes(tmp: Path, conds: list[str], bind: str, peer: str) -> list[bool]:
    """Which conditions HAProxy meets for a client from `peer` (one frontend each)."""
    servers = {}
    for name in ("yes", "no"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(len(conds))
        s.setblocking(False)
        servers[name] = s
    ports = [free_port() for _ in conds]
    lines = [
        "defaults",
        "    mode tcp",
        *(f"    timeout {t} 5s" for t in ("client", "server", "connect")),
    ]
    for i, (cond, port) in enumerate(zip(conds, ports, strict=True)):
        lines += [f"frontend f{i}", f"    bind {bind}:{port}", f"    use_backend yes if {cond}"]
        lines += ["    default_backend no"]
    for name, s in servers.items():
        lines += [f"backend {name}", f"    server s 127.0.0.1:{s.getsockname()[1]}"]
    cfg = tmp / "haproxy.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    hap = subprocess.Popen(["haproxy", "-f", str(cfg)], stderr=subprocess.PIPE)
    out = []
    try:
        for port in ports:
            family = socket.AF_INET6 if ":" in peer else socket.AF_INET
            for _ in range(500):  # until HAProxy listens
                c = socket.socket(family)
                try:
                    c.connect((peer, port))
                    break
                except ConnectionRefusedError:
                    c.close()
                    select.select([], [], [], 0.01)
            with c:
                ready, _, _ = select.select(list(servers.values()), [], [], 10)
                assert len(ready) == 1, ready
                ready[0].accept()[0].close()
                out.append(ready[0] is servers["yes"])
    finally:
        hap.kill()
        hap.wait()
        for s in servers.values():
            s.close()
    return out


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.parametrize(
    ("bind", "peer"), [("127.0.0.1", "127.0.0.1"), ("[::]", "::ffff:127.0.0.1")]
)
def test_src_across_families_as_haproxy(tmp_path: Path, bind: str, peer: str) -> None:
    theirs = _haproxy_routes(tmp_path, SRC_FAMILIES, bind, peer)
    src = router.client_ip((peer, 1))
    ours = [parse_rule(f"yes if {c}", {}).matches(Facts(src)) for c in SRC_FAMILIES]
    assert ours == theirs, list(zip(SRC_FAMILIES, ours, theirs, strict=True))
