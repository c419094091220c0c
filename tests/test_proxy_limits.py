"""Abuse limits: `maxconnrate` and `maxconn-per-source` (HAProxy's `tcp-request
connection reject` on `src_conn_cur`); both data paths, real proxy processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcpkit.proxy.abuse import Limits, SourceTable, address_key, share
from proxy_harness import PROXY_CMD, Server, connect, echo, run_proxy, wait_for


def _conf(port: int, limits: str, workers: int = 1) -> str:
    return (
        f'[global]\nworkers = {workers}\nmetrics = ""\n'
        f'[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\n{limits}\n'
        f'[backend.be]\nserver.s = "tcp@127.0.0.1:{port}"\n'
    )


def _echoes(port: int, data: bytes = b"x") -> socket.socket | None:
    """A client that got its bytes echoed through the proxy, or None if it was reset."""
    try:
        s = connect(port, mptcp=True)
    except ConnectionResetError:
        return None
    try:
        s.sendall(data)
        if s.recv(len(data)) == data:
            return s
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    return None


def test_per_source_limit_resets_the_one_over_it(tmp_path: Path, relay: str) -> None:
    with Server(echo) as srv, run_proxy(tmp_path, _conf(srv.port, "maxconn-per-source = 2")) as px:
        port = px.port("fe")
        held = [_echoes(port), _echoes(port)]
        assert all(held)
        assert _echoes(port) is None  # the third from 127.0.0.1: rejected
        assert srv.accepted == 2  # never reached the server
        wait_for(lambda: "1 connection(s) rejected over maxconn-per-source (2)" in px.log())
        first = held.pop(0)
        assert first is not None
        first.close()
        again = wait_for(lambda: _echoes(port), what="a slot freed by a closed client")
        for s in (*held, again):
            assert s is not None
            s.close()


def test_per_source_limit_is_for_the_whole_proxy(tmp_path: Path, relay: str) -> None:
    """Two workers (the kernel spreads one client's connections over both): still only
    maxconn-per-source of them at once, as HAProxy's one stick table counts."""
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf(srv.port, "maxconn-per-source = 2", workers=2)) as px,
    ):
        port = px.port("fe")
        tries = [_echoes(port) for _ in range(12)]  # SO_REUSEPORT: both workers get some
        held = [s for s in tries if s is not None]
        assert len(held) == 2 and srv.accepted == 2
        held[0].close()
        again = wait_for(lambda: _echoes(port), what="a slot freed by a closed client")
        assert again is not None
        for s in (held[1], again):
            s.close()


def test_maxconnrate_holds_new_connections_in_the_backlog(tmp_path: Path, relay: str) -> None:
    with Server(echo) as srv, run_proxy(tmp_path, _conf(srv.port, "maxconnrate = 2")) as px:
        clients = [connect(px.port("fe"), mptcp=True) for _ in range(5)]
        with contextlib.ExitStack() as stack:
            for s in clients:
                stack.callback(s.close)
                s.sendall(b"y")
            for s in clients:
                assert s.recv(1) == b"y"  # served, none refused: they waited
        wait_for(lambda: "maxconnrate reached (2/s in this worker)" in px.log())
        assert srv.accepted == 5


def test_limits_bookkeeping() -> None:
    assert [share(5, 2, w) for w in (0, 1)] == [3, 2] and share(0, 3, 1) == 0
    lim = Limits(0, 1)
    assert lim.admit("a") and not lim.admit("a") and lim.admit("b")
    lim.release("a")
    assert lim.admit("a") and lim.sources == {"a": 1, "b": 1}
    assert lim.window("fe") == ["frontend fe: 1 connection(s) rejected over maxconn-per-source (1)"]
    assert lim.window("fe") == []


@pytest.mark.parametrize(
    ("limits", "workers", "key"),
    [
        ("maxconnrate = -5", 1, "frontend.fe.maxconnrate"),
        ("maxconnrate = 1", 2, "frontend.fe.maxconnrate"),
        ('maxconn-per-source = "10"', 1, "frontend.fe.maxconn-per-source"),
    ],
)
def test_bad_limit_exits_2_naming_the_key(
    tmp_path: Path, limits: str, workers: int, key: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(_conf(1, limits, workers))
    r = subprocess.run(
        [*PROXY_CMD, "-c", str(path), "--check"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2, r
    assert f"{path}: {key}: " in r.stderr, r.stderr


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 40)),  # (admit or release, which address)
        max_size=300,
    )
)
def test_source_table_counts_as_a_dict_would(ops: list[tuple[bool, int]]) -> None:
    """The shared table (open addressing, slots reused, rebuilt when crowded) keeps the
    counts a plain dict keeps; 16 slots for 41 addresses makes it reuse and rebuild."""
    table = SourceTable.create(8)
    assert table.slots == 16
    model: dict[bytes, int] = {}
    for admit, n in ops:
        key = address_key(f"10.0.0.{n}")
        if admit:
            live = sum(1 for v in model.values() if v)
            room = model.get(key, 0) > 0 or live < table.slots
            ok = table.admit(key, 3)
            if model.get(key, 0) >= 3:
                assert not ok
            elif room:
                assert ok
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0):
            table.release(key)
            model[key] -= 1
        assert table.count(key) == model.get(key, 0)
    for key, n in model.items():
        assert table.count(key) == n
    table.close()


def test_address_keys_of_both_data_paths_agree() -> None:
    raw4 = socket.inet_pton(socket.AF_INET, "192.0.2.7")
    assert address_key(raw4) == address_key("192.0.2.7") == address_key("::ffff:192.0.2.7")
    raw6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert address_key(raw6) == address_key("2001:db8::1") != address_key(raw4)


def test_a_dead_workers_connections_leave_the_per_source_count(tmp_path: Path) -> None:
    """A worker that dies (a crash, the OOM killer) takes its connections with it; the
    whole proxy's table must not count them on, or their clients stay locked out."""
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf(srv.port, "maxconn-per-source = 1")) as px,
    ):
        port = px.port("fe")
        held = _echoes(port)
        assert held is not None and _echoes(port) is None  # the limit holds
        (worker,) = px.workers()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: px.workers() not in ([], [worker]), what="a restarted worker")
        held.close()
        again = wait_for(lambda: _echoes(port), what="a client no longer counted")
        again.close()


def test_forgetting_a_worker_that_died_holding_the_lock_takes_the_lock_back() -> None:
    table = SourceTable.create(8, workers=2)
    key = address_key("192.0.2.9")
    table.worker = 1
    assert table.admit(key, 2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker that dies in the middle of an update
        table.lock.acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    table.forget(1)
    assert table.count(key) == 0
    table.worker = 0
    assert table.admit(key, 1) and not table.admit(key, 1)  # counted again: the limit holds
    table.close()
