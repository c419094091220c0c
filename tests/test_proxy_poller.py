"""The proxy's nested epoll set: events reach the right socket, also when fds are reused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from mptcpkit.proxy.poller import Poller


class Watcher:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.born = 0
        self.then: list[Callable[[], None]] = []

    def on_event(self, events: int) -> None:
        self.log.append(self.name)
        for action in self.then:
            action()
        self.then.clear()


def test_a_reused_fd_gets_no_stale_event() -> None:
    """Closing a socket and making a new one on its fd number within one batch: the
    batch's event for the old socket must not reach the new one."""

    async def main() -> None:
        poller = Poller(asyncio.get_running_loop())
        log: list[str] = []
        pairs = [socket.socketpair() for _ in range(2)]
        watchers = [Watcher(f"old{i}", log) for i in range(2)]
        for (ours, theirs), w in zip(pairs, watchers, strict=True):
            theirs.send(b"x")  # both readable: both are in the first batch
            poller.watch(ours.fileno(), w)
        made: list[tuple[socket.socket, socket.socket]] = []

        def replace(victim: int) -> None:
            ours, _ = pairs[victim]
            fd = ours.fileno()
            poller.drop(fd)
            ours.close()
            new = socket.socketpair()  # the lowest free fd: the one just closed
            made.append(new)
            assert new[0].fileno() == fd
            new[1].send(b"y")  # readable at once
            poller.watch(fd, Watcher("new", log))

        # Whichever old socket comes first replaces the other one.
        watchers[0].then.append(lambda: replace(1))
        watchers[1].then.append(lambda: replace(0))
        poller.poll()
        assert len(log) == 1 and log[0].startswith("old"), log
        poller.poll()
        assert log[1:] == ["new"], log  # its own event, in the next batch
        poller.close()
        for s in [pairs[0][1], pairs[1][1], *(x for p in made for x in p)]:
            s.close()
        for s, _ in pairs:
            s.close()

    asyncio.run(main())


def test_listeners_pause_and_resume() -> None:
    async def main() -> None:
        poller = Poller(asyncio.get_running_loop())
        ready: list[int] = []
        with socket.create_server(("127.0.0.1", 0)) as ls:
            poller.listen(ls.fileno(), lambda: ready.append(1))
            with socket.create_connection(ls.getsockname()):
                poller.pause_listening(ls.fileno(), True)
                poller.poll()
                assert ready == []  # the connection waits in the backlog
                poller.pause_listening(ls.fileno(), False)
                poller.poll()
                assert ready == [1]  # level-triggered: it is still waiting
                poller.unlisten(ls.fileno())
        poller.close()

    asyncio.run(main())
