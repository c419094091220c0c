"""`mptcpkit run --systemd-dropin`: the drop-in as systemd reads it, and the wrapped
ExecStart run under the conditions systemd gives it.

There is no systemd as PID 1 here. Each unit type is checked twice: systemd's own
parser (`systemd-analyze verify --root`, whose debug dump shows the effective
ExecStart= and NotifyAccess=) reads the unit with our drop-in, and the wrapped command
runs as systemd would start it: with a PIDFile (haproxy -D), NOTIFY_SOCKET from a test
listener judged by systemd's NotifyAccess= rule, and real socket activation
(`systemd-socket-activate`), with libsystemd in the program (sd_notify, sd_listen_fds,
sd_watchdog_enabled) deciding whether it got what systemd meant for it.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mptcpkit
from mptcpkit.run import systemd

RUNNER = [sys.executable, "-m", "mptcpkit"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
IPPROTO_MPTCP = 262
SO_PROTOCOL = 38

# --- parsing ---------------------------------------------------------------------


def test_exec_starts_resets_and_continuations() -> None:
    unit = "[Unit]\nExecStart=/not/service\n[Service]\nExecStart=/a b\\\n  c\nExecStart=/d\n"
    dropin = "[Service]\nExecStart=\nExecStart=/e\n"
    assert systemd.exec_starts([unit]) == ["/a b c", "/d"]
    assert systemd.exec_starts([unit, dropin]) == ["/e"]
    assert systemd.service_setting([unit, "[Service]\nType=notify\n"], "Type") == "notify"
    assert systemd.service_setting(["[Service]\nType=notify\nType=\n"], "Type") is None


@given(
    st.lists(
        st.text(
            st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="\\#;[=\"'"),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_wrap_keeps_the_command_and_prefix(words: list[str]) -> None:
    command = "/usr/bin/" + " ".join(words).lstrip("-:+!@")
    line = systemd.wrap("-" + command, ["/usr/bin/mptcpkit"], ["--only", "listen"])
    assert line == "-/usr/bin/mptcpkit run --only listen -- " + command
    assert systemd.exec_starts([f"[Service]\nExecStart={line}\n"]) == [line]


def test_wrap_refuses_custom_argv0() -> None:
    with pytest.raises(systemd.UnitError, match="'@'"):
        systemd.wrap("@/bin/sh sh -c true", ["m"], [])


def test_split_systemctl_cat_keeps_order_and_knows_our_dropins() -> None:
    out = (
        "# /lib/systemd/system/x.service\n[Service]\nExecStart=/x\n\n"
        "# /etc/systemd/system/x.service.d/override.conf\n[Service]\nEnvironment=A=1\n"
        "# /etc/systemd/system/x.service.d/zz-mptcpkit.conf\n"
        f"{systemd.HEADER} x.service`\n[Service]\nExecStart=\nExecStart=/w /x\n"
    )
    files = systemd.split_systemctl_cat(out)
    assert [f.name for f in files] == ["x.service", "override.conf", "zz-mptcpkit.conf"]
    assert [f.ours() for f in files] == [False, False, True]
    assert systemd.exec_starts([f.text for f in files if not f.ours()]) == ["/x"]


def test_dropin_directories_systemd_reads() -> None:
    assert systemd._dropin_dirs("getty@tty1.service") == [
        "getty@tty1.service.d",
        "getty@.service.d",
        "service.d",
    ]
    assert systemd._dropin_dirs("a-b-c.service") == [
        "a-b-c.service.d",
        "a-b-.service.d",
        "a-.service.d",
        "service.d",
    ]


# --- writing and removing ----------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(systemd, "runner", lambda: RUNNER)
    return RUNNER


def unit(root: pathlib.Path, name: str, service: str, *, where: str = "lib/systemd/system") -> None:
    path = root / where / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[Unit]\nDefaultDependencies=no\n[Service]\n{textwrap.dedent(service)}")


def dropin(root: pathlib.Path, name: str) -> pathlib.Path:
    return root / "etc/systemd/system" / f"{name}.service.d" / systemd.DROPIN_NAME


def test_dropin_write_and_remove(tmp_path: pathlib.Path, runner: list[str]) -> None:
    unit(tmp_path, "web.service", "ExecStart=/usr/bin/web --port 80\n")
    before = (tmp_path / "lib/systemd/system/web.service").read_text()
    plan = systemd.write_dropin("web", ["--only", "listen"], root=str(tmp_path))
    assert plan.path == str(dropin(tmp_path, "web"))
    text = dropin(tmp_path, "web").read_text()
    assert "ExecStart=\n" in text
    assert systemd.exec_starts([text]) == [
        shlex.join([*runner, "run", "--only", "listen", "--"]) + " /usr/bin/web --port 80"
    ]
    # written again: still wraps the unit's own command, not our earlier drop-in
    systemd.write_dropin("web", [], root=str(tmp_path))
    assert systemd.exec_starts([dropin(tmp_path, "web").read_text()])[-1].endswith(
        "run -- /usr/bin/web --port 80"
    )
    assert (tmp_path / "lib/systemd/system/web.service").read_text() == before
    assert systemd.remove_dropin("web", root=str(tmp_path)) == plan.path
    assert not dropin(tmp_path, "web").parent.exists()  # we made it, it was left empty
    assert systemd.remove_dropin("web", root=str(tmp_path)) is None
    with pytest.raises(systemd.UnitError, match="not found"):
        systemd.write_dropin("missing", [], root=str(tmp_path))


def test_remove_leaves_a_directory_that_was_there(
    tmp_path: pathlib.Path, runner: list[str]
) -> None:
    unit(tmp_path, "web.service", "ExecStart=/usr/bin/web\n")
    folder = dropin(tmp_path, "web").parent
    folder.mkdir(parents=True)  # pre-existing and empty
    systemd.write_dropin("web", [], root=str(tmp_path))
    systemd.write_dropin("web", [], root=str(tmp_path))  # rewriting keeps knowing
    assert systemd.remove_dropin("web", root=str(tmp_path)) is not None
    assert folder.is_dir()


def test_the_earlier_dropin_name_is_replaced(tmp_path: pathlib.Path, runner: list[str]) -> None:
    unit(tmp_path, "web.service", "ExecStart=/usr/bin/web\n")
    old = dropin(tmp_path, "web").parent / "mptcpkit.conf"
    old.parent.mkdir(parents=True)
    old.write_text(
        f"{systemd.HEADER} web`\n[Service]\nExecStart=\nExecStart=/x run -- /usr/bin/web\n"
    )
    systemd.write_dropin("web", [], root=str(tmp_path))
    assert not old.exists()
    assert systemd.exec_starts([dropin(tmp_path, "web").read_text()])[-1].endswith(
        "-- /usr/bin/web"
    )


def test_a_later_dropin_setting_execstart_is_refused(
    tmp_path: pathlib.Path, runner: list[str]
) -> None:
    unit(tmp_path, "web.service", "ExecStart=/usr/bin/web\n")
    later = tmp_path / "run/systemd/system/web.service.d/zzz-local.conf"
    later.parent.mkdir(parents=True)
    later.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/web --other\n")
    with pytest.raises(systemd.UnitError, match=r"zzz-local\.conf sets ExecStart="):
        systemd.write_dropin("web", [], root=str(tmp_path))
    assert not dropin(tmp_path, "web").exists()
    later.write_text("[Service]\nEnvironment=A=1\n")  # anything else is fine
    systemd.write_dropin("web", [], root=str(tmp_path))


# --- systemd's own reading (systemd-analyze verify --root) -------------------------


def verify(root: pathlib.Path, name: str, runner: list[str]) -> str:
    """`systemd-analyze verify --root` of `name`: its debug dump of the unit as systemd
    loaded it. Fails on any complaint about the unit's files or commands."""
    for exe in {runner[0], *(_exe(c) for c in _exec_lines(root, name))}:
        path = root / exe.lstrip("/")  # verify checks the commands exist under root
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#!/bin/sh\n")
            path.chmod(0o755)
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", name],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug", "SYSTEMD_LOG_COLOR": "0"},
        timeout=60,
    )
    dump = proc.stdout + proc.stderr
    complaints = [
        line
        for line in dump.splitlines()
        if str(root) in line and re.search(r":\d+: |not executable|Failed", line)
    ]
    assert proc.returncode == 0 and not complaints, dump[-3000:]
    return dump[dump.index(f"-> Unit {name}:") :]


