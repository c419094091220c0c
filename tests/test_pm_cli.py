"""The path-manager commands as a shell sees them: ip mptcp's bytes and exit codes, and
a quiet exit when the reader of stdout goes away."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from mptcpkit import lab, pm


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """`mptcpkit ARGS | head -c0`, deterministically: stdout is a pipe nobody reads."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mptcpkit", *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)


@pytest.mark.root
def test_show_into_a_closed_pipe_is_quiet(lab_factory: Callable[..., lab.Topology]) -> None:
    topo = lab_factory(lab.two_paths, paths=1, endpoints=None)
    ns = topo.host("client").netns
    for i in range(1, 9):
        pm.add_endpoint(f"10.9.{i}.1", flags="subflow", netns=ns)
    for args in (("endpoint", "show"), ("endpoint", "show", "--json"), ("limits", "show")):
        r = closed_pipe_run(*args, "-n", ns)
        assert (r.returncode, r.stderr) == (0, ""), args
