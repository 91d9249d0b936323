"""The SmolLM2-135M-Instruct experiment of docs/RESULTS.md: ``scripts/experiment.py`` with its ``smollm2`` preset
(the default), kept under this name so the commands in the docs run as written.

    python scripts/experiment_smollm2.py --out output/experiment                 # everything, resumable
    python scripts/experiment_smollm2.py --out output/experiment --phase report --docs docs/results_tables.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment import *  # noqa: E402,F401,F403  (the driver's names, for callers that import this file)
from experiment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
