#!/usr/bin/env bash
# The README's demo command: creates .venv if needed, installs the project, then runs the
# reference trainer's demo on the embedded default world (warm start, then IGPO and GRPO from
# the same start, greedy evaluation, report). About 16 minutes on 2 quiet CPU cores (15.8 min measured); results land in
# runs/demo/ (report.md, plots, metrics). Extra arguments go to `igpo-train demo`, e.g.
# `bash scripts/demo.sh --quick` for a one-minute smoke run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/igpo-train demo --out runs/demo "$@"
