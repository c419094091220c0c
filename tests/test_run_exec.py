"""`mptcpkit run` behaves like the program under shells and supervisors (issue 13, item 3).

CMD is exec'd in mptcpkit run's own process, as a shell's `exec` would: inherited
descriptors, signals, signal dispositions, exit status and death by a signal are the
program's own; exec errors are a shell's. Real programs throughout (sh, bash, yes,
head, timeout, sleep, id, busybox, a static Go binary).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import pytest

from mptcpkit.run import preload

RUN = [sys.executable, "-m", "mptcpkit", "run"]
PRELOAD = preload.find_library() is not None
STRATEGIES = [
    "seccomp",
    pytest.param("preload", marks=pytest.mark.skipif(not PRELOAD, reason="no libmptcpwrap")),
]


def run(strategy: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*RUN, "--strategy", strategy, "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def wait_for(path: str, proc: subprocess.Popen[bytes] | None = None) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return f.read()
        assert proc is None or proc.poll() is None, "the program ended before it was ready"
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


# --- descriptors ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inherited_descriptors_pass_through(strategy: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`mptcpkit run -- sh -c 'echo x >&3' 3>out` (was: Bad file descriptor)."""
    out = tmp_path / "out"
    cmd = f"{' '.join(RUN)} --strategy {strategy} -- sh -c 'echo through-fd3 >&3' 3>{out}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "through-fd3\n"
    # and nothing of mptcpkit's own: the same descriptors as the program run bare
    listing = "ls /proc/self/fd 4</dev/null"
    bare = subprocess.run(["bash", "-c", listing], capture_output=True, text=True)
    cmd = f"{' '.join(RUN)} --strategy {strategy} -- ls /proc/self/fd 4</dev/null"
    wrapped = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert wrapped.stdout.split() == bare.stdout.split() == ["0", "1", "2", "3", "4"]


# --- signals --------------------------------------------------------------------

