"""Bonding: the proxy as a transparent MPTCP converter pair.

A *site gateway* intercepts its LAN's TCP connections (nftables `redirect`, or
`tproxy` with a `transparent` frontend) and carries each over one MPTCP connection to
a *remote gateway*, naming the original destination first: an RFC 8803 Connect TLV
(`send-convert`) or a PROXY v2 header (`send-proxy = "v2"`). The remote gateway
(`accept-convert` or `accept-proxy`, a server `0.0.0.0:0` meaning "where the client
says") checks the client and the destination against its `destinations` policy,
connects, and relays. HAProxy with `accept-proxy` and `server s 0.0.0.0:0` can stand
in for the remote gateway.

Refusals follow RFC 8803: a Convert client gets an Error TLV then FIN; a PROXY client
gets a RST. The site gateway turns an Error from its remote gateway into a RST to the
LAN client (the RFC maps errors to RST/ICMP; a user-space gateway can only reset).

These frontends relay in Python here (`relay.Conn` plus the steps below); on the
compiled engine, `_engine.c` runs the same steps and asks `compiledconvert.py` for the
decisions, which use the functions below, so both data paths log, count and answer
alike.
"""

from __future__ import annotations

import _socket
import errno
import socket
from typing import TYPE_CHECKING, Any

import mptcpkit
from mptcpkit import intercept
from mptcpkit.policy import Policy
from mptcpkit.proxy import convertproto as cp
from mptcpkit.proxy import proxyproto
from mptcpkit.proxy.convertdecide import (
    PSK_TLV,
    admission,
    error_code,
    first_wait,
    greeting,
    needed,
    not_intercepted,
    options_refused,
    refusal,
    remote_refused,
    text,
)
from mptcpkit.proxy.frontend import FrontendRuntime
from mptcpkit.proxy.leg import MIN_READ
from mptcpkit.proxy.legstate import reason_of
from mptcpkit.proxy.relay import Conn

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.configmodel import Frontend
    from mptcpkit.proxy.datapath import FrontendPort

__all__ = ["PSK_TLV", "ConvertConn", "ConvertFrontend", "needed", "options_refused"]

MPTCP_OPTION = 30  # TCP option kind of MPTCP: what this converter supports
TCP_FASTOPEN_CONNECT = 30  # linux/tcp.h; MPTCP sockets take it since 6.2
_DONTWAIT = socket.MSG_DONTWAIT
_NONBLOCKING_STREAM = int(socket.SOCK_STREAM) | socket.SOCK_NONBLOCK
_OK_REPLY = cp.build([])  # success: a bare Convert header


