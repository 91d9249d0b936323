#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU, reading real data from ../shared/data.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AMOEBA_DATA_DIR=${AMOEBA_DATA_DIR:-$(cd .. && pwd)/shared/data}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
exec .venv/bin/python -m pytest -q "$@"
