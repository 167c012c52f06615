#!/usr/bin/env bash
# The TRL floor job: IGPOTrainer's tests on the oldest releases pyproject's `trl` extra allows.
# scripts/test.sh tests the newest TRL (.venv); this creates .venv-trl-floor (once) with the
# `trl`, `test` and `server` extras (the search rollout's tests serve a corpus with igpo-retrieve),
# the floors pinned by constraints-trl-floor.txt (trl, transformers, accelerate) and the CPU torch
# of constraints-cpu.txt, then runs tests/integrations/test_trl.py and test_trl_search.py there.
# `.ci/run` runs it after scripts/test.sh. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv-trl-floor/bin/python ]; then
  python3 -m venv .venv-trl-floor
fi
.venv-trl-floor/bin/python -m pip install --quiet --upgrade pip
.venv-trl-floor/bin/python -m pip install --quiet -c constraints-cpu.txt -c constraints-trl-floor.txt -e ".[trl,test,server]"
# test_trl.py checks that the TRL it imports is this one.
IGPO_EXPECT_TRL="$(sed -n 's/^trl==//p' constraints-trl-floor.txt)"
export IGPO_EXPECT_TRL
exec .venv-trl-floor/bin/python -m pytest tests/integrations/test_trl.py tests/integrations/test_trl_search.py "$@"
