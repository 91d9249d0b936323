"""The bundled synthetic sample (amoeba/sample_data): it is exactly what the generator writes, and every
offline loader reads it (calibration text, WikiText-2, instructions, MMLU, the offline lm-eval tasks)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pytest
import torch

from amoeba.instruct_data import IGNORE_INDEX, InstructionData, load_examples, make_data_module
from amoeba.lm_eval_tasks import LOCAL_TASKS, missing_files, render_tasks
from amoeba.mmlu import load_mmlu
from amoeba.text_data import load_text, token_windows
from conftest import ROOT, load_script, tiny_model

SAMPLE = ROOT / "amoeba" / "sample_data"
GENERATOR = ROOT / "utils" / "write_sample_data.py"


def _generator():
    return load_script(GENERATOR)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_model_dir))


# ----------------------------------------------------------------------------------------------
# The committed files are the generator's output
# ----------------------------------------------------------------------------------------------
def test_committed_sample_is_exactly_what_the_generator_writes(tmp_path):
    _generator().write_sample(tmp_path)
    assert _files(SAMPLE) == _files(tmp_path)
    for rel in _files(SAMPLE):
        ours, fresh = (SAMPLE / rel).read_bytes(), (tmp_path / rel).read_bytes()
        if rel.endswith(".gz") and ours != fresh:
            # Another zlib build may compress the same text to other bytes; the content must still match.
            assert gzip.decompress(ours) == gzip.decompress(fresh), rel
            continue
        assert ours == fresh, rel


def test_sample_is_small_marked_synthetic_and_left_without_temporary_files():
    sizes = [(SAMPLE / rel).stat().st_size for rel in _files(SAMPLE)]
    assert sum(sizes) < 1_000_000
    assert not [rel for rel in _files(SAMPLE) if rel.rsplit("/", 1)[-1].startswith(".")]
    notice = (SAMPLE / "NOTICE.md").read_text(encoding="utf-8")
    assert "synthetic" in notice and "utils/write_sample_data.py" in notice and "meaningless" in notice


def test_generator_is_deterministic_and_seed_dependent():
    gen = _generator()
    assert gen.build_files() == gen.build_files()
    other = gen.build_files(seed=gen.SEED + 1)
    assert other["arc/ARC-Easy-Test.jsonl"] != gen.build_files()["arc/ARC-Easy-Test.jsonl"]


def test_generator_refuses_bad_output_folder_with_one_line_and_code_2(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = subprocess.run([sys.executable, str(GENERATOR), "--out", str(target)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a directory" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Every loader reads the sample
# ----------------------------------------------------------------------------------------------
def test_calibration_and_wikitext_text_give_the_windows_the_quickstart_needs(tokenizer):
    c4 = load_text("c4", "train", data_dir=SAMPLE)  # as FLAP and the layer DP ask for it
    assert c4.count("\n\n") >= 30 and len(c4) > 20_000
    windows = token_windows(tokenizer, c4, 256, n=32, seed=0)
    assert windows.shape == (32, 256) and len(set(map(tuple, windows.tolist()))) == 32
    assert token_windows(tokenizer, c4, 256).shape[0] >= 32  # room for 32 windows without overlap

    wt = load_text("wikitext2", "test", data_dir=SAMPLE)
    assert wt.startswith("\n\n = ") and " = = History = = \n" in wt
    assert token_windows(tokenizer, wt, 2048).shape[0] >= 4  # SmolLM2 windows are 2048 tokens; quickstart uses 4
    assert token_windows(tokenizer, wt, 512).shape[0] >= 16

    wiki = load_text("wiki", data_dir=SAMPLE)
    assert len(wiki.splitlines()) >= 3


def test_instruction_data_loads_and_collates(tokenizer):
    gpt4 = load_examples("alpaca-gpt4", data_dir=str(SAMPLE))
    cleaned = load_examples("alpaca-clean", data_dir=str(SAMPLE))
    assert 100 <= len(gpt4) <= 200 and 50 <= len(cleaned) <= 200
    for ds in (gpt4, cleaned):
        assert all(x.startswith("Below is an instruction") and x.rstrip().endswith("### Response:")
                   for x in ds["input"])
        assert all(y.strip() for y in ds["output"])
    assert any("### Input:" in x for x in gpt4["input"]) and any("### Input:" not in x for x in gpt4["input"])

    data = InstructionData("alpaca-gpt4", data_dir=str(SAMPLE), eval_size=16, split_seed=42, source_max_len=128,
                           target_max_len=64)
    module = make_data_module(tokenizer, data)
    assert len(module["train_dataset"]) + len(module["eval_dataset"]) == len(gpt4)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 1).all()


@pytest.mark.parametrize("split,count", [("eval", 24), ("test", 60), ("dev", 20)])
@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_splits_load_with_zero_and_five_shots(split, count, shots):
    examples = load_mmlu(split, shots, SAMPLE)
    assert len(examples) == count
    assert len({e.subject for e in examples}) == 4
    assert {e.answer for e in examples} == {0, 1, 2, 3}
    for e in examples:
        assert e.prompt.startswith("The following are multiple choice questions (with answers) about ")
        assert e.prompt.endswith("\nAnswer:") and e.prompt.count("\nAnswer:") == 1 + shots
        assert "\nD. " in e.prompt


def test_mmlu_answers_are_right_on_arithmetic():
    for e in load_mmlu("test", 0, SAMPLE):
        if e.subject != "elementary_mathematics":
            continue
        question = e.prompt.split("\n\n", 1)[1].split("\n")[0]
        a, op, b = question[len("What is "):-1].split(" ")
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]
        choices = [line[3:] for line in e.prompt.splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. ")]
        assert choices[e.answer] == str(value) and choices.count(str(value)) == 1


def test_offline_lm_eval_tasks_build_from_the_sample(tmp_path):
    from lm_eval.tasks import TaskManager

    assert all(not missing_files(name, SAMPLE) for name in LOCAL_TASKS)
    folder = render_tasks(list(LOCAL_TASKS), SAMPLE, tmp_path / "tasks")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = manager.load(["arc_easy", "piqa", "hellaswag"])["tasks"]
    for name, n_min in (("arc_easy", 40), ("piqa", 40), ("hellaswag", 40)):
        task = tasks[name]
        docs = list(task.eval_docs)
        assert len(docs) >= n_min, name
        for doc in docs:
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            assert len(choices) >= 2 and 0 <= int(target) < len(choices), name
            assert task.doc_to_text(doc).strip()
    arc = list(tasks["arc_easy"].eval_docs)
    assert {len(d["choices"]["text"]) for d in arc} >= {3, 4, 5}  # odd choice counts, as in the real set
    assert any(d["answerKey"].isdigit() for d in arc)
    assert "mmlu" in manager.all_groups and len([t for t in manager.all_subtasks if t.startswith("mmlu_")]) == 4


def test_lm_eval_runner_scores_a_tiny_model_on_the_sample(tokenizer):
    from amoeba.lm_eval_runner import LMEvalRunner

    model = tiny_model("gqa", layers=2, vocab_size=49152, max_position_embeddings=128)
    runner = LMEvalRunner(model, tokenizer, ["arc_easy", "piqa", "hellaswag"], str(SAMPLE), batch_size=4, limit=4)
    try:
        with torch.no_grad():
            flat, _ = runner.run()
    finally:
        runner.close()
    for name in ("arc_easy", "piqa", "hellaswag"):
        assert 0.0 <= flat[f"{name}_acc"] <= 1.0 and 0.0 <= flat[f"{name}_acc_norm"] <= 1.0
