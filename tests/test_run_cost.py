"""What `mptcpkit run` costs before the program runs: no work that cannot pay off."""

from __future__ import annotations

from mptcpkit.run import bpfload


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
