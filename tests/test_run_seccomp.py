"""`mptcpkit run` with the seccomp strategy, against real programs and real peers.

Every connection is checked where it ends: `mptcpkit.status()` of the socket the test's
own server accepted (or, for a forced listener, of the test's client socket, which is
MPTCP only if the listener was).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

import mptcpkit

RUN = (
    [sys.executable, "-m", "mptcpkit", "run"]
    if importlib.util.find_spec("mptcpkit.cli.check")
    else [sys.executable, "-m", "mptcpkit.cli.run"]
)
BUSYBOX = shutil.which("busybox")
PY = sys.executable


def forced(
    argv: Sequence[str], *opts: str, input: bytes | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*RUN, "--stats=json", *opts, "--", *argv],
        input=input,
        capture_output=True,
        timeout=timeout,
    )


def stats_of(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    last = proc.stderr.decode().strip().splitlines()[-1]
    data: dict[str, object] = json.loads(last)
    return data


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


class Server:
    """An MPTCP-first listener in a thread: records status() of what it accepts, replies."""

    def __init__(
        self, reply: bytes = b"pong", *, until: bytes = b"", sock: socket.socket | None = None
    ) -> None:
        self.sock = sock or mptcpkit.create_server(("127.0.0.1", 0))
        self.sock.settimeout(60)
        self.reply, self.until = reply, until
        self.statuses: list[mptcpkit.SocketStatus] = []
        self.received: list[bytes] = []
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                self.statuses.append(mptcpkit.status(conn))
                data = b""
                try:
                    while self.until not in data or not data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.received.append(data)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def nobody_env() -> Iterator[dict[str, str]]:
    """An environment whose PYTHONPATH holds a copy of mptcpkit that any user can read:
    the checkout may live where `nobody` cannot (CI clones wherever it likes)."""
    import tempfile

    root = tempfile.mkdtemp(prefix="mptcpkit-src-", dir="/tmp")
    try:
        shutil.copytree(
            os.path.dirname(mptcpkit.__file__),
            os.path.join(root, "mptcpkit"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for folder, _, files in os.walk(root):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        yield {**os.environ, "PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


HTTP_REPLY = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


@pytest.fixture
def http_server() -> Iterator[Server]:
    s = Server(HTTP_REPLY, until=b"\r\n\r\n")
    yield s
    s.close()


# --- what a program sees --------------------------------------------------------


def test_python_sockets_become_mptcp_with_flags_kept(server: Server) -> None:
    proc = forced(
        py(f"""
        import ctypes, fcntl, os, socket
        s = socket.socket()
        print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
        print(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        nb = socket.socket(type=socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        print(fcntl.fcntl(nb.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK == os.O_NONBLOCK)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(socket.AF_INET6, socket.SOCK_STREAM, 0)  # no SOCK_CLOEXEC
        print(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        print(socket.socket(fileno=fd).getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
        u = socket.socket(type=socket.SOCK_DGRAM)
        print(u.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
        s.connect(("127.0.0.1", {server.port})); s.sendall(b"x"); print(s.recv(4).decode())
        """)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["262", "1", "True", "0", "262", "17", "pong"]
    assert server.statuses and server.statuses[0].is_mptcp
    assert stats_of(proc)["forced"] == 3


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_static_busybox_nc(server: Server) -> None:
    assert BUSYBOX is not None
    out = subprocess.run(["file", "-L", BUSYBOX], capture_output=True, text=True).stdout
    assert "statically linked" in out  # LD_PRELOAD could not reach it
    proc = forced([BUSYBOX, "nc", "127.0.0.1", str(server.port)], input=b"ping")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"pong"
    assert server.received == [b"ping"]
    assert [s.is_mptcp for s in server.statuses] == [True]


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_static_busybox_wget(http_server: Server) -> None:
    assert BUSYBOX is not None
    url = f"http://127.0.0.1:{http_server.port}/x"
    proc = forced([BUSYBOX, "wget", "-q", "-O", "-", url])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello"
    assert [s.is_mptcp for s in http_server.statuses] == [True]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl(http_server: Server) -> None:
    proc = forced(["curl", "-sS", f"http://127.0.0.1:{http_server.port}/"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello"
    assert [s.is_mptcp for s in http_server.statuses] == [True]


@pytest.fixture(scope="session")
def go_peer(go_build) -> str:  # type: ignore[no-untyped-def]
    """tests/data/mptk_go_peer.go built static (CGO_ENABLED=0), with Go 1.20's defaults:
    its listener is plain TCP unless forced (1.24+ would make it MPTCP itself)."""
    source = os.path.join(os.path.dirname(__file__), "data", "mptk_go_peer.go")
    return str(go_build(source, "1.20"))


def test_static_go_client(go_peer: str, server: Server) -> None:
    info = subprocess.run(["file", "-L", go_peer], capture_output=True, text=True).stdout
    assert "statically linked" in info
    proc = forced([go_peer, "dial", f"127.0.0.1:{server.port}"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"pong", b"262"]  # Go's SOCK_NONBLOCK socket, forced
    assert server.received == [b"go"]
    assert [s.is_mptcp for s in server.statuses] == [True]


def test_static_go_listener(go_peer: str) -> None:
    proc = subprocess.Popen([*RUN, "--", go_peer, "serve"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        port, proto = proc.stdout.readline().split()
        assert proto == b"262"
        with mptcpkit.create_connection(("127.0.0.1", int(port)), timeout=30) as c:
            data = b""
            while chunk := c.recv(64):
                data += chunk
            assert data == b"from-go"
            assert mptcpkit.status(c).is_mptcp
    assert proc.wait(30) == 0


def _wait_port(proc: subprocess.Popen[bytes], path: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return int(f.read())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the forced server did not start")


def test_python_http_server_as_forced_listener(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "index.html").write_text("served")
    argv = [PY, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    proc = subprocess.Popen([*RUN, "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().decode()  # "Serving HTTP on 127.0.0.1 port N (...)"
        port = int(banner.split(" port ")[1].split()[0])
        with mptcpkit.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := c.recv(4096):
                body += chunk
            assert mptcpkit.status(c).is_mptcp  # MPTCP end to end: the listener was MPTCP
        assert body.endswith(b"served")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM  # the program itself died of it, as after exec
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_forking_multithreaded_server(tmp_path, server: Server) -> None:  # type: ignore[no-untyped-def]
    """A forking server whose children open backend connections from several threads."""
    portfile = str(tmp_path / "port")
    code = f"""
    import os, socket, socketserver, threading
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            results = []
            def backend():
                with socket.create_connection(("127.0.0.1", {server.port})) as b:
                    b.sendall(b"x"); results.append(b.recv(4))
            threads = [threading.Thread(target=backend) for _ in range(3)]
            for t in threads: t.start()
            for t in threads: t.join()
            self.request.sendall(b"".join(results))
    class Srv(socketserver.ForkingMixIn, socketserver.TCPServer):
        pass
    srv = Srv(("127.0.0.1", 0), Handler)
    open({portfile!r} + ".tmp", "w").write(str(srv.server_address[1]))
    os.rename({portfile!r} + ".tmp", {portfile!r})
    for _ in range(2):
        srv.handle_request()
    srv.server_close()
    """
    proc = subprocess.Popen([*RUN, "--stats=json", "--", *py(code)], stderr=subprocess.PIPE)
    port = _wait_port(proc, portfile)
    for _ in range(2):
        with mptcpkit.create_connection(("127.0.0.1", port), timeout=30) as c:
            reply = b""
            while chunk := c.recv(64):
                reply += chunk
            assert reply == b"pong" * 3
            assert mptcpkit.status(c).is_mptcp
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(server.statuses) == 6 and all(s.is_mptcp for s in server.statuses)
    assert json.loads(err.decode().splitlines()[-1])["forced"] == 7


# --- exit status, signals, terminal ---------------------------------------------


def test_exit_codes_and_stdio_pass_through() -> None:
    assert forced(["sh", "-c", "exit 7"]).returncode == 7
    assert forced(["sh", "-c", "kill -KILL $$"]).returncode == -signal.SIGKILL
    proc = forced(["sh", "-c", "cat; echo err >&2"], input=b"through\n")
    assert proc.stdout == b"through\n" and proc.stderr.startswith(b"err\n")
    missing = subprocess.run([*RUN, "--", "/nonexistent/prog"], capture_output=True, text=True)
    assert missing.returncode == 127 and "No such file or directory" in missing.stderr
    missing = subprocess.run([*RUN, "--", "no-such-prog-x"], capture_output=True, text=True)
    assert missing.returncode == 127 and "no-such-prog-x: command not found" in missing.stderr
    usage = subprocess.run([*RUN], capture_output=True, text=True)
    assert usage.returncode == 2 and "no command" in usage.stderr


def test_signals_sent_to_the_supervisor_reach_the_program(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ready = tmp_path / "ready"
    code = f"""
    import signal, sys, time
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(42))
    open({str(ready)!r}, "w").close()
    time.sleep(60)
    """
    proc = subprocess.Popen([*RUN, "--", *py(code)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(30) == 42


def test_tasks_killed_mid_call_do_not_disturb_the_supervisor() -> None:
    code = """
    import os, signal, socket, threading, time
    kids = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            def churn():
                while True:
                    socket.socket().close()
            for _ in range(3):
                threading.Thread(target=churn, daemon=True).start()
            time.sleep(60)
        kids.append(pid)
    time.sleep(0.5)
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
    for pid in kids:
        os.waitpid(pid, 0)
    s = socket.socket()  # the supervisor still serves
    print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
    """
    proc = forced(py(code))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"262"]
    assert stats_of(proc)["warnings"] == []


def test_descriptor_limit_gives_the_programs_own_emfile() -> None:
    code = """
    import resource, socket
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    held = []
    try:
        while True:
            held.append(socket.socket())
    except OSError as exc:
        print(exc.errno, len(held) > 5)
    held.pop().close()
    print(socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
    """
    proc = forced(py(code))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"24", b"True", b"262"]  # EMFILE, then MPTCP again
    assert stats_of(proc)["warnings"] == []


def test_the_programs_close_is_the_last_reference() -> None:
    """The supervisor's copy of a socket is gone before socket() returns: closing
    frees the port at once (the re-bind below would fail otherwise)."""
    code = """
    import socket
    for _ in range(300):
        p = socket.socket()
        p.bind(("127.0.0.1", 0))
        port = p.getsockname()[1]
        p.close()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as s:
            s.bind(("127.0.0.1", port))  # asks for MPTCP itself: not trapped
    print("ok")
    """
    proc = forced(py(code))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"ok"]


def test_a_daemon_left_behind_is_still_served(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "proto"
    code = f"""
    import os, socket, time
    if os.fork() == 0:
        time.sleep(0.5)  # the parent has exited by now
        s = socket.socket()
        open({str(out)!r}, "w").write(str(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)))
        os._exit(0)
    os._exit(3)
    """
    proc = forced(py(code))
    assert proc.returncode == 3  # the program's status, reported after its daemon ended
    assert out.read_text() == "262"


FIND_SUPERVISOR = """
import os
def supervisor():  # the background process holding a pidfd of this program
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() != "mptcpkit-run":
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                if f"Pid:\\t{os.getpid()}\\n" in open(f"/proc/{pid}/fdinfo/{fd}").read():
                    return int(pid)
        except OSError:
            continue
    raise SystemExit("no supervisor")
"""


def test_interrupted_calls_and_no_descriptor_leak() -> None:
    """10,000 sockets with a timer signal interrupting the program throughout."""
    code = """
    import os, signal, socket, time
    sup = f"/proc/{supervisor()}/fd"
    def count():  # the supervisor closes its copy just after handing a socket over
        time.sleep(0.2)
        return min(len(os.listdir(sup)) for _ in range(5) if not time.sleep(0.05))
    socket.socket().close()  # the supervisor's steady state
    before = count()
    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    mptcp = eintr = 0
    while mptcp < 10000:
        try:
            s = socket.socket()
        except InterruptedError:  # Python installs handlers without SA_RESTART
            eintr += 1
            continue
        with s:
            mptcp += s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == 262
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(mptcp, before, count())
    """
    proc = forced(py(FIND_SUPERVISOR + textwrap.dedent(code)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    mptcp, before, after = map(int, proc.stdout.split())
    assert mptcp == 10000
    assert after == before
    assert stats_of(proc)["forced"] == 10001


# --- --only --------------------------------------------------------------------


ONLY_PROBE = """
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
with socket.socket() as probe:  # a free port, then bound explicitly (port lock)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
srv.bind(("127.0.0.1", port))
srv.listen(7)
c = socket.socket()
c.connect(("127.0.0.1", port))
a, _ = srv.accept()
p = lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
print(p(srv), p(c), p(a), srv.getsockname()[1] == port,
      srv.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
      srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
"""


@pytest.mark.parametrize(
    ("only", "expect"),
    [
        ("connect", "6 262 6 True 1 1"),
        ("listen", "262 6 6 True 1 1"),
        (None, "262 262 262 True 1 1"),
    ],
)
def test_only(only: str | None, expect: str) -> None:
    opts = ["--only", only] if only else []
    proc = forced(py(ONLY_PROBE), *opts)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == expect.split()


# --- TCP-only options ----------------------------------------------------------

MD5_PROGRAM = """
import socket, struct, sys
def md5(addr, key):
    sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + socket.inet_aton(addr)
    return sa.ljust(128, b"\\0") + struct.pack("=BBHI", 0, 0, len(key), 0) + key.ljust(80, b"\\0")
p = lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.setsockopt(socket.IPPROTO_TCP, 14, md5("127.0.0.1", b"bgp-secret"))
srv.listen()
cli = socket.socket()
cli.setsockopt(socket.IPPROTO_TCP, 14, md5("127.0.0.1", b"bgp-secret"))
cli.connect(srv.getsockname())
conn, _ = srv.accept()
cli.sendall(b"OPEN")
print(conn.recv(4).decode(), p(srv), p(cli))
sys.stdout.flush()
# a peer without the key gets nowhere: MD5 is really in force on the listener
bad = socket.socket()
bad.settimeout(1.5)
try:
    bad.connect(srv.getsockname())
    print("unsigned-accepted")
except OSError:
    print("unsigned-refused")
"""


def test_md5_signed_connection_under_forcing() -> None:
    if not mptcpkit.tcp_md5sig_available():
        pytest.skip("kernel without TCP_MD5SIG")
    proc = forced(py(MD5_PROGRAM))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["OPEN", "6", "6", "unsigned-refused"]
    stats = stats_of(proc)
    assert stats["swapped_to_tcp"] == 2
    assert stats["reasons"] == {"swapped to TCP for TCP_MD5SIG": 2}
    assert stats["forced"] == 1  # the unsigned client stayed MPTCP


def test_tcp_only_option_on_an_idle_listener_and_on_ipv6() -> None:
    code = """
    import socket
    p = lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    out = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = socket.socket(family)
        srv.bind((host, 0))
        srv.listen(5)
        addr = srv.getsockname()
        srv.setsockopt(socket.IPPROTO_TCP, 18, 2000)  # TCP_USER_TIMEOUT, after listen()
        c = socket.create_connection(addr[:2])
        a, _ = srv.accept()
        out += [p(srv), srv.getsockname() == addr, srv.getsockopt(socket.IPPROTO_TCP, 18)]
    print(*out)
    """
    proc = forced(py(code))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"6", b"True", b"2000"] * 2
    assert stats_of(proc)["reasons"] == {"swapped to TCP for TCP_USER_TIMEOUT": 2}


def test_tcp_only_option_after_connect_keeps_mptcps_error(server: Server) -> None:
    code = f"""
    import socket
    s = socket.create_connection(("127.0.0.1", {server.port}))
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
    except OSError as e:
        print(e.errno)
    """
    proc = forced(py(code))
    assert proc.stdout.split() == [b"92"]  # ENOPROTOOPT: too late to swap, as in the library
    assert server.statuses[0].is_mptcp


# --- namespaces and credentials -----------------------------------------------


@pytest.mark.root
@pytest.mark.lab(paths=1, prefix="mptk-run-")
def test_target_in_another_namespace_and_fallback_there(two_paths) -> None:  # type: ignore[no-untyped-def]
    client, srv_host = two_paths.host("client"), two_paths.host("server")
    with srv_host.enter():
        listener = mptcpkit.create_server(("0.0.0.0", 0))
    server = Server(sock=listener)
    try:
        addr = srv_host.address()
        argv = [
            "ip",
            "netns",
            "exec",
            client.netns,
            *py(f"""
            import socket
            s = socket.create_connection(({addr!r}, {server.port}))
            s.sendall(b"hi"); print(s.recv(4).decode())
        """),
        ]
        proc = forced(argv)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [b"pong"]
        assert [s.is_mptcp for s in server.statuses] == [True]

        client.sysctl("net.mptcp.enabled", 0)
        proc = forced(argv)
        assert proc.returncode == 0, proc.stderr
        assert [s.is_mptcp for s in server.statuses] == [True, False]
        stats = stats_of(proc)
        assert (stats["forced"], stats["fell_back"]) == (0, 1)
        assert stats["reasons"] == {"MPTCP refused: ENOPROTOOPT": 1}
    finally:
        server.close()


@pytest.mark.root
@pytest.mark.lab(paths=1, prefix="mptk-run-")
def test_target_that_changes_namespace_itself(two_paths) -> None:  # type: ignore[no-untyped-def]
    """The program calls setns() itself, between two sockets."""
    client, srv_host = two_paths.host("client"), two_paths.host("server")
    with srv_host.enter():
        listener = mptcpkit.create_server(("0.0.0.0", 0))
    server = Server(sock=listener)
    local = Server()
    try:
        code = f"""
        import ctypes, os, socket
        def talk(host, port):
            with socket.create_connection((host, port)) as s:
                s.sendall(b"x"); return s.recv(4).decode()
        a = talk("127.0.0.1", {local.port})
        fd = os.open("/run/netns/{client.netns}", os.O_RDONLY)
        assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0
        b = talk({srv_host.address()!r}, {server.port})
        print(a, b)
        """
        proc = forced(py(code))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [b"pong", b"pong"]
        assert [s.is_mptcp for s in local.statuses] == [True]
        assert [s.is_mptcp for s in server.statuses] == [True]
    finally:
        server.close()
        local.close()


@pytest.mark.root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")
def test_target_running_as_another_user(server: Server) -> None:
    nobody = pwd.getpwnam("nobody")
    code = f"""
    import os, socket
    s = socket.create_connection(("127.0.0.1", {server.port}))
    s.sendall(b"x"); s.recv(4)
    proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    print(os.getuid(), os.fstat(s.fileno()).st_uid, proto)
    """
    argv = [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
        *py(code),
    ]
    proc = forced(argv)
    assert proc.returncode == 0, proc.stderr
    uid = str(nobody.pw_uid).encode()
    # the socket was made with the program's credentials, not the supervisor's (root)
    assert proc.stdout.split() == [uid, uid, b"262"]
    assert [s.is_mptcp for s in server.statuses] == [True]


@pytest.mark.root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")
def test_supervisor_needs_no_privileges(server: Server, nobody_env: dict[str, str]) -> None:
    """The whole of `mptcpkit run` as an unprivileged user (no root, no capabilities)."""
    nobody = pwd.getpwnam("nobody")
    code = f"""
    import socket
    with socket.create_connection(("127.0.0.1", {server.port})) as s:
        s.sendall(b"x"); print(s.recv(4).decode())
    """
    system_python = "/usr/bin/python3"  # this interpreter may live where nobody cannot read
    if not os.access(system_python, os.X_OK):
        pytest.skip("no /usr/bin/python3 for the unprivileged user")
    as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
    cli = [system_python, "-m", "mptcpkit.cli.run"]  # the subcommand alone: no rich needed
    target = [system_python, *py(code)[1:]]
    proc = subprocess.run(
        [*as_nobody, "--clear-groups", *cli, "--", *target],
        capture_output=True,
        timeout=60,
        env=nobody_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"pong"]
    assert [s.is_mptcp for s in server.statuses] == [True]


@pytest.mark.root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare not installed")
def test_unprivileged_supervisor_leaves_a_rootless_namespace_alone(
    nobody_env: dict[str, str],
) -> None:
    """It cannot enter a namespace owned by the program's own user namespace: the
    program gets its plain TCP socket, and the reason is counted."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 for the unprivileged user")
    nobody = pwd.getpwnam("nobody")
    as_nobody = [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
    ]
    target = [
        "unshare",
        "-rn",
        "/usr/bin/python3",
        "-c",
        "import socket; print(socket.socket().proto)",
    ]
    if subprocess.run([*as_nobody, *target], capture_output=True).returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled")
    target[-1] = "import socket; print(socket.socket().getsockopt(1, 38))"
    proc = subprocess.run(
        [*as_nobody, "/usr/bin/python3", "-m", "mptcpkit.cli.run", "--stats=json", "--", *target],
        capture_output=True,
        timeout=60,
        env=nobody_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"6"]
    stats = stats_of(proc)
    assert (stats["forced"], stats["left_alone"]) == (0, 1)
    assert any("cannot enter" in why for why in stats["reasons"])  # type: ignore[attr-defined]


# --- limits reported, other strategies ----------------------------------------


def test_io_uring_use_is_reported() -> None:
    code = """
    import ctypes
    params = ctypes.create_string_buffer(120)
    fd = ctypes.CDLL(None, use_errno=True).syscall(425, 4, params)
    print("ok")
    """
    proc = forced(py(code))
    assert proc.returncode == 0
    assert b"io_uring" in proc.stderr and b"not forced" in proc.stderr


def test_a_second_seccomp_listener_is_reported() -> None:
    code = """
    from mptcpkit.run import abi, bpf, syscalls
    prog = bpf.build_filter(bpf.FilterSpec(abi.native_arch()))
    try:
        syscalls.install_filter(prog, abi.native_arch())
    except OSError as exc:
        print(exc.errno)
    """
    proc = forced(py(code))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"16"]  # EBUSY: the kernel allows one listener per chain
    assert b"its own seccomp listener" in proc.stderr


def test_no_seccomp_is_one_clear_line() -> None:
    """Under a filter that refuses seccomp() (a hardened container), nothing starts."""
    code = f"""
    import ctypes, os, sys
    from mptcpkit.run import abi, bpf
    insns = [(bpf.LD_ABS, 0, 0, 0), (bpf.JEQ_K, 0, 1, abi.native_arch().seccomp),
             (bpf.RET_K, 0, 0, abi.SECCOMP_RET_ERRNO | 1), (bpf.RET_K, 0, 0, abi.SECCOMP_RET_ALLOW)]
    prog = b"".join(bpf.INSN.pack(*i) for i in insns)
    libc = ctypes.CDLL(None, use_errno=True)
    class F(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("f", ctypes.c_void_p))
    buf = ctypes.create_string_buffer(prog, len(prog))
    assert libc.prctl(38, 1, 0, 0, 0) == 0
    fprog = F(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    assert libc.syscall(abi.native_arch().seccomp, 1, 0, ctypes.byref(fprog)) == 0
    os.execv(sys.executable, [sys.executable, *{RUN[1:]!r}, "--", "touch", "/nonexistent/x"])
    """
    proc = subprocess.run(py(code), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mptcpkit run: cannot install the seccomp filter")
    assert "Operation not permitted" in lines[0] and "--strategy preload" in lines[0]


def test_preload_strategy() -> None:
    from mptcpkit.run import preload

    if preload.find_library() is None:
        pytest.skip("libmptcpwrap not installed")
    code = "import socket; print(socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))"
    proc = subprocess.run(
        [*RUN, "--strategy", "preload", "--", PY, "-c", code], capture_output=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"262"]
    bad = subprocess.run(
        [*RUN, "--strategy", "preload", "--stats", "--", "true"], capture_output=True
    )
    assert bad.returncode == 2 and b"needs --strategy seccomp" in bad.stderr


def test_bpf_strategy_refused_here_names_seccomp() -> None:
    from mptcpkit.run import bpfload

    reason = bpfload.probe()
    if reason is None:
        pytest.skip("this kernel accepts tracing BPF programs")
    proc = subprocess.run([*RUN, "--strategy", "bpf", "--", "true"], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "seccomp" in lines[0] and reason in lines[0]
    # auto does not pick it, and works
    auto = subprocess.run(
        [
            *RUN,
            "--",
            PY,
            "-c",
            "import socket; print(socket.socket().proto, socket.socket().getsockopt(1, 38))",
        ],
        capture_output=True,
    )
    assert auto.stdout.split() == [b"0", b"262"]
