"""The proxy's configuration: a TOML file (or `--listen/--to` pairs) made into a checked model.

Pure: no sockets are touched here. Every error names the file, the key and the reason
(`proxy.toml: frontend.web.backend: no backend named 'ap' (have: app)`), so that
`mptcpkit proxy --check` and a failed reload can say exactly what to fix.

This module is the entry point (`load`, `parse_text`, `quick`): it reads the document's
top level and `[global]`, and checks the sections against each other. The sections
are read by configfrontend.py (with configrules.py) and configbackend.py, each table
through configread.py, into the model of configmodel.py.

    [global]
    workers = 2                 # default: one per core
    metrics = "127.0.0.1:9464"  # Prometheus endpoint; "" turns it off
    log = "stderr"              # or "none", a file path, syslog: "udp@host:514 local0"
    log-format = "text"         # or "json"
    user = "nobody"             # drop root after binding
    group = "nogroup"
    stop-timeout = "10s"        # SIGTERM: drain this long, then cut
    hard-stop-after = "30m"     # reload: old workers still draining then are cut

    [frontend.web]
    bind = ["mptcp@:8443", "mptcp@[::]:9000-9010"]
    backend = "app"
    maxconn = 10000             # for the whole proxy, shared out between the workers
    accept-proxy = false
    timeout = { client = "60s", connect = "5s", server = "60s" }  # also tunnel,
                                # client-fin, server-fin (timeouts.py); "250ms" works

    [backend.app]
    balance = "roundrobin"      # leastconn, source
    retries = 3                 # retries of the server after a failed connect
    resolve-interval = "10s"    # re-resolve server names this often (default: never)
    init-addr = "libc"          # a name not resolving at start: fail; "none": start DOWN
    redispatch = true           # the last retry goes to another server
    check = { interval = "2s", rise = 2, fall = 3, timeout = "1s" }
    server.s1 = "tcp@10.0.0.5:443"
    server.s2 = { address = "mptcp@10.0.0.6:443", weight = 2, backup = false,
                  send-proxy = "v2", mptcp = "require" }
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from mptcpkit.address import Address
from mptcpkit.proxy.configbackend import read_backend
from mptcpkit.proxy.configfrontend import binds_overlap, read_bind, read_frontend
from mptcpkit.proxy.configmodel import (
    DEFAULT_METRICS,
    LOG_FORMATS,
    Backend,
    Config,
    ConfigError,
    Frontend,
    GlobalSettings,
)
from mptcpkit.proxy.configread import NAME, Reader, read_address
from mptcpkit.proxy.configrules import check_routing
from mptcpkit.proxy.logging import parse_target

__all__ = ["Config", "ConfigError", "from_mapping", "load", "parse_text", "quick"]


def _global(r: Reader) -> GlobalSettings:
    r.only(
        (
            "workers",
            "log",
            "log-format",
            "metrics",
            "user",
            "group",
            "stop-timeout",
            "hard-stop-after",
            "stats-socket",
        )
    )
    cpus = os.cpu_count() or 1
    metrics_text = r.get_str("metrics", DEFAULT_METRICS)
    metrics = None
    if metrics_text:
        metrics = read_address(r, "metrics", metrics_text, server=False)
        if metrics.protocol == "unix" or metrics.port_end != metrics.port:
            raise r.error("metrics", f"bad address {metrics_text!r}: one TCP port, not a range")
    stop = r.duration("stop-timeout", 10.0)
    assert stop is not None
    stats, stats_perms = None, None
    if r.has("stats-socket"):
        stats, _, stats_perms, stats_net = read_bind(r, "stats-socket", r.table["stats-socket"])
        if stats_net is not None:
            raise r.error("stats-socket", f"bind option {stats_net} is not for the stats socket")
        if stats.protocol != "unix":
            raise r.error("stats-socket", f"the runtime API listens on a unix socket, not {stats}")
    return GlobalSettings(
        workers=r.get_int("workers", cpus, 1, 256),
        log=_log_target(r),
        log_format=r.choice("log-format", "text", LOG_FORMATS),
        metrics=metrics,
        user=r.get_str("user", None),
        group=r.get_str("group", None),
        stop_timeout=stop,
        hard_stop_after=r.duration("hard-stop-after", None, allow_none=True),
        stats_socket=stats,
        stats_perms=stats_perms,
    )


def _log_target(r: Reader) -> str:
    text = r.get_str("log", "stderr") or "none"
    try:
        parse_target(text)
    except ValueError as exc:
        raise r.error("log", str(exc)) from None
    return text


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a decoded TOML document."""
    top = Reader(source, "", dict(data))
    top.only(("global", "frontend", "backend"))
    global_ = _global(top.sub("global"))
    fr = top.sub("frontend")
    br = top.sub("backend")
    if not fr.table:
        raise ConfigError(
            source, "frontend", "missing: no [frontend.NAME] section, nothing to listen on"
        )
    backends: dict[str, Backend] = {}
    for name in br.table:
        if not NAME.match(name):
            raise br.error(name, "backend names are letters, digits and _.:-")
        backends[name] = read_backend(br.sub(name), name)
    frontends = []
    bound: list[tuple[str, str, Address, bool]] = []  # (frontend, key, address, v6only)
    for name in fr.table:
        if not NAME.match(name):
            raise fr.error(name, "frontend names are letters, digits and _.:-")
        sub = fr.sub(name)
        f = read_frontend(sub, name)
        have = ", ".join(sorted(backends)) or "none"
        if f.backend not in backends:
            key = "default_backend" if sub.has("default_backend") else "backend"
            raise sub.error(key, f"no backend named {f.backend!r} (have: {have})")
        for i, rule in enumerate(f.rules):
            if rule.backend not in backends:
                raise sub.error(
                    f"use_backend[{i}]",
                    f"{rule.text!r}: no backend named {rule.backend!r} (have: {have})",
                )
        _check_converter(sub, f, backends[f.backend])
        check_routing(sub, f, backends)
        if f.maxconn < global_.workers:
            raise sub.error(
                "maxconn",
                f"{f.maxconn} is fewer than global.workers ({global_.workers}):"
                " maxconn is shared out between the workers, each needs at least one",
            )
        if 0 < f.maxconnrate < global_.workers:
            raise sub.error(
                "maxconnrate",
                f"{f.maxconnrate} is fewer than global.workers ({global_.workers}):"
                " maxconnrate is shared out between the workers, each needs at least one",
            )
        for s, bname in ((s, b) for b in f.backends_used for s in backends[b].servers):
            if 0 < s.maxconn < global_.workers:
                raise ConfigError(
                    source,
                    f"backend.{bname}.server.{s.name}.maxconn",
                    f"{s.maxconn} is fewer than global.workers ({global_.workers}):"
                    " maxconn is shared out between the workers, each needs at least one",
                )
        for i, b in enumerate(f.binds):
            key = f"bind[{i}]" if len(f.binds) > 1 else "bind"
            v6only = b.family == socket.AF_INET6 and not f.dualstack(i)
            for other_fe, other_key, other, other_v6only in bound:
                if binds_overlap(b, other, v6only, other_v6only):
                    raise sub.error(
                        key,
                        f"{b} overlaps {other} (frontend.{other_fe}.{other_key}):"
                        " one address, one frontend",
                    )
            bound.append((name, key, b, v6only))
        frontends.append(f)
    return Config(source, global_, tuple(frontends), backends)


