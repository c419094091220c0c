"""What a converter decides, written once for both data paths.

converter.py (the Python relay) and compiledconvert.py (what `_engine.c` asks) both
use these: which frontends are converters, the greeting a site gateway sends, the
destination policy's verdict, and how every refusal is logged, counted and answered
(RFC 8803: an Error TLV before FIN for a Convert client, a reset for a PROXY one).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy import convertproto as cp
from mptcpkit.proxy import proxyproto
from mptcpkit.proxy.destpolicy import DestinationPolicy, Refusal

if TYPE_CHECKING:
    from mptcpkit.proxy.configmodel import Backend, Frontend, Server
    from mptcpkit.proxy.datapath import FrontendPort

__all__ = [
    "PSK_TLV",
    "TFO_WAIT",
    "admission",
    "error_code",
    "first_wait",
    "greeting",
    "needed",
    "not_intercepted",
    "options_refused",
    "refusal",
    "remote_refused",
    "text",
]

PSK_TLV = 0xE0  # PROXY v2 custom TLV carrying the pre-shared key (PP2_TYPE_MIN_CUSTOM)
TFO_WAIT = 0.05  # a TFO site waits this long for a client's first bytes (seconds)
_UNREACHABLE = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL}
)


def needed(f: Frontend, b: Backend) -> bool:
    """Whether frontend `f` (with backend `b`) is a converter, relayed here."""
    return bool(
        f.intercept
        or f.accept_convert
        or any(s.send_convert or s.original_destination or s.psk or s.tfo for s in b.servers)
    )


def first_wait(f: Frontend, b: Backend) -> float:
    """How long a site gateway holds a new connection for the client's first bytes, so
    that they go in the SYN with the Connect TLV (TCP Fast Open): TFO_WAIT when it
    intercepts for a `tfo` server, else -1 (it connects at once). A client that speaks
    first (HTTP, TLS) sends within a LAN round trip; one that waits for the server (SMTP,
    SSH) waits this long once."""
    return TFO_WAIT if f.intercept and any(s.tfo for s in b.servers) else -1.0


def error_code(exc: BaseException) -> cp.ErrorCode:
    """RFC 8803's error for a failed connect to the destination."""
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return cp.ErrorCode.CONNECTION_RESET
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return cp.ErrorCode.DESTINATION_UNREACHABLE
    return cp.ErrorCode.NETWORK_FAILURE


def options_refused(options: bytes) -> int | None:
    """The first TCP option kind in a Connect TLV this converter will not set, if any."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            return None
        if kind == 1:
            i += 1
            continue
        return kind
    return None


def text(addr: Any) -> str:
    """An address for the log: host:port, [v6]:port, "?" if unknown."""
    if addr is None:
        return "?"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def greeting(server: Server, caddr: Any, dest: Any) -> bytes:
    """What a site gateway sends its remote gateway first: a Connect TLV (with the
    cookie) or a PROXY header (v2 with the key as TLV 0xE0) naming `dest`."""
    if server.send_convert:
        return cp.connect_request(dest[0], dest[1], server.psk)
    if server.send_proxy == 1:
        return proxyproto.build_v1(caddr, dest)
    if server.send_proxy:
        tlvs = ((PSK_TLV, server.psk),) if server.psk else ()
        return proxyproto.build_v2(caddr, dest, tlvs=tlvs)
    return b""


def admission(
    policy: DestinationPolicy | None, peer: Any, dest: tuple[str, int], psk: bytes | None
) -> Refusal | None:
    """May `peer` (with key `psk`) go to `dest`? None if yes."""
    if policy is None:  # config.py makes it required where clients name destinations
        return Refusal(cp.ErrorCode.NOT_AUTHORIZED, "no destinations policy")
    host = peer[0] if isinstance(peer, tuple) else str(peer)
    if policy.allows(host, psk, dest[0], dest[1]):  # the fast path: ranges, made once
        return None
    return policy.check_client(host, psk) or policy.check_destination(*dest)


def refusal(
    fe: FrontendPort, peer: Any, dest: Any, code: int, reason: str, value: bytes = b""
) -> tuple[str, bytes | None]:
    """A remote gateway refuses a connection: logged with the reason, counted; (how the
    connection ended, the Error TLV to answer with before FIN, or None: reset (PROXY))."""
    name = cp.Error(code).name
    fe.rt.log.event(
        f"frontend {fe.cfg.name}: refused {text(peer)} -> {text(dest)}: {reason} ({name})"
    )
    if fe.rt.metrics is not None:
        fe.rt.metrics.proxy_error(fe.cfg.name, f"refused: {name}")
    reply = cp.build([cp.Error(code, value)]) if fe.cfg.accept_convert else None
    return f"refused: {reason}", reply


def not_intercepted(fe: FrontendPort, caddr: Any, dest: Any) -> str:
    """A connection to the site gateway itself (not intercepted): logged; it is reset."""
    fe.rt.log.event(
        f"frontend {fe.cfg.name}: {text(caddr)} -> {text(dest)}:"
        " not an intercepted connection, reset"
    )
    return "not intercepted"


def remote_refused(fe: FrontendPort, caddr: Any, dest: Any, code: int) -> str:
    """The remote gateway answered with an Error TLV: logged; the client is reset."""
    name = cp.Error(code).name
    fe.rt.log.event(
        f"frontend {fe.cfg.name}: {text(caddr)} -> {text(dest)}"
        f" refused by the remote gateway: {name}"
    )
    return f"remote gateway: {name}"
