"""`bash scripts/install.sh` on a Debian whose /usr/bin/python3 refuses `pip install`
(PEP 668): mptcpkit goes into a virtual environment of its own, linked onto PATH.

The install runs for real with Debian's interpreter, into a scratch prefix
(MPTCPKIT_HOME, MPTCPKIT_BIN_DIR), then the installed command runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    not os.path.exists(DEBIAN_PYTHON), reason="no distribution Python at /usr/bin/python3"
)


def _env(tmp: pathlib.Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(MPTCPKIT_HOME=str(tmp / "venv"), MPTCPKIT_BIN_DIR=str(tmp / "bin"), **more)
    return env


def _externally_managed(python: str) -> bool:
    stdlib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED"))


def test_debian_python_gets_a_venv_and_a_link(tmp_path: pathlib.Path) -> None:
    """The plan on a stock Debian PATH: its own python3, a venv, a link (dry run)."""
    assert _externally_managed(DEBIAN_PYTHON)  # the premise: pip install is refused there
    env = _env(tmp_path, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    done = subprocess.run(
        ["bash", "scripts/install.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"python: {DEBIAN_PYTHON} " in done.stdout
    assert f"link: {tmp_path}/bin/mptcpkit -> {tmp_path}/venv/bin/mptcpkit" in done.stdout
    assert not (tmp_path / "venv").exists()
    bad = subprocess.run(["bash", "scripts/install.sh", "--bogus"], cwd=ROOT, capture_output=True)
    assert bad.returncode == 2


# In the default run: CI proves the front door with Debian's own interpreter (~10 s).
@pytest.mark.root
def test_install_with_debian_python(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path, MPTCPKIT_PYTHON=DEBIAN_PYTHON)
    done = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    command = tmp_path / "bin" / "mptcpkit"
    assert command.is_symlink() and command.resolve().parent == (tmp_path / "venv" / "bin")
    cfg = (tmp_path / "venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg  # the venv is Debian's interpreter's
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy
    shown = subprocess.run([command, "--help"], env=clean, capture_output=True, text=True)
    assert shown.returncode == 0 and "usage: mptcpkit" in shown.stdout
    checked = subprocess.run(
        [command, "check", "--json"], env=clean, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode in (0, 1), checked.stderr  # 1: MPTCP unusable here
    assert "usable" in json.loads(checked.stdout)
    where = subprocess.run(
        [tmp_path / "venv" / "bin" / "python", "-c", "import mptcpkit; print(mptcpkit.__file__)"],
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(tmp_path / "venv"))  # not this checkout, not pyenv's copy
