#!/usr/bin/env bash
# Install skyreg into ./.venv (creating it), with the test extras when called with "test".
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv python3-pip
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
if [ "${1:-}" = "test" ]; then
  .venv/bin/pip install --quiet -e '.[test]'
else
  .venv/bin/pip install --quiet -e .
fi
