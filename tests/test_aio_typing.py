"""The asyncio API type-checks as the stdlib's does: `mypy --strict` on user code."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

USER_CODE = """
import asyncio
import socket

import mptcpkit.aio


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def main() -> list[int]:
    one = await mptcpkit.aio.start_server(handle, "127.0.0.1", 0)
    many = await mptcpkit.aio.create_server(asyncio.Protocol, ["127.0.0.1", "::1"], 0)
    ports: list[int] = []
    for server in (one, many):
        sock: socket.socket = server.sockets[0]
        ports.append(sock.getsockname()[1])
        server.close()
        await server.wait_closed()
    return ports
"""


def test_start_server_sockets_pass_mypy_strict(tmp_path: pathlib.Path) -> None:
    (tmp_path / "user.py").write_text(USER_CODE)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--no-error-summary"),
            *("--cache-dir", str(ROOT / ".mypy_cache"), str(tmp_path / "user.py")),
        ],
        env={"MYPYPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
