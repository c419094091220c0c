"""The load-balancer recipe as pmd configuration (issue 17): `load_balancer = true` plus
`announce = [...]` on every instance of the naive fleet makes it the recipe's fleet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mptcpkit import pm
from mptcpkit.lab import fleetrun
from mptcpkit.lab.fleet import fleet
from mptcpkit.pm import config as cfgmod
from pmd_harness import Pmd


def test_announce_parses() -> None:
    cfg = cfgmod.loads('load_balancer = true\nannounce = "10.0.0.5, fd00::5"')
    assert cfg.announce_addresses == ("10.0.0.5", "fd00::5")
    assert cfg.manages_address("10.0.0.5") and not cfg.manages_address("10.0.1.5")
    assert cfgmod.loads("load_balancer = true").manages_address("10.0.1.5")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('announce = ["10.0.0.5"]', "pmd.toml: announce: needs load_balancer = true"),
        ('load_balancer = true\nannounce = ["vip"]', "'vip' is not an IP address"),
        ("load_balancer = true\nannounce = []", "expected at least one address"),
        (
            'mode = "userspace"\nload_balancer = true\nannounce = ["10.0.0.5"]',
            'only with mode = "kernel"',
        ),
    ],
)
def test_announce_errors(text: str, message: str) -> None:
    with pytest.raises(cfgmod.ConfigError, match=r"^pmd\.toml: announce: ") as info:
        cfgmod.loads(text)
    assert message in str(info.value)


def test_check_warns_when_an_instance_announces_nothing_or_too_much() -> None:
    lb = cfgmod.loads("load_balancer = true")
    addrs = {"10.99.0.1": "lo", "10.0.2.2": "eth0", "10.0.4.1": "eth1"}
    (many,) = cfgmod.check(lb, addrs)
    assert "2 addresses would be announced (10.0.2.2, 10.0.4.1)" in many
    (nothing,) = cfgmod.check(lb, {"10.99.0.1": "lo"})  # only the VIP, on lo
    assert "no address would be announced" in nothing
    one = cfgmod.loads('load_balancer = true\nannounce = ["10.0.2.2"]')
    assert cfgmod.check(one, addrs) == []
    missing = cfgmod.loads('load_balancer = true\nannounce = ["10.0.9.9"]')
    warnings = cfgmod.check(missing, addrs)
    assert len(warnings) == 2 and "10.0.9.9 is not an address" in warnings[0]
    assert cfgmod.check(cfgmod.Config(), {}) == []  # not behind a balancer: nothing to say


def _pmd(tmp: Path, netns: str, text: str) -> Pmd:
    """One pmd per instance namespace, each in a directory of its own."""
    (tmp / netns).mkdir()
    return Pmd(tmp / netns, netns, text)


@pytest.mark.root
def test_pmd_makes_the_naive_fleet_the_recipe(tmp_path: Path) -> None:
    with fleet(2, recipe=False, rate="20mbit") as net, fleetrun.serving(net, proxy=False):
        pmds = []
        try:
            for inst in net.instances:
                text = f'load_balancer = true\nannounce = ["{inst.unicast}"]\n'
                pmds.append(_pmd(tmp_path, inst.host.netns, text))
            for inst in net.instances:
                eps = pm.endpoints(netns=inst.host.netns)
                assert [(ep.address, ep.flags) for ep in eps] == [
                    (inst.unicast, pm.EndpointFlag.SIGNAL)
                ]
                assert inst.host.sysctl("net.mptcp.allow_join_initial_addr_port") == "0"
            r = fleetrun.run(net, 16, 512 * 1024, concurrency=8)
        finally:
            codes = [p.stop() for p in pmds]
        assert codes == [0, 0], [p.log for p in pmds]
        assert not any("warning" in line for p in pmds for line in p.log)
        for inst in net.instances:  # stopped: as it found the namespace
            assert pm.endpoints(netns=inst.host.netns) == []
            assert inst.host.sysctl("net.mptcp.allow_join_initial_addr_port") == "1"
    assert r.verified, r.errors
    assert r.misrouted_joins == 0 and r.joins == 16
    assert r.subflows_per_conn_max == 2 and r.conns_with_all_subflows >= 15  # see test_fleet


@pytest.mark.root
def test_pmd_check_and_start_warn_behind_a_balancer(tmp_path: Path) -> None:
    with fleet(1, recipe=False) as net:
        inst = net.instances[0]
        conf = tmp_path / "pmd.toml"
        conf.write_text("load_balancer = true\n")
        argv = [sys.executable, "-m", "mptcpkit", "pmd", "--check", "-c", str(conf)]
        r = subprocess.run([*argv, "--netns", inst.host.netns], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == f"{conf}: OK\n"
        # eth0 (towards the balancer) and eth1 (towards the backend), in both families
        assert "mptcpkit pmd: warning: load_balancer: 4 addresses would be announced" in r.stderr
        conf.write_text(f'load_balancer = true\nannounce = ["{inst.unicast}"]\n')
        r = subprocess.run([*argv, "--netns", inst.host.netns], capture_output=True, text=True)
        assert (r.returncode, r.stderr) == (0, "")
        r = subprocess.run([*argv, "--netns", "h17-never-made"], capture_output=True, text=True)
        assert r.returncode == 2 and "does not exist" in r.stderr
        # pmd itself says it at start
        conf.write_text(f'load_balancer = true\nannounce = ["10.0.99.1", "{inst.unicast}"]\n')
        p = _pmd(tmp_path, inst.host.netns, conf.read_text())
        assert p.stop() == 0
        assert any("warning: announce: 10.0.99.1 is not an address" in ln for ln in p.log)


@pytest.mark.root
@pytest.mark.parametrize("recipe", [False, True])
def test_proxy_check_warns_for_a_vip_frontend_that_announces_nothing(recipe: bool) -> None:
    def check(listen: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "mptcpkit", "proxy", "--check", "--listen", listen]
        return gw.run([*argv, "--to", "tcp@10.0.9.9:80"], check=False)

    with fleet(1, recipe=recipe) as net:
        gw = net.instances[0].host
        vip = check(f"mptcp@{net.vip}:8443")
        wildcard = check("mptcp@:8443")
    assert vip.returncode == wildcard.returncode == 0, vip.stderr
    assert wildcard.stderr == ""  # nothing says where clients come from: no guess
    if recipe:
        assert vip.stderr == ""
    else:
        assert vip.stderr.startswith("mptcpkit proxy: warning: frontend ")
        assert f"binds {net.vip}, an address on lo" in vip.stderr
        assert "no signal endpoint announces a unicast address and " in vip.stderr
        assert "allow_join_initial_addr_port is not 0" in vip.stderr
