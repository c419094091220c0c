"""`mptcpkit check` and the CLI's exit codes, run as a user would run them."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys


def _mptcpkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mptcpkit", *args], capture_output=True, text=True, timeout=60
    )


def test_check_json_reports_this_host() -> None:
    done = _mptcpkit("check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["usable"] is True and report["reason"] is None
    assert report["features"] == {"mptcp_info": True, "mptcp_full_info": True, "tcp_is_mptcp": True}
    assert report["sysctls"]["net.mptcp.enabled"] == "1"
    assert set(report["limits"]) == {"subflows", "add_addr_accepted"}
    assert "TCP_MD5SIG" in report["tcp_only_options_rejected"]
    assert "TCP_USER_TIMEOUT" in report["tcp_only_options_rejected"]
    # What the kernel says, not a list: IPv6-level options are there, and TCP-AO is
    # listed only when plain TCP has it (then MPTCP refusing it is a loss).
    assert "IPV6_TCLASS" in report["tcp_only_options_rejected"]
    with socket.socket() as tcp:
        try:
            tcp.setsockopt(socket.IPPROTO_TCP, 38, b"\0" * 8)  # TCP_AO_ADD_KEY
        except OSError as exc:
            has_ao = exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP)
        else:
            has_ao = True
    assert ("TCP_AO_ADD_KEY" in report["tcp_only_options_rejected"]) is has_ao
    assert report["tcp_md5sig_available"] is True


def test_check_readable_report() -> None:
    done = _mptcpkit("check")
    assert done.returncode == 0
    assert "MPTCP in this network namespace: usable" in done.stdout
    assert "MPTCP_FULL_INFO" in done.stdout and "TCP_MD5SIG" in done.stdout


def test_usage_errors_exit_2() -> None:
    assert _mptcpkit().returncode == 2
    done = _mptcpkit("check", "--no-such-flag")
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr
    assert _mptcpkit("no-such-command").returncode == 2
    helped = _mptcpkit("--help")
    assert helped.returncode == 0 and "check" in helped.stdout
