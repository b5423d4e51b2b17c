#!/usr/bin/env bash
# Quick start: install skyreg, the real clients the tests drive, and run the whole test suite.
# Extra arguments go to pytest (e.g. `-m "not slow"` for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-tools.sh
bash scripts/setup.sh test
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
