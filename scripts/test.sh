#!/usr/bin/env bash
# Quick start: install skyreg, the real clients the tests drive, and run the whole test suite.
# Extra arguments go to pytest (e.g. `-m "not slow"` for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-tools.sh
bash scripts/setup.sh test
# Test files run in parallel worker processes (pytest-xdist), one file per worker at a time:
# most tests wait on servers and clients they start. SKYREG_TEST_WORKERS overrides the count
# (0: everything in this process); the default is the CPU count, at most 4.
cpus=$(nproc)
workers=${SKYREG_TEST_WORKERS:-$((cpus < 4 ? cpus : 4))}
set +e
.venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
