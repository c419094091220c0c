"""`mptcpkit demo` in a real lab: its summary, not only its exit code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = [sys.executable, "-m", "mptcpkit", "demo"]


@pytest.mark.root
def test_demo_summary(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    r = subprocess.run(
        [*DEMO, "--size", "24M", "--baseline", "2", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    single = re.search(r"single path \(plain TCP via the proxy\): ([\d.]+) Mbit/s", out)
    both = re.search(r"MPTCP over both links: +([\d.]+) Mbit/s +\(([\d.]+)x single path\)", out)
    after = re.search(
        r"after link 0 went down at ([\d.]+)s: +([\d.]+) Mbit/s "
        r"\(the connection survived",
        out,
    )
    assert single and both and after, out
    assert float(single.group(1)) > 0 and float(both.group(1)) > 0 and float(after.group(2)) > 0
    assert "downloaded 25165824 of 25165824 bytes" in out and "verified" in out, out
    assert "MISMATCH" not in out
    assert "MPTCP state: client leg MPTCP (2 subflows at most), server leg TCP" in out, out
    assert f"plot: {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "link 0 DOWN" in r.stderr or "link 0 down" in r.stderr  # the live view


def test_demo_needs_root() -> None:
    # In a fresh user namespace without a mapping the process is uid 65534, not root.
    r = subprocess.run(["unshare", "--user", *DEMO], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        "mptcpkit demo: the demo needs root (it builds network namespaces): run it with sudo\n"
    )
    assert r.stdout == ""
