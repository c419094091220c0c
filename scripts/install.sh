#!/usr/bin/env bash
# Installs mptcpkit and what its main job needs on a fresh Debian machine:
# iproute2 and procps from apt (namespaces, tc, ip mptcp), gcc for the proxy's compiled
# data path (optional: without it the proxy relays in pure Python), the package with
# its dependencies from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in iproute2 procps gcc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check .