def analyze(root: pathlib.Path, name: str, runner: list[str]) -> dict[str, object]:
    """systemd's effective view of service `name` under `root`: ExecStart lines,
    settings, drop-in paths in the order applied."""
    block = verify(root, name, runner)
    commands = block[block.index("-> ExecStart:") :].split("-> ")[1]
    return {
        "dropins": re.findall(r"DropIn Path: (\S+)", block),
        "exec": re.findall(r"\n\s+Command Line: (.*)", commands),
        "NotifyAccess": re.search(r"NotifyAccess: (\S+)", block).group(1),  # type: ignore[union-attr]
        "Type": re.search(r"\n\s+Type: (\S+)", block).group(1),  # type: ignore[union-attr]
    }


def _exec_lines(root: pathlib.Path, name: str) -> list[str]:
    files = systemd._read_files(name, str(root))
    return systemd.exec_starts([f.text for f in files])


def _exe(command: str) -> str:
    return shlex.split(command.lstrip("-:+!"))[0]


def wrapped_argv(root: pathlib.Path, name: str) -> list[list[str]]:
    """The drop-in's ExecStart lines as argv, as systemd would exec them."""
    text = (root / "etc/systemd/system" / f"{name}.d" / systemd.DROPIN_NAME).read_text()
    return [shlex.split(c.lstrip("-:+!")) for c in systemd.exec_starts([text])]


