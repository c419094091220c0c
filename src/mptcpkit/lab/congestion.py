"""TCP congestion control for the lab's sockets: choose it per socket, read it back.

A namespace inherits the host's default algorithm (`net.ipv4.tcp_congestion_control`),
and a non-initial namespace may not make a "restricted" one its default: only those in
`tcp_allowed_congestion_control` are open to everyone. A process with CAP_NET_ADMIN may
still set any available algorithm per socket (TCP_CONGESTION, what `iperf3 -C` does); on
an MPTCP socket it applies to every subflow, and a listener's choice to the sockets it
accepts. `check` asks the kernel the same question on a throwaway socket in the
caller's namespace, so a bad name is refused before any namespace is built.
"""

from __future__ import annotations

import errno
import socket

from mptcpkit.abi.constants import TCP_CONGESTION

AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"
ALLOWED = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
NAME_MAX = 15  # TCP_CA_NAME_MAX (16) less the NUL: the kernel truncates longer names


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def available() -> list[str]:
    """The algorithms this kernel has (built in or loaded)."""
    return _read(AVAILABLE).split()


def _error(name: str, exc: OSError) -> ValueError:
    if exc.errno == errno.ENOENT:
        return ValueError(
            f"congestion control {name!r}: not available on this kernel "
            f"({AVAILABLE}: {_read(AVAILABLE)})"
        )
    if exc.errno == errno.EPERM:
        return ValueError(
            f"congestion control {name!r}: restricted (not in {ALLOWED}: {_read(ALLOWED)}); "
            "setting it per socket needs CAP_NET_ADMIN: run as root"
        )
    return ValueError(f"congestion control {name!r}: {exc.strerror or exc}")


def choose(sock: socket.socket, name: str) -> None:
    """Set `sock`'s algorithm to `name` (before connect or listen); ValueError if refused."""
    if not name or len(name) > NAME_MAX or not name.isprintable() or " " in name:
        raise ValueError(
            f"congestion control {name!r}: expected a name of 1 to {NAME_MAX} characters "
            f"({AVAILABLE}: {_read(AVAILABLE)})"
        )
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, name.encode())
    except OSError as exc:
        raise _error(name, exc) from None
    got = of(sock)
    if got != name:
        raise ValueError(f"congestion control {name!r}: the socket reports {got!r}")


def of(sock: socket.socket) -> str | None:
    """`sock`'s algorithm, or None when it cannot be read (a closed socket)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, NAME_MAX + 1)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def check(name: str) -> None:
    """Raise ValueError, naming `name` and what is available, unless a socket created
    here may use it. Nothing is changed: the probe is a TCP socket that never connects."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        choose(probe, name)


__all__ = ["ALLOWED", "AVAILABLE", "available", "check", "choose", "of"]
