"""MMLU prompts (byte-exact against the seed's zero-shot file, five-shot from dev) and letter scoring."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amoeba.errors import UsageError
from amoeba.mmlu import answer_token_ids, load_mmlu, score_mmlu
from conftest import attach_trained_moe, tiny_model

DATA = Path(os.environ["AMOEBA_DATA_DIR"])


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_model_dir))


@pytest.fixture(scope="module")
def model():
    return tiny_model("gqa", layers=3, vocab_size=49152, max_position_embeddings=4096)


def test_zero_shot_val_prompts_match_the_seed_file_byte_for_byte():
    examples = load_mmlu("eval", 0, DATA)
    rows = [json.loads(line) for line in (DATA / "mmlu" / "zero_shot_mmlu_val.json").read_text().splitlines()]
    assert len(examples) == len(rows) == 1531
    for e, r in zip(examples, rows):
        assert e.prompt == r["input"]
        assert "ABCD"[e.answer] == r["output"]
        assert e.subject == r["subject"]


def test_five_shot_prompt_uses_the_subjects_dev_questions():
    zs = load_mmlu("test", 0, DATA)
    fs = load_mmlu("test", 5, DATA)
    assert len(zs) == len(fs) == 14042
    with open(DATA / "mmlu" / "dev" / "virology_dev.csv", newline="", encoding="utf-8") as f:
        dev = list(csv.reader(f))[1:]
    shots = "".join(f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {'ABCD'[int(ans)]}\n\n"
                    for q, a, b, c, d, ans in dev)
    header = "The following are multiple choice questions (with answers) about  virology.\n\n"
    pairs = [(z, f) for z, f in zip(zs, fs) if z.subject == "virology"]
    assert len(pairs) == 166
    for z, f in pairs:
        assert f.answer == z.answer
        assert f.prompt == header + shots + z.prompt[len(header):]
        assert f.prompt.count("\nAnswer: ") == 5 and f.prompt.endswith("\nAnswer:")


def test_literal_none_choices_survive_and_max_samples_truncates():
    test = load_mmlu("test", 0, DATA)
    nones = [(e.subject, line) for e in test for line in e.prompt.split("\n") if line[1:] == ". None"]
    # ten choices in the test CSVs are the literal string None (pandas' default would make them NaN)
    assert len(nones) == 10
    assert {s for s, _ in nones} == {"college_computer_science", "college_mathematics", "college_physics",
                                    "electrical_engineering"}
    first = load_mmlu("eval", 0, DATA, max_samples=7)
    assert [e.prompt for e in first] == [e.prompt for e in load_mmlu("eval", 0, DATA)[:7]]


def test_bad_split_and_shots_are_usage_errors():
    with pytest.raises(UsageError, match="--mmlu_split"):
        load_mmlu("train", 0, DATA)
    with pytest.raises(UsageError, match="--mmlu_dataset"):
        load_mmlu("eval", 3, DATA)


def test_answer_letters_are_the_tokens_that_follow_answer_colon(tokenizer):
    ids = answer_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]


def _reference(model, tokenizer, examples):
    """One example at a time, no padding, the full logits of a plain forward pass."""
    letters = answer_token_ids(tokenizer)
    rows = []
    with torch.no_grad():
        for e in examples:
            ids = tokenizer(tokenizer.bos_token + e.prompt, add_special_tokens=False, return_tensors="pt").input_ids
            rows.append(model(input_ids=ids).logits[0, -1, letters].float())
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_scoring_equals_unbatched_reference(model, tokenizer, side):
    examples = load_mmlu("eval", 0, DATA, max_samples=12)
    ref = _reference(model, tokenizer, examples)
    answers = torch.tensor([e.answer for e in examples])
    tokenizer.padding_side = side
    try:
        got = score_mmlu(model, tokenizer, examples, batch_size=5, progress=False)
    finally:
        tokenizer.padding_side = "right"
    assert got["predictions"] == ref.argmax(-1).tolist()
    assert got["loss"] == pytest.approx(F.cross_entropy(ref, answers).item(), abs=1e-5)
    micro = (ref.argmax(-1) == answers).float().mean().item()
    assert got["accuracy_micro"] == pytest.approx(micro)
    # qlora's headline number: the mean of per-subject accuracies
    per = {}
    for e, p in zip(examples, ref.argmax(-1).tolist()):
        per.setdefault(e.subject, []).append(p == e.answer)
    assert got["accuracy"] == pytest.approx(sum(sum(v) / len(v) for v in per.values()) / len(per))
    assert got["per_subject"].keys() == per.keys()


def test_scoring_is_deterministic_and_truncation_keeps_the_question_end(model, tokenizer):
    examples = load_mmlu("test", 5, DATA, max_samples=4)
    a = score_mmlu(model, tokenizer, examples, batch_size=2, max_len=64, progress=False)
    b = score_mmlu(model, tokenizer, examples, batch_size=3, max_len=64, progress=False)
    assert a["predictions"] == b["predictions"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # a 64-token window ends with the same tokens as the full prompt: the answer slot is kept
    from amoeba.mmlu import encode_prompts

    short = encode_prompts(tokenizer, [examples[0].prompt], 64)[0]
    full = encode_prompts(tokenizer, [examples[0].prompt], 10_000)[0]
    assert len(short) == 64 and short == full[-64:]


def test_answer_targets_are_the_letter_then_end_of_sequence(tokenizer):
    """The original code's MMLU labels: the answer letter as it follows ``Answer:`` and the EOS token."""
    from amoeba.mmlu import answer_target_ids

    letters = answer_token_ids(tokenizer)
    for answer in range(4):
        ids = answer_target_ids(tokenizer, answer)
        assert ids == [letters[answer], tokenizer.eos_token_id]
        assert tokenizer.decode(ids[:1]) == " " + "ABCD"[answer]


