"""Benchmark: quality of the Stage 1 subnet selection (no fine-tuning), and the layer-DP speed-up.

Quality (default mode), on one model with real data:

- depth: WikiText-2 TEST perplexity of the layers chosen by the DP (calibrated on the C4 sample, not on
  WikiText-2) against dropping the last layers and against ShortGPT (dropping the layers of lowest Block
  Influence, measured on the same C4 windows);
- width: WikiText-2 TEST perplexity at each ratio with FLAP (bias compensation on), FLAP without the bias,
  and weight-magnitude channel choice (same global selection rule, only the importance score differs).

Timing (``--timing``): wall time of the whole DP, cached against naive (identical masks are checked),
on the given model, plus on a random-weight 32-layer 7B-shaped Llama when CUDA is present.

    python scripts/bench_stage1.py --out results/bench_stage1.json                  # quality
    python scripts/bench_stage1.py --timing --out results/bench_stage1_timing.json  # DP speed
    python scripts/bench_stage1.py --smoke --out /tmp/s1.json                       # tiny, CPU

Prints a markdown table at the end and writes every number to ``--out`` (json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoeba.args import parse_ratio_list  # noqa: E402
from amoeba.depth_dp import (LayerDropScorer, PerplexityMetric, block_influence, first_layers_masks,  # noqa: E402
                             select_layers_dp, shortgpt_masks, text_batches)
from amoeba.files import write_json  # noqa: E402
from amoeba.subnet import width_key  # noqa: E402
from amoeba.text_data import load_text, perplexity, token_windows  # noqa: E402

logger = logging.getLogger("bench_stage1")

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    """Command-line options (defaults: the quality benchmark on SmolLM2-135M-Instruct)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="model folder")
    p.add_argument("--data_dir", default=None, help="offline data directory (default: $AMOEBA_DATA_DIR)")
    p.add_argument("--out", default="results/bench_stage1.json", help="json file for the results")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights and compute")
    p.add_argument("--calib_dataset", default="c4", help="calibration corpus for DP, Block Influence and FLAP")
    p.add_argument("--calib_samples", type=int, default=32, help="calibration windows (DP and Block Influence)")
    p.add_argument("--calib_seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--flap_samples", type=int, default=128, help="calibration windows for FLAP")
    p.add_argument("--eval_windows", type=int, default=0, help="WikiText-2 test windows (0: the whole split)")
    p.add_argument("--eval_seqlen", type=int, default=512, help="tokens per WikiText-2 window")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--depths", default="26,22,18", help="depths to compare")
    p.add_argument("--widths", default="7/8,3/4,5/8", help="width ratios to compare")
    p.add_argument("--width_mode", default="global", choices=["global", "uniform"], help="width selection rule")
    p.add_argument("--keep_last", type=int, default=1, help="--dp_keep_last_layer for the DP")
    p.add_argument("--dp_strategy", default=None,
                   help="reuse a final_strategy.npy from --layer_calib_dp instead of running the DP here")
    p.add_argument("--seed", type=int, default=42, help="seed of the calibration windows")
    p.add_argument("--skip_width", action="store_true", help="depth comparison only")
    p.add_argument("--skip_depth", action="store_true", help="width comparison only")
    p.add_argument("--timing", action="store_true", help="time the DP (cached vs naive) instead")
    p.add_argument("--timing_min_layer", type=int, default=None,
                   help="--min_num_layer of the timed DP (default: the smallest of --depths)")
    p.add_argument("--no_7b", action="store_true", help="timing: skip the random 7B-shaped model")
    p.add_argument("--smoke", action="store_true", help="tiny settings that finish in minutes on a CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.calib_samples, args.calib_seqlen, args.flap_samples = 4, 64, 4
        args.eval_windows, args.eval_seqlen = 2, 128
        args.depths, args.widths = "28,27", "3/4"
        args.timing_min_layer = args.timing_min_layer or 27
    return args


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (fp16 falls back to fp32 without CUDA)."""
    if name == "fp16" and not torch.cuda.is_available():
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load(args):
    """The model (eval mode, on the GPU when there is one) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype_of(args.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    model.config.use_cache = False
    return model.eval(), AutoTokenizer.from_pretrained(args.model)


def eval_windows(args, tokenizer) -> torch.Tensor:
    """Consecutive WikiText-2 test windows (the first ``--eval_windows`` of them, or all)."""
    text = load_text("wikitext2", "test", args.data_dir)
    return token_windows(tokenizer, text, args.eval_seqlen, n=args.eval_windows or None)


def calib_windows(args, tokenizer, n: int) -> torch.Tensor:
    """Seeded random windows of the calibration corpus."""
    text = load_text(args.calib_dataset, "validation", args.data_dir)
    return token_windows(tokenizer, text, args.calib_seqlen, n=n, seed=args.seed)


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------
def dp_masks(args, model, calib: torch.Tensor, min_layers: int) -> tuple[dict, dict]:
    """{removed: mask} chosen by the DP (run here, or read from ``--dp_strategy``) and facts about it."""
    if args.dp_strategy:
        from amoeba.strategy import load_strategy

        strategy = load_strategy(args.dp_strategy, "--dp_strategy")
        return {m: np.asarray(v, dtype=np.float64) for m, v in strategy.layer_masks.items() if m}, \
            {"source": args.dp_strategy}
    scorer = LayerDropScorer(model, text_batches(calib, args.batch_size),
                             PerplexityMetric(model.get_output_embeddings()))
    res = select_layers_dp(model.config.num_hidden_layers, min_layers, args.keep_last, scorer.score, False)
    return res.final["strategy"], {"source": "computed", "seconds": round(res.seconds, 1),
                                   "evaluations": res.evaluations}


def depth_benchmark(args, model, tokenizer, wiki: torch.Tensor, calib: torch.Tensor) -> dict:
    """Perplexity of each depth under the three layer choices."""
    from amoeba.elastic import make_elastic
    from amoeba.subnet import Subnet

    em = make_elastic(model)
    n = em.num_layers
    depths = [int(d) for d in args.depths.split(",")]
    min_layers = min(depths)
    t0 = time.perf_counter()
    dp, dp_info = dp_masks(args, model, calib, min_layers)
    bi = block_influence(model, calib, args.batch_size)
    choices = {"DP (C4 ppl)": dp, "drop last layers": first_layers_masks(n, min_layers),
               "ShortGPT (Block Influence)": shortgpt_masks(bi, min_layers)}
    rows = []
    for depth in depths:
        row = {"depth": depth}
        for name, masks in choices.items():
            mask = masks[n - depth]
            with em.use(Subnet.from_mask(mask)):
                row[name] = perplexity(model, wiki, args.batch_size, progress=True)
            row[name + " removed"] = [int(i) for i in np.flatnonzero(np.asarray(mask) < 0.5)]
            logger.info("depth %d %s: %.3f", depth, name, row[name])
        rows.append(row)
    return {"rows": rows, "block_influence": [round(float(x), 5) for x in bi], "dp": dp_info,
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# Width
# ----------------------------------------------------------------------------------------------
def width_benchmark(args, tokenizer, wiki: torch.Tensor, calib: torch.Tensor) -> dict:
    """Perplexity at each width ratio under FLAP (+bias), FLAP without bias and weight magnitude."""
    from amoeba.elastic import make_elastic
    from amoeba.flap import compensation_biases, flap_scores, select_widths, unit_costs, width_dicts
    from amoeba.strategy import Strategy, apply_strategy
    from amoeba.subnet import Subnet

    ratios = tuple(width_key(r) for r in parse_ratio_list(args.widths, "--widths"))
    t0 = time.perf_counter()
    methods = (("FLAP + bias", "flap", True), ("FLAP, no bias", "flap", False), ("weight magnitude", "magnitude", False))
    results: dict = {r: {} for r in ratios}
    kept: dict = {}
    scores_cache: dict = {}
    for name, metric, bias in methods:
        model, _ = load(args)  # a fresh copy: each choice reorders the weights its own way
        em = make_elastic(model)
        if metric not in scores_cache:
            scores_cache[metric] = flap_scores(model, calib if metric == "flap" else None, args.batch_size,
                                               method=metric)
        scores = scores_cache[metric]
        selection = select_widths(scores.group_score, scores.channel_score, ratios, args.width_mode,
                                  *unit_costs(em))
        biases = compensation_biases(em, scores.stats, selection, enabled=bias and scores.stats is not None)
        masks, bias_dict = width_dicts(em, selection, biases)
        strategy = Strategy({0: np.ones(em.num_layers, dtype=np.float32)}, {}, masks, bias_dict,
                            source=f"{name} (in memory)")
        apply_strategy(em, strategy, ratios, nonuniform=True)
        for r in ratios:
            with em.use(Subnet(tuple(range(em.num_layers)), r)):
                results[r][name] = perplexity(model, wiki, args.batch_size, progress=True)
            logger.info("width %g %s: %.3f", r, name, results[r][name])
        kept[name] = {f"{r:g}": round(selection.kept_fraction[r], 4) for r in ratios}
        del model, em
    rows = [{"width": r, **results[r]} for r in ratios]
    return {"rows": rows, "kept_param_fraction": kept, "mode": args.width_mode,
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def sync():
    """Wait for queued GPU work (so wall times are real)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_dp(model, calib: torch.Tensor, batch_size: int, min_layers: int, keep_last: int) -> dict:
    """Wall time of the whole DP, naive and cached, and whether they chose the same layers."""
    out = {}
    results = {}
    for mode in ("naive", "cached"):
        sync()
        t0 = time.perf_counter()
        scorer = LayerDropScorer(model, text_batches(calib, batch_size),
                                 PerplexityMetric(model.get_output_embeddings()), naive=mode == "naive")
        res = select_layers_dp(model.config.num_hidden_layers, min_layers, keep_last, scorer.score, False)
        sync()
        out[mode + "_s"] = round(time.perf_counter() - t0, 2)
        out[mode + "_layer_forwards"] = scorer.layer_calls
        results[mode] = res
        del scorer
    a, b = results["naive"], results["cached"]
    out["evaluations"] = a.evaluations
    out["same_masks"] = bool(np.array_equal(a.strategy, b.strategy))
    finite = np.isfinite(a.metric)
    out["max_rel_score_diff"] = float(np.max(np.abs(a.metric[finite] - b.metric[finite]) / np.abs(a.metric[finite])))
    out["ratio"] = round(out["cached_s"] / out["naive_s"], 3)
    return out


def random_7b(dtype: torch.dtype):
    """A random-weight Llama-2-7B-shaped model on the GPU (timing only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model.eval()


def timing_benchmark(args, model, tokenizer) -> dict:
    """The DP timed on the given model and, on CUDA, on a random 7B-shaped model."""
    depths = [int(d) for d in args.depths.split(",")]
    min_layers = args.timing_min_layer or min(depths)
    calib = calib_windows(args, tokenizer, args.calib_samples)
    rows = [{"model": Path(args.model).name, "layers": model.config.num_hidden_layers, "min_num_layer": min_layers,
             "windows": f"{calib.shape[0]} x {calib.shape[1]}",
             **time_dp(model, calib, args.batch_size, min_layers, args.keep_last)}]
    if torch.cuda.is_available() and not args.no_7b:
        del model
        torch.cuda.empty_cache()
        big = random_7b(dtype_of(args.dtype))
        ids = torch.randint(0, 32000, tuple(calib.shape), generator=torch.Generator().manual_seed(args.seed))
        min_big = 20  # the seed's --min_num_layer for Llama-2-7B
        rows.append({"model": "random Llama-2-7B shape", "layers": 32, "min_num_layer": min_big,
                     "windows": f"{ids.shape[0]} x {ids.shape[1]}",
                     **time_dp(big, ids, args.batch_size, min_big, args.keep_last)})
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    """The result tables in markdown."""
    lines = []
    if "timing" in result:
        lines += ["| model | layers | min layers | windows | DP subnets | naive (s) | cached (s) | cached/naive "
                  "| same masks |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in result["timing"]["rows"]:
            lines.append(f"| {r['model']} | {r['layers']} | {r['min_num_layer']} | {r['windows']} | "
                         f"{r['evaluations']} | {r['naive_s']:.1f} | {r['cached_s']:.1f} | {r['ratio']:.2f} | "
                         f"{'yes' if r['same_masks'] else 'NO'} |")
        return "\n".join(lines)
    full = result["full_ppl"]
    if "depth" in result:
        names = ["DP (C4 ppl)", "drop last layers", "ShortGPT (Block Influence)"]
        lines += [f"WikiText-2 test perplexity by depth (full model, {result['layers']} layers: {full:.2f})", "",
                  "| layers | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
        for r in result["depth"]["rows"]:
            best = min(r[n] for n in names)
            cells = [(f"**{r[n]:.2f}**" if r[n] == best else f"{r[n]:.2f}") for n in names]
            lines.append(f"| {r['depth']} | " + " | ".join(cells) + " |")
        lines.append("")
    if "width" in result:
        names = ["FLAP + bias", "FLAP, no bias", "weight magnitude"]
        lines += [f"WikiText-2 test perplexity by width ({result['width']['mode']} selection; full width: "
                  f"{full:.2f})", "", "| width | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
        for r in result["width"]["rows"]:
            best = min(r[n] for n in names)
            cells = [(f"**{r[n]:.2f}**" if r[n] == best else f"{r[n]:.2f}") for n in names]
            lines.append(f"| {r['width']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark the flags ask for; print the table, write the json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    t0 = time.perf_counter()
    model, tokenizer = load(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    result = {"settings": vars(args), "device": device, "torch": torch.__version__}
    if args.timing:
        result["timing"] = timing_benchmark(args, model, tokenizer)
    else:
        wiki = eval_windows(args, tokenizer)
        calib = None if args.skip_depth else calib_windows(args, tokenizer, args.calib_samples)
        result["eval_tokens"] = f"{wiki.shape[0]} x {wiki.shape[1]}"
        result["layers"] = model.config.num_hidden_layers
        result["full_ppl"] = perplexity(model, wiki, args.batch_size, progress=True)
        logger.info("full model: %.3f", result["full_ppl"])
        if not args.skip_depth:
            result["depth"] = depth_benchmark(args, model, tokenizer, wiki, calib)
        if not args.skip_width:
            del model
            flap_calib = calib_windows(args, tokenizer, args.flap_samples)
            result["width"] = width_benchmark(args, tokenizer, wiki, flap_calib)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown(result)
    result["markdown"] = table
    write_json(args.out, result)
    print(table)
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
