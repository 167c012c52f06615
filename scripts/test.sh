#!/usr/bin/env bash
# The README's test command: creates .venv if needed, installs the project with every extra,
# then runs the whole suite (unit, property, integration and doctests; the benchmarks' quick
# mode included). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k normalize`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
