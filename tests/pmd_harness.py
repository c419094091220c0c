"""`mptcpkit pmd` as the tests run it: against a namespace, logs collected, stopped
with SIGTERM (shared by the daemon and fleet tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path


class Pmd:
    """`mptcpkit pmd` running against a namespace, stopped with SIGTERM at the end."""

    def __init__(self, tmp: Path, netns: str, text: str) -> None:
        self.socket = str(tmp / "pmd.sock")
        self.config = tmp / "pmd.toml"
        self.state_dir = tmp / "state"
        self.config.write_text(
            f'status_socket = "{self.socket}"\nstate_dir = "{self.state_dir}"\n{text}'
        )
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mptcpkit", "pmd", "-c", str(self.config), "--netns", netns],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if "started:" in line:
                break
        else:
            raise AssertionError(f"pmd did not start: {''.join(self.log)}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def status(self) -> dict:  # type: ignore[type-arg]
        r = subprocess.run(
            [sys.executable, "-m", "mptcpkit", "pmd", "status", "--json", "--socket", self.socket],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode
