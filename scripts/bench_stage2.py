"""Benchmark: speed and memory of the Stage 2 one-for-all training step.

Speed (on ``--model``, default SmolLM2-135M-Instruct; bf16 on CUDA, fp32 on a CPU): the forward+backward
time of one sandwich step (largest, two random subnets, smallest; the seed's MoE-LoRA, 5 experts, top-2)
against the sum of the same subnets trained one at a time, so the overhead of the sandwich machinery
(subnet switching, gate routing, distillation targets, balancing) shows; and each subnet's step time
against its parameter ratio. The optimizer step is timed separately (once per sandwich either way).

Memory (``--memory``, CUDA only): peak GPU memory of the seed's Llama-2 Stage 2 settings (MoE-LoRA r=64 on
every projection, widths [1,7/8,3/4,5/8], min 20 layers, 2 random subnets, fp16) on a random-weight
Llama-2-7B-shaped model loaded in 4-bit NF4 with double quantization, batch 2 x 512 tokens (384 prompt +
128 response), gradient checkpointing. The random checkpoint is written once to ``--memory_model_dir``.

    python scripts/bench_stage2.py --out results/bench_stage2.json                   # speed
    python scripts/bench_stage2.py --memory --out results/bench_stage2_memory.json   # 7B 4-bit memory (CUDA)
    python scripts/bench_stage2.py --smoke --out /tmp/s2.json                        # tiny, CPU
    python scripts/bench_stage2.py --compare 7b-bf16-4x512,7b-bf16-8x512,7b-4bit,smollm2-bf16-8x512 \
        --out results/bench_stage2_compare.json                                       # against the peer (CUDA)

**Against the peer** (``--compare``): on one batch per case, the step of a plain peft LoRA model (r=64 on all
seven projections, alpha 16, the full model, the label loss, bf16 autocast; fp16 and gradient checkpointing for
the 4-bit case, as QLoRA does) against this project's full-model step and its sandwich step (the seed's Llama-2
Stage 2 subnets), each before and after the step's optimisations (the code path before them and the current
one, switched in the same process: the output matrix at every position or at the answer positions only), as
s/step, tokens/s and model FLOPs utilisation:

    MFU = sum over the step's subnets of 4 * N_sub * T  /  (seconds * peak FLOP/s)

with T the tokens of the batch (batch x 512) and N_sub the parameters of the subnet's matrix products (its
decoder layers as kept, and the output matrix; not the input embedding, a lookup). 4N per token: the forward
(2N) and the backward to the activations (2N); a frozen base needs no weight gradients, and the adapters' own
products, attention's score products and recomputation under checkpointing are not counted. Peak: ``--peak_tflops``
(the H200's dense bf16, 989). Cases: ``7b-bf16-4x512``, ``7b-bf16-8x512`` (random Llama-2-7B shape, bf16),
``7b-4bit`` (4-bit NF4, the seed's settings: fp16, 2 x 512, checkpointing), ``smollm2-bf16-8x512``. ``--compile``
adds our two steps with every decoder layer compiled (``--compile_layers``; the warm-up steps compile);
``--compiled_only`` then skips our eager rows (the peer stays), e.g. to profile the compiled steps in a short run.
``--layers_per_graph N[,N...]`` compiles runs of N consecutive layers as one call (Stage 2's option), timing the
compiled rows once per value.
``--split_after`` adds our sandwich step with the other settings of the two switches (logits at the answer
positions only; how the MoE-LoRA experts are mixed: the plain product "before", the router's default -- the hybrid
mix on CUDA --, or element-wise, an opt-in) that "before" and "after" do not already time; every row of ours records
the settings it ran with, to tell which one moves a step.
``--profile STEPS`` adds what torch.profiler sees per step (operators, kernels, the device's busy time, the top
operators); ``--host_profile STEPS`` what Python's cProfile sees (the functions the host spends the step in), for a
step bound by the host, where the device's busy time is far below the wall time.
``--real_lengths alpaca-clean`` gives the batch's examples the lengths of real ones (so the padded batch holds
padding, as in training) and adds our sandwich step on the same examples without padding (``--padding_free``);
tokens/s and MFU then count the real tokens, T above.

Prints a markdown table at the end and writes every number to ``--out`` (json).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoeba.adapters import get_router  # noqa: E402
from amoeba.args import parse_args  # noqa: E402
from amoeba.compiled import MODES, check_compile_mode, check_layers_per_graph, compile_layers  # noqa: E402
from amoeba.elastic import make_elastic  # noqa: E402
from amoeba.errors import UsageError  # noqa: E402
from amoeba.files import library_versions, write_json  # noqa: E402
from amoeba.instruct_data import InstructionCollator, load_examples, pack_batch  # noqa: E402
from amoeba.loading import load_tokenizer  # noqa: E402
from amoeba.subnet import Subnet  # noqa: E402
from amoeba.pipeline import load_settings  # noqa: E402
from amoeba.stages.finetuning import prepare_trainer  # noqa: E402

logger = logging.getLogger("bench_stage2")

ROOT = Path(__file__).resolve().parents[1]
SEED_LLAMA2_FLAGS = ["--lora_modules", "all", "--enable_shrinking", "--kd_weight", "1", "--min_num_layer", "20",
                     "--random_sample_num_layer", "2", "--distill_method", "sp", "--shrinking_method",
                     "first_layers", "--shrinkable_width", "--width_choice", "[1,7/8,3/4,5/8]",
                     "--use_moe_lora", "--moe_num_expert", "5", "--moe_topk", "2"]


def parse(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="model folder (speed; the smollm2 case of --compare)")
    p.add_argument("--out", default="results/bench_stage2.json", help="json file for the results")
    p.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--source_len", type=int, default=384, help="prompt tokens per sequence")
    p.add_argument("--target_len", type=int, default=128, help="response tokens per sequence (with labels)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--subnets", default="30:1,24:0.75,22:0.875,18:0.625",
                   help="sandwich as layers:width pairs, largest first, smallest last")
    p.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint activations (speed part)")
    p.add_argument("--memory", action="store_true", help="measure the 7B 4-bit peak memory instead (CUDA)")
    p.add_argument("--memory_model_dir", default="/tmp/amoeba-llama2-7b-random", help="random 7B checkpoint")
    p.add_argument("--memory_steps", type=int, default=3, help="sandwich steps for the memory measurement")
    p.add_argument("--count_ops", action="store_true",
                   help="count the operations one training step of the second --subnets entry dispatches (under "
                        "bf16 autocast), instead of timing: what a launch-bound step's time follows")
    p.add_argument("--compare", default=None, help="comma list of cases to measure against the peer (see above)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's peak dense bf16 TFLOP/s, for MFU")
    p.add_argument("--compile", action="store_true",
                   help="with --compare: also time our steps with every decoder layer compiled (--compile_layers)")
    p.add_argument("--compile_mode", default="default", choices=MODES,
                   help="with --compile: torch.compile's mode for the compiled rows (Stage 2's --compile_mode); "
                        "reduce-overhead adds CUDA graphs (CUDA only)")
    p.add_argument("--layers_per_graph", default="1", metavar="N[,N...]",
                   help="with --compile: consecutive decoder layers compiled as one call (Stage 2's "
                        "--layers_per_graph); a comma list times the compiled rows once per value")
    p.add_argument("--compiled_only", action="store_true",
                   help="with --compile: time only the peer and the compiled rows (skip our eager rows), e.g. to "
                        "profile the compiled steps within a short run")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="with --compare: also profile each step over STEPS calls (kernels launched, device busy "
                        "time, top operators)")
    p.add_argument("--host_profile", type=int, default=0, metavar="STEPS",
                   help="with --compare: also run each of our steps STEPS times under Python's cProfile and list the "
                        "functions the host spends the most time in (own and cumulative), for steps bound by the host")
    p.add_argument("--profile_kernels", default=None, metavar="REGEX",
                   help="with --profile: also list where the device kernels whose name matches REGEX come from "
                        "(launching operator, its input shapes and dtypes, the operators above it)")
    p.add_argument("--split_after", action="store_true",
                   help="with --compare: also time the sandwich with the other settings of the step's two switches "
                        "(logits at the answer positions only; how the experts are mixed), to tell which one moves "
                        "the step")
    p.add_argument("--same_losses", type=int, default=0, metavar="STEPS",
                   help="with --compare: also train STEPS sandwich steps (optimizer included) from the same start "
                        "and seed before and after the optimisations, and report how far their losses differ")
    p.add_argument("--real_lengths", default=None, metavar="DATASET",
                   help="with --compare: the batch's examples take the lengths of random examples of this "
                        "instruction data (e.g. alpaca-clean, offline from $AMOEBA_DATA_DIR; tokenized with --model's "
                        "tokenizer, cut to 384 + 128) instead of full 512-token rows, so the padded batch holds "
                        "padding; adds our sandwich step on the same examples without it (--padding_free). "
                        "Tokens/s and MFU then count the real tokens")
    p.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, a few steps")
    return p.parse_args(argv)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_batch(batch: int, source_len: int, target_len: int, vocab: int, device, seed: int = 0) -> dict:
    """Random token ids with labels on the last ``target_len`` positions (the collator's layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, source_len + target_len), generator=g)
    labels = ids.clone()
    labels[:, :source_len] = -100
    mask = torch.ones_like(ids)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def case_lengths(opts) -> tuple[int, int]:
    """Prompt and response tokens of a ``--compare`` row: the seed's 384 + 128 (24 + 8 with ``--smoke``)."""
    return (384, 128) if not opts.smoke else (24, 8)


def real_example_layouts(opts, sizes) -> dict:
    """Batch size -> that many random examples of ``--real_lengths``, collated as Stage 2 collates them
    (``--model``'s tokenizer, cut to :func:`case_lengths`): the padded layout a case's batch copies. The data and
    the tokenizer are read once. UsageError: no such data, or no such tokenizer."""
    data = load_examples(opts.real_lengths, data_dir=os.environ.get("AMOEBA_DATA_DIR"))
    try:
        tokenizer = load_tokenizer(opts.model)
    except UsageError as err:
        raise UsageError(err.message, "--model") from None
    collate = InstructionCollator(tokenizer, *case_lengths(opts))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    return {b: collate([data[i] for i in order[:b]]) for b in sizes}


def with_random_ids(layout: dict, vocab: int, device) -> dict:
    """``layout`` (a collated batch) with random token ids below ``vocab`` in place of its own, labels where it has
    them: the same lengths, prompts and padding, for any model's vocabulary."""
    ids = torch.randint(0, vocab, layout["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    labels = torch.where(layout["labels"] != -100, ids, layout["labels"])
    return {"input_ids": ids.to(device), "attention_mask": layout["attention_mask"].to(device),
            "labels": labels.to(device)}


def _synthetic_data(vocab: int) -> dict:
    from datasets import Dataset

    rows = [{"input": "x", "output": "y"}] * 8
    return {"train_dataset": Dataset.from_list(rows), "eval_dataset": None, "data_collator": lambda b: b}


def build(model_dir: str, out_dir: Path, flags: list[str], model=None, tokenizer=None):
    """(args, model, em, trainer) for the Stage 2 step with ``flags``, on a synthetic dataset."""
    from amoeba.loading import load_model_and_tokenizer

    argv = ["--model_name_or_path", model_dir, "--output_dir", str(out_dir), "--do_train", "True",
            "--report_to", "none", "--save_strategy", "no", "--group_by_length", "False", *flags]
    args = parse_args(argv)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(load_settings(args))
    em = make_elastic(model)
    vocab = int(model.config.vocab_size)
    trainer, _ = prepare_trainer(args, model, tokenizer, em, None, data=_synthetic_data(vocab))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    # Trainer.train() runs the model's forward under its mixed-precision autocast (accelerate wraps the forward when
    # it prepares the model); the steps timed here call training_step directly, so the model is prepared the same
    # way. (Without it, --bf16 steps ran the adapters' float32 products over every token on CUDA cores.)
    trainer.accelerator.prepare_model(trainer.model, device_placement=False)
    return args, trainer.model, em, trainer


def mean_seconds(step, warmup: int, steps: int, label: Optional[str] = None) -> float:
    """Mean seconds of ``step()`` over ``steps`` calls, after ``warmup`` untimed ones (the device waited for).
    With ``label``, each warm-up call's seconds (a compiled step's first ones include compiling) and the mean are
    logged as they come, so a run stopped by a time limit still tells how far it got."""
    for i in range(warmup):
        start = time.perf_counter()
        step()
        _sync()
        if label:
            logger.info("%s: warm-up step %d/%d took %.3f s", label, i + 1, warmup, time.perf_counter() - start)
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
        _sync()
    seconds = (time.perf_counter() - start) / steps
    if label:
        logger.info("%s: %.4f s/step over %d steps", label, seconds, steps)
    return seconds


def kernel_sources(events, pattern: str, steps: int, top: int = 12) -> list[dict]:
    """Where the device kernels whose name matches ``pattern`` (a regular expression) come from: for each, the
    operator that launched it (the innermost ``aten::`` operator above its launch, with its input shapes and
    dtypes) and up to three operators above that (e.g. the autograd node of a backward product), grouped, with
    launches and device milliseconds per step, the costliest ``top`` groups first. ``events``: a profile's
    events recorded with ``record_shapes``."""
    rx = re.compile(pattern)
    groups: dict[tuple, list] = {}
    for event in events:
        for kernel in getattr(event, "kernels", None) or ():
            if not rx.search(kernel.name):
                continue
            op = event
            while op is not None and not op.name.startswith("aten::"):
                op = op.cpu_parent
            op = op or event
            above, parent = [], op.cpu_parent
            while parent is not None and len(above) < 3:
                above.append(parent.name)
                parent = parent.cpu_parent
            key = (kernel.name, op.name, str(list(op.input_shapes or [])),
                   str(list(getattr(op, "input_dtypes", None) or [])), " < ".join(above))
            group = groups.setdefault(key, [0, 0.0])
            group[0] += 1
            group[1] += kernel.duration
    ranked = sorted(groups.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return [{"kernel": k[0], "operator": k[1], "input_shapes": k[2], "input_dtypes": k[3], "called_from": k[4],
             "launches_per_step": n / steps, "device_ms_per_step": us / 1e3 / steps} for k, (n, us) in ranked]


def profile_step(step, steps: int, top: int = 20, label: Optional[str] = None,
                 kernels: Optional[str] = None) -> dict:
    """What ``steps`` calls of ``step()`` spend, per call, from torch.profiler: device kernels launched and the
    device's busy time (CUDA; far below the wall time means the step is bound by launching, not computing), and
    the operators with the most self time (device time on CUDA, CPU time on a CPU). With ``kernels`` (a regular
    expression), also where the matching device kernels come from (:func:`kernel_sources`). With ``label``, the
    summary is logged as soon as it is known (a 7B profile takes minutes; a run cut off by a time limit keeps it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    _sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=kernels is not None) as prof:
        for _ in range(steps):
            step()
        _sync()
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in averages) or 1.0
    ranked = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:top]
    out = {"steps": steps, "time": "device" if cuda else "cpu",
           "operators_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
           "top": [{"name": e.key, "calls_per_step": e.count / steps,
                    "self_ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total}
                   for e in ranked]}
    if cuda:
        launched = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        out["kernels_per_step"] = len(launched) / steps
        out["device_busy_ms_per_step"] = sum(e.time_range.elapsed_us() for e in launched) / 1e3 / steps
    if kernels is not None:
        out["kernel_pattern"] = kernels
        out["kernel_sources"] = kernel_sources(prof.events(), kernels, steps)
    if label:
        logger.info("%s: profile: %.0f operators/step%s; top: %s", label, out["operators_per_step"],
                    f", {out['kernels_per_step']:.0f} kernels/step, device busy {out['device_busy_ms_per_step']:.1f} "
                    "ms/step" if cuda else "",
                    "; ".join(f"{t['name']} {t['self_ms_per_step']:.2f} ms ({100 * t['share']:.1f}%)" for t in out["top"]))
        for source in out.get("kernel_sources", []):
            logger.info("%s: kernel %s: %.1f launches, %.2f ms per step, from %s %s %s < %s", label,
                        source["kernel"], source["launches_per_step"], source["device_ms_per_step"],
                        source["operator"], source["input_shapes"], source["input_dtypes"], source["called_from"])
    return out


def host_profile_step(step, steps: int, top: int = 25, label: Optional[str] = None) -> dict:
    """Where the host spends ``steps`` calls of ``step()``: Python's cProfile, the ``top`` functions by their own
    time and by their cumulative time (ms per step). Operators and kernels are what torch.profiler sees
    (:func:`profile_step`); this shows the Python around them (routing, preparing operands, replaying graphs)."""
    import cProfile
    import pstats

    _sync()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step()
    _sync()
    profiler.disable()
    wall = (time.perf_counter() - start) / steps
    table = pstats.Stats(profiler).stats  # (file, line, function) -> (primitive calls, calls, own s, cumulative s, ...)

    def ranked(column: int) -> list[dict]:
        rows = sorted(table.items(), key=lambda kv: kv[1][column], reverse=True)[:top]
        return [{"function": f"{Path(f).name}:{line}({fn})", "calls_per_step": calls / steps,
                 "own_ms_per_step": 1e3 * own / steps, "cumulative_ms_per_step": 1e3 * cum / steps}
                for (f, line, fn), (_, calls, own, cum, _) in rows]

    out = {"steps": steps, "wall_ms_per_step": 1e3 * wall, "by_own_time": ranked(2), "by_cumulative_time": ranked(3)}
    if label:
        for kind in ("by_own_time", "by_cumulative_time"):
            logger.info("%s: host profile (%.1f ms/step under cProfile), %s: %s", label, out["wall_ms_per_step"],
                        kind.replace("_", " "), "; ".join(
                            f"{r['function']} x{r['calls_per_step']:.0f} {r['own_ms_per_step']:.2f}/"
                            f"{r['cumulative_ms_per_step']:.2f} ms" for r in out[kind]))
    return out


def plan_step(trainer, model, batch, plan):
    """``training_step`` of every subnet in ``plan`` (forward + backward), gradients cleared, as a callable."""
    trainer.fixed_plan = plan
    model.train()

    def step():
        trainer.training_step(model, dict(batch))
        model.zero_grad(set_to_none=True)

    return step


def time_plan(trainer, model, batch, plan, warmup: int, steps: int) -> float:
    """Mean seconds of ``training_step`` (forward + backward of every subnet in ``plan``)."""
    return mean_seconds(plan_step(trainer, model, batch, plan), warmup, steps)


# The step's switches, as (logits at the answer positions only, how the MoE-LoRA experts are mixed: one of the
# router's MIX_METHODS or "auto"), on the trainer and the router; BEFORE is the code path without the optimisations:
# every position's logits, the experts mixed by the plain product (autograd's backward).
BEFORE = (False, "product")
SPLIT_ROWS = {(True, "product"): "answer-only logits alone", (False, "auto"): "default expert mix alone",
              (False, "elementwise"): "element-wise mix alone",
              (True, "elementwise"): "answer-only logits, element-wise mix"}


def step_settings(trainer, model) -> tuple:
    """The trainer's and router's current optimisation settings (see ``BEFORE``)."""
    return trainer.logits_at_targets, get_router(model).mix


def resolved(model, settings: tuple) -> tuple:
    """``settings`` with the expert mix "auto" resolved for the adapters' device (what a step runs)."""
    router = get_router(model)
    return settings[0], router.mix_method(router.lora_route_in.weight.device) if settings[1] == "auto" else settings[1]


def use_settings(trainer, model, settings: tuple) -> None:
    """Switch the step's optimisations to ``settings`` (see ``BEFORE``)."""
    trainer.logits_at_targets, get_router(model).mix = settings


def _restore(model, start: dict) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in start:
                p.copy_(start[name])


def loss_curve(trainer, model, batch, plan, steps: int, start: dict, settings: tuple) -> list[float]:
    """The training losses of ``steps`` optimizer steps of ``plan`` on ``batch``, from the trainable tensors
    ``start`` and a fresh optimizer state, with the optimisations set to ``settings``."""
    use_settings(trainer, model, settings)
    trainer.fixed_plan = plan
    _restore(model, start)
    trainer.optimizer.state.clear()  # optimizers build their state on the first step
    model.zero_grad(set_to_none=True)
    model.train()
    losses = []
    for i in range(steps):
        trainer.state.global_step, trainer._micro_step = i, (-1, 0)  # the router's noise follows the step
        losses.append(float(trainer.training_step(model, dict(batch))))
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
    return losses


def same_losses(trainer, model, batch, plan, steps: int, before: tuple, after: tuple) -> dict:
    """Loss curves of ``steps`` sandwich steps before and after the optimisations, from the same start; the
    trainable tensors, the settings and the trainer's step are left as they were."""
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    found, global_step = step_settings(trainer, model), trainer.state.global_step
    curves = [loss_curve(trainer, model, batch, plan, steps, start, s) for s in (before, after)]
    _restore(model, start)
    model.zero_grad(set_to_none=True)
    trainer.optimizer.state.clear()
    use_settings(trainer, model, found)
    trainer.state.global_step = global_step
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(*curves))
    logger.info("same losses over %d steps: largest relative difference %.2e", steps, diff)
    return {"steps": steps, "before": curves[0], "after": curves[1], "max_relative_difference": diff}


def time_optimizer(trainer, model, batch, plan, steps: int) -> float:
    """Mean seconds of one optimizer step + zero_grad on the adapters."""
    trainer.fixed_plan = plan
    total = 0.0
    for _ in range(steps):
        trainer.training_step(model, dict(batch))
        _sync()
        start = time.perf_counter()
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
        _sync()
        total += time.perf_counter() - start
    return total / steps


def speed(opts, out_dir: Path) -> dict:
    """Sandwich step time vs the sum of its subnets' single steps; per-subnet time vs parameter ratio."""
    flags = list(SEED_LLAMA2_FLAGS)
    model = tok = None
    model_dir = opts.model
    if opts.smoke:
        from tests.conftest import tiny_model

        model = tiny_model("gqa", layers=6)
        model_dir = str(ROOT / "models" / "smollm2-135m-instruct")  # only parsed; the tiny model is used
    flags += ["--bf16"] if torch.cuda.is_available() else []
    flags += ["--gradient_checkpointing", str(opts.gradient_checkpointing)]
    flags[flags.index("--min_num_layer") + 1] = "1"
    args, model, em, trainer = build(model_dir, out_dir, flags, model, tok)
    pairs = [p.split(":") for p in opts.subnets.split(",")]
    plan = []
    for i, (layers, width) in enumerate(pairs):
        n = min(int(layers), em.num_layers)
        role = "largest" if i == 0 else "smallest" if i == len(pairs) - 1 else f"random{i}"
        plan.append((role, Subnet(tuple(range(n)), float(width))))
    device = next(model.parameters()).device
    batch = synthetic_batch(opts.batch, opts.source_len, opts.target_len, int(model.config.vocab_size), device)
    tokens = opts.batch * (opts.source_len + opts.target_len)
    sandwich = time_plan(trainer, model, batch, plan, opts.warmup, opts.steps)
    full_params = em.param_count(em.full_subnet())
    rows = []
    for role, sub in plan:
        t = time_plan(trainer, model, batch, [(role, sub)], opts.warmup, opts.steps)
        rows.append({"role": role, "subnet": sub.label, "seconds": t,
                     "param_ratio": em.param_count(sub) / full_params})
    single_sum = sum(r["seconds"] for r in rows)
    t_full = rows[0]["seconds"]
    for r in rows:
        r["time_ratio"] = r["seconds"] / t_full
    opt = time_optimizer(trainer, model, batch, plan, max(2, opts.steps // 2))
    return {
        "model": "tiny random (smoke)" if opts.smoke else opts.model,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
        "batch_tokens": tokens, "gradient_checkpointing": bool(opts.gradient_checkpointing),
        "sandwich_seconds": sandwich, "single_sum_seconds": single_sum,
        "sandwich_tokens_per_s": tokens / sandwich, "single_sum_tokens_per_s": tokens / single_sum,
        "overhead": sandwich / single_sum - 1.0, "optimizer_step_seconds": opt, "subnets": rows,
    }


MATRIX_PRODUCTS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm")


def count_ops(opts, out_dir: Path) -> dict:
    """Operations dispatched by one forward+backward of one subnet (bf16 autocast, the model's device), and the
    matrix products that still take a float32 input, with their shapes."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()
            self.fp32 = Counter()  # (operator, input shapes) of matrix products with a float32 input

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            self.ops[name] += 1
            if name in MATRIX_PRODUCTS:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if any(t.dtype == torch.float32 for t in tensors):
                    self.fp32[(name, tuple(tuple(t.shape) for t in tensors))] += 1
            return func(*args, **(kwargs or {}))

    flags = list(SEED_LLAMA2_FLAGS) + ["--bf16", "--gradient_checkpointing", "False"]
    flags[flags.index("--min_num_layer") + 1] = "1"
    model = None
    model_dir = opts.model
    if opts.smoke:
        from tests.conftest import tiny_model

        model = tiny_model("gqa", layers=6).to(torch.bfloat16)
        model_dir = str(ROOT / "models" / "smollm2-135m-instruct")
    args, model, em, trainer = build(model_dir, out_dir, flags, model, None)
    layers, width = opts.subnets.split(",")[1].split(":")
    sub = Subnet(tuple(range(min(int(layers), em.num_layers))), float(width))
    trainer.fixed_plan = [("subnet", sub)]
    device = next(model.parameters()).device
    # 13 tokens: a count no model dimension shares, so the listing shows whether token activations are in fp32
    batch = synthetic_batch(1, 9, 4, int(model.config.vocab_size), device)
    model.train()
    counting = Counting()
    with counting, torch.autocast(device.type, dtype=torch.bfloat16):
        trainer.training_step(model, dict(batch))
    ops = counting.ops
    # autocast leaves some products in fp32 on purpose (the router, the experts' mix); on a GPU they take CUDA-core
    # kernels, so they are listed with their shapes (the batch's tokens are not among them when all is well)
    fp32 = [{"operator": op, "input_shapes": [list(x) for x in shapes], "calls": n}
            for (op, shapes), n in counting.fp32.most_common()]
    return {"subnet": sub.label, "operations": sum(ops.values()),
            "matrix_products": sum(ops[name] for name in MATRIX_PRODUCTS), "casts": ops["aten._to_copy"],
            "fp32_matrix_products": sum(e["calls"] for e in fp32), "fp32_products": fp32,
            "batch_tokens": int(batch["input_ids"].numel()), "top": dict(ops.most_common(12))}


def random_tokenizer(path: Path, vocab_size: int) -> None:
    """Save a word-level tokenizer of ``vocab_size`` tokens (``<unk>``, ``<s>``, ``</s>``, then ``t3``, ...) to
    ``path``: the random checkpoints' ids are random anyway, and no real model's tokenizer need be present."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)


def _random_7b(path: Path) -> None:
    """Write a random-weight Llama-2-7B-shaped checkpoint (fp16, with its own tokenizer) once; written beside,
    then renamed, so a run stopped half-way leaves no folder that looks complete."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    logger.info("writing a random 7B-shaped checkpoint to %s", path)
    part = path.with_name(path.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(part)
    del model
    torch.cuda.empty_cache()
    random_tokenizer(part, cfg.vocab_size)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete folder of an earlier version of this function
    part.rename(path)


def memory(opts, out_dir: Path) -> dict:
    """Peak GPU memory of the seed's Llama-2 Stage 2 step on a 4-bit 7B-shaped model."""
    if not torch.cuda.is_available():
        if not opts.smoke:
            raise SystemExit("--memory needs a CUDA GPU (4-bit bitsandbytes)")
        from tests.conftest import tiny_model

        args, model, em, trainer = build(str(ROOT / "models" / "smollm2-135m-instruct"), out_dir,
                                         SEED_LLAMA2_FLAGS + ["--min_num_layer", "3", "--gradient_checkpointing",
                                                              "True"], tiny_model("gqa", layers=6), None)
        bits = 16
    else:
        path = Path(opts.memory_model_dir)
        _random_7b(path)
        torch.cuda.reset_peak_memory_stats()
        args, model, em, trainer = build(str(path), out_dir, SEED_LLAMA2_FLAGS + [
            "--fp16", "--bits", "4", "--quant_type", "nf4", "--double_quant", "True",
            "--gradient_checkpointing", "True", "--lora_r", "64", "--lora_alpha", "16"])
        bits = 4
    loaded = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    device = next(model.parameters()).device
    shape = (2, 384, 128) if not opts.smoke else (opts.batch, opts.source_len, opts.target_len)
    batch = synthetic_batch(*shape, int(model.config.vocab_size), device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(opts.memory_steps):
        trainer.state.global_step = step
        losses.append(float(trainer.training_step(model, dict(batch))))
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
    _sync()
    seconds = (time.perf_counter() - start) / opts.memory_steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"bits": bits, "model": "random Llama-2-7B shape" if bits == 4 else "tiny random (smoke)",
           "batch": f"{shape[0]} x {shape[1] + shape[2]} ({shape[1]} + {shape[2]})",
           "gradient_checkpointing": True, "trainable_params": trainable,
           "sandwich": [r for r, _ in trainer.last_plan], "step_seconds": seconds, "losses": losses,
           "sliceable": em.sliceable}
    if torch.cuda.is_available():
        out.update({"model_gb": loaded / 2**30, "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
                    "device": torch.cuda.get_device_name(0)})
    return out


# ----------------------------------------------------------------------------------------------
# Against the peer
# ----------------------------------------------------------------------------------------------
CASES = {
    "7b-bf16-4x512": dict(model="7b", bits=16, batch=4, checkpointing=False),
    "7b-bf16-8x512": dict(model="7b", bits=16, batch=8, checkpointing=False),
    "7b-4bit": dict(model="7b", bits=4, batch=2, checkpointing=True),
    "smollm2-bf16-8x512": dict(model="smollm2", bits=16, batch=8, checkpointing=False),
    "tiny": dict(model="tiny", bits=16, batch=2, checkpointing=False),  # --smoke: CPU, fp32
}
SANDWICHES = {"7b": "32:1,24:0.75,22:0.875,20:0.625", "smollm2": "30:1,24:0.75,22:0.875,18:0.625",
              "tiny": "6:1,5:0.75,4:0.875,3:0.625"}
LORA_ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_params(em, subnet: Subnet) -> int:
    """Parameters of ``subnet``'s matrix products: its kept decoder layers and the output matrix."""
    outside = sum(p.numel() for n, p in em.model.named_parameters()
                  if ".layers." not in n and "amoeba_adapter" not in n and "lora_" not in n)
    return em.param_count(subnet) - outside + em.model.get_output_embeddings().weight.numel()


def _case_model(case: dict, path: Path, smollm2_dir: str):
    """(model folder, in-memory model or None): the random 7B (bf16 built on the GPU; 4-bit from a written
    fp16 folder), SmolLM2-135M-Instruct (``smollm2_dir``, i.e. ``--model``), or the tiny test model."""
    if case["model"] == "tiny":
        from tests.conftest import tiny_model

        return str(ROOT / "models" / "smollm2-135m-instruct"), tiny_model("gqa", layers=6)
    if case["model"] == "smollm2":
        return smollm2_dir, None
    _random_7b(path)
    if case["bits"] == 4:
        return str(path), None
    from transformers import AutoModelForCausalLM

    return str(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()


def time_peer(opts, case: dict, model_dir: str, model, batch: dict) -> tuple[float, Optional[dict]]:
    """Seconds of one forward + backward of the plain peft LoRA model (the label loss of the full model), and its
    profile with ``--profile``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    if case["bits"] == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float16)
        base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.float16,
                                                    device_map={"": 0})
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model is not None:
        base = model
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
        base = base.cuda() if cuda else base
    peer = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_ROLES,
                                           task_type="CAUSAL_LM"))
    peer.train()
    dtype = torch.float16 if case["bits"] == 4 else torch.bfloat16
    device = "cuda" if cuda else "cpu"

    def step():
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            loss = peer(**batch).loss
        loss.backward()
        peer.zero_grad(set_to_none=True)

    seconds = mean_seconds(step, opts.warmup, opts.steps, label="peer: peft LoRA, full model")
    profiled = (profile_step(step, opts.profile, label="peer: peft LoRA, full model", kernels=opts.profile_kernels)
                if opts.profile else None)
    if case["bits"] != 4:
        peer.unload()  # the in-memory base goes back to its plain self, for our steps
    del peer, base
    if cuda:
        torch.cuda.empty_cache()
    return seconds, profiled


def compiler_counters(counters) -> dict:
    """What ``torch.compile`` did in the compiled rows, from dynamo's counters: frames compiled, graphs built and
    calls captured, each graph break with its reason, and inductor's CUDA-graph events (what a slow
    ``--compile_mode reduce-overhead`` row is read by)."""
    out = {"frames.total": counters["frames"].get("total", 0)}
    out.update({f"stats.{k}": v for k, v in counters["stats"].items()})
    out.update({f"graph_break.{k}"[:160]: v for k, v in counters["graph_break"].items()})
    out.update({f"inductor.{k}": v for k, v in counters["inductor"].items() if "cudagraph" in k})
    return out


def compare_case(opts, name: str, work: Path, layouts: Optional[dict] = None) -> dict:
    """The peer, our full-model step and our sandwich step (before / after) on one batch of ``name``; with
    ``layouts`` (``--real_lengths``: batch size -> collated real examples) that batch takes their lengths."""
    from transformers import AutoConfig

    case = CASES[name]
    model_dir, model = _case_model(case, Path(opts.memory_model_dir), opts.model)
    vocab = int((model.config if model is not None else AutoConfig.from_pretrained(model_dir)).vocab_size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    source, target = case_lengths(opts)
    if layouts:  # real examples' lengths: padding in the batch, and the same examples without it
        batch = with_random_ids(layouts[case["batch"]], vocab, device)
        flat = pack_batch(batch)
        tokens = int(batch["attention_mask"].sum())
    else:
        batch, flat = synthetic_batch(case["batch"], source, target, vocab, device), None
        tokens = case["batch"] * (source + target)
    peer_seconds, peer_profile = time_peer(opts, case, model_dir, model, batch)
    flags = list(SEED_LLAMA2_FLAGS) + ["--gradient_checkpointing", str(case["checkpointing"])]
    flags[flags.index("--min_num_layer") + 1] = "1"
    if case["bits"] == 4:
        flags += ["--fp16", "--bits", "4", "--quant_type", "nf4", "--double_quant", "True", "--lora_alpha", "16"]
    elif cuda:
        flags += ["--bf16"]
    args, model, em, trainer = build(model_dir, work / name, flags, model, None)
    full = [("largest", em.full_subnet())]
    sandwich = []
    pairs = [p.split(":") for p in SANDWICHES[case["model"]].split(",")]
    for i, (layers, width) in enumerate(pairs):
        role = "largest" if i == 0 else "smallest" if i == len(pairs) - 1 else f"random{i}"
        sandwich.append((role, Subnet(tuple(range(int(layers))), float(width))))
    timed = [("peer: peft LoRA, full model", full, peer_seconds, peer_profile)]
    current = step_settings(trainer, model)
    settings_of = {}  # row -> the step's optimisation settings it ran with (see BEFORE)

    def measure(row: str, plan: list, inputs: dict, warmup: int) -> None:
        settings_of[row] = resolved(model, step_settings(trainer, model))
        step = plan_step(trainer, model, inputs, plan)
        seconds = mean_seconds(step, warmup, opts.steps, row)
        profiled = (profile_step(step, opts.profile, label=row, kernels=opts.profile_kernels)
                    if opts.profile else None)
        if opts.host_profile:
            profiled = {**(profiled or {}), "host": host_profile_step(step, opts.host_profile, label=row)}
        timed.append((row, plan, seconds, profiled))

    if not opts.compiled_only:  # our eager rows
        for label, plan in (("ours: full model", full), ("ours: sandwich", sandwich)):
            for when, settings in (("before", BEFORE), ("after", current)):
                use_settings(trainer, model, settings)
                measure(f"{label} ({when})", plan, batch, opts.warmup)
        if opts.split_after:  # the switches' other settings: which one moves the step (e.g. the 4-bit slowdown)
            timed_settings = {resolved(model, BEFORE), resolved(model, current)}
            for settings, row in SPLIT_ROWS.items():
                if resolved(model, settings) not in timed_settings:
                    timed_settings.add(resolved(model, settings))
                    use_settings(trainer, model, settings)
                    measure(f"ours: sandwich ({row})", sandwich, batch, opts.warmup)
        use_settings(trainer, model, current)
        if flat is not None:
            measure("ours: sandwich, padding-free (after)", sandwich, flat, opts.warmup)
    losses = (same_losses(trainer, model, batch, sandwich, opts.same_losses, BEFORE, current)
              if opts.same_losses else None)
    compile_error, compiler = None, None
    if opts.compile:  # the same steps with every decoder layer compiled (--compile_layers); warm-up compiles
        from torch._dynamo.utils import counters

        counters.clear()
        if opts.compile_mode == "reduce-overhead":
            torch._logging.set_logs(perf_hints=True)  # why a CUDA graph is skipped or recorded again
        for per_graph in opts.layers_per_graph:
            undo = compile_layers(em, opts.compile_mode, per_graph)
            grouped = "" if per_graph == 1 else f", {per_graph} layers per graph"
            try:
                steps = [("ours: full model", full, batch), ("ours: sandwich", sandwich, batch)]
                if flat is not None:
                    steps.append(("ours: sandwich, padding-free", sandwich, flat))
                for label, plan, inputs in steps:
                    measure(f"{label} (compiled{grouped})", plan, inputs, max(opts.warmup, 2))
                    # after each row too: a run cut off by a time limit keeps what the compiler did so far
                    logger.info("%s: compiler after %s: %s", name, label, compiler_counters(counters))
            except Exception as err:  # noqa: BLE001 - a compiler failure is a result to report, not the run's end
                compile_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                logger.warning("%s: compiled steps failed: %s", name, compile_error)
            finally:
                undo()
                compiler = compiler_counters(counters)
                logger.info("%s: compiler: %s", name, compiler)
            if compile_error:
                break
    peak = opts.peak_tflops * 1e12 if cuda else None
    rows = []
    for step, plan, seconds, profiled in timed:
        flops = sum(4.0 * matmul_params(em, s) * tokens for _, s in plan)
        rows.append({"step": step, "subnets": [s.label for _, s in plan], "seconds": seconds,
                     "tokens_per_second": tokens / seconds, "model_flops": flops,
                     "mfu": flops / (seconds * peak) if peak else None,
                     **({"logits_at_targets": settings_of[step][0], "mix": settings_of[step][1]}
                        if step in settings_of else {}),
                     **({"profile": profiled} if profiled else {})})
    precision = trainer.accelerator.mixed_precision  # our steps' autocast, as in training ("no": none)
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    padding = ({"padded_positions": int(batch["input_ids"].numel()),
                "packed_positions": int(flat["input_ids"].numel()), "real_lengths": opts.real_lengths}
               if flat is not None else {})
    return {"case": name, **case, "tokens": tokens, **padding, "rows": rows, "ours_mixed_precision": precision,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            **({"compile_mode": opts.compile_mode, "layers_per_graph": opts.layers_per_graph} if opts.compile else {}),
            **({"compile_error": compile_error} if compile_error else {}),
            **({"compiler": compiler} if compiler is not None else {}),
            **({"same_losses": losses} if losses else {})}


def layers_per_graph_list(text: str) -> list[int]:
    """``--layers_per_graph``'s comma list as distinct numbers, in the order given (UsageError naming the flag)."""
    values = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise UsageError(f"{part.strip()!r} is not a whole number", "--layers_per_graph") from None
        check_layers_per_graph(value)
        if value not in values:
            values.append(value)
    return values


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def profile_lines(rows: list[dict]) -> list[str]:
    """The ``--profile`` part of a case: launches and busy time per step, then each step's top operators; then the
    ``--host_profile`` part: each step's Python functions with the most own time."""
    lines = []
    for r in rows:
        host = (r.get("profile") or {}).get("host")
        if host:
            lines += [f"Host functions by own time under cProfile ({host['wall_ms_per_step']:.1f} ms/step), "
                      f"{r['step']}:", "", "| function | calls/step | own ms/step | cumulative ms/step |",
                      "| --- | ---: | ---: | ---: |"]
            lines += [f"| `{h['function']}` | {h['calls_per_step']:.0f} | {h['own_ms_per_step']:.2f} | "
                      f"{h['cumulative_ms_per_step']:.2f} |" for h in host["by_own_time"]]
            lines.append("")
    profiled = [r for r in rows if (r.get("profile") or {}).get("top")]
    if not profiled:
        return lines
    device = profiled[0]["profile"]["time"] == "device"
    lines += ["| step | operators/step | kernels/step | device busy ms/step | wall ms/step |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in profiled:
        p = r["profile"]
        kernels = f"{p['kernels_per_step']:.0f}" if device else "-"
        busy = f"{p['device_busy_ms_per_step']:.1f}" if device else "-"
        lines.append(f"| {r['step']} | {p['operators_per_step']:.0f} | {kernels} | {busy} | "
                     f"{1e3 * r['seconds']:.1f} |")
    lines.append("")
    for r in profiled:
        p = r["profile"]
        lines += [f"Top operators by self {p['time']} time, {r['step']}:", "",
                  "| operator | calls/step | ms/step | share |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{t['name']}` | {t['calls_per_step']:.0f} | {t['self_ms_per_step']:.2f} | "
                  f"{100 * t['share']:.1f}% |" for t in p["top"]]
        lines.append("")
        if "kernel_sources" in p:
            lines += [f"Kernels matching `{p['kernel_pattern']}`, {r['step']}, by source:", "",
                      "| kernel | launched by | input shapes | dtypes | called from | launches/step | ms/step |",
                      "| --- | --- | --- | --- | --- | ---: | ---: |"]
            lines += [f"| `{k['kernel'][:60]}` | `{k['operator']}` | {k['input_shapes']} | {k['input_dtypes']} | "
                      f"{k['called_from']} | {k['launches_per_step']:.0f} | {k['device_ms_per_step']:.2f} |"
                      for k in p["kernel_sources"]]
            lines.append("")
    return lines


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    lines = []
    for c in results.get("compare", []):
        padded = (f", padded to {c['padded_positions']} positions, packed to {c['packed_positions']} "
                  f"({c['real_lengths']} lengths)"
                  if "padded_positions" in c else "")
        lines += [f"{c['case']} ({c['device']}; {c['tokens']} tokens per step{padded})", "",
                  "| step | s/step | tokens/s | MFU |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['step']} | {r['seconds']:.4f} | {r['tokens_per_second']:.0f} | {_percent(r['mfu'])} |"
                  for r in c["rows"]]
        lines.append("")
        if c.get("same_losses"):
            sl = c["same_losses"]
            lines += [f"{sl['steps']} sandwich steps from the same start, before vs after: losses differ by at "
                      f"most {sl['max_relative_difference']:.2e} (relative)", ""]
        lines += profile_lines(c["rows"])
    s = results.get("speed")
    if s:
        lines += [f"Stage 2 step, {s['model']} on {s['device']} ({s['dtype']}, "
                  f"{s['batch_tokens']} tokens/micro-batch)",
                  "", "| measurement | seconds | tokens/s |", "| --- | ---: | ---: |",
                  f"| sandwich step (fwd+bwd, {len(s['subnets'])} subnets) | {s['sandwich_seconds']:.4f} | "
                  f"{s['sandwich_tokens_per_s']:.0f} |",
                  f"| sum of single-subnet steps | {s['single_sum_seconds']:.4f} | "
                  f"{s['single_sum_tokens_per_s']:.0f} |",
                  f"| optimizer step | {s['optimizer_step_seconds']:.4f} | |",
                  "", f"Sandwich overhead: {100 * s['overhead']:+.1f}% (target: at most +10%)", "",
                  "| subnet | role | step seconds | time / largest | params / largest |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for r in s["subnets"]:
            lines.append(f"| {r['subnet']} | {r['role']} | {r['seconds']:.4f} | {r['time_ratio']:.3f} | "
                         f"{r['param_ratio']:.3f} |")
    m = results.get("memory")
    if m:
        lines += ["", f"Memory, {m['model']}, {m['bits']}-bit, batch {m['batch']}, gradient checkpointing", "",
                  "| quantity | value |", "| --- | ---: |"]
        for key in ("model_gb", "peak_allocated_gb", "peak_reserved_gb", "step_seconds", "trainable_params"):
            if key in m:
                val = m[key]
                lines.append(f"| {key} | {val:.2f} |" if isinstance(val, float) else f"| {key} | {val} |")
        if "peak_allocated_gb" in m:
            lines.append(f"\nTarget: peak at most 24 GB -> {'met' if m['peak_reserved_gb'] <= 24 else 'NOT met'} "
                         f"(reserved {m['peak_reserved_gb']:.2f} GB)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark and write ``--out``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = parse(argv)
    if opts.smoke:
        opts.batch, opts.source_len, opts.target_len = 2, 24, 8
        opts.warmup, opts.steps, opts.memory_steps = 1, 2, 2
        opts.subnets = "6:1,5:0.75,4:0.875,3:0.625"
    if opts.split_after and not opts.compare:
        print("error: --split_after: times rows of --compare; add --compare", file=sys.stderr)
        return 2
    if opts.host_profile and not opts.compare:
        print("error: --host_profile: profiles the rows of --compare; add --compare", file=sys.stderr)
        return 2
    if opts.host_profile < 0:
        print("error: --host_profile: the number of steps to profile, at least 1", file=sys.stderr)
        return 2
    if opts.profile_kernels is not None:
        if not (opts.profile and opts.compare):
            print("error: --profile_kernels: looks into the profiles of --compare; add --compare and --profile",
                  file=sys.stderr)
            return 2
        try:
            re.compile(opts.profile_kernels)
        except re.error as e:
            print(f"error: --profile_kernels: not a regular expression: {e}", file=sys.stderr)
            return 2
    if opts.compiled_only and not (opts.compile and opts.compare):
        print("error: --compiled_only: skips the eager rows of the compiled comparison; add --compare and --compile",
              file=sys.stderr)
        return 2
    if opts.compile_mode != "default" and not (opts.compile and opts.compare):
        print("error: --compile_mode: applies to the compiled rows; add --compare and --compile", file=sys.stderr)
        return 2
    try:
        check_compile_mode(opts.compile_mode, torch.cuda.is_available())
        opts.layers_per_graph = layers_per_graph_list(opts.layers_per_graph)
        if opts.layers_per_graph != [1] and not (opts.compile and opts.compare):
            raise UsageError("applies to the compiled rows; add --compare and --compile", "--layers_per_graph")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(opts.out)
    work = out.parent / (out.stem + "_run")
    results = {"versions": library_versions(), "smoke": opts.smoke}
    if opts.compare:
        names = [n.strip() for n in opts.compare.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            raise SystemExit(f"error: --compare: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        layouts = None
        if opts.real_lengths:  # the real examples, read once, before any model is built
            try:
                layouts = real_example_layouts(opts, {CASES[n]["batch"] for n in names})
            except UsageError as err:
                # --model's tokenizer, else --real_lengths' data (whatever flag the data loader names)
                flag = "--model" if err.flag == "--model" else "--real_lengths"
                print(f"error: {flag}: {err.message}", file=sys.stderr)
                return 2
        results["compare"] = [compare_case(opts, n, work / "compare", layouts) for n in names]
        write_json(out, results)
        print(markdown(results))
        return 0
    if opts.count_ops:
        results["ops"] = count_ops(opts, work / "ops")
        write_json(out, results)
        o = results["ops"]
        print(f"one training step of {o['subnet']} (bf16 autocast): {o['operations']} operations dispatched, "
              f"{o['matrix_products']} matrix products ({o['fp32_matrix_products']} with a float32 input), "
              f"{o['casts']} casts")
        for e in o["fp32_products"]:
            print(f"  float32: {e['operator']} {' x '.join(map(str, e['input_shapes']))}: {e['calls']} call(s)")
        return 0
    if opts.memory or opts.smoke:
        results["memory"] = memory(opts, work / "memory")
    if not opts.memory or opts.smoke:
        results["speed"] = speed(opts, work / "speed")
    write_json(out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
