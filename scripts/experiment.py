"""The experiments of docs/RESULTS.md: does one-for-all fine-tuning keep the frontier? One driver, one preset per
model (``--preset``): ``smollm2`` (SmolLM2-135M-Instruct, the default; ``scripts/experiment_smollm2.py`` runs it)
and ``qwen2.5-coder-1.5b`` (Qwen2.5-Coder-1.5B-Instruct, where MMLU is far above chance). A preset sets the model,
its strategy file, the shapes, the training length and the metrics; every flag below still overrides it.

Rows (every one a run of ``main.py``; this script only schedules them and tabulates their outputs):

  (a) stage1     Stage 1 only: DP layers + FLAP widths (the strategy file), no training
  (b) shortgpt   ShortGPT layer drop (lowest Block Influence on the same C4 windows) + the same FLAP widths
  (c) pershape   each of the single shapes fine-tuned on its own with plain LoRA, ``--steps`` steps each
  (c') pershape_kd  the same, distilled from the frozen full model (``--train_distill_full``, soft cross
                 entropy, ``--kd_weight 1``): the paper's per-shape baseline
  (c'') pershape_kd_total  (c') with ``--steps`` / (number of single shapes) steps each: all shapes together see
                 as many training tokens as (d) does (qwen preset)
  (d) amoeba     one-for-all: MoE-LoRA, sandwich sampling, distillation, loss balancing; the adapters after
                 ``--steps`` steps of a ``--long_steps`` run (constant learning rate after a fixed warm-up,
                 so they equal a ``--steps`` run); ``amoeba_long`` is the same run at ``--long_steps``
  (d'') amoeba_seed1  (d) trained again with another seed, measured on the smallest shape: the noise floor
                 (qwen preset)
  (e) ablations of (d) for ``--steps`` steps: ``abl_lora`` (plain LoRA), ``abl_nobal`` (no balancing),
                 ``abl_nokd`` (no distillation)

Every row of (c) trains one shape with ``--steps`` steps of the same batches, so it sees as many tokens per
shape as (d) gives all its subnets together; the report lists each run's training tokens.

Metrics: WikiText-2 test perplexity, ARC-Easy, PIQA and HellaSwag (lm-eval: acc and acc_norm both kept; the
average uses ARC-E acc, PIQA acc, HellaSwag acc_norm; ``--lm_eval_limit`` documents each, 0 for all) and MMLU
test accuracy (``--mmlu_shots`` 0 or 5; ``--mmlu_samples`` questions, 0 for all).

The ``calibrate`` phase makes the strategy file when it does not exist yet (Stage 1 as the seed's README: the
layer DP by MMLU accuracy on 320 validation questions, FLAP widths 1, 7/8, 3/4, 5/8 on C4, merged with
``utils/merge_depth_width.py``, with its readable ``.md`` view beside it).

    python scripts/experiment.py --out output/experiment                                   # SmolLM2, resumable
    python scripts/experiment.py --preset qwen2.5-coder-1.5b --out output/qwen --gpus 0,1  # Qwen, 2 GPUs
    python scripts/experiment.py --out output/experiment --phase report --docs docs/results_tables.md
    python scripts/experiment.py --out /tmp/x --smoke --model <tiny> --strategy <its strategy>

Jobs of a phase run ``--jobs`` at a time (one process of the small model leaves a GPU mostly idle, so several
share it; 9 kept an H200 99% busy), spread over ``--gpus`` (each job sees one of them); with ``--ddp 1`` (the qwen
preset) the one-for-all trainings instead run one at a time over all of them (torchrun). ``--deadline_s`` stops
starting jobs, and stops running ones, after that many seconds; training resumes from its last checkpoint and
evaluation measures only what its ``metrics.json`` lacks when run again (exit status 3 says something was left
for that). ``--eval_split 1`` (the qwen preset's) evaluates each shape of a trained row in three jobs side by side
(MMLU with WikiText-2, HellaSwag, ARC-Easy with PIQA), whose folders the report merges. Every command, its wall time
and its log are kept under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amoeba.errors import UsageError  # noqa: E402
from amoeba.files import write_json, write_text  # noqa: E402

logger = logging.getLogger("experiment")

ROW_TITLES = {
    "stage1": "(a) Stage 1 only (DP + FLAP)",
    "shortgpt": "(b) ShortGPT + FLAP",
    "pershape": "(c) per-shape LoRA",
    "pershape_kd": "(c') per-shape LoRA, distilled from the full model",
    "pershape_kd_total": "(c'') per-shape LoRA, distilled, (d)'s total tokens",
    "amoeba": "(d) AmoebaLLM one-for-all",
    "amoeba_long": "(d') one-for-all, long run",
    "amoeba_seed1": "(d'') one-for-all, another seed",
    "abl_lora": "(e) plain LoRA instead of MoE-LoRA",
    "abl_nobal": "(e) no loss balancing",
    "abl_nokd": "(e) no distillation",
}
ACC_METRICS = {"arc_easy_acc": "ARC-E", "piqa_acc": "PIQA", "hellaswag_acc_norm": "HellaSwag",
               "mmlu_test_accuracy": "MMLU"}
# lm-eval's other metric of each task: kept in results.json and tabulated, not averaged
OTHER_METRICS = {"arc_easy_acc_norm": "ARC-E acc_norm", "piqa_acc_norm": "PIQA acc_norm",
                 "hellaswag_acc": "HellaSwag acc"}
CLASSIC_ROWS = ("stage1", "shortgpt", "pershape", "pershape_kd", "amoeba", "amoeba_long", "abl_lora", "abl_nobal",
                "abl_nokd")
# What a preset sets; the command line overrides each.
PRESETS = {
    "smollm2": dict(
        title="SmolLM2-135M-Instruct", script="scripts/experiment_smollm2.py",
        model=str(ROOT / "models" / "smollm2-135m-instruct"), strategy=str(ROOT / "dp_selection_strategy.npy"),
        depths="30,26,22,18", widths="1,3/4,5/8", single_shapes="30x1,26x3/4,22x5/8,18x5/8", grid="full",
        steps=400, long_steps=1000, lm_eval_limit=1000, mmlu_shots=0, default_rows=",".join(CLASSIC_ROWS)),
    # Shapes at about 80%, 65% and 50% of the decoder's parameters (uniform widths: 26 x 7/8 82%, 24 x 3/4 67%,
    # 18 x 3/4 50%; the FLAP strategy's per-layer widths move them a little, the report gives the real counts).
    "qwen2.5-coder-1.5b": dict(
        title="Qwen2.5-Coder-1.5B-Instruct", script="scripts/experiment.py --preset qwen2.5-coder-1.5b",
        model=str(ROOT / "models" / "qwen2.5-coder-1.5b-instruct"),
        strategy=str(ROOT / "strategies" / "qwen2.5-coder-1.5b-instruct.npy.gz"),
        depths="28,26,24,18", widths="1,7/8,3/4", single_shapes="28x1,26x7/8,24x3/4,18x3/4", grid="singles",
        # max_skipped_steps: a safety margin. The first runs' non-finite gradients (every batch padded to 193 tokens)
        # were cuDNN attention's backward, which training no longer uses (--cudnn_attention); the report lists
        # every skipped step
        # repeat_eval 0: the evaluation's reproducibility was shown on SmolLM2; here its GPU time goes to rows
        # eval_per_shape: a shape's full evaluation is about 12 minutes; the adapters exist only for one GPU session
        # eval_split: and its parts side by side, so that a training and its evaluation fit one GPU session
        # mmlu_prefix_cache: the whole model's five-shot MMLU in 89 s with a training job beside it (157 s uncached,
        # alone), the same accuracy within bf16 rounding (49.88 against 49.83 at 28 x 1); rows (a) and (b) were
        # measured before, without it (the report says which)
        steps=1000, long_steps=1000, lm_eval_limit=0, mmlu_shots=5, max_skipped_steps=20, repeat_eval=0,
        eval_per_shape=1, ddp=1, mmlu_prefix_cache=1, eval_split=1,
        default_rows="stage1,shortgpt,pershape_kd,pershape_kd_total,amoeba,amoeba_seed1,abl_lora,abl_nobal,abl_nokd"),
}
PPL = "wikitext2_ppl"
MMLU = "mmlu_test_accuracy"
MMLU_MICRO = "mmlu_test_micro_accuracy"
MMLU_TEST_QUESTIONS = 14042  # the MMLU test split's size: the sampling error when --mmlu_samples is not set
# lm-eval's standard error of each averaged accuracy it measures (MMLU's comes from its question count)
STDERR = {m: f"{m}_stderr" for m in ACC_METRICS if m != MMLU}
REPEAT = "amoeba_repeat"  # (d)'s evaluation run a second time: its own folder, compared with (d)'s


# Rough duration of an evaluation job on the H200 with other jobs beside it (start-up, then each shape with all
# metrics; measured: 434 and 446 s for 4 shapes with 9 jobs keeping the GPU 99% busy).
EVAL_JOB_S, EVAL_SHAPE_S = 40.0, 100.0
# One trained shape's evaluation in parts that run side by side (--eval_split): in one process it leaves the H200
# about half idle (one shape alone: 291 s; four shapes side by side: 576 s). Each part: main.py's flags, given after
# eval_flags() (the later flag wins), and the metrics it gives.
LM_EVAL_TASKS = ("arc_easy", "piqa", "hellaswag")
_NO_MMLU_NOR_PPL = ["--do_mmlu_eval", "False", "--do_eval_wikitext2", "False"]
EVAL_PARTS = {
    "mmlu": (["--do_lm_eval", "False"], (PPL, MMLU)),
    "hellaswag": ([*_NO_MMLU_NOR_PPL, "--do_lm_eval_task", "hellaswag"], ("hellaswag_acc_norm",)),
    "arc_piqa": ([*_NO_MMLU_NOR_PPL, "--do_lm_eval_task", "arc_easy,piqa"], ("arc_easy_acc", "piqa_acc")),
}


def row_of_folder(name: str) -> Optional[str]:
    """The row an evaluation folder (or a job name without its phase) belongs to: ``amoeba_w0.75`` ->
    ``amoeba``, ``amoeba_repeat`` -> ``amoeba_repeat``, the longest matching row name wins."""
    return next((r for r in sorted([*ROW_TITLES, REPEAT], key=len, reverse=True)
                 if name == r or name.startswith(r + "_")), None)


@dataclass
class Job:
    """One ``main.py`` run: its name, arguments, output folder, and how to tell it finished."""

    name: str
    argv: list[str]
    out: Path
    done_file: str = ""
    want_keys: list[str] = field(default_factory=list)
    resumable: bool = False
    needs: list[Path] = field(default_factory=list)  # files that must exist before it can start
    makes: list[Path] = field(default_factory=list)  # files later jobs need from it: without them it is not done
    gpu: Optional[str] = None  # the GPU it runs on (--gpus)
    expected_s: float = 0.0  # rough duration; a job that is not resumable starts only if it fits the deadline
    first_s: float = 0.0  # time to its first kept result, for a job that keeps partial results (0: keeps none)
    all_gpus: bool = False  # runs alone, over every --gpus GPU (torchrun, DDP)

    def ready(self) -> bool:
        return all(Path(p).exists() for p in self.needs)

    def fits(self, now: float, deadline: float) -> bool:
        """Whether starting now can pay off: a resumable job always can; one that keeps partial results if its
        first result comes in time; another only if it ends in time (stopped half-way, it keeps nothing)."""
        return self.resumable or now + (self.first_s or self.expected_s) <= deadline

    def done(self) -> bool:
        if self.done_file and not (self.out / self.done_file).is_file():
            return False
        if not all(Path(p).exists() for p in self.makes):  # e.g. a record that travelled without its weights
            return False
        if self.want_keys:
            try:
                have = json.loads((self.out / "metrics.json").read_text())
            except (OSError, ValueError):
                return False
            return all(k in have for k in self.want_keys)
        return bool(self.done_file)


def label(layers: int, width: float) -> str:
    """The shape suffix main.py uses in metrics.json (``l26w0.75``)."""
    return f"l{layers}w{width:g}"


def _merge_module():
    """``utils/merge_depth_width.py`` as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_depth_width", ROOT / "utils" / "merge_depth_width.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    return merge


