"""What a worker needs, made ready by the master before anything listens: fail closed.

Server names, the log file, the user to switch to: each can fail, and a worker that
fails after the fork crash-loops while the master holds the port (clients hang, even
for healthy servers). So the master does all of it first: at start (exit 2 naming the
key and the error), for `--check`, and before a reload is accepted (the running
configuration stays). Workers get the results through the fork and never resolve a
name themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import pwd
import resource
import socket
from dataclasses import dataclass, field
from typing import Any

from mptcpkit.proxy.configmodel import Config, ConfigError, Frontend
from mptcpkit.proxy.logging import EventLog, parse_target
from mptcpkit.proxy.resolvers import lookup

__all__ = [
    "Prepared",
    "Targets",
    "check_log",
    "fd_limit",
    "fds_needed",
    "log_error",
    "prepare",
    "resolve",
    "resolve_ids",
    "resolve_targets",
    "unix_owner",
]

FD_RESERVE = 64  # the interpreter, epoll, timers, the log, metrics files, pipes
Targets = dict[str, dict[str, tuple[int, Any]]]  # backend -> server -> (family, sockaddr)


@dataclass(frozen=True)
class Prepared:
    """Everything resolved for one configuration."""

    ids: tuple[int | None, int | None] = (None, None)  # (uid, gid) workers switch to
    targets: Targets = field(default_factory=dict)
    cfg: Config | None = None  # the configuration to run (maxconn fitted to the fd limit)
    notes: tuple[str, ...] = ()  # what was changed, for the log
    unresolved: frozenset[str] = frozenset()  # "backend/server" starting DOWN (init-addr)


def prepare(cfg: Config) -> Prepared:
    """Resolve and check what workers of `cfg` need; ConfigError naming the key if not."""
    ids = resolve_ids(cfg)
    unresolved: list[str] = []
    targets = resolve_targets(cfg, unresolved)
    check_log(cfg)
    for f in cfg.frontends:
        for i in range(len(f.binds)):
            unix_owner(cfg, f, i)
    cfg, notes = fd_limit(cfg)
    notes += tuple(
        f"server {u}: name does not resolve, starting it DOWN (init-addr none)" for u in unresolved
    )
    return Prepared(ids, targets, cfg, notes, frozenset(unresolved))


def fds_needed(cfg: Config) -> tuple[int, int]:
    """(fixed, connection slots): a process of `cfg` needs fixed + 2 * slots file
    descriptors, as HAProxy computes ulimit-n. A worker: two per connection of its
    maxconn share, its listeners, a health check per server and a reserve; the master
    holds every worker's listeners."""
    listeners = sum(len(a.ports) or 1 for f in cfg.frontends for a in f.binds)
    servers = sum(len(b.servers) for b in cfg.backends.values())
    conns = sum(cfg.maxconn_share(f, 0) for f in cfg.frontends)  # worker 0: the largest
    worker = listeners + servers + FD_RESERVE
    master = listeners * cfg.global_.workers + FD_RESERVE
    return max(worker, master - 2 * conns), conns


def fd_limit(cfg: Config) -> tuple[Config, tuple[str, ...]]:
    """Raise RLIMIT_NOFILE to what maxconn needs (workers inherit it): the soft limit,
    and the hard one when allowed (root with CAP_SYS_RESOURCE). Out of reach, maxconns
    left at their default are lowered to fit what the others leave (HAProxy derives
    maxconn from ulimit-n); if that is not enough, a ConfigError says what to change."""
    fixed, conns = fds_needed(cfg)
    need = fixed + 2 * conns
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return cfg, ()
    for limits in ((need, max(hard, need)), (hard, hard)):
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
    have = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if have >= need:
        return cfg, ()
    n = cfg.global_.workers
    defaults = [f for f in cfg.frontends if not f.maxconn_set]
    set_conns = sum(cfg.maxconn_share(f, 0) for f in cfg.frontends if f.maxconn_set)
    room = (have - fixed) // 2 - set_conns  # connection slots per worker for the defaults
    if not defaults or room < len(defaults):
        named = [f for f in cfg.frontends if f.maxconn_set]
        key = f"frontend.{named[0].name}.maxconn" if len(named) == 1 else "maxconn"
        total = sum(f.maxconn for f in cfg.frontends)
        raise ConfigError(
            cfg.source,
            key,
            f"maxconn {total} needs {need} file descriptors per process, above the"
            f" limit of {have} (ulimit -n): lower maxconn, or raise the limit"
            f" (ulimit -n {need}; systemd: LimitNOFILE={need})",
        )
    maxconn = room // len(defaults) * n
    fitted = dataclasses.replace(
        cfg,
        frontends=tuple(
            f if f.maxconn_set else dataclasses.replace(f, maxconn=maxconn) for f in cfg.frontends
        ),
    )
    return fitted, (
        f"maxconn lowered from {defaults[0].maxconn} to {maxconn} for"
        f" {', '.join(f.name for f in defaults)} to fit the fd limit of {have}"
        " (ulimit -n): set maxconn, or raise the limit",
    )


def resolve(addr: Any) -> tuple[int, Any]:
    """(family, sockaddr) of a server address; raises OSError when a name does not resolve."""
    return lookup(addr)


def resolve_targets(cfg: Config, unresolved: list[str] | None = None) -> Targets:
    """Every server's (family, sockaddr), by backend: names are looked up here (and again
    by resolvers.py with `resolve-interval`). With `init-addr = "none"` a name that does
    not resolve gets a placeholder (0.0.0.0) and "backend/server" in `unresolved`."""
    out: Targets = {}
    for name, b in cfg.backends.items():
        out[name] = {}
        for s in b.servers:
            try:
                out[name][s.name] = resolve(s.address)
            except OSError as exc:
                if b.init_addr == "none" and unresolved is not None:
                    out[name][s.name] = (socket.AF_INET, ("0.0.0.0", s.address.port))
                    unresolved.append(f"{name}/{s.name}")
                    continue
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


def unix_owner(cfg: Config, f: Frontend, i: int) -> tuple[int, int]:
    """(uid, gid) for bind `i`'s `user`/`group` options (-1: unchanged)."""
    perms = f.unix_perms[i] if i < len(f.unix_perms) else None
    uid = gid = -1
    if perms is None:
        return uid, gid
    key = f"frontend.{f.name}.bind" + (f"[{i}]" if len(f.binds) > 1 else "")
    if perms.user is not None:
        try:
            uid = pwd.getpwnam(perms.user).pw_uid
        except KeyError:
            raise ConfigError(cfg.source, key, f"no such user {perms.user!r}") from None
    if perms.group is not None:
        try:
            gid = grp.getgrnam(perms.group).gr_gid
        except KeyError:
            raise ConfigError(cfg.source, key, f"no such group {perms.group!r}") from None
    return uid, gid


def check_log(cfg: Config) -> None:
    """A log file must be writable (or creatable) now; workers open it before setuid."""
    target = parse_target(cfg.global_.log)  # checked by config.py: no ValueError
    if target.kind in ("udp", "unix"):  # syslog: its host resolves, a socket opens
        try:
            EventLog(cfg.global_.log).close()
        except OSError as exc:
            raise log_error(cfg, exc) from None
    if target.kind != "file":  # stderr, none, or syslog (which never blocks)
        return
    path = target.path
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
