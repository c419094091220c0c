"""A frontend's choice of backend for each connection (HAProxy's `use_backend`).

Both data paths ask the same question, once per connection of a frontend with
`use_backend` rules, and only there: `route(caddr, dport, data, final)`. The answer
is the backend to connect to, or None while the rules need a ClientHello that has
not arrived whole (the data path peeks again when more comes, and asks with
`final` set when `tcp-request.inspect-delay` passes or the client stops sending).
Facts come from the connection (acl.py evaluates the rules): the client's address
(`src`, the PROXY header's when there is one), the port it connected to (`dst_port`:
the listener's, or the PROXY header's destination) and the ClientHello's server name
(clienthello.py), which is read with MSG_PEEK and so still relayed as it came.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy import acl, clienthello

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.configmodel import Frontend
    from mptcpkit.proxy.datapath import BackendPort

__all__ = ["INSPECT_LIMIT", "Router", "client_ip"]

INSPECT_LIMIT = clienthello.LIMIT  # bytes peeked at most while waiting for a ClientHello


@functools.lru_cache(maxsize=4096)
def _ip(host: str) -> acl.IPAddr | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener's IPv4 client matches IPv4 networks
    return ip


def client_ip(caddr: Any) -> acl.IPAddr | None:
    """The client's IP address as `src` sees it (None: a unix client)."""
    return _ip(caddr[0]) if isinstance(caddr, tuple) and caddr else None


class Router:
    """One frontend's rules and the backends they name, in one worker."""

    def __init__(self, cfg: Frontend, backends: Mapping[str, BackendPort]) -> None:
        self.rules = cfg.rules
        self.default = backends[cfg.backend]
        self.backends = {name: backends[name] for name in cfg.backends_used}
        self.inspect = cfg.inspect_delay  # seconds to wait for a ClientHello, or None
        self.sni = cfg.reads_sni
        # which backend a server belongs to: failed connects and ended ones are counted
        # there (the engine reports the server, not the backend)
        self.owner: dict[ServerState, BackendPort] = {
            state: be for be in self.backends.values() for state in be.states
        }
        self.needs_client_addr = any(be.needs_client_addr for be in self.backends.values())

    def route(self, caddr: Any, dport: int, data: bytes | None, final: bool) -> BackendPort | None:
        """The backend for a connection (see the module doc); `dport` 0: unknown."""
        sni = None
        if self.sni:
            hello = clienthello.parse(data or b"")
            if hello is None and not final:
                return None  # more of the ClientHello may come
            if isinstance(hello, clienthello.Hello):
                sni = hello.sni
        facts = acl.Facts(client_ip(caddr), dport or None, sni)
        name = acl.choose(self.rules, facts)
        return self.default if name is None else self.backends[name]

    def backend_of(self, state: ServerState) -> BackendPort:
        return self.owner.get(state, self.default)
