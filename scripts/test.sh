#!/usr/bin/env bash
# The project's test command (README, CI): set-up if needed, lint, then the whole suite against
# real SGLang servers on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@"
