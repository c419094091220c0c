"""What a worker needs, made ready by the master before anything listens: fail closed.

Server names, the log file, the user to switch to: each can fail, and a worker that
fails after the fork crash-loops while the master holds the port (clients hang, even
for healthy servers). So the master does all of it first: at start (exit 2 naming the
key and the error), for `--check`, and before a reload is accepted (the running
configuration stays). Workers get the results through the fork and never resolve a
name themselves.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
from dataclasses import dataclass, field
from typing import Any

from mptcpkit.proxy.config import Config, ConfigError

__all__ = [
    "Prepared",
    "Targets",
    "check_log",
    "log_error",
    "prepare",
    "resolve",
    "resolve_ids",
    "resolve_targets",
]

Targets = dict[str, dict[str, tuple[int, Any]]]  # backend -> server -> (family, sockaddr)


@dataclass(frozen=True)
class Prepared:
    """Everything resolved for one configuration."""

    ids: tuple[int | None, int | None] = (None, None)  # (uid, gid) workers switch to
    targets: Targets = field(default_factory=dict)


def prepare(cfg: Config) -> Prepared:
    """Resolve and check what workers of `cfg` need; ConfigError naming the key if not."""
    ids = resolve_ids(cfg)
    targets = resolve_targets(cfg)
    check_log(cfg)
    return Prepared(ids, targets)


def resolve(addr: Any) -> tuple[int, Any]:
    """(family, sockaddr) of a server address; raises OSError when a name does not resolve."""
    if addr.protocol == "unix":
        return socket.AF_UNIX, addr.path
    family = addr.family if addr.family in (socket.AF_INET, socket.AF_INET6) else 0
    infos = socket.getaddrinfo(addr.host, addr.port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


def resolve_targets(cfg: Config) -> Targets:
    """Every server's (family, sockaddr), by backend: names are looked up here, once."""
    out: Targets = {}
    for name, b in cfg.backends.items():
        out[name] = {}
        for s in b.servers:
            try:
                out[name][s.name] = resolve(s.address)
            except OSError as exc:
                raise ConfigError(
                    cfg.source,
                    f"backend.{name}.server.{s.name}",
                    f"cannot resolve {s.address.host!r} ({s.address}): {exc.strerror or exc}",
                ) from None
    return out


def resolve_ids(cfg: Config) -> tuple[int | None, int | None]:
    """(uid, gid) to switch to after binding; ConfigError for unknown names."""
    g = cfg.global_
    uid = gid = None
    if g.user:
        try:
            pw = pwd.getpwnam(g.user)
        except KeyError:
            raise ConfigError(cfg.source, "global.user", f"no such user {g.user!r}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if g.group:
        try:
            gid = grp.getgrnam(g.group).gr_gid
        except KeyError:
            raise ConfigError(cfg.source, "global.group", f"no such group {g.group!r}") from None
    if (uid is not None or gid is not None) and os.geteuid() != 0:
        raise ConfigError(cfg.source, "global.user", "switching user needs root")
    return uid, gid


def check_log(cfg: Config) -> None:
    """A log file must be writable (or creatable) now; workers open it before setuid."""
    path = cfg.global_.log
    if path in ("stderr", "none") or "@" in path:  # not a file (a syslog target)
        return
    try:
        if os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
            return
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise log_error(cfg, exc) from None


def log_error(cfg: Config, exc: OSError) -> ConfigError:
    """An OSError from opening `global.log`, as a config error."""
    return ConfigError(
        cfg.source, "global.log", f"cannot open {cfg.global_.log!r}: {exc.strerror or exc}"
    )
