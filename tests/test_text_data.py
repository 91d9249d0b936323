"""Text corpora (offline files), token windows and perplexity."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from amoeba.errors import UsageError
from amoeba.text_data import (load_text, perplexity, read_text_file, resolve_data_dir, rows_per_forward, token_windows,
                               window_nll)
from conftest import SHARED_DATA, tiny_model

needs_data = pytest.mark.skipif(not (SHARED_DATA / "wikitext2").is_dir(), reason="offline data not present")


class CharTokenizer:
    """A stand-in tokenizer: one id per character (enough to test windowing)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


@needs_data
def test_wikitext2_test_is_the_hf_join():
    text = load_text("wikitext2", "test", SHARED_DATA)
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n")  # row 0 is "", row 1 the title


@needs_data
def test_named_corpora_read_their_files(monkeypatch):
    monkeypatch.setenv("AMOEBA_DATA_DIR", str(SHARED_DATA))
    c4 = load_text("c4")  # data dir from the environment
    rows = [json.loads(line)["text"] for line in open(SHARED_DATA / "calib" / "c4_demo.jsonl", encoding="utf-8")]
    assert len(rows) == 300
    assert c4 == "\n\n".join(rows)
    assert load_text("wiki") == (SHARED_DATA / "calib" / "wiki_demo.txt").read_text(encoding="utf-8")
    assert resolve_data_dir(None) == SHARED_DATA


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("AMOEBA_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None  # the hub
    monkeypatch.setenv("AMOEBA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(str(other)) == other  # an explicit path wins over the environment
    with pytest.raises(UsageError, match="--data_dir"):
        resolve_data_dir(str(tmp_path / "missing"))


def test_local_files_all_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]), encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n')
    assert load_text(str(tmp_path / "a.txt")) == "plain text"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert load_text(str(tmp_path / "c.json")) == "x\n\ny"
    assert load_text(str(tmp_path / "d.jsonl.gz")) == "zipped"
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="text"):
        read_text_file(tmp_path / "bad.jsonl")


def test_unknown_corpus_lists_the_known_ones(tmp_path):
    with pytest.raises(UsageError) as err:
        load_text("pile", data_dir=tmp_path)
    assert "'pile'" in str(err.value) and err.value.flag is None  # the caller names its flag
    for name in ("wikitext2", "c4", "wiki"):
        assert name in str(err.value)
    with pytest.raises(UsageError, match="no such file"):
        load_text(str(tmp_path / "missing.jsonl"))


def test_offline_dir_without_the_file_says_where(tmp_path):
    with pytest.raises(UsageError, match="c4_demo.jsonl"):
        load_text("c4", data_dir=tmp_path)


def test_windows_sequential_and_random():
    tok = CharTokenizer()
    text = "".join(chr(65 + i % 26) for i in range(1000))
    ids = torch.tensor([ord(c) % 128 for c in text])
    seq = token_windows(tok, text, 64)
    assert seq.shape == (1000 // 64, 64) and seq.dtype == torch.long
    assert torch.equal(seq.reshape(-1), ids[: seq.numel()])  # consecutive, non-overlapping
    assert token_windows(tok, text, 64, n=3).shape == (3, 64)
    rnd = token_windows(tok, text, 100, n=7, seed=3)
    assert rnd.shape == (7, 100)
    assert torch.equal(rnd, token_windows(tok, text, 100, n=7, seed=3))  # reproducible
    assert not torch.equal(rnd, token_windows(tok, text, 100, n=7, seed=4))
    joined = "".join(chr(int(i)) for i in ids)
    for row in rnd:  # every random window is a real slice of the text
        assert "".join(chr(int(i)) for i in row) in joined
    with pytest.raises(UsageError, match="fewer than one window of 64"):
        token_windows(tok, "short", 64)


def test_perplexity_equals_transformers_loss():
    model = tiny_model("gqa", layers=3)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 128, (5, 24), generator=g)
    ppl = perplexity(model, windows, batch_size=2)  # uneven batches: 2 + 2 + 1
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss  # mean over all 5 * 23 predicted tokens
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
    nll, count = window_nll(model(input_ids=windows).logits.detach(), windows)
    assert count == 5 * 23
    assert nll / count == pytest.approx(loss.item(), rel=1e-5)


def test_perplexity_keeps_each_forwards_logits_within_the_budget(monkeypatch):
    """A batch whose logits would pass the budget runs as forwards of fewer windows (a 32 x 2048 batch over
    Qwen2.5's vocabulary is 19.9 GB of logits); the perplexity is the same as in whole batches."""
    import amoeba.text_data as text_data

    model = tiny_model("gqa", layers=2)
    windows = torch.randint(0, 128, (7, 24), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, windows, batch_size=4)
    one_row = 24 * model.config.vocab_size * 4  # float32 logits of one window
    assert rows_per_forward(model, 24, budget_bytes=2 * one_row + 1) == 2
    assert rows_per_forward(model, 24, budget_bytes=1) == 1  # never zero
    monkeypatch.setattr(text_data, "LOGITS_BUDGET_BYTES", 2 * one_row)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    split = perplexity(model, windows, batch_size=4)
    hook.remove()
    assert seen == [2, 2, 2, 1]  # batches of 4 + 3 windows, two at a time
    assert split == pytest.approx(whole, rel=1e-6)
