"""Force MPTCP on programs that do not ask for it (`mptcpkit run`).

Strategies: seccomp user notification (default; any binary, static and Go
included), LD_PRELOAD of mptcpize's libmptcpwrap, a BPF `update_socket_protocol`
program where the kernel allows tracing programs, and in-process patching for
Python programs (`mptcpkit.run.inprocess.forced`).
"""
