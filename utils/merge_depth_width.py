"""Stage 1, step 3: merge the layer strategy and the width masks/biases into ``dp_selection_strategy.npy``.

    python utils/merge_depth_width.py [--depth output/calib_dp/final_strategy.npy]
                                      [--width_mask output/width_calib/width_mask.npy]
                                      [--width_bias output/width_calib/width_bias.npy]
                                      [--out dp_selection_strategy.npy]

    # other layers, same widths: the width masks and biases of an existing merged strategy
    python utils/merge_depth_width.py --depth output/shortgpt/final_strategy.npy \
                                      --width_from dp_selection_strategy.npy --out shortgpt_strategy.npy

The defaults are the seed's paths. Inputs are read without executing code; the result is written
atomically, next to a readable view (``<out stem>.json`` and ``.md``). The result carries how its layers
were calibrated (the record the layer DP wrote into ``final_strategy.npy``) and how its widths were
(``width_summary.json`` next to the width masks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from amoeba.errors import UsageError  # noqa: E402
from amoeba.files import writable_file  # noqa: E402
from amoeba.npy import load_npy_dict  # noqa: E402
from amoeba.strategy import (Strategy, is_plain_record, load_strategy,  # noqa: E402
                             normalise_width_dict, save_strategy, view_paths)

DEFAULT_DEPTH = "output/calib_dp/final_strategy.npy"
DEFAULT_WIDTH_MASK = "output/width_calib/width_mask.npy"
DEFAULT_WIDTH_BIAS = "output/width_calib/width_bias.npy"
DEFAULT_OUT = "dp_selection_strategy.npy"


def merge_depth_width(depth: str | Path, width_mask: str | Path, width_bias: str | Path,
                      out: str | Path) -> Strategy:
    """Merge the three Stage 1 files into one strategy file at ``out``; return the merged strategy."""
    for path, flag in ((depth, "--depth"), (width_mask, "--width_mask"), (width_bias, "--width_bias")):
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}", flag)
    strategy = load_strategy(depth, "--depth")
    problems: list[str] = []
    raw_masks = load_npy_dict(width_mask, "--width_mask")
    raw_bias = load_npy_dict(width_bias, "--width_bias")
    # A width file may carry its own calibration record next to the modules; it is no module.
    width_record = raw_masks.pop("calibration", None)
    raw_bias.pop("calibration", None)
    masks, pre1 = normalise_width_dict(raw_masks, "width_mask", problems, binary=True)
    bias, pre2 = normalise_width_dict(raw_bias, "bias", problems, binary=False)
    if problems:
        raise UsageError("the width files are not valid: " + "; ".join(problems), "--width_mask")
    if not any(masks.values()):
        raise UsageError(f"{width_mask} holds no width masks", "--width_mask")
    merged = Strategy(strategy.layer_masks, strategy.metric, masks, bias, dict(strategy.info), source=str(out),
                      original_layout=strategy.original_layout or pre1 or pre2,
                      calibration=dict(strategy.calibration))
    width_layers = Strategy({}, width_mask=masks).num_layers
    if width_layers != strategy.num_layers:
        raise UsageError(f"{depth} is for a {strategy.num_layers}-layer model, {width_mask} covers {width_layers} "
                         "layers: they come from different models", "--width_mask")
    mask_ratios = merged.widths()
    bias_ratios = sorted({r for d in bias.values() if d for r in d})
    if bias_ratios and bias_ratios != mask_ratios:
        raise UsageError(f"{width_bias} holds widths {bias_ratios}, {width_mask} holds {mask_ratios}", "--width_bias")
    summary = Path(width_mask).with_name("width_summary.json")
    facts: dict = {}
    if summary.is_file():  # shape facts (head_dim...) for the readable view, and how the widths were made
        try:
            facts = json.loads(summary.read_text(encoding="utf-8"))
            merged.info.update(facts.get("info") or {})
        except (OSError, ValueError, AttributeError):
            facts = {}
    record = width_calibration_record(width_record, facts if isinstance(facts, dict) else {})
    if record:
        merged.calibration["widths"] = record
    save_strategy(merged, out)
    return merged


def width_calibration_record(record, summary: dict) -> dict:
    """How the widths were calibrated: the width file's own record when it has one, else what its
    ``width_summary.json`` says (method, mode, bias compensation, calibration data); {} when neither does."""
    if isinstance(record, dict) and record and is_plain_record(record):
        return dict(record)
    keys = ("method", "mode", "bias", "calibration", "num_tokens")
    return {k: summary[k] for k in keys if k in summary and isinstance(summary[k], (str, int, float, bool))}


def replace_depth(depth: str | Path, width_from: str | Path, out: str | Path) -> Strategy:
    """The strategy ``width_from`` with its layer masks replaced by those of ``depth``, written to ``out``."""
    for path, flag in ((depth, "--depth"), (width_from, "--width_from")):
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}", flag)
    layers = load_strategy(depth, "--depth")
    widths = load_strategy(width_from, "--width_from")
    if not widths.has_width:
        raise UsageError(f"{width_from} holds no width masks", "--width_from")
    if widths.num_layers != layers.num_layers:
        raise UsageError(f"{depth} is for a {layers.num_layers}-layer model, {width_from} for "
                         f"{widths.num_layers} layers", "--width_from")
    calibration = {part: record for part, record in (("layers", layers.calibration.get("layers")),
                                                       ("widths", widths.calibration.get("widths"))) if record}
    merged = Strategy(layers.layer_masks, layers.metric, widths.width_mask, widths.bias,
                      {**widths.info, **layers.info}, source=str(out),
                      original_layout=layers.original_layout or widths.original_layout, calibration=calibration)
    save_strategy(merged, out)
    return merged


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", default=DEFAULT_DEPTH, help="layer strategy from --layer_calib_dp")
    parser.add_argument("--width_mask", default=DEFAULT_WIDTH_MASK, help="width masks from --width_calib")
    parser.add_argument("--width_bias", default=DEFAULT_WIDTH_BIAS, help="FLAP biases from --width_calib")
    parser.add_argument("--width_from", default=None, help="take the widths from this merged strategy "
                                                           "instead of --width_mask/--width_bias")
    parser.add_argument("--out", default=DEFAULT_OUT, help="merged strategy file to write")
    args = parser.parse_args(argv)
    try:
        writable_file(args.out, "--out")  # before reading anything: a folder or an unwritable place is refused
        if args.width_from:
            merged = replace_depth(args.depth, args.width_from, args.out)
        else:
            merged = merge_depth_width(args.depth, args.width_mask, args.width_bias, args.out)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    depths = ", ".join(map(str, sorted(merged.depths(), reverse=True)))
    widths = ", ".join(f"{r:g}" for r in sorted(merged.widths(), reverse=True))
    print(f"wrote {args.out}: depths {depths}; widths {widths} (view: {view_paths(args.out)[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
