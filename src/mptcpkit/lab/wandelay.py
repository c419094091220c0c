"""A WAN delay without netem: packets held in user space (NFQUEUE) for a fixed time.

This kernel has no netem qdisc (lab.topology says so when a link asks for a delay), but
it has NFQUEUE: iptables hands each packet of some interfaces to a queue, and a program
gives the verdict. `WanDelay` answers every packet "accept", `delay` seconds after it
was queued, in order: a one-way delay on those interfaces, both ways (POSTROUTING out,
PREROUTING in), so a round trip across them takes 2 x delay more.

For a few packets at a time (connection setup, not bulk): a packet waits in the
kernel's queue (at most `MAXLEN`) and the verdicts come from one Python thread. The
rules say `--queue-bypass`, so traffic flows undelayed if the thread is gone.

The netfilter queue protocol, spoken directly (no libnetfilter_queue):
nfnetlink messages of subsystem NFNL_SUBSYS_QUEUE (linux/netfilter/nfnetlink_queue.h).
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

from mptcpkit.lab.host import Host

__all__ = ["MAXLEN", "WanDelay", "wan_delay"]

NETLINK_NETFILTER = 12
_SUBSYS_QUEUE = 3
_MSG_PACKET, _MSG_VERDICT, _MSG_CONFIG = 0, 1, 2
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN = 1, 2, 3
_CMD_BIND, _CMD_UNBIND = 1, 2
_COPY_META = 1
_PACKET_HDR, _VERDICT_HDR = 1, 2
_NF_ACCEPT = 1
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (big-endian)
_NLA = struct.Struct("=HH")  # len, type
MAXLEN = 4096  # packets the kernel holds for us at once


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def _message(
    kind: int, queue: int, attrs: bytes, flags: int = _NLM_F_REQUEST, seq: int = 0
) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def _packet_ids(data: bytes) -> Iterator[int]:
    """The packet ids of the queue's messages in one netlink read."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            return
        if kind == (_SUBSYS_QUEUE << 8) | _MSG_PACKET:
            a = off + _NLMSG.size + _NFGEN.size
            end = off + length
            while a + _NLA.size <= end:
                alen, akind = _NLA.unpack_from(data, a)
                if alen < _NLA.size:
                    break
                if akind & 0x7FFF == _PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + _NLA.size)[0]
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


class WanDelay:
    """Hold every packet of queue `queue` (in the calling thread's network namespace)
    for `delay` seconds, then let it go; `close()` stops and unbinds."""

    def __init__(self, delay: float, queue: int = 0) -> None:
        if not 0 <= delay <= 5:
            raise ValueError(f"delay={delay!r}: expected 0 to 5 seconds")
        self.delay = delay
        self.queue = queue
        self.held = 0  # packets delayed so far
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self._sock.bind((0, 0))
        self._config(_attr(_CFG_CMD, struct.pack("!BxH", _CMD_BIND, 0)))
        self._config(
            _attr(_CFG_PARAMS, struct.pack("!IB", 0, _COPY_META))
            + _attr(_CFG_QUEUE_MAXLEN, struct.pack("!I", MAXLEN))
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-delay", daemon=True)
        self._thread.start()

    def _config(self, attrs: bytes) -> None:
        """Send a config message and read its acknowledgement (raises OSError if refused)."""
        self._sock.send(_message(_MSG_CONFIG, self.queue, attrs, _NLM_F_REQUEST | _NLM_F_ACK))
        self._sock.settimeout(5)
        try:
            data = self._sock.recv(65536)
        finally:
            self._sock.settimeout(None)
        _, kind, _, _, _ = _NLMSG.unpack_from(data)
        if kind == _NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, _NLMSG.size)[0]
            if err:
                raise OSError(err, f"nfnetlink_queue config of queue {self.queue} refused")

    def _verdict(self, packet_id: int) -> None:
        attrs = _attr(_VERDICT_HDR, struct.pack("!II", _NF_ACCEPT, packet_id))
        with contextlib.suppress(OSError):  # a packet gone (queue flushed): nothing to do
            self._sock.send(_message(_MSG_VERDICT, self.queue, attrs))

    def _run(self) -> None:
        held: collections.deque[tuple[float, int]] = collections.deque()
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while not self._stop.is_set():
            now = time.monotonic()
            while held and held[0][0] <= now:
                self._verdict(held.popleft()[1])
            wait = held[0][0] - now if held else 0.1
            if not poller.poll(max(0, int(wait * 1000)) or 0):
                continue
            try:
                data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:  # ENOBUFS: the kernel dropped messages; go on
                continue
            due = time.monotonic() + self.delay
            for pid in _packet_ids(data):
                held.append((due, pid))
                self.held += 1
        for _, pid in held:  # let what is held go
            self._verdict(pid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._config(_attr(_CFG_CMD, struct.pack("!BxH", _CMD_UNBIND, 0)))
        self._sock.close()


@contextlib.contextmanager
def wan_delay(
    host: Host, devices: Sequence[str], delay: float, queue: int = 0
) -> Iterator[WanDelay]:
    """`delay` seconds more each way on `host`'s `devices` (IPv4 and IPv6), for the
    duration of the block."""
    rules = []
    for dev in devices:
        rules += [["POSTROUTING", "-o", dev], ["PREROUTING", "-i", dev]]
    tools = ("iptables", "ip6tables")
    delayer = host.call(WanDelay, delay, queue)
    try:
        for tool in tools:
            for chain, flag, dev in rules:
                host.run(
                    [tool, "-t", "mangle", "-A", chain, flag, dev, "-j", "NFQUEUE",
                     "--queue-num", str(queue), "--queue-bypass"]
                )  # fmt: skip
        yield delayer
    finally:
        for tool in tools:
            for chain, flag, dev in rules:
                host.run(
                    [tool, "-t", "mangle", "-D", chain, flag, dev, "-j", "NFQUEUE",
                     "--queue-num", str(queue), "--queue-bypass"],
                    check=False,
                )  # fmt: skip
        delayer.close()
