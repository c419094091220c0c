"""Abuse limits of a frontend, in HAProxy's terms (pure bookkeeping, per worker).

- `maxconnrate`: new connections per second (HAProxy's `maxconnrate` / `rate-limit
  sessions`), shared out between the workers as `maxconn` is. Over it, a worker stops
  accepting until its next one-second window: clients wait in the kernel's backlog.
- `maxconn-per-source`: connections at once from one client address (HAProxy's
  `tcp-request connection reject if { src_conn_cur ge N }` with an `ip` stick table).
  Counted for the whole proxy, as HAProxy's one table: the kernel spreads one client's
  connections over the workers, so they count in a `SourceTable`, a hash table in
  memory every worker maps (made by the master before it forks them) under a
  process-shared lock (uncontended: no syscall). One over the limit is reset at once,
  before any server is contacted.

The data paths ask `admit()` on accept and `release()` when a connection ends; the
frontend's one-second timer calls `window()`, which says what to log.
"""

from __future__ import annotations

import functools
import ipaddress
import mmap
import multiprocessing
import struct
import zlib
from collections.abc import Hashable
from typing import Any

__all__ = ["Limits", "SourceTable", "share"]

_USED = struct.Struct("I")  # header: slots ever used (live or reusable)
_V4 = bytes(10) + b"\xff\xff"
MAX_SLOTS = 1 << 18  # (20 + 4 x workers) bytes each
LOCK_WAIT = 0.05  # seconds; a lock held longer (its worker died in it): admit uncounted


def share(total: int, workers: int, worker: int) -> int:
    """Worker `worker`'s part of a per-proxy figure (0: no limit); the parts add up."""
    if not total:
        return 0
    return total // workers + (1 if worker < total % workers else 0)


class Limits:
    """One frontend's limits in one worker."""

    __slots__ = ("per_source", "rate", "rate_held", "rejected", "sources", "table")

    def __init__(self, rate: int, per_source: int, table: SourceTable | None = None) -> None:
        self.rate = rate  # this worker's connections per second, 0: no limit
        self.per_source = per_source  # 0: no limit
        self.table = table  # the whole proxy's counts; None: this worker's own (tests)
        self.sources: dict[Hashable, int] = {}
        self.rejected = 0  # since the last window()
        self.rate_held = False  # the rate stopped accepting in this window

    def admit(self, key: Hashable) -> bool:
        """A connection from `key` (its address) was accepted: may it stay?"""
        if self.table is not None:
            if self.table.admit(address_key(key), self.per_source):
                return True
            self.rejected += 1
            return False
        n = self.sources.get(key, 0)
        if n >= self.per_source:
            self.rejected += 1
            return False
        self.sources[key] = n + 1
        return True

    def release(self, key: Hashable) -> None:
        if self.table is not None:
            self.table.release(address_key(key))
            return
        n = self.sources.get(key, 0) - 1
        if n > 0:
            self.sources[key] = n
        else:
            self.sources.pop(key, None)

    def window(self, name: str) -> list[str]:
        """A second has passed: the events worth a log line, and a fresh window."""
        events = []
        if self.rate_held:
            events.append(
                f"frontend {name}: maxconnrate reached ({self.rate}/s in this worker),"
                " new connections waited in the backlog"
            )
        if self.rejected:
            events.append(
                f"frontend {name}: {self.rejected} connection(s) rejected over"
                f" maxconn-per-source ({self.per_source})"
            )
        self.rate_held = False
        self.rejected = 0
        return events


@functools.lru_cache(maxsize=4096)
def address_key(key: Any) -> bytes:
    """16 bytes for a client address: raw (4 or 16 bytes, the engine's) or text (the
    Python relay's); IPv4 as IPv4-mapped IPv6, so a dual-stack listener's IPv4 client
    is the same source as on an IPv4 one."""
    if isinstance(key, str):
        try:
            key = ipaddress.ip_address(key.split("%", 1)[0]).packed
        except ValueError:
            return zlib.crc32(key.encode()).to_bytes(16, "big")
    raw = bytes(key)
    return _V4 + raw if len(raw) == 4 else raw[:16].ljust(16, b"\0")


