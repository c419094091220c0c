"""HAProxy's `slowstart`: a server back UP gets its weight back gradually. Pure ramp
arithmetic, the real balancer, and a real proxy whose server goes down and comes back."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from mptcpkit.proxy.balance import Balancer
from mptcpkit.proxy.config import parse_text
from mptcpkit.proxy.slowstart import effective_weight
from proxy_harness import Server, connect, echo, recv_all, run_proxy, wait_for


def _conf(a: str, b: str, slowstart: str = "1h") -> str:
    return (
        '[global]\nworkers = 1\nmetrics = ""\n'
        '[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\n'
        '[backend.be]\ncheck = { interval = "100ms", rise = 1, fall = 1, timeout = "1s" }\n'
        f'server.a = {{ address = "{a}", weight = 100 }}\n'
        f'server.b = {{ address = "{b}", weight = 100, slowstart = "{slowstart}" }}\n'
    )


class Served:
    """Echo; count the connections that brought data (health checks bring none)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, c: socket.socket) -> None:
        d = c.recv(1)
        if d:
            self.n += 1
            c.sendall(d)
        echo(c)


def _balancer(slowstart: str) -> Balancer:
    bal = Balancer(
        parse_text(_conf("tcp@127.0.0.1:1", "tcp@127.0.0.1:2", slowstart)).backends["be"]
    )
    b = bal.states[1]
    b.observe(False)  # DOWN (fall = 1)
    b.observe(True)  # back UP (rise = 1): the ramp starts
    return bal


def test_ramp_from_one_to_the_whole_weight() -> None:
    b = _balancer("100s").states[1]
    start = b.ramp_until - 100
    assert effective_weight(b, start) == 1
    assert effective_weight(b, start + 25) == 25
    assert effective_weight(b, start + 99.5) == 100
    assert effective_weight(b, start + 100) == 100 and b.ramp_until == 0  # ramp over
    assert _balancer("0s").states[1].ramp_until == 0  # no slowstart, no ramp


def test_a_server_back_up_gets_a_trickle_then_its_share() -> None:
    bal = _balancer("1h")
    picks = [bal.pick().server.name for _ in range(101)]  # type: ignore[union-attr]
    assert picks.count("b") == 1  # weight 1 of 100 in the first 36 s of an hour
    bal.states[1].ramp_until = time.monotonic() - 1  # the hour is over
    picks = [bal.pick().server.name for _ in range(100)]  # type: ignore[union-attr]
    assert picks.count("b") == 50


def test_proxy_ramps_a_server_that_came_back(tmp_path: Path, relay: str) -> None:
    with Server(echo) as a, Server(echo) as b:
        port_b = b.port
        with run_proxy(tmp_path, _conf(a.address, b.address)) as px:
            b.close()
            wait_for(lambda: "server b is DOWN" in px.log(), what="b DOWN")
            served = Served()
            with Server(served, port=port_b):
                wait_for(lambda: "server b is UP" in px.log(), what="b UP again")
                for _ in range(20):
                    s = connect(px.port("fe"), mptcp=True)
                    s.sendall(b"z")
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s) == b"z"
                    s.close()
                assert served.n <= 1  # equal weights, but b is ramping over an hour
