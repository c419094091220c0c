"""Addresses in HAProxy's syntax: `[proto@]host[:port[-port]]` (HAProxy doc §2.9.3).

    mptcp@[::]:5000     mptcp4@0.0.0.0:8000-8010     tcp@example.net:443
    :8443 (any IPv4)    *:80     :::80 (any IPv6)    unix@/run/app.sock   /run/app.sock

`mptcp@`, `mptcp4@`, `mptcp6@` ask for MPTCP (by default with fallback to TCP: see
`mptcpkit.policy`); `tcp@`, `tcp4@`, `tcp6@`, `ipv4@`, `ipv6@` and no prefix mean
plain TCP. A `4`/`6` suffix fixes the address family. The parse follows HAProxy's
own (`str2sa_range()`): the last `:` before any `]` separates the port, so `::1:80`
is `[::1]:80`; brackets are optional and may hold IPv4; a path starting with `/` is
a unix socket. The deliberate differences are listed in docs/addresses.md and
checked against `haproxy -c` by tests/test_address_haproxy.py.
Parsing is pure; `create_server()` and `create_connection()` act on the result.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mptcpkit.policy import Policy, PolicyLike, as_policy

if TYPE_CHECKING:
    from mptcpkit.sockets import Socket

# prefix -> (protocol, family or None when the address decides)
_PREFIXES: dict[str, tuple[str, int | None]] = {
    "mptcp": ("mptcp", None),
    "mptcp4": ("mptcp", socket.AF_INET),
    "mptcp6": ("mptcp", socket.AF_INET6),
    "tcp": ("tcp", None),
    "tcp4": ("tcp", socket.AF_INET),
    "tcp6": ("tcp", socket.AF_INET6),
    "ipv4": ("tcp", socket.AF_INET),
    "ipv6": ("tcp", socket.AF_INET6),
    "unix": ("unix", socket.AF_UNIX),
}


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address. `host` is "" for any address; `port` is None when absent."""

    prefix: str  # as written ("" when none)
    protocol: str  # "mptcp", "tcp" or "unix"
    family: int  # AF_INET, AF_INET6, AF_UNSPEC (a host name) or AF_UNIX
    host: str
    port: int | None
    port_end: int | None
    path: str | None = None

    @property
    def ports(self) -> range:
        if self.port is None:
            return range(0)
        return range(self.port, (self.port_end or self.port) + 1)

    @property
    def policy(self) -> Policy:
        return Policy.PREFER if self.protocol == "mptcp" else Policy.OFF

    @property
    def is_any(self) -> bool:
        return self.host == ""

    def bind_host(self) -> str:
        """The host to bind: the wildcard of the family when the address says 'any'."""
        if self.host:
            return self.host
        return "::" if self.family == socket.AF_INET6 else "0.0.0.0"

    def __str__(self) -> str:
        head = f"{self.prefix}@" if self.prefix else ""
        if self.protocol == "unix":
            return f"{head}{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is None:
            return f"{head}{host}"
        ports = str(self.port) if self.port_end == self.port else f"{self.port}-{self.port_end}"
        return f"{head}{host}:{ports}"

    def _policy_for(self, mptcp: PolicyLike) -> Policy:
        explicit = as_policy(mptcp)
        if explicit is None:
            return self.policy
        if self.protocol != "mptcp" and explicit is not Policy.OFF:
            raise ValueError(f"{self} is a plain TCP address; mptcp={mptcp!r} does not apply")
        return explicit

    def create_server(
        self,
        *,
        backlog: int | None = None,
        reuse_port: bool = False,
        mptcp: PolicyLike = None,
        dualstack_ipv6: bool = False,
    ) -> list[Socket]:
        """Listening sockets, one per port of the range; all or nothing.

        `dualstack_ipv6` makes an IPv6 listener take IPv4 clients too (IPV6_V6ONLY=0);
        it is ignored for IPv4 addresses."""
        from mptcpkit.sockets import create_server

        if self.protocol == "unix" or self.port is None:
            raise ValueError(f"{self}: create_server() needs an IP address with a port")
        policy = self._policy_for(mptcp)
        family = self.family if self.family != socket.AF_UNSPEC else _family_of(self.host)
        made: list[Socket] = []
        try:
            for port in self.ports:
                made.append(
                    create_server(
                        (self.bind_host(), port),
                        family=family,
                        backlog=backlog,
                        reuse_port=reuse_port,
                        mptcp=policy,
                        dualstack_ipv6=dualstack_ipv6 and family == socket.AF_INET6,
                    )
                )
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made

    def create_connection(
        self, timeout: float | None = None, *, mptcp: PolicyLike = None
    ) -> Socket:
        """A connected socket to this address (one port, not a range)."""
        from mptcpkit.sockets import create_connection

        if self.protocol == "unix" or self.port is None or self.is_any:
            raise ValueError(f"{self}: create_connection() needs a host and a port")
        if self.port_end != self.port:
            raise ValueError(f"{self}: cannot connect to a port range")
        family = 0 if self.family == socket.AF_UNSPEC else self.family
        return create_connection(
            (self.host, self.port), timeout, mptcp=self._policy_for(mptcp), family=family
        )


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _fail(text: str, part: str, why: str) -> ValueError:
    return ValueError(f"bad address {text!r}: {why}: {part!r}")


_PORT_RULE = "a port is a number from 1 to 65535"


