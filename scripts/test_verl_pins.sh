#!/usr/bin/env bash
# The verl-pins job: the verl tests on verl's own pins. scripts/test.sh installs verl without its
# requirements beside a transformers verl 0.9.1 does not allow (the trainer's), and leaves the
# verl tests to this job. It creates .venv-verl-pins (once) with the `verl` extra (verl with its
# requirements, as users install it), `verl-cpu` (the TransferQueue and server pieces the CPU
# tests run), `test`, `server` and `hf`, pinned by constraints-verl-pins.txt (verl, transformers)
# and the CPU torch of constraints-cpu.txt, then runs every verl test file and the verl modules'
# doctests. `.ci/run` runs it after the TRL floor job. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv-verl-pins/bin/python ]; then
  python3 -m venv .venv-verl-pins
fi
.venv-verl-pins/bin/python -m pip install --quiet --upgrade pip
.venv-verl-pins/bin/python -m pip install --quiet -c constraints-cpu.txt -c constraints-verl-pins.txt \
  -e ".[verl,verl-cpu,test,server,hf]"
# test_verl.py checks that the verl and transformers it imports are these.
IGPO_EXPECT_VERL="$(sed -n 's/^verl==//p' constraints-verl-pins.txt)"
IGPO_EXPECT_TRANSFORMERS="$(sed -n 's/^transformers==//p' constraints-verl-pins.txt)"
export IGPO_EXPECT_VERL IGPO_EXPECT_TRANSFORMERS
exec .venv-verl-pins/bin/python -m pytest -n "${IGPO_TEST_WORKERS:-auto}" --dist loadfile --durations=10 \
  tests/integrations/test_verl*.py igpo_rewards/integrations/*verl*.py "$@"
