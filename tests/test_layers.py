"""The import graph of mptcpkit has no cycle and follows the layers of CONTRIBUTING.md.

Every import counts: at module level, inside functions, under `if TYPE_CHECKING:` (a
type that must be named from below is a Protocol in the lower module, as
`proxy/datapath.py` does for the data path). A new module must be placed in a layer
here and in CONTRIBUTING.md's table; the test says so when one is missing.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator, Mapping

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"

# Bottom to top; a module may import its own layer and those below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernel ABI", ("mptcpkit.abi",)),
    (
        "sockets",
        (
            "mptcpkit",  # the package itself: the socket layer's facade
            "mptcpkit._libc",
            "mptcpkit.errors",
            "mptcpkit.support",
            "mptcpkit.policy",
            "mptcpkit.sockets",
            "mptcpkit.status",
            "mptcpkit.introspect",
            "mptcpkit.options",
            "mptcpkit.intercept",
            "mptcpkit.downgrade",
            "mptcpkit.handover",
            "mptcpkit.netns",
        ),
    ),
    ("addresses", ("mptcpkit.address",)),
    ("asyncio", ("mptcpkit.aio",)),
    ("applications", ("mptcpkit.lab", "mptcpkit.proxy", "mptcpkit.run", "mptcpkit.pm")),
    ("CLI", ("mptcpkit.cli", "mptcpkit.__main__")),
]
APPLICATIONS = ("mptcpkit.lab", "mptcpkit.proxy", "mptcpkit.run", "mptcpkit.pm")

# Within mptcpkit.proxy, bottom to top (HAProxy keeps raw_sock/connection below stream).
PROXY_LADDER: list[tuple[str, tuple[str, ...]]] = [
    (
        "config",
        (
            "config",
            "configmodel",
            "configread",
            "configfrontend",
            "configrules",
            "configbackend",
            "logging",
            "proxyproto",
            "convertproto",
            "destpolicy",
            "acl",
            "clienthello",
        ),
    ),
    ("balancing/health", ("balance", "timeouts", "retry", "queue", "abuse", "slowstart")),
    (
        "data path",
        (
            "poller",
            "datapath",
            "legstate",
            "convertdecide",
            "source",
            "router",
            "relay",
            "frontend",
            "_engine",
            "compiled",
            "converter",
            "compiledconvert",
        ),
    ),
    ("worker runtime", ("runtime", "metrics", "control", "health", "resolvers")),
    (
        "master",
        (
            "master",
            "workerproc",
            "checkerproc",
            "stopping",
            "reloadable",
            "prepare",
            "listeners",
            "ctlserver",
            "metricsd",
            "privileges",
        ),
    ),
]
# mptcpkit.cli.proxy is the CLI rung: the CLI layer above covers it.

# The package's lazy names (PEP 562 __getattr__) are listed under TYPE_CHECKING for
# type checkers; they are loaded on first use, by whoever uses them.
FACADE = "mptcpkit"


def modules(src: pathlib.Path) -> dict[str, pathlib.Path | None]:
    """Every module of mptcpkit: name -> source (None for a C extension)."""
    found: dict[str, pathlib.Path | None] = {}
    for path in sorted((src / "mptcpkit").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    for path in sorted((src / "mptcpkit").rglob("*.c")):
        found.setdefault(".".join(path.relative_to(src).with_suffix("").parts), None)
    return found


def _in_type_checking(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:`."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                inside.update(id(n) for n in ast.walk(stmt))
    return inside


def imports(
    name: str, source: str, is_package: bool, known: Mapping[str, object]
) -> Iterator[tuple[str, int, bool]]:
    """(imported mptcpkit module, line, under TYPE_CHECKING) for every import in
    `source`, wherever it is in the file."""
    tree = ast.parse(source)
    typing_only = _in_type_checking(tree)
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                for a in node.names
            ]
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]  # `import a.b.c` of a name in a.b
            if target in known and target != name:
                yield target, node.lineno, id(node) in typing_only


def graph(src: pathlib.Path) -> dict[str, list[tuple[str, int, bool]]]:
    known = modules(src)
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in known.items():
        if path is None:
            edges[name] = []
            continue
        edges[name] = sorted(
            set(imports(name, path.read_text(), path.name == "__init__.py", known))
        )
    return edges


def find_cycle(edges: Mapping[str, list[tuple[str, int, bool]]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target, _, _ in edges.get(node, ()):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _rank(module: str, ladder: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """The rung of `module` by its longest listed prefix."""
    best: tuple[int, int] | None = None  # (prefix length, rung)
    for rung, (_, names) in enumerate(ladder):
        for prefix in names:
            # "mptcpkit" (the facade) is itself only, not the packages below it
            covers = module.startswith(prefix + ".") and prefix != FACADE
            if (module == prefix or covers) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rung)
    return None if best is None else best[1]


def _app(module: str) -> str | None:
    return next((a for a in APPLICATIONS if module == a or module.startswith(a + ".")), None)


def violations(edges: Mapping[str, list[tuple[str, int, bool]]]) -> list[str]:
    """Every import that goes up a layer (or the proxy's ladder), or across applications."""
    proxy_ladder = [(n, tuple(f"mptcpkit.proxy.{m}" for m in ms)) for n, ms in PROXY_LADDER]
    found: list[str] = []
    for module, targets in sorted(edges.items()):
        mine = _rank(module, LAYERS)
        if mine is None:
            found.append(f"{module}: in no layer (add it to LAYERS and CONTRIBUTING.md)")
            continue
        in_proxy = module.startswith("mptcpkit.proxy.")
        my_rung = _rank(module, proxy_ladder) if in_proxy else None
        if in_proxy and my_rung is None:
            found.append(
                f"{module}: on no rung of the proxy's ladder"
                " (add it to PROXY_LADDER and CONTRIBUTING.md)"
            )
        for target, line, typing_only in targets:
            if module == FACADE and typing_only:
                continue
            theirs = _rank(target, LAYERS)
            where = f"{module}:{line} imports {target}"
            if theirs is not None and theirs > mine:
                found.append(f"{where}: up from {LAYERS[mine][0]} to {LAYERS[theirs][0]}")
            app, other = _app(module), _app(target)
            if app is not None and other is not None and app != other:
                found.append(f"{where}: one application importing another")
            if my_rung is not None and target.startswith("mptcpkit.proxy."):
                rung = _rank(target, proxy_ladder)
                if rung is not None and rung > my_rung:
                    found.append(
                        f"{where}: up the proxy's ladder from {PROXY_LADDER[my_rung][0]}"
                        f" to {PROXY_LADDER[rung][0]}"
                    )
    return found


def test_no_import_cycle() -> None:
    assert find_cycle(graph(SRC)) is None, " -> ".join(find_cycle(graph(SRC)) or ())


def test_imports_only_go_down_the_layers() -> None:
    assert violations(graph(SRC)) == []


def test_every_proxy_module_is_on_the_ladder() -> None:
    listed = {f"mptcpkit.proxy.{m}" for _, ms in PROXY_LADDER for m in ms}
    present = {m for m in modules(SRC) if m.startswith("mptcpkit.proxy.")}
    assert present - listed == set()
    assert listed - present == set(), "listed in PROXY_LADDER but gone"


# --- the checker itself, on made-up packages ----------------------------------------


def _tree(tmp: pathlib.Path, files: Mapping[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = tmp / "mptcpkit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


@pytest.mark.parametrize(
    "relay_import",
    [
        "from mptcpkit.proxy.runtime import Runtime\n",
        "def f():\n    from mptcpkit.proxy import runtime\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .runtime import X\n",
    ],
    ids=["module level", "in a function", "type checking"],
)
def test_checker_finds_a_cycle_and_a_step_up_wherever_the_import_is(
    tmp_path: pathlib.Path, relay_import: str
) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "proxy/__init__.py": "",
            "proxy/relay.py": relay_import,
            "proxy/runtime.py": "import mptcpkit.proxy.relay\n",
        },
    )
    edges = graph(src)
    assert find_cycle(edges) in (
        ["mptcpkit.proxy.relay", "mptcpkit.proxy.runtime", "mptcpkit.proxy.relay"],
        ["mptcpkit.proxy.runtime", "mptcpkit.proxy.relay", "mptcpkit.proxy.runtime"],
    )
    assert any(
        v.startswith("mptcpkit.proxy.relay:") and "up the proxy's ladder from data path" in v
        for v in violations(edges)
    )


def test_checker_finds_layer_and_application_crossings(tmp_path: pathlib.Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "sockets.py": "from mptcpkit import aio\n",
            "aio.py": "",
            "run/__init__.py": "from mptcpkit.lab import topology\n",
            "lab/__init__.py": "",
            "lab/topology.py": "",
            "shiny.py": "",
        },
    )
    edges = graph(src)
    assert find_cycle(edges) is None
    found = violations(edges)
    assert "mptcpkit.sockets:1 imports mptcpkit.aio: up from sockets to asyncio" in found
    assert (
        "mptcpkit.run:1 imports mptcpkit.lab.topology: one application importing another" in found
    )
    assert "mptcpkit.shiny: in no layer (add it to LAYERS and CONTRIBUTING.md)" in found
