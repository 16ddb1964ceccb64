#!/usr/bin/env bash
# Regenerates requirements.lock (runtime) and requirements-test.lock (runtime + the
# test extra) from pyproject.toml's ranges, with pip-tools, every file hashed.
#
#   bash deploy/lock.sh            keep every pin that still satisfies pyproject.toml
#   bash deploy/lock.sh --upgrade  move every pin to the newest release in range
#
# Upgrading is a reviewed change of the two lock files: run the suite on the result.
# The test lock is constrained by the runtime lock, so both agree on every version.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=()
case "${1:-}" in
    "") ;;
    --upgrade) upgrade=(--upgrade) ;;
    *) echo "lock: unknown option $1" >&2; exit 2 ;;
esac

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/python" -m pip install -q --disable-pip-version-check pip==26.3 pip-tools==7.7.0

# torch's CPU build must be resolvable while compiling, as when installing:
# pyproject.toml pins torch exactly, and the CPU build carries the +cpu label.
grep -oE '"torch==[^"]+"' pyproject.toml | tr -d '"' | sed 's/$/+cpu/' >"$tools/pin"
read -r -a torch_index <<<"$(deploy/torch-index.sh "$tools/bin/python" "$tools/pin")"
export CUSTOM_COMPILE_COMMAND="bash deploy/lock.sh"
common=(--quiet --generate-hashes --allow-unsafe --all-build-deps --strip-extras
    --no-emit-index-url --no-emit-find-links "${torch_index[@]}")
"$tools/bin/pip-compile" "${common[@]}" "${upgrade[@]}" -o requirements.lock pyproject.toml
"$tools/bin/pip-compile" "${common[@]}" "${upgrade[@]}" --extra test -c requirements.lock \
    -o requirements-test.lock pyproject.toml
echo "lock: wrote requirements.lock and requirements-test.lock; review the diff, run the suite"
