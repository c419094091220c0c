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
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

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
