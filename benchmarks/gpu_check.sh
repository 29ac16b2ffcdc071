#!/usr/bin/env bash
# The GPU check in one command, under 8 minutes on an H100 or H200 with 16 cores: `pytest -m gpu`,
# then benchmarks/gpu_check.py (02 at fp16 on 4,096 local JPEGs in exact and fast modes, their
# agreement over 1,000 photos, how busy the GPU was). Writes one JSON file and prints it.
#
#   benchmarks/gpu_check.sh [OUTPUT.json [gpu_check.py options]]    # default: benchmarks/gpu_check.json
#
# PYTHON is the interpreter that has requirements-test.txt (default: .venv/bin/python, else python3).
set -uo pipefail
repo=$(realpath "$(dirname "$0")/..")
out=$(realpath -m "${1:-$repo/benchmarks/gpu_check.json}")  # a path given is taken from where you are
shift || true
if [ -n "${PYTHON:-}" ]; then
    PYTHON=$(command -v "$PYTHON") || { echo "PYTHON=$PYTHON: no such interpreter" >&2; exit 2; }
elif [ -x "$repo/.venv/bin/python" ]; then
    PYTHON=$repo/.venv/bin/python
else
    PYTHON=python3
fi
cd "$repo"
export PYTHONUNBUFFERED=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$PYTHON" -m pytest -m gpu tests/test_gpu.py -s -q -p no:cacheprovider 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
"$PYTHON" benchmarks/gpu_check.py --out "$out" --pytest-status "$status" --pytest-log "$log" "$@"
