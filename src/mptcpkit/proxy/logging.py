"""The proxy's log: one line per connection, plus events (listening, server down, reload).

Lines are buffered and written at most a few times a second, so logging costs a
string format per connection, not a write() syscall.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ConnRecord", "EventLog", "format_conn"]

FLUSH_LINES = 256


@dataclass(slots=True)
class ConnRecord:
    """What the log line and the metrics say about one finished connection."""

    start: float
    duration: float
    frontend: str
    client: Any
    backend: str
    server: str | None
    server_address: str | None
    client_state: str  # "MPTCP", "fallback", "TCP", "?" (leg gone before it was sampled)
    client_subflows: int  # most subflows seen on the client leg (0: not MPTCP)
    server_state: str
    server_subflows: int
    bytes_in: int  # client -> server
    bytes_out: int  # server -> client
    ended: str


def _endpoint(a: Any) -> str:
    if isinstance(a, tuple) and len(a) >= 2:
        host = str(a[0])
        return f"[{host}]:{a[1]}" if ":" in host else f"{host}:{a[1]}"
    return str(a) if a else "-"


def _leg(state: str, subflows: int) -> str:
    return f"{state}({subflows})" if state == "MPTCP" and subflows else state


def format_conn(rec: ConnRecord, fmt: str = "text") -> str:
    if fmt == "json":
        d = asdict(rec)
        d["client"] = _endpoint(rec.client)
        d["start"] = _stamp(rec.start)
        d["duration"] = round(rec.duration, 6)
        return json.dumps(d, separators=(",", ":"))
    server = f"{rec.backend}/{rec.server}" if rec.server else f"{rec.backend}/-"
    return (
        f"{_stamp(rec.start)} conn {rec.frontend} {_endpoint(rec.client)} -> {server}"
        f" client={_leg(rec.client_state, rec.client_subflows)}"
        f" server={_leg(rec.server_state, rec.server_subflows)}"
        f" in={rec.bytes_in} out={rec.bytes_out} time={rec.duration:.3f}s ended={rec.ended!r}"
    )


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class EventLog:
    """Buffered line writer to stderr, a file, or nowhere ("none")."""

    def __init__(self, target: str = "stderr", fmt: str = "text", prefix: str = "") -> None:
        self.fmt = fmt
        self.prefix = prefix
        self._lines: list[str] = []
        self._own = False
        if target == "none":
            self.fd = -1
        elif target == "stderr":
            self.fd = 2
        else:
            self.fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._own = True

    def conn(self, rec: ConnRecord) -> None:
        if self.fd < 0:
            return
        self._lines.append(format_conn(rec, self.fmt))
        if len(self._lines) >= FLUSH_LINES:
            self.flush()

    def event(self, message: str, *, now: bool = False) -> None:
        """An operational message; `now` writes it at once (startup, errors)."""
        if self.fd < 0:
            return
        if self.fmt == "json":
            line = json.dumps({"time": _stamp(time.time()), "event": self.prefix + message})
        else:
            line = f"{_stamp(time.time())} {self.prefix}{message}"
        self._lines.append(line)
        if now:
            self.flush()

    def flush(self) -> None:
        if not self._lines or self.fd < 0:
            self._lines.clear()
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8", "replace")
        self._lines.clear()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                continue
            except OSError:
                return
            view = view[n:]

    def close(self) -> None:
        self.flush()
        if self._own:
            os.close(self.fd)
            self.fd = -1
