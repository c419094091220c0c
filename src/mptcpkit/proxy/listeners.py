"""The master's listening sockets, by address and worker, kept across reloads.

- Everything is bound before any worker starts; a bind that fails (port in use) is a
  `ConfigError` and nothing stays listening.
- Each worker gets its own listening sockets on the same addresses (SO_REUSEPORT),
  so the kernel spreads connections across cores. The pool keeps them, so that a
  reload hands unchanged listeners to the new workers (no connection is refused) and
  a lower worker count hands the surplus ones over instead of closing them (closing a
  listener resets what is in its accept queue).
- A unix socket file gets its `mode`/`user`/`group` and is removed with its listener.
- When the proxy stops, new SYNs are first diverted to sockets that drop them
  (`divert`), so that workers can empty their listeners before closing them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from typing import Any

import mptcpkit
from mptcpkit import handover, intercept, netns
from mptcpkit.proxy.configmodel import Config, ConfigError, Frontend, UnixPerms
from mptcpkit.proxy.prepare import unix_owner

__all__ = ["BACKLOG", "ListenerPool", "address_text"]

TFO_QUEUE = 4096  # pending TCP Fast Open requests a listener takes (`tfo = true`)

BACKLOG = 4096
_Key = tuple[str, int]  # (address text, worker index)


def address_text(sock: socket.socket, protocol: str) -> str:
    """`mptcp@127.0.0.1:40123`: what a listener really is, port 0 resolved."""
    if sock.family == socket.AF_UNIX:
        return f"unix@{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{protocol}@[{host}]:{port}" if ":" in host else f"{protocol}@{host}:{port}"


def _unix_server(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.startswith("@"):
            s.bind("\0" + path[1:])
        else:
            if _is_socket(path) and not _listening(path):
                os.unlink(path)  # a stale socket file from an earlier run (never another file)
            s.bind(path)
        s.listen(BACKLOG)
    except BaseException:
        s.close()
        raise
    return s


def _set_perms(path: str, perms: UnixPerms, owner: tuple[int, int]) -> None:
    """A unix socket file's `mode`, `user`, `group` bind options (HAProxy's)."""
    if owner != (-1, -1):
        os.chown(path, *owner)
    if perms.mode is not None:
        os.chmod(path, perms.mode)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _pool_key(f: Frontend, index: int) -> str:
    """Same address and options, same listening socket (across reloads); port 0 is never
    shared."""
    addr = f.binds[index]
    v6only = addr.family == socket.AF_INET6 and not f.dualstack(index)
    text = f"{addr} v6only" if v6only else str(addr)
    net = f.net[index] if index < len(f.net) else None
    if net is not None:
        text = f"{text} {net}"
    if addr.protocol != "unix" and addr.port == 0:
        return f"{text}#{f.name}[{index}]"
    return text


@contextlib.contextmanager
def _listen_errors(cfg: Config, key: str, addr: Any) -> Iterator[None]:
    """A bind or listen that fails is a config error naming the file, key and address."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(
            cfg.source, key, f"cannot listen on {addr}: {exc.strerror or exc}"
        ) from None


class ListenerPool:
    """Listening sockets by (address, worker), kept across reloads."""

    def __init__(self) -> None:
        self.socks: dict[_Key, list[socket.socket]] = {}
        self.files: dict[int, tuple[str, int]] = {}  # id(unix socket) -> (path, inode)

    def bind(self, cfg: Config, workers: int) -> tuple[dict[_Key, list[socket.socket]], list[str]]:
        """Sockets for `cfg` (reusing ours), plus 'frontend address' lines; all or nothing."""
        new: dict[_Key, list[socket.socket]] = {}
        made: list[socket.socket] = []
        lines: list[str] = []
        try:
            for f in cfg.frontends:
                for i, addr in enumerate(f.binds):
                    key_name = f"frontend.{f.name}.bind" + (f"[{i}]" if len(f.binds) > 1 else "")
                    dual = f.dualstack(i)
                    text = _pool_key(f, i)
                    net = f.net[i] if i < len(f.net) else None
                    ns = net.namespace if net is not None else None
                    first = self._get(text, 0, new)
                    if first is None:
                        with _listen_errors(cfg, key_name, addr), netns.entered(ns):
                            first = self._create(cfg, key_name, addr, made, dual)
                    new[(text, 0)] = first
                    perms = f.unix_perms[i] if i < len(f.unix_perms) else None
                    if perms is not None:
                        with _listen_errors(cfg, key_name, addr):
                            _set_perms(str(addr.path), perms, unix_owner(cfg, f, i))
                    for w in range(1, workers):
                        if addr.protocol == "unix":
                            new[(text, w)] = first
                            continue
                        got = self._get(text, w, new)
                        if got is None:
                            with _listen_errors(cfg, key_name, addr), netns.entered(ns):
                                got = [
                                    self._sibling(cfg, key_name, addr, s, made, dual) for s in first
                                ]
                        new[(text, w)] = got
                    # Fewer workers than before: the extra SO_REUSEPORT sockets are handed
                    # to the remaining workers, not closed: closing one would reset the
                    # connections in its accept queue.
                    w = workers
                    while addr.protocol != "unix" and (text, w) in self.socks:
                        new[(text, w)] = self.socks[(text, w)]
                        w += 1
                    if f.tfo and addr.protocol != "unix":
                        for w in range(workers):
                            for sock in new[(text, w)]:
                                with _listen_errors(cfg, key_name, addr):
                                    sock.setsockopt(
                                        socket.IPPROTO_TCP, socket.TCP_FASTOPEN, TFO_QUEUE
                                    )
                    if net is not None and net.interface:  # HAProxy's bind `interface`
                        for w in range(workers):
                            for sock in new[(text, w)]:
                                with _listen_errors(cfg, key_name, addr):
                                    sock.setsockopt(
                                        socket.SOL_SOCKET,
                                        socket.SO_BINDTODEVICE,
                                        net.interface.encode(),
                                    )
                    transparent = f.transparent or (net is not None and net.transparent)
                    if transparent and addr.protocol != "unix":  # nftables tproxy
                        for w in range(workers):
                            for sock in new[(text, w)]:
                                with _listen_errors(cfg, key_name, addr):
                                    intercept.make_transparent(sock)
                    lines.extend(
                        f"frontend {f.name} listening on {address_text(s, addr.protocol)}"
                        for s in first
                    )
        except BaseException:
            for s in made:
                self.discard(s)
            raise
        return new, lines

    def discard(self, s: socket.socket) -> None:
        """Close a listener; a unix socket's file goes too (if it is still ours)."""
        path, ino = self.files.pop(id(s), ("", 0))
        s.close()
        if path:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == ino:
                    os.unlink(path)

    def _get(
        self, text: str, w: int, new: dict[_Key, list[socket.socket]]
    ) -> list[socket.socket] | None:
        return new.get((text, w)) or self.socks.get((text, w))

    def _create(
        self, cfg: Config, key: str, addr: Any, made: list[socket.socket], dual: bool
    ) -> list[socket.socket]:
        with _listen_errors(cfg, key, addr):
            if addr.protocol == "unix":
                socks = [_unix_server(addr.path)]
                if not addr.path.startswith("@"):
                    self.files[id(socks[0])] = (addr.path, os.stat(addr.path).st_ino)
            else:
                socks = list(
                    addr.create_server(backlog=BACKLOG, reuse_port=True, dualstack_ipv6=dual)
                )
        made.extend(socks)
        return socks

    @staticmethod
    def _sibling(
        cfg: Config,
        key: str,
        addr: Any,
        first: socket.socket,
        made: list[socket.socket],
        dual: bool,
    ) -> socket.socket:
        host, port = first.getsockname()[:2]
        with _listen_errors(cfg, key, addr):
            s = mptcpkit.create_server(
                (host, port),
                family=first.family,
                backlog=BACKLOG,
                reuse_port=True,
                mptcp=addr.policy,
                dualstack_ipv6=dual and first.family == socket.AF_INET6,
            )
        made.append(s)
        return s

    def adopt(self, new: dict[_Key, list[socket.socket]]) -> None:
        """Make `new` the pool; close what the new config no longer uses."""
        keep = {id(s) for socks in new.values() for s in socks}
        for s in self.all():
            if id(s) not in keep:
                self.discard(s)
        self.socks = new

    def for_worker(self, cfg: Config, w: int) -> dict[str, list[socket.socket]]:
        """Worker `w`'s sockets: slot w, and slots w + workers, w + 2*workers... kept
        from a reload that lowered the worker count."""
        n = cfg.global_.workers
        out: dict[str, list[socket.socket]] = {}
        for f in cfg.frontends:
            socks: list[socket.socket] = []
            for i in range(len(f.binds)):
                text = _pool_key(f, i)
                slot = w
                while (text, slot) in self.socks:
                    socks.extend(self.socks[(text, slot)])
                    slot += n
            out[f.name] = socks
        return out

    def divert(
        self, cfg: Config, only: set[int] | None = None
    ) -> tuple[list[socket.socket], list[str]]:
        """The proxy stops: from now on the new SYNs for every TCP/MPTCP listener go to
        sockets that drop them (`handover.divert`), so that workers can take what is
        queued or in flight and then close their listeners without resetting anything
        (clients send their SYN again a second later, to whatever listens then).
        Returns those sockets, to close once the workers are gone, and a line for each
        address that could not be diverted. `only`: the listeners (ids) of `cfg` a
        reload drops; the others stay as they are."""
        droppers: list[socket.socket] = []
        failed: list[str] = []
        for f in cfg.frontends:
            for i, addr in enumerate(f.binds):
                if addr.protocol == "unix":
                    continue
                text = _pool_key(f, i)
                groups: dict[tuple[int, Any], dict[int, socket.socket]] = {}
                for (key, _), socks in self.socks.items():
                    if key == text:
                        for s in socks:
                            if only is None or id(s) in only:
                                groups.setdefault((s.family, s.getsockname()), {})[id(s)] = s
                net = f.net[i] if i < len(f.net) else None
                for members in groups.values():
                    try:
                        with netns.entered(net.namespace if net is not None else None):
                            droppers += handover.divert(list(members.values()))
                    except OSError as exc:
                        failed.append(
                            f"frontend {f.name}: new connections to {addr} could not be held"
                            f" off while stopping ({exc.strerror or exc}): one completed as"
                            " a listener closes may be reset"
                        )
        return droppers, failed

    def all(self) -> list[socket.socket]:
        seen: dict[int, socket.socket] = {}
        for socks in self.socks.values():
            for s in socks:
                seen[id(s)] = s
        return list(seen.values())

    def close(self) -> None:
        for s in self.all():
            self.discard(s)
        self.socks = {}
