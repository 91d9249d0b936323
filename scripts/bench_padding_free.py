"""Benchmark: Stage 2 with padding-free batches (``--padding_free``) against padded ones.

Two measurements:

1. **What padding costs on the data** (no model): the training set's examples drawn at random in batches of
   ``--batch`` (seeded), collated as Stage 2 collates them; the share of the positions a padded batch computes
   that are padding, and a packed one (``--padding_free``), over ``--count_batches`` batches (1000 by default:
   a 1000-step run's worth).
2. **Two short Stage 2 runs** of ``main.py``, one padded and one with ``--padding_free True``, the same seed,
   data, subnets and flags otherwise (the seed's recipe: MoE-LoRA r=64 x 5 experts, top-2, the sandwich with
   distillation and balancing, widths [1,7/8,3/4,5/8]); from each run's ``train_results.json`` and
   ``training_log.json``: input tokens per second, seconds, the padding share, and every subnet's loss per
   step, with the largest relative difference between the two runs' losses.

    python scripts/bench_padding_free.py --out output/bench_padding_free.json                       # CPU, fp32
    python scripts/bench_padding_free.py --steps 50 --extra "--bf16" --out bench_padding_free.json  # a GPU

Prints a markdown table at the end and writes every number to ``--out`` (json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amoeba.default_model import DEFAULT_MODEL_DIR  # noqa: E402
from amoeba.errors import UsageError  # noqa: E402
from amoeba.files import library_versions, write_json  # noqa: E402
from amoeba.instruct_data import InstructionCollator, InstructionData, make_data_module, pack_batch  # noqa: E402

logger = logging.getLogger("bench_padding_free")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / DEFAULT_MODEL_DIR), help="model folder (default: SmolLM2)")
    p.add_argument("--strategy", default=str(ROOT / "dp_selection_strategy.npy"),
                   help="the Stage 1 strategy of --model (default: the shipped SmolLM2 one)")
    p.add_argument("--dataset", default="alpaca-clean", help="instruction data, as main.py's --dataset")
    p.add_argument("--data_dir", default=os.environ.get("AMOEBA_DATA_DIR"),
                   help="offline data directory, as main.py's --data_dir (default: $AMOEBA_DATA_DIR)")
    p.add_argument("--batch", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--source_max_len", type=int, default=384)
    p.add_argument("--target_max_len", type=int, default=128)
    p.add_argument("--min_num_layer", type=int, default=18)
    p.add_argument("--count_batches", type=int, default=1000, help="batches counted in measurement 1")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps of each Stage 2 run (0: skip them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", default="", help="more main.py flags for both runs, e.g. \"--bf16\"")
    p.add_argument("--work_dir", default=None, help="where the runs write (default: a temporary folder)")
    p.add_argument("--out", required=True, help="json file for every number")
    args = p.parse_args(argv)
    for flag in ("batch", "count_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: must be at least 1")
    if args.steps < 0:
        p.error("--steps: must be at least 0")
    if args.steps and not Path(args.model).is_dir():
        p.error(f"--model: {args.model} is not a model folder (python main.py --materialize_default_model makes "
                "the default one)")
    if args.steps and not Path(args.strategy).is_file():
        p.error(f"--strategy: {args.strategy} does not exist")
    return args


def padding_of_the_data(args) -> dict:
    """Measurement 1: padded positions against real tokens over random batches of the training set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    data = make_data_module(tok, InstructionData(dataset=args.dataset, data_dir=args.data_dir,
                                                 source_max_len=args.source_max_len,
                                                 target_max_len=args.target_max_len, group_by_length=False))
    dataset = data["train_dataset"]
    collate = InstructionCollator(tok, args.source_max_len, args.target_max_len)
    packed_positions = 0
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    positions = tokens = 0
    longest = []
    for b in range(args.count_batches):
        picks = [order[(b * args.batch + i) % len(order)] for i in range(args.batch)]
        batch = collate([dataset[i] for i in picks])
        positions += batch["input_ids"].numel()
        packed_positions += pack_batch(batch)["input_ids"].numel()
        tokens += int(batch["attention_mask"].sum())
        longest.append(batch["input_ids"].shape[1])
    return {"batches": args.count_batches, "batch": args.batch, "positions": positions, "tokens": tokens,
            "padding_share": round(1 - tokens / positions, 4), "positions_per_token": round(positions / tokens, 3),
            "packed_positions": packed_positions, "packed_padding_share": round(1 - tokens / packed_positions, 4),
            "packed_positions_per_token": round(packed_positions / tokens, 3),
            "mean_tokens_per_example": round(tokens / (args.count_batches * args.batch), 1),
            "mean_padded_length": round(sum(longest) / len(longest), 1)}


