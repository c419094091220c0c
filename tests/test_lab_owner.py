"""`lab down` removes exactly what the lab made; orphans are reaped, never mistaken for labs."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mptcpkit import lab
from mptcpkit.lab import netns as labns
from mptcpkit.lab import owner

pytestmark = pytest.mark.root


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"{lab.default_prefix()}ow{secrets.token_hex(3)}-"
    yield p
    lab.remove_all(p, running=True)
    for name in lab.list_netns(p):  # hand-made ones
        labns.delete_netns(name)


def cli(prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, lab.PREFIX_ENV: prefix}
    return subprocess.run(
        [sys.executable, "-m", "mptcpkit", "lab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def orphan(prefix: str) -> list[str]:
    """A lab whose program was SIGKILLed: its namespaces and marker stay behind."""
    code = (
        "import os, signal\n"
        "from mptcpkit import lab\n"
        f"net = lab.two_paths(paths=1, prefix={prefix!r}).up()\n"
        "print(' '.join(net.namespaces), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr
    return out.stdout.split()


def test_down_leaves_hand_made_and_running_labs_alone(prefix: str) -> None:
    # A namespace someone made by hand, named like a lab's: not ours.
    hand = f"{prefix}twopaths-abcdef-client"
    subprocess.run(["ip", "netns", "add", hand], check=True)
    up = cli(prefix, "up", "--paths", "1")
    assert up.returncode == 0, up.stderr
    with lab.two_paths(paths=1, prefix=prefix) as running:  # this process is alive
        down = cli(prefix, "down")
        assert down.returncode == 0, down.stderr
        assert "removed 2 namespace(s)" in down.stdout  # the `lab up` one
        assert f"left 1 lab(s) whose program is still running: {running.id}" in down.stdout
        assert sorted(lab.list_netns(prefix)) == sorted([hand, *running.namespaces])
    assert lab.list_netns(prefix) == [hand]
    assert cli(prefix, "down").returncode == 0
    assert lab.list_netns(prefix) == [hand]


def test_orphans_are_neither_listed_as_labs_nor_exec_targets_and_are_reaped(
    prefix: str,
) -> None:
    names = orphan(prefix)
    assert sorted(names) == lab.list_netns(prefix)
    (record,) = owner.read_all(prefix)
    assert record.state == owner.ORPHAN
    ls = cli(prefix, "ls")
    assert ls.stdout.startswith("no lab is up"), ls.stdout
    assert f"1 orphaned lab(s) of programs that died: {record.id}" in ls.stdout
    up = cli(prefix, "up", "--paths", "1")  # reaps the orphan on its way up
    assert up.returncode == 0, up.stderr
    assert not set(names) & set(lab.list_netns(prefix))
    ex = cli(prefix, "exec", "client", "--", "true")
    assert ex.returncode == 0, ex.stderr  # one lab, not "several labs are up"
    orphan(prefix)
    ex = cli(prefix, "exec", "client", "--", "true")
    assert ex.returncode == 0, ex.stderr  # the orphan does not make exec ambiguous
    down = cli(prefix, "down")
    assert down.returncode == 0 and "removed 4 namespace(s)" in down.stdout
    assert lab.list_netns(prefix) == [] and owner.read_all(prefix) == []


def test_a_closed_lab_leaves_no_marker(prefix: str) -> None:
    with lab.two_paths(paths=1, prefix=prefix) as net:
        (record,) = owner.read_all(prefix)
        assert record.state == owner.RUNNING and record.hosts == {
            h.name: h.netns for h in net.hosts
        }
    assert owner.read_all(prefix) == []
