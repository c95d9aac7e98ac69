#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv, the CPU build of torch
# first (so nothing pulls a multi-GB CUDA build), then np2torch with its test extras, then the
# bundled example data. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU build this machine keeps on disk; later requirements then
# find torch already satisfied and install nothing more.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python data/make_examples.py
echo "np2torch is set up. Activate it with: source .venv/bin/activate"
