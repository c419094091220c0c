"""The proxy's log: one line per connection, plus events (listening, server down, reload).

Lines are buffered and written at most a few times a second, so logging costs a
string format per connection, not a write() syscall. Logging never blocks the data
path: every write is non-blocking, the queue is bounded (`QUEUE_BYTES`), lines that do
not fit while the destination stalls are dropped and counted (`dropped`), and the
drop is reported once it takes lines again. Destinations: stderr, a file, "none", or
syslog over UDP or a unix datagram socket (`udp@host:port`, `unix@/dev/log`), framed
as RFC 3164 or RFC 5424 as HAProxy's `log` does.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ConnRecord", "EventLog", "LogTarget", "format_conn", "parse_target"]

FLUSH_LINES = 256
QUEUE_BYTES = 256 << 10  # lines held while the destination is slow; more are dropped
SYSLOG_PORT = 514
SYSLOG_TAG = "mptcpkit-proxy"
FACILITIES = {
    **{n: i for i, n in enumerate(("kern", "user", "mail", "daemon", "auth", "syslog"))},
    **{n: i for i, n in enumerate(("lpr", "news", "uucp", "cron", "auth2", "ftp"), 6)},
    **{n: i for i, n in enumerate(("ntp", "audit", "alert", "cron2"), 12)},
    **{f"local{i}": 16 + i for i in range(8)},
}
SYSLOG_FORMATS = ("rfc3164", "rfc5424")
_INFO, _NOTICE = 6, 5  # severities: connection lines, events


@dataclass(frozen=True)
class LogTarget:
    """Where lines go: kind "stderr", "file", "none", "udp" or "unix" (syslog)."""

    kind: str
    path: str = ""  # file or unix socket path
    host: str = ""
    port: int = SYSLOG_PORT
    framing: str = "rfc3164"
    facility: int = FACILITIES["local0"]


def parse_target(text: str) -> LogTarget:
    """`stderr`, `none`, a file path, or syslog: `udp@HOST[:PORT]` / `unix@PATH`, then
    optionally `rfc3164`|`rfc5424` and a facility (`local0` unless named); ValueError."""
    if text in ("stderr", "none", ""):
        return LogTarget(text or "none")
    if not text.startswith(("udp@", "unix@")):
        return LogTarget("file", path=text)
    head, *opts = text.split()
    framing, facility = "rfc3164", FACILITIES["local0"]
    for w in opts:
        if w in SYSLOG_FORMATS:
            framing = w
        elif w in FACILITIES:
            facility = FACILITIES[w]
        else:
            raise ValueError(
                f"unknown syslog option {w!r} (a format: {', '.join(SYSLOG_FORMATS)};"
                " or a facility: local0-local7, daemon, user, ...)"
            )
    kind, _, rest = head.partition("@")
    if kind == "unix":
        if not rest:
            raise ValueError("unix@ needs a socket path, as in unix@/dev/log")
        return LogTarget("unix", path=rest, framing=framing, facility=facility)
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
        if tail and not tail.startswith(":"):
            raise ValueError(f"expected :port after ] in {head!r}")
    else:
        host, _, port_text = rest.partition(":")
    if not host:
        raise ValueError(f"udp@ needs a host, as in udp@127.0.0.1:514, got {head!r}")
    port = SYSLOG_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port {port_text!r} in {head!r}")
        port = int(port_text)
    return LogTarget("udp", host=host, port=port, framing=framing, facility=facility)


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
    connect_time: float | None = None  # first connect attempt to established (None: never)


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
        if rec.connect_time is not None:
            d["connect_time"] = round(rec.connect_time, 6)
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
    """Bounded, non-blocking line writer; see the module docstring."""

    def __init__(self, target: str = "stderr", fmt: str = "text", prefix: str = "") -> None:
        self.fmt = fmt
        self.prefix = prefix
        self.target = parse_target(target)
        self.dropped = 0  # lines dropped since start (the metric)
        self._unreported = 0  # dropped and not yet said in the log
        self._lines: list[tuple[int, str]] = []  # (severity, line)
        self._queued = 0  # bytes in _lines
        self._out = b""  # stream: the unwritten tail of the last write (whole lines)
        self._own = False
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._host = socket.gethostname().split(".")[0] or "-"
        t = self.target
        if t.kind == "none":
            self.fd = -1
        elif t.kind == "stderr":
            self.fd = self._stream(2)
        elif t.kind == "file":
            self.fd = os.open(
                t.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o640
            )
            self._own = True
        else:
            family = socket.AF_UNIX
            where: Any = t.path
            if t.kind == "udp":
                family, _, _, _, where = socket.getaddrinfo(t.host, t.port, 0, socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                sock.connect(where)
            except OSError:
                if t.kind == "udp":
                    sock.close()
                    raise
                # a syslog socket not there yet (syslogd restarting): sendto later
            self._sock = sock
            self._where = where
            self.fd = sock.fileno()

    def _stream(self, fd: int) -> int:
        """A non-blocking way to write to `fd` without changing it for others sharing it:
        a pipe, FIFO or tty is opened again (its own file description, O_NONBLOCK);
        a socket gets MSG_DONTWAIT sends; a regular file is written as it is."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return -1
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            try:
                own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return fd
            self._own = True
            return own
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self._own = True
            return self._sock.fileno()
        return fd

    def _queue(self, severity: int, line: str) -> None:
        if self._queued > QUEUE_BYTES:
            self.dropped += 1
            self._unreported += 1
            return
        self._lines.append((severity, line))
        self._queued += len(line) + 1
        if len(self._lines) % FLUSH_LINES == 0:
            self.flush()

    def conn(self, rec: ConnRecord) -> None:
        if self.fd < 0:
            return
        self._queue(_INFO, format_conn(rec, self.fmt))

    def event(self, message: str, *, now: bool = False) -> None:
        """An operational message; `now` writes it at once (startup, errors)."""
        if self.fd < 0:
            return
        self._queue(_NOTICE, self._event_line(message))
        if now:
            self.flush()

    def _event_line(self, message: str) -> str:
        if self.fmt == "json":
            return json.dumps({"time": _stamp(time.time()), "event": self.prefix + message})
        return f"{_stamp(time.time())} {self.prefix}{message}"

    def flush(self) -> None:
        """Write what the destination takes now; keep the rest (bounded), never wait."""
        if self.fd < 0:
            self._lines.clear()
            self._queued = 0
            return
        if self.target.kind in ("udp", "unix"):
            self._send_datagrams()
        else:
            self._write_stream()

    def _recovered(self) -> bool:
        """The destination takes lines again: say how many were lost, once."""
        if not self._unreported:
            return False
        n, self._unreported = self._unreported, 0
        self._lines.insert(
            0,
            (
                _NOTICE,
                self._event_line(f"{n} log lines dropped: the log destination was too slow"),
            ),
        )
        return True

    def _write_stream(self) -> None:
        while True:
            if not self._out:
                if not self._lines:
                    return
                data = "".join(line + "\n" for _, line in self._lines)
                self._lines.clear()
                self._queued = 0
                self._out = data.encode("utf-8", "replace")
            try:
                if self._sock is not None:
                    n = self._sock.send(self._out, socket.MSG_DONTWAIT)
                else:
                    n = os.write(self.fd, self._out)
            except InterruptedError:
                continue
            except BlockingIOError:
                return  # the sweep tries again; meanwhile the queue is bounded
            except OSError:
                self._out = b""  # a broken destination: nothing more will arrive
                return
            self._out = self._out[n:]
            if not self._out and not self._recovered() and not self._lines:
                return

    def _send_datagrams(self) -> None:
        """One datagram per line, as syslog does; one the socket cannot take is dropped."""
        sock = self._sock
        assert sock is not None
        self._recovered()
        lines, self._lines, self._queued = self._lines, [], 0
        for severity, line in lines:
            data = self._frame(severity, line)
            try:
                try:
                    sock.send(data)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTCONN, errno.EDESTADDRREQ):
                        raise
                    sock.sendto(data, self._where)  # the socket was not there at start
            except OSError:  # full (EAGAIN/ENOBUFS), refused, gone
                self.dropped += 1
                self._unreported += 1

    def _frame(self, severity: int, line: str) -> bytes:
        """One syslog message (HAProxy's `log` framing): RFC 3164 or RFC 5424."""
        t = self.target
        pri = t.facility * 8 + severity
        now = time.time()
        if t.framing == "rfc5424":
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            stamp += f".{int(now % 1 * 1e6):06d}Z"
            head = f"<{pri}>1 {stamp} {self._host} {SYSLOG_TAG} {self._pid} - - "
        else:
            stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
            head = f"<{pri}>{stamp} {SYSLOG_TAG}[{self._pid}]: "
        return (head + line).encode("utf-8", "replace")

    def close(self) -> None:
        self.flush()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._own:
            os.close(self.fd)
        self.fd = -1
