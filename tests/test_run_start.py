"""What `mptcpkit run` does before the program runs, kept cheap (start-up is part of
issue 13's cost): the probed option table kept per kernel, argparse skipped for the
common command lines. Same answers as the slow way; the timings are benchmarks'."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import pytest

from mptcpkit.cli import build_parser
from mptcpkit.cli import run as cli_run


def test_the_option_table_is_kept_per_kernel_and_only_trusted_when_private(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mptcpkit run` keeps the probed table for the next runs (the probe is a third of
    its start-up): used only under this kernel's and this code's stamp, from a file and
    a directory that are ours and nobody else's to write."""
    from mptcpkit import options as library
    from mptcpkit.run import options

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    kept = runtime / "mptcpkit" / options.CACHE_NAME
    table = options.tcp_only_options()
    assert table == {key: info.name for key, info in library.tcp_only_options().items()}
    assert library.tcp_only_options_complete()  # loopback, IPv4 and IPv6 here
    stamp, *rows = kept.read_text().splitlines()
    assert stamp == options._stamp() and len(rows) == len(table)
    assert kept.stat().st_mode & 0o777 == 0o600

    # what the file says is what is used (a row dropped: that option is no longer trapped)
    kept.write_text("\n".join([stamp, *rows[1:]]) + "\n")
    assert len(options.tcp_only_options()) == len(table) - 1
    # another kernel or another version of the probe: probed again, and rewritten
    kept.write_text("\n".join(["1 other-kernel", *rows[1:]]) + "\n")
    assert options.tcp_only_options() == table
    assert kept.read_text().splitlines()[0] == stamp
    # anyone may write it: not trusted, probed again
    kept.write_text("\n".join([stamp, *rows[1:]]) + "\n")
    kept.chmod(0o666)
    assert options.tcp_only_options() == table
    kept.chmod(0o600)
    (runtime / "mptcpkit").chmod(0o777)
    assert options.tcp_only_options() == table
    # a runtime directory that is not private: nothing kept there
    runtime.chmod(0o755 | 0o022)
    assert options.cache_dir() != str(runtime / "mptcpkit")


QUICK = [
    ["--", "true"],
    ["--", "sh", "-c", "echo $0", "x"],
    ["--stats", "--", "true", "--stats"],
    ["--stats=json", "--", "true"],
    ["--stats=text", "--only", "repair", "--", "gobgpd", "-f", "x"],
    ["--strategy", "seccomp", "--only=listen", "--", "nginx"],
    ["--strategy=preload", "--strategy", "bpf", "--", "true"],  # the last one wins
    ["--only", "connect", "--stats", "--", "--", "true"],
]
ARGPARSE = [
    [],
    ["--"],
    ["true"],  # no `--`: argparse's REMAINDER
    ["-h"],
    ["--strat", "seccomp", "--", "true"],  # an abbreviation
    ["--stats", "json", "--", "true"],  # the optional value as a word of its own
    ["--strategy", "nope", "--", "true"],
    ["--only"],
    ["--systemd-dropin", "nginx"],
    ["--remove", "--", "true"],
]


@pytest.mark.parametrize("argv", QUICK)
def test_quick_parse_is_argparses(argv: list[str]) -> None:
    quick = cli_run.parse_quickly(argv)
    assert quick is not None
    slow = build_parser("run").parse_args(["run", *argv])
    assert vars(quick) == vars(slow)


@pytest.mark.parametrize("argv", ARGPARSE)
def test_everything_else_goes_to_argparse(argv: list[str]) -> None:
    assert cli_run.parse_quickly(argv) is None


def test_mptcpkit_run_imports_no_argparse() -> None:
    """Nor ctypes, dataclasses (inspect, ast, dis), shutil or typing: each costs a millisecond
    or more of every run's start (-S: the site's .pth files are not ours to judge)."""
    code = (
        "import sys\n"
        "from mptcpkit.cli import main\n"
        "import mptcpkit.run.execute as e\n"
        "def stop(path, argv, env):\n"
        "    print(sorted(m for m in ('argparse', 'ctypes', 'dataclasses', 'shutil', 'typing')"
        " if m in sys.modules)); sys.exit(0)\n"
        "e.exec_program = stop\n"
        "main(['run', '--strategy', 'seccomp', '--', 'true'])\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert isinstance(build_parser("run"), argparse.ArgumentParser)
