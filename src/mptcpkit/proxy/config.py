"""The proxy's configuration: a TOML file (or `--listen/--to` pairs) made into a checked model.

Pure: no sockets are touched here. Every error names the file, the key and the reason
(`proxy.toml: frontend.web.backend: no backend named 'ap' (have: app)`), so that
`mptcpkit proxy --check` and a failed reload can say exactly what to fix.

    [global]
    workers = 2                 # default: one per core
    metrics = "127.0.0.1:9464"  # Prometheus endpoint; "" turns it off
    log = "stderr"              # or "none", a file path, syslog: "udp@host:514 local0"
    log-format = "text"         # or "json"
    user = "nobody"             # drop root after binding
    group = "nogroup"
    stop-timeout = "10s"        # SIGTERM: drain this long, then cut
    hard-stop-after = "30m"     # reload: old workers still draining then are cut

    [frontend.web]
    bind = ["mptcp@:8443", "mptcp@[::]:9000-9010"]
    backend = "app"
    maxconn = 10000             # for the whole proxy, shared out between the workers
    accept-proxy = false
    timeout = { client = "60s", connect = "5s", server = "60s" }  # also tunnel,
                                # client-fin, server-fin (timeouts.py); "250ms" works

    [backend.app]
    balance = "roundrobin"      # leastconn, source
    retries = 3                 # retries of the server after a failed connect
    resolve-interval = "10s"    # re-resolve server names this often (default: never)
    init-addr = "libc"          # a name not resolving at start: fail; "none": start DOWN
    redispatch = true           # the last retry goes to another server
    check = { interval = "2s", rise = 2, fall = 3, timeout = "1s" }
    server.s1 = "tcp@10.0.0.5:443"
    server.s2 = { address = "mptcp@10.0.0.6:443", weight = 2, backup = false,
                  send-proxy = "v2", mptcp = "require" }
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mptcpkit.address import Address, parse_address
from mptcpkit.policy import Policy
from mptcpkit.proxy import acl
from mptcpkit.proxy.destpolicy import DestinationPolicy, networks
from mptcpkit.proxy.logging import parse_target

__all__ = [
    "BALANCE_ALGORITHMS",
    "Backend",
    "Config",
    "ConfigError",
    "Frontend",
    "GlobalSettings",
    "HealthCheck",
    "Server",
    "Timeouts",
    "UnixPerms",
    "binds_overlap",
    "load",
    "parse_duration",
    "parse_text",
    "quick",
]

BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "source")
INIT_ADDR = ("libc", "none")  # HAProxy's init-addr, simplified (resolvers.py)
LOG_FORMATS = ("text", "json")
INTERCEPT_MODES = ("redirect", "tproxy")
DEFAULT_METRICS = "tcp@127.0.0.1:9464"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class ConfigError(ValueError):
    """A configuration problem: where (file, key) and why."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None means no limit. HAProxy's names; which applies when: timeouts.py."""

    client: float | None = 60.0
    connect: float = 5.0
    server: float | None = 60.0
    tunnel: float | None = None  # relaying: replaces client and server
    client_fin: float | None = None  # half-closed: replaces client (or tunnel)
    server_fin: float | None = None  # half-closed: replaces server (or tunnel)
    queue: float | None = None  # waiting for a server's maxconn slot; None: as connect


@dataclass(frozen=True)
class HealthCheck:
    """Health checks, run once by the master's checker (health.py): `fall` failures
    mark a server down, `rise` successes up again; HAProxy's names for the rest."""

    interval: float = 2.0  # `inter`
    rise: int = 2
    fall: int = 3
    timeout: float = 1.0
    fastinter: float | None = None  # while a server is changing state (default: inter)
    downinter: float | None = None  # while it is down (default: inter)
    send: bytes = b""  # tcp-check send: what the check writes once connected
    expect: str | None = None  # tcp-check expect string: the first line must contain it
    expect_regex: str | None = None  # tcp-check expect rstring, on the first line
    port: int = 0  # `port`: check this port instead of the server's
    addr: str | None = None  # `addr`: check this IP address instead of the server's
    send_proxy: bool = False  # `check-send-proxy`: a PROXY v1 header first
    observe: str = ""  # "layer4": connects failing in traffic count as failed checks