def test_split_names_and_the_reported_split_by_run_kind():
    from amoeba.args import parse_args
    from amoeba.mmlu import split_name

    assert [split_name(s) for s in ("eval", "val", "validation", "test", "dev", "train", None)] == \
        ["validation", "validation", "validation", "test", "dev", None, None]
    assert parse_args(["--do_train", "False"]).evaluation.mmlu_split == "test"  # evaluation: what papers report
    assert parse_args(["--do_train", "True"]).evaluation.mmlu_split == "eval"  # measured at the end of training
    assert parse_args(["--do_train", "False", "--mmlu_split", "eval"]).evaluation.mmlu_split == "eval"
    assert parse_args([]).calibration.calib_mmlu_split == "eval"  # calibration: validation, by default


def _three_subjects(n: int = 4):
    """Five-shot test prompts: ``n`` questions of each of three subjects."""
    picked, count = [], {}
    for e in load_mmlu("test", 5, DATA):
        if count.get(e.subject, 0) < n and (e.subject in count or len(count) < 3):
            count[e.subject] = count.get(e.subject, 0) + 1
            picked.append(e)
        if len(count) == 3 and all(v == n for v in count.values()):
            return picked
    raise AssertionError("fewer than three subjects")


def test_shared_prefix_batches_keep_one_subject_and_the_tokens_they_all_share(tokenizer):
    from amoeba.mmlu import encode_prompts, shared_prefix_batches

    examples = _three_subjects()
    encoded = encode_prompts(tokenizer, [e.prompt for e in examples], 2048)
    planned = shared_prefix_batches(encoded, [e.subject for e in examples], 3)
    assert sorted(i for _, b in planned for i in b) == list(range(len(examples)))
    for shared, batch in planned:
        assert len({examples[i].subject for i in batch}) == 1
        assert all(encoded[i][:shared] == encoded[batch[0]][:shared] for i in batch)
        assert all(len(encoded[i]) > shared for i in batch)  # the last token, whose logits are read, is left
        if len(batch) > 1:  # maximal: one more token would differ somewhere (or leave a prompt empty)
            assert (len({tuple(encoded[i][:shared + 1]) for i in batch}) > 1
                    or min(len(encoded[i]) for i in batch) == shared + 1)
        assert shared > 0.6 * min(len(encoded[i]) for i in batch)  # the header and five exemplars


@pytest.mark.parametrize("kind, subnet, moe", [("gqa", None, False), ("gqa", ((0, 2), 0.5), False),
                                              ("qwen2", ((1, 2), 0.75), False), ("qwen2", ((0, 2), 0.75), True)])
def test_prefix_cache_gives_the_uncached_letter_logits(tokenizer, kind, subnet, moe):
    """--mmlu_prefix_cache: the exemplars' tokens run once per batch as a KV cache; the letter logits equal the
    plain batched computation (fp32, 1e-5), on the whole model and on elastic subnets (skipped layers, sliced
    heads and channels), also with trained MoE-LoRA adapters and their shape router (how row (d) of the Qwen
    experiment is evaluated), so predictions and accuracy are the same."""
    from amoeba.elastic import make_elastic
    from amoeba.mmlu import letter_logits
    from amoeba.subnet import Subnet

    model = tiny_model(kind, layers=3, vocab_size=49152, max_position_embeddings=4096)
    em = make_elastic(model)
    if moe:
        attach_trained_moe(model, em)
    examples = _three_subjects()
    shape = Subnet(*subnet) if subnet else em.full_subnet()
    tokens = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True)
    with em.use(shape):
        plain = letter_logits(model, tokenizer, examples, batch_size=3, progress=False)
        plain_tokens, tokens[:] = sum(tokens), []
        cached = letter_logits(model, tokenizer, examples, batch_size=3, progress=False, prefix_cache=True)
        hook.remove()
        assert sum(tokens) < 0.6 * plain_tokens  # the exemplars ran once per batch of 3, not once per question
        other_batching = letter_logits(model, tokenizer, examples, batch_size=5, progress=False, prefix_cache=True)
    assert torch.allclose(cached, plain, atol=1e-5, rtol=1e-5), (cached - plain).abs().max()
    assert torch.allclose(other_batching, plain, atol=1e-5, rtol=1e-5)
    assert cached.argmax(-1).tolist() == plain.argmax(-1).tolist()
    if subnet:  # the subnet is really another network here
        with em.use(em.full_subnet()):
            full = letter_logits(model, tokenizer, examples[:3], batch_size=3, progress=False)
        assert not torch.allclose(full, plain[:3], atol=1e-3)
