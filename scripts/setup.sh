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
# verl, for tests/integrations/test_verl*.py: installed WITHOUT its dependencies. verl's declared
# requirements pin transformers < 5.11 (the trainer uses a newer one) and pull wandb and
# tensorboard, none of which the parts the tests run on CPU (DataProto, core_algos, ray_trainer,
# the agent-loop workers, the reward loop, the V1 trainer module with its TransferQueue) need. What
# those parts import is the `verl-cpu` extra (in `dev`).
# Users on GPU machines install `igpo-rewards[verl]`, which takes verl with its requirements.
.venv/bin/python -m pip install --quiet --no-deps "verl==0.9.1"