class ConvertConn(Conn):
    """One converted connection; `dest` is where the client was going."""

    __slots__ = ("answer", "dest", "first", "held", "intercepted", "peer", "reply", "req")

    def __init__(self, fe: FrontendPort, sock: Any, caddr: Any, mptcp: bool) -> None:
        super().__init__(fe, sock, caddr, mptcp)
        cfg = fe.cfg
        self.peer = caddr  # who connected (a PROXY header replaces caddr)
        self.dest: tuple[str, int] | None = None
        self.req: bytearray | None = bytearray() if cfg.accept_convert else None
        self.reply: bytearray | None = None  # the remote gateway's Convert reply, being read
        self.answer = b""  # for our client before the destination's bytes (Convert reply)
        self.first = False  # TFO site: waiting for the client's first bytes (first_wait)
        self.held = False  # remote: the answer waits for the client's third ACK (_syn_recv)
        self.intercepted = True
        if cfg.intercept:
            binds: list[intercept.Bind] = getattr(fe, "binds", [])
            try:
                self.dest, self.intercepted = intercept.intercepted(sock, cfg.intercept, binds)
            except OSError:
                self.dest, self.intercepted = None, False

    # --- the steps the relay asks for -------------------------------------------------

    def begin(self) -> None:
        fe = self.fe
        if not self.intercepted:
            # Connected to the gateway itself, not intercepted: relaying it to "its
            # destination" would loop back here.
            self.abort(not_intercepted(fe, self.caddr, self.dest))
            return
        wait = getattr(fe, "first_wait", -1.0)
        if wait >= 0 and self.hdr is None:  # TFO: the client's first bytes ride the SYN
            self.first = True
            self.timer = fe.loop.call_later(wait, self._first_bytes)
            return
        if self.req is None:
            super().begin()

    def _first_bytes(self) -> None:
        """The client's first bytes came (or the wait is over): connect, and they go with
        the Connect TLV in the first send, the SYN's data (`_established`)."""
        if not self.first or self.done:
            return
        self.first = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        rb = self.rb
        try:
            n = self.c.sock.recv_into(rb.buf, MIN_READ, _DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(self.c, exc)
            return
        if n:  # 0: FIN (left in the socket for pump to see), or nothing yet
            self.bytes_in += n
            self.early = bytes(rb.view[:n])
        self.c.waiting = True
        self.connect()

    def pump(self, src: Any) -> None:
        if src.client and self.first:
            self._first_bytes()
        elif src.client and self.req is not None:
            self._convert_request()
        elif not src.client and self.reply is not None:
            self._convert_reply()
        elif not src.client and self.answer:
            self._answer_with(src)
        else:
            super().pump(src)

    def start_connect(self, state: ServerState) -> tuple[Any, int]:
        server = state.server
        if not server.original_destination and not server.tfo:
            return super().start_connect(state)
        if server.original_destination:
            if self.dest is None:
                return None, errno.EDESTADDRREQ
            host, port = self.dest
            family: int = socket.AF_INET6 if ":" in host else socket.AF_INET
            sockaddr: Any = (host, port)
        else:
            family, sockaddr = self.fe.backend.targets[server.name]
        policy = server.policy
        if family == socket.AF_UNIX or policy is Policy.OFF:
            sock: Any = _socket.socket(family, _NONBLOCKING_STREAM)
        else:
            sock = mptcpkit.socket(family, _NONBLOCKING_STREAM, mptcp=policy)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if server.tfo:  # with a cookie, connect() is done at once: data rides the SYN
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            err = sock.connect_ex(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock, err

    def greeting(self) -> bytes:
        server = self.server.server if self.server is not None else None
        if server is None or server.original_destination:
            return super().greeting()
        dest = self.dest
        if dest is None:
            return super().greeting()
        if server.send_convert:
            self.reply = bytearray()
        return greeting(server, self.caddr, dest)

    def _established(self, s: Any, events: int) -> None:
        """Site: the client's bytes that came while connecting go in the same send as
        the Connect TLV: MPTCP holds a second small segment back while the first is in
        flight (measured: half a WAN round trip more). As _engine.c's conv_take_first."""
        c = self.c
        if self.fe.cfg.intercept and c.waiting and self.early is None and c.sock is not None:
            try:
                n = c.sock.recv_into(self.rb.buf, MIN_READ, _DONTWAIT)
            except OSError:
                n = 0  # nothing yet, or an error pump sees as usual
            if n:
                self.bytes_in += n
                self.early = bytes(self.rb.view[:n])
        super()._established(s, events)

    def flush(self, dst: Any) -> None:
        if self.held and dst.client:  # an EPOLLOUT edge: the third ACK may have come
            if self._syn_recv():
                return
            self.held = False
            dst.pending = None
            if self.s is not None:
                self.pump(self.s)
            return
        super().flush(dst)

    def _syn_recv(self) -> bool:
        """Linux (6.18): what is written to an MPTCP socket accepted with data in its SYN
        (TCP Fast Open) before the client's third ACK came is never sent, until the
        client sends again; a site gateway waiting for the answer never does. So the
        answer waits while the client leg is in SYN_RECV (as _engine.c's conv_syn_recv)."""
        if not self.c_req or self.c.sock is None:
            return False
        try:
            return bool(self.c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 3)
        except OSError:
            return False

    def _answer_with(self, s: Any) -> None:
        """The Convert reply goes out with the destination's first bytes, in one
        sendmsg (one syscall fewer per connection), or alone if it closes silently."""
        c, rb = self.c, self.rb
        if self._syn_recv():  # hold: the client leg's EPOLLOUT edge calls flush()
            self.held = True
            c.pending = b""  # owed nothing yet: a marker, so its next event calls flush()
            s.waiting = True
            return
        try:
            n = s.sock.recv_into(rb.buf, 0, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(s, exc)
            return
        answer, self.answer = self.answer, b""
        if not n:
            c.pending = answer
            self.flush(c)
            if not self.done:
                self._eof(s, c)
            return
        self.active = True
        self.bytes_out += n
        try:
            sent = c.sock.sendmsg([answer, rb.view[:n]], (), _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.fail(c, exc)
            return
        if sent < len(answer) + n:
            c.pending = (answer + bytes(rb.view[:n]))[sent:]
            s.waiting = True
            return
        if n < rb.size and not s.hup:
            return  # a short read: drained; the next edge says more (as pump)
        super().pump(s)

    def _connect_failed(self, exc: BaseException) -> bool:
        if not self._names_destination():
            return super()._connect_failed(exc)
        state = self.server
        assert state is not None
        self.server = None
        self.fe.backend.attempt_failed(state, exc, [])  # counted and logged as usual
        self._refuse(error_code(exc), f"destination {self._dest_text()}: {reason_of(exc)}")
        return False

    # --- the remote gateway: reading where the client goes ----------------------------

    def _names_destination(self) -> bool:
        return self.fe.cfg.accept_convert or self.fe.cfg.accept_proxy

    def _read_client(self, buf: bytearray, what: str) -> bool | None:
        """Append one read from the client to `buf`: True, None if nothing is there,
        False if the connection ended (then it is closed)."""
        rb = self.rb
        try:
            n = self.c.sock.recv_into(rb.buf, 0, _DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.fail(self.c, exc)
            return False
        if not n:
            self.abort(f"client closed before its {what}")
            return False
        buf += rb.view[:n]
        return True

    def _convert_request(self) -> None:
        req = self.req
        assert req is not None
        while True:
            if not self._read_client(req, "Convert message"):
                return
            try:
                parsed = cp.parse_request(req)
            except cp.ConvertError as exc:
                self._refuse(exc.code, f"bad Convert message: {exc}", exc.value)
                return
            if parsed is not None:
                break
            if len(req) >= cp.MAX_MESSAGE:  # parse() looks no further: cannot happen
                self._refuse(cp.ErrorCode.MALFORMED_MESSAGE, "Convert message too long")
                return
        msg, used = parsed
        self.req = None
        connect = msg.find(cp.Connect)
        if not isinstance(connect, cp.Connect):  # Info: say what we support, and close
            self._answer_and_close(
                cp.build([cp.SupportedTCPExtensions((MPTCP_OPTION,))]), "Info answered"
            )
            return
        self.dest = (str(connect.address), connect.port)
        kind = options_refused(connect.options)
        if kind is not None:
            self._refuse(
                cp.ErrorCode.UNSUPPORTED_TCP_OPTION, f"TCP option {kind} asked", bytes((kind,))
            )
            return
        cookie = msg.find(cp.Cookie)
        psk = cookie.opaque if isinstance(cookie, cp.Cookie) else None
        if self._checked(psk):
            self.answer = _OK_REPLY
            self._go(bytes(req[used:]))

    def _proxy_header(self) -> None:
        hdr = self.hdr
        assert hdr is not None
        while True:
            if not self._read_client(hdr, "PROXY header"):
                return
            try:
                parsed = proxyproto.parse(hdr)
            except proxyproto.ProxyProtocolError as exc:
                self.abort(f"bad PROXY header: {exc}")
                return
            if parsed is not None:
                break
            if len(hdr) > 16 + 65535:
                self.abort("PROXY header too long")
                return
        header, used = parsed
        self.hdr = None
        if header.local or not isinstance(header.destination, tuple):
            # HAProxy keeps the connection's own addresses: here the gateway itself, so
            # it is refused, as any PROXY client is: with a RST (as compiledconvert.py)
            self.abort("PROXY LOCAL (no destination)")
            return
        if header.source is not None:
            self.caddr = header.source
        self.dest = (str(header.destination[0]), int(header.destination[1]))
        psk = next((v for k, v in header.tlvs if k == PSK_TLV), None)
        if self._checked(psk):
            self._go(bytes(hdr[used:]))

    def _checked(self, psk: bytes | None) -> bool:
        """Policy: may this client go to self.dest? Refuses (and False) if not."""
        assert self.dest is not None
        refused = admission(self.fe.cfg.destinations, self.peer, self.dest, psk)
        if refused is not None:
            self._refuse(refused.code, refused.reason)
            return False
        return True

    def _go(self, rest: bytes) -> None:
        self.bytes_in += len(rest)
        self.early = rest or None
        self.c.waiting = True  # more may follow: read it once connected
        self.connect()

    def _refuse(self, code: cp.ErrorCode, reason: str, value: bytes = b"") -> None:
        how, reply = refusal(self.fe, self.peer, self.dest, code, reason, value)
        if reply is not None:
            self._answer_and_close(reply, how)
        else:
            self.abort(how)

    def _answer_and_close(self, data: bytes, how: str) -> None:
        try:
            self.c.sock.send(data, _DONTWAIT)
        except OSError:
            self.abort(how)
            return
        self.end(how)

    def _dest_text(self) -> str:
        return text(self.dest)

    # --- the site gateway: the remote gateway's answer ---------------------------------

    def _convert_reply(self) -> None:
        s = self.s
        reply = self.reply
        assert s is not None and reply is not None
        rb = self.rb
        while True:
            try:
                n = s.sock.recv_into(rb.buf, 0, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(s, exc)
                return
            if not n:
                self.abort("remote gateway closed before its Convert reply")
                return
            reply += rb.view[:n]
            try:
                parsed = cp.parse_reply(reply)
            except cp.ConvertError as exc:
                self.abort(f"bad Convert reply: {exc}")
                return
            if parsed is not None:
                break
        msg, used = parsed
        self.reply = None
        err = msg.find(cp.Error)
        if isinstance(err, cp.Error):  # RFC 8803: an error becomes a reset for the client
            self.abort(remote_refused(self.fe, self.caddr, self.dest, err.code))
            return
        rest = bytes(reply[used:])
        if rest:
            self.bytes_out += len(rest)
            self.c.pending = rest
            self.flush(self.c)
        if self.done:
            return
        if self.c.pending is None:
            super().pump(s)
        else:
            s.waiting = True  # read on once the client took `rest`


class ConvertFrontend(FrontendRuntime):
    """A converter frontend: relayed in Python, with `ConvertConn` connections."""

    conn_type = ConvertConn

    def __init__(
        self, cfg: Frontend, listeners: Any, backend: Any, rt: Any, backends: Any = None
    ) -> None:
        super().__init__(cfg, listeners, backend, rt)  # no use_backend rules (configrules.py)
        self.first_wait = first_wait(cfg, backend.cfg)
        self.binds: list[intercept.Bind] = [  # intercept.intercepted(): the gateway's own
            ls.getsockname()[:2] for ls in self.listeners if ls.family != socket.AF_UNIX
        ]

    def sweep(self, interval: float) -> None:
        """As a frontend's sweep; a client that keeps its Convert message back is cut
        after the client timeout, as one that keeps its PROXY header back."""
        limit = self.cfg.timeouts.client
        if limit is not None:
            for conn in list(self.conns):
                if (
                    isinstance(conn, ConvertConn)
                    and conn.req is not None
                    and not conn.active
                    and conn.idle + interval >= limit
                ):
                    conn.abort("client timeout (no Convert message)")
        super().sweep(interval)

    def local_of(self, conn: Conn) -> Any:
        dest = getattr(conn, "dest", None)
        return dest if dest is not None else super().local_of(conn)
