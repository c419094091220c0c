"""`pmd.toml`: the path-manager daemon's configuration, parsed and checked without I/O.

mode = "kernel"               # or "userspace" (sets net.mptcp.pm_type=1)
netns = "client"              # optional: manage this namespace
cleanup = true                # on SIGTERM remove the endpoints pmd added
flags = ["subflow"]           # default endpoint flags (kernel mode)
load_balancer = false         # allow_join_initial_addr_port=0 + "signal" endpoints
announce = ["192.0.2.5"]      # with load_balancer: only these addresses are announced
status_socket = "/run/mptcpkit/pmd.sock"
state_dir = "/run/mptcpkit"   # where pmd keeps what it owns, to survive its own crash

[interfaces]
allow = ["eth*", "wlan0"]     # fnmatch globs; empty: every interface but lo
deny = ["docker*"]
[interfaces.flags]
wwan0 = ["subflow", "backup"] # per-interface flags (cellular as backup)

[limits]
subflows = "auto"             # or 0..8; "auto" raises it to the endpoint count
add_addr_accepted = "auto"

[userspace]
policy = "fullmesh"           # or "per-interface", "ndiffports"
ndiffports = 2
announce = true               # servers announce their other addresses

[resubflow]
enabled = true
backoff_initial = 1.0         # seconds, doubled after each failure
backoff_max = 30.0
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from mptcpkit.pm import codec

MODES = ("kernel", "userspace")
POLICIES = ("fullmesh", "per-interface", "ndiffports")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str = "kernel"
    netns: str | None = None
    cleanup: bool = True
    flags: tuple[str, ...] = ("subflow",)
    load_balancer: bool = False
    # top-level `announce`: with load_balancer, the addresses to announce (empty: all)
    announce_addresses: tuple[str, ...] = ()
    status_socket: str | None = None
    state_dir: str = "/run/mptcpkit"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    interface_flags: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    subflows: int | None = None  # None: "auto"
    add_addr_accepted: int | None = None
    policy: str = "fullmesh"
    ndiffports: int = 2
    announce: bool = True
    resubflow: bool = True
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    max_attempts: int = 8

    def wants(self, ifname: str) -> bool:
        """Is `ifname` managed? deny wins over allow; lo never."""
        if ifname == "lo":
            return False
        if any(fnmatch.fnmatchcase(ifname, pat) for pat in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(ifname, pat) for pat in self.allow)

    def manages_address(self, address: str) -> bool:
        """Does this address get an endpoint (when on a managed interface)? With
        `announce`, only the addresses listed do."""
        return not self.announce_addresses or address in self.announce_addresses

    def flags_for(self, ifname: str) -> codec.EndpointFlag:
        """Endpoint flags for addresses on `ifname` (load_balancer forces `signal`)."""
        names = self.flags
        for pat, fl in self.interface_flags.items():
            if fnmatch.fnmatchcase(ifname, pat):
                names = fl
                break
        flags = codec.flags_from_names(names)
        if self.load_balancer:
            flags = (flags & ~(codec.EndpointFlag.SUBFLOW | codec.EndpointFlag.FULLMESH)) | (
                codec.EndpointFlag.SIGNAL
            )
        return codec.EndpointFlag(flags)

    def status_path(self) -> str:
        if self.status_socket:
            return self.status_socket
        suffix = f"-{self.netns}" if self.netns else ""
        return f"/run/mptcpkit/pmd{suffix}.sock"

    def state_path(self) -> str:
        """The state file: one per namespace, so two pmds for one namespace collide."""
        suffix = f"-{self.netns}" if self.netns else ""
        return os.path.join(self.state_dir, f"pmd{suffix}.json")


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _flags(where: str, value: Any) -> tuple[str, ...]:
    """Endpoint flags, refused here when the kernel would refuse them at the first address."""
    names = _strings(where, value)
    try:
        flags = codec.flags_from_names(names)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not names:
        raise ConfigError(
            f"{where}: expected at least one flag (signal, subflow, backup, fullmesh, laminar):"
            " an endpoint without flags never opens or announces a path"
        )
    if flags & codec.EndpointFlag.IMPLICIT:
        raise ConfigError(
            f"{where}: 'implicit' cannot be asked for: the kernel marks endpoints it made"
            " itself that way and refuses to add one"
        )
    if flags & codec.EndpointFlag.SIGNAL and flags & codec.EndpointFlag.FULLMESH:
        raise ConfigError(
            f"{where}: 'signal' and 'fullmesh' together: the kernel refuses such an endpoint"
        )
    return names


def _announce(source: str, data: Mapping[str, Any]) -> tuple[str, ...]:
    where = f"{source}: announce"
    out = []
    for text in _strings(where, data["announce"]):
        try:
            out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not an IP address") from None
    if not out:
        raise ConfigError(f"{where}: expected at least one address (or leave announce out)")
    if data.get("load_balancer") is not True:
        raise ConfigError(
            f"{where}: needs load_balancer = true: without the C flag clients also join "
            "through the balancer's address, and those joins reach other instances"
        )
    if data.get("mode", "kernel") != "kernel":
        raise ConfigError(f'{where}: only with mode = "kernel" (signal endpoints)')
    return tuple(out)


def check(config: Config, addresses: Mapping[str, str]) -> list[str]:
    """Warnings about a configuration against the namespace's addresses (address ->
    interface): an instance behind a balancer that would announce nothing, or an address
    to announce that is not there."""
    warnings: list[str] = []
    if not config.load_balancer:
        return warnings
    for address in config.announce_addresses:
        if address not in addresses:
            warnings.append(
                f"announce: {address} is not an address of this namespace (yet): it gets its"
                " endpoint once it appears"
            )
    announced = [
        a for a, ifname in addresses.items() if config.wants(ifname) and config.manages_address(a)
    ]
    if not announced:
        warnings.append(
            "load_balancer: no address would be announced (no managed interface holds one"
            + (" of announce" if config.announce_addresses else "")
            + "): clients cannot open extra subflows, and with the C flag set they will not"
            " join the balancer's address either, so every connection stays on one path"
        )
    elif not config.announce_addresses and len(announced) > 1:
        warnings.append(
            f"load_balancer: {len(announced)} addresses would be announced "
            f"({', '.join(sorted(announced))}): set announce = [...] to the ones clients can"
            " reach; a join to any other address fails"
        )
    return warnings


def _limit(where: str, value: Any) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 8:
        raise ConfigError(f'{where}: expected "auto" or a number 0..8, got {value!r}')
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _number(where: str, value: Any, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < lo:
        raise ConfigError(f"{where}: expected a number >= {lo}, got {value!r}")
    return float(value)


def _check_keys(where: str, table: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


def from_dict(data: Mapping[str, Any], source: str = "pmd.toml") -> Config:
    """Validate a parsed TOML document; every error names `source` and the key."""
    top = {
        "mode", "netns", "cleanup", "flags", "load_balancer", "announce", "status_socket",
        "state_dir",
    }  # fmt: skip
    tables = {"interfaces", "limits", "userspace", "resubflow"}
    _check_keys(source, data, top | tables)
    kw: dict[str, Any] = {}
    if "mode" in data:
        if data["mode"] not in MODES:
            raise ConfigError(
                f"{source}: mode: expected one of {', '.join(MODES)}, got {data['mode']!r}"
            )
        kw["mode"] = data["mode"]
    if "netns" in data:
        if not isinstance(data["netns"], str) or not data["netns"]:
            raise ConfigError(f"{source}: netns: expected a namespace name")
        kw["netns"] = data["netns"]
    if "status_socket" in data:
        if not isinstance(data["status_socket"], str) or not data["status_socket"]:
            raise ConfigError(f"{source}: status_socket: expected a path")
        kw["status_socket"] = data["status_socket"]
    if "state_dir" in data:
        if not isinstance(data["state_dir"], str) or not data["state_dir"]:
            raise ConfigError(f"{source}: state_dir: expected a directory")
        kw["state_dir"] = data["state_dir"]
    for key in ("cleanup", "load_balancer"):
        if key in data:
            kw[key] = _bool(f"{source}: {key}", data[key])
    if "flags" in data:
        kw["flags"] = _flags(f"{source}: flags", data["flags"])
    if "announce" in data:
        kw["announce_addresses"] = _announce(source, data)
    for name in tables:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
    ifs = data.get("interfaces", {})
    _check_keys(f"{source}: [interfaces]", ifs, {"allow", "deny", "flags"})
    if "allow" in ifs:
        kw["allow"] = _strings(f"{source}: interfaces.allow", ifs["allow"])
    if "deny" in ifs:
        kw["deny"] = _strings(f"{source}: interfaces.deny", ifs["deny"])
    if "flags" in ifs:
        if not isinstance(ifs["flags"], dict):
            raise ConfigError(f"{source}: [interfaces.flags] must be a table")
        kw["interface_flags"] = {
            k: _flags(f"{source}: interfaces.flags.{k}", v) for k, v in ifs["flags"].items()
        }
    lim = data.get("limits", {})
    _check_keys(f"{source}: [limits]", lim, {"subflows", "add_addr_accepted"})
    for key in ("subflows", "add_addr_accepted"):
        if key in lim:
            kw[key] = _limit(f"{source}: limits.{key}", lim[key])
    us = data.get("userspace", {})
    _check_keys(f"{source}: [userspace]", us, {"policy", "ndiffports", "announce"})
    if "policy" in us:
        if us["policy"] not in POLICIES:
            raise ConfigError(
                f"{source}: userspace.policy: expected one of {', '.join(POLICIES)}, "
                f"got {us['policy']!r}"
            )
        kw["policy"] = us["policy"]
    if "ndiffports" in us:
        n = us["ndiffports"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 8:
            raise ConfigError(f"{source}: userspace.ndiffports: expected 1..8, got {n!r}")
        kw["ndiffports"] = n
    if "announce" in us:
        kw["announce"] = _bool(f"{source}: userspace.announce", us["announce"])
    rs = data.get("resubflow", {})
    _check_keys(
        f"{source}: [resubflow]", rs, {"enabled", "backoff_initial", "backoff_max", "max_attempts"}
    )
    if "max_attempts" in rs:
        n = rs["max_attempts"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(
                f"{source}: resubflow.max_attempts: expected a number >= 1, got {n!r}"
            )
        kw["max_attempts"] = n
    if "enabled" in rs:
        kw["resubflow"] = _bool(f"{source}: resubflow.enabled", rs["enabled"])
    if "backoff_initial" in rs:
        kw["backoff_initial"] = _number(
            f"{source}: resubflow.backoff_initial", rs["backoff_initial"], 0.05
        )
    if "backoff_max" in rs:
        kw["backoff_max"] = _number(f"{source}: resubflow.backoff_max", rs["backoff_max"], 0.05)
    config = Config(**kw)
    if config.backoff_max < config.backoff_initial:
        raise ConfigError(f"{source}: resubflow.backoff_max must be >= backoff_initial")
    return config


def loads(text: str, source: str = "pmd.toml") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return from_dict(data, source)


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return loads(text, os.fspath(path))


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retry number `attempt` (0-based): initial * 2**attempt, capped."""
    return float(min(maximum, initial * (2 ** min(attempt, 30))))
