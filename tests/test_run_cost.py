"""What `mptcpkit run` costs before the program runs: no work that cannot pay off."""

from __future__ import annotations

import os
import select
import socket
import sys

import pytest

from mptcpkit.abi.constants import IPPROTO_MPTCP
from mptcpkit.run import abi, bpfload, fastpath, syscalls
from mptcpkit.run.options import tcp_only_options
from mptcpkit.run.supervisor import Supervisor, filter_program


def test_a_host_refusing_bpf_is_told_without_parsing_vmlinux_btf() -> None:
    """`--strategy auto` asks the BPF probe on every run; where the kernel refuses
    tracing programs the answer must come before the megabytes of BTF are parsed."""
    bpfload.probe.cache_clear()
    bpfload.hook_btf_id.cache_clear()
    try:
        reason = bpfload.probe()
        if reason is not None and "refuses" in reason:
            assert reason == "the kernel refuses tracing BPF programs (BPF_PROG_LOAD: EPERM)"
            assert bpfload.hook_btf_id.cache_info().misses == 0
        else:  # a host that may load them needs the hook's id: read once per process
            bpfload.probe.cache_clear()
            bpfload.probe()
            assert bpfload.hook_btf_id.cache_info().misses <= 1
    finally:
        bpfload.probe.cache_clear()
        bpfload.hook_btf_id.cache_clear()


PROGRAM = """
import socket
out = []
for _ in range(50):
    with socket.socket() as s:
        out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
with socket.socket(socket.AF_INET6) as s:
    out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)  # swapped: Python
    out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
print(*out)
"""


def _serve(monkeypatch: pytest.MonkeyPatch, fast: str) -> tuple[list[int], int, Supervisor]:
    """Run PROGRAM under a Supervisor driven here; returns the protocols it saw, how
    many calls reached the Python handler, and the stats."""
    monkeypatch.setenv(fastpath.ENV, fast)
    arch = abi.native_arch()
    tcp_only = tcp_only_options()
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forced child
        try:
            ours.close()
            os.close(out_r)
            listener, killable = syscalls.install_filter(filter_program(arch, None, tcp_only), arch)
            socket.send_fds(theirs, [b"K" if killable else b"L"], [listener])
            os.close(listener)
            theirs.recv(1)  # the supervisor is ready
            os.dup2(out_w, 1)
            os.execv(sys.executable, [sys.executable, "-c", PROGRAM])
        finally:
            os._exit(1)
    theirs.close()
    os.close(out_w)
    msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    sup = Supervisor(fds[0], arch, tcp_only=tcp_only, killable=msg == b"K", warn=None)
    calls = 0
    python_handle = sup.handle

    def counted(n: abi.Notification) -> None:
        nonlocal calls
        calls += n.nr in (arch.socket, arch.setsockopt)  # (exec() is trapped too)
        python_handle(n)

    monkeypatch.setattr(sup, "handle", counted)
    ours.send(b"go")
    try:
        poller = select.poll()
        poller.register(sup.fileno(), select.POLLIN)
        while True:
            events = dict(poller.poll(30_000))
            assert events, "the forced program hangs"
            if events[sup.fileno()] & select.POLLIN:
                sup.handle_one()
            else:
                break  # POLLHUP: no task uses the filter anymore
    finally:
        sup.close()
        ours.close()
        _, status = os.waitpid(pid, 0)
    with os.fdopen(out_r) as f:
        seen = [int(x) for x in f.read().split()]
    assert os.waitstatus_to_exitcode(status) == 0
    return seen, calls, sup


def _has_pidfs_ioctls() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 13)


@pytest.mark.parametrize("fast", ["1", "proc", "0"])
def test_compiled_socket_path_answers_like_python(
    monkeypatch: pytest.MonkeyPatch, fast: str
) -> None:
    """The compiled path forces plain socket() calls itself (the caller's context read
    through its pidfd, or /proc) and leaves the rest (here a TCP-only option) to
    Python; without it Python answers every call. Same sockets, same counts."""
    if fast != "0":
        assert fastpath.available(), "run/_fastpath.c is not built (setup.py build_ext)"
    seen, calls, sup = _serve(monkeypatch, fast)
    assert seen == [IPPROTO_MPTCP] * 51 + [socket.IPPROTO_TCP]
    assert sup.stats.forced == 51 and sup.stats.swapped == 1
    assert sup.stats.reasons["swapped to TCP for TCP_USER_TIMEOUT"] == 1
    if fast == "0":
        assert sup._fast is None and calls == 52
    else:
        assert sup._fast is not None and calls == 1  # only the setsockopt() reached Python
        pidfd = fast == "1" and _has_pidfs_ioctls()
        assert sup._fast.context_source() == ("pidfd" if pidfd else "proc")
