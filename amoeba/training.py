"""One-for-all fine-tuning of the elastic model: which subnets a step trains, their losses, and the trainer.

Per micro-batch, :class:`SandwichTrainer` runs the largest subnet, ``--random_sample_num_layer`` distinct
random subnets (drawn without replacement; depths from the Stage 1 strategy, or the first layers; widths from
``--width_choice``) and the smallest one, each with its own forward and backward, so only one subnet's
activations are alive at a time. The largest learns from the labels; the others from its detached
predictions (``--distill_method sp``: soft cross entropy on the target tokens, mixed with the label loss by
``--kd_weight``), each scaled to the largest's loss magnitude unless ``--no_balancing``. Which subnets a step
trains is a function of the seed and the global step only, so every process (and a resumed run) samples the
same ones.

``--train_num_layer`` trains one fixed subnet instead (the per-shape baseline): on the labels, or with
``--train_distill_full`` distilled from the frozen full model (every layer, full width, adapters off), with the
same loss as the sandwich's distilled subnets.

Only the adapters (and the MoE router) train. Checkpoints hold the adapters (``adapter_model/``, in the
base model's original head/channel order), optimizer, scheduler and RNG states; the base weights are
never written. A checkpoint is complete once its ``trainer_state.json`` exists: it is written last, atomically,
after every other file of the checkpoint is on disk (:mod:`amoeba.run_folder`), and only when the adapters and
optimizer state are finite. Setting a run up from the flags, its callbacks and its output files are Stage 2's
entry (:mod:`amoeba.stages.finetuning`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from amoeba.adapters import adapter_state_dict, adapters_disabled, get_router, load_adapters, save_adapters
from amoeba.distributed import mean_over_processes, sum_over_processes
from amoeba.elastic import ElasticModel
from amoeba.errors import UsageError
from amoeba.run_folder import (ADAPTER_DIR, TRAINER_STATE, checkpoint_dir, first_nonfinite, fsync,
                               last_complete_checkpoint, nonfinite_names, remove_marker, write_marker)
from amoeba.shapes import Shapes
from amoeba.sharding import is_sharded, wrap_replicated
from amoeba.subnet import Subnet, width_key

logger = logging.getLogger(__name__)


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite; training stopped before applying it."""