@dataclass(frozen=True)
class Server:
    name: str
    address: Address
    weight: int = 1
    backup: bool = False
    send_proxy: int = 0  # 0: no header, 1: PROXY v1, 2: PROXY v2
    policy: Policy = Policy.OFF  # from the address (mptcp@ prefers), or `mptcp = ...`
    send_convert: bool = False  # RFC 8803: a Connect TLV names the destination (converter.py)
    psk: bytes | None = None  # for a remote gateway: Cookie TLV, or PROXY v2 TLV 0xE0
    maxconn: int = 0  # connections at once (shared out between workers); 0: no limit
    source: str | None = None  # HAProxy's `source`: the local IP its legs leave from
    slowstart: float = 0.0  # seconds its weight ramps up after it comes back UP
    tfo: bool = False  # TCP Fast Open: the first bytes (a Convert message) go in the SYN

    @property
    def original_destination(self) -> bool:
        """`0.0.0.0:0` (HAProxy's words): connect to where the client was going."""
        a = self.address
        return a.protocol != "unix" and a.port == 0 and a.host in ("0.0.0.0", "::")


@dataclass(frozen=True)
class Backend:
    name: str
    servers: tuple[Server, ...]
    balance: str = "roundrobin"
    retries: int = 3  # HAProxy's: the same server again (retry.py)
    check: HealthCheck | None = None
    redispatch: bool = True  # HAProxy's `option redispatch`: the last retry elsewhere
    resolve_interval: float | None = None  # re-resolve server names this often (resolvers.py)
    init_addr: str = "libc"  # a name not resolving at start: "libc" fails, "none" starts DOWN


@dataclass(frozen=True)
class UnixPerms:
    """HAProxy's `mode`, `user` and `group` bind options of a unix socket file."""

    mode: int | None = None
    user: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class NetBind:
    """HAProxy's `interface`, `namespace` and `transparent` bind options (listeners.py)."""

    interface: str | None = None  # SO_BINDTODEVICE
    namespace: str | None = None  # the listener is made in /run/netns/NAME
    transparent: bool = False  # IP_TRANSPARENT: takes connections to non-local addresses

    def __str__(self) -> str:
        words = [f"interface {self.interface}"] if self.interface else []
        words += [f"namespace {self.namespace}"] if self.namespace else []
        return " ".join(words + ["transparent"] * self.transparent)


@dataclass(frozen=True)
class Frontend:
    name: str
    binds: tuple[Address, ...]
    backend: str
    maxconn: int = 10000
    maxconn_set: bool = False  # given in the file: never lowered to fit the fd limit
    timeouts: Timeouts = field(default_factory=Timeouts)
    accept_proxy: bool = False
    # per bind: an IPv6 listener that refuses IPv4 clients (`v6only`); else dual-stack
    v6only: tuple[bool, ...] = ()
    # per bind: a unix socket file's `mode`/`user`/`group` (None: as created)
    unix_perms: tuple[UnixPerms | None, ...] = ()
    # per bind: its interface/namespace/transparent options (None: none)
    net: tuple[NetBind | None, ...] = ()
    transparent: bool = False  # IP_TRANSPARENT listeners (nftables tproxy)
    tfo: bool = False  # TCP Fast Open on the listeners (TCP_FASTOPEN)
    intercept: str = ""  # "redirect"/"tproxy": connections are intercepted (converter.py)
    accept_convert: bool = False  # RFC 8803: a Connect TLV names the destination
    destinations: DestinationPolicy | None = None  # a remote gateway's (converter.py)
    maxconnrate: int = 0  # new connections per second, whole proxy (abuse.py); 0: none
    maxconn_per_source: int = 0  # connections at once from one address, whole proxy
    # HAProxy's `use_backend ... if`: the first rule met picks the backend (acl.py);
    # `backend` (`default_backend`) takes the rest
    rules: tuple[acl.Rule, ...] = ()
    inspect_delay: float | None = None  # `tcp-request inspect-delay`: wait for a ClientHello

    @property
    def backends_used(self) -> tuple[str, ...]:
        """The default backend, then those of the rules, each once."""
        return tuple(dict.fromkeys((self.backend, *(r.backend for r in self.rules))))

    @property
    def reads_sni(self) -> bool:
        return any("req.ssl_sni" in r.fetches for r in self.rules)

    def dualstack(self, i: int) -> bool:
        """Bind `i` is an IPv6 address taking IPv4 clients too (IPV6_V6ONLY=0)."""
        return self.binds[i].family == socket.AF_INET6 and not (
            i < len(self.v6only) and self.v6only[i]
        )