def stage2_command(args, out: Path, padding_free: bool) -> list[str]:
    """The main.py command of one run."""
    flags = ["--model_name_or_path", args.model, "--output_dir", str(out), "--seed", str(args.seed),
             "--report_to", "none", "--do_train", "True", "--do_eval", "False", "--no_eval_orig",
             "--dataset", args.dataset, *(["--data_dir", args.data_dir] if args.data_dir else []),
             "--data_seed", "42", "--source_max_len", str(args.source_max_len),
             "--target_max_len", str(args.target_max_len), "--per_device_train_batch_size", str(args.batch),
             "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--learning_rate", "2e-4",
             "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--lora_modules", "all", "--lora_r", "64",
             "--lora_alpha", "16", "--logging_steps", "1", "--save_strategy", "no", "--optim", "adamw_torch",
             "--gradient_checkpointing", "False", "--group_by_length", "False", "--dataloader_num_workers", "0",
             "--enable_shrinking", "--min_num_layer", str(args.min_num_layer), "--shrinking_method", "calib_dp",
             "--shrinking_file", args.strategy, "--shrinkable_width", "--width_choice", "[1,7/8,3/4,5/8]",
             "--random_sample_num_layer", "2", "--distill_method", "sp", "--kd_weight", "1", "--use_moe_lora",
             "--moe_num_expert", "5", "--moe_topk", "2", "--padding_free", str(padding_free)]
    return [sys.executable, str(ROOT / "main.py"), *flags, *shlex.split(args.extra)]


def stage2_run(args, work: Path, padding_free: bool) -> dict:
    """One Stage 2 run: its results and its logged losses per step and subnet role."""
    name = "padding_free" if padding_free else "padded"
    out = work / name
    cmd = stage2_command(args, out, padding_free)
    logger.info("%s: %s", name, shlex.join(cmd))
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out / "train_results.json").read_text())
    log = json.loads((out / "training_log.json").read_text())
    losses = {}
    for row in log:
        if "loss" in row and "step" in row:
            for key, value in row.items():
                if key.startswith("loss_"):
                    losses.setdefault(key[5:], []).append(float(value))
    return {"command": shlex.join(cmd[1:]), "process_seconds": round(time.time() - start, 1),
            "train_runtime": results.get("train_runtime"), "tokens_seen": results.get("tokens_seen"),
            "tokens_per_second": results.get("tokens_per_second"), "padding_share": results.get("padding_share"),
            "losses": losses}


def compare(padded: dict, free: dict) -> dict:
    """Largest relative difference of the two runs' losses, per subnet role, and the speedup."""
    diff = {}
    for role, values in padded["losses"].items():
        other = free["losses"].get(role, [])
        if len(other) == len(values) and values:
            diff[role] = max(abs(a - b) / abs(a) for a, b in zip(values, other))
    speed = (free["tokens_per_second"] / padded["tokens_per_second"]
             if padded.get("tokens_per_second") and free.get("tokens_per_second") else None)
    return {"max_relative_loss_difference": diff, "speedup_tokens_per_second": speed}


def table(result: dict) -> str:
    d = result["data"]
    lines = ["| data | batches x examples | mean tokens / example | mean padded length | padding share, padded / "
             "packed | positions per token, padded / packed |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| {result['dataset']} | {d['batches']} x {d['batch']} | {d['mean_tokens_per_example']} | "
             f"{d['mean_padded_length']} | {100 * d['padding_share']:.1f}% / {100 * d['packed_padding_share']:.1f}% | "
             f"{d['positions_per_token']} / {d['packed_positions_per_token']} |"]
    runs = result.get("runs")
    if runs:
        lines += ["", "| run | steps | seconds | tokens/s | padding share |", "| --- | ---: | ---: | ---: | ---: |"]
        for name in ("padded", "padding_free"):
            r = runs[name]
            lines.append(f"| {name} | {result['steps']} | {r['train_runtime']} | {r['tokens_per_second']} | "
                         f"{100 * (r['padding_share'] or 0):.1f}% |")
        c = result["comparison"]
        speed = c["speedup_tokens_per_second"]
        lines.append("")
        lines.append(f"speedup (tokens/s): {speed:.2f}x" if speed else "speedup: not measured")
        lines.append("largest relative loss difference per subnet: " + ", ".join(
            f"{role} {v:.2e}" for role, v in sorted(c["max_relative_loss_difference"].items())))
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    result = {"dataset": args.dataset, "model": args.model, "steps": args.steps, "extra": args.extra,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "versions": library_versions()}
    try:
        result["data"] = padding_of_the_data(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("data: %s", result["data"])
    if args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir) if args.work_dir else Path(tmp)
            runs = {"padded": stage2_run(args, work, False), "padding_free": stage2_run(args, work, True)}
        result["runs"] = runs
        result["comparison"] = compare(runs["padded"], runs["padding_free"])
    write_json(Path(args.out), result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
