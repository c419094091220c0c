"""One verified bulk transfer: the deterministic stream, its hashes, both ends.

The sender writes a deterministic pseudo-random stream and hashes it; the receiver hashes
what arrives: equal SHA-256 and byte counts prove nothing was lost, duplicated or
reordered end to end, faults or not (a transfer cut short on purpose must hold an intact
prefix). The lab's bench (bench.py) runs these; the fleet's runs reuse the digests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from mptcpkit.abi.constants import SIOCOUTQ
from mptcpkit.introspect import subflows as _subflows
from mptcpkit.lab import congestion as _congestion

_CHUNK = 128 * 1024
_POOL = 4 * 1024 * 1024
_RECV = 256 * 1024
# A fastclose waits at most this long for what it sent to be acknowledged (see `send`).
DRAIN_TIMEOUT = 5.0


def outq(sock: socket.socket) -> int | None:
    """Bytes `sock` holds unsent or unacknowledged (SIOCOUTQ; MPTCP sockets too), or None."""
    try:
        buf = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4)
    except OSError:
        return None
    return int(struct.unpack("i", buf)[0])


def unsettled_subflows(sock: socket.socket) -> int | None:
    """How many subflows of MPTCP socket `sock` hold data unsent or unacknowledged (TCP
    level), or None when that cannot be read (no MPTCP, an old kernel)."""
    try:
        flows = _subflows(sock)
    except OSError:
        return None
    return sum(1 for sf in flows if sf.tcp.unacked or sf.tcp.notsent_bytes)


def stream(seed: int, size: int = _CHUNK) -> Iterator[memoryview]:
    """The deterministic pseudo-random byte stream the sender writes, chunk by chunk.

    Chunks are slices at pseudo-random offsets of a pseudo-random pool: as unpredictable
    as the hash check needs, and free to produce (generating fresh random bytes would
    cost the sender more CPU than the network stack at a few hundred Mbit/s).
    """
    rng = random.Random(seed)
    pool = memoryview(rng.randbytes(_POOL))
    while True:
        offset = rng.randrange(0, _POOL - size)
        yield pool[offset : offset + size]


def stream_digest(seed: int, nbytes: int) -> str:
    """SHA-256 of the first `nbytes` of `stream(seed)`: what a receiver cut short should hold."""
    return prefix_digest(stream(seed), nbytes)


def prefix_digest(chunks: Iterable[bytes | memoryview], nbytes: int) -> str:
    """SHA-256 of the first `nbytes` of an endless stream of chunks."""
    digest = hashlib.sha256()
    left = nbytes
    for chunk in chunks:
        if left <= 0:
            break
        part = chunk[:left]
        digest.update(part)
        left -= len(part)
    return digest.hexdigest()


def join(thread: threading.Thread, timeout: float) -> None:
    # Short joins keep the main thread responsive to Ctrl-C.
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)


def accept_all(listener: socket.socket, transfers: list[Transfer]) -> None:
    """Accept one connection per transfer and receive each in its own thread."""
    threads = []
    for state in transfers:
        try:
            peer, _ = listener.accept()
        except OSError as exc:
            state.error = state.error or f"receiver: {exc}"
            break
        t = threading.Thread(target=state.receive, args=(peer, listener.gettimeout()))
        t.daemon = True
        t.start()
        threads.append(t)
    for t in threads:
        join(t, (listener.gettimeout() or 60.0) * 2)


class Transfer:
    def __init__(
        self, seed: int, *, fastclose: bool = False, drain_timeout: float = DRAIN_TIMEOUT
    ) -> None:
        self.seed = seed
        self.fastclose = fastclose
        self.drain_timeout = drain_timeout
        # Fastclose: bytes still unacknowledged when the connection was aborted (None:
        # unknown), and when it was (time.monotonic()).
        self.unacked_at_close: int | None = None
        self.subflows_unsettled_at_close: int | None = None
        self.closed_at: float | None = None
        self.sent = 0
        self.received = 0
        self.tx_hash = hashlib.sha256()
        self.rx_hash = hashlib.sha256()
        self.error: str | None = None
        self.reset = False
        self.finished_at: float | None = None
        self.peer: socket.socket | None = None
        # The accepted socket's congestion control (TCP_CONGESTION), read as it arrives.
        self.peer_congestion: str | None = None

    @property
    def verified(self) -> bool:
        if self.error is not None:
            return False
        if self.fastclose:
            # Cut short on purpose: what arrived must be an intact prefix of what was sent.
            return self.reset and self.rx_hash.hexdigest() == stream_digest(
                self.seed, self.received
            )
        return self.sent == self.received and self.tx_hash.digest() == self.rx_hash.digest()

    def summary(self, elapsed: float) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "bytes": self.received,
            "bytes_sent": self.sent,
            "goodput_mbit": round(self.received * 8 / elapsed / 1e6, 4),
            "verified": self.verified,
            "reset": self.reset,
            "error": self.error,
            **(
                {
                    "unacked_at_close": self.unacked_at_close,
                    "subflows_unsettled_at_close": self.subflows_unsettled_at_close,
                }
                if self.fastclose
                else {}
            ),
        }

    def abort(self, conn: socket.socket) -> None:
        for sock in (conn, self.peer):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def send(self, conn: socket.socket, deadline: float) -> None:
        try:
            for chunk in stream(self.seed):
                if time.monotonic() >= deadline:
                    break
                self.tx_hash.update(chunk)
                conn.sendall(chunk)
                self.sent += len(chunk)
            if self.fastclose:
                # Linger 0: close() aborts the connection, which MPTCP signals with
                # MP_FASTCLOSE in a RST on every subflow. A RST is never retransmitted,
                # and the peer takes it only if its sequence number is the next one it
                # expects (RFC 5961 3.2; else it answers with a challenge ACK, which our
                # stack, the socket gone, answers with a plain RST: no MP_FASTCLOSE). On a
                # full shaped link, data sent just before the RST is often dropped, and
                # the RST ignored. So: stop sending, let what was sent be acknowledged,
                # then abort. The server then sees a reset, not the end of the stream.
                self._drain(conn)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                self.closed_at = time.monotonic()
            else:
                conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or f"sender: {exc}"

    def _drain(self, conn: socket.socket) -> None:
        """Wait (at most `drain_timeout`) until `conn` and each of its subflows hold nothing
        unsent or unacknowledged. The MPTCP level is not enough: data acknowledged there
        (DATA_ACK) may still be queued or unacknowledged on a subflow, a copy that went the
        other way, and that subflow's RST would be challenged just the same."""
        deadline = time.monotonic() + self.drain_timeout
        while True:
            self.unacked_at_close = outq(conn)
            self.subflows_unsettled_at_close = unsettled_subflows(conn)
            settled = not self.unacked_at_close and not self.subflows_unsettled_at_close
            if settled or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def give_up(self, reason: str) -> None:
        """Stop waiting for the peer: record why, and wake the receiver."""
        self.error = self.error or reason
        if self.peer is not None:
            with contextlib.suppress(OSError):
                self.peer.shutdown(socket.SHUT_RDWR)

    def receive(self, peer: socket.socket, timeout: float | None) -> None:
        self.peer = peer
        self.peer_congestion = _congestion.of(peer)
        try:
            with peer:
                peer.settimeout(timeout)
                buf = bytearray(_RECV)
                view = memoryview(buf)
                while n := peer.recv_into(buf):
                    self.rx_hash.update(view[:n])
                    self.received += n
                self.finished_at = time.monotonic()
        except ConnectionResetError as exc:
            self.finished_at = time.monotonic()
            self.reset = True
            if not self.fastclose:
                self.error = self.error or f"receiver: {exc}"
        except OSError as exc:
            self.error = self.error or f"receiver: {exc}"