UNITS = {
    "simple": "ExecStart=/usr/bin/web --port 80\n",
    "exec": "Type=exec\nExecStart=-/usr/bin/web --port 80\n",
    "forking": "Type=forking\nPIDFile=/run/web.pid\nExecStart=/usr/sbin/web -D\n",
    "notify": "Type=notify\nExecStart=/usr/bin/web\nWatchdogSec=30\n",
    "oneshot": "Type=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/a 1\nExecStart=/bin/b 2\n",
}


@needs_analyze
@pytest.mark.parametrize("kind", sorted(UNITS))
def test_systemd_reads_the_wrapped_unit(
    kind: str, tmp_path: pathlib.Path, runner: list[str]
) -> None:
    unit(tmp_path, "web.service", UNITS[kind])
    # what `systemctl edit` writes: sorts before ours, its ExecStart is the one wrapped
    override = tmp_path / "etc/systemd/system/web.service.d/override.conf"
    override.parent.mkdir(parents=True)
    override.write_text("[Service]\nEnvironment=EDITED=1\n")
    original = _exec_lines(tmp_path, "web.service")
    systemd.write_dropin("web", [], root=str(tmp_path))
    seen = analyze(tmp_path, "web.service", runner)
    assert seen["Type"] == kind
    assert [str(p).rsplit("/", 1)[1] for p in seen["dropins"]] == [  # type: ignore[union-attr]
        "override.conf",
        systemd.DROPIN_NAME,
    ]
    prefix = " ".join([*runner, "run", "--"])
    assert seen["exec"] == [f"{prefix} {c.lstrip('-')}" for c in original]
    # the program is the main process itself (mptcpkit run execs it): nothing to widen
    assert seen["NotifyAccess"] == ("main" if kind == "notify" else "none")


@needs_analyze
def test_an_override_execstart_is_wrapped_not_bypassed(
    tmp_path: pathlib.Path, runner: list[str]
) -> None:
    """The issue: `systemctl edit`'s override.conf sorted after mptcpkit.conf and won."""
    unit(tmp_path, "web.service", "ExecStart=/usr/bin/web\n")
    override = tmp_path / "etc/systemd/system/web.service.d/override.conf"
    override.parent.mkdir(parents=True)
    override.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/web --edited\n")
    systemd.write_dropin("web", [], root=str(tmp_path))
    seen = analyze(tmp_path, "web.service", runner)
    assert seen["exec"] == [" ".join([*runner, "run", "--", "/usr/bin/web --edited"])]


@needs_analyze
def test_socket_activated_unit(tmp_path: pathlib.Path, runner: list[str]) -> None:
    unit(tmp_path, "echo.service", "ExecStart=/usr/bin/echod\n")
    sock = tmp_path / "lib/systemd/system/echo.socket"
    sock.write_text("[Unit]\nDefaultDependencies=no\n[Socket]\nListenStream=127.0.0.1:7\n")
    plan = systemd.write_dropin("echo", [], root=str(tmp_path))
    assert any("SocketProtocol=mptcp" in n for n in plan.notes)
    seen = analyze(tmp_path, "echo.service", runner)
    assert seen["exec"] == [" ".join([*runner, "run", "--", "/usr/bin/echod"])]
    assert "Triggers: echo.service" in verify(tmp_path, "echo.socket", runner)


# --- the wrapped command, run as systemd runs it -----------------------------------


def _python_unit(tmp_path: pathlib.Path, name: str, service: str, code: str) -> list[str]:
    """A unit running `code` with this Python; returns the wrapped ExecStart argv."""
    script = tmp_path / f"{name}.py"
    script.write_text(SD + textwrap.dedent(code))
    command = shlex.join([sys.executable, str(script)])
    unit(tmp_path, f"{name}.service", service.format(command=command))
    systemd.write_dropin(name, [], root=str(tmp_path))
    (argv,) = wrapped_argv(tmp_path, f"{name}.service")
    return argv


