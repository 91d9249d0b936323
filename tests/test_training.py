"""Stage 2 training: sandwich sampling, distillation and balancing math, loss goes down, resume after
SIGKILL, NaN stop, bad input, and both seed Stage 2 commands on a tiny model folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from amoeba.adapters import adapted_modules, adapter_state_dict, load_adapters
from amoeba.adapters import get_router
from amoeba.args import parse_args
from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.run_folder import last_complete_checkpoint
from amoeba.stages.finetuning import prepare_trainer, run_training, validate_training_setup
from amoeba.subnet import Subnet
from amoeba.training import SandwichSampler, TrainingDiverged, balanced, router_noise_seed, step_rng
from tests.conftest import ROOT, load_script, tiny_model
from tests.test_cli import assert_usage_error

torch.set_num_threads(1)  # tiny models: threads only add contention


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny model folder with a word-level tokenizer, a strategy file, a small dataset
# ----------------------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<s>": 121, "</s>": 122, "A": 123, "B": 124, "C": 125, "D": 126})  # MMLU letters
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", padding_side="right")


def _strategy_dict(model, ratios=(0.875, 0.75, 0.625), seed=0):
    from tests.test_strategy import random_strategy

    return random_strategy(model, ratios=(1.0,) + tuple(ratios), seed=seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny 6-layer GQA Llama folder + tokenizer, its strategy file, and a small instruction dataset."""
    folder = tmp_path_factory.mktemp("stage2")
    model = tiny_model("gqa", layers=6)
    model.save_pretrained(folder / "model")
    _tokenizer().save_pretrained(folder / "model")
    np.save(folder / "dp_selection_strategy.npy", _strategy_dict(model))
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):  # learnable: a fixed opening, then the instruction's first word shifted by one
        words = rng.integers(0, 60, 4)
        rows.append({"instruction": " ".join(f"w{w}" for w in words), "input": "",
                     "output": f"w90 w91 w92 w{words[0] + 1}"})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _flags(tiny_dir, out, *extra):
    return ["--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(out),
            "--dataset", str(tiny_dir / "data.jsonl"), "--do_train", "True", "--source_max_len", "64",
            "--target_max_len", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--lora_r", "4",
            "--lora_alpha", "8", "--group_by_length", "False", "--gradient_checkpointing", "False",
            "--dataloader_num_workers", "0", *extra]


def _setup(tiny_dir, out, *extra, strategy=True):
    from amoeba.loading import load_model_and_tokenizer
    from amoeba.pipeline import load_settings
    from amoeba.strategy import apply_strategy, load_strategy

    args = parse_args(_flags(tiny_dir, out, *extra))
    model, tok = load_model_and_tokenizer(load_settings(args))
    em = make_elastic(model)
    s = None
    if strategy:
        s = load_strategy(tiny_dir / "dp_selection_strategy.npy")
        apply_strategy(em, s, args.width_choice if args.elastic.shrinkable_width else (1.0,))
    return args, model, tok, em, s


SANDWICH = ("--enable_shrinking", "--min_num_layer", "3", "--random_sample_num_layer", "2",
            "--shrinking_method", "calib_dp", "--shrinkable_width", "--width_choice", "[1,7/8,3/4,5/8]")


# ----------------------------------------------------------------------------------------------
# Sampling and loss math
# ----------------------------------------------------------------------------------------------
def test_sandwich_sampler_order_range_and_determinism():
    model = tiny_model("gqa", layers=6)
    em = make_elastic(model)
    masks = {1: [1, 1, 1, 1, 0, 1], 2: [1, 1, 0, 1, 0, 1], 3: [1, 0, 0, 1, 0, 1]}
    s = SandwichSampler(em, 3, 3, (1.0, 0.875, 0.75), masks)
    plans = [s.sample(step_rng(0, step, 0)) for step in range(30)]
    for plan in plans:
        assert [r for r, _ in plan] == ["largest", "random1", "random2", "random3", "smallest"]
        assert plan[0][1] == Subnet(tuple(range(6)), 1.0)
        assert plan[-1][1] == Subnet((0, 3, 5), 0.75)  # the strategy's 3-layer mask, narrowest width
        for _, sub in plan[1:-1]:
            assert 3 <= sub.num_layers <= 5 and sub.width in (1.0, 0.875, 0.75)
            assert sub.mask(6).tolist() == [float(v) for v in masks[6 - sub.num_layers]]
    assert {sub.num_layers for p in plans for _, sub in p[1:-1]} == {3, 4, 5}
    assert s.sample(step_rng(0, 7, 1)) == s.sample(step_rng(0, 7, 1))  # same step -> same subnets
    assert len({tuple(p) for p in plans}) > 10
    first = SandwichSampler(em, 4, 1, (1.0,), None)  # --shrinking_method first_layers
    assert first.smallest == Subnet((0, 1, 2, 3), 1.0)
    with pytest.raises(UsageError, match="--min_num_layer"):
        SandwichSampler(em, 2, 1, (1.0,), masks, depth_flag="--min_num_layer")  # the strategy has no 2 layers


@pytest.mark.parametrize("widths, num_random, depth", [
    ((1.0, 0.875, 0.75), 2, True),  # the paper's case: fewer random subnets than widths
    ((1.0, 0.875, 0.75), 3, True),
    ((1.0, 0.875), 5, True),  # more random subnets than widths: widths come round again, pairs never repeat
    ((1.0,), 3, True),  # depth only: 3 random subnets among the 3 depths
    ((1.0, 0.875, 0.75), 3, False),  # width only
])
def test_sandwich_random_subnets_are_drawn_without_replacement(widths, num_random, depth):
    """No random subnet repeats within a step; while there are enough widths their widths differ (the paper
    draws widths without replacement), and every width and depth still comes up."""
    model = tiny_model("gqa", layers=6)
    em = make_elastic(model)
    masks = {1: [1, 1, 1, 1, 0, 1], 2: [1, 1, 0, 1, 0, 1], 3: [1, 0, 0, 1, 0, 1]}
    s = SandwichSampler(em, 3, num_random, widths, masks, elastic_depth=depth)
    assert s.num_drawn == num_random
    seen = set()
    for step in range(60):
        randoms = [sub for role, sub in s.sample(step_rng(0, step, step % 3)) if role.startswith("random")]
        assert len(randoms) == num_random and len(set(randoms)) == num_random, randoms
        if num_random <= len(widths):
            assert len({sub.width for sub in randoms}) == num_random
        seen.update(randoms)
    assert {sub.width for sub in seen} == set(widths)
    assert {sub.num_layers for sub in seen} == ({3, 4, 5} if depth else {6})


