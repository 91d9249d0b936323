"""Stage 1 from the command line: layer selection (``--layer_calib_dp``) and width selection (``--width_calib``).

The flags of :class:`amoeba.args.CalibrationArguments` become the inputs of the components: the calibration
text (:mod:`amoeba.text_data`) or MMLU questions (:mod:`amoeba.mmlu`), the layer DP and ShortGPT's Block Influence
(:mod:`amoeba.depth_dp`), FLAP (:mod:`amoeba.flap`). Written into ``--output_dir``: ``final_strategy.npy`` with
``dp_table.json``/``.md`` (layers; also ``block_influence.json`` for ShortGPT), ``width_mask.npy`` and
``width_bias.npy`` with ``width_summary.json``/``.md`` (widths).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amoeba.args import Arguments
from amoeba.depth_dp import (DPResult, LayerDropScorer, block_influence, calibration_metric_name, check_calib_dataset,
                             dataset_record_name, dp_size, mmlu_calibration_examples, mmlu_scorer, select_layers_dp,
                             shortgpt_masks, text_scorer, write_depth_table, write_dp_outputs)
from amoeba.errors import UsageError, for_flag
from amoeba.files import write_json
from amoeba.flap import calibrate_widths, write_width_files
from amoeba.mmlu import SPLITS, load_mmlu, split_name
from amoeba.model_state import eval_mode
from amoeba.npy import save_npy
from amoeba.strategy import describe_calibration
from amoeba.text_data import TEXT_CORPORA, calibration_split, calibration_text, token_windows

logger = logging.getLogger(__name__)

LAYER_METHODS = ("dp", "shortgpt")


def calibration_windows(args: Arguments, tokenizer, purpose: str) -> torch.Tensor:
    """``--num_calib_sample`` windows of ``--calib_seqlen`` tokens from the ``--calib_dataset`` text (seeded by
    ``--seed``)."""
    c = args.calibration
    with for_flag("--calib_dataset"):
        text = calibration_text(c.calib_dataset, args.data_dir, purpose)
    with for_flag("--calib_seqlen"):
        return token_windows(tokenizer, text, c.calib_seqlen, n=c.num_calib_sample, seed=args.train.seed)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
def layer_scorer(args: Arguments, model: nn.Module, tokenizer, naive: bool = False,
                 progress: bool = True) -> LayerDropScorer:
    """The calibration set and metric the flags ask for, ready to score layer masks. The scorer's ``record`` says
    how it calibrates (dataset, split, metric, samples), for the strategy file."""
    c = args.calibration
    dataset = check_calib_dataset(c.calib_dataset)
    metric_name = calibration_metric_name(dataset, c.calib_metric)
    if dataset == "mmlu":
        scorer, record = _mmlu_scorer(args, model, tokenizer, metric_name, naive, progress)
    else:
        windows = calibration_windows(args, tokenizer, "the layer DP")
        scorer = text_scorer(model, windows, c.calib_batch_size, naive=naive, progress=progress)
        logger.info("layer DP on %d windows of %d tokens from %s, metric perplexity", windows.shape[0],
                    c.calib_seqlen, dataset)
        record = {"dataset": dataset_record_name(dataset), "split": calibration_split(dataset, args.data_dir),
                  "metric": "ppl", "higher_is_better": False, "num_calib_sample": int(c.num_calib_sample),
                  "sequences": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": int(args.train.seed)}
    scorer.record = {"method": "dp", **record}
    return scorer


def _mmlu_scorer(args: Arguments, model: nn.Module, tokenizer, metric_name: str, naive: bool,
                 progress: bool) -> tuple[LayerDropScorer, dict]:
    """The layer DP on MMLU (``--calib_dataset mmlu``): the scorer and its calibration record."""
    c, e = args.calibration, args.evaluation
    split = c.calib_mmlu_split
    if split not in SPLITS:
        raise UsageError(f"'{split}' is not an MMLU split (eval, test, dev)", "--calib_mmlu_split")
    if SPLITS[split] == "test":
        logger.warning("!!! calibrating on the MMLU TEST split: MMLU test accuracies of the selected subnets "
                       "are then biased; use --calib_mmlu_split eval !!!")
    if e.do_mmlu_eval and SPLITS[split] == SPLITS.get(e.mmlu_split):
        logger.warning("!!! calibrating on the same MMLU split that this run reports (--mmlu_split %s): "
                       "its accuracies are biased !!!", e.mmlu_split)
    shots = 0 if e.mmlu_dataset == "mmlu-zs" else 5
    group = int(args.train.per_device_eval_batch_size or 8)
    examples = mmlu_calibration_examples(load_mmlu(split, shots, args.data_dir), c.num_calib_sample, group,
                                         e.max_mmlu_samples)
    scorer = mmlu_scorer(model, tokenizer, examples, metric_name, group, c.calib_batch_size, e.mmlu_source_max_len,
                         naive=naive, progress=progress)
    logger.info("layer DP on the first %d MMLU %s questions (%d-shot, %s), metric %s", len(examples), split,
                shots, f"--max_mmlu_samples {e.max_mmlu_samples}" if e.max_mmlu_samples is not None
                else f"{c.num_calib_sample} batches of {group}", scorer.metric.name)
    record = {"dataset": "mmlu", "split": split_name(split), "metric": metric_name,
              "higher_is_better": scorer.metric.higher_is_better, "num_calib_sample": int(c.num_calib_sample),
              "batch_size": group, "questions": len(examples), "shots": shots}
    if e.max_mmlu_samples is not None:
        record["max_mmlu_samples"] = int(e.max_mmlu_samples)
    return scorer, record


def run_layer_calibration(args: Arguments, model: nn.Module, tokenizer, naive: bool = False,
                          progress: bool = True) -> DPResult:
    """``--layer_calib_dp``: fill the DP table and write the strategy files into ``--output_dir``
    (``--layer_select_method shortgpt``: :func:`run_block_influence_selection`)."""
    c = args.calibration
    num_layers = int(model.config.num_hidden_layers)
    dp_size(num_layers, args.elastic.min_num_layer, c.dp_keep_last_layer)  # bad flags fail before any data loads
    if c.layer_select_method not in LAYER_METHODS:
        raise UsageError(f"'{c.layer_select_method}' is not a method (dp, shortgpt)", "--layer_select_method")
    if c.layer_select_method == "shortgpt":
        return run_block_influence_selection(args, model, tokenizer)
    with eval_mode(model):
        prep = time.perf_counter()
        scorer = layer_scorer(args, model, tokenizer, naive=naive, progress=progress)
        prep = time.perf_counter() - prep
        result = select_layers_dp(num_layers, args.elastic.min_num_layer, c.dp_keep_last_layer, scorer.score,
                                  scorer.higher_is_better, progress=progress)
    result.seconds += prep
    result.info = {"calib_dataset": dataset_record_name(check_calib_dataset(c.calib_dataset)),
                   "metric": scorer.metric.name, "num_calib_sample": c.num_calib_sample,
                   "calib_seqlen": c.calib_seqlen, "calib_batch_size": c.calib_batch_size, "seed": args.train.seed,
                   "mode": "naive" if naive else "cached", "layer_forwards": scorer.layer_calls,
                   "setup_seconds": round(prep, 3), "calibration": scorer.record}
    # How the layers were chosen travels with them: merge_depth_width.py carries it into the strategy file.
    result.final["calibration"] = {"layers": dict(scorer.record)}
    output_dir = args.train.output_dir
    write_dp_outputs(Path(output_dir), result)
    logger.info("layer DP: %d subnets scored in %.1f s; strategy in %s", result.evaluations, result.seconds,
                output_dir)
    return result


def run_block_influence_selection(args: Arguments, model: nn.Module, tokenizer) -> dict:
    """``--layer_calib_dp --layer_select_method shortgpt``: the ShortGPT baseline in the same file layout.

    Block Influence (``1 - cos`` between a layer's input and output) is measured on the text calibration
    windows; depth ``n - m`` drops the ``m`` layers of lowest influence. Writes ``final_strategy.npy`` (the
    seed's ``{'strategy', 'metric'}`` with the summed influence of the dropped layers as metric) and
    ``block_influence.json``/``dp_table.md``. Returns the ``final`` dict."""
    c, seed = args.calibration, args.train.seed
    dataset = check_calib_dataset(c.calib_dataset)
    if dataset == "mmlu":
        raise UsageError("Block Influence is measured on text; use c4, wikitext2 or a text file",
                         "--calib_dataset")
    num_layers = int(model.config.num_hidden_layers)
    keep_last = max(int(c.dp_keep_last_layer), 0)
    start = time.perf_counter()
    windows = calibration_windows(args, tokenizer, "ShortGPT layer selection")
    with eval_mode(model):
        bi = block_influence(model, windows, c.calib_batch_size)
    masks = shortgpt_masks(bi, args.elastic.min_num_layer, keep_last)
    record = {"method": "shortgpt", "dataset": dataset_record_name(dataset),
              "split": calibration_split(dataset, args.data_dir), "metric": "block_influence",
              "higher_is_better": False, "num_calib_sample": int(c.num_calib_sample),
              "sequences": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": int(seed)}
    final = {"strategy": {m: mask.astype(np.float32) for m, mask in masks.items()},
             "metric": {m: float(bi[mask < 0.5].sum()) for m, mask in masks.items()},
             "calibration": {"layers": record}}
    out = Path(args.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "final_strategy.npy", final)
    seconds = time.perf_counter() - start
    rows = [{"num_layers": num_layers - m, "removed": m, "removed_layers": [int(i) for i in np.flatnonzero(k < 0.5)],
             "score": final["metric"][m]} for m, k in sorted(masks.items())]
    write_json(out / "block_influence.json", {
        "method": "shortgpt", "num_layers": num_layers, "keep_last": keep_last,
        "calib_dataset": dataset_record_name(dataset), "num_calib_sample": int(windows.shape[0]),
        "calib_seqlen": c.calib_seqlen, "seed": seed, "seconds": round(seconds, 3), "calibration": record,
        "block_influence": [float(x) for x in bi], "depths": rows})
    write_depth_table(out, "Layer selection (ShortGPT: lowest Block Influence dropped)",
                      "Block Influence per layer: " + ", ".join(f"{i}: {x:.4f}" for i, x in enumerate(bi))
                      + f".\n\nCalibration: {describe_calibration(record)}.", "summed influence removed", rows)
    logger.info("ShortGPT layer selection from %d windows in %.1f s; strategy in %s", windows.shape[0], seconds, out)
    return final


# ----------------------------------------------------------------------------------------------
# Widths
# ----------------------------------------------------------------------------------------------
def run_width_calibration(args: Arguments, model: nn.Module, tokenizer, bias: bool = True) -> dict:
    """``--width_calib``: score, select and write the width masks and biases of every ``--width_choice`` ratio.

    ``bias=False`` writes zero biases (the "FLAP without bias compensation" baseline). Returns the summary.
    """
    c = args.calibration
    started = time.time()
    ids = None
    if c.prune_width_method == "flap":
        if c.calib_dataset == "mmlu":
            raise UsageError("FLAP calibrates on text; mmlu is for the layer DP. Use one of "
                             f"{', '.join(TEXT_CORPORA)} or a local .txt/.json/.jsonl file", "--calib_dataset")
        ids = calibration_windows(args, tokenizer, "FLAP")
    result = calibrate_widths(model, ids, args.width_choice, c.prune_width_method, c.width_mode, c.width_align,
                              c.calib_batch_size, bias=bias, data=c.calib_dataset, started=started)
    output_dir = args.train.output_dir
    write_width_files(output_dir, result.masks, result.bias, result.summary)
    fractions = ", ".join(f"{r:g}: {result.selection.kept_fraction[r]:.3f}" for r in result.selection.ratios)
    logger.info("width masks written to %s (kept parameter fraction %s)", output_dir, fractions)
    print(f"width calibration done: {Path(output_dir) / 'width_mask.npy'}, {Path(output_dir) / 'width_bias.npy'}")
    return result.summary