# ----------------------------------------------------------------------------------------------
# Which subnets a step trains
# ----------------------------------------------------------------------------------------------
class SandwichSampler:
    """Draws the subnets of one sandwich step: largest, random ones, smallest.

    ``layer_masks`` ({removed: 0/1 mask}) gives the depths of ``calib_dp``; without it the first layers
    are kept (``first_layers``; :class:`amoeba.shapes.Shapes` is the rule). ``widths``: the width choices (the
    largest subnet uses the widest, the smallest the narrowest). ``elastic_depth=False`` keeps every layer.
    ``depth_flag`` names the flag ``min_num_layer`` came from in errors.

    The random subnets of a step are drawn without replacement from the candidates (depth, width): depths in
    [``min_num_layer``, layers) from the strategy, widths from ``widths``. As the paper's sampler, their widths
    are drawn without replacement (each width at most once while there are enough widths) and each depth
    uniformly; once every width has been used, another round of widths starts and a reused width is paired
    only with a depth it has not had in this step. So no random subnet repeats within a step. A random subnet
    may still equal the smallest one (its depth range includes ``min_num_layer``), as in the paper. When
    fewer distinct candidates exist than asked (e.g. width-only elasticity with 4 widths and 5 random subnets),
    every candidate is trained once per step and a warning says so at start-up.
    """

    def __init__(self, em: ElasticModel, min_num_layer: int, num_random: int, widths: Sequence[float],
                 layer_masks: Optional[dict] = None, elastic_depth: bool = True, depth_flag: Optional[str] = None):
        self.em = em
        n = em.num_layers
        self.shapes = Shapes(em, layer_masks)
        self.depth_flag = depth_flag
        self.min_layers = int(min_num_layer) if elastic_depth else n
        if not 1 <= self.min_layers <= n:
            raise UsageError(f"{min_num_layer} must lie in [1, {n}] (the model has {n} layers)", depth_flag)
        self.shapes.subnet(self.min_layers, 1.0, layer_flag=depth_flag)  # the strategy must have the smallest depth
        depths = sorted(d for d in self.shapes.depths(self.min_layers) if self.min_layers <= d < n)
        self.random_depths = depths or [n]
        self.num_random = int(num_random)
        self.widths = sorted({width_key(w) for w in widths}, reverse=True)
        candidates = len(self.random_depths) * len(self.widths)
        self.num_drawn = min(self.num_random, candidates)  # random subnets per step
        if self.num_drawn < self.num_random:
            logger.warning("--random_sample_num_layer %d: only %d distinct random subnets exist (%d depth(s) x %d "
                           "width(s)); each step trains all of them once", self.num_random, candidates,
                           len(self.random_depths), len(self.widths))

    def subnet(self, num_layers: int, width: float) -> Subnet:
        """The subnet of ``num_layers`` layers (strategy or first layers) at ``width``."""
        return self.shapes.subnet(num_layers, width, layer_flag=self.depth_flag)

    @property
    def largest(self) -> Subnet:
        """Every layer at the widest width."""
        return self.subnet(self.em.num_layers, self.widths[0])

    @property
    def smallest(self) -> Subnet:
        """``--min_num_layer`` layers at the narrowest width."""
        return self.subnet(self.min_layers, self.widths[-1])

    def draw(self, rng: np.random.Generator) -> list[tuple[int, float]]:
        """The (depth, width) of the step's random subnets: distinct, in the order drawn (see the class)."""
        used: set[tuple[int, float]] = set()
        pairs: list[tuple[int, float]] = []
        while len(pairs) < self.num_drawn:
            # one round: the widths that still have an unused depth, in random order (without replacement)
            free = [w for w in self.widths if any((d, w) not in used for d in self.random_depths)]
            for j in rng.permutation(len(free)):
                if len(pairs) == self.num_drawn:
                    break
                width = free[int(j)]
                depths = [d for d in self.random_depths if (d, width) not in used]
                depth = int(depths[int(rng.integers(len(depths)))])
                used.add((depth, width))
                pairs.append((depth, float(width)))
        return pairs

    def sample(self, rng: np.random.Generator) -> list[tuple[str, Subnet]]:
        """[(role, subnet)]: largest, the random ones (:meth:`draw`), smallest."""
        plan = [("largest", self.largest)]
        for j, (depth, width) in enumerate(self.draw(rng)):
            plan.append((f"random{j + 1}", self.subnet(depth, width)))
        plan.append(("smallest", self.smallest))
        return plan


def step_rng(seed: int, global_step: int, micro: int) -> np.random.Generator:
    """The RNG of one micro-batch: a function of (seed, optimizer step, micro-batch index) only."""
    return np.random.default_rng([int(seed), int(global_step), int(micro)])