def test_sandwich_draw_with_fewer_candidates_than_asked_trains_each_once(caplog):
    """Width-only elasticity with 3 widths and 5 random subnets asked: every step trains the 3 candidates once,
    and a warning says so at start-up."""
    em = make_elastic(tiny_model("gqa", layers=6))
    with caplog.at_level("WARNING", logger="amoeba.training"):
        s = SandwichSampler(em, 3, 5, (1.0, 0.875, 0.75), None, elastic_depth=False)
    assert s.num_drawn == 3 and "only 3 distinct random subnets" in caplog.text
    for step in range(5):
        plan = s.sample(step_rng(1, step, 0))
        assert [r for r, _ in plan] == ["largest", "random1", "random2", "random3", "smallest"]
        assert sorted(sub.width for _, sub in plan[1:-1]) == [0.75, 0.875, 1.0]


def test_sandwich_draw_depends_only_on_seed_and_step():
    """The plan of a micro-batch is a function of (--seed, global step, micro-batch) only: two samplers built
    as two processes would (each its own model, other global RNG states) draw the same subnets, and another
    seed or step draws others."""
    import random

    masks = {1: [1, 1, 1, 1, 0, 1], 2: [1, 1, 0, 1, 0, 1], 3: [1, 0, 0, 1, 0, 1]}
    plans = []
    for rank in range(2):
        random.seed(rank)
        np.random.seed(100 + rank)
        torch.manual_seed(200 + rank)
        s = SandwichSampler(make_elastic(tiny_model("gqa", layers=6, seed=rank)), 3, 2, (1.0, 0.875, 0.75, 0.625),
                            masks)
        torch.rand(rank + 1), np.random.rand(rank + 1)  # the processes' global RNGs drift apart
        plans.append([s.sample(step_rng(42, step, micro)) for step in range(20) for micro in range(2)])
    assert plans[0] == plans[1]
    other_seed = [s.sample(step_rng(43, step, micro)) for step in range(20) for micro in range(2)]
    assert other_seed != plans[0]
    assert len({tuple(p) for p in plans[0]}) > 10


def test_balancing_scales_each_loss_to_the_largest():
    losses = [torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True),
              torch.tensor(1.0, requires_grad=True)]
    reference = losses[0].detach()
    out = [losses[0]] + [balanced(loss, loss.detach(), reference) for loss in losses[1:]]
    assert [float(v.detach()) for v in out] == [2.0, 2.0, 2.0]
    sum(out).backward()
    assert [float(x.grad) for x in losses] == [1.0, 0.5, 2.0]  # factor 2/l, detached
    zero = torch.tensor(0.0, requires_grad=True)  # a zero loss stays zero: the factor is bounded, not inf
    assert float(balanced(zero, zero.detach(), reference).detach()) == 0.0


@pytest.mark.parametrize("distill_full", [False, True])
def test_output_matrix_runs_only_where_targets_are_with_the_same_gradients(tiny_dir, tmp_path, distill_full):
    """The training step asks the model for the logits of the answer positions only (``logits_to_keep``): the
    output matrix sees fewer rows than the sequence has, and every adapter gradient is bitwise the one of logits
    at every position (fp32), for a sandwich and for a fixed shape distilled from the full model."""
    extra = (("--train_num_layer", "4", "--train_num_width", "0.75", "--train_distill_full", "True")
             if distill_full else ())
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, "--kd_weight", "0.5", "--use_moe_lora",
                                     "--moe_num_expert", "3", "--moe_topk", "2", *extra)
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    assert trainer.logits_at_targets
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, ad in adapted_modules(model):
            ad.lora_B.normal_(0, 0.05, generator=g)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[1]))
    model.train()
    grads, losses = [], []
    for only_needed in (True, False):
        trainer.logits_at_targets = only_needed
        trainer._micro_step = (-1, 0)
        losses.append(float(trainer.training_step(model, dict(batch))))
        grads.append({k: v.grad.clone() for k, v in adapter_state_dict(model).items() if v.grad is not None})
        model.zero_grad()
    hook.remove()
    seq = batch["input_ids"].shape[1]
    passes = len(rows) // 2
    assert all(r < seq - 1 for r in rows[:passes]) and all(r == seq for r in rows[passes:])
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


@pytest.mark.parametrize("checkpointing", ["False", "True"])
def test_training_step_order_distillation_and_balancing(tiny_dir, tmp_path, checkpointing):
    """One micro-batch: forward/backward alternate per subnet, in sandwich order, and the gradients equal
    those of sum(balanced losses) computed by hand (kd_weight 0.5 mixes soft CE and label CE); the same
    with activation checkpointing on (MoE router included)."""
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, "--kd_weight", "0.5",
                                     "--gradient_checkpointing", checkpointing, "--use_moe_lora",
                                     "--moe_num_expert", "3", "--moe_topk", "2")
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, ad in adapted_modules(model):
            ad.lora_B.normal_(0, 0.05, generator=g)
    plan = [("largest", Subnet(tuple(range(6)), 1.0)), ("random1", Subnet((0, 1, 2, 4, 5), 0.75)),
            ("smallest", trainer.sampler.smallest)]
    trainer.fixed_plan = plan
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    events = []
    h1 = em.decoder.register_forward_pre_hook(lambda m, a: events.append(("F", em.subnet)))
    h2 = model.lm_head.register_full_backward_hook(lambda m, gi, go: events.append(("B", em.subnet)))
    model.train()
    loss = trainer.training_step(model, dict(batch))
    h1.remove(), h2.remove()
    assert [(e, sub) for e, sub in events] == [(e, sub) for _, sub in plan for e in ("F", "B")]
    got = {k: v.grad.clone() for k, v in adapter_state_dict(model).items()}
    model.zero_grad()

    labels = batch["labels"]
    keep = labels[:, 1:] != -100
    values = []
    for i, (_, sub) in enumerate(plan):
        get_router(model).noise_seed = router_noise_seed(args.train.seed, 0, 0, i)  # the step's noise
        with em.use(sub):  # backward inside: checkpointed layers recompute in this subnet
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            student = logits[:, :-1][keep].float()
            ce = F.cross_entropy(student, labels[:, 1:][keep])
            if i == 0:
                teacher = torch.softmax(student.detach(), -1)
                value = ce
                term = ce
            else:
                kd = -(teacher * F.log_softmax(student, -1)).sum(-1).mean()
                value = 0.5 * kd + 0.5 * ce
                term = value * (values[0].detach() / value.detach())  # balanced to the largest's loss
            values.append(value)
            term.backward()
    assert abs(float(loss) - float(values[0])) < 1e-5
    want = {k: v.grad for k, v in adapter_state_dict(model).items()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7)
    assert all(want[k].abs().sum() > 0 for k in want)


