"""Stage 2 from the command line: one-for-all fine-tuning as the flags ask (``--do_train True``).

Setup: the flags are checked against the model and strategy, the adapters (:class:`amoeba.adapters.AdapterConfig`)
and the instruction data (:class:`amoeba.instruct_data.InstructionData`) are built from them, and the trainer of
:mod:`amoeba.training` gets the sampler or the one fixed subnet. Callbacks: adapter snapshots
(``--adapter_snapshot_steps``) and a clean stop on SIGTERM/SIGINT. Outputs, in ``--output_dir``: ``adapter_model/``,
checkpoints (:mod:`amoeba.run_folder`), ``training_log.json``, ``train_results.json``/``.md`` and
``loss_curve.png``. Also here: reading the adapters of a finished run back for evaluation and export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import transformers
from torch import nn
from transformers.trainer_utils import IntervalStrategy
from transformers.training_args import OptimizerNames

from amoeba.adapters import (ALL_ROLES, AdapterConfig, attach_adapters, load_adapters, read_adapter_config,
                             save_adapters, set_expert_mix, structure_of)
from amoeba.args import Arguments, parse_int_list, parse_ratio
from amoeba.compiled import compile_layers
from amoeba.elastic import ElasticModel
from amoeba.errors import Interrupted, UsageError
from amoeba.files import atomic_path, write_json, write_text
from amoeba.instruct_data import InstructionData, make_data_module, packed_sequences_supported
from amoeba.run_folder import (ADAPTER_DIR, checkpoint_dir, checkpoint_folders, find_adapters,
                               last_complete_checkpoint, save_run_record, snapshot_dir)
from amoeba.shapes import Shapes, layer_masks
from amoeba.sharding import shard_frozen_base
from amoeba.subnet import Subnet, width_key
from amoeba.training import SandwichSampler, SandwichTrainer, TrainingDiverged, training_attention

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# From the flags
# ----------------------------------------------------------------------------------------------
def parse_lora_modules(text: str) -> list[str]:
    """``--lora_modules``: ``all`` -> the seven projections; else a comma list of projection names (validated)."""
    text = (text or "all").strip()
    if text == "all":
        return list(ALL_ROLES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_ROLES]
    if unknown or not names:
        raise UsageError(f"'{text}': unknown module(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"all, {', '.join(ALL_ROLES)}", "--lora_modules")
    return [r for r in ALL_ROLES if r in names]


def adapter_config(args: Arguments, em: ElasticModel) -> AdapterConfig:
    """The adapters the flags ask for (``--lora_*``, ``--use_moe_lora``, ``--moe_*``), for the model behind ``em``."""
    a = args.adapters
    widths = list(args.width_choice) if args.elastic.shrinkable_width else [1.0]
    return AdapterConfig(
        r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, modules=parse_lora_modules(a.lora_modules),
        num_experts=a.moe_num_expert if a.use_moe_lora else 1, topk=a.moe_topk if a.use_moe_lora else 1,
        use_router=bool(a.use_moe_lora), widths=[float(w) for w in widths], **structure_of(em))


def instruction_data(args: Arguments) -> InstructionData:
    """The instruction data the flags ask for (``--dataset`` and the data flags)."""
    d, t = args.data, args.train
    return InstructionData(
        dataset=d.dataset, dataset_format=d.dataset_format, data_dir=args.data_dir, cache_dir=args.model.cache_dir,
        eval_size=d.eval_dataset_size if t.do_eval else None,
        split_seed=t.data_seed if t.data_seed is not None else t.seed, max_train=d.max_train_samples,
        max_eval=d.max_eval_samples, source_max_len=d.source_max_len, target_max_len=d.target_max_len,
        train_on_source=t.train_on_source, group_by_length=t.group_by_length, padding_free=t.padding_free)


def validate_training_setup(args: Arguments, em: ElasticModel, strategy) -> Optional[dict]:
    """Check the Stage 2 flags against the model and strategy; return the layer masks to sample from."""
    t, e = args.train, args.elastic
    if t.full_finetune:
        raise UsageError("Stage 2 trains adapters (LoRA / MoE-LoRA); full fine-tuning is not supported",
                         "--full_finetune")
    masks = None
    if e.enable_shrinking and e.shrinking_method == "calib_dp":
        if strategy is None:
            raise UsageError("--shrinking_method calib_dp needs --shrinking_file (the Stage 1 strategy)",
                             "--shrinking_file")
        masks = layer_masks(strategy, em.num_layers, "--shrinking_file")
    elif strategy is not None:
        layer_masks(strategy, em.num_layers, "--shrinking_file")  # still must belong to this model
    if e.enable_shrinking and not 1 <= e.min_num_layer <= em.num_layers:
        raise UsageError(f"{e.min_num_layer} must lie in [1, {em.num_layers}] (the model has {em.num_layers} "
                         "layers)", "--min_num_layer")
    if e.shrinkable_width:
        narrow = [w for w in args.width_choice if width_key(w) < 1.0]
        if strategy is not None:
            missing = [w for w in narrow if width_key(w) not in em.width_plans]
            if missing:
                have = sorted(em.width_plans, reverse=True)
                raise UsageError(f"the strategy has no width masks for {', '.join(f'{w:g}' for w in missing)} "
                                 f"(it has {', '.join(f'{w:g}' for w in have) or 'none'})", "--width_choice")
        elif narrow:
            logger.warning("--shrinkable_width without a strategy file: widths keep the first heads/channels "
                           "(no importance order)")
    if t.padding_free and not packed_sequences_supported():
        raise UsageError(f"transformers {transformers.__version__} cannot mask examples packed into one row apart; "
                         "train with padded batches (leave out this flag) or upgrade transformers", "--padding_free")
    o = args.one_for_all
    if o.train_num_width is not None and o.train_num_layer is None:
        raise UsageError("give the depth of the fixed subnet too (--train_num_layer)", "--train_num_width")
    return masks


def fixed_training_subnet(args: Arguments, em: ElasticModel, strategy) -> Optional[Subnet]:
    """The one subnet ``--train_num_layer``/``--train_num_width`` asks to train, or None (sandwich); a shape the
    strategy (or the loaded widths) lacks is refused as for export."""
    o = args.one_for_all
    if o.train_num_layer is None:
        return None
    width = parse_ratio(o.train_num_width, "--train_num_width") if o.train_num_width else 1.0
    # with a strategy, only its loaded widths; without one, any uniform width
    shapes = Shapes.under(em, strategy, args.elastic.shrinking_method == "calib_dp",
                          uniform_widths=() if strategy is not None else None)
    return shapes.subnet(int(o.train_num_layer), width, layer_flag="--train_num_layer", width_flag="--train_num_width")


def resume_checkpoint(args: Arguments) -> Optional[str]:
    """The checkpoint to resume from (``--resume_training``), refusing to overwrite an earlier run.

    Resuming takes the newest checkpoint that validates; each newer one passed over gets one warning naming it
    and why. No checkpoint at all, or none that validates: UsageError (a user who asked to resume is told that
    there was nothing to resume, rather than silently getting a new run)."""
    out = Path(args.train.output_dir)
    existing = checkpoint_folders(out)
    if args.train.resume_training:
        if not existing:
            raise UsageError(f"{out} holds no checkpoint to resume from; leave out --resume_training to start a "
                             "new run", "--resume_training")
        skipped: list = []
        ckpt = last_complete_checkpoint(out, skipped)
        if ckpt is None:
            reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            raise UsageError(f"no checkpoint in {out} can be resumed ({reasons}); remove them or choose another "
                             "--output_dir to start a new run", "--resume_training")
        for path, why in skipped:
            logger.warning("skipping %s, it cannot be resumed: %s; falling back to an older checkpoint", path, why)
        logger.info("resuming from %s", ckpt)
        return str(ckpt)
    if existing:
        raise UsageError(f"{out} already holds checkpoints of an earlier run ({existing[0].name}, ...); pass "
                         "--resume_training to continue it, or choose another --output_dir", "--output_dir")
    return None


def snapshot_steps(text: Optional[str]) -> list[int]:
    """Parse ``--adapter_snapshot_steps`` (``400,1000``)."""
    if not text:
        return []
    return list(parse_int_list(text, "--adapter_snapshot_steps"))


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------
def _fallback_optimizer(t) -> None:
    """Paged / 8-bit optimizers need CUDA and bitsandbytes: use adamw_torch without them (same update
    rule; only the optimizer state's paging/precision differs)."""
    name = str(getattr(t.optim, "value", t.optim))
    usable = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    if t.adam8bit and usable:
        t.optim = OptimizerNames("adamw_bnb_8bit")
    elif ("paged" in name or "bnb" in name or "8bit" in name) and not usable:
        why = "a CUDA GPU" if not torch.cuda.is_available() else "bitsandbytes, which is not installed"
        logger.warning("--optim %s needs %s; using adamw_torch", name, why)
        t.optim = OptimizerNames("adamw_torch")


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (works with the elastic depth swap and frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def _disable_trainer_checkpointing(t) -> None:
    # Checkpointing is set up here once; the Trainer must not enable it again with other settings.
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        if hasattr(t, name):
            setattr(t, name, False)


@contextlib.contextmanager
def _adapters_visible_to_trainer(model):
    """The Trainer refuses a quantized base model unless it sees adapters through transformers' own PEFT
    integration flag; ours are attached as elastic-projection hooks, so raise the flag while it checks."""
    if not getattr(model, "is_quantized", False):
        yield
        return
    before = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = before


def _sandwich_sampler(args: Arguments, em: ElasticModel, masks: Optional[dict]) -> Optional[SandwichSampler]:
    """The sandwich sampler the elastic flags ask for, or None when neither depth nor width is elastic."""
    e = args.elastic
    if not (e.enable_shrinking or e.shrinkable_width):
        return None
    widths = args.width_choice if e.shrinkable_width else (1.0,)
    sampler = SandwichSampler(em, e.min_num_layer, args.one_for_all.random_sample_num_layer, widths, masks,
                              elastic_depth=e.enable_shrinking, depth_flag="--min_num_layer")
    logger.info("sandwich: largest %s, %d distinct random (depths %s, widths %s), smallest %s",
                sampler.largest.label, sampler.num_drawn, sampler.random_depths,
                [f"{w:g}" for w in sampler.widths], sampler.smallest.label)
    return sampler


def prepare_trainer(args: Arguments, model, tokenizer, em: ElasticModel, strategy, callbacks: Optional[list] = None,
                    data: Optional[dict] = None):
    """Validate the flags, attach adapters, load the data and build the :class:`SandwichTrainer`.

    ``data`` (train_dataset, eval_dataset, data_collator) replaces the instruction data when given.
    Returns ``(trainer, checkpoint to resume from or None)``.
    """
    t, o = args.train, args.one_for_all
    masks = validate_training_setup(args, em, strategy)
    resume_from = resume_checkpoint(args)
    # only now: a command refused above leaves an earlier run's record as it was
    save_run_record(t.output_dir, *args.record())
    _fallback_optimizer(t)
    t.prediction_loss_only = True
    t.remove_unused_columns = False
    if args.elastic.enable_shrinking and not t.ddp_find_unused_parameters:
        # Skipped layers' adapters get no gradient in a sub-depth pass; DDP must be told to expect that.
        t.ddp_find_unused_parameters = True

    if getattr(model, "is_quantized", False) or args.model.bits in (4, 8):
        from peft import prepare_model_for_kbit_training  # deferred: only a 4/8-bit (bitsandbytes) base needs it

        # checkpointing is switched on just below through the current transformers API (the helper would call
        # its deprecated name)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    attach_adapters(model, em, adapter_config(args, em))
    set_expert_mix(model, args.adapters.moe_mix)
    if t.gradient_checkpointing:
        _enable_checkpointing(model)
    # after the adapters (its hook must run after the router's: the mixed adapters) and after checkpointing (taken
    # inside the compiled layers)
    uncompile = compile_layers(em, t.compile_mode, t.layers_per_graph) if t.compile_layers else None
    _disable_trainer_checkpointing(t)
    if t.shard_settings is not None:
        shard_frozen_base(model, em.all_layers, t.shard_settings)

    sampler = None
    fixed = fixed_training_subnet(args, em, strategy)
    if fixed is not None:
        logger.info("training one fixed subnet: %s (%d parameters)%s", fixed.label, em.param_count(fixed),
                    f", distilled from the full model (kd_weight {o.kd_weight:g})" if o.train_distill_full else "")
    else:
        sampler = _sandwich_sampler(args, em, masks)
    if data is None:
        data = make_data_module(tokenizer, instruction_data(args))
    if data.get("eval_dataset") is None and str(getattr(t.eval_strategy, "value", t.eval_strategy)) != "no":
        t.eval_strategy = IntervalStrategy.NO
    with _adapters_visible_to_trainer(model):
        trainer = SandwichTrainer(
            model=model, args=t, processing_class=tokenizer, callbacks=callbacks, em=em, sampler=sampler,
            kd_weight=o.kd_weight, distill_method=o.distill_method, distill_steps=o.distill_steps,
            balancing=not o.no_balancing, fixed_subnet=fixed, distill_full=o.train_distill_full,
            max_skipped_steps=t.max_skipped_steps, **data)
    trainer.uncompile = uncompile  # evaluation after training runs the layers eager
    return trainer, resume_from


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------
class AdapterSnapshots(transformers.TrainerCallback):
    """Keeps the adapters after chosen optimizer steps in ``<output_dir>/adapter_model-step<N>/``
    (``--adapter_snapshot_steps``), independent of checkpoint rotation."""

    def __init__(self, steps: Sequence[int], em: ElasticModel, output_dir):
        self.steps = {int(s) for s in steps}
        self.em = em
        self.output_dir = Path(output_dir)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D102 (TrainerCallback API)
        if state.global_step in self.steps and state.is_world_process_zero and model is not None:
            save_adapters(model, snapshot_dir(self.output_dir, state.global_step), self.em)


class StopOnSignal(transformers.TrainerCallback):
    """SIGTERM or SIGINT while training: finish the current optimizer step, write a checkpoint, stop.

    A scheduler's deadline or a preemption then costs no finished step, and ``--resume_training`` continues
    from exactly there. With several processes the decision is agreed at every step end (one tiny
    all-reduce), so all of them save and stop at the same step even if the signal reached them apart.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict = {}

    @contextlib.contextmanager
    def installed(self):
        """Catch the signals for the duration of the block (main thread only; elsewhere: no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop at once, the usual way
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def _agreed(self, args) -> Optional[int]:
        if args.world_size <= 1:
            return self.received
        flag = torch.tensor([self.received or 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback API)
        signum = self._agreed(args)
        if signum is not None:
            self.received = signum
            control.should_save = True
            control.should_training_stop = True
        return control


def _close_progress_bars(trainer) -> None:
    """End the Trainer's progress bar line; a run that stops with an error never reaches ``on_train_end``, and the
    error line must not be glued to a half-drawn bar."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def results_markdown(history: list[dict], metrics: dict) -> str:
    """A short markdown summary of a run: last logged loss of each sandwich role, eval loss, speed."""
    last: dict[str, tuple] = {}
    for row in history:
        for key, val in row.items():
            if key.startswith("loss_") or key == "eval_loss":
                last[key] = (row.get("step"), val)
    lines = ["| quantity | step | value |", "| --- | ---: | ---: |"]
    for key in sorted(last, key=lambda k: (k == "eval_loss", k)):
        step, val = last[key]
        lines.append(f"| {key.replace('loss_', 'train loss, ')} | {step} | {float(val):.4f} |")
    for key in ("train_runtime", "tokens_per_second", "tokens_seen", "padding_share"):
        if key in metrics:
            lines.append(f"| {key} | | {metrics[key]} |")
    note = ("\nThe largest subnet's loss is the label cross entropy; the others' is their training objective "
            "(soft cross entropy to the largest's predictions, mixed with the label loss by --kd_weight), before "
            "balancing.\n")
    if metrics.get("distilled_from_full_model"):
        note = ("\nOne fixed subnet (logged as 'largest'), distilled from the frozen full model: its loss is soft "
                "cross entropy to the full model's predictions, mixed with the label loss by --kd_weight.\n")
    return "# Stage 2 training\n\n" + "\n".join(lines) + "\n" + note


def _plot_losses(history: list[dict], path: Path) -> None:
    """``loss_curve.png``: each sandwich role's logged loss (and the held-out loss) against the optimizer step."""
    try:  # deferred: plotting is optional
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt  # after choosing the file-only backend
    except ImportError:
        return
    series: dict[str, list] = {}
    for row in history:
        for key, val in row.items():
            if (key == "loss" or key.startswith("loss_") or key == "eval_loss") and "step" in row:
                series.setdefault(key, []).append((row["step"], val))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, pts in sorted(series.items()):
        if key == "loss":
            continue  # the same values as loss_largest
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if key == "eval_loss" else None, label=key.replace("loss_", ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Stage 2 one-for-all fine-tuning")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_training_outputs(trainer: SandwichTrainer, out: Path, metrics: dict) -> None:
    """``training_log.json``, ``train_results.json``/``.md`` and ``loss_curve.png`` of a finished run."""
    history = trainer.state.log_history
    write_json(out / "training_log.json", history)
    write_json(out / "train_results.json", metrics)
    write_text(out / "train_results.md", results_markdown(history, metrics))
    _plot_losses(history, out / "loss_curve.png")


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def run_training(args: Arguments, model, tokenizer, em: ElasticModel, strategy, callbacks: Optional[list] = None):
    """Stage 2: fine-tune adapters on the instruction data with sandwich sampling; return the model
    (adapters attached, eval mode, full subnet). Writes ``adapter_model/``, checkpoints, the training log
    and its loss curve into ``--output_dir``."""
    t = args.train
    steps = snapshot_steps(t.adapter_snapshot_steps)
    if steps:
        callbacks = list(callbacks or []) + [AdapterSnapshots(steps, em, t.output_dir)]
    stop = StopOnSignal()
    callbacks = list(callbacks or []) + [stop]
    trainer, resume_from = prepare_trainer(args, model, tokenizer, em, strategy, callbacks)
    model = trainer.model
    start = time.time()
    with stop.installed(), training_attention(t.cudnn_attention):
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            _close_progress_bars(trainer)
            if trainer.uncompile is not None:
                trainer.uncompile()
    elapsed = time.time() - start
    out = Path(t.output_dir)
    if stop.received is not None and trainer.state.global_step < trainer.state.max_steps:
        step = trainer.state.global_step
        raise Interrupted(f"{signal.Signals(stop.received).name} at step {step} of {trainer.state.max_steps}; "
                          f"checkpoint {checkpoint_dir(out, step)} written; continue with --resume_training",
                          stop.received)
    # Every process evaluates: the Trainer gathers across processes, so one alone would wait forever.
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None and t.do_eval else {}
    bad = trainer.nonfinite_state()
    if bad is not None:  # the last steps' gradients were not finite: such adapters are no result
        raise TrainingDiverged(f"{bad} became non-finite by the last step ({trainer.state.global_step}; the loss was "
                               f"finite: non-finite gradients); no adapters written, {trainer.last_good()}. Lower "
                               "--learning_rate (or check the data and --bits), then continue with --resume_training")
    if trainer.args.should_save:
        save_adapters(model, out / ADAPTER_DIR, em)
        metrics = dict(result.metrics)
        metrics.update({"wall_seconds": round(elapsed, 2), "tokens_seen": trainer.tokens_seen,
                        "tokens_per_second": round(trainer.tokens_this_run / max(elapsed, 1e-9), 2),
                        "padding_share": round(trainer.padding_share, 4),
                        "sandwich": [r for r, _ in trainer.last_plan], "skipped_steps": trainer.skipped_steps(),
                        "processes": trainer.args.world_size})
        if trainer.distill_full:
            metrics["distilled_from_full_model"] = True
        metrics.update(final_eval)
        write_training_outputs(trainer, out, metrics)
        logger.info("training done in %.1f s; adapters in %s", elapsed, out / ADAPTER_DIR)
    em.set_subnet(em.full_subnet())
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# The adapters of a finished run, for evaluation and export
# ----------------------------------------------------------------------------------------------
def load_trained_adapters(args: Arguments, model: nn.Module, em: ElasticModel, folder) -> Optional[Path]:
    """Load the adapters ``folder`` holds (a run, a checkpoint or an adapter folder: :func:`find_adapters`) for
    evaluation and export, leaving the model in eval mode (deterministic router); return the adapter folder
    loaded, or None when there are none (the base model is evaluated).

    UsageError when ``--use_moe_lora`` is given but no adapters exist, or they disagree with the flags.
    """
    a = args.adapters
    where = find_adapters(folder)
    if where is None:
        if a.use_moe_lora:
            raise UsageError(f"no trained adapters in {folder} (expected {ADAPTER_DIR}/ or "
                             f"checkpoint-*/{ADAPTER_DIR}); train first with --do_train True", "--output_dir")
        logger.info("no adapters in %s: evaluating the base model", folder)
        return None
    saved = read_adapter_config(where)
    if a.use_moe_lora and (not saved.use_router or saved.num_experts != a.moe_num_expert
                           or saved.topk != a.moe_topk):
        kind = (f"MoE-LoRA with {saved.num_experts} experts, top-{saved.topk}" if saved.use_router
                else "plain LoRA")
        raise UsageError(f"the adapters in {where} are {kind}; the flags ask for {a.moe_num_expert} experts, "
                         f"top-{a.moe_topk}", "--use_moe_lora")
    if a.use_moe_lora and args.elastic.shrinkable_width:
        missing = [w for w in args.width_choice if all(abs(w - s) > 1e-6 for s in saved.widths)]
        if missing:
            logger.warning("widths %s were not trained (router widths %s): they use the nearest one",
                           missing, saved.widths)
    load_adapters(model, em, where)
    set_expert_mix(model, a.moe_mix)
    logger.info("loaded adapters from %s", where)
    model.eval()
    return where
