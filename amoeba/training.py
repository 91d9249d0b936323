"""Stage 2: one-for-all fine-tuning of the elastic model (sandwich sampling + in-place distillation).

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
after every other file of the checkpoint is on disk, and only when the adapters and optimizer state are finite.
``--resume_training`` continues from the newest checkpoint that validates (:func:`checkpoint_problem`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from amoeba.adapters import (ADAPTER_DIR, adapter_state_dict, adapters_disabled, add_adapters, get_router,
                             load_adapters, save_adapters)
from amoeba.args import parse_ratio, width_key
from amoeba.elastic import ElasticModel, subnet_for
from amoeba.errors import Interrupted, UsageError
from amoeba.files import atomic_path, save_run_record, write_json, write_text
from amoeba.subnet import Subnet

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # the "checkpoint complete" marker: written last
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite; training stopped before applying it."""


# ----------------------------------------------------------------------------------------------
# Which subnets a step trains
# ----------------------------------------------------------------------------------------------
class SandwichSampler:
    """Draws the subnets of one sandwich step: largest, random ones, smallest.

    ``layer_masks`` ({removed: 0/1 mask}) gives the depths of ``calib_dp``; without it the first layers
    are kept (``first_layers``). ``widths``: the width choices (the largest subnet uses the widest, the
    smallest the narrowest). ``elastic_depth=False`` keeps every layer.

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
                 layer_masks: Optional[dict] = None, elastic_depth: bool = True):
        self.em = em
        n = em.num_layers
        self.layer_masks = layer_masks
        self.min_layers = int(min_num_layer) if elastic_depth else n
        if not 1 <= self.min_layers <= n:
            raise UsageError(f"{min_num_layer} must lie in [1, {n}] (the model has {n} layers)", "--min_num_layer")
        if layer_masks is not None:
            depths = sorted({n - int(k) for k in layer_masks if self.min_layers <= n - int(k) < n})
            if self.min_layers < n and (n - self.min_layers) not in {int(k) for k in layer_masks}:
                have = sorted(n - int(k) for k in layer_masks)
                raise UsageError(f"the strategy has no {self.min_layers}-layer subnet (it has {have})",
                                 "--min_num_layer")
        else:
            depths = list(range(self.min_layers, n))
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
        return subnet_for(self.em, num_layers, width, self.layer_masks, flag="--min_num_layer")

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
def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a detached scalar over all processes (itself without ``torch.distributed``).

    The balancing scale and the divergence check use it, so every process scales by the same factor (a
    data-parallel step then equals one step on the whole global batch) and all stop together on a NaN
    instead of leaving the others waiting in the gradient all-reduce."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    world = torch.distributed.get_world_size()
    if world == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / world


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the shifted [batch * (seq - 1)] positions that have a target, those targets).

    Computed once per micro-batch: finding them waits for the device (the count is data-dependent), indexing
    with them afterwards does not."""
    shift_labels = labels[:, 1:].reshape(-1)
    index = (shift_labels != -100).nonzero().squeeze(1)
    return index, shift_labels.index_select(0, index)


