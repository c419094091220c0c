"""The runtime API, master side: HAProxy's stats socket / master CLI.

`global.stats-socket = "unix@/run/mptcpkit.sock mode 600"` makes the master listen
there. One command per line; the answer ends when the master closes the connection
(as HAProxy's, so `socat` works), and a command ending in `json` is answered in JSON.
The master answers from its workers (each asked on its socketpair, see control.py):

    show servers              state, admin state, weight, current/total connections
    show sessions             client, server, each leg's MPTCP state/subflows, bytes, age
    set server B/S state ready|drain|maint
    set server B/S weight N
    reload                    "ok", or the configuration error
    help

It runs in a thread of the master; a reload is handed to the master's main loop.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import threading
from collections.abc import Callable
from typing import Any

from mptcpkit.proxy import control
from mptcpkit.proxy.configmodel import Config, ConfigError

__all__ = ["ControlServer", "request"]

WORKER_TIMEOUT = 5.0  # seconds a worker has to answer
HELP = """\
show servers [json]
show sessions [json]
set server BACKEND/SERVER state ready|drain|maint
set server BACKEND/SERVER weight N
reload [json]
help
"""


class CommandError(Exception):
    pass


class ControlServer:
    """The operator's socket, served in a thread of the master."""

    def __init__(self, cfg: Config, reload: Callable[[], str | None]) -> None:
        g = cfg.global_
        assert g.stats_socket is not None
        self.path = str(g.stats_socket.path)
        self.reload = reload
        self.lock = threading.Lock()  # held while talking to workers or changing them
        self.workers: dict[int, socket.socket] = {}  # pid -> the master's end
        self.overrides: dict[tuple[str, str], dict[str, Any]] = {}
        self.names = {(b, s.name) for b, be in cfg.backends.items() for s in be.servers}
        # the checker's board (health.py), as the master has it now: `maint` pauses checks
        self.board: Callable[[], Any] = lambda: None
        self.client: socket.socket | None = None  # the operator connection being served
        self.retired: set[int] = set()  # workers a reload retired: draining, not serving
        self._stop = False
        self.thread = threading.Thread(target=self._serve, name="stats-socket", daemon=True)
        from mptcpkit.proxy.listeners import _set_perms, _unix_server

        try:
            self.sock = _unix_server(self.path)
        except OSError as exc:
            raise ConfigError(
                cfg.source, "global.stats-socket", f"cannot listen: {exc.strerror or exc}"
            ) from None
        try:
            perms = g.stats_perms
            if perms is not None and not self.path.startswith("@"):
                _set_perms(self.path, perms, _owner(cfg, perms))
        except (OSError, ConfigError) as exc:
            self.close()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                cfg.source, "global.stats-socket", f"cannot set its owner/mode: {exc}"
            ) from None
        self.sock.settimeout(0.5)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop = True
        if self.thread.is_alive():
            self.thread.join(2.0)
        self.sock.close()
        if not self.path.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with self.lock:
            for s in self.workers.values():
                s.close()
            self.workers.clear()

    # --- workers (called by the master's main thread) ------------------------------

    def channel(self) -> tuple[socket.socket, socket.socket]:
        """A new worker's socketpair: (the master's end, the worker's end)."""
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def forked(self) -> None:
        """In a new worker: close the master's sockets it inherited."""
        self.sock.close()
        for s in (*self.workers.values(), self.client):
            if s is not None:
                s.close()

    def add(self, pid: int, sock: socket.socket) -> None:
        with self.lock:
            self.workers[pid] = sock

    def remove(self, pid: int) -> None:
        with self.lock:
            s = self.workers.pop(pid, None)
        if s is not None:
            s.close()
        self.retired.discard(pid)

    def reloaded(self, cfg: Config) -> None:
        """A reload reads the file afresh: runtime changes are dropped (as HAProxy
        without a server-state-file)."""
        self.overrides.clear()
        self.names = {(b, s.name) for b, be in cfg.backends.items() for s in be.servers}

    # --- serving --------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop:
                    return
                continue
            self.client = conn
            with conn:
                conn.settimeout(5.0)
                try:
                    line = _read_line(conn)
                    conn.sendall(self.command(line).encode())
                    # A worker forked meanwhile (reload) holds a copy of this fd:
                    # shutdown, not only close, ends the answer.
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.client = None

    def command(self, line: str) -> str:
        words = line.split()
        as_json = bool(words) and words[-1] == "json"
        if as_json:
            words = words[:-1]
        try:
            data = self._run(words)
        except CommandError as exc:
            if as_json:
                return json.dumps({"error": str(exc)}) + "\n"
            return f"error: {exc}\n"
        if as_json:
            return json.dumps(data) + "\n"
        if words[:2] == ["show", "servers"]:
            return control.format_servers(data)
        if words[:2] == ["show", "sessions"]:
            return control.format_sessions(data)
        if isinstance(data, str):
            return data
        return "ok\n"

    def _run(self, words: list[str]) -> Any:
        if words in ([], ["help"]):
            return HELP
        if words == ["show", "servers"]:
            return self._servers()
        if words == ["show", "sessions"]:
            rows: list[Any] = []
            for reply in self._ask({"op": "sessions"}, everyone=True):
                rows.extend(reply)
            return rows
        if len(words) == 5 and words[:2] == ["set", "server"]:
            return self._set(words[2], words[3], words[4])
        if words == ["reload"]:
            err = self.reload()
            if err is not None:
                raise CommandError(err)
            return {"ok": True}
        raise CommandError(f"unknown command {' '.join(words)!r} (try: help)")

    def _servers(self) -> list[dict[str, Any]]:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        states: dict[tuple[str, str], set[str]] = {}
        for reply in self._ask({"op": "servers"}, everyone=False):
            for row in reply:
                key = (row["backend"], row["server"])
                states.setdefault(key, set()).add(row["state"])
                if key not in merged:
                    merged[key] = dict(row)
                else:
                    merged[key]["cur"] += row["cur"]
                    merged[key]["total"] += row["total"]
        for key, row in merged.items():
            seen = states[key]
            # Each worker checks on its own: say so when they disagree.
            row["state"] = seen.pop() if len(seen) == 1 else "MIXED"
            if row["admin"] == "maint":
                row["state"] = "MAINT"
        return list(merged.values())

    def _set(self, name: str, what: str, value: str) -> dict[str, Any]:
        backend, _, server = name.partition("/")
        if (backend, server) not in self.names:
            raise CommandError(f"no such server {name!r} (BACKEND/SERVER)")
        change: dict[str, Any]
        if what == "state":
            if value not in control.ADMIN_STATES:
                raise CommandError(f"state must be ready, drain or maint, not {value!r}")
            change = {"admin": value}
        elif what == "weight":
            try:
                weight = int(value)
            except ValueError:
                weight = -1
            if not 0 <= weight <= 256:
                raise CommandError(f"weight must be 0 to 256, not {value!r}")
            change = {"weight": weight}
        else:
            raise CommandError(f"set server {name} takes state or weight, not {what!r}")
        req = {"op": "set", "backend": backend, "server": server, "change": change}
        with self.lock:  # workers started later get it too (they fork with overrides)
            self.overrides.setdefault((backend, server), {}).update(change)
            for reply in self._ask_locked(req, everyone=False):
                if reply.get("error"):
                    raise CommandError(reply["error"])
            board = self.board()
            if board is not None and "admin" in change:
                board.set_maint(backend, server, change["admin"] == "maint")
        return {"ok": True}

    def _ask(self, req: dict[str, Any], *, everyone: bool) -> list[Any]:
        with self.lock:
            return self._ask_locked(req, everyone=everyone)

    def _ask_locked(self, req: dict[str, Any], *, everyone: bool) -> list[Any]:
        """Each worker's answer (serving ones; with `everyone`, draining ones too)."""
        out = []
        line = json.dumps(req).encode() + b"\n"
        for pid, s in list(self.workers.items()):
            if not everyone and pid in self.retired:
                continue
            try:
                s.settimeout(WORKER_TIMEOUT)
                s.sendall(line)
                out.append(json.loads(_read_line(s, limit=64 << 20)))
            except (OSError, ValueError):
                continue  # it is exiting: the master reaps it
        return out


def _read_line(s: socket.socket, limit: int = 4096) -> str:
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def _owner(cfg: Config, perms: Any) -> tuple[int, int]:
    uid = gid = -1
    try:
        if perms.user is not None:
            uid = pwd.getpwnam(perms.user).pw_uid
        if perms.group is not None:
            gid = grp.getgrnam(perms.group).gr_gid
    except KeyError:
        what = f"user {perms.user!r}" if uid == -1 and perms.user else f"group {perms.group!r}"
        raise ConfigError(cfg.source, "global.stats-socket", f"no such {what}") from None
    return uid, gid


def request(path: str, command: str, timeout: float = 30.0) -> str:
    """Send one command to a proxy's stats socket; its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect("\0" + path[1:] if path.startswith("@") else path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
