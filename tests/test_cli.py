"""main.py: bad input gives one clear line and exit code 2; model loading paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_model


def run_main(*argv: str, cwd: Path = ROOT, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny GQA Llama saved as a model folder with a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("gqa").save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<s>": 121, "</s>": 122})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


def test_missing_model_path(tmp_path):
    proc = run_main("--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"),
                    "--do_train", "False")
    assert_usage_error(proc, "--model_name_or_path", "nope")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10)).save_pretrained(tmp_path / "gpt2")
    proc = run_main("--model_name_or_path", str(tmp_path / "gpt2"), "--output_dir", str(tmp_path / "o"),
                    "--do_train", "False")
    assert_usage_error(proc, "gpt2", "supported: llama, mistral, qwen2, qwen3")


def test_bad_width_and_too_many_layers(tmp_path, tiny_folder):
    proc = run_main("--model_name_or_path", str(tiny_folder), "--width_choice", "[1,9/8]")
    assert_usage_error(proc, "--width_choice", "9/8")
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(tmp_path / "o"),
                    "--do_train", "False", "--do_eval_wikitext2", "True", "--eval_num_layer", "9")
    assert_usage_error(proc, "--eval_num_layer", "9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bits_without_cuda(tmp_path, tiny_folder):
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(tmp_path / "o"),
                    "--do_train", "False", "--bits", "4")
    assert_usage_error(proc, "--bits", "CUDA")


def test_load_folder_sets_pad_token_and_records_the_run(tmp_path, tiny_folder):
    from amoeba.args import parse_args
    from amoeba.loading import load_model_and_tokenizer
    from amoeba.pipeline import load_settings
    from amoeba.run_folder import save_run_record

    args = parse_args(["--model_name_or_path", str(tiny_folder), "--bf16", "--do_train", "False",
                       "--output_dir", str(tmp_path)])
    model, tok = load_model_and_tokenizer(load_settings(args))
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert model.dtype == torch.bfloat16 and not model.training
    save_run_record(tmp_path, *args.record())
    import json

    record = json.loads((tmp_path / "run_args.json").read_text())
    assert record["versions"]["transformers"] and record["parsed"]["width_choice"] == [1.0, 0.875, 0.75, 0.625]


@pytest.mark.real_model
def test_real_model_full_subnet_and_gguf(real_model_dir):
    """The materialised SmolLM2 folder: elastic full == plain, and the packaged .gguf loads too."""
    import copy

    from amoeba.args import parse_args
    from amoeba.default_model import packaged_gguf
    from amoeba.elastic import make_elastic
    from amoeba.loading import load_model_and_tokenizer
    from amoeba.pipeline import load_settings
    from amoeba.subnet import Subnet

    args = parse_args(["--model_name_or_path", str(real_model_dir), "--do_train", "False"])
    model, tok = load_model_and_tokenizer(load_settings(args))
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = copy.deepcopy(model)
    em = make_elastic(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        with em.use(Subnet(tuple(range(22)), 0.75)):
            narrow = model(ids).logits
    assert torch.isfinite(narrow).all()
    assert em.param_count(Subnet(tuple(range(22)), 0.75)) < 0.8 * em.param_count()
    gguf_args = parse_args(["--model_name_or_path", str(packaged_gguf()), "--do_train", "False"])
    gmodel, gtok = load_model_and_tokenizer(load_settings(gguf_args))
    assert gtok("Paris").input_ids == tok("Paris").input_ids
    # The folder stores the same de-quantized weights rounded to bf16: logits agree to bf16 rounding.
    with torch.no_grad():
        g, r = gmodel(ids).logits, ref(ids).logits
    assert (g - r).abs().mean() < 0.05 and (g - r).abs().max() < 0.02 * r.abs().max()
    assert torch.equal(g[0, -1].argmax(), r[0, -1].argmax())


def test_atomic_writes_replace_whole_files_with_ordinary_permissions(tmp_path):
    """Outputs appear whole (written to a temporary file, then renamed), keep nothing behind on failure, and get
    the permissions of a plain write, not the private mode of the temporary file."""
    from amoeba.files import atomic_path, write_json

    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().endswith("}") and list(tmp_path.iterdir()) == [target]
