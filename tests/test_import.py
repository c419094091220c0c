"""`import mptcpkit` loads the socket layer and nothing heavy (its time is measured in
benchmarks/core_bench.py; here only what it pulls in)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest

import mptcpkit
from mptcpkit.abi._record import record

_HEAVY = (
    "ctypes",
    "dataclasses",
    "inspect",
    "typing",
    "re",
    "ipaddress",
    "contextlib",
    "threading",
    "asyncio",
    "mptcpkit.address",
    "mptcpkit.aio",
    "mptcpkit.run",
    "mptcpkit.run.inprocess",
    "mptcpkit.cli",
)


def test_import_loads_nothing_heavy() -> None:
    """Neither `import mptcpkit` nor the first use of the socket layer's names."""
    code = (
        "import sys; before = set(sys.modules); import mptcpkit; "
        "mptcpkit.create_connection, mptcpkit.info, mptcpkit.setsockopt, mptcpkit.tcp_md5sig; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    # -S: no site module, which on some hosts imports typing or re for everyone
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "mptcpkit.sockets" in loaded
    assert not loaded & set(_HEAVY), sorted(loaded & set(_HEAVY))


def test_lazy_names_still_import() -> None:
    from mptcpkit import Address, forced, parse_address  # loaded on first use

    assert parse_address("tcp@127.0.0.1:80").ports == range(80, 81)
    assert callable(forced) and isinstance(Address, type)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mptcpkit.nope  # type: ignore[attr-defined]  # noqa: B018


@record
class _Point:
    x: int
    y: int = 2


def test_records_behave_like_frozen_dataclasses() -> None:
    p = _Point(1)
    assert p == _Point(1, 2) and p != _Point(1, 3) and hash(p) == hash(_Point(1, 2))
    assert repr(p) == "_Point(x=1, y=2)"
    assert pickle.loads(pickle.dumps(p)) == p == copy.deepcopy(p)
    with pytest.raises(AttributeError, match="frozen"):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        _Point()  # type: ignore[call-arg]
    assert not hasattr(p, "__dict__")
    match p:
        case _Point(1, y):
            assert y == 2
