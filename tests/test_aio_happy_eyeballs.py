"""Happy Eyeballs (RFC 8305) in `mptcpkit.aio`, on stock asyncio and on uvloop.

A name with two addresses whose first one never answers: the SYNs to it are dropped
by the kernel, because it is a listener whose accept queue is full. With
`happy_eyeballs_delay` the connection must come from the second address, as stock
asyncio's does; without it, a connect waits for TCP's SYN retries (minutes).

The name lives in an /etc/hosts of the test's own (a private mount namespace for the
child process), so the real resolver path is used and the machine's file is untouched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import asyncio, json, os, socket, sys
import uvloop
import mptcpkit
import mptcpkit.aio as aio

NAME = "he.mptcpkit.test"
order = [i[4][0] for i in socket.getaddrinfo(NAME, None, type=socket.SOCK_STREAM)]
first, second = order
family = {a: socket.AF_INET6 if ":" in a else socket.AF_INET for a in order}
serving = socket.socket(family[second], socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
for _ in range(50):  # a port free on both addresses
    serving.bind((second, 0))
    port = serving.getsockname()[1]
    blackhole = socket.socket(family[first])
    try:
        blackhole.bind((first, port))
        break
    except OSError:
        blackhole.close()
        serving.close()
        serving = socket.socket(family[second], socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
serving.listen(8)
blackhole.listen(0)
filler = socket.create_connection((first, port))  # the accept queue is now full

async def connect(opener, **kwargs):
    try:
        reader, writer = await asyncio.wait_for(opener(NAME, port, **kwargs), 10)
    except (TimeoutError, asyncio.TimeoutError):
        return "no connection after 10 s"
    sock = writer.get_extra_info("socket")
    peer = (sock.getpeername()[0], str(mptcpkit.status(sock)))
    writer.close()
    return peer

async def refused(port):
    try:
        await aio.open_connection(NAME, port, happy_eyeballs_delay=0.1)
    except OSError as exc:
        return str(exc)
    return "connected"

async def nothing():
    pass

uvloop.run(nothing())  # uvloop's one process-wide pipe, opened before counting fds
fds = sorted(os.listdir("/proc/self/fd"))
out = {"order": order}
out["stock asyncio"] = asyncio.run(connect(asyncio.open_connection, happy_eyeballs_delay=0.1))
for name, run in (("asyncio", asyncio.run), ("uvloop", uvloop.run)):
    out[name] = run(connect(aio.open_connection, happy_eyeballs_delay=0.1))
    out[name + " interleave"] = run(
        connect(aio.open_connection, happy_eyeballs_delay=0.1, interleave=1)
    )
    unused = socket.socket(family[second])
    unused.bind((second, 0))  # bound, not listening: refused there
    out[name + " refused"] = run(refused(unused.getsockname()[1]))
    unused.close()
out["fds leaked"] = sorted(set(os.listdir("/proc/self/fd")) - set(fds))
print(json.dumps(out))
"""


@pytest.mark.root
def test_blackholed_first_address_connects_via_the_second(tmp_path: Path) -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is missing")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 he.mptcpkit.test\n127.0.0.1 he.mptcpkit.test\n")
    (tmp_path / "child.py").write_text(CHILD)
    mount = 'mount --bind "$0" /etc/hosts && exec "$@"'
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", mount, str(hosts), sys.executable, "child.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    second = out["order"][1]
    assert out["stock asyncio"][0] == second  # the setup: stock asyncio gets through
    for name in ("asyncio", "uvloop", "asyncio interleave", "uvloop interleave"):
        assert out[name] == [second, "MPTCP"], (name, out)
    for name in ("asyncio refused", "uvloop refused"):  # both errors, nothing left open
        assert out[name].startswith("Multiple exceptions") and "refused" in out[name], out
    assert out["fds leaked"] == []
