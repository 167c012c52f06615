#!/usr/bin/env bash
# The TRL tool-loop floor job: IGPOTrainer on TRL's own tool loop (tools= / environment_factory=) on
# the oldest releases pyproject's `trl-tools` extra allows (trl 1.14.2, transformers 5.13.0).
# scripts/test.sh tests the newest TRL (.venv); this creates .venv-trl-tools-floor (once) with the
# `trl-tools`, `test` and `server` extras (the tests and the example serve a corpus with
# igpo-retrieve), the floors pinned by constraints-trl-tools-floor.txt and the CPU torch of
# constraints-cpu.txt, then runs tests/integrations/test_trl_tools.py there.
# `.ci/run` runs it after scripts/test_trl_floor.sh. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv-trl-tools-floor/bin/python ]; then
  python3 -m venv .venv-trl-tools-floor
fi
.venv-trl-tools-floor/bin/python -m pip install --quiet --upgrade pip
.venv-trl-tools-floor/bin/python -m pip install --quiet -c constraints-cpu.txt -c constraints-trl-tools-floor.txt -e ".[trl-tools,test,server]"
# test_trl_tools.py checks that the TRL and transformers it imports are these.
IGPO_EXPECT_TRL_TOOLS="$(sed -n 's/^trl==//p' constraints-trl-tools-floor.txt)"
export IGPO_EXPECT_TRL_TOOLS
exec .venv-trl-tools-floor/bin/python -m pytest tests/integrations/test_trl_tools.py "$@"
