"""A stopping worker waits for handshakes in flight to its listeners (handover.py,
Runtime._settle) where those listeners live: a bind's `namespace` too, whose
handshakes the worker's own namespace never shows (it closed at once and reset them)."""

from __future__ import annotations

import os
import socket

import pytest

from mptcpkit import handover, lab
from mptcpkit.lab.pytest_plugin import LabFactory

pytestmark = pytest.mark.root


def test_handshakes_in_flight_are_sought_in_the_listeners_namespace(
    lab_factory: LabFactory, no_fd_leak: None
) -> None:
    net = lab_factory(lab.two_paths, paths=1, endpoints=None)
    with net.host("server").enter():
        ls = socket.socket()
        # the server side of a handshake stays SYN_RECV until the client's first bytes
        ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        client = socket.create_connection(ls.getsockname())
    here = socket.socket()  # one in this namespace: counted here, with its own port
    with ls, client, here:
        here.bind(("127.0.0.1", 0))
        here.listen()
        groups = handover.ports_by_namespace([ls, here])
        try:
            assert len(groups) == 2
            counts = {
                frozenset(ports): handover.handshakes_in_flight(ports, ns) for ns, ports in groups
            }
            assert counts == {
                frozenset([ls.getsockname()[1]]): 1,
                frozenset([here.getsockname()[1]]): 0,
            }
            # what a worker saw before: its own namespace shows no such handshake
            assert handover.handshakes_in_flight({ls.getsockname()[1]}) == 0
            client.sendall(b"x")  # the handshake completes: queued, no longer in flight
            ns, ports = next(g for g in groups if g[0] is not None)
            assert handover.handshakes_in_flight(ports, ns) == 0
            ls.accept()[0].close()
        finally:
            for ns, _ in groups:
                if ns is not None:
                    os.close(ns)


def test_a_worker_without_root_still_settles_its_own_namespaces_listeners() -> None:
    """A worker that dropped root may not ask a socket for its namespace (EPERM): its
    listeners are looked for where it is, as before, not left unsettled."""
    ls = socket.socket()
    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    client = socket.create_connection(ls.getsockname())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker, as nobody
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            ((ns, ports),) = handover.ports_by_namespace([ls])
            os.write(w, f"{ns} {handover.handshakes_in_flight(ports, ns)}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with ls, client, os.fdopen(r) as out:
        assert out.read() == "None 1"
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
