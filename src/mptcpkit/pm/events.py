"""The `mptcp_pm_events` multicast stream as typed records, sync and async.

The subscription is made when the stream is created, so events of a connection
opened right after `events()` returns are not missed. One stream is one socket:
iterate it with `for` (blocking) or `async for` (asyncio readiness, no thread).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import select
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from mptcpkit.pm import codec
from mptcpkit.pm.codec import Event
from mptcpkit.pm.transport import GenlSocket

log = logging.getLogger("mptcpkit.pm.events")


def messages_to_events(messages: Any) -> Iterator[Event]:
    """Decoded netlink messages -> Events; unknown event types are logged and skipped."""
    for msg in messages:
        if msg["header"].get("error") is not None:
            err = msg["header"]["error"]
            if (
                getattr(err, "errno", None) == errno.ENOBUFS
                or getattr(err, "code", None) == errno.ENOBUFS
            ):
                log.warning("mptcp_pm event queue overflowed: some events were lost")
            continue
        try:
            yield codec.decode_event(msg["cmd"], codec.attrs_of(msg))
        except ValueError:
            log.debug("skipping unknown mptcp_pm event %s", msg.get("cmd"))


class EventStream:
    """An open subscription to `mptcp_pm` events in one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock = GenlSocket(codec.GENL_NAME, codec.event_msg, netns=netns, nonblocking=True)
        try:
            self._sock.subscribe(codec.EVENTS_GROUP)
        except BaseException:
            self._sock.close()
            raise
        self._pending: collections.deque[Event] = collections.deque()
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        """Read whatever is queued on the socket without blocking."""
        while True:
            try:
                batch = list(messages_to_events(self._sock.recv_messages()))
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("mptcp_pm event queue overflowed: some events were lost")
                    continue
                raise
            self._pending.extend(batch)

    def poll(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to `timeout` seconds (None: forever); None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            self._drain()
            if self._pending:
                break
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock], [], [], wait)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                return None
        return self._pending.popleft()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self.closed:
            raise StopIteration
        event = self.poll()
        assert event is not None
        return event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.closed:
            raise StopAsyncIteration
        while not self._pending:
            self._drain()
            if self._pending:
                break
            await self._readable()
        return self._pending.popleft()

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)


def events(netns: str | None = None) -> EventStream:
    """Subscribe to `mptcp_pm` events; iterate with `for` or `async for`, then close()."""
    return EventStream(netns)