@dataclass(frozen=True)
class GlobalSettings:
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    log: str = "stderr"
    log_format: str = "text"
    metrics: Address | None = field(default_factory=lambda: parse_address(DEFAULT_METRICS))
    user: str | None = None
    group: str | None = None
    stop_timeout: float = 10.0
    hard_stop_after: float | None = None  # reload: old workers are cut after this
    stats_socket: Address | None = None  # the runtime API's unix socket (control.py)
    stats_perms: UnixPerms | None = None  # its `mode`/`user`/`group`


@dataclass(frozen=True)
class Config:
    source: str
    global_: GlobalSettings
    frontends: tuple[Frontend, ...]
    backends: Mapping[str, Backend]

    def maxconn_share(self, f: Frontend, worker: int) -> int:
        """Worker `worker`'s part of `f.maxconn`: the parts add up to maxconn."""
        n = self.global_.workers
        return f.maxconn // n + (1 if worker < f.maxconn % n else 0)


# --- scalar readers: each raises ConfigError naming the key ---------------------------


def parse_duration(value: object) -> float:
    """Seconds from a number or "500ms", "5s", "2m", "1h"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not m:
            raise ValueError(f"expected a duration like 500ms, 5s, 2m, got {value!r}")
        unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
        seconds = float(m.group(1)) * unit
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and >= 0, got {value!r}")
    return seconds


class _Reader:
    """Reads one table, remembering the key path for error messages."""

    def __init__(self, source: str, path: str, table: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(table, dict):
            raise ConfigError(source, path, f"expected a table, got {_kind(table)}")
        self.table: dict[str, Any] = table

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def only(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for name in self.table:
            if name not in allowed:
                hint = _suggest(name, allowed)
                raise self.error(name, f"unknown key{hint} (allowed: {', '.join(sorted(allowed))})")

    def has(self, name: str) -> bool:
        return name in self.table

    def get_int(self, name: str, default: int, lo: int = 0, hi: int = 1 << 31) -> int:
        v = self.table.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(name, f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            raise self.error(name, f"must be between {lo} and {hi}, got {v}")
        return v

    def get_bool(self, name: str, default: bool) -> bool:
        v = self.table.get(name, default)
        if not isinstance(v, bool):
            raise self.error(name, f"expected true or false, got {_kind(v)}")
        return v

    def get_str(self, name: str, default: str | None) -> str | None:
        v = self.table.get(name, default)
        if v is not None and not isinstance(v, str):
            raise self.error(name, f"expected a string, got {_kind(v)}")
        return v

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        v = self.get_str(name, default)
        if v is None or v not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def duration(self, name: str, default: float | None, allow_none: bool = False) -> float | None:
        v = self.table.get(name, default)
        if v is None or (allow_none and v in ("none", "off", 0)):
            return None if allow_none else default
        try:
            return parse_duration(v)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def sub(self, name: str) -> _Reader:
        return _Reader(self.source, self.key(name), self.table.get(name, {}))


def _kind(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__) + f" ({v!r})"


def _suggest(name: str, allowed: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _address(r: _Reader, key: str, text: object, *, server: bool) -> Address:
    if not isinstance(text, str):
        raise r.error(key, f"expected an address string like 'mptcp@:8443', got {_kind(text)}")
    try:
        addr = parse_address(text)
    except ValueError as exc:
        raise r.error(key, f"bad address {text!r}: {exc}") from None
    if addr.protocol not in ("tcp", "mptcp", "unix"):
        raise r.error(
            key, f"bad address {text!r}: protocol {addr.protocol!r} cannot carry a stream"
        )
    if addr.protocol != "unix":
        if addr.port is None:
            raise r.error(key, f"bad address {text!r}: a port is needed, as in {text}:8443")
        if server and addr.port_end != addr.port:
            raise r.error(key, f"bad address {text!r}: a server takes one port, not a range")
        if server and addr.port == 0 and addr.host in ("0.0.0.0", "::"):
            return addr  # the original destination (HAProxy's `server s 0.0.0.0:0`)
        if server and (not addr.host or addr.port == 0):
            raise r.error(key, f"bad address {text!r}: a server needs a host and a port")
    return addr


# --- sections -------------------------------------------------------------------


def _global(r: _Reader) -> GlobalSettings:
    r.only(
        (
            "workers",
            "log",
            "log-format",
            "metrics",
            "user",
            "group",
            "stop-timeout",
            "hard-stop-after",
            "stats-socket",
        )
    )
    cpus = os.cpu_count() or 1
    metrics_text = r.get_str("metrics", DEFAULT_METRICS)
    metrics = None
    if metrics_text:
        metrics = _address(r, "metrics", metrics_text, server=False)
        if metrics.protocol == "unix" or metrics.port_end != metrics.port:
            raise r.error("metrics", f"bad address {metrics_text!r}: one TCP port, not a range")
    stop = r.duration("stop-timeout", 10.0)
    assert stop is not None
    stats, stats_perms = None, None
    if r.has("stats-socket"):
        stats, _, stats_perms, stats_net = _bind(r, "stats-socket", r.table["stats-socket"])
        if stats_net is not None:
            raise r.error("stats-socket", f"bind option {stats_net} is not for the stats socket")
        if stats.protocol != "unix":
            raise r.error("stats-socket", f"the runtime API listens on a unix socket, not {stats}")
    return GlobalSettings(
        workers=r.get_int("workers", cpus, 1, 256),
        log=_log_target(r),
        log_format=r.choice("log-format", "text", LOG_FORMATS),
        metrics=metrics,
        user=r.get_str("user", None),
        group=r.get_str("group", None),
        stop_timeout=stop,
        hard_stop_after=r.duration("hard-stop-after", None, allow_none=True),
        stats_socket=stats,
        stats_perms=stats_perms,
    )


def _log_target(r: _Reader) -> str:
    text = r.get_str("log", "stderr") or "none"
    try:
        parse_target(text)
    except ValueError as exc:
        raise r.error("log", str(exc)) from None
    return text


def _timeouts(r: _Reader) -> Timeouts:
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


def _frontend(r: _Reader, name: str) -> Frontend:
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
        raise r.error("bind", f"expected an address or a non-empty array, got {_kind(binds_raw)}")
    parsed = [
        _bind(r, f"bind[{i}]" if len(binds_raw) > 1 else "bind", b) for i, b in enumerate(binds_raw)
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
    rules = _rules(r)
    inspect_delay = _inspect_delay(r, rules)
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


def _rules(r: _Reader) -> tuple[acl.Rule, ...]:
    """`acl.NAME = "fetch [flags] patterns"` (or an array: OR-ed) and `use_backend =
    ["BACKEND if CONDITION", ...]`, as HAProxy's `acl` and `use_backend` lines."""
    acls: dict[str, tuple[acl.Test, ...]] = {}
    table = r.table.get("acl", {})
    if not isinstance(table, dict):
        raise r.error("acl", f'expected a table of NAME = "fetch patterns", got {_kind(table)}')
    for name, raw in table.items():
        texts = [raw] if isinstance(raw, str) else raw
        if not acl.acl_name_ok(name):
            raise r.error(f"acl.{name}", "ACL names are letters, digits and _.:-")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise r.error(
                f"acl.{name}", f'expected "fetch [flags] patterns" or an array, got {_kind(raw)}'
            )
        try:
            acls[name] = tuple(acl.parse_acl(t.split()) for t in texts)
        except acl.AclError as exc:
            raise r.error(f"acl.{name}", str(exc)) from None
    raw_rules = r.table.get("use_backend", [])
    if isinstance(raw_rules, str):
        raw_rules = [raw_rules]
    if not isinstance(raw_rules, list) or not all(isinstance(t, str) for t in raw_rules):
        raise r.error(
            "use_backend", f'expected an array of "BACKEND if CONDITION", got {_kind(raw_rules)}'
        )
    rules = []
    for i, text in enumerate(raw_rules):
        try:
            rules.append(acl.parse_rule(text, acls))
        except acl.AclError as exc:
            raise r.error(f"use_backend[{i}]", f"{text!r}: {exc}") from None
    shadow = acl.shadowing(rules)
    if shadow is not None:
        j, i = shadow
        raise r.error(
            f"use_backend[{j}]",
            f"{rules[j].text!r} is never met: use_backend[{i}] ({rules[i].text!r}) takes every"
            " connection it would (the first rule met wins, as in HAProxy); drop or reorder it",
        )
    return tuple(rules)