def router_noise_seed(seed: int, global_step: int, micro: int, index: int) -> int:
    """Seed of the router noise for the ``index``-th subnet of a micro-batch (same on every process)."""
    return int(np.random.SeedSequence([int(seed), int(global_step), int(micro), int(index)]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
@dataclass
class Targets:
    """The targets of a micro-batch and where their logits are.

    ``keep``: the sequence positions whose logits the model computes, passed as its ``logits_to_keep`` (None:
    every position). Only the answer tokens have targets (384 prompt + 128 answer tokens: a quarter of the
    positions), so the output matrix runs on those rows only, forward and backward, and no [batch, sequence,
    vocabulary] tensor is made: the same numbers for the targets, far less work and memory on a large vocabulary.
    ``index``: the rows of the flattened [batch x kept positions] logits that have a target; ``target``: those
    targets, batch row by batch row."""

    keep: Optional[torch.Tensor]
    index: torch.Tensor
    target: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor, only_needed: bool = True) -> "Targets":
        """The targets of ``labels`` (next-token shift, -100 = none); ``only_needed=False``: logits everywhere."""
        shifted = labels[:, 1:]
        if not only_needed:
            flat = shifted.reshape(-1)
            index = (flat != -100).nonzero().squeeze(1)  # waits for the device once: the count is data's
            return cls(None, index, flat.index_select(0, index))
        rows, cols = (shifted != -100).nonzero(as_tuple=True)  # waits for the device once: the count is data's
        keep, rank = torch.unique(cols, sorted=True, return_inverse=True)
        return cls(keep, rows * keep.numel() + rank, shifted[rows, cols])

    def model_kwargs(self) -> dict:
        """What the model's forward takes to compute only the needed logits."""
        return {} if self.keep is None else {"logits_to_keep": self.keep}

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [n, V] (fp32) of the targets, from the model's output."""
        flat = (logits[:, :-1] if self.keep is None else logits).reshape(-1, logits.shape[-1])
        return flat.index_select(0, self.index).float()


def computes_chosen_logits(model) -> bool:
    """True when the model's forward takes ``logits_to_keep`` (transformers' causal LMs do) with positions."""
    forward = getattr(type(model), "forward", None)
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(inputs: dict) -> dict:
    """The forward's keyword arguments of a batch (everything but ``labels`` and a packed batch's ``num_tokens``).
    A padding-free batch (position ids, no attention mask) also turns the KV cache off: transformers masks packed
    examples apart only without a cache."""
    feed = {k: v for k, v in inputs.items() if k not in ("labels", "num_tokens")}
    if "position_ids" in feed and "attention_mask" not in feed:
        feed["use_cache"] = False
    return feed


def soft_cross_entropy(student: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_v p_teacher(v) log p_student(v) (``--distill_method sp``)."""
    return -(teacher_probs * F.log_softmax(student, dim=-1)).sum(-1).mean()


def distill_loss(student: torch.Tensor, target: torch.Tensor, teacher_probs: torch.Tensor,
                 kd_weight: float) -> torch.Tensor:
    """``kd_weight`` x soft cross entropy to the teacher + (1 - ``kd_weight``) x label cross entropy, on the
    target tokens (``--distill_method sp``, ``--kd_weight``): the objective of every subnet that learns from a
    teacher, in a sandwich step (teacher: the largest subnet) and in fixed-shape distillation (teacher: the full
    base model)."""
    kd = soft_cross_entropy(student, teacher_probs)
    return kd_weight * kd + (1.0 - kd_weight) * F.cross_entropy(student, target)


def balanced(loss: torch.Tensor, magnitude: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``loss`` scaled to the largest subnet's loss magnitude (loss-magnitude balancing): times ``reference /
    magnitude``, both detached values (the largest's loss and this loss, each averaged over the processes), so
    the factor carries no gradient."""
    return loss * (reference / magnitude.clamp_min(1e-12))


def training_attention(allow_cudnn: bool):
    """A context in which training's attention (``F.scaled_dot_product_attention``) may use the flash,
    memory-efficient and math kernels, and cuDNN's only when ``allow_cudnn`` (``--cudnn_attention``).

    On H100/H200 cuDNN's backward can return NaN query gradients, with a finite loss, when a padding mask is
    passed and a row's log-sum-exp is very negative (pytorch/pytorch#196678): Qwen2.5's attention sinks make
    that happen; here every batch padded to 193 tokens of Qwen2.5-Coder-1.5B gave NaN gradients in every
    adapter. The kernel is chosen at the forward, so the backward follows it."""
    if allow_cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # deferred: only training enters it

    if torch.cuda.is_available():
        logger.info("training attention: cuDNN's kernel not used (--cudnn_attention allows it)")
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class _TokensAtResume(transformers.TrainerCallback):
    """Reads the token count of the checkpoint a run resumes from, once the Trainer has loaded its state."""

    def __init__(self, trainer: "SandwichTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback API)
        self.trainer._tokens_before = int(getattr(state, "num_input_tokens_seen", 0) or 0)


class _FiniteGradients(transformers.TrainerCallback):
    """Before every optimizer step: gradients holding NaN/inf are never applied (see
    :meth:`SandwichTrainer.guard_gradients`). Clipping would not stop them: an infinite norm scales every gradient
    by zero, and 0 x inf is NaN, so one such step makes every adapter NaN."""

    def __init__(self, trainer: "SandwichTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback API)
        self.trainer.guard_gradients()


class SandwichTrainer(transformers.Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose training step is the sandwich rule; saves only the adapters."""

    def __init__(self, *args, em: ElasticModel, sampler: Optional[SandwichSampler], kd_weight: float = 1.0,
                 distill_method: str = "sp", distill_steps: int = -1, balancing: bool = True,
                 fixed_subnet: Optional[Subnet] = None, distill_full: bool = False, max_skipped_steps: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.em = em
        self.sampler = sampler
        self.kd_weight = float(kd_weight)
        self.distill_method = distill_method
        self.distill_steps = int(distill_steps)
        self.balancing = bool(balancing)
        # fixed-shape training distilled from the frozen full model (--train_distill_full)
        self.distill_full = bool(distill_full)
        if self.distill_full and fixed_subnet is None:
            raise ValueError("distillation from the full model needs a fixed subnet")
        self._micro_step = (-1, 0)
        # the output matrix only where a target is (Targets); False: every position, as before
        self.logits_at_targets = computes_chosen_logits(em.model)
        self._role_sums: dict[str, list] = {}
        self._tokens = 0  # a device tensor once training runs: counting must not wait for the GPU
        self._positions = 0  # positions computed, padding included (as _tokens)
        self._tokens_before = 0  # what the checkpoint this run resumed from had seen
        self.add_callback(_TokensAtResume(self))
        # steps whose loss or gradients are not finite: skipped, up to this many over the run, instead of stopping
        self.max_skipped_steps = int(max_skipped_steps)
        self._nonfinite_loss: Optional[str] = None  # the current step's non-finite loss, when it may be skipped
        self._trainable: Optional[list[tuple[str, torch.Tensor]]] = None
        self.add_callback(_FiniteGradients(self))
        self.last_plan: list[tuple[str, Subnet]] = []
        # set to train always the same subnets (one fixed subnet: per-shape fine-tuning)
        self.fixed_plan: Optional[list[tuple[str, Subnet]]] = (
            [("largest", fixed_subnet)] if fixed_subnet is not None else None)

    @property
    def tokens_this_run(self) -> int:
        """Input tokens (attention-mask ones) the run has trained on since it started, all processes'."""
        return int(self._tokens)

    @property
    def padding_share(self) -> float:
        """The share of the positions computed since the run started that were padding (with --padding_free, the
        filler at the end of packed rows)."""
        positions = int(self._positions)
        return 1.0 - int(self._tokens) / positions if positions else 0.0

    @property
    def tokens_seen(self) -> int:
        """Input tokens the run has trained on (all processes'), those before a resume included (the checkpoint
        keeps the count in ``trainer_state.json``, as ``num_input_tokens_seen``)."""
        return self._tokens_before + int(self._tokens)

    # --- sampling
    def plan_for_step(self) -> list[tuple[str, Subnet]]:
        """The subnets of the current micro-batch (seeded by the global step and micro-batch index)."""
        step = self.state.global_step
        last_step, count = self._micro_step
        micro = count + 1 if last_step == step else 0
        self._micro_step = (step, micro)
        if self.fixed_plan is not None:
            return list(self.fixed_plan)
        if self.sampler is None:
            return [("largest", self.em.full_subnet())]
        return self.sampler.sample(step_rng(self.args.seed, step, micro))

    def _distilling(self) -> bool:
        if self.distill_method == "none" or self.kd_weight == 0:
            return False
        return self.distill_steps < 0 or self.state.global_step <= self.distill_steps

    def full_model_teacher(self, feed: dict, targets: Targets) -> torch.Tensor:
        """Target-token probabilities [n, V] of the frozen full model: every layer, full width, adapters off,
        no gradient (the teacher of ``--train_distill_full``)."""
        model = self.model  # unwrapped: the teacher has nothing for DDP to synchronise
        with torch.no_grad(), adapters_disabled(model), self.em.use(self.em.full_subnet()), \
                self.compute_loss_context_manager():
            logits = model(**feed, **targets.model_kwargs()).logits
            teacher = targets.logits(logits)
            del logits
            return torch.softmax(teacher, dim=-1)

    # --- one micro-batch
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward every subnet of the sandwich, one at a time; returns the largest's loss.

        With ``--train_distill_full`` the plan is the one fixed subnet, and the frozen full model (adapters off)
        runs first, without gradient, as its teacher."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        feed = model_inputs(inputs)
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        plan = self.plan_for_step()
        self.last_plan = plan
        router = get_router(self.em.model)
        distill = self._distilling()
        teacher = None
        ref = None
        step, micro = self._micro_step
        # every process's share: the count is the run's, as on one process (one small all-reduce per micro-batch)
        ids = inputs["input_ids"]
        real = (inputs["num_tokens"] if "num_tokens" in inputs  # a packed batch: its examples' tokens
                else inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(ids.numel()))
        counted = sum_over_processes(torch.stack([real.to(ids.device), torch.tensor(ids.numel(), device=ids.device)]))
        self._tokens = self._tokens + counted[0]
        self._positions = self._positions + counted[1]
        # Losses are checked for NaN/inf once, after the last subnet: a check per subnet would make the host wait
        # for the GPU before each next forward, and the optimizer step comes later anyway.
        checked: list[tuple[str, Subnet, torch.Tensor]] = []
        targets = Targets.of(labels, self.logits_at_targets)
        try:
            if distill and self.distill_full:
                teacher = self.full_model_teacher(feed, targets)
            for i, (role, subnet) in enumerate(plan):
                # DDP averages the gradients once per micro-batch, after the last subnet's backward: the sum of
                # the subnets' gradients is what it averages either way, with a quarter of the communication.
                with self._gradients_synced(model, last=i == len(plan) - 1):
                    self.em.set_subnet(subnet)
                    if router is not None:
                        router.noise_seed = router_noise_seed(self.args.seed, step, micro, i)
                    with self.compute_loss_context_manager():
                        logits = model(**feed, **targets.model_kwargs()).logits
                        student, target = targets.logits(logits), targets.target
                        del logits
                        if target.numel() == 0:  # every target truncated away: nothing to learn here
                            loss = student.sum() * 0.0
                        elif teacher is not None:  # a random/smallest subnet, or the fixed one of --train_distill_full
                            loss = distill_loss(student, target, teacher, self.kd_weight)
                        else:
                            loss = F.cross_entropy(student, target)
                        if i == 0 and teacher is None and distill and len(plan) > 1:
                            teacher = torch.softmax(student.detach(), dim=-1)  # in-place distillation
                        del student
                    if self.args.n_gpu > 1:
                        loss = loss.mean()
                    value = mean_over_processes(loss.detach())
                    checked.append((role, subnet, value))
                    self._role_sums.setdefault(role, []).append(value)
                    if i == 0:
                        ref = value
                    elif self.balancing:
                        loss = balanced(loss, value, ref)
                    self.accelerator.backward(loss / ga)
                    del loss
            values = torch.stack([v.float() for _, _, v in checked])
            if not bool(torch.isfinite(values).all()):  # the one host-device sync of the micro-batch
                role, subnet, value = next(c for c in checked if not bool(torch.isfinite(c[2])))
                if len(self.skipped_steps()) >= self.max_skipped_steps:
                    raise TrainingDiverged(self._diverged_message(float(value), role, subnet))
                # its gradients are not applied: guard_gradients skips the step
                self._nonfinite_loss = f"loss {float(value)} ({role} subnet {subnet.label})"
        finally:
            if router is not None:
                router.noise_seed = None
            self.em.set_subnet(self.em.full_subnet())
        return ref / ga

    # --- non-finite steps
    def skipped_steps(self) -> list[int]:
        """The optimizer steps skipped for a non-finite loss or gradients, those before a resume included (each is
        an entry of the log history, which checkpoints keep)."""
        return [int(h["skipped_step"]) for h in self.state.log_history if "skipped_step" in h]

    def guard_gradients(self) -> None:
        """Called before each optimizer step: when the step's loss or gradients are not finite, drop its
        gradients (the optimizer then leaves every adapter and its moments as they were) while
        ``--max_skipped_steps`` allows, else stop with the tensors named. One read-back per step."""
        if self._trainable is None:
            self._trainable = [(n, p) for n, p in self.em.model.named_parameters() if p.requires_grad]
        loss, self._nonfinite_loss = self._nonfinite_loss, None
        bad = nonfinite_names([(n, p.grad) for n, p in self._trainable if p.grad is not None])
        if not bad and loss is None:
            return
        step = self.state.global_step + 1
        what = [loss] if loss else []
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            what.append(f"non-finite gradients in {', '.join(bad[:3])}{more}")
        subnets = ", ".join(s.label for _, s in self.last_plan)
        skipped = self.skipped_steps()
        if len(skipped) >= self.max_skipped_steps:
            raise TrainingDiverged(
                f"{'; '.join(what)} at step {step} (subnets {subnets}); stopped without applying them, "
                f"{self.last_good()}. Lower --learning_rate (or check the data and --bits), or allow a few such "
                f"steps to be skipped with --max_skipped_steps (now {self.max_skipped_steps}), then continue with "
                "--resume_training")
        for _, param in self._trainable:
            param.grad = None
        logger.warning("step %d skipped (%d of --max_skipped_steps %d): %s (subnets %s)", step, len(skipped) + 1,
                       self.max_skipped_steps, "; ".join(what), subnets)
        self.log({"skipped_step": step})

    def _gradients_synced(self, model, last: bool):
        """Inside: DDP keeps this pass's gradients local (``no_sync``) unless it is the micro-batch's ``last``."""
        if last or self.args.world_size <= 1 or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    def _diverged_message(self, value: float, role: str, subnet: Subnet) -> str:
        return (f"training loss became {value} at step {self.state.global_step + 1} ({role} subnet "
                f"{subnet.label}); stopped without applying it, {self.last_good()}. Lower --learning_rate (or "
                "check the data and --bits), or allow a few such steps to be skipped with --max_skipped_steps, then "
                "continue with --resume_training")

    def last_good(self) -> str:
        """Where training can be continued from, as a message says it: the newest intact checkpoint, or none yet."""
        ckpt = last_complete_checkpoint(self.args.output_dir)
        return f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"

    def nonfinite_state(self) -> Optional[str]:
        """The name of the first adapter/router tensor or optimizer state that holds NaN/inf, or None.

        One host-device sync per device: the per-tensor checks are combined before anything is read back."""
        params = adapter_state_dict(self.em.model)
        named = [(f"adapter {k}", v.detach()) for k, v in params.items()]
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            index = {id(p): k for k, p in params.items()}
            for param, slots in getattr(optimizer, "state", {}).items():
                for slot, value in slots.items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        named.append((f"optimizer {slot} of {index.get(id(param), 'a parameter')}", value.detach()))
        return first_nonfinite(named)

    def _check_finite_before_save(self) -> None:
        # every process checks (the adapters are the same everywhere) and all agree, so none waits alone in a
        # later collective while the others stop
        bad = self.nonfinite_state()
        flag = mean_over_processes(torch.tensor(float(bad is not None), device=self.args.device))
        if float(flag) > 0:
            step = self.state.global_step
            raise TrainingDiverged(
                f"{bad or 'the adapters of another process'} became non-finite at step {step} (the loss was finite: "
                f"non-finite gradients); stopped without writing checkpoint-{step}, {self.last_good()}. Lower "
                "--learning_rate (or check the data and --bits), then continue with --resume_training")

    # --- a sharded base (--fsdp): DDP over the adapters only
    def _wrap_model(self, model, training=True, dataloader=None):
        if not (training and is_sharded(self.em.model)) or self.accelerator.unwrap_model(model) is not model:
            return super()._wrap_model(model, training, dataloader)
        return wrap_replicated(model, self.accelerator, self.args.ddp_find_unused_parameters,
                               self.args.ddp_bucket_cap_mb, self.args.ddp_broadcast_buffers)

    # --- evaluation: the largest subnet
    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation, always on padded batches: it weights each batch's loss by the batch's rows,
        which packing (``--padding_free``) would change, so the held-out loss stays comparable between runs."""
        collator = self.data_collator
        if getattr(collator, "padding_free", False):
            self.data_collator = replace(collator, padding_free=False)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Label loss (mean over target tokens) of the largest subnet."""
        if self.fixed_plan is not None:
            largest = self.fixed_plan[0][1]
        else:
            largest = self.sampler.largest if self.sampler is not None else self.em.full_subnet()
        labels = inputs["labels"]
        feed = model_inputs(inputs)
        targets = Targets.of(labels, self.logits_at_targets)
        with self.em.use(largest):
            outputs = model(**feed, **targets.model_kwargs())
            student, target = targets.logits(outputs.logits), targets.target
            loss = F.cross_entropy(student, target) if target.numel() else student.sum() * 0.0
        return (loss, outputs) if return_outputs else loss

    # --- logging
    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add the mean loss of each sandwich role since the last log."""
        if "loss" in logs and self._role_sums:
            for role, values in self._role_sums.items():
                logs[f"loss_{role}"] = round(float(torch.stack(values).float().mean()), 4)
            self._role_sums = {}
        super().log(logs, *args, **kwargs)

    # --- checkpoints: adapters only
    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapters(self.em.model, Path(output_dir) / ADAPTER_DIR, self.em)
        logger.info("saved adapters to %s", Path(output_dir) / ADAPTER_DIR)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        where = Path(resume_from_checkpoint) / ADAPTER_DIR
        load_adapters(self.em.model, self.em, where, resuming=True)
        logger.info("resumed adapters from %s", where)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, made durable: refused when the adapters or optimizer state are not finite;
        every file is fsynced before ``trainer_state.json``, the completion marker, is written atomically (a
        temporary file, fsync, rename), so a checkpoint with its marker is whole even after a kill or power loss;
        older checkpoints are rotated away only after that."""
        self._check_finite_before_save()
        self.state.num_input_tokens_seen = self.tokens_seen
        folder = checkpoint_dir(self._get_output_dir(trial=trial), self.state.global_step)
        if self.args.should_save:
            # A folder of this step can only be left from a run that was abandoned at an older checkpoint (resume
            # takes the newest valid one): its stale marker must not vouch for the files now being rewritten.
            remove_marker(folder)
        state = self.state

        def save_to_json(json_path: str, _plain=state.save_to_json) -> None:
            path = Path(json_path)
            if path.name == TRAINER_STATE and path.parent == folder:
                write_marker(state, path)
            else:
                _plain(json_path)

        state.save_to_json = save_to_json  # this instance only, for this save
        try:
            super()._save_checkpoint(model, trial)
        finally:
            vars(state).pop("save_to_json", None)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.world_size > 1:
            # each process writes its own RNG file: all must be on disk before the first process writes the marker
            for path in Path(output_dir).glob(f"rng_state_{self.args.process_index}.pth"):
                fsync(path)
            torch.distributed.barrier()
