"""`lab bench` keeps its own claim, and the kernel selftests' scenarios without netem.

Each bench here is short (2-3 s at 10-20 Mbit/s): what is checked is which links carried
data, what the filters dropped and which MIB counters moved, never a speed.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from mptcpkit import lab
from mptcpkit.cli.lab_bench import _summary
from mptcpkit.lab.bench import run_bench

pytestmark = pytest.mark.root


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"{lab.default_prefix()}sc{secrets.token_hex(3)}-"
    yield p
    lab.remove_all(p, running=True)
    assert lab.list_netns(p) == []


def bench(prefix: str, *args: str, json_out: bool = True) -> tuple[int, Any, str]:
    """Run `mptcpkit lab bench ARGS [--json]`; (exit code, parsed JSON or stdout, stderr)."""
    env = {**os.environ, lab.PREFIX_ENV: prefix}
    argv = [sys.executable, "-m", "mptcpkit", "lab", "bench", "--interval", "0.25", *args]
    if json_out:
        argv.append("--json")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    data = json.loads(out.stdout) if json_out and out.stdout.strip() else out.stdout
    return out.returncode, data, out.stderr


def summary(data: dict[str, Any]) -> str:
    """The table `lab bench` prints for this JSON, as text."""
    out = io.StringIO()
    _summary(Console(file=out, width=200), data)
    return re.sub(r" +", " ", out.getvalue())


def test_signal_endpoints_aggregate(prefix: str) -> None:
    # The server announces 10.0.1.2 (on a port of its own): the listener must accept
    # the join to it. It was bound to 10.0.0.2: one subflow, "verified", exit 0.
    rc, d, err = bench(
        prefix, "--endpoints", "signal", "--signal-port", "--rate", "20mbit", "--duration", "2"
    )
    assert rc == 0, err
    assert d["verified"] and d["mptcp"]
    assert d["claim"]["ok"] and d["claim"]["used_links"] == [0, 1]
    assert [sf["link"] for sf in d["subflows"]] == [0, 1]
    assert d["subflows"][1]["remote"] == "10.0.1.2:10101"  # the announced port
    assert d["mib"]["client"]["MPTcpExtAddAddr"] >= 1
    assert d["mib"]["server"]["MPTcpExtMPJoinPortSynRx"] == 1


def test_ipv6_uses_every_path_and_the_summary_keeps_brackets(prefix: str) -> None:
    rc, out, err = bench(prefix, "--ipv6", "--rate", "20mbit", "--duration", "2", json_out=False)
    assert rc == 0, err
    # rich markup used to eat "[fd00::1]" and print ":40942->:55251".
    assert "[fd00::1]:" in out and "[fd00:0:0:1::1]:" in out
    assert "->[fd00::2]:" in out
    assert "0, 1 (promised 0, 1): yes" in out


def test_per_link_rates_sum_and_loss(prefix: str) -> None:
    rc, d, err = bench(prefix, "--rates", "20mbit,5mbit", "--loss", "1=2%", "--duration", "2")
    assert rc == 0, err
    assert d["rates_mbit"] == [20.0, 5.0] and d["sum_rate_mbit"] == 25.0
    assert d["rate_mbit"] is None  # no single rate to speak of
    assert [lk["rate_mbit"] for lk in d["links"]] == [20.0, 5.0]
    assert d["share_of_sum"] == pytest.approx(d["goodput_mbit"] / 25.0, abs=1e-3)
    assert d["steady_share_of_sum"] == pytest.approx(d["steady_mbit"] / 25.0, abs=1e-3)
    assert d["claim"]["used_links"] == [0, 1] and d["verified"] and d["lost_bytes"] == 0
    # Packets dropped on link 1 in both directions, by the rule in each namespace.
    assert d["filters"]["client"]["loss-1"] > 0 and d["filters"]["server"]["loss-1"] > 0
    assert d["mib"]["client"].get("TcpRetransSegs", 0) > 0
    assert d["scenario"]["loss"] == {"1": 2.0}


def test_asymmetric_up_and_down_rates(prefix: str) -> None:
    net = lab.two_paths(paths=2, rates=["20mbit/5mbit", "10mbit"], prefix=prefix)
    with net:
        client, server = net.host("client"), net.host("server")
        up = client.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        down = server.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "rate 20Mbit" in up and "rate 5Mbit" in down
        assert "rate 10Mbit" in server.run(["tc", "qdisc", "show", "dev", "eth1"]).stdout
        assert net.describe()["links"][0]["rate_back"] == "5mbit"


def test_middlebox_stripping_mptcp_is_reported_as_fallback(prefix: str) -> None:
    rc, d, err = bench(prefix, "--strip-mptcp", "--rate", "10mbit", "--duration", "2")
    assert rc == 0, err  # the promise under a stripping middlebox: TCP on link 0
    assert d["mptcp"] is False and d["verified"]
    assert d["claim"]["ok"] and d["claim"]["expected_links"] == [0]
    assert any("stripped" in n for n in d["claim"]["notes"])
    client = d["mib"]["client"]
    assert client.get("MPTcpExtMPCapableSYNTX") == 1
    assert "MPTcpExtMPCapableSYNACKRX" not in client  # the answer came back without MPTCP
    text = summary(d)
    assert "MPTCP in use │ no: fell back to TCP" in text
    assert "promise │ MPTCP options stripped: TCP on link 0" in text


def test_lost_add_addr_is_retransmitted_after_the_timeout(prefix: str) -> None:
    rc, d, err = bench(prefix, "--drop-add-addr", "1", "--rate", "10mbit", "--duration", "3")
    assert rc == 0, err
    assert d["filters"]["server"]["drop-add-addr"] == 1
    assert d["claim"]["used_links"] == [0, 1]
    # One ADD_ADDR more sent than received: the retransmission after add_addr_timeout.
    assert d["mib"]["server"]["MPTcpExtAddAddrTx"] == d["mib"]["client"]["MPTcpExtAddAddr"] + 1


def test_a_broken_promise_says_why_and_exits_1(prefix: str) -> None:
    # Every ADD_ADDR dropped: link 1 is never joined. Before, such runs said "verified".
    rc, d, err = bench(prefix, "--drop-add-addr", "50", "--rate", "10mbit", "--duration", "2")
    assert rc == 1
    assert d["verified"] and not d["claim"]["ok"]
    assert d["claim"]["reasons"] == ["link 1 carried no data: no subflow was opened on it"]
    assert "not as promised: link 1 carried no data" in err


def test_backup_path_takes_over_when_the_active_one_fails(prefix: str) -> None:
    rc, d, err = bench(
        prefix, "--backup", "1", "--fail-link", "0", "--at", "1s", "--rate", "10mbit",
        "--duration", "3",
    )  # fmt: skip
    assert rc == 0, err
    assert d["verified"] and d["claim"]["used_links"] == [0, 1]
    assert d["mib"]["server"]["MPTcpExtMPJoinSynBackupRx"] == 1
    link1 = next(sf["key"] for sf in d["subflows"] if sf["link"] == 1)
    before = sum(iv["subflows"].get(link1, 0) for iv in d["intervals"] if iv["t"] <= 1.0)
    after = sum(iv["subflows"].get(link1, 0) for iv in d["intervals"] if iv["t"] > 1.5)
    assert before < 0.5 < after  # idle while link 0 works (Mbit/s summed over intervals)


def test_simultaneous_flows_and_a_subflow_reset(prefix: str) -> None:
    rc, d, err = bench(
        prefix, "--flows", "2", "--fault", "rst:1@1.2s", "--rate", "10mbit", "--duration", "2.5"
    )
    assert rc == 0, err
    assert len(d["flows"]) == 2 and all(f["verified"] for f in d["flows"])
    assert d["lost_bytes"] == 0 and d["claim"]["used_links"] == [0, 1]
    assert len(d["subflows"]) >= 3  # two connections on both links (one may be cut early)
    assert {sf["link"] for sf in d["subflows"]} == {0, 1}
    # Link-1 subflows reset (one per connection, when both had joined by then).
    assert d["mib"]["client"]["MPTcpExtMPRstTx"] >= 1, d["mib"]
    assert_resets_taken_or_said(d)
    assert [f["action"] for f in d["faults"]] == ["rst"]


def assert_resets_taken_or_said(d: dict[str, Any]) -> None:
    """The server took every MP_TCPRST the client sent, or the bench says it did not.

    A RST is sent once; the server ignores one whose sequence number is not the next it
    expects (RFC 5961), as when data sent just before it was dropped by the link's full
    queue: in a CI rehearsal the server took none of the two (MPTcpExtMPRstRx 0).
    """
    sent = d["mib"]["client"]["MPTcpExtMPRstTx"]
    took = d["mib"]["server"].get("MPTcpExtMPRstRx", 0)
    said = [w for w in d["warnings"] if w.startswith("rst: ")]
    if took >= sent:
        assert said == [], said
        return
    assert len(said) == 1, d["warnings"]
    assert said[0].startswith(f"rst: the server took {took} of the {sent} subflow resets"), said
    server = d["mib"]["server"]
    challenged = server.get("TcpExtTCPChallengeACK", 0) + server.get(
        "TcpExtTCPACKSkippedChallenge", 0
    )
    assert ("RFC 5961" in said[0]) == bool(challenged), (said, server)


def test_fastclose(prefix: str) -> None:
    rc, d, err = bench(prefix, "--fastclose", "--rate", "10mbit", "--duration", "2")
    assert rc == 0, err
    (flow,) = d["flows"]
    assert flow["reset"] and flow["verified"]  # what arrived is an intact prefix
    assert d["mib"]["client"]["MPTcpExtMPFastcloseTx"] >= 1
    assert d["mib"]["server"]["MPTcpExtMPFastcloseRx"] >= 1  # one per subflow it reached
    assert flow["unacked_at_close"] == 0  # aborted once all it sent was acknowledged
    assert flow["subflows_unsettled_at_close"] is not None  # and its subflows were read


def test_fastclose_on_a_link_that_drops_is_taken(prefix: str) -> None:
    # A 2 ms tbf queue drops most of what the sender pushes. The RSTs carrying
    # MP_FASTCLOSE reached the server, which ignored them (RFC 5961 challenge ACKs): data
    # sent just before them was lost, so their sequence numbers were not the next ones.
    # The receiver then waited its full timeout. Once in CI with the default queue; about
    # every other connection with this one. Now the sender waits for its data to be
    # acknowledged before the abort, on every subflow too: with only the connection's
    # SIOCOUTQ at 0, a subflow could still hold a copy of data sent the other way.
    net = lab.two_paths(paths=2, rate="10mbit", latency="2ms", prefix=prefix)
    with net:
        r = run_bench(net, duration=1.5, interval=0.25, flows=4, fastclose=True, timeout=20)
    assert r.ok and r.error is None, (r.claim, r.error)
    assert all(f["reset"] and f["verified"] for f in r.flows), r.flows
    assert [f["unacked_at_close"] for f in r.flows] == [0] * 4
    # A subflow may stay unsettled for the whole wait (retransmission backoff on this
    # queue): the bench says so; the connection's other subflow carries its MP_FASTCLOSE.
    unsettled = sum(f["subflows_unsettled_at_close"] for f in r.flows)
    assert (unsettled > 0) == any(w.startswith("fastclose: ") for w in r.warnings), r.warnings
    assert r.mib["server"]["MPTcpExtMPFastcloseRx"] >= 4, r.mib
    assert sum(r.qdisc_drops["client"].values()) > 0  # the queue did drop


def test_a_lost_fastclose_is_said_not_waited_for(prefix: str) -> None:
    # A RST is never retransmitted: when every MP_FASTCLOSE is lost, the server cannot
    # know the connection is gone. The bench gives it `fastclose_grace`, not its timeout.
    net = lab.two_paths(paths=2, rate="10mbit", prefix=prefix)
    with net:
        net.host("client").run(
            ["nft", "-f", "-"],
            input="table inet lost { chain post { type filter hook postrouting priority 0; "
            "policy accept; tcp option mptcp subtype 7 counter drop; }; }\n",
        )
        r = run_bench(net, duration=1.0, interval=0.25, fastclose=True, fastclose_grace=1.0)
    (flow,) = r.flows
    assert flow["error"] == "the server saw no reset within 1 s of the MP_FASTCLOSE", flow
    assert not flow["verified"] and not r.ok
    assert r.claim["reasons"] == [
        "MP_FASTCLOSE: 2 sent by the client, 0 received by the server, for 1 connection(s)"
    ]


def test_memory_is_recorded(prefix: str) -> None:
    net = lab.two_paths(paths=2, rate="10mbit", prefix=prefix)
    with net:
        result = run_bench(net, duration=1.0, interval=0.25)
    mem = result.memory
    assert len(mem["tcp_mem"]) == 3 and mem["peak_pages"] >= 0
    assert set(mem["pressures"]) == {"client", "server"}
    assert "TCP" in mem["sockstat_before"] and "mem" in mem["sockstat_after"]["TCP"]
    assert mem["under_pressure"] == bool(result.warnings)


def test_netem_is_probed_and_its_absence_said(prefix: str) -> None:
    with lab.two_paths(paths=1, prefix=prefix) as net:
        from mptcpkit.lab.scenario import netem_available

        have = netem_available(net.host("client"))
    rc, d, err = bench(prefix, "--paths", "1", "--delay", "10ms", "--duration", "1")
    if have:
        assert rc == 0 and d["netem"] is True, err
    else:
        assert rc == 2
        assert "no netem qdisc" in err and "delay, jitter and reordering" in err
    assert lab.list_netns(prefix) == []


def test_scenario_usage_errors(prefix: str) -> None:
    cases = {
        ("--duration", "2", "--fail-link", "1", "--at", "20s"): "would never happen",
        ("--fault", "down:1@5s", "--duration", "2"): "would never happen",
        ("--burst", "1k"): "less than one full-size packet",
        ("--rates", "50mbit"): "1 given for 2 path(s)",
        ("--rates", "50mbit,10mbit", "--rate", "5mbit"): "not both",
        ("--rates", "50mbit,,"): "no empty item",
        ("--loss", "7=2%"): "no link 7",
        ("--loss", "1=200"): "above 0 and below 100",
        ("--backup", "0"): "link 0 carries",
        ("--jitter", "5ms"): "need a delay",
        ("--signal-port",): "needs endpoints='signal'",
        ("--tcp", "--fastclose"): "MPTCP scenarios",
        ("--flows", "0"): "expected 1 to 64",
    }
    for args, message in cases.items():
        rc, _, err = bench(prefix, *args, json_out=False)
        assert rc == 2, (args, err)
        assert message in err, (args, err)
        assert err.count("\n") == 1, err
    assert lab.list_netns(prefix) == []


def test_endpoints_of_both_families_while_they_fit(prefix: str) -> None:
    # The kernel holds 8 endpoints per namespace: both families up to 5 paths; beyond,
    # IPv4 only unless IPv6 is asked for (`lab bench --ipv6` does).
    def families(**kwargs: Any) -> list[int]:
        with lab.two_paths(prefix=prefix, **kwargs) as net:
            return sorted(6 if ":" in e["address"] else 4 for e in net.host("client").endpoints())

    assert families(paths=5) == [4] * 4 + [6] * 4
    assert families(paths=8) == [4] * 7
    assert families(paths=8, family=6) == [6] * 7