def parse_shapes(text: str, flag: str = "--single_shapes") -> list[tuple[int, float]]:
    from amoeba.args import parse_shape_list

    return list(parse_shape_list(text, flag))


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
class Plan:
    """All jobs of the experiment for one configuration."""

    def __init__(self, cfg: argparse.Namespace):
        import torch

        from amoeba.args import parse_int_list, parse_ratio_list

        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.cuda = torch.cuda.is_available()
        self.depths = list(parse_int_list(cfg.depths, "--depths"))
        self.widths = list(parse_ratio_list(cfg.widths, "--widths"))
        self.single = parse_shapes(cfg.single_shapes)
        # the shapes the ablations (e) are evaluated at: a subset of the single shapes (--ablation_shapes)
        self.ablation_shapes = (parse_shapes(cfg.ablation_shapes, "--ablation_shapes") if cfg.ablation_shapes
                                else list(self.single))
        outside = [s for s in self.ablation_shapes if s not in self.single]
        if outside:
            raise UsageError(f"{', '.join(f'{a}x{b:g}' for a, b in outside)} not among --single_shapes "
                             f"({cfg.single_shapes})", "--ablation_shapes")
        # the shapes rows (a), (b) and (d) are measured at: every depth x width, or the single shapes only
        self.grid = ([(d, w) for d in self.depths for w in self.widths] if cfg.grid == "full" else list(self.single))
        self.min_layers = min(self.depths)
        # --ddp: the one-for-all trainings run over every --gpus GPU, one at a time
        self.ddp = max(1, len(gpu_list(cfg.gpus))) if cfg.ddp else 1
        self.strategy = str(Path(cfg.strategy).resolve())
        self.shortgpt_strategy = str(self.out / "shortgpt" / "shortgpt_strategy.npy")
        self.rows = [r.strip() for r in (cfg.rows or cfg.default_rows or "").split(",") if r.strip()]
        unknown = [r for r in self.rows if r not in ROW_TITLES]
        if unknown:
            raise SystemExit(f"error: --rows: unknown row(s) {', '.join(unknown)} (choose from {', '.join(ROW_TITLES)})")

    # --- common flags
    def base(self, out: Path) -> list[str]:
        precision = ["--bf16"] if self.cuda else []
        return ["--model_name_or_path", self.cfg.model, "--output_dir", str(out), "--seed", "0",
                "--report_to", "none", *precision]

    def elastic(self, strategy: str, widths: str) -> list[str]:
        return ["--enable_shrinking", "--min_num_layer", str(self.min_layers), "--shrinking_method", "calib_dp",
                "--shrinking_file", strategy, "--shrinkable_width", "--width_choice", widths,
                "--prune_width_method", "flap"]

    def train_flags(self, steps: int, processes: int = 1) -> list[str]:
        """Training flags; over ``processes`` GPUs (DDP) each takes its share of the batch: the same examples per
        step as on one GPU."""
        c = self.cfg
        return ["--do_train", "True", "--do_eval", "False", "--no_eval_orig", "--dataset", c.dataset,
                "--data_seed", "42", "--source_max_len", str(c.source_len), "--target_max_len", str(c.target_len),
                "--per_device_train_batch_size", str(c.batch_size // processes), "--gradient_accumulation_steps", "1",
                "--max_steps", str(steps), "--learning_rate", "2e-4", "--lr_scheduler_type", "constant",
                "--warmup_steps", str(c.warmup_steps), "--lora_modules", "all", "--lora_r", str(c.lora_r),
                "--lora_alpha", "16", "--logging_steps", "10", "--save_strategy", "steps",
                "--save_steps", str(c.save_steps), "--save_total_limit", "1", "--optim", "adamw_torch",
                "--gradient_checkpointing", "False", "--group_by_length", "False",
                "--dataloader_num_workers", "0", "--max_skipped_steps", str(c.max_skipped_steps)]

    def moe(self) -> list[str]:
        return ["--use_moe_lora", "--moe_num_expert", "5", "--moe_topk", "2"]

    def distill_full(self) -> list[str]:
        """Per-shape training distilled from the frozen full model (row (c'))."""
        return ["--train_distill_full", "True", "--distill_method", "sp", "--kd_weight", "1"]

    def sandwich(self) -> list[str]:
        return ["--random_sample_num_layer", "2", "--distill_method", "sp", "--kd_weight", "1"]

    def eval_flags(self) -> list[str]:
        c = self.cfg
        flags = ["--do_train", "False", "--do_eval", "False", "--no_eval_orig", "--do_eval_wikitext2", "True",
                 "--do_mmlu_eval", "True", "--mmlu_dataset", "mmlu-fs" if c.mmlu_shots else "mmlu-zs",
                 "--mmlu_split", "test", *(["--max_mmlu_samples", str(c.mmlu_samples)] if c.mmlu_samples else []),
                 "--do_lm_eval", "True", "--do_lm_eval_task", ",".join(LM_EVAL_TASKS),
                 *(["--lm_eval_limit", str(c.lm_eval_limit)] if c.lm_eval_limit else []),
                 "--per_device_eval_batch_size", str(c.eval_batch_size),
                 # a job stopped at the deadline keeps each finished shape's metrics; run again, it does the rest
                 "--eval_skip_existing"]
        if c.wikitext_windows:
            flags += ["--max_wikitext2_windows", str(c.wikitext_windows)]
        if c.mmlu_prefix_cache:
            flags += ["--mmlu_prefix_cache", "True"]
        if c.lm_eval_prefix_cache:
            flags += ["--lm_eval_prefix_cache", "True"]
        return flags

    # --- phases
    def calibrate_jobs(self) -> list[Job]:
        """Stage 1 for a model without its strategy file: the seed's Step 1 (layer DP by MMLU accuracy on 40 x 8
        validation questions) and Step 2 (FLAP widths on C4), as two jobs that may run side by side."""
        if Path(self.strategy).is_file():
            return []
        c = self.cfg
        quiet = ["--do_train", "False", "--do_eval", "False", "--no_eval_orig"]
        layers = self.out / "calib" / "layers"
        widths = self.out / "calib" / "widths"
        return [
            Job("calib_layers", [*self.base(layers), *quiet, "--layer_calib_dp", "--calib_dataset", "mmlu",
                                 "--calib_mmlu_split", "eval", "--enable_shrinking", "--num_calib_sample",
                                 str(c.dp_batches),
                                 "--calib_metric", "acc", "--min_num_layer", str(self.min_layers),
                                 "--dp_keep_last_layer", "1"], layers, done_file="final_strategy.npy"),
            Job("calib_widths", [*self.base(widths), *quiet, "--width_calib", "--calib_dataset", "c4",
                                 "--num_calib_sample", str(c.flap_samples), "--prune_width_method", "flap",
                                 "--width_choice", "[1,7/8,3/4,5/8]"], widths, done_file="width_bias.npy")]

    def merge_calibration(self) -> None:
        """The strategy file (and its readable view) from the two calibration jobs' outputs (in-process)."""
        target = Path(self.strategy)
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        calib = self.out / "calib"
        _merge_module().merge_depth_width(calib / "layers" / "final_strategy.npy", calib / "widths" / "width_mask.npy",
                                          calib / "widths" / "width_bias.npy", target)
        logger.info("strategy written to %s", target)

    def prep_jobs(self) -> list[Job]:
        c = self.cfg
        out = self.out / "shortgpt"
        argv = [*self.base(out), "--do_train", "False", "--do_eval", "False", "--no_eval_orig", "--layer_calib_dp",
                "--layer_select_method", "shortgpt", "--calib_dataset", "c4", "--num_calib_sample",
                str(c.calib_samples), "--calib_seqlen", str(c.calib_seqlen), "--min_num_layer",
                str(self.min_layers), "--dp_keep_last_layer", "1"]
        return [Job("shortgpt_layers", argv, out, done_file="final_strategy.npy")]

    def merge_shortgpt(self) -> None:
        """ShortGPT's layer masks with the shipped strategy's FLAP widths (in-process, instant)."""
        target = Path(self.shortgpt_strategy)
        if target.is_file():
            return
        _merge_module().replace_depth(self.out / "shortgpt" / "final_strategy.npy", self.strategy, target)

    def wanted(self, row: str) -> bool:
        """True when ``--rows`` (default: all) includes ``row``."""
        return not self.rows or row in self.rows

    def train_jobs(self) -> list[Job]:
        c = self.cfg
        all_widths = "[1,7/8,3/4,5/8]"
        jobs = []
        d = self.out / "train" / "amoeba"
        ddp, n = self.ddp > 1, self.ddp  # the sandwich trainings: (d), its second seed, the ablations
        jobs.append(Job("train_amoeba", [*self.base(d), *self.train_flags(c.long_steps, n),
                                         *self.elastic(self.strategy, all_widths), *self.sandwich(), *self.moe(),
                                         "--adapter_snapshot_steps", str(c.steps)],
                        d, done_file="train_results.json", resumable=True, all_gpus=ddp))
        o = self.out / "train" / "amoeba_seed1"
        jobs.append(Job("train_amoeba_seed1", [*self.base(o), *self.train_flags(c.steps, n),
                                               *self.elastic(self.strategy, all_widths), *self.sandwich(), *self.moe(),
                                               "--seed", "1"], o, done_file="train_results.json", resumable=True,
                        all_gpus=ddp))
        ablations = {"abl_lora": [*self.sandwich()],
                     "abl_nobal": [*self.sandwich(), *self.moe(), "--no_balancing"],
                     "abl_nokd": ["--random_sample_num_layer", "2", "--distill_method", "none", *self.moe()]}
        for name, extra in ablations.items():
            o = self.out / "train" / name
            jobs.append(Job(f"train_{name}", [*self.base(o), *self.train_flags(c.steps, n),
                                              *self.elastic(self.strategy, all_widths), *extra],
                            o, done_file="train_results.json", resumable=True, all_gpus=ddp))
        total = max(1, c.steps // len(self.single))  # (c''): all single shapes together see (d)'s tokens
        for row, extra, steps in (("pershape", [], c.steps), ("pershape_kd", self.distill_full(), c.steps),
                                  ("pershape_kd_total", self.distill_full(), total)):
            for layers, width in self.single:
                o = self.out / "train" / f"{row}_{label(layers, width)}"
                jobs.append(Job(f"train_{row}_{label(layers, width)}",
                                [*self.base(o), *self.train_flags(steps), *self.elastic(self.strategy, all_widths),
                                 "--train_num_layer", str(layers), "--train_num_width", f"{width:g}", *extra],
                                o, done_file="train_results.json", resumable=True))
        return [j for j in jobs if self.wanted(self.row_of(j.name))
                or (j.name == "train_amoeba" and self.wanted("amoeba_long"))]

    @staticmethod
    def row_of(job_name: str) -> str:
        """The row a job belongs to (``train_abl_lora`` -> ``abl_lora``, ``eval_amoeba_w1`` -> ``amoeba``; the
        repeated evaluation of (d) belongs to (d))."""
        row = row_of_folder(job_name.split("_", 1)[1])
        return "amoeba" if row == REPEAT else row

    def _eval_job(self, row: str, part: str, strategy: str, shapes: list[tuple[int, float]],
                  extra: Optional[list[str]] = None, adapters: Optional[Path] = None,
                  metrics: Optional[tuple[str, ...]] = None) -> Job:
        """One main.py evaluation of ``shapes`` into ``eval/<row>_<part>``; done once ``metrics`` (default: every
        metric) of each shape are in its metrics.json."""
        o = self.out / "eval" / (f"{row}_{part}" if part else row)
        widths = sorted({w for _, w in shapes} | {1.0}, reverse=True)
        width_flag = "[" + ",".join(f"{w:g}" for w in widths) + "]"
        spec = ",".join(f"{d}x{w:g}" for d, w in shapes)
        argv = [*self.base(o), *self.eval_flags(), *self.elastic(strategy, width_flag), "--eval_shapes", spec,
                *(["--adapter_dir", str(adapters)] if adapters else []), *(extra or [])]
        keys = [f"{m}_{label(d, w)}" for d, w in shapes for m in (metrics or (PPL, *ACC_METRICS))]
        needs = [Path(strategy)] + ([Path(adapters) / "adapter_config.json"] if adapters else [])
        # each finished shape's metrics are kept (--eval_skip_existing resumes), so one shape in time pays off
        return Job(f"eval_{row}" + (f"_{part}" if part else ""), argv, o, want_keys=keys, needs=needs,
                   expected_s=EVAL_JOB_S + EVAL_SHAPE_S * len(shapes), first_s=EVAL_JOB_S + EVAL_SHAPE_S)

    def _shape_eval_jobs(self, row: str, shape: tuple[int, float], extra: Optional[list[str]],
                         adapters: Optional[Path], folder_part: Optional[str] = None) -> list[Job]:
        """A trained row's evaluation of one shape (in ``eval/<row>_<folder_part>``, by default the shape's label):
        one job, or with ``--eval_split`` the parts of EVAL_PARTS side by side (not where the whole job is already
        done: a run evaluated before keeps its folder)."""
        part = label(*shape) if folder_part is None else folder_part
        whole = self._eval_job(row, part, self.strategy, [shape], extra, adapters)
        if not self.cfg.eval_split or whole.done():
            return [whole]
        return [self._eval_job(row, f"{label(*shape)}_{name}", self.strategy, [shape], [*(extra or []), *flags],
                               adapters, metrics)
                for name, (flags, metrics) in EVAL_PARTS.items()]

    def eval_jobs(self) -> list[Job]:
        c = self.cfg
        train = self.out / "train"
        jobs = []

        def by_width(row, strategy, extra=None, adapters=None):
            for w in sorted({w for _, w in self.grid}, reverse=True):
                jobs.append(self._eval_job(row, f"w{w:g}", strategy, [(d, v) for d, v in self.grid if v == w], extra,
                                           adapters))

        snapshot = train / "amoeba" / f"adapter_model-step{c.steps}"
        by_width("stage1", self.strategy)
        # the whole model (all layers, width 1) is the same network in (a) and (b): measured once, under (a)
        full = (max(self.depths), 1.0)
        shared = [full] if self.wanted("stage1") and full in self.grid else []
        for w in sorted({w for _, w in self.grid}, reverse=True):
            shapes = [(d, v) for d, v in self.grid if v == w and (d, v) not in shared]
            if shapes:
                jobs.append(self._eval_job("shortgpt", f"w{w:g}", self.shortgpt_strategy, shapes))
        def trained(row, shapes, extra, adapters):
            """A trained row's evaluation: one job for its shapes, or with --eval_per_shape one job per shape, so
            that they run side by side while the row's adapters exist (they do not outlive a GPU session)."""
            if c.eval_per_shape:
                for shape in shapes:
                    jobs.extend(self._shape_eval_jobs(row, shape, extra, adapters))
            else:
                jobs.append(self._eval_job(row, "", self.strategy, shapes, extra, adapters))

        if c.eval_per_shape:
            trained("amoeba", self.grid, self.moe(), snapshot)
        else:
            by_width("amoeba", self.strategy, self.moe(), snapshot)
        for row in ("pershape", "pershape_kd", "pershape_kd_total"):
            for shape in self.single:
                jobs.extend(self._shape_eval_jobs(row, shape, None, train / f"{row}_{label(*shape)}" / "adapter_model"))
        for name, extra in (("abl_lora", []), ("abl_nobal", self.moe()), ("abl_nokd", self.moe())):
            trained(name, self.ablation_shapes, extra, train / name / "adapter_model")
        # The noise floor: (d) trained with another seed, on the smallest shape.
        jobs.extend(self._shape_eval_jobs("amoeba_seed1", self.single[-1], self.moe(),
                                          train / "amoeba_seed1" / "adapter_model", folder_part=""))
        # Reproducibility: (d)'s evaluation again, in another process, on the largest and smallest shapes.
        if c.repeat_eval:
            ends = [self.single[0], self.single[-1]]
            jobs.append(self._eval_job(REPEAT, "", self.strategy, ends, self.moe(), snapshot))
        # one job per shape: they start together when the long run ends, so its tail is one shape long
        for shape in self.single:
            jobs.extend(self._shape_eval_jobs("amoeba_long", shape, self.moe(), train / "amoeba" / "adapter_model"))
        # A job whose adapters come from training starts once they exist (Job.needs): from this run or an earlier one.
        return [j for j in jobs if self.wanted(self.row_of(j.name))]

    @staticmethod
    def needed_training(train: list[Job], evals: list[Job]) -> list[Job]:
        """``train`` without the jobs whose every evaluation is already done: their adapters were only an input to
        those, and a run continued elsewhere (``--pack``) has its metrics but not its weights."""
        kept = []
        for job in train:
            readers = [e for e in evals if any(job.out in Path(n).parents for n in e.needs)]
            if readers and all(e.done() for e in readers):
                logger.info("%s: not needed (every evaluation of its adapters is done)", job.name)
                continue
            # finished elsewhere (--pack carries its record, not its weights), it is not done until they exist
            job.makes = [Path(n) for e in readers if not e.done() for n in e.needs if job.out in Path(n).parents]
            kept.append(job)
        return kept


# ----------------------------------------------------------------------------------------------
# Running jobs
# ----------------------------------------------------------------------------------------------
def set_aside_record(job: Job) -> None:
    """Before a job runs again (its record is here but not what it makes), rename its earlier record so the new
    run does not overwrite it: evaluations already done came from that run."""
    record = job.out / job.done_file if job.done_file else None
    if record is not None and record.is_file():
        kept_as = record.with_name(f"{record.stem}.earlier-{time.strftime('%Y%m%d-%H%M%S')}{record.suffix}")
        record.rename(kept_as)
        logger.warning("%s: running again, as %s is missing; the earlier run's record is kept as %s", job.name,
                       next((str(p) for p in job.makes if not Path(p).exists()), "its output"), kept_as.name)


def resume_argv(out: Path, argv: list) -> None:
    """Add --resume_training when the job's folder holds a complete checkpoint (its trainer_state.json marker).

    Checkpoint folders without the marker are what a kill during this job's own first checkpoint leaves: they
    cannot be resumed and would make the training refuse the folder, so they are removed (with a log line).
    """
    folders = [p for p in out.glob("checkpoint-*") if p.is_dir()]
    if any((p / "trainer_state.json").is_file() for p in folders):
        argv.append("--resume_training")
        return
    for p in folders:
        logger.warning("removing %s: an incomplete checkpoint (no trainer_state.json) of an interrupted attempt", p)
        shutil.rmtree(p)


def gpu_list(text: Optional[str]) -> list[str]:
    """``--gpus`` as a list of GPU indices (empty: none given)."""
    return [g.strip() for g in text.split(",") if g.strip()] if text else []


def pick_job(pending: list[Job], running: list[Job], now: float, deadline: float) -> Optional[Job]:
    """The next job to start: the first whose inputs exist and that can pay off before the deadline. A job that
    takes every GPU starts only once nothing runs (the jobs after it wait too), and while it runs nothing starts."""
    if any(j.all_gpus for j in running):
        return None
    job = next((j for j in pending if j.ready() and j.fits(now, deadline)), None)
    if job is not None and job.all_gpus and running:
        return None
    return job


def job_launcher(job: Job, gpus: Optional[list[str]]) -> tuple[list[str], dict]:
    """torchrun's options and the environment it adds for a job taking every GPU (one process per GPU, NVLink
    multicast off, as NCCL needs it on these machines); ``([], {})`` for ``main.py`` on one GPU (the caller
    chooses it)."""
    if job.all_gpus and gpus and len(gpus) > 1:
        nvls = os.environ.get("NCCL_NVLS_ENABLE", "0")
        return (["--standalone", "--nproc_per_node", str(len(gpus))],
                {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "NCCL_NVLS_ENABLE": nvls})
    return [], {}


def run_jobs(jobs: list[Job], out: Path, parallel: int, deadline: float, gpus: Optional[list[str]] = None,
             on_finished: Optional[Callable[[Job], None]] = None) -> dict:
    """Run unfinished ``jobs``, ``parallel`` at a time, until done or ``deadline`` (time.time()); with ``gpus``,
    each job sees one of them (``CUDA_VISIBLE_DEVICES``), the one running the fewest jobs. ``on_finished(job)``
    is called as each job ends (done, failed or stopped), e.g. to pack what is measured so far."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    timing_path = out / "timings.json"
    timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    commands = out / "commands.sh"
    pending = [j for j in jobs if not j.done()]
    for j in jobs:
        if j.done():
            logger.info("%s: already done", j.name)
    running: list[tuple[Job, subprocess.Popen, float]] = []
    # expandable segments: several processes share one GPU, so cached-but-free blocks must not pile up
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    failed, stopped = [], []
    while pending or running:
        now = time.time()
        while len(running) < parallel and now < deadline:
            # the first whose inputs exist and that can finish before the deadline
            job = pick_job(pending, [j for j, _, _ in running], now, deadline)
            if job is None:
                break
            pending.remove(job)
            set_aside_record(job)
            argv = list(job.argv)
            if job.resumable:
                resume_argv(job.out, argv)
            torchrun, extra_env = job_launcher(job, gpus)
            launch = [sys.executable, *(["-m", "torch.distributed.run", *torchrun] if torchrun else [])]
            cmd = [*launch, str(ROOT / "main.py"), *argv]
            with open(commands, "a", encoding="utf-8") as f:
                shown = ["torchrun", *torchrun] if torchrun else ["python"]
                f.write(shlex.join([*shown, "main.py", *argv]) + "\n")
            log = open(logs / f"{job.name}.log", "a", encoding="utf-8")
            if extra_env:  # torchrun over every GPU
                job.gpu = extra_env["CUDA_VISIBLE_DEVICES"]
            elif gpus:  # the GPU running the fewest jobs
                busy = [j.gpu for j, _, _ in running]
                job.gpu = min(gpus, key=busy.count)
                extra_env = {"CUDA_VISIBLE_DEVICES": job.gpu}
            job_env = dict(env, **extra_env)
            logger.info("start %s%s", job.name, f" on GPU {job.gpu}" if gpus else "")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            log.close()
            running.append((job, proc, time.time()))
        still = []
        for job, proc, started in running:
            code = proc.poll()
            was_stopped = False
            if code is None and time.time() >= deadline:
                was_stopped = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    code = proc.wait(timeout=90)  # a training job finishes its step and checkpoints first
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    code = proc.wait()
                logger.warning("%s: stopped at the deadline (run again to continue)", job.name)
            if code is None:
                still.append((job, proc, started))
                continue
            wall = time.time() - started
            entry = timings.setdefault(job.name, {"seconds": 0.0, "runs": 0})
            entry["seconds"] = round(entry["seconds"] + wall, 1)
            entry["runs"] += 1
            entry["concurrent_jobs"] = parallel
            write_json(timing_path, timings)
            if code == 0 and job.done():
                logger.info("%s: done in %.0f s", job.name, wall)
            elif was_stopped:
                stopped.append(job.name)
            else:
                failed.append(job.name)
                logger.error("%s: exit %s after %.0f s (log: %s)", job.name, code, wall, logs / f"{job.name}.log")
            if on_finished is not None:
                on_finished(job)
        running = still
        if pending and not running and not any(j.ready() for j in pending):
            logger.error("cannot start (inputs missing): %s", ", ".join(j.name for j in pending))
            failed += [j.name for j in pending]
            pending = []
        if pending and not running and not any(j.ready() and j.fits(time.time(), deadline) for j in pending):
            # nothing left can finish in time: stop now instead of idling until the deadline
            logger.warning("deadline too close to start: %s", ", ".join(j.name for j in pending))
            stopped += [j.name for j in pending]
            pending = []
        if pending and time.time() >= deadline:
            logger.warning("deadline: %d job(s) not started: %s", len(pending), ", ".join(j.name for j in pending))
            stopped += [j.name for j in pending]
            pending = []
        time.sleep(2)
    return {"failed": failed, "stopped": stopped}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def collect(plan: Plan) -> dict:
    """{row: {shape label: {metric: value, params}}} from every evaluation folder."""
    rows: dict[str, dict] = {}
    for folder in sorted((plan.out / "eval").glob("*")):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        row = row_of_folder(folder.name)
        if row is None:
            continue
        metrics = json.loads(path.read_text())
        for d, w in plan.grid + plan.single:
            lab = label(d, w)
            vals = {m: metrics[f"{m}_{lab}"] for m in (PPL, *ACC_METRICS, *OTHER_METRICS, *STDERR.values(),
                                                       MMLU_MICRO, "params") if f"{m}_{lab}" in metrics}
            if vals:  # a shape evaluated in parts (--eval_split) has a folder per part
                rows.setdefault(row, {}).setdefault(lab, {}).update(vals)
    # (b)'s whole-model cell is (a)'s (Plan.eval_jobs measures that network once)
    full = label(max(plan.depths), 1.0)
    if full in rows.get("stage1", {}) and "shortgpt" in rows and full not in rows["shortgpt"]:
        rows["shortgpt"][full] = dict(rows["stage1"][full])
    for shapes in rows.values():
        for vals in shapes.values():
            accs = [vals[m] for m in ACC_METRICS if m in vals]
            if len(accs) == len(ACC_METRICS):
                vals["avg_acc"] = sum(accs) / len(accs)
            if MMLU in vals:  # binomial, over the questions asked (the micro accuracy's; the macro's is close)
                p = vals.get(MMLU_MICRO, vals[MMLU])
                vals["mmlu_se"] = math.sqrt(p * (1 - p) / (plan.cfg.mmlu_samples or MMLU_TEST_QUESTIONS))
            errors = [vals.get(e) for e in STDERR.values()] + [vals.get("mmlu_se")]
            if "avg_acc" in vals and all(e is not None for e in errors):
                vals["avg_acc_se"] = math.sqrt(sum(e * e for e in errors)) / len(errors)
    return rows


def prefix_cached_rows(plan: Plan, option: str = "mmlu_prefix_cache") -> list[str]:
    """The rows whose MMLU (``option`` ``mmlu_prefix_cache``) or lm-eval tasks (``lm_eval_prefix_cache``) ran with
    the prefix cache, by the ``run_args.json`` each evaluation kept (rows measured with and without it are told
    apart in the report: the cache changes bf16 rounding, not the method)."""
    cached = set()
    for record in sorted((plan.out / "eval").glob("*/run_args.json")):
        evaluation = json.loads(record.read_text()).get("arguments", {}).get("evaluation", {})
        row = row_of_folder(record.parent.name)
        if row is not None and evaluation.get(option) and (record.parent / "metrics.json").is_file():
            cached.add(row)
    return [r for r in [*ROW_TITLES, REPEAT] if r in cached]


def _fmt(v: Optional[float], kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.2f}" if kind == "ppl" else f"{100 * v:.1f}"


def render(plan: Plan, rows: dict, timings: dict, driver_cmd: str) -> str:
    """The report (docs/results_tables.md): summary, per-metric tables, comparisons, costs, commands."""
    c = plan.cfg
    shapes = plan.grid
    labels = [label(d, w) for d, w in shapes]
    order = [r for r in ROW_TITLES if r in rows]
    documents = f"first {c.lm_eval_limit} documents each" if c.lm_eval_limit else "all documents"
    shots = "five-shot" if c.mmlu_shots else "zero-shot"
    lines = [f"# Results: {c.title}", "",
             "Regenerate with:", "", "```", driver_cmd, "```", "",
             f"Training: Alpaca-cleaned, {c.steps} optimizer steps of {c.batch_size} examples "
             f"({c.source_len}+{c.target_len} tokens at most), learning rate 2e-4 constant after {c.warmup_steps} "
             f"warm-up steps, LoRA r={c.lora_r} on every projection (MoE-LoRA: 5 experts, top-2), seed 0. "
             f"Evaluation: WikiText-2 test perplexity{'' if not c.wikitext_windows else f' (first {c.wikitext_windows} windows)'}, "
             f"ARC-Easy acc, PIQA acc, HellaSwag acc_norm ({documents}, lm-eval), MMLU "
             f"test {shots} accuracy ({c.mmlu_samples or 'all'} questions). Accuracies in %; 'avg' is the mean of the four.",
             ""]
    cached = prefix_cached_rows(plan)
    if cached:
        lines += [f"MMLU with the prefix cache (`--mmlu_prefix_cache`: each batch's shared exemplars run once): "
                  f"{', '.join(ROW_TITLES.get(r, r) for r in cached)}; the other rows without it.", ""]
    cached = prefix_cached_rows(plan, "lm_eval_prefix_cache")
    if cached:
        lines += [f"ARC-Easy, PIQA and HellaSwag with the context cache (`--lm_eval_prefix_cache`: each context "
                  f"shared by several answers runs once): {', '.join(ROW_TITLES.get(r, r) for r in cached)}; the "
                  "other rows without it.", ""]
    other = [(m, f"{n} (%)", "acc") for m, n in OTHER_METRICS.items()
             if any(m in v for shapes in rows.values() for v in shapes.values())]
    for metric, title, kind in (("avg_acc", "Average accuracy (%)", "acc"), (PPL, "WikiText-2 perplexity", "ppl"),
                                *((m, f"{n} accuracy (%)", "acc") for m, n in ACC_METRICS.items()), *other):
        lines += [f"## {title}", "", "| row | " + " | ".join(labels) + " |",
                  "| --- | " + " | ".join("---:" for _ in labels) + " |"]
        for r in order:
            cells = [_fmt(rows[r].get(lab, {}).get(metric), kind) for lab in labels]
            if all(x == "-" for x in cells):
                continue
            lines.append(f"| {ROW_TITLES[r]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += comparisons(plan, rows)
    lines += ablation_effects(plan, rows)
    rep = rows.get(REPEAT, {})
    if rep:
        first = rows.get("amoeba", {})
        shown_metrics = (PPL, *ACC_METRICS, *OTHER_METRICS, "avg_acc")  # not their errors: they follow the values
        diffs = [(lab, m, first.get(lab, {}).get(m), v) for lab, vals in rep.items() for m, v in vals.items()
                 if m in shown_metrics and first.get(lab, {}).get(m) != v]
        verdict = "identical numbers, every metric" if not diffs else "DIFFERENT numbers"
        shown = ", ".join(f"{lab}: avg {_fmt(v.get('avg_acc'), 'acc')}, ppl {_fmt(v.get(PPL), 'ppl')}"
                          for lab, v in rep.items())
        lines += ["## Reproducibility", "",
                  f"(d)'s evaluation run again in a separate process: {verdict} ({shown}).", ""]
        if diffs:
            lines += ["| shape | metric | (d) | again |", "| --- | --- | ---: | ---: |"]
            lines += [f"| {lab} | {m} | {a if a is None else f'{a:.4f}'} | {b:.4f} |" for lab, m, a, b in diffs]
            lines.append("")
    lines += training_tokens(plan)
    lines += ["## Cost", "", "Wall seconds of each job on the machine that ran it, all tries together; several jobs "
              "shared one GPU ('at a time': the driver's `--jobs`), so these are not exclusive GPU seconds.", "",
              "| job | seconds | runs | at a time |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['seconds']:.0f} | {v['runs']} | {v.get('concurrent_jobs', '-')} |"
              for k, v in sorted(timings.items())]
    lines += ["", "Every command the script ran is in `commands.sh` of its output folder.", ""]
    return "\n".join(lines)


def training_tokens(plan: Plan) -> list[str]:
    """How many tokens each training run saw (its train_results.json: input tokens, prompt and answer)."""
    found = []
    for path in sorted((plan.out / "train").glob("*/train_results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "tokens_seen" in res:
            skipped = ", ".join(str(s) for s in res.get("skipped_steps", [])) or "none"
            found.append((path.parent.name, int(res["tokens_seen"]), int(res.get("processes", 1)), skipped))
    if not found:
        return []
    lines = ["## Training tokens", "", "Input tokens (prompt and answer) each training run saw. A one-for-all run "
             "trains every subnet of its sandwich on each batch, so each of its shapes saw all of them. Skipped "
             "steps: optimizer steps whose loss or gradients were not finite and were not applied "
             "(`--max_skipped_steps`). Processes: GPUs the run was spread over (`--ddp`; each took its share of "
             "every batch).", "", "| run | tokens | processes | skipped steps |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {tokens:,} | {procs} | {skipped} |" for name, tokens, procs, skipped in found]
    return lines + [""]


def comparisons(plan: Plan, rows: dict) -> list[str]:
    """(d) against (a), (b) at every shape and against the per-shape rows (c), (c'), (c'') that have results, at
    the single shapes: average accuracy, MMLU (the paper's aims are in MMLU points) and perplexity."""
    d = rows.get("amoeba", {})
    if not d:
        return []
    others = ["stage1", "shortgpt", *(r for r in ("pershape", "pershape_kd", "pershape_kd_total") if r in rows)]
    if "pershape" not in others and plan.wanted("pershape"):  # a planned (c) has its column before it has results
        others.insert(2, "pershape")
    short = {r: ROW_TITLES[r].split(" ", 1)[0] for r in others}  # "(a)", "(c'')"
    lines = ["## One-for-all against the baselines", "",
             "Differences in points (average accuracy, then MMLU) and perplexity ratio (below 1: (d) is better).", "",
             "| shape | params (M) | (d) avg | " + "".join(f"(d) - {short[r]} | " for r in others)
             + "(d) MMLU | " + "".join(f"MMLU (d) - {short[r]} | " for r in others)
             + "(d) ppl | " + "".join(f"ppl (d) / {short[r]} | " for r in others).rstrip(" "),
             "| --- |" + " ---: |" * (3 * len(others) + 4)]
    for dd, w in plan.grid:
        lab = label(dd, w)
        if lab not in d:
            continue
        row = d[lab]

        def diff(other, key):
            o = rows.get(other, {}).get(lab, {})
            return f"{100 * (row[key] - o[key]):+.1f}" if key in o and key in row else "-"

        def ratio(other):
            o = rows.get(other, {}).get(lab, {})
            return f"{row[PPL] / o[PPL]:.3f}" if PPL in o and PPL in row else "-"
        lines.append(f"| {lab} | {row.get('params', float('nan')) / 1e6:.1f} | {_fmt(row.get('avg_acc'), 'acc')} | "
                     + "".join(f"{diff(r, 'avg_acc')} | " for r in others)
                     + f"{_fmt(row.get(MMLU), 'acc')} | " + "".join(f"{diff(r, MMLU)} | " for r in others)
                     + f"{_fmt(row.get(PPL), 'ppl')} | " + "".join(f"{ratio(r)} | " for r in others).rstrip(" "))
    lines.append("")
    singles = [label(a, b) for a, b in plan.single]
    abl = [r for r in ("amoeba_long", "abl_lora", "abl_nobal", "abl_nokd") if r in rows]
    per_shape = [r for r in others if r.startswith("pershape")]
    if abl or set(per_shape) - {"pershape"}:
        lines += ["## Ablations and the long run (avg accuracy % / perplexity)", "",
                  "| row | " + " | ".join(singles) + " |", "| --- | " + " | ".join("---:" for _ in singles) + " |"]
        for r in ["amoeba", *per_shape, *abl]:
            cells = []
            for lab in singles:
                v = rows.get(r, {}).get(lab, {})
                cells.append(f"{_fmt(v.get('avg_acc'), 'acc')} / {_fmt(v.get(PPL), 'ppl')}")
            lines.append(f"| {ROW_TITLES[r]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def ablation_effects(plan: Plan, rows: dict) -> list[str]:
    """What each component of (d) is worth, with error bars: (d) minus each ablation (e) at the single shapes, in
    average accuracy and MMLU points, +- two standard errors of the difference (the tasks' sampling errors), against
    the noise floor of training itself ((d) and (d'') differ only by the seed; measured at the smallest shape)."""
    d = rows.get("amoeba", {})
    ablations = [r for r in ("abl_lora", "abl_nobal", "abl_nokd") if r in rows]
    if not d or not ablations:
        return []
    smallest = label(*plan.single[-1])
    seed = rows.get("amoeba_seed1", {}).get(smallest, {})
    floor = {m: abs(d[smallest][m] - seed[m]) for m in ("avg_acc", MMLU) if m in d.get(smallest, {}) and m in seed}
    errors = {"avg_acc": "avg_acc_se", MMLU: "mmlu_se"}
    judged = plan.wanted("amoeba_seed1")
    if floor:
        avg, mm = (100 * floor.get(m, math.nan) for m in ("avg_acc", MMLU))
        noise = (f"Noise floor of training: (d) and (d'') (another seed) differ by {avg:.1f} average and {mm:.1f} "
                 f"MMLU points at {smallest}. An effect counts when the difference is larger than both.")
    elif judged:
        noise = f"The noise floor of training ((d'') at {smallest}) is not measured yet."
    else:
        noise = "This experiment has no run with another seed ((d''), the noise floor of training): nothing is judged."
    lines = ["## What each component is worth", "",
             "(d) minus each ablation, in points, +- two standard errors of the difference (each task's sampling "
             "error: lm-eval's for ARC-Easy, PIQA and HellaSwag, binomial over the questions for MMLU). " + noise, "",
             "| ablation | shape | avg (d) - ablation | MMLU (d) - ablation | beyond the noise |",
             "| --- | --- | ---: | ---: | --- |"]
    for r in ablations:
        for lab in [label(a, b) for a, b in plan.single]:
            mine, theirs = d.get(lab, {}), rows[r].get(lab, {})
            cells, verdicts = [], []
            for metric, name in (("avg_acc", "avg"), (MMLU, "MMLU")):
                if metric not in mine or metric not in theirs:
                    cells.append("-")
                    continue
                diff = mine[metric] - theirs[metric]
                se = (math.sqrt(mine[errors[metric]] ** 2 + theirs[errors[metric]] ** 2)
                      if errors[metric] in mine and errors[metric] in theirs else None)
                cells.append(f"{100 * diff:+.1f}" + (f" +- {200 * se:.1f}" if se is not None else ""))
                if se is not None and metric in floor:
                    verdicts.append(f"{name}: {'yes' if abs(diff) > max(2 * se, floor[metric]) else 'no'}")
            if cells != ["-", "-"]:
                verdict = ", ".join(verdicts) or ("not judged (no noise floor yet)" if judged else "-")
                lines.append(f"| {ROW_TITLES[r]} | {lab} | {cells[0]} | {cells[1]} | {verdict} |")
    lines.append("")
    return lines


def plot(plan: Plan, rows: dict, path: Path) -> Optional[Path]:
    """Average accuracy and perplexity against parameters: every measured shape as a point, and for rows with
    more than four shapes a line through their frontier (no smaller shape of the row does better)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # a shape's size is the same in every row; a shape whose evaluation is incomplete may lack it in its own
    params = {lab: v["params"] for shapes in rows.values() for lab, v in shapes.items() if "params" in v}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # colours by the rows that have results, so that no two of them share one (matplotlib has ten; past ten
    # rows the markers are hollow)
    present = [r for r in ROW_TITLES if rows.get(r)]
    for i, r in enumerate(present):
        for ax, metric in zip(axes, ("avg_acc", PPL)):
            sign = 1 if metric == "avg_acc" else -1  # higher accuracy, lower perplexity is better
            pts = sorted((params[lab] / 1e6, v[metric] * (100 if metric == "avg_acc" else 1))
                         for lab, v in rows.get(r, {}).items() if metric in v and lab in params)
            if not pts:
                continue
            color = f"C{i % 10}"
            many = len(pts) > 4
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o" if many else "s", color=color, markersize=5,
                    markerfacecolor=color if i < 10 else "none", alpha=0.85,
                    label=ROW_TITLES[r] if metric == "avg_acc" else None)
            if many:
                front, best = [], None
                for x, y in pts:
                    if best is None or sign * y > sign * best:
                        front.append((x, y))
                        best = y
                ax.plot([x for x, _ in front], [y for _, y in front], "-", color=color, alpha=0.85)
    axes[0].set_ylabel("average accuracy (%)")
    axes[1].set_ylabel("WikiText-2 perplexity")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("parameters (M)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{plan.cfg.title} subnets")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def docs_figure_name(tables: Path) -> str:
    """The plot's file name beside the tables written by ``--docs``: ``results_tables.md`` ->
    ``results_frontier.png``, ``results_qwen_tables.md`` -> ``results_qwen_frontier.png``, else ``<stem>_frontier.png``."""
    stem = tables.stem
    return (stem.replace("tables", "frontier") if "tables" in stem else f"{stem}_frontier") + ".png"


def report(plan: Plan, docs: Optional[str], driver_cmd: str) -> Path:
    rows = collect(plan)
    timings_path = plan.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    write_json(plan.out / "results.json", rows)
    png = plot(plan, rows, plan.out / "frontier.png")
    text = render(plan, rows, timings, driver_cmd)
    if png:
        text = text.replace("## Average accuracy", "![frontier](frontier.png)\n\n## Average accuracy", 1)
    write_text(plan.out / "RESULTS.md", text)
    if docs:
        target = Path(docs)
        figure = docs_figure_name(target)
        write_text(target, text.replace("](frontier.png)", f"]({figure})"))
        if png:
            shutil.copyfile(png, target.with_name(figure))
    return plan.out / "RESULTS.md"


# ----------------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    preset = first.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                   help="the model and its settings (each flag below overrides the preset)")
    p.add_argument("--out", default="output/experiment")
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    p.add_argument("--strategy", default=str(ROOT / "dp_selection_strategy.npy"))
    p.add_argument("--phase", default="calibrate,prep,train,eval,report",
                   help="comma list of calibrate, prep, train, eval, report")
    p.add_argument("--jobs", type=int, default=6,
                   help="jobs run at once (on one H200, 9 used up to 104 GB and kept the GPU 99%% busy)")
    p.add_argument("--rows", default=None, help="only these rows (comma list of: " + ", ".join(ROW_TITLES) + ")")
    p.add_argument("--deadline_s", type=float, default=None,
                   help="stop after this many seconds (resumable; exit status 3 when something is left to do)")
    p.add_argument("--docs", default=None, help="also write the report here (e.g. docs/results_tables.md)")
    p.add_argument("--pack", default=None,
                   help="after each job and at the end, write --out without weights or checkpoints to this .tar.gz "
                        "(replaced whole each time), to continue the run elsewhere (unpack it into --out there)")
    p.add_argument("--dataset", default="alpaca-clean")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--long_steps", type=int, default=1000)
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--save_steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--source_len", type=int, default=384)
    p.add_argument("--target_len", type=int, default=128)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--max_skipped_steps", type=int, default=0,
                   help="each training run's --max_skipped_steps (non-finite steps skipped, listed in the report)")
    p.add_argument("--depths", default="30,26,22,18")
    p.add_argument("--widths", default="1,3/4,5/8")
    p.add_argument("--single_shapes", default="30x1,26x3/4,22x5/8,18x5/8")
    p.add_argument("--ablation_shapes", default=None,
                   help="evaluate the ablations (e) at these of the single shapes only (e.g. 18x3/4, where the noise "
                        "floor (d'') is measured): one trained ablation and its evaluation then fit one GPU session. "
                        "Default: every single shape")
    p.add_argument("--lm_eval_limit", type=int, default=1000)
    p.add_argument("--mmlu_samples", type=int, default=0,
                   help="first N MMLU test questions (in subject order); 0: all 14,042")
    p.add_argument("--wikitext_windows", type=int, default=0, help="0: the whole test split")
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--calib_seqlen", type=int, default=512)
    p.add_argument("--grid", choices=("full", "singles"), default="full",
                   help="shapes of rows (a), (b), (d): every depth x width, or the single shapes only")
    p.add_argument("--mmlu_shots", type=int, choices=(0, 5), default=0, help="MMLU test: zero- or five-shot")
    p.add_argument("--mmlu_prefix_cache", type=int, choices=(0, 1), default=0,
                   help="1: evaluate MMLU with main.py's --mmlu_prefix_cache (each batch's shared exemplars run "
                        "once, as a KV cache; the qwen preset: 1); 0: every prompt in full")
    p.add_argument("--lm_eval_prefix_cache", type=int, choices=(0, 1), default=0,
                   help="1: evaluate the lm-eval tasks with main.py's --lm_eval_prefix_cache (each context shared by "
                        "several answers runs once); 0: HFLM's own path, context and answer together per answer")
    p.add_argument("--flap_samples", type=int, default=512, help="calibrate phase: C4 sequences for FLAP")
    p.add_argument("--dp_batches", type=int, default=40,
                   help="calibrate phase: MMLU validation batches of 8 questions for the layer DP (the seed's 40)")
    p.add_argument("--repeat_eval", type=int, choices=(0, 1), default=1,
                   help="1: evaluate (d) a second time in another process, on the largest and smallest shapes "
                        "(reproducibility; the qwen preset: 0)")
    p.add_argument("--ddp", type=int, choices=(0, 1), default=0,
                   help="1: with several --gpus, the one-for-all trainings ((d), its second seed, the ablations) "
                        "run one at a time over all of them (torchrun, DDP; each GPU takes --batch_size / GPUs "
                        "examples: the same batches); 0: each training on one GPU, beside other jobs (the qwen "
                        "preset: 1)")
    p.add_argument("--eval_per_shape", type=int, choices=(0, 1), default=0,
                   help="1: evaluate each shape of rows (d) and (e) in a job of its own, side by side (the qwen "
                        "preset: 1); 0: one job per width for (d), one per ablation")
    p.add_argument("--eval_split", type=int, choices=(0, 1), default=0,
                   help="1: evaluate each shape of a trained row in three jobs side by side (MMLU with WikiText-2, "
                        "HellaSwag, ARC-Easy with PIQA; one process leaves the GPU about half idle); a shape already "
                        "evaluated whole stays so (the qwen preset: 1)")
    p.add_argument("--gpus", default=None, help="comma list of GPU indices to spread the jobs over (e.g. 0,1)")
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the plumbing on a CPU")
    p.set_defaults(**{k: v for k, v in PRESETS[preset].items() if k not in ("title", "script", "default_rows")})
    args = p.parse_args(argv)
    if args.max_skipped_steps < 0:
        p.error(f"--max_skipped_steps: {args.max_skipped_steps} must be at least 0")
    n = len(gpu_list(args.gpus))
    if args.ddp and n > 1 and args.batch_size % n:
        p.error(f"--ddp: --batch_size {args.batch_size} does not split over the {n} GPUs of --gpus")
    for key in ("title", "script", "default_rows"):
        setattr(args, key, PRESETS[preset][key])
    if args.smoke:
        args.steps, args.long_steps, args.warmup_steps, args.save_steps = 2, 3, 0, 1
        args.batch_size, args.source_len, args.target_len, args.lora_r = 2, 48, 16, 4
        args.lm_eval_limit, args.mmlu_samples, args.wikitext_windows = 4, 8, 1
        args.eval_batch_size, args.calib_samples, args.calib_seqlen = 4, 2, 32
        args.flap_samples, args.dp_batches = 2, 1
    return args


# Weights and checkpoints stay behind: a packed run is its metrics, logs, strategies and training curves.
HEAVY_DIRS = ("checkpoint-*", "adapter_model*")
HEAVY_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def pack(out: Path, target: Path) -> Path:
    """Write ``out`` without its weights as a gzipped tar at ``target`` (through a temporary file), to carry a run
    to another machine; unpacked into ``--out`` there, the driver counts what it holds as done. The adapter
    folders are left out whole, so no evaluation there can start from adapters without weights."""
    import tarfile

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        heavy_dir = any(Path(p).match(pattern) for p in parts[:-1] for pattern in HEAVY_DIRS)
        heavy = any(Path(parts[-1]).match(pattern) for pattern in HEAVY_DIRS + HEAVY_FILES) if parts else False
        return None if heavy_dir or heavy else info

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for child in sorted(out.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    os.replace(tmp, target)
    logger.info("packed %s into %s (%.1f MB)", out, target, target.stat().st_size / 1e6)
    return target


def regenerate_command(argv: list[str], script: str = PRESETS["smollm2"]["script"]) -> str:
    """The command that reruns everything from scratch: ``script`` (with its preset) and ``argv`` without the
    scheduling flags."""
    drop_with_value = {"--phase", "--deadline_s", "--jobs", "--out", "--gpus", "--preset", "--pack"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in drop_with_value:
            skip = "=" not in a
            continue
        out.append(a)
    return shlex.join(["python", *script.split(), "--out", "output/experiment", *out])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(argv)
    try:
        plan = Plan(cfg)
    except UsageError as err:  # a bad shape or list flag: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + cfg.deadline_s if cfg.deadline_s else float("inf")
    phases = [x.strip() for x in cfg.phase.split(",") if x.strip()]
    gpus = gpu_list(cfg.gpus) or None
    failed, stopped = [], []
    if "calibrate" in phases:
        outcome = run_jobs(plan.calibrate_jobs(), plan.out, cfg.jobs, deadline, gpus)
        failed, stopped = outcome["failed"], outcome["stopped"]
        if not failed and not stopped:
            plan.merge_calibration()
    if not Path(plan.strategy).is_file() and any(p in phases for p in ("prep", "train", "eval")):
        print(f"error: --strategy: {plan.strategy} does not exist; run the calibrate phase first", file=sys.stderr)
        return 1 if failed else (3 if stopped else 2)
    if "prep" in phases and plan.wanted("shortgpt"):
        outcome = run_jobs(plan.prep_jobs(), plan.out, cfg.jobs, deadline, gpus)
        failed, stopped = outcome["failed"], outcome["stopped"]
        if not failed and not stopped:
            plan.merge_shortgpt()
    # Training and evaluation share the job slots: an evaluation starts once its inputs exist.
    evals = plan.eval_jobs()
    jobs = (plan.needed_training(plan.train_jobs(), evals) if "train" in phases else []) + \
        (evals if "eval" in phases else [])
    if jobs:
        # with --pack, the pack is renewed as each job ends: a session cut off later still carries what finished
        repack = (lambda job: pack(plan.out, Path(cfg.pack))) if cfg.pack else None
        outcome = run_jobs(jobs, plan.out, cfg.jobs, deadline, gpus, on_finished=repack)
        failed += outcome["failed"]
        stopped += outcome["stopped"]
    if "report" in phases:
        cmd = regenerate_command(argv if argv is not None else sys.argv[1:], cfg.script)
        path = report(plan, cfg.docs, cmd)
        print(path.read_text())
    if cfg.pack:
        pack(plan.out, Path(cfg.pack))
    if stopped:
        print(f"stopped at the deadline (run the same command again to continue): {', '.join(stopped)}",
              file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {plan.out / 'logs'})", file=sys.stderr)
        return 1
    return 3 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