def test_short_sandwich_run_lowers_the_loss_of_largest_and_smallest(tiny_dir, tmp_path):
    torch.manual_seed(0)  # the adapters' initial values, whatever ran before in this process
    # lr 1e-2: at 2e-2 the largest subnet's loss spikes mid-run and ends only ~0.36 lower (drops here: ~0.9 / ~0.6)
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, "--max_steps", "40",
                                     "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
                                     "--warmup_ratio", "0", "--use_moe_lora", "--moe_num_expert", "3",
                                     "--moe_topk", "2")
    from amoeba.instruct_data import make_data_module
    from amoeba.stages.finetuning import instruction_data

    data = make_data_module(tok, instruction_data(args))
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(16)])
    sampler = SandwichSampler(em, 3, 0, args.width_choice, s.layer_masks)

    def losses():
        out = []
        model.eval()
        with torch.no_grad():
            for sub in (sampler.largest, sampler.smallest):
                with em.use(sub):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                keep = batch["labels"][:, 1:] != -100
                out.append(float(F.cross_entropy(logits[:, :-1][keep], batch["labels"][:, 1:][keep])))
        return out

    before = losses()
    run_training(args, model, tok, em, s)
    after = losses()
    print("loss before", before, "after", after)
    # drops measured: ~0.9 / ~0.6 until 2026-12-02; 0.27 / 0.43 with the packages installed on 2026-12-03 (the same
    # drop at the previous commit, so a package's change, not this code's; not yet traced)
    assert after[0] < before[0] - 0.2 and after[1] < before[1] - 0.2, (before, after)
    out = tmp_path / "o"
    log = json.loads((out / "training_log.json").read_text())
    roles = {k for row in log for k in row if k.startswith("loss_")}
    assert roles == {"loss_largest", "loss_random1", "loss_random2", "loss_smallest"}
    assert (out / "loss_curve.png").stat().st_size > 1000
    md = (out / "train_results.md").read_text()
    assert "train loss, smallest" in md and "tokens_per_second" in md
    assert (out / "adapter_model" / "adapter_model.safetensors").is_file()
    assert not model.training and em.subnet == em.full_subnet()


def test_moe_mix_flag_sets_how_the_router_mixes(tiny_dir, tmp_path):
    """--moe_mix reaches the router of the model Stage 2 trains ("auto" by default: the plain product on the CPU);
    the flag's choices are the router's ways of mixing; an unknown one is one line naming the flag."""
    from amoeba.adapters import MIX_METHODS, set_expert_mix
    from amoeba.args import build_parser

    moe = ("--use_moe_lora", "--moe_num_expert", "3", "--moe_topk", "2")
    for extra, want in (((), "auto"), (("--moe_mix", "elementwise"), "elementwise")):
        args, model, tok, em, s = _setup(tiny_dir, tmp_path / want, *SANDWICH, *moe, *extra)
        trainer, _ = prepare_trainer(args, model, tok, em, s)
        router = get_router(trainer.model)
        assert router.mix == want
        assert router.mix_method(torch.device("cpu")) == ("product" if want == "auto" else want)
    with pytest.raises(UsageError, match="--moe_mix"):
        parse_args(["--moe_mix", "fast"])
    action = next(a for a in build_parser()._actions if "--moe_mix" in a.option_strings)
    assert sorted(action.choices) == sorted(MIX_METHODS + ("auto",))
    with pytest.raises(ValueError, match="unknown expert mix"):
        set_expert_mix(model, "fast")


def test_plain_lora_without_shrinking_trains_only_the_full_model(tiny_dir, tmp_path):
    args, model, tok, em, _ = _setup(tiny_dir, tmp_path / "o", "--max_steps", "2", strategy=False)
    seen = []
    em.decoder.register_forward_pre_hook(lambda m, a: seen.append(em.subnet) if m.training else None)
    run_training(args, model, tok, em, None)
    assert seen and all(sub == em.full_subnet() for sub in seen)
    assert "amoeba_router" not in dict(model.named_children())


