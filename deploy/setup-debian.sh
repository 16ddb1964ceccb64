#!/usr/bin/env bash
# One-shot setup on a fresh Debian (bookworm) machine: system packages, a
# virtualenv in ./.venv with SPIRT and the exact Python dependencies of the lock,
# and the Redis module build (compiled by the pip install). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need_apt=()
installed_redis=0
if ! command -v redis-server >/dev/null; then
    need_apt+=(redis-server)
    installed_redis=1
fi
command -v cc >/dev/null || need_apt+=(build-essential)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# systemd-analyze, systemd-sysusers and systemd-tmpfiles check deploy/systemd in the tests.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if ((${#need_apt[@]})); then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# Debian's redis-server package starts a system Redis on 127.0.0.1:6379 that
# SPIRT never uses (each spirtd runs its own on a unix socket in its data dir).
# Stop and disable it, but only if this script installed it: a Redis that was
# already there belongs to someone else.
if [ "$installed_redis" = 1 ]; then
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
        echo "setup: stopped and disabled Debian's system redis-server (port 6379);" \
             "SPIRT runs its own Redis per node"
    else
        # No systemd (a container): the package started it through its init script.
        stopped=0
        if command -v service >/dev/null && $SUDO service redis-server stop >/dev/null 2>&1; then
            stopped=1
        fi
        # That instance only: Debian's config runs it as "redis-server 127.0.0.1:6379".
        if pgrep -f '^/usr/bin/redis-server 127\.0\.0\.1:6379' >/dev/null; then
            $SUDO pkill -f '^/usr/bin/redis-server 127\.0\.0\.1:6379' && stopped=1
        fi
        command -v update-rc.d >/dev/null && $SUDO update-rc.d redis-server disable >/dev/null 2>&1 || true
        if [ "$stopped" = 1 ]; then
            echo "setup: stopped Debian's system redis-server (port 6379) and disabled its init" \
                 "script; SPIRT runs its own Redis per node"
        else
            echo "setup: Debian's system redis-server is not running (nothing to stop);" \
                 "its init script is disabled"
        fi
    fi
fi

# The venv gets exactly the versions in the committed lock (requirements-test.lock:
# the runtime plus the test tools), torch's CPU build included; see the README's
# "Dependencies and the lock". It sees no system site-packages, so nothing
# installed outside it changes what runs.
if [ -x .venv/bin/python ] && grep -q '^include-system-site-packages = true' .venv/pyvenv.cfg; then
    echo "setup: .venv was made with system site-packages by an older setup; making it anew"
    rm -rf .venv
fi
deploy/install-venv.sh .venv --test --editable
.venv/bin/python -c 'import spirtd.redis.module as n; print("setup: redis module built at", n.module_path())'
