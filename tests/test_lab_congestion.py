"""`lab bench --congestion` / `run_bench(congestion=)`: the algorithm is chosen per socket,
reaches both ends and every subflow, is reported, and a bad name is refused up front."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mptcpkit import lab
from mptcpkit.lab.bench import run_bench

pytestmark = pytest.mark.root

AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
ALLOWED = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
HOST_DEFAULT = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


@pytest.fixture
def prefix() -> Any:
    p = f"{lab.default_prefix()}cc{secrets.token_hex(3)}-"
    yield p
    lab.remove_all(p)


def mptcpkit(*args: str, prefix: str, user_ns: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mptcpkit", "lab", *args]
    return subprocess.run(
        ["unshare", "--user", *argv] if user_ns else argv,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, lab.PREFIX_ENV: prefix},
    )


def other_than_default() -> str:
    """An available algorithm that is not the host's default (cubic when the default is
    bbr, as here and in CI): choosing it must show, not the inherited default."""
    choices = [a for a in AVAILABLE if a != HOST_DEFAULT and a != "reno"] or [
        a for a in AVAILABLE if a != HOST_DEFAULT
    ]
    assert choices, f"only {AVAILABLE} available: nothing to choose"
    return choices[0]


def subflow_algorithms(ss_output: str) -> list[str]:
    """From `ss -tin`: the algorithm of each MPTCP subflow (first word of its info line)."""
    return [line.split()[0] for line in ss_output.splitlines() if "tcp-ulp-mptcp" in line.split()]


def test_cli_congestion_reaches_both_ends(prefix: str) -> None:
    algo = other_than_default()
    out = mptcpkit(
        "bench", "-C", algo, "--paths", "2", "--rate", "20mbit", "--duration", "1.5",
        "--json", prefix=prefix,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["verified"] is True
    assert data["congestion"] == {"client": algo, "server": algo}
    mib = data["mib"]["client"]
    resent = mib.get("TcpRetransSegs", 0)
    assert data["retrans_share"] == round(resent / (mib["TcpOutSegs"] + resent), 4)
    assert 0 <= data["retrans_share"] < 1
    assert lab.list_netns(prefix) == []


def test_cli_default_is_the_namespace_default_and_shown(prefix: str) -> None:
    out = mptcpkit("bench", "--paths", "2", "--rate", "20mbit", "--duration", "1.5", prefix=prefix)
    assert out.returncode == 0, out.stderr
    # The namespaces inherit the host's default; the summary says it, with the resent share.
    line = next(ln for ln in out.stdout.splitlines() if "congestion control" in ln)
    assert f" {HOST_DEFAULT}; " in line and "% of segments retransmitted" in line, line
    assert lab.list_netns(prefix) == []


def test_cli_unknown_algorithm_is_refused_before_any_namespace(prefix: str) -> None:
    for flag in ("--congestion", "-C"):
        out = mptcpkit("bench", flag, "nosuchcc", "--paths", "2", prefix=prefix)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
        assert "--congestion: congestion control 'nosuchcc': not available" in out.stderr
        assert f"tcp_available_congestion_control: {' '.join(AVAILABLE)})" in out.stderr
        assert out.stdout == ""
        assert lab.list_netns(prefix) == []


def test_cli_restricted_algorithm_without_privilege_says_eperm(prefix: str) -> None:
    restricted = [a for a in AVAILABLE if a not in ALLOWED]
    # In a fresh user namespace the process has no CAP_NET_ADMIN over the host's network.
    if not restricted:  # a host that allows them all: the check must let any one pass
        out = mptcpkit("bench", "-C", AVAILABLE[0], prefix=prefix, user_ns=True)
        assert "congestion control" not in out.stderr, out.stderr
        assert lab.list_netns(prefix) == []
        return
    out = mptcpkit("bench", "-C", restricted[0], prefix=prefix, user_ns=True)
    assert out.returncode == 2, out.stderr
    assert f"congestion control '{restricted[0]}': restricted" in out.stderr
    assert "needs CAP_NET_ADMIN" in out.stderr and out.stderr.count("\n") == 1
    assert lab.list_netns(prefix) == []


def test_api_congestion_on_both_ends_and_every_subflow(prefix: str) -> None:
    algo = other_than_default()
    ss: dict[str, str] = {}
    with lab.two_paths(paths=2, rate="20mbit", prefix=prefix) as net:
        client, server = net.host("client"), net.host("server")

        def on_sample(sample: dict[str, Any]) -> None:
            if sample["subflows"] >= 2 and not ss:
                ss.update({h.name: h.run(["ss", "-tin"]).stdout for h in (client, server)})

        result = run_bench(net, duration=1.5, congestion=algo, on_sample=on_sample)
    assert result.verified, result.error
    assert result.congestion == {"client": algo, "server": algo}
    assert result.as_dict()["congestion"] == {"client": algo, "server": algo}
    assert result.retrans_share is not None and 0 <= result.retrans_share < 1
    assert ss, "the sampler never saw two subflows"
    # Each subflow, both ends: the MPTCP socket's choice reached them all.
    assert subflow_algorithms(ss["client"]) == [algo, algo], ss["client"]
    assert subflow_algorithms(ss["server"]) == [algo, algo], ss["server"]


def test_api_default_and_unknown_name(prefix: str) -> None:
    with lab.two_paths(paths=2, rate="20mbit", prefix=prefix) as net:
        default = net.host("client").sysctl("net.ipv4.tcp_congestion_control")
        with pytest.raises(ValueError, match=r"'nosuchcc': not available on this kernel") as exc:
            run_bench(net, duration=1, congestion="nosuchcc")
        assert " ".join(AVAILABLE) in str(exc.value)
        with pytest.raises(ValueError, match="expected a name of 1 to 15 characters"):
            run_bench(net, duration=1, congestion="x" * 16)
        result = run_bench(net, duration=1)
    assert result.verified, result.error
    assert result.congestion == {"client": default, "server": default}
    assert lab.list_netns(prefix) == []


def test_check_probes_without_a_namespace() -> None:
    from mptcpkit.lab import congestion

    for algo in AVAILABLE:
        congestion.check(algo)  # as root every available algorithm may be set per socket
    with pytest.raises(ValueError, match=r"congestion control '': expected a name"):
        congestion.check("")
    assert congestion.available() == AVAILABLE
