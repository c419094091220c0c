"""What `mptcpkit check` reports: the host's MPTCP state in this network namespace.

Gathering is separate from printing so that the report can be tested and serialised.
It lives with the CLI because it draws on the path manager (`mptcpkit.pm`) as well as
the socket layer.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Any

from mptcpkit.abi.constants import IPPROTO_MPTCP
from mptcpkit.options import TCP_ONLY_OPTIONS
from mptcpkit.support import Support, read_sysctl, support, tcp_md5sig_available


@dataclass(frozen=True)
class HostReport:
    support: Support
    sysctls: dict[str, str | None]
    limits: dict[str, int] | None
    endpoints: list[dict[str, Any]] | None
    options_lost: list[str]  # TCP-only options an MPTCP socket rejects here
    tcp_md5sig_available: bool
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        s = self.support
        return {
            "usable": s.usable,
            "reason": s.reason.name.lower() if s.reason else None,
            "detail": s.detail,
            "kernel": s.kernel,
            "netns": s.netns,
            "features": {
                "mptcp_info": s.sol_mptcp,
                "mptcp_full_info": s.full_info,
                "tcp_is_mptcp": s.tcp_is_mptcp,
            },
            "sysctls": self.sysctls,
            "limits": self.limits,
            "endpoints": self.endpoints,
            "tcp_only_options_rejected": self.options_lost,
            "tcp_md5sig_available": self.tcp_md5sig_available,
            "errors": self.errors,
        }


_SYSCTLS = (
    "net.mptcp.enabled",
    "net.mptcp.path_manager",
    "net.mptcp.pm_type",
    "net.mptcp.scheduler",
    "net.mptcp.available_schedulers",
    "net.mptcp.checksum_enabled",
    "net.mptcp.allow_join_initial_addr_port",
)

_PROBE_VALUES: dict[str, int | bytes] = {
    "TCP_MD5SIG": b"\0" * 216,
    "TCP_MD5SIG_EXT": b"\0" * 216,
    "TCP_ULP": b"tls",
    "SO_ATTACH_FILTER": b"\0" * 16,
}


def rejected_options() -> list[str]:
    """Names of the TCP-only options a fresh MPTCP socket rejects on this kernel."""
    lost = []
    for option in TCP_ONLY_OPTIONS.values():
        try:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        except OSError:
            return []
        with probe:
            try:
                probe.setsockopt(option.level, option.optname, _PROBE_VALUES.get(option.name, 1))
            except OSError as exc:
                if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    lost.append(option.name)
    return lost


def _pm_state() -> tuple[dict[str, int] | None, list[dict[str, Any]] | None, list[str]]:
    from mptcpkit import pm  # here, not at the top: pyroute2 would slow every `--help`

    try:
        limits, endpoints = pm.limits(), pm.endpoints()
    except (pm.PMError, OSError) as exc:  # reported, not fatal: the rest still helps
        return None, None, [f"path manager state unavailable: {exc}"]
    return limits.to_json(), [ep.to_json() for ep in endpoints], []


def gather() -> HostReport:
    state = support(refresh=True)
    limits, endpoints, errors = _pm_state()
    return HostReport(
        support=state,
        sysctls={name: read_sysctl(name) for name in _SYSCTLS},
        limits=limits,
        endpoints=endpoints,
        options_lost=rejected_options() if state.usable else [],
        tcp_md5sig_available=tcp_md5sig_available(),
        errors=errors,
    )
