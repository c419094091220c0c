"""The bench's promise and verdict, the MIB parsers and the memory-pressure flag (pure)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from mptcpkit.cli.lab_bench import exit_code
from mptcpkit.lab.mib import Memory, delta, parse_mib, parse_sockstat
from mptcpkit.lab.verdict import judge, promise

MB = 1024 * 1024


def rows(*per_link: int) -> list[dict[str, object]]:
    return [{"link": i, "bytes_acked": b} for i, b in enumerate(per_link)]


def test_extra_subflows_carrying_nothing_break_the_promise() -> None:
    # The run: 4 paths under machine-wide TCP memory pressure, extra subflows ~0.
    want = promise(protocol="mptcp", links=4, endpoint_links={1, 2, 3})
    assert want.links == [0, 1, 2, 3]
    memory = Memory([100, 200, 300], 250, {"client": 3, "server": 0}, {}, {})
    warning = memory.warning()
    assert warning is not None and "TCPMemoryPressures client +3" in warning
    assert "250 pages, tcp_mem is 100 200 300" in warning
    v = judge(want, rows(40 * MB, 9000, 0, 12000), mptcp=True, memory_warning=warning)
    assert not v.ok and v.used_links == [0]
    assert v.reasons[0] == (
        "link 1 carried no data: its subflow(s) carried 9,000 of 41,964,040 bytes "
        "(TCP memory pressure: see the warning)"
    )
    assert len(v.reasons) == 3
    ok = judge(want, rows(10 * MB, 10 * MB, 9 * MB, 11 * MB), mptcp=True)
    assert ok.ok and ok.used_links == [0, 1, 2, 3] and ok.reasons == []


def test_promises_of_tcp_fallback_backup_and_dead_links() -> None:
    assert promise(protocol="tcp", links=4, endpoint_links={1, 2, 3}).links == [0]
    strip = promise(protocol="mptcp", links=2, endpoint_links={1}, strip_mptcp=True)
    assert strip.links == [0] and strip.fallback
    assert not judge(strip, rows(MB), mptcp=True).ok  # stripped yet still MPTCP: wrong
    assert promise(protocol="mptcp", links=3, endpoint_links=set()).links == [0]
    idle = promise(protocol="mptcp", links=2, endpoint_links={1}, backup_links={1})
    assert idle.links == [0] and "idle" in idle.notes[0]
    failover = promise(
        protocol="mptcp",
        links=2,
        endpoint_links={1},
        backup_links={1},
        faults=[{"action": "down", "link": 0, "t": 1.0}],
    )
    assert failover.links == [0, 1]
    dead = promise(
        protocol="mptcp",
        links=3,
        endpoint_links={1, 2},
        faults=[{"action": "down", "link": 2, "at": 0}],
    )
    assert dead.links == [0, 1]
    fell_back = judge(promise(protocol="mptcp", links=2, endpoint_links={1}), rows(MB), mptcp=False)
    assert "fell back to plain TCP" in fell_back.reasons[0]
    assert "no subflow was opened" in fell_back.reasons[1]


def test_mib_and_sockstat_parsers() -> None:
    netstat = textwrap.dedent(
        """\
        TcpExt: SyncookiesSent TCPMemoryPressures
        TcpExt: 0 4
        MPTcpExt: MPCapableSYNRX MPJoinSynRx
        MPTcpExt: 1 2
        """
    )
    assert parse_mib(netstat) == {
        "TcpExtSyncookiesSent": 0,
        "TcpExtTCPMemoryPressures": 4,
        "MPTcpExtMPCapableSYNRX": 1,
        "MPTcpExtMPJoinSynRx": 2,
    }
    assert delta({"A": 1, "B": 2}, {"A": 1, "B": 5, "C": 1}) == {"B": 3, "C": 1}
    stat = parse_sockstat("sockets: used 9\nTCP: inuse 5 orphan 0 tw 0 alloc 7 mem 2\n")
    assert stat["TCP"]["mem"] == 2 and stat["sockets"]["used"] == 9


def test_memory_pressure_warns_always_and_fails_only_with_strict() -> None:
    calm = Memory([100, 200, 300], 10, {"client": 0, "server": 0}, {}, {})
    assert calm.warning() is None and not calm.under_pressure
    assert Memory([100, 200, 300], 200, {"client": 0}, {}, {}).under_pressure
    data = {"verified": True, "claim": {"ok": True}, "memory": {"under_pressure": True}}
    assert exit_code(data, strict=False) == 0
    assert exit_code(data, strict=True) == 1
    assert exit_code({**data, "claim": {"ok": False}}, strict=False) == 1
    assert exit_code({**data, "verified": False}, strict=False) == 1


def test_the_plugin_registers_the_root_marker(tmp_path: Path) -> None:
    # docs/lab.md marks tests @pytest.mark.root; --strict-markers must accept it with
    # nothing but the plugin loaded.
    (tmp_path / "test_x.py").write_text(
        "import pytest\n@pytest.mark.root\ndef test_x():\n    pass\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--strict-markers", "-p", "no:cacheprovider",
         "-p", "mptcpkit.lab.pytest_plugin",
         "test_x.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