def _inspect_delay(r: _Reader, rules: Sequence[acl.Rule]) -> float | None:
    sni = [i for i, rule in enumerate(rules) if "req.ssl_sni" in rule.fetches]
    tcp = r.sub("tcp-request")
    tcp.only(("inspect-delay",))
    delay = tcp.duration("inspect-delay", None, allow_none=True)
    if delay is None and sni:
        raise r.error(
            f"use_backend[{sni[0]}]",
            f"{rules[sni[0]].text!r} reads req.ssl_sni, but tcp-request.inspect-delay is not set:"
            ' say how long to wait for the ClientHello (tcp-request.inspect-delay = "5s")',
        )
    if delay is not None and not sni:
        raise tcp.error(
            "inspect-delay",
            "no use_backend rule reads req.ssl_sni: nothing waits for the client's"
            " first bytes (drop it, or add a rule on req.ssl_sni)",
        )
    return delay


def _destinations(r: _Reader) -> DestinationPolicy:
    d = r.sub("destinations")
    d.only(("clients", "psk", "allow", "deny", "own"))
    lists = {}
    for key in ("clients", "allow", "deny", "own"):
        v = d.table.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise d.error(key, f"expected an array of networks, got {_kind(v)}")
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


def _bind(
    r: _Reader, key: str, text: object
) -> tuple[Address, bool, UnixPerms | None, NetBind | None]:
    """`mptcp@[::]:443 [v4v6|v6only]`, `unix@/run/p.sock [mode 660] [user U] [group G]`:
    the address, whether an IPv6 listener is IPv6-only, and a unix socket file's
    permissions. As in HAProxy, `[::]` takes IPv4 clients too unless `v6only` says not."""
    words = text.split() if isinstance(text, str) else []
    addr = _address(r, key, words[0] if words else text, server=False)
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


