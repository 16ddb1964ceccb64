#!/usr/bin/env bash
# One-shot setup on a fresh Debian (bookworm) machine: system packages, a
# virtualenv in ./.venv with SPIRT and its Python dependencies, and the Redis
# module build (compiled by the pip install). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v cc >/dev/null || need_apt+=(build-essential)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
# Debian's packaged redis-server starts a system instance; SPIRT runs its own.

if [ ! -x .venv/bin/python ]; then
    # --system-site-packages reuses an already-installed torch==2.13.0 (CPU) instead
    # of installing a second copy; pip still installs anything missing or too old.
    python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c 'import spirtd.redis.module as n; print("setup: redis module built at", n.module_path())'
