"""Converter frontends on the compiled engine: the decisions `_engine.c` asks for.

The engine runs converter.py's steps in C: it reads an intercepted connection's
original destination (SO_ORIGINAL_DST, or the socket's own address under tproxy),
parses RFC 8803 messages itself (`_convert.h`, convertproto.py's rules, checked
against each other by hypothesis), connects a `0.0.0.0:0` server where the client
says, answers the Convert reply together with the destination's first bytes, and
reads a remote gateway's reply. What is not about bytes is asked here, once per
connection, and written with converter.py's functions, so both data paths decide,
log, count and answer alike: the destination policy, the PROXY header and key, and
every refusal.

A verdict is (how the connection ended, the Error TLV to send before FIN), or (how,
None): reset (a PROXY v2 client, RFC 8803 has no error channel there).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any

from mptcpkit.abi.sockaddr import encode_address
from mptcpkit.proxy import convertproto as cp
from mptcpkit.proxy import proxyproto
from mptcpkit.proxy.compiled import CompiledFrontend
from mptcpkit.proxy.convertdecide import (
    PSK_TLV,
    admission,
    error_code,
    first_wait,
    greeting,
    not_intercepted,
    refusal,
    remote_refused,
    text,
)
from mptcpkit.proxy.legstate import reason_of

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.configmodel import Server

__all__ = ["WIRE_CONVERT", "WIRE_TFO", "CompiledConverter", "wire_flags"]

WIRE_TFO = 1  # the server leg connects with TCP_FASTOPEN_CONNECT
WIRE_CONVERT = 2  # the server (a remote gateway) answers a Convert reply first
_INTERCEPT = {"": 0, "redirect": 1, "tproxy": 2}
Verdict = tuple[str, bytes | None]


def wire_flags(server: Server) -> int:
    """The last item of a converter server's wire tuple (datapath.Wire)."""
    return (WIRE_TFO if server.tfo else 0) | (WIRE_CONVERT if server.send_convert else 0)


class CompiledConverter(CompiledFrontend):
    """A converter frontend (converter.needed) whose connections live in the engine."""

    def engine_options(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "convert": cfg.accept_convert,
            "intercept": _INTERCEPT[cfg.intercept or ""],
            "names_dest": cfg.accept_convert or cfg.accept_proxy,
            "first_wait": first_wait(cfg, self.backend.cfg),
        }

    # --- the site gateway -------------------------------------------------------------

    def header(self, state: ServerState, caddr: Any, local: Any) -> bytes:
        """The Connect TLV or PROXY header naming the intercepted connection's destination."""
        return greeting(state.server, caddr, local)

    def not_intercepted(self, caddr: Any, dest: Any) -> str:
        return not_intercepted(self, caddr, dest)

    def remote_refused(self, caddr: Any, dest: Any, code: int) -> str:
        return remote_refused(self, caddr, dest, code)

    # --- the remote gateway -----------------------------------------------------------

    def convert(self, peer: Any, host: str, port: int, cookie: bytes | None) -> Verdict | None:
        """A Connect TLV to (host, port) from `peer`: None to go, or the refusal."""
        refused = admission(self.cfg.destinations, peer, (host, port), cookie)
        if refused is None:
            return None
        return refusal(self, peer, (host, port), refused.code, refused.reason)

    def refuse(self, peer: Any, dest: Any, code: int, why: str, value: bytes) -> Verdict:
        """A Convert message the engine could not accept (code: RFC 8803's error)."""
        name = cp.Error(code).name
        if code == cp.ErrorCode.UNSUPPORTED_TCP_OPTION:
            return refusal(self, peer, dest, code, why, value)
        return refusal(self, peer, dest, code, f"bad Convert message: {name}: {why}", value)

    def dest_failed(self, state: ServerState | None, err: int, peer: Any, dest: Any) -> Verdict:
        """The connect to the client's destination failed (err 0: timed out)."""
        exc: BaseException = TimeoutError() if err == 0 else OSError(err, os.strerror(err))
        if state is not None:
            self.backend.attempt_failed(state, exc, [])  # counted and logged as usual
        elif err == errno.EDESTADDRREQ:
            exc = OSError(err, "no destination")
        return refusal(
            self, peer, dest, error_code(exc), f"destination {text(dest)}: {reason_of(exc)}"
        )

    def parse(self, hdr: bytearray, peer: Any = None) -> tuple[Any, ...] | str | None:
        """A PROXY header naming the destination: (source, destination, used, its
        sockaddr) once read and allowed; why the client is reset; None: need more."""
        try:
            parsed = proxyproto.parse(hdr)
        except proxyproto.ProxyProtocolError as exc:
            return f"bad PROXY header: {exc}"
        if parsed is None:
            return "PROXY header too long" if len(hdr) > 16 + 65535 else None
        header, used = parsed
        if header.local or not isinstance(header.destination, tuple):
            return "PROXY LOCAL (no destination)"
        dest = (str(header.destination[0]), int(header.destination[1]))
        psk = next((v for k, v in header.tlvs if k == PSK_TLV), None)
        refused = admission(self.cfg.destinations, peer, dest, psk)
        if refused is not None:
            return refusal(self, peer, dest, refused.code, refused.reason)[0]
        family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        source = header.source if header.source is not None else peer
        return source, dest, used, encode_address(family, dest)