def _send_proxy(r: _Reader) -> int:
    v = r.table.get("send-proxy", False)
    if v is False or v == "off":
        return 0
    if v is True or v in ("v1", 1):
        return 1
    if v in ("v2", 2):
        return 2
    raise r.error("send-proxy", f"must be false, true/'v1' or 'v2', got {_kind(v)}")


def _server(r_backend: _Reader, name: str, raw: object) -> Server:
    if isinstance(raw, str):
        raw = {"address": raw}
    r = _Reader(r_backend.source, r_backend.key(f"server.{name}"), raw)
    r.only(
        (
            "address",
            "weight",
            "backup",
            "send-proxy",
            "mptcp",
            "send-convert",
            "psk",
            "tfo",
            "maxconn",
            "source",
            "slowstart",
        )
    )
    if not r.has("address"):
        raise r.error("address", "missing: where is this server?")
    addr = _address(r, "address", r.table["address"], server=True)
    policy = addr.policy
    if r.has("mptcp"):
        mode = r.choice("mptcp", "prefer", ("prefer", "require", "off"))
        policy = Policy(mode)
    return Server(
        name=name,
        address=addr,
        weight=r.get_int("weight", 1, 0, 256),
        backup=r.get_bool("backup", False),
        send_proxy=_send_proxy(r),
        policy=policy,
        send_convert=r.get_bool("send-convert", False),
        psk=_psk(r),
        tfo=r.get_bool("tfo", False),
        maxconn=r.get_int("maxconn", 0, 0, 10_000_000),
        source=_source(r, addr, tfo=r.get_bool("tfo", False)),
        slowstart=r.duration("slowstart", 0.0) or 0.0,
    )


