#!/usr/bin/env bash
# The README's test command: creates .venv if needed, installs the project with every extra,
# then runs the whole suite (unit, property, integration and doctests; the benchmarks' quick
# mode included) except the verl tests, which run on verl's own pins in
# scripts/test_verl_pins.sh (this venv holds verl without its requirements beside a transformers
# verl 0.9.1 does not allow). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k normalize`.
# Test files run in parallel, one per CPU (pytest-xdist; IGPO_TEST_WORKERS=0 runs them in this
# process). pytest-benchmark only times under a single process: the benchmarks' measured numbers
# come from `IGPO_BENCH=full .venv/bin/python -m pytest tests/benchmarks --benchmark-only`
# (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${IGPO_TEST_WORKERS:-auto}" --dist loadfile --durations=25 \
  --ignore-glob='*/tests/integrations/test_verl*.py' --ignore-glob='*/igpo_rewards/integrations/*verl*.py' "$@"
