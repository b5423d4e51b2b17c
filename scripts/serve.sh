#!/usr/bin/env bash
# Quick start: install skyreg and run `skyreg serve` (SQLite + filesystem, 127.0.0.1:5000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/skyreg serve "$@"
