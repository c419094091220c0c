"""What `mptcpkit check` reports: the host's MPTCP state in this network namespace.

Gathering is separate from printing so that the report can be tested and serialised.
It lives with the CLI because it draws on the path manager (`mptcpkit.pm`) as well as
the socket layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mptcpkit.options import probe_tcp_only_options
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


def rejected_options() -> list[str]:
    """Names of the options an MPTCP socket refuses and plain TCP takes on this kernel,
    asked of the kernel now (not the static table); [] when no MPTCP socket can be made."""
    found = probe_tcp_only_options()
    return list(dict.fromkeys(o.name for o in found.values())) if found else []


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
