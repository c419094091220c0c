"""The proxy's configuration as the rest of the proxy reads it: checked, frozen values.

The data paths, the master and the checker take these (a `Config` and its
`Frontend`s, `Backend`s and `Server`s) and never see the TOML; reading and checking
the file is config.py's. Kept apart so that the modules using a configuration do not
depend on the code that parses one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from mptcpkit.address import Address, parse_address
from mptcpkit.policy import Policy
from mptcpkit.proxy import acl
from mptcpkit.proxy.destpolicy import DestinationPolicy

__all__ = [
    "BALANCE_ALGORITHMS",
    "DEFAULT_METRICS",
    "INIT_ADDR",
    "INTERCEPT_MODES",
    "LOG_FORMATS",
    "Backend",
    "Config",
    "ConfigError",
    "Frontend",
    "GlobalSettings",
    "HealthCheck",
    "NetBind",
    "Server",
    "Timeouts",
    "UnixPerms",
]

BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "source")
INIT_ADDR = ("libc", "none")  # HAProxy's init-addr, simplified (resolvers.py)
LOG_FORMATS = ("text", "json")
INTERCEPT_MODES = ("redirect", "tproxy")
DEFAULT_METRICS = "tcp@127.0.0.1:9464"


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