def _check_converter(r: Reader, f: Frontend, b: Backend) -> None:
    """Fail closed: a frontend that lets clients name a destination checks them."""
    anywhere = any(s.original_destination for s in b.servers)
    if f.accept_convert and f.accept_proxy:
        raise r.error("accept-convert", "accept-proxy or accept-convert, not both")
    if f.accept_convert and not anywhere:
        raise r.error(
            "accept-convert",
            f"backend {b.name!r} has no server 0.0.0.0:0 (the destination the client names)",
        )
    if anywhere and not (f.intercept or f.accept_proxy or f.accept_convert):
        raise r.error(
            "backend",
            f"backend {b.name!r} has a server 0.0.0.0:0 (the original destination), but"
            " this frontend learns none: set intercept, accept-proxy or accept-convert",
        )
    if anywhere and (f.accept_proxy or f.accept_convert) and f.destinations is None:
        raise r.error(
            "destinations",
            f"missing: backend {b.name!r} connects where clients say (server 0.0.0.0:0);"
            " set destinations.clients (and allow/deny) so it is not an open relay",
        )
    if anywhere and b.check is not None:
        raise ConfigError(
            r.source, f"backend.{b.name}.check", "a server 0.0.0.0:0 cannot be health-checked"
        )


def parse_text(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    return from_mapping(data, source)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not UTF-8 text") from None
    return parse_text(text, source)


def quick(
    pairs: Sequence[tuple[str, Sequence[str]]],
    *,
    workers: int | None = None,
    metrics: str | None = None,
    source: str = "command line",
) -> Config:
    """The `--listen A --to B [--to C]` form: one frontend+backend per --listen."""
    if not pairs:
        raise ConfigError(source, "--listen", "missing: give at least one --listen ADDR --to ADDR")
    doc: dict[str, Any] = {"frontend": {}, "backend": {}, "global": {}}
    if workers is not None:
        doc["global"]["workers"] = workers
    if metrics is not None:
        doc["global"]["metrics"] = metrics
    for i, (listen, targets) in enumerate(pairs, 1):
        if not targets:
            raise ConfigError(source, "--to", f"--listen {listen} has no --to after it")
        name = f"listen{i}"
        doc["frontend"][name] = {"bind": [listen], "backend": name}
        doc["backend"][name] = {"server": {f"s{j}": t for j, t in enumerate(targets, 1)}}
    try:
        return from_mapping(doc, source)
    except ConfigError as exc:
        raise ConfigError(source, _quick_key(exc.key), exc.reason) from None


def _quick_key(key: str) -> str:
    if ".bind" in key:
        return "--listen"
    if ".server" in key:
        return "--to"
    return key
