#!/usr/bin/env bash
# Prints the pip options that make the locked torch resolvable, or nothing.
#
# The lock pins torch's CPU build (torch==X+cpu). PyPI carries only the CUDA build
# for Linux x86_64 (several GB of nvidia-* wheels), so the CPU wheel must come from
# somewhere else: this host's own pip configuration (a wheel directory or mirror),
# else PyTorch's CPU index. Asking the index only when needed keeps an offline
# mirror working, and a user never has to know which index torch lives on.
#
# usage: deploy/torch-index.sh PYTHON LOCKFILE
set -euo pipefail
python=$1 lock=$2
pin=$(grep -m1 -oE '^torch==[^ ]+' "$lock") || { echo "torch-index: no torch pin in $lock" >&2; exit 1; }
if "$python" -m pip install --dry-run --no-index --no-deps --ignore-installed -q "$pin" >/dev/null 2>&1; then
    exit 0
fi
echo "--extra-index-url https://download.pytorch.org/whl/cpu"
