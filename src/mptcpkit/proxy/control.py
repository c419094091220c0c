"""The runtime API, worker side: what a worker answers when its master asks.

The master (ctlserver.py) owns the operator's unix socket; each worker has one end of
a socketpair to it and answers one JSON line per question: its servers (state,
admin state, weight, connections), its live sessions (both data paths), or a
`set server` to apply. Also the text forms of the answers, shared by the master
and `mptcpkit proxy ctl`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from mptcpkit.proxy.legstate import leg_state, subflows

__all__ = [
    "ADMIN_STATES",
    "apply",
    "format_servers",
    "format_sessions",
    "servers",
    "sessions",
    "worker_loop",
]

ADMIN_STATES = ("ready", "drain", "maint")  # HAProxy's `set server ... state`
Override = dict[str, Any]  # {"admin": ..., "weight": ...}


def servers(rt: Any) -> list[dict[str, Any]]:
    """This worker's view of every server."""
    out = []
    for name, be in rt.backends.items():
        for st in be.balancer.states:
            out.append(
                {
                    "backend": name,
                    "server": st.server.name,
                    "address": str(st.server.address),
                    "state": "UP" if st.up else "DOWN",
                    "admin": st.admin,
                    "weight": st.weight,
                    "cur": st.active,
                    "total": st.total,
                }
            )
    return out


def _leg(fd: int, asked_mptcp: bool) -> tuple[str, int]:
    """A live leg's MPTCP state and subflows, read now from its socket."""
    if fd < 0:
        return "-", 0
    if asked_mptcp:
        sock = socket.socket(fileno=fd)
        try:
            n = subflows(sock)
        finally:
            sock.detach()
        if n:
            return "MPTCP", n
    return leg_state(fd) or "?", 0


def sessions(rt: Any) -> list[dict[str, Any]]:
    """This worker's live connections, from whichever data path relays them."""
    now = time.time()
    out = []
    for fe in rt.frontends:
        engine = getattr(fe, "engine", None)
        if engine is not None:
            rows = [
                (caddr, state, cfd, sfd, b_in, b_out, start, bool(c_req), be)
                for caddr, state, cfd, sfd, b_in, b_out, start, c_req, be in engine.sessions(fe.id)
            ]
        else:
            rows = []
            for c in list(fe.conns):
                s_sock = c.s.sock if c.s is not None and c.connected_server else None
                rows.append(
                    (
                        c.caddr,
                        c.server,
                        c.c.sock.fileno() if c.c.sock is not None else -1,
                        s_sock.fileno() if s_sock is not None else -1,
                        c.bytes_in,
                        c.bytes_out,
                        c.start,
                        bool(c.c_req),
                        c.be,
                    )
                )
        for caddr, state, cfd, sfd, b_in, b_out, start, c_req, be in rows:
            c_state, c_sub = _leg(cfd, c_req)
            s_mptcp = state is not None and state.server.policy.value != "off"
            s_state, s_sub = _leg(sfd, s_mptcp)
            out.append(
                {
                    "frontend": fe.cfg.name,
                    "client": _addr(caddr),
                    "backend": (fe.backend if be is None else be).cfg.name,
                    "server": state.server.name if state is not None else None,
                    "client_state": c_state,
                    "client_subflows": c_sub,
                    "server_state": s_state,
                    "server_subflows": s_sub,
                    "bytes_in": b_in,
                    "bytes_out": b_out,
                    "age": round(max(0.0, now - start), 3),
                    "worker": rt.worker,
                }
            )
    return out


def _addr(a: Any) -> str:
    if isinstance(a, tuple):
        host, port = a[0], a[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(a) if a else "-"


def apply(rt: Any, backend: str, server: str, change: Override) -> str | None:
    """`set server`: None, or why not (no such backend or server)."""
    be = rt.backends.get(backend)
    if be is None:
        return f"no such backend {backend!r}"
    for st in be.balancer.states:
        if st.server.name == server:
            if "admin" in change:
                st.admin = change["admin"]
            if "weight" in change:
                st.weight = change["weight"]
            if be.queue is not None:  # it may take connections waiting for a slot now
                be.queue.slot_freed()
            return None
    return f"no server {server!r} in backend {backend!r}"


def _answer(rt: Any, req: Mapping[str, Any]) -> Any:
    op = req.get("op")
    if op == "servers":
        return servers(rt)
    if op == "sessions":
        return sessions(rt)
    if op == "set":
        err = apply(rt, req["backend"], req["server"], req["change"])
        return {"error": err} if err else {"ok": True}
    return {"error": f"unknown request {op!r}"}


async def worker_loop(rt: Any, sock: socket.socket) -> None:
    """Answer the master's questions until it closes its end."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    buf = b""
    try:
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    reply = _answer(rt, json.loads(line))
                except Exception as exc:  # a bad question must not kill the worker
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                await loop.sock_sendall(sock, json.dumps(reply).encode() + b"\n")
    except OSError:
        return
    finally:
        sock.close()


# --- text answers ------------------------------------------------------------------------


def _table(head: list[str], rows: Iterable[list[Any]]) -> str:
    rows = [[str(x) for x in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    return "\n".join(lines) + "\n"


def format_servers(rows: list[dict[str, Any]]) -> str:
    head = ["backend", "server", "address", "state", "admin", "weight", "cur", "total"]
    return _table(head, ([r[k] for k in head] for r in rows))


def format_sessions(rows: list[dict[str, Any]]) -> str:
    head = ["frontend", "client", "backend", "server", "client-leg", "server-leg"]
    head += ["bytes-in", "bytes-out", "age"]
    return _table(
        head,
        (
            [
                r["frontend"],
                r["client"],
                r["backend"],
                r["server"] or "-",
                f"{r['client_state']}/{r['client_subflows']}",
                f"{r['server_state']}/{r['server_subflows']}",
                r["bytes_in"],
                r["bytes_out"],
                f"{r['age']:.1f}s",
            ]
            for r in rows
        ),
    )
