"""Named network namespaces: enter one from a thread, run tools in one, remove them by prefix.

Entering is `mptcpkit.netns.entered` (a per-thread setns), which is what lets a test make
sockets inside a namespace while the rest of the process stays where it was.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence

from mptcpkit import netns as _core
from mptcpkit.lab import owner as _owner

NETNS_RUN_DIR = _core.NETNS_RUN_DIR
DEFAULT_PREFIX = "mptk-"
PREFIX_ENV = "MPTCPKIT_LAB_PREFIX"


class LabError(RuntimeError):
    """A lab operation failed; the message names the command, namespace and kernel's answer."""


def default_prefix() -> str:
    """The name prefix of everything the lab makes: `$MPTCPKIT_LAB_PREFIX`, else `mptk-`."""
    prefix = os.environ.get(PREFIX_ENV, "") or DEFAULT_PREFIX
    check_prefix(prefix)
    return prefix


def check_prefix(prefix: str) -> None:
    """Refuse prefixes that could match namespaces the lab did not make (or none at all)."""
    if not prefix or "/" in prefix or prefix in (".", "..") or len(prefix) > 200:
        raise ValueError(f"lab prefix {prefix!r}: must be a non-empty file name such as 'mptk-'")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the block with this thread inside `netns` (see `mptcpkit.netns.entered`), with a
    missing namespace reported as a LabError."""
    try:
        os.close(_core.open_netns(netns))
    except _core.NamespaceNotFound:
        raise LabError(f"network namespace {netns!r} does not exist") from None
    with _core.entered(netns):
        yield


def run_tool(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 60.0,
    what: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run an iproute2/sysctl tool; a failure becomes a LabError quoting its stderr."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: the lab needs iproute2 (ip, tc)") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
        where = f" ({what})" if what else ""
        raise LabError(f"{' '.join(argv)}{where} failed: {detail or f'exit {proc.returncode}'}")
    return proc


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with `prefix`."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is `netns` (what `ip netns pids` prints)."""
    proc = run_tool(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_netns_processes(netns: str) -> None:
    """SIGKILL everything still living in `netns`, so deleting it really frees it."""
    for pid in netns_pids(netns):
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_links(netns: str) -> None:
    """Delete the veth devices in `netns` (their peers go with them).

    A socket still open inside a deleted namespace keeps it alive anonymously; deleting the
    devices first means no veth outlives the lab even then.
    """
    proc = run_tool(["ip", "-n", netns, "-o", "link", "show", "type", "veth"], check=False)
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 2:
            names.append(parts[1].strip().split("@")[0])
    if names:
        run_tool(
            ["ip", "-n", netns, "-force", "-batch", "-"],
            input="".join(f"link del dev {n}\n" for n in names),
            check=False,
        )


def delete_netns(netns: str) -> None:
    """Remove `netns` and everything in it; a namespace already gone is not an error."""
    if not os.path.exists(os.path.join(NETNS_RUN_DIR, netns)):
        return
    kill_netns_processes(netns)
    delete_links(netns)
    proc = run_tool(["ip", "netns", "delete", netns], check=False)
    if proc.returncode != 0 and os.path.exists(os.path.join(NETNS_RUN_DIR, netns)):
        raise LabError(f"ip netns delete {netns} failed: {proc.stderr.strip()}")


def remove_all(prefix: str, *, running: bool = False) -> list[str]:
    """Remove the labs with this prefix that nobody runs any more; the namespaces removed.

    This is `mptcpkit lab down`: labs left up on purpose (`lab up`) and orphans whose
    creator died without cleaning up. Only namespaces a lab's marker lists are touched
    (see `mptcpkit.lab.owner`): never one made by hand that merely matches the prefix,
    and never a lab whose creator is still running, unless `running` is true.
    """
    check_prefix(prefix)
    removed = []
    errors = []
    for record in _owner.read_all(prefix):
        if record.state == _owner.RUNNING and not running:
            continue
        try:
            removed += remove_lab(record)
        except LabError as exc:
            errors.append(str(exc))
    if errors:
        raise LabError("; ".join(errors))
    return removed


def remove_lab(record: _owner.LabRecord) -> list[str]:
    """Remove the namespaces a marker lists, then the marker; the namespaces removed."""
    removed = []
    for netns in record.hosts.values():
        if os.path.exists(os.path.join(NETNS_RUN_DIR, netns)):
            delete_netns(netns)
            removed.append(netns)
    _owner.remove(record)
    return removed


def reap_orphans(prefix: str) -> list[str]:
    """Remove the labs with this prefix whose creator is gone (not detached ones)."""
    removed = []
    for record in _owner.read_all(prefix):
        if record.state == _owner.ORPHAN:
            with contextlib.suppress(LabError):
                removed += remove_lab(record)
    return removed


def is_root() -> bool:
    """Whether this process may make namespaces (root, or CAP_SYS_ADMIN+CAP_NET_ADMIN)."""
    return os.geteuid() == 0


__all__ = [
    "DEFAULT_PREFIX",
    "PREFIX_ENV",
    "LabError",
    "default_prefix",
    "delete_netns",
    "entered",
    "is_root",
    "list_netns",
    "reap_orphans",
    "remove_all",
    "remove_lab",
    "run_tool",
]
