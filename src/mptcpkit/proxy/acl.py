"""HAProxy's content switching: `use_backend NAME if|unless CONDITION`, ACLs, and which
rule a connection meets first.

Pure: parsing the rules (configrules.py reads them from the TOML) and evaluating them on
what is known of a connection (`Facts`). The data paths gather the facts: the
destination port (`dst_port`), the client's address (`src`) and, for rules reading
`req.ssl_sni`, the server name of the TLS ClientHello (clienthello.py).

The syntax is HAProxy's, a subset of it:

    use_backend api if { req.ssl_sni -i api.example.com www.example.com }
    use_backend admin if { src 10.0.0.0/8 } !{ dst_port 443 }
    use_backend alt if is_alt || { dst_port 8001:8005 }
    use_backend other unless { src 192.168.0.0/16 }

A condition is tests joined by AND (juxtaposition), `||` (OR, binding less tightly)
and `!` (NOT); a test is an anonymous ACL in braces or a named one (`acl NAME fetch
[flags] patterns...`, several patterns OR-ed, several definitions of one name too).
Fetches: `dst_port` (integers, `lo:hi` ranges), `src` (addresses and networks, an
IPv4-mapped IPv6 client matching IPv4 networks, an IPv4 client IPv6 ones by its
IPv4-mapped form, as HAProxy), `req.ssl_sni` (alias `req_ssl_sni`;
strings, `-i` for case-insensitive, `-m str|beg|end|sub|dom`). A fetch without a value
(no ClientHello, a unix client) makes its test false, and `!` of it true, as in HAProxy.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["AclError", "Facts", "Rule", "Test", "choose", "parse_acl", "parse_rule", "shadowing"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
FETCHES = {"dst_port": "dst_port", "src": "src", "req.ssl_sni": "req.ssl_sni"}
ALIASES = {"req_ssl_sni": "req.ssl_sni"}
METHODS = ("str", "beg", "end", "sub", "dom")
_ACL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_DOM_DELIMS = str.maketrans("/?:", "...")


class AclError(ValueError):
    """A rule or ACL that cannot be read: why."""


@dataclass(frozen=True)
class Facts:
    """What is known of a connection when the rules are evaluated."""

    src: IPAddr | None = None
    dst_port: int | None = None
    sni: str | None = None


@dataclass(frozen=True)
class Test:
    """One ACL: a fetch, how to match, and its patterns (any one matching)."""

    fetch: str  # "dst_port", "src" or "req.ssl_sni"
    method: str = "str"  # for req.ssl_sni
    icase: bool = False
    ports: tuple[tuple[int, int], ...] = ()
    networks: tuple[Network, ...] = ()
    strings: tuple[str, ...] = ()

    def matches(self, facts: Facts) -> bool:
        if self.fetch == "dst_port":
            port = facts.dst_port
            return port is not None and any(lo <= port <= hi for lo, hi in self.ports)
        if self.fetch == "src":
            ip = facts.src
            if ip is None:
                return False
            if any(ip in net for net in self.networks):
                return True
            # as HAProxy: an IPv4 client is also sought, IPv4-mapped, in IPv6 patterns
            return ip.version == 4 and any(_mapped(ip) in net for net in self.networks)
        sni = facts.sni
        return sni is not None and self.match_string(sni)

    def match_string(self, value: str) -> bool:
        if self.icase:
            value = value.lower()
        m = self.method
        for p in self.strings:
            if (
                (m == "str" and value == p)
                or (m == "beg" and value.startswith(p))
                or (m == "end" and value.endswith(p))
                or (m == "sub" and p in value)
                or (m == "dom" and _dom(value, p))
            ):
                return True
        return False


@functools.lru_cache(maxsize=4096)
def _mapped(ip: IPAddr) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


def _dom(value: str, pattern: str) -> bool:
    """HAProxy's `-m dom`: the pattern is found between delimiters (`.` `/` `?` `:`)."""
    return f".{pattern.translate(_DOM_DELIMS)}." in f".{value.translate(_DOM_DELIMS)}."


# An atom: (negated, tests OR-ed); a condition: OR of ANDs of atoms.
Atom = tuple[bool, tuple[Test, ...]]


@dataclass(frozen=True)
class Rule:
    """`use_backend BACKEND if|unless CONDITION`."""

    backend: str
    text: str
    condition: tuple[tuple[Atom, ...], ...]
    unless: bool = False

    @property
    def fetches(self) -> frozenset[str]:
        return frozenset(t.fetch for alt in self.condition for _, tests in alt for t in tests)

    def matches(self, facts: Facts) -> bool:
        met = any(
            all(neg != any(t.matches(facts) for t in tests) for neg, tests in alt)
            for alt in self.condition
        )
        return met != self.unless


def choose(rules: Sequence[Rule], facts: Facts) -> str | None:
    """The backend of the first rule met, None for the default backend."""
    for rule in rules:
        if rule.matches(facts):
            return rule.backend
    return None


# --- parsing -------------------------------------------------------------------------