def test_fixed_subnet_training_updates_only_that_shape_and_loads_back(tiny_dir, tmp_path):
    out = tmp_path / "o"
    args, model, tok, em, s = _setup(tiny_dir, out, *SANDWICH, "--max_steps", "3", "--train_num_layer", "4",
                                     "--train_num_width", "3/4", "--learning_rate", "1e-2",
                                     "--adapter_snapshot_steps", "2")
    want = Subnet.from_mask(s.layer_masks[2], 0.75)
    seen = []
    em.decoder.register_forward_pre_hook(lambda m, a: seen.append(em.subnet) if m.training else None)
    run_training(args, model, tok, em, s)
    assert seen and all(sub == want for sub in seen), {x.label for x in seen}
    sd = adapter_state_dict(model)
    dropped = sorted(set(range(6)) - set(want.layers))
    for i in range(6):  # lora_B starts at zero: only the kept layers' adapters moved
        moved = bool(sd[f"layers.{i}.q_proj.lora_B"].abs().sum() > 0)
        assert moved == (i not in dropped), (i, dropped)
    # the step-2 snapshot holds the adapters after step 2: not the final ones, but on the way there
    from safetensors.torch import load_file

    snap = load_file(out / "adapter_model-step2" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model" / "adapter_model.safetensors")
    key = next(k for k in final if k.endswith("q_proj.lora_B") and final[k].abs().sum() > 0)
    assert snap[key].abs().sum() > 0 and not torch.equal(snap[key], final[key])
    # --adapter_dir reads them for evaluation from anywhere; a folder without adapters is refused
    ev = _main("--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(tmp_path / "ev"),
               "--do_train", "False", "--adapter_dir", str(out / "adapter_model"), "--do_eval_wikitext2", "False",
               "--do_mmlu_eval", "False", "--report_to", "none", "--export_dir", str(tmp_path / "exp"),
               *SANDWICH, "--shrinking_file", str(tiny_dir / "dp_selection_strategy.npy"),
               "--eval_num_layer", "4", "--eval_num_width", "3/4")
    assert ev.returncode == 0, ev.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    # per-layer widths (FLAP global): the exact export carries its modeling file
    assert (tmp_path / "exp" / "modeling_amoeba.py").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", dtype=torch.float32,
                                                    trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad(), em.use(want):
        ref = model(input_ids=ids).logits
    with torch.no_grad():
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
    _assert_exit_2(_main("--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(tmp_path / "e2"),
                         "--do_train", "False", "--adapter_dir", str(tmp_path), "--report_to", "none"),
                   "--adapter_dir")
    _assert_exit_2(_main(*_flags(tiny_dir, tmp_path / "o3", "--max_steps", "1"), *SANDWICH, "--shrinking_file",
                         str(tiny_dir / "dp_selection_strategy.npy"), "--train_num_layer", "4",
                         "--train_num_width", "1/2"), "--train_num_width")


@pytest.mark.parametrize("checkpointing", ["False", "True"])
def test_fixed_shape_distillation_from_the_full_model(tiny_dir, tmp_path, checkpointing):
    """--train_distill_full: the frozen full model (every layer, full width, adapters off) runs first without
    gradient; the fixed subnet's loss is kd_weight x soft CE to it + (1 - kd_weight) x label CE, and its
    gradients equal a reference whose teacher is the plain Hugging Face model loaded from the folder."""
    from transformers import AutoModelForCausalLM

    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, "--train_num_layer", "4",
                                     "--train_num_width", "3/4", "--train_distill_full", "True", "--kd_weight",
                                     "0.5", "--use_moe_lora", "--moe_num_expert", "3", "--moe_topk", "2",
                                     "--gradient_checkpointing", checkpointing)
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    fixed = Subnet.from_mask(s.layer_masks[2], 0.75)
    assert trainer.fixed_plan == [("largest", fixed)] and trainer.distill_full
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, ad in adapted_modules(model):
            ad.lora_B.normal_(0, 0.05, generator=g)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    forwards, adapter_calls = [], []

    def attached():  # adapters on the projections of all 6 layers, kept or not
        return sum("amoeba_adapter" in m._modules for i in range(6) for m in em.projections(i).values())

    hooks = [em.decoder.register_forward_pre_hook(
        lambda m, a: forwards.append((em.subnet, torch.is_grad_enabled(), attached())))]
    hooks += [ad.register_forward_hook(lambda *a: adapter_calls.append(len(forwards)))
              for _, _, ad in adapted_modules(model)]
    model.train()
    loss = trainer.training_step(model, dict(batch))
    for h in hooks:
        h.remove()
    # teacher: full model, no gradient, no adapter attached or called; then the student with its adapters
    assert forwards[0] == (em.full_subnet(), False, 0)
    assert forwards[1:] == [(fixed, True, 42)]
    assert adapter_calls and min(adapter_calls) == 2
    assert attached() == 42 and not get_router(model).suspended
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # the base stays frozen
    got = {k: v.grad.clone() for k, v in adapter_state_dict(model).items() if v.grad is not None}
    model.zero_grad()

    labels = batch["labels"]
    keep = labels[:, 1:] != -100
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        teacher = torch.softmax(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                .logits[:, :-1][keep].float(), -1)
    get_router(model).noise_seed = router_noise_seed(args.train.seed, 0, 0, 0)
    with em.use(fixed):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = logits[:, :-1][keep].float()
        kd = -(teacher * F.log_softmax(student, -1)).sum(-1).mean()
        want_loss = 0.5 * kd + 0.5 * F.cross_entropy(student, labels[:, 1:][keep])
        want_loss.backward()
    assert abs(float(loss) - float(want_loss)) < 1e-5, (float(loss), float(want_loss))
    want = {k: v.grad for k, v in adapter_state_dict(model).items() if v.grad is not None}
    assert got.keys() == want.keys() and any(k.startswith("router.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7)


def test_fixed_shape_distillation_run_and_bad_flags(tiny_dir, tmp_path):
    """A short --train_distill_full run through main.py writes adapters; nonsense combinations exit 2 with one
    line naming the flag."""
    strat = ["--shrinking_file", str(tiny_dir / "dp_selection_strategy.npy")]
    fixed = ["--train_num_layer", "4", "--train_num_width", "3/4"]
    run = _main(*_flags(tiny_dir, tmp_path / "o", "--max_steps", "2"), *SANDWICH, *strat, *fixed,
                "--train_distill_full", "True")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "o" / "adapter_model" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "o" / "train_results.json").read_text())["distilled_from_full_model"] is True
    assert "distilled from the frozen full model" in (tmp_path / "o" / "train_results.md").read_text()
    base = _flags(tiny_dir, tmp_path / "bad", "--max_steps", "1")
    _assert_exit_2(_main(*base, *SANDWICH, *strat, "--train_distill_full", "True"),
                   "--train_distill_full", "--train_num_layer")
    _assert_exit_2(_main(*base, *SANDWICH, *strat, *fixed, "--train_distill_full", "--distill_method", "none"),
                   "--train_distill_full", "--distill_method")
    _assert_exit_2(_main(*base, *SANDWICH, *strat, *fixed, "--train_distill_full", "--kd_weight", "0"),
                   "--train_distill_full", "--kd_weight")


