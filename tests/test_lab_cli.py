"""`mptcpkit lab`: up/exec/ls/down, bench output and plot content, SIGINT cleanup, no root."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptcpkit import lab
from mptcpkit.lab.plot import plot_series

pytestmark = pytest.mark.root


def unique_prefix() -> str:
    return f"{lab.default_prefix()}lab-c{secrets.token_hex(3)}-"


def mptcpkit(
    *args: str, prefix: str, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, lab.PREFIX_ENV: prefix}
    return subprocess.run(
        [sys.executable, "-m", "mptcpkit", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=check,
    )


@pytest.fixture
def prefix() -> object:
    p = unique_prefix()
    yield p
    lab.remove_all(p)


def test_up_exec_ls_down(prefix: str) -> None:
    up = mptcpkit("up", "--paths", "3", "--rate", "20mbit", prefix=prefix)
    assert up.returncode == 0, up.stderr
    names = lab.list_netns(prefix)
    assert len(names) == 2
    client = next(n for n in names if n.endswith("-client"))
    assert f"ip netns exec {client} bash" in up.stdout
    assert "10.0.2.1/24" in up.stdout
    # The topology outlived the command.
    ex = mptcpkit("exec", "client", "--", "ip", "-br", "addr", "show", "dev", "eth2", prefix=prefix)
    assert ex.returncode == 0, ex.stderr
    assert "10.0.2.1/24" in ex.stdout
    tc = mptcpkit("exec", "server", "--", "tc", "qdisc", "show", "dev", "eth1", prefix=prefix)
    assert "rate 20Mbit" in tc.stdout
    assert mptcpkit("exec", "client", "--", "sh", "-c", "exit 7", prefix=prefix).returncode == 7
    bad = mptcpkit("exec", "proxy", "--", "true", prefix=prefix)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"mptcpkit lab: exec: lab {client.split('-')[-2]} has no host 'proxy' "
        "(hosts: client, server)"
    )
    ls = mptcpkit("ls", "--json", prefix=prefix)
    listed = json.loads(ls.stdout)
    assert [v["topology"] for v in listed.values()] == ["twopaths"]
    # A second lab makes `exec` ambiguous.
    assert mptcpkit("up", "--topology", "gateway", prefix=prefix).returncode == 0
    assert len(lab.list_netns(prefix)) == 5
    amb = mptcpkit("exec", "client", "--", "true", prefix=prefix)
    assert amb.returncode == 2 and "several labs are up" in amb.stderr
    down = mptcpkit("down", prefix=prefix)
    assert down.returncode == 0
    assert "removed 5 namespace(s)" in down.stdout
    assert lab.list_netns(prefix) == []
    again = mptcpkit("down", prefix=prefix)
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    none = mptcpkit("exec", "client", "--", "true", prefix=prefix)
    assert none.returncode == 2 and "no lab" in none.stderr


def test_bench_json_and_plot_content(prefix: str, tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    out = mptcpkit(
        "bench", "--paths", "2", "--rate", "20mbit", "--duration", "3",
        "--interval", "0.2", "--fail-link", "1", "--at", "1.5s",
        "--plot", str(png), "--json",
        prefix=prefix,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # one JSON object, nothing else on stdout
    assert data["paths"] == 2 and data["rate_mbit"] == 20.0 and data["protocol"] == "mptcp"
    assert data["verified"] is True and data["lost_bytes"] == 0 and data["mptcp"] is True
    assert data["sha256_sent"] == data["sha256_received"]
    assert 3.0 <= data["duration_s"] < 30
    assert data["bytes"] == data["bytes_sent"] > 0
    # Between half a link and both links (a wide range: the CPU is shared).
    assert 10 < data["goodput_mbit"] < 2 * 20 * 1.1
    assert data["goodput_mbit"] == pytest.approx(
        data["bytes"] * 8 / data["duration_s"] / 1e6, rel=1e-3
    )
    assert [sf["link"] for sf in data["subflows"]] == [0, 1]
    assert [f["action"] for f in data["faults"]] == ["down"] and data["faults"][0]["link"] == 1
    assert "recovery_s" in data  # None when throughput never came back in the window
    ivs = data["intervals"]
    assert len(ivs) >= 10
    assert sum(iv["bytes"] for iv in ivs) == data["bytes"]
    for iv in ivs:
        assert iv["total_mbit"] >= 0 and iv["dt"] > 0
        assert all(v >= 0 for v in iv["subflows"].values()), iv
        assert set(iv["links"]) == {"0", "1"}
    # Per subflow, over the whole run, no link carried more than its rate.
    for sf in data["subflows"]:
        mbit = sum(iv["subflows"].get(sf["key"], 0) * iv["dt"] for iv in ivs) / ivs[-1]["t"]
        assert 0 < mbit < 20 * 1.1, sf
    early = [iv for iv in ivs if 0.4 < iv["t"] < 1.4]
    assert any(sum(iv["subflows"].values()) > 20 for iv in early)  # both links in use
    assert lab.list_netns(prefix) == []
    # The plot: a real image with the lines and the fault marker drawn.
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] >= 300 and img.shape[1] >= 600
    rgb = (img[:, :, :3] * 255).round().astype(int)
    colours = {tuple(px) for px in rgb.reshape(-1, 3)[::7]}
    assert len(colours) > 20
    for colour in [(31, 119, 180), (255, 127, 14), (0, 0, 0), (214, 39, 40)]:
        # tab:blue (link 0), tab:orange (link 1), black (total), tab:red (link down)
        assert ((abs(rgb - colour).sum(axis=2)) < 60).sum() > 40, colour
    series = plot_series(data)
    assert len(series["subflows"]) == 2 and len(series["total"]) == len(ivs)
    assert series["faults"] == [(data["faults"][0]["t"], "down", 1)]
    assert data["plot"] == str(png)


def test_bench_tcp_uses_one_link(prefix: str) -> None:
    out = mptcpkit(
        "bench", "--tcp", "--paths", "2", "--rate", "20mbit", "--duration", "2",
        "--interval", "0.25", "--json",
        prefix=prefix,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["protocol"] == "tcp" and data["mptcp"] is False and data["verified"]
    assert [sf["link"] for sf in data["subflows"]] == [0]
    assert 4 < data["goodput_mbit"] < 20 * 1.1
    link1 = next(lk for lk in data["links"] if lk["index"] == 1)
    assert link1["bytes"] < 10_000  # only neighbour chatter on the unused link


def test_bench_summary_table(prefix: str) -> None:
    out = mptcpkit("bench", "--paths", "2", "--rate", "20mbit", "--duration", "1.5", prefix=prefix)
    assert out.returncode == 0, out.stderr
    assert "MPTCP over 2 path(s) of 20 Mbit/s" in out.stdout
    assert "verified (sha256)" in out.stdout and "yes" in out.stdout
    assert "10.0.1.1:" in out.stdout  # the link-1 subflow row


def test_sigint_to_a_running_bench_leaves_nothing(prefix: str) -> None:
    env = {**os.environ, lab.PREFIX_ENV: prefix}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpkit", "lab", "bench", "--duration", "60", "--rate", "20mbit"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while len(lab.list_netns(prefix)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lab.list_netns(prefix)) == 2
        time.sleep(1.0)  # traffic flowing
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert lab.list_netns(prefix) == []


def test_not_root_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # In a fresh user namespace without a mapping the process is uid 65534, not root.
    for args in (["up"], ["down"], ["bench", "--duration", "1"], ["exec", "client", "--", "true"]):
        out = subprocess.run(
            ["unshare", "--user", sys.executable, "-m", "mptcpkit", "lab", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and "needs root" in out.stderr
        assert out.stdout == ""


def test_usage_errors(prefix: str) -> None:
    cases = {
        ("bench", "--paths", "0"): "paths=0",
        ("bench", "--rate", "fast"): "rate 'fast'",
        ("bench", "--fail-link", "2"): "there is no link 2",
        ("bench", "--at", "3s"): "need --fail-link",
        ("bench", "--fault", "boom"): "expected ACTION:LINK@TIME",
        ("bench", "--duration", "0"): "must be more than 0",
        ("exec", "client"): "no command given",
        ("down", "--prefix", ""): "prefix",
    }
    for args, message in cases.items():
        out = mptcpkit(*args, prefix=prefix)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert out.stderr.count("\n") == 1
    assert lab.list_netns(prefix) == []
