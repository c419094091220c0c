"""pmd's status socket: the daemon serves its state as JSON on a unix socket, and
`mptcpkit pmd status` asks for it. Both ends are here, so the format has one home.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["StatusSocketError", "listen", "status"]


class StatusSocketError(OSError):
    """The status socket cannot be created (path not writable, a directory...)."""


async def listen(path: str, state: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
    """Serve `state()` to every client of the unix socket `path` (replaced if it exists)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(state()).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return await asyncio.start_unix_server(serve, path)
    except OSError as exc:
        raise StatusSocketError(exc.errno, f"status socket {path}: {exc.strerror}") from None


def status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running pmd for its state through its unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    state: dict[str, Any] = json.loads(b"".join(chunks))
    return state
