"""A background program in a lab host's namespace, and its captured output.

`Host.popen` (host.py) starts them and the topology stops them at teardown; this is the
handle a test or tool holds: pid, exit code, output so far, stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO, Protocol


class Place(Protocol):
    """Where a program runs: what `Process` needs of a host (host.py's `Host`)."""

    name: str
    netns: str


class Process:
    """A background program in a host's namespace; its output goes to unnamed temp files.

    Files instead of pipes: a chatty program can never block on a full pipe nobody reads.
    """

    def __init__(self, host: Place, argv: Sequence[str], env: dict[str, str] | None) -> None:
        self.host = host
        self.argv = list(argv)
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self._out.close()
            self._err.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    @staticmethod
    def _read(f: IO[bytes]) -> str:
        if f.closed:
            return ""
        fd = f.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    @property
    def stdout(self) -> str:
        """Everything the program wrote to stdout so far."""
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        """Everything the program wrote to stderr so far."""
        return self._read(self._err)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the program's process group, SIGKILL it after `timeout`; its exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        else:
            # The leader is gone; children it left in its group must go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def close(self) -> None:
        """Stop the program and release the output files (output is lost after this)."""
        self.stop()
        self._out.close()
        self._err.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Process {self.pid} in {self.host.name}: {' '.join(self.argv)}>"
