#!/usr/bin/env bash
# Installs SPIRT into a virtualenv from the committed lock: the exact versions it was
# tested with, every file checked against its hash, torch's CPU build, and the Redis
# module build (compiled by the install of SPIRT itself).
#
# usage: deploy/install-venv.sh VENV [--test] [--editable]
#   --test      also the test tools (requirements-test.lock instead of requirements.lock)
#   --editable  install this checkout in development mode (pip -e)
# Safe to run again: a second run brings the venv back to the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: deploy/install-venv.sh VENV [--test] [--editable]}
shift
lock=requirements.lock editable=()
for arg in "$@"; do
    case "$arg" in
        --test) lock=requirements-test.lock ;;
        --editable) editable=(-e) ;;
        *) echo "install-venv: unknown option $arg" >&2; exit 2 ;;
    esac
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
read -r -a torch_index <<<"$(deploy/torch-index.sh "$venv/bin/python" "$lock")"
echo "install-venv: $(grep -cE '^[a-z0-9]' "$lock") pinned distributions from $lock into $venv" \
     "(torch's CPU wheel alone is ~190 MB: a few minutes)"
"${pip[@]}" install -q --require-hashes "${torch_index[@]}" -r "$lock"
echo "install-venv: SPIRT itself and its Redis module build"
# The lock holds the build tools too (setuptools, wheel), so building SPIRT itself
# needs nothing unpinned: no build isolation, no dependency resolution.
"${pip[@]}" install -q --no-deps --no-build-isolation "${editable[@]}" .
"$venv/bin/python" -m pip check