def _parse_port(text: str, part: str, allow_zero: bool) -> int:
    # HAProxy reads a port with atoi(): leading zeros are fine (`041018` is 41018);
    # unlike atoi, trailing junk (`80x`) is an error here.
    if not part.isascii() or not part.isdigit():
        raise _fail(text, part, _PORT_RULE)
    value = int(part)
    if value > 65535 or (value == 0 and not allow_zero):
        raise _fail(text, part, _PORT_RULE)
    return value


def _parse_ports(text: str, part: str) -> tuple[int, int]:
    if part[:1] in ("+", "-"):
        raise _fail(text, part, "port offsets are not supported")
    low_text, dash, high_text = part.partition("-")
    if not dash:
        port = _parse_port(text, part, allow_zero=True)  # 0: the kernel picks (a difference)
        return port, port
    low = _parse_port(text, low_text, allow_zero=False)
    high = _parse_port(text, high_text, allow_zero=False)
    if high < low:
        raise _fail(text, part, "a port range must not run backwards")
    return low, high


def _ip_literal(part: str, family: int | None) -> tuple[str, int] | None:
    """HAProxy's str2ip2() without resolution: (host, family), host "" for any."""
    if part.startswith("["):
        if len(part) < 4 or len(part) >= 48 or not part.endswith("]"):
            return None
        part = part[1:-1]
    if part == "::" and family in (None, socket.AF_INET6):
        return "::", socket.AF_INET6
    if part in ("", "*"):
        return "", family if family is not None else socket.AF_INET
    for af in (socket.AF_INET6, socket.AF_INET):
        if family in (None, af):
            try:
                # inet_ntop writes v4-mapped addresses as the socket module does
                return socket.inet_ntop(af, socket.inet_pton(af, part)), af
            except (OSError, ValueError):
                pass
    return None


# patterns compiled on first use (re's cache), not at import
_LABEL = r"[A-Za-z0-9_-]{0,63}"
# what gethostbyname() hands to inet_aton() instead of the resolver
_NUMERIC = r"[0-9.]+|(0[xX][0-9A-Fa-f]*|[0-9]+)(\.(0[xX][0-9A-Fa-f]*|[0-9]+))*\.?"


def _parse_host(text: str, part: str, family: int | None) -> tuple[str, int]:
    literal = _ip_literal(part, family)
    if literal is not None:
        return literal
    if family is not None and _ip_literal(part, None) is not None:
        want = "IPv4" if family == socket.AF_INET else "IPv6"
        raise _fail(text, part, f"the prefix asks for {want}")
    if part.startswith("["):
        close = part.find("]")
        if 0 < close < len(part) - 1:
            raise _fail(text, part[close + 1 :], "expected ':port' after ']'")
        raise _fail(text, part, "not an IP address in brackets")
    # Not an IP literal: HAProxy then checks the name's characters and resolves it
    # with gethostbyname(), which also reads inet_aton() numbers ("127.1", "0x7f.1").
    if len(part) > 255 or not all(re.fullmatch(_LABEL, label) for label in part.split(".")):
        raise _fail(text, part, "not an IP address or host name")
    if re.fullmatch(_NUMERIC, part):
        try:
            host = socket.inet_ntoa(socket.inet_aton(part))
        except OSError:
            raise _fail(text, part, "not an IPv4 address") from None
        if family not in (None, socket.AF_INET):
            raise _fail(text, part, "the prefix asks for IPv6")
        return host, socket.AF_INET
    if part.startswith(".") or ".." in part:
        raise _fail(text, part, "not a host name")
    return part.lower(), family if family is not None else socket.AF_UNSPEC


_UNIX_PATH_MAX = 107  # sun_path is 108 bytes, with its terminating NUL


def parse_address(text: str) -> Address:
    """Parse `[proto@]host[:port[-port]]`; ValueError quoting the bad part."""
    if not isinstance(text, str):
        raise TypeError(f"parse_address() takes a string, not {type(text).__name__}")
    prefix, at, rest = text.partition("@")
    if not at:
        prefix, rest = "", text
    elif prefix not in _PREFIXES:
        known = ", ".join(f"{p}@" for p in _PREFIXES)
        raise _fail(text, prefix + "@", f"unknown prefix (known: {known})")
    protocol, family = _PREFIXES.get(prefix, ("tcp", None))
    if protocol == "unix" or (not prefix and rest.startswith("/")):
        if "\0" in rest:
            raise _fail(text, rest, "a unix socket path cannot hold a NUL")
        if not rest:
            raise _fail(text, rest, "a unix socket needs a path")
        if len(os.fsencode(rest)) > _UNIX_PATH_MAX:
            raise _fail(text, rest, f"a unix socket path is at most {_UNIX_PATH_MAX} bytes")
        return Address(prefix, "unix", socket.AF_UNIX, "", None, None, rest)
    # As HAProxy: the last ':' or ']' decides; a ':' there separates the port.
    cut = max(rest.rfind(":"), rest.rfind("]"))
    if cut >= 0 and rest[cut] == ":":
        host_part, port_part = rest[:cut], rest[cut + 1 :]
        if port_part == "":
            raise _fail(text, rest, "':' must be followed by a port")
    else:
        host_part, port_part = rest, None
    host, resolved_family = _parse_host(text, host_part, family)
    port = port_end = None
    if port_part is not None:
        port, port_end = _parse_ports(text, port_part)
    elif host == "":
        raise _fail(text, rest, "an address needs a host, a port, or both")
    return Address(prefix, protocol, resolved_family, host, port, port_end)
