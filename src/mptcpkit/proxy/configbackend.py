"""A `[backend.NAME]` section: its servers (address, PROXY header, MPTCP, source...)
and its health checks.

Kept apart from the frontends: a backend is read on its own, and only config.py
checks the two against each other.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import replace

from mptcpkit.address import Address
from mptcpkit.policy import Policy
from mptcpkit.proxy.configmodel import BALANCE_ALGORITHMS, INIT_ADDR, Backend, HealthCheck, Server
from mptcpkit.proxy.configread import NAME, Reader, kind, read_address

__all__ = ["read_backend"]


def _send_proxy(r: Reader) -> int:
    v = r.table.get("send-proxy", False)
    if v is False or v == "off":
        return 0
    if v is True or v in ("v1", 1):
        return 1
    if v in ("v2", 2):
        return 2
    raise r.error("send-proxy", f"must be false, true/'v1' or 'v2', got {kind(v)}")


def _server(r_backend: Reader, name: str, raw: object) -> Server:
    if isinstance(raw, str):
        raw = {"address": raw}
    r = Reader(r_backend.source, r_backend.key(f"server.{name}"), raw)
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
    addr = read_address(r, "address", r.table["address"], server=True)
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


def _source(r: Reader, addr: Address, tfo: bool = False) -> str | None:
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


def _psk(r: Reader) -> bytes | None:
    text = r.get_str("psk", None)
    if text is None:
        return None
    raw = text.encode()
    if not raw or len(raw) % 4 or len(raw) > 64:
        raise r.error("psk", "a pre-shared key is 4 to 64 bytes, a multiple of 4 (a Cookie TLV)")
    return raw


def _check(r: Reader) -> HealthCheck | None:
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


def read_backend(r: Reader, name: str) -> Backend:
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
        if not NAME.match(sname):
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
