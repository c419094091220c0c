"""The compiled background supervisor (`run/_supervise`), against the Python one.

The program answers the common calls without an interpreter and execs the Python
supervisor, in its own process, for the first call it cannot answer: the same
sockets, the same repairs, the same counts either way.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from mptcpkit.run import abi, bpf, supervise
from mptcpkit.run.options import tcp_only_options

RUN = [sys.executable, "-m", "mptcpkit", "run"]

# The program's supervisor: the process holding a pidfd of this program.
SUPERVISOR_OF = r"""
import os
def supervisor():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"Pid:\t{os.getpid()}\n" in "".join(
                open(f"/proc/{pid}/fdinfo/{fd}").read() for fd in os.listdir(f"/proc/{pid}/fd")
            ) and open(f"/proc/{pid}/comm").read().strip() == "mptcpkit-run":
                return int(pid)
        except OSError:
            continue
"""

# Which program serves us: `_supervise`, then (the same process) Python once a
# TCP-only option needs a swap. Then MPTCP sockets, the repair of the program's own
# MPTCP listener (TCP_MD5SIG, Go issue 74643's case) and a thread's socket().
PROGRAM = (
    SUPERVISOR_OF
    + r"""
import os, socket, struct, threading
def exe(pid):
    return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
out = []
s = socket.socket()
out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
first = supervisor()
out.append(exe(first))
t = threading.Thread(target=lambda: out.append(socket.socket(socket.AF_INET6).getsockopt(1, 38)))
t.start(); t.join()
own = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)  # MPTCP asked for: not forced
own.bind(("127.0.0.1", 0)); own.listen()
key = struct.pack("=HH4s120x", socket.AF_INET, 0, socket.inet_aton("127.0.0.1"))
key = key[:128] + struct.pack("=BBHI80s", 0, 0, 4, 0, b"key!".ljust(80, b"\0"))
own.setsockopt(socket.IPPROTO_TCP, 14, key)  # TCP_MD5SIG: only plain TCP takes it
out.append(own.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
out.append(supervisor() == first)
out.append(exe(first).startswith("python"))
print(*out)
"""
)


def run(fastpath: str) -> tuple[list[str], dict[str, object]]:
    env = {**os.environ, supervise.FASTPATH_ENV: fastpath}
    proc = subprocess.run(
        [*RUN, "--stats=json", "--", sys.executable, "-c", PROGRAM],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    return proc.stdout.decode().split(), stats


def test_compiled_supervisor_answers_like_python() -> None:
    """socket() answered by the program, the TCP_MD5SIG repair by Python after the
    hand-over (same process), the counts carried over: as the Python supervisor."""
    assert supervise.executable(), "run/_supervise is not built (setup.py build_ext)"
    compiled, stats_c = run("1")
    python, stats_p = run("0")
    assert compiled[:2] == ["262", "_supervise"]
    assert python[1].startswith("python")  # the Python supervisor from the start
    assert compiled[2:] == ["262", "6", "True", "True"]  # thread: MPTCP; repaired: TCP
    assert python[2:] == compiled[2:]
    assert stats_c == stats_p
    assert stats_c["forced"] == 2 and stats_c["repaired"] == 1


def test_tcp_only_table_passes_through_the_program() -> None:
    table = tcp_only_options()
    assert supervise.decode_tcp_only(supervise.encode_tcp_only(table)) == table
    assert supervise.decode_tcp_only("") == {}


CLONE_NEWNET = 0x40000000
IN_NEW_NETNS = r"""
import ctypes, fcntl, os, socket
SIOCGSKNS = 0x894C
def netns_of(s):
    fd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)
