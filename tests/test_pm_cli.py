"""The path-manager commands as a shell sees them: ip mptcp's bytes and exit codes, and
a quiet exit when the reader of stdout goes away."""

from __future__ import annotations

import contextlib
import io
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


# ------------------------------------------------------------------ ip mptcp parity

# Run in order against two identical namespaces, one with `ip -n NS mptcp WORDS`, the
# other with `mptcpkit WORDS -n NS`: stdout must be the same bytes, the exit code the
# same, and a failure one line on stderr for both. "LINKDEL dev" deletes an interface
# in both. Left out: words older iproute2 releases do not know (implicit, laminar).
CORPUS = """
endpoint add 10.9.0.11 nobackup subflow
endpoint show 10.9.0.11
endpoint change 10.9.0.11 backup
endpoint show
endpoint change 10.9.0.99 backup
endpoint del id 0 10.9.0.11
endpoint add 10.9.0.13 port 0 subflow
endpoint add 10.9.0.14 signal port 0x100
endpoint add 1.2.3.4.5
endpoint add 10.9.0.15 dev
endpoint add 10.9.0.16 dev a/b
endpoint flush 10.9.0.1
endpoint show id 0
endpoint change id 13
endpoint show
limits show subflows 3
limits set subflows -1
limits set add 2
endpoint show
-j endpoint show
endpoint
endpoint add 10.9.0.1 signal fullmesh
endpoint add 10.9.0.3 port 5000 subflow
endpoint add 10.9.0.3 subflow fullmesh signal
endpoint add 10.9.0.4
endpoint add ::ffff:10.9.0.1 id 9 subflow
endpoint add 10.9.0.5 dev d0 id 7 subflow
endpoint a 10.9.0.6 signal port 5006
endpoint add 10.9 i 20 subflow backup
endpoint add 0x0a.9.0.7 d d0 subflow fullmesh
endpoint add fd00:9::1 id 21 signal backup
endpoint add 10.9.0.9 dev d9 id 30 subflow
endpoint show
-j endpoint show
LINKDEL d9
endpoint show
-j endpoint sh
endpoint sh id 7
-j endpoint show id 7
endpoint show id 30
endpoint show id 99
endpoint del id 0
endpoint del id 3 10.9.0.3
endpoint del id 99
endpoint change id 99 backup
endpoint change id 7 backup
endpoint show id 7
endpoint ch id 7 fullmesh
endpoint show id 7
endpoint change id 7 signal
endpoint change id 7 subflow
endpoint add 10.9.0.300
endpoint add foo
endpoint add 10.9.0.8 bogus
endpoint add 10.9.0.8 id 256
endpoint add 10.9.0.8 id x
endpoint add 10.9.0.8 port 70000 signal
endpoint add 10.9.0.8 id
endpoint add 10.9.0.5
endpoint add 10.9.0.8 dev nosuch
endpoint add
endpoint frob
endpoint d id 9
endpoint del id 30
endpoint show
limits
limits show
limits set subflows 9
limits set add_addr_accepted 9 subflows 1
limits set subflows 4 add_addr_accepted 3
limits s
limits set
limits set foo 1
limits set subflows x
limits set subflows
limits frob
limits show
limits sh
endpoint flush
endpoint show
-j endpoint show
"""


def _ip(ns: str, words: list[str]) -> tuple[int, str, str]:
    r = subprocess.run(["ip", "-n", ns, *words], capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout, r.stderr


def _kit(ns: str, words: list[str]) -> tuple[int, str, str]:
    """`mptcpkit WORDS -n NS [-j]`, in this process (the same code as the command, without
    the interpreter's start-up time for each of the corpus's lines)."""
    from mptcpkit.cli import main

    json_flag = words[:1] == ["-j"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*words[json_flag:], "-n", ns, *(["-j"] * json_flag)])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.root
def test_cli_is_ip_mptcp_byte_for_byte(lab_factory: Callable[..., lab.Topology]) -> None:
    topo = lab.Topology("parity")
    for name in ("ip", "kit"):
        topo.add_host(name)
    lab_factory(topo)
    hosts = [topo.host("ip"), topo.host("kit")]
    for host in hosts:  # the same interfaces, made in the same order: the same indexes
        for a, b in (("d0", "p0"), ("d9", "p9")):
            host.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            host.run(["ip", "link", "set", a, "up"])
    ip_ns, kit_ns = (h.netns for h in hosts)
    mismatches = []
    for line in CORPUS.strip().splitlines():
        words = line.split()
        if words[0] == "LINKDEL":
            for host in hosts:
                host.run(["ip", "link", "del", words[1]])
            continue
        json_flag = words[:1] == ["-j"]
        ip_words = ["-j"] * json_flag + ["mptcp", *words[json_flag:]]
        theirs = _ip(ip_ns, ip_words)
        ours = _kit(kit_ns, words)
        if (ours[0], ours[1]) != (theirs[0], theirs[1]):
            mismatches.append(f"{line}\n   ip: {theirs}\n  kit: {ours}")
        elif ours[0]:
            assert theirs[2] and len(ours[2].splitlines()) == 1, (line, ours)
    assert not mismatches, "\n".join(mismatches)