SD = 'import ctypes, socket, sys\nsd = ctypes.CDLL("libsystemd.so.0")\n'


def test_notify_ready_from_the_program_is_accepted(
    tmp_path: pathlib.Path, runner: list[str]
) -> None:
    """READY=1 reaches systemd and passes its NotifyAccess= check; the watchdog is the
    program's (sd_watchdog_enabled), as systemd means it for the process it started."""
    argv = _python_unit(
        tmp_path,
        "note",
        "Type=notify\nWatchdogSec=30\nExecStart={command}\n",
        """
        usec = ctypes.c_uint64()
        wd = sd.sd_watchdog_enabled(0, ctypes.byref(usec))
        proto = socket.socket().getsockopt(socket.SOL_SOCKET, 38)
        sd.sd_notify(0, f"READY=1\\nSTATUS=watchdog={wd} proto={proto}".encode())
        """,
    )
    access = systemd.service_setting(
        [f.text for f in systemd._read_files("note.service", str(tmp_path))], "NotifyAccess"
    )
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        listener.settimeout(15)
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
        # systemd forks, sets WATCHDOG_PID to the child's pid, and execs ExecStart
        proc = subprocess.Popen(["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv], env=env)
        try:
            data, anc, _flags, _addr = listener.recvmsg(4096, socket.CMSG_SPACE(12))
        finally:
            assert proc.wait(timeout=30) == 0
    creds = [struct.unpack("3i", d) for lvl, typ, d in anc if typ == socket.SCM_CREDENTIALS]
    sender = creds[0][0]
    main_pid = proc.pid  # the process systemd started: mptcpkit run
    accepted = sender == main_pid or access == "all"  # the rule for NotifyAccess=main|all
    assert accepted, f"READY=1 from pid {sender}, MainPID {main_pid}, NotifyAccess={access}"
    assert data.decode().startswith("READY=1")
    assert f"watchdog=1 proto={IPPROTO_MPTCP}" in data.decode()


def test_socket_activation_reaches_the_program(tmp_path: pathlib.Path, runner: list[str]) -> None:
    """Real socket activation: systemd-socket-activate listens and execs the wrapped
    ExecStart on the first connection; libsystemd's sd_listen_fds() in the program
    must see its socket on fd 3, addressed to its own pid."""
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None, "systemd-socket-activate (apt: systemd) is missing"
    argv = _python_unit(
        tmp_path,
        "echo",
        "ExecStart={command}\n",
        """
        n = sd.sd_listen_fds(0)
        listener = socket.socket(fileno=3)
        conn, _ = listener.accept()
        own = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        conn.sendall(f"fds={n} proto={own.getsockopt(socket.SOL_SOCKET, 38)}".encode())
        """,
    )
    path = str(tmp_path / "echo.sock")
    proc = subprocess.Popen(
        [activate, "-l", path, "-E", "PYTHONPATH", "-E", "PATH", *argv],
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(30)
            client.connect(path)
            reply = client.recv(100).decode()
    finally:
        code = proc.wait(timeout=30)
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, err
    assert reply == f"fds=1 proto={IPPROTO_MPTCP}", err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_forking_haproxy_finishes_starting(tmp_path: pathlib.Path, runner: list[str]) -> None:
    """Type=forking: the wrapped ExecStart returns once haproxy has daemonized, its
    PIDFile names the daemon, and the daemon, left behind, is still forced: the
    connection it opens to its server is MPTCP."""
    haproxy = shutil.which("haproxy")
    assert haproxy is not None
    with mptcpkit.create_server(("127.0.0.1", 0)) as backend:
        backend.settimeout(30)
        port = _free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5s\n"
            f"  timeout server 5s\nlisten l\n  bind 127.0.0.1:{port}\n"
            f"  server s 127.0.0.1:{backend.getsockname()[1]}\n"
        )
        pidfile = tmp_path / "haproxy.pid"
        unit(
            tmp_path,
            "lb.service",
            f"Type=forking\nPIDFile={pidfile}\nExecStart={haproxy} -D -p {pidfile} -f {cfg}\n",
        )
        systemd.write_dropin("lb", [], root=str(tmp_path))
        (argv,) = wrapped_argv(tmp_path, "lb.service")
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
        daemon = 0
        try:
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("mptcpkit run waits for the daemon: a Type=forking unit never starts")
            assert code == 0
            daemon = int(pidfile.read_text().split()[0])
            assert os.readlink(f"/proc/{daemon}/exe") == os.path.realpath(haproxy)
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                conn, _ = backend.accept()
                with conn:
                    assert mptcpkit.status(conn).state is mptcpkit.State.MPTCP
        finally:
            if not daemon and pidfile.exists():  # started, but the test failed before
                written = pidfile.read_text().split()
                daemon = int(written[0]) if written else 0
            if daemon:
                os.kill(daemon, signal.SIGTERM)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


def test_cli_dropin_round_trip_and_usage_errors(tmp_path: pathlib.Path) -> None:
    run = [sys.executable, "-m", "mptcpkit", "run"]
    unit(
        tmp_path,
        "bgp.service",
        "Type=forking\nExecStart=/usr/sbin/bgpd\n",
        where="etc/systemd/system",
    )
    root = ["--root", str(tmp_path)]
    done = subprocess.run([*run, "--systemd-dropin", "bgp", *root], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "note: Type=forking without PIDFile=" in done.stderr
    conf = dropin(tmp_path, "bgp")
    assert "run -- /usr/sbin/bgpd\n" in conf.read_text()
    gone = subprocess.run([*run, "--systemd-dropin", "bgp", "--remove", *root], capture_output=True)
    assert gone.returncode == 0 and not conf.exists()
    missing = subprocess.run(
        [*run, "--systemd-dropin", "nope", *root], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "unit nope.service not found" in missing.stderr
    extra = subprocess.run(
        [*run, "--systemd-dropin", "bgp", "--", "x"], capture_output=True, text=True
    )
    assert extra.returncode == 2 and "takes no command" in extra.stderr
    lonely = subprocess.run([*run, "--remove"], capture_output=True, text=True)
    assert lonely.returncode == 2


def test_activation_is_handed_to_a_child() -> None:
    """The bpf strategy runs CMD as a child: fds 3.. go with it, LISTEN_PID and
    WATCHDOG_PID name it, and the parent keeps no copy of the sockets."""
    code = textwrap.dedent("""
        import os, socket, subprocess, sys
        from mptcpkit.run.activation import Activation
        fd = socket.socket().detach()
        if fd != 3:
            os.dup2(fd, 3)
            os.close(fd)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), WATCHDOG_PID="1")
        act = Activation.inherited()
        child = subprocess.Popen(
            [sys.executable, "-c", "import os, socket; socket.socket(fileno=3).detach(); "
             "print(os.environ['LISTEN_PID'] == str(os.getpid()), os.environ['WATCHDOG_PID'])"],
            preexec_fn=act.in_child, pass_fds=act.fds, stdout=subprocess.PIPE, text=True)
        act.close_in_parent()
        out = child.communicate()[0].split()
        print(out[0], out[1], os.path.exists("/proc/self/fd/3"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "1", "False"], out.stderr


MANAGER = """
import ctypes, os, signal, subprocess, sys, time
# what systemd does for a unit: it reaps every process the unit leaves (here as a
# subreaper), and `systemctl stop` sends SIGTERM to all of them (KillMode=control-group)
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
ready = sys.argv[1]
proc = subprocess.Popen(sys.argv[2:])
while not os.path.exists(ready):
    time.sleep(0.02)

def descendants():
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    todo, found = [os.getpid()], []
    while todo:
        for kid in kids.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found

everyone = descendants()
print(len(everyone), flush=True)
for pid in everyone:
    os.kill(pid, signal.SIGTERM)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def test_stop_signals_every_process_and_shutdown_is_still_forced(
    tmp_path: pathlib.Path, runner: list[str]
) -> None:
    """`systemctl stop` sends SIGTERM to the supervisor too: it must keep serving the
    program's shutdown (a socket made after SIGTERM is still MPTCP, not ENOSYS)."""
    ready, result = tmp_path / "ready", tmp_path / "result"
    argv = _python_unit(
        tmp_path,
        "web",
        "ExecStart={command}\n",
        f"""
        import os, signal, time
        def stop(*_):
            time.sleep(0.3)  # the signal reached every process of the unit meanwhile
            try:
                s = socket.socket()
                out = str(s.getsockopt(socket.SOL_SOCKET, 38))
            except OSError as exc:
                out = str(exc)
            with open({str(result)!r}, "w") as f:
                f.write(out)
            os._exit(0)
        signal.signal(signal.SIGTERM, stop)
        socket.socket().close()  # the supervisor serves us
        open({str(ready)!r}, "w").close()
        while True:
            time.sleep(1)
        """,
    )
    manager = subprocess.run(
        [sys.executable, "-c", MANAGER, str(ready), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert manager.returncode == 0, manager.stderr
    assert int(manager.stdout) >= 2  # the program and its supervisor
    assert result.read_text() == str(IPPROTO_MPTCP)