a = socket.socket()  # forced; this thread's namespace is now known to the supervisor
assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0, ctypes.get_errno()
b = socket.socket()  # in the new namespace: made there, not in the supervisor's
here = os.stat("/proc/thread-self/ns/net").st_ino
print(a.getsockopt(1, 38), netns_of(a) != here, b.getsockopt(1, 38), netns_of(b) == here)
"""


@pytest.mark.root
def test_a_thread_that_moves_to_another_namespace_gets_its_sockets_there() -> None:
    """The compiled path reads a caller's namespace once and trusts it until the
    caller may have moved: unshare()/setns() are trapped and make it read again."""
    proc = subprocess.run(
        [*RUN, "--stats=json", "--", sys.executable, "-c", textwrap.dedent(IN_NEW_NETNS)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"262", b"True", b"262", b"True"]


def test_the_filter_reports_namespace_changes_of_every_abi() -> None:
    """setns() and unshare(), native, x32 and 32-bit, reach the supervisor."""
    arch = abi.X86_64
    prog = bpf.filter_program(arch, None, {})
    cases = [
        (arch.audit_arch, arch.setns),
        (arch.audit_arch, arch.unshare),
        (arch.audit_arch, abi.X32_SYSCALL_BIT | arch.setns),
        (arch.audit_arch, abi.X32_SYSCALL_BIT | arch.unshare),
        *((abi.AUDIT_ARCH_I386, nr) for nr in arch.compat_ns or ()),
    ]
    for audit, nr in cases:
        data = bpf.seccomp_data(nr, audit, [CLONE_NEWNET])
        assert bpf.run_filter(prog, data) == abi.SECCOMP_RET_USER_NOTIF, (hex(audit), nr)
    getppid = bpf.seccomp_data(110, arch.audit_arch)
    assert bpf.run_filter(prog, getppid) == abi.SECCOMP_RET_ALLOW


def test_without_its_interpreter_the_compiled_supervisor_says_so_and_goes_on(
    tmp_path: pathlib.Path,
) -> None:
    """The Python supervisor cannot be started (its interpreter went away): the
    compiled one says so once, lets the calls it cannot decide go ahead unchanged,
    and still forces what it can."""
    python = tmp_path / "python3"
    python.symlink_to(sys.executable)
    gone = tmp_path / "gone"
    code = textwrap.dedent(
        f"""
        import os, socket, time
        while os.path.exists({str(python)!r}):
            time.sleep(0.01)
        s = socket.socket()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)  # for Python
        except OSError as exc:
            print(exc.errno)  # as without mptcpkit run on an MPTCP socket
        print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
        print(socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
        """
    )
    proc = subprocess.Popen(
        [str(python), "-m", "mptcpkit", "run", "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    python.rename(gone)  # (the running interpreter is not affected: only a new exec)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # not swapped (no Python): the option is refused as MPTCP refuses it; still forced
    assert out.split() == [str(errno.ENOPROTOOPT).encode(), b"262", b"262"]
    assert err.decode().count("cannot start the Python supervisor") == 1, err


HELD = r"""
import os, sys
handed = os.readlink(f"/proc/self/fd/{sys.argv[1]}")
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        continue
    if any(f"Pid:\t{os.getpid()}\n" in open(f"/proc/{pid}/fdinfo/{fd}").read()
           for fd, what in fds.items() if what == "anon_inode:[pidfd]"):
        print(handed.startswith("pipe:"), handed in fds.values())
"""


def test_the_supervisor_holds_none_of_the_programs_descriptors() -> None:
    """A pipe handed to the program (socket activation's listeners alike) is not held
    by the supervisor, whose life may be a daemon's: its reader sees the end when the
    program's side is closed."""
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            [*RUN, "--", sys.executable, "-c", HELD, str(w)],
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=(w,),
        )
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


# The program's watcher thread interrupts the main thread with SIGUSR1 until it has
# seen the program's exit (--stats); one that lands while the main thread is in
# execve() stays pending across it, and exec resets a caught signal to its default
# action: termination. The Python supervisor must not die of it (the calls then pending
# fail with ENOSYS, later ones too, and --stats is never printed).
AFTER_SIGUSR1 = PROGRAM.replace(
    "print(*out)",
    """\
sup = supervisor()
os.kill(sup, 10)  # SIGUSR1, as the watcher sends it
try:
    out.append(socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
except OSError as exc:
    out.append(exc.errno)
print(*out)
""",
)


def test_the_python_supervisor_outlives_a_late_sigusr1_from_the_program() -> None:
    assert supervise.executable(), "run/_supervise is not built (setup.py build_ext)"
    proc = subprocess.run(
        [*RUN, "--stats=json", "--", sys.executable, "-c", AFTER_SIGUSR1],
        capture_output=True,
        timeout=60,
        env={**os.environ, supervise.FASTPATH_ENV: "1"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode().split()
    assert out[4] == "True", out  # Python took over, in the program's process
    assert out[-1] == "262", out  # and still answers: the socket was forced
    stats = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert stats["forced"] == 3 and stats["repaired"] == 1


# Where the supervisor sits: its own process group (the terminal's ^C, ^Z and a
# `kill -- -PGID` of the program's group never reach it) in the program's session.
# A session of its own is a scheduler autogroup of its own, and a trapped thread's
# hand-off to a supervisor of another autogroup is not synchronous any more: the
# kernel then wakes each side on the other CPU, about 3x the cost of every socket().
SESSION = (
    SUPERVISOR_OF
    + r"""
import os, socket
s = socket.socket()
sup = supervisor()
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL), os.getsid(sup) == os.getsid(0),
      os.getpgid(sup) == sup, os.getpgid(sup) != os.getpgid(0))
"""
)


@pytest.mark.parametrize("fastpath", ["1", "0"], ids=["compiled", "python"])
def test_the_supervisor_has_its_own_process_group_in_the_programs_session(
    fastpath: str,
) -> None:
    env = {**os.environ, supervise.FASTPATH_ENV: fastpath}
    proc = subprocess.run(
        [*RUN, "--", sys.executable, "-c", SESSION],
        capture_output=True,
        timeout=60,
        env=env,
        start_new_session=True,  # as a shell's job: the program leads its process group
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["262", "True", "True", "True"]
