"""Which socket options make the supervisor swap an MPTCP socket for plain TCP.

The table is the core library's kernel-probed one (`mptcpkit.options.tcp_only_options`),
so forcing and the library's own sockets agree on what this kernel's MPTCP rejects:
IPV6_TCLASS, TCP_SYNCNT, IP_PKTINFO, SO_PEEK_OFF... as well as TCP_MD5SIG.

The probe costs about 6 ms, a third of what `mptcpkit run` may add to a program's
start, and its answer is the kernel's: so a complete one (IPv4 and IPv6 sockets in
every state) is kept in a file for the next runs, `tcp-only-options` in
$XDG_RUNTIME_DIR/mptcpkit (or /run/mptcpkit for root without it). The file is used
only when it names this very kernel (release, build and boot id) and this code
(the probe's and the option names' source files, by size and mtime), and only when
it and its directory belong to us and no one else may write them (a table written
by someone else could hide an option from the supervisor). Any doubt: probe again.
"""

from __future__ import annotations

import contextlib
import os

CACHE_NAME = "tcp-only-options"
CACHE_FORMAT = "1"


def tcp_only_options() -> dict[tuple[int, int], str]:
    """{(level, optname): name} for options an MPTCP socket refuses on this kernel."""
    folder = cache_dir()
    stamp = _stamp() if folder is not None else ""
    if folder is not None:
        cached = _read(os.path.join(folder, CACHE_NAME), stamp)
        if cached is not None:
            return cached
    from mptcpkit import options

    table = {key: info.name for key, info in options.tcp_only_options().items()}
    if folder is not None and options.tcp_only_options_complete():
        _write(folder, stamp, table)
    return table


def cache_dir() -> str | None:
    """Where the table is kept, or None (no private runtime directory)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private(runtime):
        return os.path.join(runtime, "mptcpkit")
    if os.geteuid() == 0:
        return "/run/mptcpkit"
    return None


def _private(path: str, *, follow: bool = True) -> bool:
    """Ours, and no one else may write it."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _stamp() -> str:
    """This kernel and this code: a table kept under another stamp is not used."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    uname = os.uname()
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "-"
    code = []
    for source in ("options.py", os.path.join("abi", "optnames.py")):
        try:
            st = os.stat(os.path.join(package, source))
        except OSError:
            return "-"  # never matches a stamp written (always with its sizes)
        code.append(f"{st.st_size}:{st.st_mtime_ns}")
    return " ".join([CACHE_FORMAT, uname.release, uname.version, boot, *code]).replace("\n", " ")


def _read(path: str, stamp: str) -> dict[tuple[int, int], str] | None:
    from mptcpkit.abi.optnames import option_name

    if not _private(os.path.dirname(path), follow=False):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        lines = f.read().splitlines()
    if not lines or lines[0] != stamp or stamp == "-":
        return None
    table = {}
    try:
        for line in lines[1:]:
            level, opt = (int(x) for x in line.split())
            table[(level, opt)] = option_name(level, opt)
    except ValueError:
        return None
    return table or None


def _write(folder: str, stamp: str, table: dict[tuple[int, int], str]) -> None:
    """Best effort: a run that cannot keep the table probes again next time."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not _private(folder, follow=False):
            return
        tmp = os.path.join(folder, f".{CACHE_NAME}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(stamp + "\n")
            f.writelines(f"{level} {opt}\n" for level, opt in sorted(table))
        os.replace(tmp, os.path.join(folder, CACHE_NAME))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