# ----------------------------------------------------------------------------------------------
# Faults: NaN, bad input, SIGKILL + resume
# ----------------------------------------------------------------------------------------------
class _Poison:
    """Callbacks that make chosen optimizer steps non-finite: NaN gradients, or a NaN loss (a forward hook that
    turns the first decoder layer's output into NaN while the step runs)."""

    @staticmethod
    def gradients(steps):
        from transformers import TrainerCallback

        class Gradients(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if state.global_step + 1 in steps:
                    adapted_modules(model)[0][2].lora_A.grad.fill_(float("nan"))

        return Gradients()

    @staticmethod
    def loss(steps, model):
        from transformers import TrainerCallback

        from amoeba.elastic import find_decoder

        layer = find_decoder(model).layers[0]
        on = {"now": False}

        def hook(module, args, output):
            if on["now"]:
                return (output[0] * float("nan"), *output[1:]) if isinstance(output, tuple) else output * float("nan")
            return output

        layer.register_forward_hook(hook)

        class Loss(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                on["now"] = state.global_step + 1 in steps

            def on_step_end(self, args, state, control, **kwargs):
                on["now"] = False

        return Loss()


def _snapshot(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["gradients", "loss"])
def test_a_non_finite_step_is_skipped_when_allowed_and_changes_nothing(tiny_dir, tmp_path, kind, caplog):
    """--max_skipped_steps 1: step 2's NaN gradients (or NaN loss) are not applied: the adapters after step 2 are
    bitwise those after step 1, step 3 trains on, the run ends finite and lists the skipped step."""
    out = tmp_path / "o"
    args, model, tok, em, s = _setup(tiny_dir, out, *SANDWICH, "--max_steps", "3", "--max_skipped_steps", "1",
                                     "--adapter_snapshot_steps", "1,2,3")
    poison = _Poison.gradients({2}) if kind == "gradients" else _Poison.loss({2}, model)
    with caplog.at_level("WARNING", logger="amoeba.training"):
        run_training(args, model, tok, em, s, callbacks=[poison])
    one, two, three = (_snapshot(out / f"adapter_model-step{n}") for n in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(two[k], three[k]) for k in two)
    assert all(torch.isfinite(v).all() for v in three.values())
    results = json.loads((out / "train_results.json").read_text())
    assert results["skipped_steps"] == [2]
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(said) == 1 and "step 2 skipped (1 of --max_skipped_steps 1)" in said[0] and "subnets l6w1" in said[0]
    assert ("lora_A" in said[0]) if kind == "gradients" else ("loss nan (largest subnet l6w1)" in said[0])


def test_non_finite_steps_beyond_the_allowance_stop_and_name_the_tensor(tiny_dir, tmp_path):
    out = tmp_path / "o"
    args, model, tok, em, s = _setup(tiny_dir, out, *SANDWICH, "--max_steps", "4", "--max_skipped_steps", "1",
                                     "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1")
    with pytest.raises(TrainingDiverged) as err:
        run_training(args, model, tok, em, s, callbacks=[_Poison.gradients({2, 3})])
    msg = str(err.value)
    assert "non-finite gradients in" in msg and "lora_A" in msg and "at step 3" in msg
    assert "--max_skipped_steps (now 1)" in msg and "checkpoint-2" in msg and "--resume_training" in msg
    assert not (out / "checkpoint-3").exists()


@pytest.mark.parametrize("allow", [False, True])
def test_training_attention_leaves_out_cudnn_unless_allowed(tiny_dir, tmp_path, allow):
    """Every training forward sees SDPA's cuDNN backend off (its backward's NaN gradients with a padding mask),
    the other kernels on; --cudnn_attention leaves it on; either way the setting is as before afterwards."""
    extra = ["--cudnn_attention"] if allow else []
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, "--max_steps", "2", *extra)
    seen = []

    def record(module, inputs):
        cuda = torch.backends.cuda
        seen.append((cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                     cuda.math_sdp_enabled()))

    before = torch.backends.cuda.cudnn_sdp_enabled()
    handle = model.register_forward_pre_hook(record)
    try:
        run_training(args, model, tok, em, s)
    finally:
        handle.remove()
    assert len(seen) >= 2 * 4  # two steps of four subnets
    assert set(seen) == {(allow and before, True, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_negative_skip_allowance_is_a_usage_error(tiny_dir, tmp_path):
    with pytest.raises(UsageError, match="--max_skipped_steps: -1 must be at least 0"):
        parse_args(_flags(tiny_dir, tmp_path, "--max_skipped_steps", "-1"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_dir, tmp_path):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            if state.global_step == 2:  # after checkpoint-2 is complete
                with torch.no_grad():
                    adapted_modules(model)[0][2].lora_A.fill_(float("nan"))

    out = tmp_path / "o"
    args, model, tok, em, s = _setup(tiny_dir, out, *SANDWICH, "--max_steps", "5", "--save_strategy", "steps",
                                     "--save_steps", "1", "--save_total_limit", "1")
    with pytest.raises(TrainingDiverged) as err:
        run_training(args, model, tok, em, s, callbacks=[Poison()])
    msg = str(err.value)
    assert "nan" in msg and "step 3" in msg and "checkpoint-2" in msg and "--resume_training" in msg
    assert isinstance(err.value, UsageError)
    ckpt = last_complete_checkpoint(out)
    assert ckpt is not None and ckpt.name == "checkpoint-2" and not (out / "checkpoint-3").exists()
    fresh = tiny_model("gqa", layers=6)
    load_adapters(fresh, make_elastic(fresh), ckpt / "adapter_model")
    assert all(torch.isfinite(v).all() for v in adapter_state_dict(fresh).values())


def test_validation_of_strategy_and_widths(tiny_dir, tmp_path, monkeypatch):
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH)
    other = tiny_model("gqa", layers=4)
    with pytest.raises(UsageError, match="--shrinking_file.*6 layers.*4"):
        validate_training_setup(args, make_elastic(other), s)
    args2, model2, tok2, em2, s2 = _setup(tiny_dir, tmp_path / "o2", *SANDWICH[:-1], "[1,1/2]", strategy=False)
    with pytest.raises(UsageError, match="--width_choice.*0.5"):
        validate_training_setup(args2, em2, types.SimpleNamespace(layer_masks=s.layer_masks))
    args3, *_ = _setup(tiny_dir, tmp_path / "o3", "--full_finetune", strategy=False)
    with pytest.raises(UsageError, match="--full_finetune"):
        validate_training_setup(args3, em, None)
    # --padding_free where transformers cannot keep packed examples apart: refused, never trained across examples
    import amoeba.stages.finetuning as finetuning

    args4, *_ = _setup(tiny_dir, tmp_path / "o4", "--padding_free", "True", strategy=False)
    validate_training_setup(args4, em, None)  # this transformers can
    monkeypatch.setattr(finetuning, "packed_sequences_supported", lambda: False)
    with pytest.raises(UsageError, match=r"^--padding_free: transformers .* cannot mask examples packed into one row"):
        validate_training_setup(args4, em, None)


def _run_main(*argv, env_extra=None, wait=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    cmd = [sys.executable, str(ROOT / "main.py"), *argv]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _main(*argv) -> types.SimpleNamespace:
    """main.py in this process (fast: no interpreter start-up); returns returncode and stderr."""
    import contextlib
    import io

    from main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


_assert_exit_2 = assert_usage_error  # exit 2, no traceback, one "error:" line holding every needle


def test_bad_inputs_exit_2(tiny_dir, tmp_path):
    base = _flags(tiny_dir, tmp_path / "o", "--max_steps", "1")
    strat = ["--shrinking_file", str(tiny_dir / "dp_selection_strategy.npy")]
    _assert_exit_2(_main(*base, *SANDWICH, "--shrinking_file", str(tmp_path / "none.npy")),
                   "--shrinking_file", "none.npy")
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, _strategy_dict(tiny_model("gqa", layers=4)))
    _assert_exit_2(_main(*base, *SANDWICH, "--shrinking_file", str(foreign)), "--shrinking_file", "layers")
    _assert_exit_2(_main(*base, *SANDWICH[:-1], "[1,1/2]", *strat), "--width_choice", "0.5")
    _assert_exit_2(_main(*base, *SANDWICH, *strat, "--use_moe_lora", "--moe_num_expert", "2",
                             "--moe_topk", "3"), "--moe_topk")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = _flags(tiny_dir, tmp_path / "o2", "--max_steps", "1")
    bad[bad.index("--dataset") + 1] = str(empty)
    _assert_exit_2(_main(*bad), "--dataset", "empty.jsonl", "is empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "w1", "output": "w2"}\n{"instruction": "w1", "output": \n')
    bad[bad.index("--dataset") + 1] = str(broken)
    _assert_exit_2(_main(*bad), "broken.jsonl", "line 2")
    if not torch.cuda.is_available():
        _assert_exit_2(_main(*base, "--bits", "4"), "--bits", "CUDA")
    _assert_exit_2(_main(*base, *SANDWICH, *strat, "--fsdp", "full_shard auto_wrap"), "--fsdp", "torchrun")


def test_killed_or_stopped_run_resumes_to_the_same_adapters(tiny_dir, tmp_path):
    """SIGKILL after a checkpoint, then --resume_training: the final adapters equal an uninterrupted run's
    (same seed) to 1e-6. SIGTERM instead: the run finishes its step, writes a checkpoint at that very step, exits
    143 with one line, and resumes to the same adapters too."""
    flags = [*SANDWICH, "--shrinking_file", str(tiny_dir / "dp_selection_strategy.npy"), "--use_moe_lora",
             "--moe_num_expert", "3", "--moe_topk", "2", "--max_steps", "10", "--save_strategy", "steps",
             "--save_steps", "3", "--save_total_limit", "2", "--gradient_accumulation_steps", "2",
             "--per_device_train_batch_size", "2", "--group_by_length", "True", "--learning_rate", "3e-3",
             "--seed", "11", "--data_seed", "5"]
    full = _main(*_flags(tiny_dir, tmp_path / "full", *flags))
    assert full.returncode == 0, full.stderr[-3000:]
    from safetensors.torch import load_file

    reference = load_file(str(tmp_path / "full" / "adapter_model" / "adapter_model.safetensors"))
    assert max(float(reference[k].abs().max()) for k in reference if k.endswith("lora_B")) > 1e-4  # moved

    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / sig.name
        proc = _run_main(*_flags(tiny_dir, out, *flags), wait=False)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoint-3" / "trainer_state.json").is_file():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read()[-2000:]
        proc.send_signal(sig)
        stderr = proc.communicate(timeout=300)[1]
        assert not (out / "adapter_model").exists()
        ckpt = last_complete_checkpoint(out)
        assert ckpt is not None and int(ckpt.name.split("-")[1]) < 10
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
            step = int(ckpt.name.split("-")[1])
            assert f"stopped: SIGTERM at step {step} of 10" in stderr and "Traceback" not in stderr
            state = json.loads((ckpt / "trainer_state.json").read_text())
            assert state["global_step"] == step

        again = _main(*_flags(tiny_dir, out, *flags))  # without --resume_training: refuses to overwrite
        _assert_exit_2(again, "--resume_training")
        resumed = _run_main(*_flags(tiny_dir, out, *flags, "--resume_training"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from {ckpt}" in resumed.stderr

        b = load_file(str(out / "adapter_model" / "adapter_model.safetensors"))
        assert reference.keys() == b.keys()
        # the token count goes on from the checkpoint's: the whole run's, as without the interruption
        tokens = [json.loads((o / "train_results.json").read_text())["tokens_seen"] for o in (tmp_path / "full", out)]
        assert tokens[0] == tokens[1] > 0, tokens
        moved = max(float((reference[k] - b[k]).abs().max()) for k in reference)
        assert moved <= 1e-6, (sig.name, moved)


# ----------------------------------------------------------------------------------------------
# The seed README's Stage 2 commands, verbatim, on the tiny folder
# ----------------------------------------------------------------------------------------------
SEED_LLAMA2 = (
    "--model_name_or_path meta-llama/Llama-2-7b-hf --output_dir ./output/ft --dataset alpaca-gpt4 --use_auth_token "
    "--do_train True --do_eval True --do_mmlu_eval True --do_eval_wikitext2 True --lora_modules all --fp16 "
    "--source_max_len 384 --target_max_len 128 --gradient_accumulation_steps 4 --logging_steps 10 --max_steps 10000 "
    "--save_strategy steps --data_seed 42 --save_steps 1000 --save_total_limit 1 --evaluation_strategy steps "
    "--eval_dataset_size 1024  --max_eval_samples 1000 --eval_steps 1000 --optim paged_adamw_32bit "
    "--ddp_find_unused_parameters --enable_shrinking --kd_weight 1 --min_num_layer 20 --random_sample_num_layer 2 "
    "--distill_method sp --shrinking_method calib_dp --shrinking_file dp_selection_strategy.npy --shrinkable_width "
    "--width_choice [1,7/8,3/4,5/8] --prune_width_method flap --use_moe_lora --moe_num_expert 5 --moe_topk 2")
SEED_LLAMA31 = (
    "--model_name_or_path meta-llama/Meta-Llama-3.1-8B --output_dir ./output/ft --dataset alpaca-gpt4 "
    "--use_auth_token --do_train True --do_eval True --do_mmlu_eval True --do_eval_wikitext2 True --lora_modules all "
    "--fp16 --source_max_len 384 --target_max_len 128 --gradient_accumulation_steps 4 --logging_steps 10 "
    "--max_steps 10000 --save_strategy steps --data_seed 42 --save_steps 1000 --save_total_limit 1 "
    "--evaluation_strategy steps --eval_dataset_size 1024  --max_eval_samples 1000 --eval_steps 1000 "
    "--optim paged_adamw_32bit --ddp_find_unused_parameters --enable_shrinking --kd_weight 1 --min_num_layer 20 "
    "--random_sample_num_layer 2 --distill_method sp --shrinking_method calib_dp "
    "--shrinking_file dp_selection_strategy.npy")


@pytest.mark.parametrize("command", [SEED_LLAMA2, SEED_LLAMA31], ids=["llama2-width-moe", "llama31-depth"])
def test_seed_stage2_commands_run_on_a_tiny_folder(command, tiny_dir, tmp_path):
    """The seed's flags as written; only the model, paths, depth floor and sizes are made tiny (later flags
    override earlier ones); the evaluation stage is limited to a few MMLU questions."""
    argv = command.split()
    argv[argv.index("--model_name_or_path") + 1] = str(tiny_dir / "model")
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "ft")
    argv[argv.index("--shrinking_file") + 1] = str(tiny_dir / "dp_selection_strategy.npy")
    small = ["--min_num_layer", "3", "--max_steps", "2", "--source_max_len", "32", "--target_max_len", "16",
             "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2", "--save_steps", "1",
             "--eval_steps", "2", "--eval_dataset_size", "8", "--max_eval_samples", "8", "--max_train_samples", "32",
             "--do_eval_wikitext2", "False", "--max_mmlu_samples", "4", "--mmlu_source_max_len", "64"]
    os.environ.setdefault("AMOEBA_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    proc = _main(*argv, *small)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "ft"
    cfg = json.loads((out / "adapter_model" / "adapter_config.json").read_text())
    results = json.loads((out / "train_results.json").read_text())
    assert results["sandwich"] == ["largest", "random1", "random2", "smallest"]
    assert "eval_loss" in results and np.isfinite(results["eval_loss"])
    if "--use_moe_lora" in argv:
        assert cfg["num_experts"] == 5 and cfg["topk"] == 2 and cfg["widths"] == [1.0, 0.875, 0.75, 0.625]
    else:
        assert cfg["num_experts"] == 1 and not cfg["use_router"]
    assert sorted(cfg["modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    assert last_complete_checkpoint(out).name == "checkpoint-2"


def _4bit_elastic(tiny_dir, args):
    """The tiny model on a bitsandbytes NF4 base (double quant; bitsandbytes runs it on the CPU too), elastic, with
    the tiny strategy applied at ``args``' widths: (model, elastic model, strategy). Skipped without bitsandbytes."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from amoeba.strategy import apply_strategy, load_strategy

    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", quantization_config=qconfig, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    em = make_elastic(model)
    assert not em.sliceable  # packed weights: widths by masks
    s = load_strategy(tiny_dir / "dp_selection_strategy.npy")
    apply_strategy(em, s, args.width_choice)
    return model, em, s


def test_4bit_base_model_trains_with_masked_widths(tiny_dir, tmp_path):
    """A bitsandbytes NF4 base (double quant; bitsandbytes runs it on the CPU too): k-bit preparation, masked
    widths, gradient checkpointing and the Trainer's quantized-model check all work, and the loss drops."""
    args = parse_args(_flags(tiny_dir, tmp_path / "o", *SANDWICH, "--max_steps", "12", "--learning_rate", "2e-2",
                             "--gradient_checkpointing", "True", "--use_moe_lora", "--moe_num_expert", "3",
                             "--moe_topk", "2"))
    model, em, s = _4bit_elastic(tiny_dir, args)
    trainer, _ = prepare_trainer(args, model, _tokenizer(), em, s)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])

    def loss_of(sub):
        # Train mode with a deterministic router: bitsandbytes' CPU inference kernel (eval, no grad) repacks
        # weights and needs feature sizes divisible by 64, which this tiny model's MLP (96) is not.
        model.train()
        get_router(model).eval()
        with torch.no_grad(), em.use(sub):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"][:, 1:] != -100
        return float(F.cross_entropy(logits[:, :-1][keep].float(), batch["labels"][:, 1:][keep]))

    before = [loss_of(trainer.sampler.largest), loss_of(trainer.sampler.smallest)]
    trainer.train()
    after = [loss_of(trainer.sampler.largest), loss_of(trainer.sampler.smallest)]
    assert after[0] < before[0] - 0.2 and after[1] < before[1] - 0.2, (before, after)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_padding_free_batches_train_as_the_padded_ones(tiny_dir, tmp_path, monkeypatch):
    """--padding_free packs each micro-batch's examples end to end into rows (position ids restarting, attention
    masked per example, little padding computed). Six sandwich steps (MoE-LoRA, distillation, balancing) on examples of
    very different lengths give the padded run's losses for every subnet, to fp32 rounding, and count the same
    input tokens; padding these examples (a long prompt template) in batches of 4 computes 1.13x the real
    tokens."""
    rng = np.random.default_rng(1)
    rows = [{"instruction": " ".join(f"w{w}" for w in rng.integers(0, 60, rng.integers(1, 15))), "input": "",
             "output": " ".join(f"w{w}" for w in rng.integers(60, 90, rng.integers(1, 8)))} for _ in range(48)]
    data = tmp_path / "varied.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    logs, results, trained = {}, {}, {}
    evaluated_packed = []  # the collator the Trainer's evaluation sees: padded either way
    evaluate = transformers.Seq2SeqTrainer.evaluate

    def spy(self, *args, **kwargs):
        evaluated_packed.append(self.data_collator.padding_free)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Seq2SeqTrainer, "evaluate", spy)
    for mode, extra in (("padded", []), ("padding_free", ["--padding_free", "True"])):
        torch.manual_seed(0)
        args, model, tok, em, s = _setup(tiny_dir, tmp_path / mode, *SANDWICH, "--max_steps", "6",
                                         "--learning_rate", "1e-2", "--use_moe_lora", "--moe_num_expert", "3",
                                         "--moe_topk", "2", "--dataset", str(data), "--do_eval", "True",
                                         "--eval_dataset_size", "8", "--per_device_eval_batch_size", "4", *extra)
        assert args.train.padding_free == (mode == "padding_free")
        run_training(args, model, tok, em, s)
        trained[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
        logs[mode] = json.loads((tmp_path / mode / "training_log.json").read_text())
        results[mode] = json.loads((tmp_path / mode / "train_results.json").read_text())

    def losses(log):
        return [[row[k] for k in sorted(row) if k.startswith("loss")] for row in log if "loss" in row]

    padded, free = losses(logs["padded"]), losses(logs["padding_free"])
    assert len(padded) == 6 and len(padded[0]) == 5  # loss and the four roles, every step
    np.testing.assert_allclose(np.array(free), np.array(padded), rtol=2e-4)
    assert np.ptp(np.array(padded)[:, 0]) > 0.1  # the steps differ: not one number compared six times
    # the adapters after six optimizer steps (the logged losses are rounded; these are not)
    assert len(trained["padded"]) > 10 and trained["padded"].keys() == trained["padding_free"].keys()
    for name, value in trained["padded"].items():
        # atol: 1% of one Adam step at lr 1e-2 (near-zero gradients make Adam's step direction sensitive)
        torch.testing.assert_close(trained["padding_free"][name], value, rtol=1e-3, atol=1e-4)
    tokens = {m: r["tokens_seen"] for m, r in results.items()}
    assert tokens["padded"] == tokens["padding_free"] > 0, tokens
    assert 0 <= results["padding_free"]["padding_share"] <= results["padded"]["padding_share"] < 0.5
    # the held-out loss at the end (the Trainer's evaluation, padded batches of 4 either way)
    assert evaluated_packed == [False, False]
    assert results["padded"]["eval_loss"] == pytest.approx(results["padding_free"]["eval_loss"], rel=1e-4)
    # what padding would cost on these examples: batches of 4 in file order, padded tokens against real ones
    from amoeba.instruct_data import InstructionCollator, alpaca_prompt

    collate = InstructionCollator(tok, 64, 8)
    examples = [{"input": alpaca_prompt(r["instruction"]), "output": r["output"]} for r in rows]
    batches = [collate(examples[i:i + 4]) for i in range(0, 48, 4)]
    padded_tokens = sum(b["input_ids"].numel() for b in batches)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert padded_tokens > 1.1 * real_tokens, (padded_tokens, real_tokens)  # 2,024 against 1,785


def test_bench_padding_free_measures_the_padding_and_both_runs(tiny_dir, tmp_path):
    """scripts/bench_padding_free.py: the padding share of random batches of the data, and two short Stage 2 runs
    of main.py (padded, padding-free) with the same losses, their speeds and padding shares, in one json."""
    bench = load_script(ROOT / "scripts" / "bench_padding_free.py")
    out = tmp_path / "b.json"
    assert bench.main(["--model", str(tiny_dir / "model"), "--strategy", str(tiny_dir / "dp_selection_strategy.npy"),
                       "--dataset", str(tiny_dir / "data.jsonl"), "--batch", "4", "--source_max_len", "64",
                       "--target_max_len", "8", "--min_num_layer", "3", "--count_batches", "6", "--steps", "3",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    data = res["data"]
    assert data["batches"] == 6 and 0 < data["tokens"] <= data["positions"]
    assert data["mean_tokens_per_example"] == round(data["tokens"] / 24, 1)
    assert data["padding_share"] == round(1 - data["tokens"] / data["positions"], 4)
    runs = res["runs"]
    assert 0 <= runs["padding_free"]["padding_share"] <= runs["padded"]["padding_share"]
    assert runs["padded"]["tokens_seen"] == runs["padding_free"]["tokens_seen"] > 0
    assert "--padding_free True" in runs["padding_free"]["command"]
    assert set(runs["padded"]["losses"]) == {"largest", "random1", "random2", "smallest"}
    assert all(len(v) == 3 for v in runs["padded"]["losses"].values())
    assert max(res["comparison"]["max_relative_loss_difference"].values()) < 1e-3
    # a bad value: one line naming the flag, exit 2
    with pytest.raises(SystemExit) as err:
        bench.main(["--steps", "-1", "--out", str(out)])
    assert err.value.code == 2
