"""Instruction data: formats, offline datasets, collation (labels only on targets), splits, bad files."""

from __future__ import annotations

import gzip
import json

import pytest

from amoeba.errors import UsageError
from amoeba.instruct_data import (IGNORE_INDEX, InstructionCollator, InstructionData, alpaca_prompt, load_examples,
                                  make_data_module, read_records, split_examples)
from tests.conftest import SHARED_DATA


class CharTokenizer:
    """One token per character (ids 3..), bos=1, eos=pad=2: enough to check collation exactly."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}


def _data(**over):
    settings = dict(dataset="alpaca-gpt4", data_dir=str(SHARED_DATA), eval_size=16, split_seed=42, source_max_len=64,
                    target_max_len=32)
    settings.update(over)
    return InstructionData(**settings)


def test_collator_masks_source_and_padding_even_when_pad_is_eos():
    col = InstructionCollator(CharTokenizer(), source_max_len=5, target_max_len=3)
    batch = col([{"input": "abcdefgh", "output": "xy"}, {"input": "a", "output": "longer"}])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = CharTokenizer()
    src0 = [1] + tok("abcdefgh")["input_ids"][:4]  # bos + prompt, cut to 5
    tgt0 = tok("xy")["input_ids"] + [2]  # response + eos (the eos id is also the pad id)
    tgt1 = tok("longer")["input_ids"][:3]  # cut to 3: no room for eos
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == src0 + tgt0
    assert labels[0].tolist() == [IGNORE_INDEX] * 5 + tgt0
    assert mask[0].tolist() == [1] * 8
    assert ids[1, :5].tolist() == [1, tok("a")["input_ids"][0]] + tgt1
    assert labels[1].tolist() == [IGNORE_INDEX] * 2 + tgt1 + [IGNORE_INDEX] * 3
    assert mask[1].tolist() == [1] * 5 + [0] * 3  # from lengths: the eos in row 0 stays attended
    on_src = InstructionCollator(CharTokenizer(), 5, 3, train_on_source=True)([{"input": "ab", "output": "c"}])
    assert on_src["labels"][0].tolist() == on_src["input_ids"][0].tolist()


def test_padding_free_collation_packs_examples_into_rows():
    """--padding_free: the padded batch's examples, whole and unpadded, end to end in rows no longer than the
    longest (longest first, each into the first row with room); positions restart per example and for the
    filler at a row's end; no example's first token is a target (it would be predicted from the example before);
    num_tokens counts the examples' tokens."""
    examples = [{"input": "abcdefgh", "output": "xy"}, {"input": "a", "output": "longer"}, {"input": "", "output": "z"},
                {"input": "abc", "output": "q"}]
    for on_source in (False, True):
        padded = InstructionCollator(CharTokenizer(), 5, 3, train_on_source=on_source)(examples)
        packed = InstructionCollator(CharTokenizer(), 5, 3, train_on_source=on_source, padding_free=True)(examples)
        assert set(packed) == {"input_ids", "position_ids", "labels", "num_tokens"}  # no attention mask
        lengths = padded["attention_mask"].sum(1).tolist()
        assert lengths == [8, 5, 3, 6] and int(packed["num_tokens"]) == 22
        # 8 alone; 6 with a filler of 2 (the 5 does not fit); 5 + 3
        assert packed["input_ids"].shape == (3, 8)
        want = padded["labels"].clone()
        want[:, 0] = IGNORE_INDEX  # never a target in the padded batch either (nothing precedes it)
        layout = [[(0, 8)], [(3, 6)], [(1, 5), (2, 3)]]
        for r, members in enumerate(layout):
            at = 0
            for example, n in members:
                assert packed["input_ids"][r, at:at + n].tolist() == padded["input_ids"][example, :n].tolist()
                assert packed["labels"][r, at:at + n].tolist() == want[example, :n].tolist()
                assert packed["position_ids"][r, at:at + n].tolist() == list(range(n))
                at += n
            assert packed["labels"][r, at:].tolist() == [IGNORE_INDEX] * (8 - at)  # the filler: no targets
            assert packed["position_ids"][r, at:].tolist() == list(range(8 - at))
        assert packed["labels"][2, 5].item() == IGNORE_INDEX and packed["labels"][2, 6].item() != IGNORE_INDEX