def _source(r: _Reader, addr: Address, tfo: bool = False) -> str | None:
    """HAProxy's `source ADDR`: an IP literal of the server's family (no port: the
    kernel picks one per connection, IP_BIND_ADDRESS_NO_PORT)."""
    text = r.get_str("source", None)
    if text is None:
        return None
    if tfo or (addr.port == 0 and addr.host in ("0.0.0.0", "::")):
        raise r.error("source", f"not with a tfo or 0.0.0.0:0 server ({addr})")
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise r.error("source", f"expected an IP address, got {text!r}") from None
    if addr.protocol == "unix":
        raise r.error("source", f"{addr} is a unix socket: it has no source address")
    want = addr.family
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    if want in (socket.AF_INET, socket.AF_INET6) and _literal(addr) and want != fam:
        raise r.error("source", f"{text} is IPv{ip.version}, the server {addr} is not")
    return str(ip)


def _literal(addr: Address) -> bool:
    try:
        ipaddress.ip_address(addr.host or "")
    except ValueError:
        return False
    return True


def _psk(r: _Reader) -> bytes | None:
    text = r.get_str("psk", None)
    if text is None:
        return None
    raw = text.encode()
    if not raw or len(raw) % 4 or len(raw) > 64:
        raise r.error("psk", "a pre-shared key is 4 to 64 bytes, a multiple of 4 (a Cookie TLV)")
    return raw


def _check(r: _Reader) -> HealthCheck | None:
    v = r.table.get("check", False)
    if v is False:
        return None
    if v is True:
        return HealthCheck()
    c = r.sub("check")
    c.only(
        (
            "interval",
            "rise",
            "fall",
            "timeout",
            "fastinter",
            "downinter",
            "send",
            "expect",
            "expect-regex",
            "port",
            "addr",
            "send-proxy",
            "observe",
        )
    )
    d = HealthCheck()
    interval = c.duration("interval", d.interval)
    timeout = c.duration("timeout", d.timeout)
    assert interval is not None and timeout is not None
    if interval <= 0:
        raise c.error("interval", "must be > 0")
    if timeout <= 0:
        raise c.error("timeout", "must be > 0")
    inters: dict[str, float | None] = {}
    for key in ("fastinter", "downinter"):
        v = c.duration(key, None, allow_none=True)
        if v is not None and v <= 0:
            raise c.error(key, "must be > 0")
        inters[key] = v
    regex = c.get_str("expect-regex", None)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            raise c.error("expect-regex", f"bad regular expression: {exc}") from None
    addr = c.get_str("addr", None)
    if addr is not None:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise c.error("addr", f"an IP address, not {addr!r}") from None
    send = c.get_str("send", "") or ""
    return HealthCheck(
        interval,
        c.get_int("rise", d.rise, 1, 100),
        c.get_int("fall", d.fall, 1, 100),
        timeout,
        fastinter=inters["fastinter"],
        downinter=inters["downinter"],
        send=send.encode().decode("unicode_escape").encode("latin-1"),
        expect=c.get_str("expect", None),
        expect_regex=regex,
        port=c.get_int("port", 0, 0, 65535),
        addr=addr,
        send_proxy=c.get_bool("send-proxy", False),
        observe=c.choice("observe", "", ("", "layer4")),
    )


