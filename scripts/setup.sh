#!/usr/bin/env bash
# Creates .venv (once) and installs the project with every extra the tests and the demo use.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (pip skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints-cpu.txt -e ".[all,dev]"
