"""`mptcpkit proxy` keeps HAProxy's reliability promises under faults (issue 12): it
fails closed before listening, never resets a connection the kernel completed, counts
its own limits as its own, and cleans up after itself. Both data paths."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from mptcpkit.proxy import compiled
from mptcpkit.proxy.config import ConfigError
from proxy_harness import PROXY_CMD, free_port


@pytest.fixture(autouse=True, params=["c", "python"], ids=["compiled", "python"])
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(compiled.ENGINE_ENV, request.param)
    try:
        return compiled.data_path()
    except ConfigError as exc:
        pytest.skip(f"{exc} (build it: python3 setup.py build_ext --inplace)")


def _cli(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROXY_CMD, *args], capture_output=True, text=True, timeout=timeout)


def _nothing_listens(port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


# --- overlapping binds (item 2) ------------------------------------------------------


@pytest.mark.parametrize("other", ["tcp@127.0.0.1:{p2}", "tcp@:{p2}"])
def test_overlapping_binds_exit_2_naming_both(tmp_path: Path, other: str) -> None:
    """A port range in one frontend and one of its ports (or the wildcard on it) in
    another would split traffic between two backends through SO_REUSEPORT."""
    base = free_port()
    second = other.format(p2=base + 2)
    path = tmp_path / "p.toml"
    path.write_text(
        f"[frontend.a]\nbind='tcp@127.0.0.1:{base}-{base + 3}'\nbackend='b'\n"
        f"[frontend.c]\nbind='{second}'\nbackend='b'\n"
        "[backend.b]\nserver.s='tcp@127.0.0.1:1'\n"
    )
    for extra in ([], ["--check"]):
        r = _cli(["-c", str(path), *extra])
        assert r.returncode == 2, r
        want = f"{path}: frontend.c.bind: {second} overlaps tcp@127.0.0.1:{base}-{base + 3}"
        want += " (frontend.a.bind)"
        assert want in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    _nothing_listens(base)