def _backend(r: _Reader, name: str) -> Backend:
    r.only(
        (
            "server",
            "balance",
            "retries",
            "redispatch",
            "check",
            "source",
            "resolve-interval",
            "init-addr",
        )
    )
    servers_table = r.table.get("server")
    if not isinstance(servers_table, dict) or not servers_table:
        raise r.error(
            "server", 'missing: a backend needs at least one server (server.NAME = "tcp@host:port")'
        )
    servers = []
    for sname, raw in servers_table.items():
        if not _NAME.match(sname):
            raise r.error(f"server.{sname}", "server names are letters, digits and _.:-")
        server = _server(r, sname, raw)
        if server.source is None and r.has("source"):  # the backend's, for each server
            server = replace(server, source=_source(r, server.address, server.tfo))
        servers.append(server)
    if all(s.weight == 0 for s in servers):
        raise r.error("server", "every server has weight 0: nothing could be chosen")
    interval = r.duration("resolve-interval", None, allow_none=True)
    if interval is not None and interval <= 0:
        raise r.error("resolve-interval", 'must be above 0 (or "none")')
    init_addr = r.choice("init-addr", "libc", INIT_ADDR)
    if init_addr == "none" and interval is None:
        raise r.error(
            "init-addr",
            '"none" needs resolve-interval: a server that does not resolve at start'
            " comes up when its name resolves later",
        )
    return Backend(
        name=name,
        servers=tuple(servers),
        balance=r.choice("balance", "roundrobin", BALANCE_ALGORITHMS),
        retries=r.get_int("retries", 3, 0, 100),
        check=_check(r),
        redispatch=r.get_bool("redispatch", True),
        resolve_interval=interval,
        init_addr=init_addr,
    )


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a decoded TOML document."""
    top = _Reader(source, "", dict(data))
    top.only(("global", "frontend", "backend"))
    global_ = _global(top.sub("global"))
    fr = top.sub("frontend")
    br = top.sub("backend")
    if not fr.table:
        raise ConfigError(
            source, "frontend", "missing: no [frontend.NAME] section, nothing to listen on"
        )
    backends: dict[str, Backend] = {}
    for name in br.table:
        if not _NAME.match(name):
            raise br.error(name, "backend names are letters, digits and _.:-")
        backends[name] = _backend(br.sub(name), name)
    frontends = []
    bound: list[tuple[str, str, Address, bool]] = []  # (frontend, key, address, v6only)
    for name in fr.table:
        if not _NAME.match(name):
            raise fr.error(name, "frontend names are letters, digits and _.:-")
        sub = fr.sub(name)
        f = _frontend(sub, name)
        have = ", ".join(sorted(backends)) or "none"
        if f.backend not in backends:
            key = "default_backend" if sub.has("default_backend") else "backend"
            raise sub.error(key, f"no backend named {f.backend!r} (have: {have})")
        for i, rule in enumerate(f.rules):
            if rule.backend not in backends:
                raise sub.error(
                    f"use_backend[{i}]",
                    f"{rule.text!r}: no backend named {rule.backend!r} (have: {have})",
                )
        _check_converter(sub, f, backends[f.backend])
        _check_routing(sub, f, backends)
        if f.maxconn < global_.workers:
            raise sub.error(
                "maxconn",
                f"{f.maxconn} is fewer than global.workers ({global_.workers}):"
                " maxconn is shared out between the workers, each needs at least one",
            )
        if 0 < f.maxconnrate < global_.workers:
            raise sub.error(
                "maxconnrate",
                f"{f.maxconnrate} is fewer than global.workers ({global_.workers}):"
                " maxconnrate is shared out between the workers, each needs at least one",
            )
        for s, bname in ((s, b) for b in f.backends_used for s in backends[b].servers):
            if 0 < s.maxconn < global_.workers:
                raise ConfigError(
                    source,
                    f"backend.{bname}.server.{s.name}.maxconn",
                    f"{s.maxconn} is fewer than global.workers ({global_.workers}):"
                    " maxconn is shared out between the workers, each needs at least one",
                )
        for i, b in enumerate(f.binds):
            key = f"bind[{i}]" if len(f.binds) > 1 else "bind"
            v6only = b.family == socket.AF_INET6 and not f.dualstack(i)
            for other_fe, other_key, other, other_v6only in bound:
                if binds_overlap(b, other, v6only, other_v6only):
                    raise sub.error(
                        key,
                        f"{b} overlaps {other} (frontend.{other_fe}.{other_key}):"
                        " one address, one frontend",
                    )
            bound.append((name, key, b, v6only))
        frontends.append(f)
    return Config(source, global_, tuple(frontends), backends)


def _check_converter(r: _Reader, f: Frontend, b: Backend) -> None:
    """Fail closed: a frontend that lets clients name a destination checks them."""
    anywhere = any(s.original_destination for s in b.servers)
    if f.accept_convert and f.accept_proxy:
        raise r.error("accept-convert", "accept-proxy or accept-convert, not both")
    if f.accept_convert and not anywhere:
        raise r.error(
            "accept-convert",
            f"backend {b.name!r} has no server 0.0.0.0:0 (the destination the client names)",
        )
    if anywhere and not (f.intercept or f.accept_proxy or f.accept_convert):
        raise r.error(
            "backend",
            f"backend {b.name!r} has a server 0.0.0.0:0 (the original destination), but"
            " this frontend learns none: set intercept, accept-proxy or accept-convert",
        )
    if anywhere and (f.accept_proxy or f.accept_convert) and f.destinations is None:
        raise r.error(
            "destinations",
            f"missing: backend {b.name!r} connects where clients say (server 0.0.0.0:0);"
            " set destinations.clients (and allow/deny) so it is not an open relay",
        )
    if anywhere and b.check is not None:
        raise ConfigError(
            r.source, f"backend.{b.name}.check", "a server 0.0.0.0:0 cannot be health-checked"
        )


def _check_routing(r: _Reader, f: Frontend, backends: Mapping[str, Backend]) -> None:
    """use_backend rules: on frontends the data paths route (not the converter's), and
    none that no connection could meet."""
    if not f.rules:
        return
    why = ""
    if f.intercept or f.accept_convert:
        why = "an intercepting or accept-convert frontend"
    elif any(nb is not None and nb.transparent for nb in f.net):
        why = "a frontend with transparent binds"
    else:
        for name in f.backends_used:
            if any(s.original_destination for s in backends[name].servers):
                why = f"backend {name!r} (a server 0.0.0.0:0)"
    if why:
        raise r.error("use_backend", f"routing is not offered with {why}: one backend there")
    if f.accept_proxy or any(b.protocol != "unix" and not b.port for b in f.binds):
        return  # dst_port comes from a PROXY header, or a port the kernel picks
    ports = [(b.port or 0, b.port_end or b.port or 0) for b in f.binds if b.protocol != "unix"]
    for i, rule in enumerate(f.rules):
        for alt in rule.condition:
            for neg, tests in alt:
                for t in tests:
                    if t.fetch != "dst_port" or neg:
                        continue
                    if not any(lo <= bhi and blo <= hi for lo, hi in t.ports for blo, bhi in ports):
                        raise r.error(
                            f"use_backend[{i}]",
                            f"{rule.text!r}: dst_port matches none of this frontend's binds"
                            f" ({', '.join(str(b) for b in f.binds)})",
                        )


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


def parse_text(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    return from_mapping(data, source)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not UTF-8 text") from None
    return parse_text(text, source)


def quick(
    pairs: Sequence[tuple[str, Sequence[str]]],
    *,
    workers: int | None = None,
    metrics: str | None = None,
    source: str = "command line",
) -> Config:
    """The `--listen A --to B [--to C]` form: one frontend+backend per --listen."""
    if not pairs:
        raise ConfigError(source, "--listen", "missing: give at least one --listen ADDR --to ADDR")
    doc: dict[str, Any] = {"frontend": {}, "backend": {}, "global": {}}
    if workers is not None:
        doc["global"]["workers"] = workers
    if metrics is not None:
        doc["global"]["metrics"] = metrics
    for i, (listen, targets) in enumerate(pairs, 1):
        if not targets:
            raise ConfigError(source, "--to", f"--listen {listen} has no --to after it")
        name = f"listen{i}"
        doc["frontend"][name] = {"bind": [listen], "backend": name}
        doc["backend"][name] = {"server": {f"s{j}": t for j, t in enumerate(targets, 1)}}
    try:
        return from_mapping(doc, source)
    except ConfigError as exc:
        raise ConfigError(source, _quick_key(exc.key), exc.reason) from None


def _quick_key(key: str) -> str:
    if ".bind" in key:
        return "--listen"
    if ".server" in key:
        return "--to"
    return key
