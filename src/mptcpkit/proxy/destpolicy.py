"""Who may use a remote gateway, and where to: a converter must never be an open relay.

Pure: addresses in, a verdict out. A remote gateway (a frontend that learns each
connection's destination from a Convert Connect TLV or a PROXY header) accepts only
configured client networks and, optionally, a pre-shared key (RFC 8803's Cookie TLV),
and checks every destination:

1. `deny` networks are refused;
2. `allow` networks are accepted (this is how a loopback, link-local or own network
   is let through on purpose);
3. loopback, link-local, unspecified, multicast, and the gateway's own networks
   (`own`: its interfaces' networks) are refused;
4. if `allow` is not empty, everything else is refused; otherwise accepted.

A refusal carries the RFC 8803 error code to answer with (Not Authorized) and a
reason for the log.

`allows()` is the per-connection fast path (converters ask once per connection): the
networks as integer ranges, made once, an address parsed by inet_pton. It only ever
says "allowed" where the checks above would (tests/test_convert_pure.py compares them
with hypothesis); anything else goes to the checks, which give the reason.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from mptcpkit.proxy.convertproto import ErrorCode

__all__ = ["DestinationPolicy", "Refusal", "networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Refusal:
    code: ErrorCode
    reason: str


def networks(items: Iterable[str]) -> tuple[Network, ...]:
    """Networks from "10.0.0.0/8", "fd00::/8" or plain addresses; ValueError names the bad one."""
    out = []
    for text in items:
        try:
            out.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an address or network") from None
    return tuple(out)


def _ip(host: str | IPAddress) -> IPAddress:
    ip = ipaddress.ip_address(host.split("%")[0]) if isinstance(host, str) else host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


Ranges = tuple[tuple[int, int], ...]
_MAPPED = bytes(10) + b"\xff\xff"
_INET6 = socket.AF_INET6
_INET = socket.AF_INET
# What ipaddress calls loopback, link-local, unspecified and multicast (refused unless
# allowed), as networks: IPv4 and IPv6.
_SPECIAL = (
    "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/32", "224.0.0.0/4",
    "::1/128", "fe80::/10", "::/128", "ff00::/8",
)  # fmt: skip


def _ranges(nets: Iterable[Network], version: int) -> Ranges:
    return tuple(
        (int(n.network_address), int(n.broadcast_address)) for n in nets if n.version == version
    )


def _number(host: str) -> tuple[int, int] | None:
    """(IP version, the address as an integer; IPv4-mapped IPv6 as IPv4), None if not
    an address inet_pton takes (then the slow path decides)."""
    try:
        if ":" in host:
            raw = socket.inet_pton(_INET6, host)
            if raw[:12] == _MAPPED:
                return 4, int.from_bytes(raw[12:], "big")
            return 6, int.from_bytes(raw, "big")
        return 4, int.from_bytes(socket.inet_pton(_INET, host), "big")
    except (OSError, ValueError):
        return None


def _hit(x: int, ranges: Ranges) -> bool:
    for lo, hi in ranges:  # noqa: SIM110 (a loop: no generator per call, per connection)
        if lo <= x <= hi:
            return True
    return False


@dataclass(frozen=True)
class _Compiled:
    """A policy's networks as integer ranges, per IP version (index 4 and 6)."""

    clients: dict[int, Ranges]
    deny: dict[int, Ranges]
    allow: dict[int, Ranges]
    refused: dict[int, Ranges]  # special networks and own ones


def _within(ip: IPAddress, nets: Iterable[Network]) -> Network | None:
    for n in nets:
        if ip.version == n.version and ip in n:
            return n
    return None


@dataclass(frozen=True)
class DestinationPolicy:
    """`clients`: networks allowed to use the gateway (empty: nobody). `psk`: the cookie
    a client must present, or None. `allow`/`deny`/`own`: destination networks."""

    clients: tuple[Network, ...] = ()
    psk: bytes | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    own: tuple[Network, ...] = ()
    _fast: _Compiled = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        special = networks(_SPECIAL)

        def both(nets: Iterable[Network]) -> dict[int, Ranges]:
            nets = tuple(nets)
            return {4: _ranges(nets, 4), 6: _ranges(nets, 6)}

        fast = _Compiled(
            both(self.clients), both(self.deny), both(self.allow), both((*special, *self.own))
        )
        object.__setattr__(self, "_fast", fast)

    def allows(self, client: str, psk: bytes | None, dest: str, port: int) -> bool:
        """True if `check_client(client, psk)` and `check_destination(dest, port)` would
        both accept; False: ask them (a refusal, or an address this cannot read)."""
        fast = self._fast
        c = _number(client)
        d = _number(dest)
        if c is None or d is None or not 1 <= port <= 0xFFFF:
            return False
        if not _hit(c[1], fast.clients[c[0]]):
            return False
        if self.psk is not None and (psk is None or not hmac.compare_digest(psk, self.psk)):
            return False
        version, x = d
        if _hit(x, fast.deny[version]):
            return False
        if _hit(x, fast.allow[version]):
            return True
        return not self.allow and not _hit(x, fast.refused[version])

    def check_client(self, host: str | IPAddress, cookie: bytes | None) -> Refusal | None:
        """May this client use the gateway? None if yes."""
        try:
            ip = _ip(host)
        except ValueError:
            return Refusal(ErrorCode.NOT_AUTHORIZED, f"client {host!r} is not an IP address")
        if _within(ip, self.clients) is None:
            return Refusal(ErrorCode.NOT_AUTHORIZED, f"client {ip} is not in an allowed network")
        if self.psk is not None:
            if cookie is None:
                return Refusal(ErrorCode.MISSING_COOKIE, "no pre-shared key (Cookie TLV)")
            if not hmac.compare_digest(cookie, self.psk):
                return Refusal(ErrorCode.NOT_AUTHORIZED, "wrong pre-shared key")
        return None

    def check_destination(self, host: str | IPAddress, port: int) -> Refusal | None:
        """May a connection go to (host, port)? None if yes."""
        try:
            ip = _ip(host)
        except ValueError:
            return Refusal(ErrorCode.NOT_AUTHORIZED, f"destination {host!r} is not an IP address")
        if not 1 <= port <= 0xFFFF:
            return Refusal(ErrorCode.NOT_AUTHORIZED, f"destination port {port}")
        net = _within(ip, self.deny)
        if net is not None:
            return Refusal(ErrorCode.NOT_AUTHORIZED, f"destination {ip} is denied ({net})")
        if _within(ip, self.allow) is not None:
            return None
        for bad, what in (
            (ip.is_loopback, "loopback"),
            (ip.is_link_local, "link-local"),
            (ip.is_unspecified, "unspecified"),
            (ip.is_multicast, "multicast"),
        ):
            if bad:
                return Refusal(ErrorCode.NOT_AUTHORIZED, f"destination {ip} is {what}")
        net = _within(ip, self.own)
        if net is not None:
            return Refusal(
                ErrorCode.NOT_AUTHORIZED, f"destination {ip} is in the gateway's own network {net}"
            )
        if self.allow:
            return Refusal(ErrorCode.NOT_AUTHORIZED, f"destination {ip} is not in the allow list")
        return None
