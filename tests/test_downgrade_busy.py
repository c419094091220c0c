"""Issue 11 item 1: a downgrade on a busy listener.

Another process connects in a loop while the listener, with an accept thread, gets a
TCP-only option. Each round must end one of two ways: the socket is plain TCP on the
same port, still listening; or TCPOnlyOptionError and the MPTCP listener as it was.
Either way the clients see no refused and no reset connection.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import mptcpkit
from mptcpkit import State, TCPOnlyOptionError

LOOP = Path(__file__).parent / "data" / "connect_loop.py"


class Server:
    """An MPTCP listener and its accept thread (blocking accept, or a poll timeout)."""

    def __init__(self, timeout: float | None) -> None:
        self.sock = mptcpkit.create_server(("127.0.0.1", 0), backlog=64)
        self.sock.settimeout(timeout)
        self.address = self.sock.getsockname()
        self.accepted = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"k")
            self.accepted += 1

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 15
        while self.accepted < count:
            assert time.monotonic() < deadline, f"only {self.accepted} of {count} accepted"
            time.sleep(0.002)

    def stop(self) -> None:
        self.stopping = True
        self.sock.shutdown(socket.SHUT_RD)  # wakes a thread blocked in accept()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.sock.close()


def run_rounds(rounds: int, timeout: float | None) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    loop = subprocess.Popen(
        [sys.executable, str(LOOP), str(30 + rounds * 5)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert loop.stdin is not None and loop.stdout is not None
    previous: Server | None = None
    try:
        for _ in range(rounds):
            server = Server(timeout)
            loop.stdin.write(f"{server.address[1]}\n")
            loop.stdin.flush()
            assert loop.stdout.readline().strip() == "ok"
            if previous is not None:
                previous.stop()
            server.wait_for(3)
            try:
                server.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
            except TCPOnlyOptionError as exc:
                assert "mptcp='off'" in str(exc)
                assert mptcpkit.status(server.sock).is_mptcp
                assert server.sock.proto == mptcpkit.IPPROTO_MPTCP
                outcomes["refused: " + str(exc).split("now: ")[1][:60]] += 1
            else:
                assert mptcpkit.status(server.sock).state is State.TCP
                assert server.sock.proto == socket.IPPROTO_TCP
                assert server.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1000
                outcomes["downgraded"] += 1
            assert server.sock.getsockname() == server.address
            assert server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert not server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            server.wait_for(server.accepted + 3)  # it still serves
            previous = server
        loop.stdin.write("end\n")
        loop.stdin.flush()
        report = json.loads(loop.stdout.readline())
    finally:
        if previous is not None:
            previous.stop()
        loop.kill()
        loop.wait()
    assert len(report) == rounds
    for port, seen in report.items():
        assert set(seen) == {"ok"}, f"clients of port {port} saw {seen}"
    return outcomes


@pytest.mark.parametrize("timeout", [None, 0.05], ids=["blocking-accept", "accept-timeout"])
def test_downgrade_of_a_busy_listener(timeout: float | None) -> None:
    outcomes = run_rounds(4, timeout)
    assert sum(outcomes.values()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("timeout", [None, 0.05], ids=["blocking-accept", "accept-timeout"])
def test_downgrade_of_a_busy_listener_many_rounds(timeout: float | None) -> None:
    outcomes = run_rounds(60, timeout)
    assert sum(outcomes.values()) == 60


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_downgrade_of_a_busy_event_loop_listener(loop_kind: str) -> None:
    """An asyncio (or uvloop) server keeps serving through the downgrade: the event
    loop is made to watch the new socket."""
    import asyncio

    loop = asyncio.new_event_loop()
    if loop_kind == "uvloop":
        import uvloop

        loop.close()
        loop = uvloop.new_event_loop()
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        writer.write(b"k")
        await writer.drain()
        writer.close()
        accepted += 1

    async def wait_for(count: int) -> None:
        deadline = time.monotonic() + 15
        while accepted < count:
            assert time.monotonic() < deadline, f"only {accepted} of {count} accepted"
            await asyncio.sleep(0.005)

    async def main() -> None:
        sock = mptcpkit.create_server(("127.0.0.1", 0), backlog=64)
        address = sock.getsockname()
        server = await asyncio.start_server(handle, sock=sock)
        loop_process = subprocess.Popen(
            [sys.executable, str(LOOP), "40"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert loop_process.stdin is not None and loop_process.stdout is not None
        try:
            loop_process.stdin.write(f"{address[1]}\n")
            loop_process.stdin.flush()
            assert loop_process.stdout.readline().strip() == "ok"
            await wait_for(5)
            for _attempt in range(50):  # refused while connections wait: the loop accepts them
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
                    break
                except TCPOnlyOptionError as exc:
                    assert "waiting in its queue" in str(exc) or "while switching" in str(exc)
                    assert mptcpkit.status(sock).is_mptcp and sock.getsockname() == address
                    await asyncio.sleep(0.01)
            assert mptcpkit.status(sock).state is State.TCP
            assert sock.getsockname() == address
            await wait_for(accepted + 5)  # served through the new socket
            loop_process.stdin.write("end\n")
            loop_process.stdin.flush()
            # read in a thread: the loop must keep serving the client's last connection
            line = await asyncio.get_running_loop().run_in_executor(
                None, loop_process.stdout.readline
            )
            report = json.loads(line)
        finally:
            loop_process.kill()
            loop_process.wait()
            server.close()
            await server.wait_closed()
        assert set(report[str(address[1])]) == {"ok"}, report

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _probe(address: tuple[str, int]) -> str:
    """What a new MPTCP client meets: "connected", "refused" or "dropped" (its SYN got
    no answer within 50 ms; on loopback a handshake takes microseconds)."""
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP)
    c.settimeout(0.05)
    try:
        c.connect(address)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "dropped"
    finally:
        c.close()
    return "connected"


def test_divert_drops_new_syns_whatever_order_the_listeners_close() -> None:
    """handover.divert: once called, no new client reaches the group's listeners (MPTCP,
    SO_REUSEPORT), in any order they close, until the droppers close: then refused."""
    from mptcpkit.handover import divert, undivert

    first = mptcpkit.create_server(("127.0.0.1", 0), backlog=16, reuse_port=True)
    address = first.getsockname()
    members = [first] + [
        mptcpkit.create_server(address, backlog=16, reuse_port=True) for _ in range(2)
    ]
    try:
        assert {_probe(address) for _ in range(6)} == {"connected"}
        droppers = divert(members)
        assert len(droppers) == 4
        for i in (1, 0, 2):  # a closed member's slot takes the group's last socket
            assert {_probe(address) for _ in range(2)} == {"dropped"}, f"before closing {i}"
            members[i].close()
        assert {_probe(address) for _ in range(2)} == {"dropped"}
        undivert(droppers)
        assert _probe(address) == "refused"
    finally:
        for s in members:
            s.close()


def test_undivert_leaves_no_program_on_a_group_that_lives_on() -> None:
    """Listeners that joined the group while it was diverted (another process, a next
    generation) share the SYNs again once undivert() ran: the program went first."""
    from mptcpkit.handover import divert, undivert

    old = mptcpkit.create_server(("127.0.0.1", 0), backlog=16, reuse_port=True)
    address = old.getsockname()
    droppers = divert([old])
    new = [mptcpkit.create_server(address, backlog=64, reuse_port=True) for _ in range(2)]
    try:
        old.close()
        assert _probe(address) == "dropped"
        undivert(droppers)
        for _ in range(24):
            assert _probe(address) == "connected"
        queued = [
            int.from_bytes(s.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 32)[24:28], "little")
            for s in new
        ]
        assert all(queued), f"connections per listener: {queued}"
    finally:
        for s in new:
            s.close()