def target_logits(logits: torch.Tensor, labels: torch.Tensor,
                  positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, V] in fp32, labels [n]) at the target positions (next-token shift, labels != -100);
    ``positions`` from :func:`target_positions` when already known."""
    index, target = positions if positions is not None else target_positions(labels)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return flat.index_select(0, index).float(), target


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


def combine_losses(losses: Sequence[torch.Tensor], balancing: bool) -> list[torch.Tensor]:
    """Scale each non-largest loss to the largest's magnitude (factor detached) when ``balancing``."""
    if not balancing or not losses:
        return list(losses)
    ref = losses[0].detach()
    out = [losses[0]]
    for loss in losses[1:]:
        out.append(loss * (ref / loss.detach().clamp_min(1e-12)))
    return out


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class SandwichTrainer(transformers.Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` whose training step is the sandwich rule; saves only the adapters."""

    def __init__(self, *args, em: ElasticModel, sampler: Optional[SandwichSampler], kd_weight: float = 1.0,
                 distill_method: str = "sp", distill_steps: int = -1, balancing: bool = True,
                 fixed_subnet: Optional[Subnet] = None, distill_full: bool = False, **kwargs):
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
        self._role_sums: dict[str, list] = {}
        self._tokens = 0  # a device tensor once training runs: counting must not wait for the GPU
        self.last_plan: list[tuple[str, Subnet]] = []
        # set to train always the same subnets (one fixed subnet: per-shape fine-tuning)
        self.fixed_plan: Optional[list[tuple[str, Subnet]]] = (
            [("largest", fixed_subnet)] if fixed_subnet is not None else None)

    @property
    def tokens_seen(self) -> int:
        """Input tokens (attention-mask ones) this process has trained on."""
        return int(self._tokens)

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

    def full_model_teacher(self, feed: dict, labels: torch.Tensor,
                           positions: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Target-token probabilities [n, V] of the frozen full model: every layer, full width, adapters off,
        no gradient (the teacher of ``--train_distill_full``)."""
        model = self.model  # unwrapped: the teacher has nothing for DDP to synchronise
        with torch.no_grad(), adapters_disabled(model), self.em.use(self.em.full_subnet()), \
                self.compute_loss_context_manager():
            logits = model(**feed).logits
            teacher, _ = target_logits(logits, labels, positions)
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
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        plan = self.plan_for_step()
        self.last_plan = plan
        router = get_router(self.em.model)
        distill = self._distilling()
        teacher = None
        ref = None
        step, micro = self._micro_step
        self._tokens = self._tokens + (inputs["attention_mask"].sum() if "attention_mask" in inputs
                                       else labels.numel())
        # Losses are checked for NaN/inf once, after the last subnet: a check per subnet would make the host wait
        # for the GPU before each next forward, and the optimizer step comes later anyway.
        checked: list[tuple[str, Subnet, torch.Tensor]] = []
        positions = target_positions(labels)
        try:
            if distill and self.distill_full:
                teacher = self.full_model_teacher(feed, labels, positions)
            for i, (role, subnet) in enumerate(plan):
                self.em.set_subnet(subnet)
                if router is not None:
                    router.noise_seed = router_noise_seed(self.args.seed, step, micro, i)
                with self.compute_loss_context_manager():
                    logits = model(**feed).logits
                    student, target = target_logits(logits, labels, positions)
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
                    loss = loss * (ref / value.clamp_min(1e-12))
                self.accelerator.backward(loss / ga)
                del loss
            values = torch.stack([v.float() for _, _, v in checked])
            if not bool(torch.isfinite(values).all()):  # the one host-device sync of the micro-batch
                role, subnet, value = next(c for c in checked if not bool(torch.isfinite(c[2])))
                raise TrainingDiverged(self._diverged_message(float(value), role, subnet))
        finally:
            if router is not None:
                router.noise_seed = None
            self.em.set_subnet(self.em.full_subnet())
        return ref / ga

    def _diverged_message(self, value: float, role: str, subnet: Subnet) -> str:
        return (f"training loss became {value} at step {self.state.global_step + 1} ({role} subnet "
                f"{subnet.label}); stopped without applying it, {self._last_good()}. Lower --learning_rate (or "
                "check the data and --bits), then continue with --resume_training")

    def _last_good(self) -> str:
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
        return _first_nonfinite(named)

    def _check_finite_before_save(self) -> None:
        # every process checks (the adapters are the same everywhere) and all agree, so none waits alone in a
        # later collective while the others stop
        bad = self.nonfinite_state()
        flag = mean_over_processes(torch.tensor(float(bad is not None), device=self.args.device))
        if float(flag) > 0:
            step = self.state.global_step
            raise TrainingDiverged(
                f"{bad or 'the adapters of another process'} became non-finite at step {step} (the loss was finite: "
                f"non-finite gradients); stopped without writing checkpoint-{step}, {self._last_good()}. Lower "
                "--learning_rate (or check the data and --bits), then continue with --resume_training")

    # --- evaluation: the largest subnet
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Label loss (mean over target tokens) of the largest subnet."""
        if self.fixed_plan is not None:
            largest = self.fixed_plan[0][1]
        else:
            largest = self.sampler.largest if self.sampler is not None else self.em.full_subnet()
        labels = inputs["labels"]
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        with self.em.use(largest):
            outputs = model(**feed)
            student, target = target_logits(outputs.logits, labels)
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
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            # A folder of this step can only be left from a run that was abandoned at an older checkpoint (resume
            # takes the newest valid one): its stale marker must not vouch for the files now being rewritten.
            _remove_marker(folder)
        state = self.state

        def save_to_json(json_path: str, _plain=state.save_to_json) -> None:
            path = Path(json_path)
            if path.name == TRAINER_STATE and path.parent == folder:
                _write_marker(state, path)
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
                _fsync(path)
            torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def _first_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor with a NaN/inf, or None; reads back one flag per device."""
    by_device: dict = {}
    for i, (_, value) in enumerate(named):
        by_device.setdefault(value.device, []).append((i, torch.isfinite(value).all()))
    bad = []
    for flags in by_device.values():
        ok = torch.stack([f for _, f in flags])
        if not bool(ok.all()):
            bad.extend(i for (i, _), good in zip(flags, ok.tolist()) if not good)
    return named[min(bad)][0] if bad else None


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)
    except OSError:
        return  # e.g. folders on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without fsync for this kind of file (e.g. some network mounts for folders)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then the folders themselves (deepest first) and ``folder``'s parent, so
    the files and their names are on disk."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(Path(root))
        for name in files:
            _fsync(Path(root) / name)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync(d)
    _fsync(folder.parent)


def _write_marker(state, path: Path) -> None:
    """Write the trainer state as ``path`` (the completion marker) last: the rest of the checkpoint folder is
    synced first, then the marker goes to a temporary file, is fsynced and renamed over ``path``."""
    _sync_tree(path.parent)
    text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"  # as TrainerState.save_to_json
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _fsync(path.parent)


def _remove_marker(folder: Path) -> None:
    """Remove the marker of a checkpoint folder about to be rewritten, and temporary markers a kill left behind."""
    marker = folder / TRAINER_STATE
    if marker.is_file():
        logger.warning("%s is being written again; its earlier marker is removed first", folder)
        marker.unlink()
        _fsync(folder)
    for tmp in folder.glob(f".{TRAINER_STATE}.*"):  # atomic_path's temporary names
        tmp.unlink(missing_ok=True)


def _short(err: BaseException) -> str:
    """The first line of an exception's message, at most 160 characters (for a one-line reason)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _load_state_file(path: Path):
    """``torch.load`` of a checkpoint's optimizer/scheduler/RNG file the way the Trainer reads it (tensors and
    plain containers only; numpy RNG state allowed)."""
    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:  # older transformers: nothing extra to allow
        safe_globals = contextlib.nullcontext
    with safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_problem(folder, resumable: bool = True) -> Optional[str]:
    """Why ``checkpoint-N`` cannot be resumed, or None when it validates.

    Valid: the marker (``trainer_state.json``) is present and a JSON object; the adapters' config and
    safetensors load and hold finite values; with ``resumable`` (what resuming needs, beyond the adapters that
    evaluation reads) the marker holds the global step, and the optimizer, scheduler and RNG files are present
    and load, the optimizer state finite."""
    from amoeba.adapters import read_adapter_config, read_adapter_tensors

    folder = Path(folder)
    marker = folder / TRAINER_STATE
    if not marker.is_file():
        return f"no {TRAINER_STATE} (the checkpoint was not completed)"
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is not readable JSON ({_short(err)})"
    if not isinstance(state, dict) or (resumable and not isinstance(state.get("global_step"), int)):
        return f"{TRAINER_STATE} holds no trainer state"
    if resumable:
        try:
            transformers.TrainerState(**state)  # what the Trainer makes of it on resume
        except (TypeError, ValueError) as err:
            return f"{TRAINER_STATE} is not a trainer state this transformers can read ({_short(err)})"
    try:
        read_adapter_config(folder / ADAPTER_DIR)
        read_adapter_tensors(folder / ADAPTER_DIR)
    except UsageError as err:
        return str(err)
    if not resumable:
        return None
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth"
    scaler = [folder / SCALER_FILE] if (folder / SCALER_FILE).is_file() else []  # fp16 on CUDA only
    for path in [folder / OPTIMIZER_FILE, folder / SCHEDULER_FILE, *scaler, *rng]:
        if not path.is_file():
            return f"no {path.name}"
        try:
            loaded = _load_state_file(path)
        except Exception as err:  # noqa: BLE001 -- any failure to read the file makes the checkpoint unusable
            return f"{path.name} cannot be loaded ({_short(err)})"
        if path.name == OPTIMIZER_FILE:
            slots = loaded.get("state", {}) if isinstance(loaded, dict) else {}
            named = [(f"{path.name} ({slot} of parameter {key})", value)
                     for key, values in (slots.items() if isinstance(slots, dict) else ())
                     for slot, value in (values.items() if isinstance(values, dict) else ())
                     if torch.is_tensor(value) and value.is_floating_point()]
            bad = _first_nonfinite(named)
            if bad:
                return f"{bad} holds non-finite values"
    return None


def last_complete_checkpoint(output_dir, skipped: Optional[list] = None, resumable: bool = True) -> Optional[Path]:
    """The newest ``checkpoint-N`` in ``output_dir`` that validates (:func:`checkpoint_problem`; ``resumable=False``:
    its adapters only), or None.

    Newer checkpoints that do not validate (a run killed while saving, a damaged file) are passed over; each is
    appended to ``skipped`` as ``(path, reason)`` when a list is given."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _step_of(p) >= 0),
                        key=_step_of, reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path, resumable)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
    return None


# ----------------------------------------------------------------------------------------------
# Validation and setup
# ----------------------------------------------------------------------------------------------
def layer_masks_of(strategy, em: ElasticModel, flag: str = "--shrinking_file") -> Optional[dict]:
    """The strategy's {removed: mask} (checked against the model), or None."""
    if strategy is None:
        return None
    masks = getattr(strategy, "layer_masks", None)
    if masks is None and isinstance(strategy, dict):
        masks = strategy.get("layer_masks") or strategy.get("strategy")
    if not masks:
        raise UsageError("the strategy holds no layer masks", flag)
    out = {}
    for k, m in masks.items():
        m = np.asarray(m).reshape(-1)
        if m.size != em.num_layers:
            raise UsageError(f"the strategy belongs to a model with {m.size} layers; this model has "
                             f"{em.num_layers}", flag)
        out[int(k)] = m
    return out


def validate_training_setup(args, em: ElasticModel, strategy) -> Optional[dict]:
    """Check the Stage 2 flags against the model and strategy; return the layer masks to sample from."""
    t = args.train
    if t.full_finetune:
        raise UsageError("Stage 2 trains adapters (LoRA / MoE-LoRA); full fine-tuning is not supported",
                         "--full_finetune")
    if getattr(t, "fsdp", None):
        # Unverified: the layer-skipping hooks inside FSDP units and saving adapters from sharded parameters
        # have not been run on GPUs (FSDP is not available on CPU processes), so refuse rather than risk a
        # silently wrong checkpoint.
        raise UsageError("FSDP is not supported for Stage 2 yet; use DDP (one full model copy per GPU, "
                         "scripts/launch_multi_gpu.sh) or a 4-bit base (--bits 4) to fit large models", "--fsdp")
    masks = None
    if t.enable_shrinking and t.shrinking_method == "calib_dp":
        if strategy is None:
            raise UsageError("--shrinking_method calib_dp needs --shrinking_file (the Stage 1 strategy)",
                             "--shrinking_file")
        masks = layer_masks_of(strategy, em)
    elif strategy is not None:
        layer_masks_of(strategy, em)  # still must belong to this model
    if t.enable_shrinking and not 1 <= t.min_num_layer <= em.num_layers:
        raise UsageError(f"{t.min_num_layer} must lie in [1, {em.num_layers}] (the model has {em.num_layers} "
                         "layers)", "--min_num_layer")
    if t.shrinkable_width:
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
    if t.train_num_width is not None and t.train_num_layer is None:
        raise UsageError("give the depth of the fixed subnet too (--train_num_layer)", "--train_num_width")
    return masks



def fixed_training_subnet(args, em: ElasticModel, strategy) -> Optional[Subnet]:
    """The one subnet ``--train_num_layer``/``--train_num_width`` asks to train, or None (sandwich); a shape the
    strategy (or the loaded widths) lacks is refused as for export."""
    from amoeba.export import resolve_subnet

    t = args.train
    if t.train_num_layer is None:
        return None
    width = parse_ratio(t.train_num_width, "--train_num_width") if t.train_num_width else 1.0
    return resolve_subnet(em, strategy, int(t.train_num_layer), width, t.shrinking_method,
                          layer_flag="--train_num_layer", width_flag="--train_num_width")


def _fallback_optimizer(t) -> None:
    """Paged / 8-bit optimizers need CUDA and bitsandbytes: use adamw_torch without them (same update
    rule; only the optimizer state's paging/precision differs)."""
    import importlib.util

    from transformers.training_args import OptimizerNames

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


def _prepare_output_dir(t) -> Optional[str]:
    """The checkpoint to resume from (``--resume_training``), refusing to overwrite an earlier run.

    Resuming takes the newest checkpoint that validates; each newer one passed over gets one warning naming it
    and why. No checkpoint at all, or none that validates: UsageError (a user who asked to resume is told that
    there was nothing to resume, rather than silently getting a new run)."""
    out = Path(t.output_dir)
    existing = [p for p in out.glob("checkpoint-*") if p.is_dir()] if out.is_dir() else []
    if t.resume_training:
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
    for key in ("train_runtime", "tokens_per_second", "tokens_seen"):
        if key in metrics:
            lines.append(f"| {key} | | {metrics[key]} |")
    note = ("\nThe largest subnet's loss is the label cross entropy; the others' is their training objective "
            "(soft cross entropy to the largest's predictions, mixed with the label loss by --kd_weight), before "
            "balancing.\n")
    if metrics.get("distilled_from_full_model"):
        note = ("\nOne fixed subnet (logged as 'largest'), distilled from the frozen full model: its loss is soft "
                "cross entropy to the full model's predictions, mixed with the label loss by --kd_weight.\n")
    return "# Stage 2 training\n\n" + "\n".join(lines) + "\n" + note


def _write_outputs(trainer: SandwichTrainer, out: Path, metrics: dict) -> None:
    history = trainer.state.log_history
    write_json(out / "training_log.json", history)
    write_json(out / "train_results.json", metrics)
    write_text(out / "train_results.md", results_markdown(history, metrics))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
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
    with atomic_path(out / "loss_curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def prepare_trainer(args, model, tokenizer, em: ElasticModel, strategy, callbacks: Optional[list] = None,
                    data: Optional[dict] = None):
    """Validate the flags, attach adapters, load the data and build the :class:`SandwichTrainer`.

    ``data`` (train_dataset, eval_dataset, data_collator) replaces the instruction data when given.
    Returns ``(trainer, checkpoint to resume from or None)``.
    """
    from amoeba.instruct_data import make_data_module

    t = args.train
    masks = validate_training_setup(args, em, strategy)
    resume_from = _prepare_output_dir(t)
    save_run_record(t.output_dir, args)  # only now: a command refused above leaves an earlier run's record as it was
    _fallback_optimizer(t)
    t.prediction_loss_only = True
    t.remove_unused_columns = False
    if t.enable_shrinking and not t.ddp_find_unused_parameters:
        # Skipped layers' adapters get no gradient in a sub-depth pass; DDP must be told to expect that.
        t.ddp_find_unused_parameters = True

    if getattr(model, "is_quantized", False) or t.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        # checkpointing is switched on just below through the current transformers API (the helper would call
        # its deprecated name)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    add_adapters(model, em, args)
    if t.gradient_checkpointing:
        _enable_checkpointing(model)
    _disable_trainer_checkpointing(t)

    sampler = None
    fixed = fixed_training_subnet(args, em, strategy)
    if fixed is not None:
        logger.info("training one fixed subnet: %s (%d parameters)%s", fixed.label, em.param_count(fixed),
                    f", distilled from the full model (kd_weight {t.kd_weight:g})" if t.train_distill_full else "")
    elif t.enable_shrinking or t.shrinkable_width:
        widths = args.width_choice if t.shrinkable_width else (1.0,)
        sampler = SandwichSampler(em, t.min_num_layer, t.random_sample_num_layer, widths, masks,
                                  elastic_depth=t.enable_shrinking)
        logger.info("sandwich: largest %s, %d distinct random (depths %s, widths %s), smallest %s",
                    sampler.largest.label, sampler.num_drawn, sampler.random_depths,
                    [f"{w:g}" for w in sampler.widths], sampler.smallest.label)
    if data is None:
        data = make_data_module(tokenizer, args)
    if data.get("eval_dataset") is None and str(getattr(t.eval_strategy, "value", t.eval_strategy)) != "no":
        from transformers.trainer_utils import IntervalStrategy

        t.eval_strategy = IntervalStrategy.NO
    with _adapters_visible_to_trainer(model):
        trainer = SandwichTrainer(
            model=model, args=t, processing_class=tokenizer, callbacks=callbacks, em=em, sampler=sampler,
            kd_weight=t.kd_weight, distill_method=t.distill_method, distill_steps=t.distill_steps,
            balancing=not t.no_balancing, fixed_subnet=fixed, distill_full=t.train_distill_full, **data)
    return trainer, resume_from


class AdapterSnapshots(transformers.TrainerCallback):
    """Keeps the adapters after chosen optimizer steps in ``<output_dir>/adapter_model-step<N>/``
    (``--adapter_snapshot_steps``), independent of checkpoint rotation."""

    def __init__(self, steps: Sequence[int], em: ElasticModel, output_dir):
        self.steps = {int(s) for s in steps}
        self.em = em
        self.output_dir = Path(output_dir)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D102 (TrainerCallback API)
        if state.global_step in self.steps and state.is_world_process_zero and model is not None:
            save_adapters(model, self.output_dir / f"{ADAPTER_DIR}-step{state.global_step}", self.em)


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
        import torch.distributed as dist

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


def snapshot_steps(text: Optional[str]) -> list[int]:
    """Parse ``--adapter_snapshot_steps`` (``400,1000``)."""
    if not text:
        return []
    from amoeba.args import parse_int_list

    return list(parse_int_list(text, "--adapter_snapshot_steps"))


def run_training(args, model, tokenizer, em: ElasticModel, strategy, callbacks: Optional[list] = None):
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
    with stop.installed():
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            _close_progress_bars(trainer)
    elapsed = time.time() - start
    out = Path(t.output_dir)
    if stop.received is not None and trainer.state.global_step < trainer.state.max_steps:
        step = trainer.state.global_step
        raise Interrupted(f"{signal.Signals(stop.received).name} at step {step} of {trainer.state.max_steps}; "
                          f"checkpoint {out / f'checkpoint-{step}'} written; continue with --resume_training",
                          stop.received)
    # Every process evaluates: the Trainer gathers across processes, so one alone would wait forever.
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None and t.do_eval else {}
    bad = trainer.nonfinite_state()
    if bad is not None:  # the last steps' gradients were not finite: such adapters are no result
        raise TrainingDiverged(f"{bad} became non-finite by the last step ({trainer.state.global_step}; the loss was "
                               f"finite: non-finite gradients); no adapters written, {trainer._last_good()}. Lower "
                               "--learning_rate (or check the data and --bits), then continue with --resume_training")
    if trainer.args.should_save:
        save_adapters(model, out / ADAPTER_DIR, em)
        metrics = dict(result.metrics)
        metrics.update({"wall_seconds": round(elapsed, 2), "tokens_seen": trainer.tokens_seen,
                        "tokens_per_second": round(trainer.tokens_seen / max(elapsed, 1e-9), 2),
                        "sandwich": [r for r, _ in trainer.last_plan]})
        if trainer.distill_full:
            metrics["distilled_from_full_model"] = True
        metrics.update(final_eval)
        _write_outputs(trainer, out, metrics)
        logger.info("training done in %.1f s; adapters in %s", elapsed, out / ADAPTER_DIR)
    em.set_subnet(em.full_subnet())
    model.eval()
    return model