def parse_acl(words: Sequence[str]) -> Test:
    """`fetch [-i] [-m method] [--] pattern...` (an ACL's definition, or a `{ }` body)."""
    if not words:
        raise AclError("an empty ACL: a fetch (dst_port, src, req.ssl_sni) and patterns")
    fetch = ALIASES.get(words[0], words[0])
    if fetch not in FETCHES:
        raise AclError(
            f"unknown fetch {words[0]!r} (known: dst_port, src, req.ssl_sni, req_ssl_sni)"
        )
    icase, method, i = False, "", 1
    while i < len(words) and words[i].startswith("-"):
        flag = words[i]
        i += 1
        if flag == "--":
            break
        if flag == "-i":
            icase = True
        elif flag == "-m":
            if i >= len(words):
                raise AclError("-m needs a match method")
            method = words[i]
            i += 1
        else:
            raise AclError(f"unsupported ACL flag {flag!r} (supported: -i, -m, --)")
    patterns = list(words[i:])
    if not patterns:
        raise AclError(f"{words[0]} needs at least one pattern")
    if fetch == "req.ssl_sni":
        method = method or "str"
        if method not in METHODS:
            raise AclError(f"-m {method}: not a string match method ({', '.join(METHODS)})")
        strings = tuple(p.lower() if icase else p for p in patterns)
        return Test(fetch, method, icase, strings=strings)
    if method not in ("", "int" if fetch == "dst_port" else "ip") or icase:
        raise AclError(f"{fetch} takes no -i or -m {method or 'str'}")
    if fetch == "dst_port":
        return Test(fetch, "int", ports=tuple(_port_range(p) for p in patterns))
    return Test(fetch, "ip", networks=tuple(_network(p) for p in patterns))


def _port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d*)(:?)(\d*)", text)
    if not m or not (m.group(1) or m.group(3)) or (not m.group(2) and m.group(3)):
        raise AclError(f"dst_port {text!r}: a port or a range lo:hi")
    lo = int(m.group(1)) if m.group(1) else 0
    hi = int(m.group(3)) if m.group(3) else (65535 if m.group(2) else lo)
    if hi > 65535 or lo > hi:
        raise AclError(f"dst_port {text!r}: ports are 0 to 65535, low to high")
    return lo, hi


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise AclError(
            f"src {text!r}: an address or a network (10.0.0.0/8, 2001:db8::/32)"
        ) from None


def parse_rule(text: str, acls: Mapping[str, tuple[Test, ...]]) -> Rule:
    """`BACKEND if|unless CONDITION`, as in HAProxy's `use_backend` (named ACLs from
    `acls`)."""
    words = text.split()
    if len(words) < 3 or words[1] not in ("if", "unless"):
        raise AclError(
            "expected 'BACKEND if CONDITION' or 'BACKEND unless CONDITION',"
            ' as in "api if { req.ssl_sni -i api.example.com }"'
        )
    backend, unless = words[0], words[1] == "unless"
    alts: list[tuple[Atom, ...]] = []
    current: list[Atom] = []
    i = 2
    while i < len(words):
        w = words[i]
        if w in ("||", "or"):
            if not current:
                raise AclError(f"{w!r} with no test before it")
            alts.append(tuple(current))
            current = []
            i += 1
            continue
        neg = False
        while w.startswith("!"):
            neg = not neg
            w = w[1:]
            if not w:  # `! { ... }`
                i += 1
                if i >= len(words):
                    raise AclError("'!' with no test after it")
                w = words[i]
        if w == "{":
            try:
                end = words.index("}", i + 1)
            except ValueError:
                raise AclError("'{' without its '}'") from None
            current.append((neg, (parse_acl(words[i + 1 : end]),)))
            i = end + 1
            continue
        if "{" in w or "}" in w:
            raise AclError(f"{w!r}: braces are words of their own, as in '{{ src 10.0.0.0/8 }}'")
        if w not in acls:
            known = ", ".join(sorted(acls)) or "none"
            raise AclError(f"no ACL named {w!r} (have: {known}); or an anonymous one: {{ ... }}")
        current.append((neg, acls[w]))
        i += 1
    if not current:
        raise AclError("the condition ends with '||'" if alts else "an empty condition")
    alts.append(tuple(current))
    return Rule(backend, text, tuple(alts), unless)


def acl_name_ok(name: str) -> bool:
    return bool(_ACL_NAME.match(name))


# --- rules that can never be met ------------------------------------------------------


def _single(rule: Rule) -> Test | None:
    """The one positive test of a rule `if` one test, else None."""
    if rule.unless or len(rule.condition) != 1 or len(rule.condition[0]) != 1:
        return None
    neg, tests = rule.condition[0][0]
    return tests[0] if not neg and len(tests) == 1 else None


def _covers(a: Test, b: Test) -> bool:
    """Every connection `b` matches, `a` matches too."""
    if a.fetch != b.fetch:
        return False
    if a.fetch == "dst_port":
        return all(any(alo <= lo and hi <= ahi for alo, ahi in a.ports) for lo, hi in b.ports)
    if a.fetch == "src":
        return all(
            any(n.version == m.version and n.subnet_of(m) for m in a.networks)  # type: ignore[arg-type]
            for n in b.networks
        )
    if b.method == "str" and (a.icase or not b.icase):
        return all(a.match_string(s) for s in b.strings)
    return (a.method, a.icase) == (b.method, b.icase) and set(b.strings) <= set(a.strings)


def shadowing(rules: Sequence[Rule]) -> tuple[int, int] | None:
    """(later, earlier): a rule that is never met because an earlier one always is first
    (each a single test of the same fetch); None when there is none."""
    for j, later in enumerate(rules):
        b = _single(later)
        if b is None:
            continue
        for i in range(j):
            a = _single(rules[i])
            if a is not None and _covers(a, b):
                return j, i
    return None
