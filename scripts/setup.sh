#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv, the CPU build of torch
# first (so nothing pulls a multi-GB CUDA build), then np2torch with its test extras, the
# bundled example data, and (as root, where apt exists) Debian's Chromium for the UI test.
# The `frameworks` extra (Keras 3, transformers, Flax on CPU JAX, h5py, msgpack; about 850 MB,
# no TensorFlow) feeds the conformance suite in tests/conformance/; NP2TORCH_NO_FRAMEWORKS=1
# skips it (those tests then skip, saying why). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU build this machine keeps on disk; later requirements then
# find torch already satisfied and install nothing more.
echo "setup: installing the CPU build of torch 2.13.0 into .venv"
.venv/bin/python -m pip install -q "torch==2.13.0"
EXTRAS="dev,frameworks"
[ "${NP2TORCH_NO_FRAMEWORKS:-0}" = 1 ] && EXTRAS="dev"
echo "setup: installing np2torch with extras [$EXTRAS] into .venv"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
if [ "$EXTRAS" = "dev,frameworks" ]; then
  # timm and its own JAX ViT loader are the conformance oracle for Google ViT files. PyPI's
  # torchvision for torch 2.13 is a CUDA build whose import fails beside the CPU torch (and
  # would then break transformers' imports), so they go to a folder of their own that only the
  # tests that need timm put on sys.path.
  echo "setup: installing timm (test oracle) into .venv/timm-oracle"
  .venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/timm-oracle "timm==1.0.31" "torchvision==0.28.0" "pillow>=10"
fi
# nothing may replace the CPU torch installed above
.venv/bin/python -c 'import importlib.metadata as m, sys; v = m.version("torch"); sys.exit(0 if v.startswith("2.13.0") else f"torch {v} replaced 2.13.0")' 
.venv/bin/python data/make_examples.py
# The browser test drives Debian's Chromium through Playwright (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium (system package, used only by the Prefect UI browser test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing; the browser test will be skipped (apt-get install chromium)"
  fi
fi
echo
echo "np2torch is set up. Next:"
echo "  source .venv/bin/activate"
echo "  np2torch convert configs/examples/keras-cnn.yaml    # or: python -m pytest -q"
