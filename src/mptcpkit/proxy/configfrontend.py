"""A `[frontend.NAME]` section: its binds (and their options), timeouts and destinations.

The listeners (listeners.py) are made from what is read here; whether two binds, in
one frontend or two, could take the same connection is `binds_overlap`. The
`use_backend` rules of a frontend are configrules.py's.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from mptcpkit.address import Address
from mptcpkit.proxy.configmodel import INTERCEPT_MODES, Frontend, NetBind, Timeouts, UnixPerms
from mptcpkit.proxy.configread import Reader, kind, read_address
from mptcpkit.proxy.configrules import read_inspect_delay, read_rules
from mptcpkit.proxy.destpolicy import DestinationPolicy, networks

__all__ = ["BIND_OPTIONS", "binds_overlap", "read_bind", "read_frontend"]


def read_frontend(r: Reader, name: str) -> Frontend:
    r.only(
        (
            "bind",
            "backend",
            "maxconn",
            "timeout",
            "accept-proxy",
            "transparent",
            "tfo",
            "intercept",
            "accept-convert",
            "destinations",
            "maxconnrate",
            "maxconn-per-source",
            "default_backend",
            "use_backend",
            "acl",
            "tcp-request",
        )
    )
    if not r.has("bind"):
        raise r.error("bind", "missing: a frontend needs at least one address to listen on")
    binds_raw = r.table["bind"]
    if isinstance(binds_raw, str):
        binds_raw = [binds_raw]
    if not isinstance(binds_raw, list) or not binds_raw:
        raise r.error("bind", f"expected an address or a non-empty array, got {kind(binds_raw)}")
    parsed = [
        read_bind(r, f"bind[{i}]" if len(binds_raw) > 1 else "bind", b)
        for i, b in enumerate(binds_raw)
    ]
    binds = tuple(a for a, _, _, _ in parsed)
    intercept = r.choice("intercept", "", INTERCEPT_MODES) if r.has("intercept") else ""
    transparent = r.get_bool("transparent", intercept == "tproxy")
    if transparent and intercept == "redirect":
        raise r.error("transparent", "a transparent (tproxy) bind, but intercept = 'redirect'")
    if transparent:
        intercept = "tproxy"
    if r.has("backend") and r.has("default_backend"):
        raise r.error("default_backend", "backend or default_backend (the same thing), not both")
    key = "default_backend" if r.has("default_backend") or r.has("use_backend") else "backend"
    backend = r.get_str(key, None)
    if not backend:
        if r.has("use_backend"):
            raise r.error(key, "missing: where do connections go that no use_backend rule picks?")
        raise r.error(key, "missing: which backend gets this frontend's connections?")
    rules = read_rules(r)
    inspect_delay = read_inspect_delay(r, rules)
    return Frontend(
        name=name,
        binds=binds,
        backend=backend,
        maxconn=r.get_int("maxconn", 10000, 1, 10_000_000),
        maxconn_set=r.has("maxconn"),
        timeouts=_timeouts(r.sub("timeout")),
        accept_proxy=r.get_bool("accept-proxy", False),
        transparent=transparent,
        tfo=r.get_bool("tfo", False),
        intercept=intercept,
        accept_convert=r.get_bool("accept-convert", False),
        destinations=_destinations(r) if r.has("destinations") else None,
        maxconnrate=r.get_int("maxconnrate", 0, 0, 10_000_000),
        maxconn_per_source=r.get_int("maxconn-per-source", 0, 0, 10_000_000),
        v6only=tuple(v6 for _, v6, _, _ in parsed),
        unix_perms=tuple(perms for _, _, perms, _ in parsed),
        net=tuple(nb for _, _, _, nb in parsed),
        rules=rules,
        inspect_delay=inspect_delay,
    )


def _timeouts(r: Reader) -> Timeouts:
    r.only(("client", "connect", "server", "tunnel", "client-fin", "server-fin", "queue"))
    d = Timeouts()
    connect = r.duration("connect", d.connect)
    assert connect is not None
    if connect == 0:
        raise r.error("connect", "must be > 0")
    return Timeouts(
        client=r.duration("client", d.client, allow_none=True),
        connect=connect,
        server=r.duration("server", d.server, allow_none=True),
        tunnel=r.duration("tunnel", None, allow_none=True),
        client_fin=r.duration("client-fin", None, allow_none=True),
        server_fin=r.duration("server-fin", None, allow_none=True),
        queue=r.duration("queue", None, allow_none=True),
    )


def _destinations(r: Reader) -> DestinationPolicy:
    d = r.sub("destinations")
    d.only(("clients", "psk", "allow", "deny", "own"))
    lists = {}
    for key in ("clients", "allow", "deny", "own"):
        v = d.table.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise d.error(key, f"expected an array of networks, got {kind(v)}")
        try:
            lists[key] = networks(v)
        except ValueError as exc:
            raise d.error(key, str(exc)) from None
    if not lists["clients"]:
        raise d.error("clients", "missing: which client networks may use this gateway?")
    psk = d.get_str("psk", None)
    if psk is not None and (not psk or len(psk.encode()) % 4 or len(psk.encode()) > 64):
        raise d.error("psk", "a pre-shared key is 4 to 64 bytes, a multiple of 4 (a Cookie TLV)")
    return DestinationPolicy(psk=psk.encode() if psk else None, **lists)


BIND_OPTIONS = ("v4v6", "v6only", "mode", "user", "group", "interface", "namespace", "transparent")
_UNIX_OPTIONS = ("mode", "user", "group")  # each takes a value


def read_bind(
    r: Reader, key: str, text: object
) -> tuple[Address, bool, UnixPerms | None, NetBind | None]:
    """`mptcp@[::]:443 [v4v6|v6only]`, `unix@/run/p.sock [mode 660] [user U] [group G]`:
    the address, whether an IPv6 listener is IPv6-only, and a unix socket file's
    permissions. As in HAProxy, `[::]` takes IPv4 clients too unless `v6only` says not."""
    words = text.split() if isinstance(text, str) else []
    addr = read_address(r, key, words[0] if words else text, server=False)
    v6only = False
    unix: dict[str, str] = {}
    net: dict[str, str] = {}
    rest = iter(words[1:])
    for word in rest:
        if word not in BIND_OPTIONS:
            raise r.error(key, f"unknown bind option {word!r} (known: {', '.join(BIND_OPTIONS)})")
        if word in ("interface", "namespace", "transparent"):
            value = "" if word == "transparent" else next(rest, None)
            if value is None or (value and not re.fullmatch(r"[\w.:@-]{1,64}", value)):
                raise r.error(key, f"bind option {word} needs a name, got {value!r}")
            if word == "interface" and len(value) > 15:
                raise r.error(key, f"interface names are at most 15 characters, {value!r} is not")
            if word != "namespace" and addr.protocol == "unix":
                raise r.error(key, f"{word} applies to TCP/MPTCP binds, {addr} is not one")
            net[word] = value
            continue
        if word in _UNIX_OPTIONS:
            value = next(rest, None)
            if value is None:
                raise r.error(key, f"bind option {word} needs a value")
            if addr.protocol != "unix" or (addr.path or "").startswith("@"):
                raise r.error(key, f"{word} applies to unix socket files, {addr} is not one")
            unix[word] = value
            continue
        if word == "v6only" and addr.family != socket.AF_INET6:
            raise r.error(key, f"v6only needs an IPv6 address, {addr} is not one")
        v6only = word == "v6only"
    nb = None
    if net:
        nb = NetBind(net.get("interface"), net.get("namespace"), "transparent" in net)
    if not unix:
        return addr, v6only, None, nb
    mode = None
    if "mode" in unix:
        try:
            mode = int(unix["mode"], 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise r.error(key, f"mode must be octal like 660, got {unix['mode']!r}")
    return addr, v6only, UnixPerms(mode, unix.get("user"), unix.get("group")), nb


def binds_overlap(a: Address, b: Address, a_v6only: bool = False, b_v6only: bool = False) -> bool:
    """Whether two binds could take the same connection: a shared port (ranges too) on
    the same address, or a wildcard covering the other's address. `[::]` is dual-stack
    and so covers IPv4 too, unless it is `v6only`; port 0 (a port the kernel picks)
    never overlaps."""
    if a.protocol == "unix" or b.protocol == "unix":
        return a.protocol == b.protocol and a.path == b.path
    if not a.port or not b.port:
        return False
    if max(a.port, b.port) > min(a.port_end or a.port, b.port_end or b.port):
        return False
    ha, hb = _bind_host(a), _bind_host(b)
    if ha == hb:
        return True
    for wild, other, v6only in ((ha, hb, a_v6only), (hb, ha, b_v6only)):
        if wild == "::" and not (v6only and _is_v4(other)):
            return True
        if wild == "0.0.0.0" and _is_v4(other):
            return True
    return False


def _bind_host(a: Address) -> str:
    """The host a bind really binds, normalized ("0.0.0.0"/"::" for the wildcards)."""
    host = a.bind_host()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()  # a name: only the same name is known to be the same
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_v4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return True  # a name may resolve to IPv4: a wildcard covers it