COUNT_SIGINT = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *a: got.append(1))
open(sys.argv[1], "w").write(str(os.getpid()))
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1)  # a second copy would arrive right behind the first
print(len(got))
"""


def test_a_group_signal_arrives_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`kill -INT -- -PGID` reaches the program once (it was forwarded a second time)."""
    ready = str(tmp_path / "ready")
    proc = subprocess.Popen(
        [*RUN, "--", sys.executable, "-c", COUNT_SIGINT, ready],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert int(wait_for(ready, proc)) == proc.pid  # the program is the process started
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert out.split() == [b"1"]
    assert proc.returncode == 0


# Who sent each SIGINT (siginfo's si_pid), and the program's parent.
SIGINT_SENDERS = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
senders = []
info = signal.sigtimedwait({signal.SIGINT}, 60)
while info is not None:
    senders.append(info.si_pid)
    info = signal.sigtimedwait({signal.SIGINT}, 1)
print(os.getppid(), *senders)
"""


def test_timeout_int_reaches_the_program_once() -> None:
    """`timeout -s INT` signals its child and then its whole group: bare, the program
    gets one SIGINT or two (two when it runs between timeout's two kill()s), all
    from timeout. Under `mptcpkit run` the same: nothing forwards a copy (the old
    supervisor did: a SIGINT from its own pid)."""
    proc = subprocess.run(
        ["timeout", "-s", "INT", "3", *RUN, "--", sys.executable, "-c", SIGINT_SENDERS],
        capture_output=True,
        timeout=90,
    )
    parent, *senders = proc.stdout.split()
    assert senders and set(senders) == {parent}, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_death_by_a_signal_is_the_programs_own(strategy: str) -> None:
    """Killed by SIGINT, `mptcpkit run` dies of SIGINT (a shell loop stops on ^C)."""
    proc = run(strategy, "sh", "-c", "kill -INT $$; sleep 5")
    assert proc.returncode == -signal.SIGINT
    loop = subprocess.run(
        ["bash", "-c", f"{' '.join(RUN)} --strategy {strategy} -- sh -c 'kill -TERM $$'; echo $?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loop.stdout.split() == [str(128 + signal.SIGTERM)]  # what bash reports for it


def test_ctrl_c_stops_a_shell_loop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`for i in 1 2 3; do mptcpkit run -- sleep 30; done` and ^C (SIGINT to the
    foreground group): bash stops the loop only if its child died of SIGINT."""
    ready, rounds = tmp_path / "ready", tmp_path / "rounds"
    body = f"echo $i >> {rounds}; {' '.join(RUN)} -- sh -c 'echo $$ > {ready}; exec sleep 30'"
    loop = subprocess.Popen(
        ["bash", "-c", f"for i in 1 2 3; do {body}; done"], start_new_session=True
    )
    try:
        wait_for(str(ready), loop)
        os.killpg(loop.pid, signal.SIGINT)  # what the terminal does on ^C
        assert loop.wait(60) == -signal.SIGINT
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()
    assert rounds.read_text().split() == ["1"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_yes_into_head_dies_of_sigpipe(strategy: str) -> None:
    """Python ignores SIGPIPE; the program must not inherit that (was: Broken pipe, 1)."""
    cmd = f"{' '.join(RUN)} --strategy {strategy} -- yes | head -1; echo ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["y", "141"], proc.stderr
    assert "Broken pipe" not in proc.stderr


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dispositions_pass_through(strategy: str) -> None:
    """What was ignored stays ignored; what was default stays default; nothing blocked."""
    ignore = [signal.SIGHUP, signal.SIGUSR2, signal.SIGQUIT]

    def start() -> None:
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    proc = run(strategy, "sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status", preexec_fn=start)
    fields = dict(line.split(":\t") for line in proc.stdout.splitlines())
    ignored = {s for s in range(1, 64) if int(fields["SigIgn"], 16) >> (s - 1) & 1}
    assert ignored == set(ignore)  # SIGPIPE / SIGXFSZ (Python's own) are not passed on
    assert int(fields["SigBlk"], 16) == 0


def test_ignored_sigpipe_stays_ignored_for_a_systemd_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """systemd starts services with SIGPIPE ignored (IgnoreSIGPIPE=yes); the parent here
    is a shell named systemd with $INVOCATION_ID set, as a service's is."""
    fake = tmp_path / "systemd"
    shutil.copy("/bin/sh", fake)
    cmd = f"trap '' PIPE; {' '.join(RUN)} -- grep SigIgn /proc/self/status; true"
    env = {**os.environ, "INVOCATION_ID": "0123456789abcdef0123456789abcdef"}
    proc = subprocess.run([str(fake), "-c", cmd], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[1], 16) >> (signal.SIGPIPE - 1) & 1


def test_a_shells_ignored_sigpipe_stays_ignored() -> None:
    """`trap '' PIPE` in the shell: the program must get SIGPIPE ignored, as the shell
    gives its children (yes then sees EPIPE, says so and exits 1)."""
    cmd = f"trap '' PIPE; {' '.join(RUN)} -- yes | head -1; echo ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["y", "1"], proc.stderr
    assert "Broken pipe" in proc.stderr


# --- returning when CMD returns ---------------------------------------------------


def test_returns_while_a_descendant_lingers_and_still_serves_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ssh ControlPersist style: CMD forks a daemon and exits; `mptcpkit run` returns
    with CMD's status at once, and the daemon's later sockets are still forced."""
    go, out = str(tmp_path / "go"), str(tmp_path / "proto")
    code = f"""
    import os, socket, sys, time
    if os.fork() == 0:
        os.setsid()
        deadline = time.monotonic() + 120
        while not os.path.exists({go!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
        s = socket.socket()
        open({out!r}, "w").write(str(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)))
        os._exit(0)
    os._exit(3)
    """
    # stdio to files, not pipes: the daemon holds them, as ssh's master does not
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.run(
            [*RUN, "--", sys.executable, "-c", textwrap.dedent(code)],
            stdout=log,
            stderr=log,
            timeout=60,  # the daemon waits up to 120 s for the go file
        )
    assert proc.returncode == 3
    assert not os.path.exists(out)  # it really is still waiting
    open(go, "w").close()
    assert wait_for(out) == "262"


def test_stats_come_when_the_program_exits_and_stderr_is_let_go(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With pipes, the reader sees the end once CMD and its daemons close them; the
    supervisor prints --stats when CMD exits and does not hold stderr afterwards."""
    pidfile = str(tmp_path / "daemon")
    code = f"""
    import os, socket, time
    socket.socket()
    if os.fork() == 0:
        os.closerange(0, 3)
        open({pidfile!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        os._exit(0)
    """
    proc = subprocess.Popen(
        [*RUN, "--stats=json", "--", sys.executable, "-c", textwrap.dedent(code)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        _out, err = proc.communicate(timeout=45)  # the daemon lives 60 s
    finally:
        os.kill(int(wait_for(pidfile)), signal.SIGKILL)
    assert proc.returncode == 0
    assert b'"forced": 1' in err.splitlines()[-1]


# --- exec errors like a shell -------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exec_errors_like_a_shell(strategy: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "noshebang"
    script.write_text('echo "sh ran $0 $1"\n')
    script.chmod(0o755)
    proc = run(strategy, str(script), "arg")
    assert (proc.returncode, proc.stdout) == (0, f"sh ran {script} arg\n"), proc.stderr

    bad = tmp_path / "badinterp"
    bad.write_text("#!/nonexistent/interp\n")
    bad.chmod(0o755)
    proc = run(strategy, str(bad))
    assert proc.returncode == 126
    assert proc.stderr.strip() == (
        f"mptcpkit run: {bad}: /nonexistent/interp: bad interpreter: No such file or directory"
    )

    proc = run(strategy, str(tmp_path))
    assert proc.returncode == 126
    assert proc.stderr.strip() == f"mptcpkit run: {tmp_path}: Is a directory"

    plain = tmp_path / "notexec"
    plain.write_text("echo\n")
    proc = run(strategy, str(plain))
    assert proc.returncode == 126 and "Permission denied" in proc.stderr

    proc = run(strategy, "no-such-command-h13")
    assert proc.returncode == 127
    assert proc.stderr.strip() == "mptcpkit run: no-such-command-h13: command not found"


# --- privileged programs --------------------------------------------------------------


@pytest.fixture
def nobody_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mptcpkit-priv-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(argv: list[str], env_src: str) -> subprocess.CompletedProcess[str]:
    nobody = pwd.getpwnam("nobody")
    as_nobody = [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
    ]
    env = {**os.environ, "PYTHONPATH": env_src, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [*as_nobody, "/usr/bin/python3", "-m", "mptcpkit.cli.run", "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def readable_src(nobody_dir: str) -> str:
    import mptcpkit

    dest = os.path.join(nobody_dir, "src")
    shutil.copytree(
        os.path.dirname(mptcpkit.__file__),
        os.path.join(dest, "mptcpkit"),
        ignore=shutil.ignore_patterns("__pycache__", "*.so"),
    )
    for folder, _, files in os.walk(dest):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return dest


@pytest.mark.root
def test_setuid_program_runs_unforced_with_a_warning(nobody_dir: str, readable_src: str) -> None:
    """Under no_new_privs a setuid program would start as the caller: it is left unforced."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 for the unprivileged user")
    prog = os.path.join(nobody_dir, "id")
    shutil.copy("/usr/bin/id", prog)
    os.chmod(prog, 0o4755)  # setuid root
    proc = _as_nobody([prog, "-u"], readable_src)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]  # it really ran with its privilege
    assert "setuid" in proc.stderr and "runs unforced" in proc.stderr


@pytest.mark.root
def test_file_capability_program_is_detected(nobody_dir: str, readable_src: str) -> None:
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 for the unprivileged user")
    prog = os.path.join(nobody_dir, "grep")
    shutil.copy(shutil.which("grep") or "/bin/grep", prog)
    # what `setcap cap_net_raw+ep` writes: struct vfs_cap_data, revision 2, effective
    caps = struct.pack("<IIIII", 0x02000000 | 1, 1 << 13, 0, 0, 0)
    os.setxattr(prog, "security.capability", caps)
    proc = _as_nobody([prog, "CapEff", "/proc/self/status"], readable_src)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[1], 16) == 1 << 13  # CAP_NET_RAW kept
    assert "file capabilities" in proc.stderr and "runs unforced" in proc.stderr


@pytest.mark.root
def test_a_privileged_program_exec_by_cmd_is_reported(nobody_dir: str) -> None:
    """CMD is a shell that runs a setuid program: forced, it starts without its
    privilege (no_new_privs), and the supervisor says so, naming it."""
    nobody = pwd.getpwnam("nobody")
    prog = os.path.join(nobody_dir, "id")
    shutil.copy("/usr/bin/id", prog)
    os.chown(prog, nobody.pw_uid, nobody.pw_gid)
    os.chmod(prog, 0o4755)  # setuid nobody: root running it would become nobody
    proc = subprocess.run(
        [*RUN, "--", "sh", "-c", f"cd {nobody_dir} && ./id -u"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]  # no_new_privs: the setuid bit did nothing
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, proc.stderr
    assert "id is setuid (owner uid" in warnings[0] and "without its privileges" in warnings[0]


# --- preload on what it cannot reach ----------------------------------------------------


@pytest.mark.skipif(
    not PRELOAD or shutil.which("busybox") is None, reason="needs busybox, libmptcpwrap"
)
def test_preload_on_a_static_binary_says_so() -> None:
    proc = run("preload", "busybox", "true")
    assert proc.returncode == 0
    assert "statically linked" in proc.stderr and "--strategy seccomp" in proc.stderr
