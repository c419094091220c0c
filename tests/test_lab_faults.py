"""Faults while traffic flows: links down/up and rate changes, on a schedule."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcpkit import lab
from mptcpkit.lab.bench import run_bench
from mptcpkit.lab.faults import Fault, Schedule, flap, parse_fault


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("down:1@4s", Fault(4.0, 1, "down")),
        ("up:0@250ms", Fault(0.25, 0, "up")),
        ("rate:2=10mbit@1.5", Fault(1.5, 2, "rate", "10mbit")),
        (" rate : 0 = 500kbit @ 2s ", Fault(2.0, 0, "rate", "500kbit")),
    ],
)
def test_parse_fault(text: str, fault: Fault) -> None:
    assert parse_fault(text) == fault


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("down1@4s", "expected ACTION:LINK@TIME"),
        ("explode:1@4s", "expected ACTION:LINK@TIME"),
        ("rate:1@4s", "needs a rate"),
        ("down:1=5mbit@4s", "takes no rate"),
        ("down:1@4h", "unknown unit 'h'"),
        ("rate:1=fast@1s", "expected a number"),
    ],
)
def test_parse_fault_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault(text)


@given(
    st.sampled_from(["down", "up", "rate"]),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=10**6).map(lambda ms: ms / 1000),
    st.integers(min_value=1, max_value=10**6),
)
def test_fault_text_round_trips(action: str, link: int, at: float, kbit: int) -> None:
    fault = Fault(at, link, action, lab.format_rate(kbit * 1000) if action == "rate" else None)
    assert parse_fault(str(fault)) == fault


def test_flap() -> None:
    assert flap(1, start=1, down_for=0.5, every=2, times=2) == [
        Fault(1, 1, "down"),
        Fault(1.5, 1, "up"),
        Fault(3, 1, "down"),
        Fault(3.5, 1, "up"),
    ]
    with pytest.raises(ValueError, match="down_for < every"):
        flap(1, start=0, down_for=2, every=1, times=1)


@pytest.mark.root
@pytest.mark.lab(paths=2)
def test_link_down_and_up_keeps_addresses_and_routes(two_paths: lab.Topology) -> None:
    client = two_paths.host("client")
    link = two_paths.link(1)
    link.down()
    assert not link.is_up
    state = client.run(["ip", "-br", "link", "show", "dev", "eth1"]).stdout
    assert "DOWN" in state
    link.up()
    assert link.is_up
    assert (
        "fd00:0:0:1::1/64" in client.run(["ip", "-6", "-br", "addr", "show", "dev", "eth1"]).stdout
    )
    assert client.route_get("10.0.0.2", dev="eth1")["gateway"] == "10.0.1.2"
    assert client.route_get("fd00::2", dev="eth1")["gateway"] == "fd00:0:0:1::2"
    assert [e.kind for e in two_paths.events] == ["down", "up"]
    assert all(e.link == 1 for e in two_paths.events)


@pytest.mark.root
def test_schedule_applies_faults_in_order_and_stops_at_teardown(lab_factory) -> None:
    net = lab_factory(lab.two_paths, paths=2, rate="20mbit")
    calls: list[str] = []
    done = threading.Event()
    sched = Schedule(
        net, [Fault(0.05, 1, "down"), Fault(0.1, 1, "up"), Fault(0.15, 0, "rate", "5mbit")]
    )
    sched.at("0.2s", lambda: (calls.append("custom"), done.set()))
    sched.at("0.25s", net.link(1).down)
    sched.add(Fault(60, 1, "down"))  # never reached: stopped at teardown
    sched.start()
    assert done.wait(20)
    deadline = time.monotonic() + 20
    while len(sched.applied) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [a.label for a in sched.applied] == [
        "down:1@0.05s",
        "up:1@0.1s",
        "rate:0=5mbit@0.15s",
        "<lambda>",
        "down:1",
    ]
    assert sched.errors == []
    assert net.link(0).rate == "5mbit"
    assert "rate 5Mbit" in net.host("client").run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    t = [a.t for a in sched.applied]
    assert t == sorted(t)
    net.close()
    assert sched.wait(10)
    assert len(sched.applied) == 5 and calls == ["custom"]
    with pytest.raises(lab.LabError, match="no link 7"):
        Schedule(net, [Fault(1, 7, "down")])


@pytest.mark.root
def test_mptcp_transfer_survives_a_link_going_down(lab_factory) -> None:
    net = lab_factory(lab.two_paths, paths=2, rate="30mbit")
    result = run_bench(net, duration=3.0, interval=0.1, faults=[Fault(1.2, 1, "down")])
    assert result.error is None
    assert result.verified and result.lost_bytes == 0
    assert result.bytes > 0 and result.bytes == result.bytes_sent
    assert result.mptcp
    assert [f["action"] for f in result.faults] == ["down"]
    t_fault = result.faults[0]["t"]
    by_link = {sf["link"]: sf["key"] for sf in result.subflows}
    assert set(by_link) == {0, 1}
    before = [iv for iv in result.intervals if iv["t"] <= t_fault]
    after = [iv for iv in result.intervals if iv["t"] - iv["dt"] > t_fault + 0.3]
    assert before and after
    # Both links carried data before the fault, only link 0 after it.
    assert sum(iv["subflows"].get(by_link[1], 0) for iv in before) > 0
    assert sum(iv["subflows"].get(by_link[1], 0) for iv in after) == 0
    assert sum(iv["links"]["1"] for iv in after) < 0.1 * sum(iv["links"]["0"] for iv in after)
    assert sum(iv["bytes"] for iv in after) > 0  # the transfer went on, on link 0


@pytest.mark.root
def test_plain_tcp_on_the_failed_link_stalls(lab_factory) -> None:
    """The contrast: single-path TCP on link 0 gets nothing through once link 0 is down."""
    net = lab_factory(lab.two_paths, paths=2, rate="30mbit")
    result = run_bench(
        net,
        duration=2.0,
        interval=0.1,
        protocol="tcp",
        faults=[Fault(0.8, 0, "down"), Fault(1.6, 0, "up")],
        timeout=30,
    )
    assert result.verified and not result.mptcp
    down_t, up_t = (f["t"] for f in result.faults)
    during = [iv for iv in result.intervals if iv["t"] - iv["dt"] > down_t + 0.1 and iv["t"] < up_t]
    assert during and all(iv["bytes"] == 0 for iv in during)
