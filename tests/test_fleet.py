"""MPTCP gateways behind a stateless L4 balancer (issue 17), in the lab's `fleet` topology.

Real kernel data path: nftables jhash on the balancer, MPTCP listeners (or `mptcpkit
proxy`) in each instance, the instances' own MIB counters for joins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mptcpkit.lab import fleetrun
from mptcpkit.lab.fleet import fleet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = [sys.executable, "-m", "mptcpkit", "demo", "fleet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}


@pytest.mark.root
def test_recipe_every_join_reaches_its_instance() -> None:
    # 20mbit links and 512K: each download takes long enough for its join (two round
    # trips after the handshake) to be seen however loaded the machine.
    with fleet(2, recipe=True, rate="20mbit") as net, fleetrun.serving(net, proxy=False):
        r = fleetrun.run(net, 16, 512 * 1024, concurrency=8)
        unicast = {i.unicast for i in net.instances}
    assert r.verified, r.errors
    assert r.misrouted_joins == 0
    assert r.joins == 16  # one per connection, each to its owner
    # A join's SYN-ACK dropped by a full shaped queue is retried after 1 s, after the
    # download: one such connection is loss, not routing (no join was misrouted).
    assert r.subflows_per_conn_max == 2 and r.conns_with_all_subflows >= 15
    assert sum(r.per_instance) == 16
    for c in r.conns:  # the VIP subflow, then one to an instance's own address
        assert c.remotes[0] == net.vip and set(c.remotes[1:]) <= unicast, c.remotes


@pytest.mark.root
def test_naive_fleet_misroutes_joins() -> None:
    # Joins through the VIP land on the owner 1 time in 2: 24 connections all lucky is
    # a 2**-24 chance.
    with fleet(2, recipe=False, rate="20mbit") as net, fleetrun.serving(net, proxy=False):
        r = fleetrun.run(net, 24, 256 * 1024, concurrency=8)
    assert r.verified, r.errors  # the data still arrives, over one path
    assert r.joins == 24
    assert r.misrouted_joins > 0
    assert r.joins_established < r.joins
    assert r.subflows_per_conn_min == 1
    # Misrouted joins leave connections on one path. Not an equality: a join lost in a
    # full shaped queue does too, and a misrouted SYN sent again is counted again.
    assert sum(1 for c in r.conns if c.subflows == 1) > 0


@pytest.mark.root
def test_drain_recipe_connections_finish_over_unicast_subflows() -> None:
    with fleet(2, recipe=True, rate="50mbit") as net, fleetrun.serving(net, proxy=False):
        d = fleetrun.drain(net, connections=6, size=2 << 20, settle=0.5)
        buckets_after = list(net.buckets)
    assert d.open_on_drained > 0
    assert d.finished_on_drained == d.open_on_drained
    assert d.finished_elsewhere == d.open_elsewhere
    assert d.new_on_drained == 0 and d.new_verified
    assert sorted(set(buckets_after)) == [1, 2]  # restored afterwards


@pytest.mark.root
def test_drain_naive_connections_stall() -> None:
    # 4 MiB each: at the drain every download has megabytes to go, more than its
    # instance can send without the ACKs that now reach the other instance.
    with fleet(2, recipe=False, rate="50mbit") as net, fleetrun.serving(net, proxy=False):
        d = fleetrun.drain(net, connections=6, size=4 << 20, settle=0.5, stall=2.0)
    assert d.open_on_drained > 0
    assert d.finished_on_drained == 0  # their only path went through the VIP
    assert d.new_on_drained == 0


@pytest.mark.root
def test_drain_moves_only_the_drained_buckets() -> None:
    with fleet(3, recipe=True) as net:
        before = list(net.buckets)
        net.drain(2)
        after = list(net.buckets)
        listed = net.balancer.run(["nft", "-j", "list", "map", "ip", "fleet", "buckets"]).stdout
        with pytest.raises(ValueError, match="not in the balancer"):
            net.drain(2)
        net.drain(1)
        with pytest.raises(ValueError, match="last instance"):
            net.drain(3)
    assert 2 not in after and set(after) == {1, 3}
    assert all(b == a for b, a in zip(before, after, strict=True) if b != 2)
    elements = json.loads(listed)["nftables"][1]["map"]["elem"]
    assert sorted({int(v) for _, v in elements}) == [1, 3]


@pytest.mark.root
def test_demo_fleet_json() -> None:
    out = subprocess.run(
        [*DEMO, "--connections", "6", "--size", "512K", "--no-naive", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["instances"] == 2 and s["connections"] == 6
    assert len(s["per_instance"]) == 2 and sum(s["per_instance"]) == 6
    assert s["subflows_per_conn_max"] == 2 and s["conns_with_all_subflows"] >= 5
    assert s["misrouted_joins"] == 0 and s["verified"] is True
    assert s["single_path_bps"] > 0 and s["goodput_ratio"]["c1"] > 0
    assert s["drain"]["finished_on_drained"] == s["drain"]["open_on_drained"] > 0
    assert "naive" not in s
    assert s["ok"] and all(c["ok"] for c in s["checks"])


@pytest.mark.root
@pytest.mark.slow
def test_demo_fleet_recipe_100_connections() -> None:
    out = subprocess.run(
        [*DEMO, "--instances", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    s = json.loads(out.stdout)
    assert out.returncode == 0, [c for c in s["checks"] if not c["ok"]]
    assert s["connections"] >= 100 and s["misrouted_joins"] == 0
    assert s["conns_with_all_subflows"] >= 97 and s["verified"]
    naive = s["naive"]  # joins through the VIP: about 2 in 3 reach another instance
    assert naive["verified"] and naive["misrouted_joins"] > 0
    assert naive["subflows_per_conn_min"] == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--instances", "0"],
        ["--instances", "2", "--connections", "3"],
        ["--size", "lots"],
        ["--rate", "fast"],
    ],
)
def test_demo_fleet_usage(argv: list[str]) -> None:
    out = subprocess.run([*DEMO, *argv], capture_output=True, text=True, env=_env())
    assert out.returncode == 2
    assert out.stderr.startswith("mptcpkit demo: --")


def test_demo_without_variant_is_the_gateway_demo() -> None:
    from mptcpkit.cli import build_parser, demo

    args = build_parser("demo").parse_args(["demo", "--json"])
    assert args.func is demo.run and args.variant is None
    args = build_parser("demo").parse_args(["demo", "fleet", "--json"])
    assert args.func is not demo.run and args.instances == 2
