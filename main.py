"""AmoebaLLM: the single entry point for every stage.

    python main.py --model_name_or_path <model> --output_dir <dir> [stage flags]

Stage 1 (calibration): ``--layer_calib_dp`` (layer DP) and ``--width_calib`` (FLAP widths).
Stage 2 (one-for-all fine-tuning): ``--do_train True --enable_shrinking --shrinking_file ...``.
Evaluation: ``--do_eval True`` with ``--do_mmlu_eval``, ``--do_eval_wikitext2``, ``--do_lm_eval``, at the
shapes ``--eval_num_layer``/``--eval_num_width``. Export: ``--export_dir``. See README.md.
"""

from __future__ import annotations

import logging
import sys

from amoeba.errors import Interrupted, UsageError

logger = logging.getLogger("amoeba.main")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the requested stages; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        # Imported inside the try: Ctrl-C during the seconds-long imports ends as one line, not a traceback. The
        # stages load only once the command has parsed, so --help and a mistyped flag answer at once.
        from amoeba.args import parse_args

        args = parse_args(argv)
        from amoeba.pipeline import run

        run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