def test_alpaca_template_and_offline_alpaca_gpt4():
    assert alpaca_prompt("Do X.").endswith("### Instruction:\nDo X.\n\n### Response: ")
    assert "### Input:\nctx\n\n" in alpaca_prompt("Do X.", "ctx")
    ds = load_examples("alpaca-gpt4", data_dir=str(SHARED_DATA))
    assert len(ds) == 999 and set(ds.column_names) == {"input", "output"}
    raw = json.loads((SHARED_DATA / "instruct/alpaca_gpt4_en_demo_999.json").read_text())
    assert ds[5]["input"] == alpaca_prompt(raw[5]["instruction"], raw[5]["input"])
    assert ds[5]["output"] == raw[5]["output"]


def test_split_sizes_seeded_and_capped():
    data = make_data_module(CharTokenizer(), _data(max_eval=10, max_train=100))
    assert len(data["eval_dataset"]) == 10 and len(data["train_dataset"]) == 100
    assert "length" in data["train_dataset"].column_names
    again = make_data_module(CharTokenizer(), _data(max_eval=10, max_train=100))
    assert data["eval_dataset"]["input"] == again["eval_dataset"]["input"]
    other = make_data_module(CharTokenizer(), _data(max_eval=10, max_train=100, split_seed=7))
    assert data["eval_dataset"]["input"] != other["eval_dataset"]["input"]
    full = make_data_module(CharTokenizer(), _data())
    assert len(full["train_dataset"]) + len(full["eval_dataset"]) == 999
    # The seed command's 1024 held-out examples exceed the 999 offline ones: capped, training data kept.
    train, ev = split_examples(load_examples("alpaca-gpt4", data_dir=str(SHARED_DATA)), 1024, 42)
    assert len(ev) == 99 and len(train) == 900
    no_eval = make_data_module(CharTokenizer(), _data(eval_size=None))
    assert no_eval["eval_dataset"] is None and len(no_eval["train_dataset"]) == 999


def test_offline_alpaca_clean_reads_the_gzip():
    ds = load_examples("alpaca-clean", data_dir=str(SHARED_DATA))
    assert len(ds) == 51941
    with gzip.open(SHARED_DATA / "instruct/alpaca_cleaned_51941.jsonl.gz", "rt") as fh:
        first = json.loads(fh.readline())
    assert ds[0]["output"] == first["output"]


def test_local_files_both_formats(tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Add.", "input": "1+1", "output": "2"}]
    js = tmp_path / "a.json"
    js.write_text(json.dumps(rows, indent=2))
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for path in (js, jl):
        ds = load_examples(str(path))
        assert ds["output"] == ["hi", "2"] and ds[1]["input"] == alpaca_prompt("Add.", "1+1")
    io = tmp_path / "io.jsonl"
    io.write_text('{"input": "Q: 2+2?", "output": "4"}\n')
    ds = load_examples(str(io), dataset_format="input-output")
    assert ds[0] == {"input": "Q: 2+2?", "output": "4"}


@pytest.mark.parametrize("content, fmt, needle", [
    ("", None, "is empty"),
    ("[]", None, "empty list"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', None, "line 2"),
    ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]', None, "line 3"),
    ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": }\n]', None, "line 3"),
    ('{"input": "a"}\n', "input-output", "line 1"),
    ('"just text"\n', None, "line 1"),
])
def test_bad_dataset_files_name_file_and_line(tmp_path, content, fmt, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        load_examples(str(path), dataset_format=fmt)
    assert str(path) in str(err.value) and needle in str(err.value) and "--dataset" in str(err.value)


def test_unknown_names_and_missing_offline_files(tmp_path):
    with pytest.raises(UsageError, match="not one of"):
        load_examples("my-dataset")
    with pytest.raises(UsageError, match="no such file"):
        load_examples(str(tmp_path / "missing.json"))
    with pytest.raises(UsageError, match="--data_dir"):
        load_examples("alpaca-gpt4", data_dir=str(tmp_path))
    assert read_records(SHARED_DATA / "instruct/alpaca_gpt4_en_demo_999.json")[1][0] > 1
