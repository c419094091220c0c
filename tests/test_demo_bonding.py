"""`mptcpkit demo bonding`: its summary, from a real lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = [sys.executable, "-m", "mptcpkit", "demo", "bonding"]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src}


@pytest.mark.root
def test_bad_size_is_usage_error() -> None:
    r = subprocess.run(
        [*DEMO, "--size", "1K"], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert r.returncode == 2 and "--size" in r.stderr, r.stderr


@pytest.mark.root
@pytest.mark.slow
def test_demo_bonding_json(tmp_path: Path) -> None:
    plot = tmp_path / "bonding.png"
    r = subprocess.run(
        [*DEMO, "--json", "--size", "8M", "--rate", "20mbit", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr + r.stdout
    s = json.loads(r.stdout)
    assert s["verified"] is True and s["destinations"] == 4
    assert s["failover"]["bytes_lost"] == 0 and s["failover"]["recovery_s"] is not None
    assert s["single_mbit"] > 0 and s["bonded_mbit"] > 0  # speeds live in the demo's output
    assert s["site_subflows"][0] == 1 and set(s["site_subflows"][1:]) == {2}
    u = s["setup"]  # round trips measured (and checked) by the demo, not judged here
    assert set(u["times_ms"]) == {"direct", "pair", "pair_tfo"} and u["packets_delayed"] > 0
    assert isinstance(u["target_met"], bool)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
