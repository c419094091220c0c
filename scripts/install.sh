#!/usr/bin/env bash
# Installs mptcpkit and what its main job needs on a Debian/Ubuntu machine: iproute2
# and procps from apt (namespaces, tc, ip mptcp), gcc for the proxy's compiled data
# path (optional: without it the proxy relays in pure Python), python3-venv when the
# interpreter needs it, then the package with its dependencies from PyPI into a
# virtual environment of its own (as pipx does: a distribution's /usr/bin/python3
# refuses `pip install` into the system, PEP 668), and `mptcpkit` linked onto PATH.
#
# Where (environment variables):
#   MPTCPKIT_HOME     the virtual environment (root: /opt/mptcpkit,
#                     others: ~/.local/share/mptcpkit)
#   MPTCPKIT_BIN_DIR  where the `mptcpkit` link goes (root: /usr/local/bin,
#                     others: ~/.local/bin)
#   MPTCPKIT_PYTHON   the interpreter (default: python3 on PATH if it is 3.11 or newer
#                     and can make a virtual environment, else /usr/bin/python3)
# Running it again upgrades in place. `--dry-run` prints the plan and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=false
case "${1:-}" in
--dry-run) dry_run=true ;;
"") ;;
*)
    echo "usage: bash scripts/install.sh [--dry-run]" >&2
    exit 2
    ;;
esac

if [ "$(id -u)" = 0 ]; then
    home=${MPTCPKIT_HOME:-/opt/mptcpkit}
    bin_dir=${MPTCPKIT_BIN_DIR:-/usr/local/bin}
else
    home=${MPTCPKIT_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/mptcpkit}
    bin_dir=${MPTCPKIT_BIN_DIR:-$HOME/.local/bin}
fi

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
can_venv() { "$1" -c 'import ensurepip, venv' 2>/dev/null; }

python=${MPTCPKIT_PYTHON:-}
if [ -z "$python" ]; then
    for candidate in "$(command -v python3 || true)" /usr/bin/python3; do
        if [ -n "$candidate" ] && new_enough "$candidate" && can_venv "$candidate"; then
            # the interpreter itself, not a shim (pyenv) in front of it
            python=$("$candidate" -c 'import sys; print(sys.executable)')
            break
        fi
    done
    python=${python:-/usr/bin/python3}
fi
if ! [ -x "$python" ] && ! command -v "$python" >/dev/null; then
    echo "install.sh: no Python interpreter at $python" >&2
    exit 2
fi
if ! new_enough "$python"; then
    echo "install.sh: mptcpkit needs Python >= 3.11; $python is $("$python" -V 2>&1)" >&2
    exit 2
fi

apt_pkgs=(iproute2 procps gcc)
# Debian's interpreters make virtual environments only with python3-venv (ensurepip)
if ! can_venv "$python"; then
    apt_pkgs+=("python3-venv" "python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
fi
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if $dry_run; then
    echo "python: $python ($("$python" -V 2>&1))"
    echo "venv: $home"
    echo "link: $bin_dir/mptcpkit -> $home/bin/mptcpkit"
    echo "apt: ${missing[*]:-nothing missing}"
    exit 0
fi
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! [ -x "$home/bin/python" ] || ! "$home/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    rm -rf "$home"
    "$python" -m venv "$home"
fi
"$home/bin/python" -m pip install -q --disable-pip-version-check --upgrade .
# pip's entry-point script imports `re` only to strip Windows suffixes from argv[0]:
# about 1.5 ms of every command's start (`mptcpkit run` adds its start to a program's).
cat >"$home/bin/mptcpkit" <<EOF
#!$home/bin/python
import sys

from mptcpkit.cli import main

sys.exit(main())
EOF
chmod 755 "$home/bin/mptcpkit"
mkdir -p "$bin_dir"
ln -sfn "$home/bin/mptcpkit" "$bin_dir/mptcpkit"

echo "mptcpkit installed in $home (Python: $python), command: $bin_dir/mptcpkit"
found=$(command -v mptcpkit || true)
if [ "$found" != "$bin_dir/mptcpkit" ]; then
    case ":$PATH:" in
    *":$bin_dir:"*) echo "note: 'mptcpkit' on PATH is $found, found before $bin_dir/mptcpkit" ;;
    *) echo "note: $bin_dir is not on PATH: add it, or run $bin_dir/mptcpkit" ;;
    esac
fi
