"""TEMPORARY two-namespace fixture for the pm tests, until the lab lands (then deleted).

Client and server namespaces joined by `paths` veth pairs; link i carries
10.0.i.1 (client) and 10.0.i.2 (server). Names are unique and always removed.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@dataclass
class Net:
    client: str
    server: str
    paths: int
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, check=check)

    def client_addr(self, i: int) -> str:
        return f"10.0.{i}.1"

    def server_addr(self, i: int) -> str:
        return f"10.0.{i}.2"

    def client_dev(self, i: int) -> str:
        return f"c{i}"

    def server_dev(self, i: int) -> str:
        return f"s{i}"

    def link_down(self, i: int) -> None:
        sh("ip", "-n", self.client, "link", "set", f"c{i}", "down")

    def link_up(self, i: int) -> None:
        sh("ip", "-n", self.client, "link", "set", f"c{i}", "up")


@contextlib.contextmanager
def two_namespaces(paths: int = 2, *, addresses: bool = True) -> Iterator[Net]:
    tag = secrets.token_hex(3)
    net = Net(f"mptk-pm-{tag}-c", f"mptk-pm-{tag}-s", paths)
    created: list[str] = []
    try:
        for ns in (net.client, net.server):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i in range(paths):
            sh(
                "ip", "-n", net.client, "link", "add", f"c{i}", "type", "veth",
                "peer", "name", f"s{i}", "netns", net.server,
            )  # fmt: skip
            sh("ip", "-n", net.client, "link", "set", f"c{i}", "up")
            sh("ip", "-n", net.server, "link", "set", f"s{i}", "up")
            if addresses:
                sh("ip", "-n", net.client, "addr", "add", f"10.0.{i}.1/24", "dev", f"c{i}")
                sh("ip", "-n", net.server, "addr", "add", f"10.0.{i}.2/24", "dev", f"s{i}")
        yield net
    finally:
        for p in net.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)
