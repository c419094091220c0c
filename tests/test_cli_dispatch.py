"""The `mptcpkit` command imports only the subcommand it runs: `--help` none at all."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from mptcpkit.cli import COMMANDS, build_parser, main

PROBE = """
import json, sys
from mptcpkit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m.startswith(("mptcpkit.cli.", "rich")))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def _probe(*argv: str) -> tuple[int, list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], report["loaded"], done.stdout


def test_help_imports_no_subcommand_and_no_rich() -> None:
    code, loaded, out = _probe("--help")
    assert code == 0
    assert loaded == ["mptcpkit.cli.errors"]
    for name, summary in COMMANDS:
        assert name in out and summary[:30] in out


def test_a_subcommand_imports_only_itself() -> None:
    code, loaded, out = _probe("limits", "--help")
    assert code == 0 and "limits show" in out
    assert set(loaded) == {"mptcpkit.cli.errors", "mptcpkit.cli.limits", "mptcpkit.cli.endpoint"}


def test_the_listed_help_lines_are_the_modules_own() -> None:
    parser = build_parser()  # every module registers itself
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = [(choice.dest, choice.help) for choice in action._choices_actions]
    assert registered == list(COMMANDS)


@pytest.mark.parametrize("name", [name for name, _ in COMMANDS])
def test_every_subcommand_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: mptcpkit {name}" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["chekc"])
    assert exit_.value.code == 2
    assert "invalid choice: 'chekc'" in capsys.readouterr().err