class SourceTable:
    """Connections at once per client address, shared by every worker of a frontend.

    Open addressing with linear probing over `slots` fixed slots in `mem` (an anonymous
    MAP_SHARED mapping made before the workers fork); a slot whose count fell to 0 is
    reused by the next new address that probes past it, and the table is rebuilt
    in place when three quarters of it has ever been used. Each operation holds `lock`
    (a process-shared semaphore) for a few microseconds.

    A slot counts each worker's connections apart (`worker`: this process's index,
    set in the worker), so that the master can `forget` a worker that died: its
    connections went with it, and counted on they would lock their clients out.
    """

    def __init__(self, mem: Any, lock: Any, slots: int, workers: int = 1) -> None:
        self.mem = mem
        self.lock = lock
        self.slots = slots  # a power of two
        self.mask = slots - 1
        self.workers = workers
        self.worker = 0  # whose connections admit() and release() count
        self.slot = struct.Struct(f"16sI{workers}I")  # address, used, count per worker

    @classmethod
    def create(cls, maxconn: int, workers: int = 1) -> SourceTable:
        """A table for a frontend's `maxconn` connections (twice as many slots)."""
        slots = 1 << max(4, (2 * maxconn - 1).bit_length())
        slots = min(slots, MAX_SLOTS)
        size = struct.calcsize(f"16sI{workers}I")
        mem = mmap.mmap(-1, _USED.size + slots * size, flags=mmap.MAP_SHARED)
        return cls(mem, multiprocessing.get_context("fork").Lock(), slots, workers)

    def _at(self, i: int) -> tuple[bytes, int, list[int]]:
        key, used, *counts = self.slot.unpack_from(self.mem, _USED.size + i * self.slot.size)
        return key, used, counts

    def _put(self, i: int, key: bytes, counts: list[int]) -> None:
        self.slot.pack_into(self.mem, _USED.size + i * self.slot.size, key, 1, *counts)

    def _find(self, key: bytes) -> tuple[int, int]:
        """(slot of `key` or -1, slot a new key takes: reusable or never used, or -1)."""
        i = zlib.crc32(key) & self.mask
        reuse = -1
        for _ in range(self.slots):
            k, used, counts = self._at(i)
            if not used:
                return -1, reuse if reuse >= 0 else i
            if k == key:
                return i, -1
            if reuse < 0 and not any(counts):
                reuse = i
            i = (i + 1) & self.mask
        return -1, reuse

    def admit(self, key: bytes, limit: int) -> bool:
        """Count one more connection from `key`, unless it has `limit` already."""
        if not self.lock.acquire(timeout=LOCK_WAIT):
            return True  # a worker died holding it (the master takes it back): uncounted
        try:
            at, new = self._find(key)
            if at >= 0:
                _, _, counts = self._at(at)
                if sum(counts) >= limit:
                    return False
                counts[self.worker] += 1
                self._put(at, key, counts)
                return True
            if new < 0:
                return True  # every slot holds a live address: admit, uncounted
            if not self._at(new)[1]:
                (used,) = _USED.unpack_from(self.mem, 0)
                _USED.pack_into(self.mem, 0, used + 1)
                if 4 * (used + 1) > 3 * self.slots:
                    self._rebuild()
                    at, new = self._find(key)
                    if new < 0:
                        return True
            counts = [0] * self.workers
            counts[self.worker] = 1
            self._put(new, key, counts)
            return True
        finally:
            self.lock.release()

    def release(self, key: bytes) -> None:
        """A connection from `key` ended."""
        if not self.lock.acquire(timeout=LOCK_WAIT):
            return
        try:
            at, _ = self._find(key)
            if at >= 0:
                _, _, counts = self._at(at)
                counts[self.worker] = max(0, counts[self.worker] - 1)
                self._put(at, key, counts)
        finally:
            self.lock.release()

    def forget(self, worker: int) -> None:
        """Worker `worker` is gone, and its connections with it (the master, which
        also takes the lock back if the worker died holding it)."""
        if not self.lock.acquire(timeout=4 * LOCK_WAIT):
            pass  # held that long: by the dead worker; it is ours now
        try:
            for i in range(self.slots):
                key, used, counts = self._at(i)
                if used and counts[worker]:
                    counts[worker] = 0
                    self._put(i, key, counts)
        finally:
            self.lock.release()

    def count(self, key: bytes) -> int:
        at, _ = self._find(key)
        return 0 if at < 0 else sum(self._at(at)[2])

    def _rebuild(self) -> None:
        """Drop the slots of addresses with no connection left (lock held)."""
        live = [(k, c) for k, used, c in map(self._at, range(self.slots)) if used and any(c)]
        end = _USED.size + self.slots * self.slot.size
        self.mem[:end] = bytes(end)
        for k, c in live:
            _, new = self._find(k)
            self._put(new, k, c)
        _USED.pack_into(self.mem, 0, len(live))

    def close(self) -> None:
        self.mem.close()
