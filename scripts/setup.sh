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
# verl, so that igpo_rewards.integrations.verl* import here (tests/test_docs.py resolves the names
# the docs give): installed WITHOUT its dependencies. verl's declared requirements pin
# transformers < 5.11 (the trainer uses a newer one) and pull wandb and tensorboard. What its CPU
# parts import is the `verl-cpu` extra (in `dev`). The verl tests run on verl's own pins in
# scripts/test_verl_pins.sh (.venv-verl-pins), not here.
# Users on GPU machines install `igpo-rewards[verl]`, which takes verl with its requirements.
.venv/bin/python -m pip install --quiet --no-deps "verl==0.9.1"
