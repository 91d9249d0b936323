"""Bad input gets one line naming the flag or file, and exit code 2: never a traceback, never a run.

Classes of input, each checked as a class: a model folder with a damaged or missing file (config, weights,
tokenizer, .gguf); calibration, instruction and metrics files that are not what their flag says; numbers out
of range (every count flag below its minimum, every float flag NaN, every bounded float outside its
interval); values of absurd length. Most cases call the functions main.py calls; a few run main.py itself.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from amoeba.errors import UsageError
from tests.test_cli import assert_usage_error, run_main, tiny_folder  # noqa: F401  (shared fixture)

LONG = 100_000  # characters of an absurd argument


def _junk(n: int) -> bytes:
    """``n`` random-looking bytes, the same on every run (a failure must reproduce)."""
    return random.Random(n).randbytes(n)


def assert_one_line(err: UsageError, *needles: str) -> None:
    """The message main.py prints after ``error:``: one line, holding every needle."""
    text = str(err)
    assert "\n" not in text and len(text) < 1000, text[:2000]
    for needle in needles:
        assert needle in text, text


# ----------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------
def _edit_json(name: str, **changes):
    def edit(folder: Path):
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))
    return edit


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _cut(name: str, keep: int):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def _remove(*names: str):
    def remove(folder: Path):
        for name in names:
            (folder / name).unlink()
    return remove


def _foreign_weights(folder: Path):
    """A valid safetensors file holding none of the model's tensors (transformers would initialise them)."""
    import torch
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(3)}, folder / "model.safetensors")


def _sharded(shards: dict):
    def shard(folder: Path):
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    return shard


def _config_without_model_type(folder: Path):
    data = json.loads((folder / "config.json").read_text())
    del data["model_type"]
    (folder / "config.json").write_text(json.dumps(data))


def _bin_instead(folder: Path):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(_junk(4096))


# id -> (damage done to a copy of the tiny folder, what the error line must name)
MODEL_CASES = {
    "config-not-json": (_write("config.json", b"{ not json"), ["config.json", "not valid JSON"]),
    "config-empty": (_write("config.json", b""), ["config.json"]),
    "config-binary": (_write("config.json", bytes(range(256)) * 4), ["config.json"]),
    "config-a-list": (_write("config.json", b"[1, 2]"), ["config.json", "not a JSON object"]),
    "config-no-model-type": (_config_without_model_type, ["config.json", "model_type"]),
    "config-mistyped-model-type": (_edit_json("config.json", model_type="lama"), ["'lama'", "not supported"]),
    "config-size-a-string": (_edit_json("config.json", num_hidden_layers="four"), ["config.json",
                                                                                   "num_hidden_layers"]),
    "config-negative-size": (_edit_json("config.json", hidden_size=-64), ["config.json", "hidden_size"]),
    "config-zero-layers": (_edit_json("config.json", num_hidden_layers=0), ["config.json", "num_hidden_layers"]),
    "config-heads-do-not-divide": (_edit_json("config.json", num_attention_heads=7), ["config.json"]),
    "config-does-not-fit-weights": (_edit_json("config.json", hidden_size=128), ["model.safetensors",
                                                                                 "do", "fit"]),
    "weights-truncated": (_cut("model.safetensors", 20_000), ["model.safetensors", "cut short"]),
    "weights-header-truncated": (_cut("model.safetensors", 100), ["model.safetensors"]),
    "weights-random": (_write("model.safetensors", _junk(5000)), ["model.safetensors"]),
    "weights-empty": (_write("model.safetensors", b""), ["model.safetensors"]),
    "weights-missing": (_remove("model.safetensors"), ["holds no weights"]),
    "weights-of-another-model": (_foreign_weights, ["model.safetensors", "lacks"]),
    "weights-bin-random": (_bin_instead, ["pytorch_model.bin"]),
    "shard-index-junk": (lambda f: (_remove("model.safetensors")(f),
                                    (f / "model.safetensors.index.json").write_text("junk")),
                         ["model.safetensors.index.json"]),
    "shard-missing": (_sharded({"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}),
                      ["model-00001-of-00002.safetensors", "missing"]),
    "tokenizer-missing": (_remove("tokenizer.json", "tokenizer_config.json"), ["no tokenizer"]),
    "tokenizer-json-only-missing": (_remove("tokenizer.json"), ["no tokenizer"]),
    "tokenizer-json-junk": (_write("tokenizer.json", b"{ junk"), ["tokenizer.json"]),
    "tokenizer-json-binary": (_write("tokenizer.json", _junk(600)), ["tokenizer.json"]),
    "tokenizer-config-junk": (_write("tokenizer_config.json", b"{ junk"), ["tokenizer_config.json"]),
}


def _damaged_copy(tiny_folder, tmp_path, damage) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    damage(folder)
    return folder


def _load(model: Path, tmp_path):
    from amoeba.args import parse_args
    from amoeba.loading import load_model_and_tokenizer
    from amoeba.pipeline import load_settings

    args = parse_args(["--model_name_or_path", str(model), "--do_train", "False", "--output_dir",
                       str(tmp_path / "out")])
    return load_model_and_tokenizer(load_settings(args))


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_damaged_model_folder_is_named_in_one_line(case, tiny_folder, tmp_path):
    damage, needles = MODEL_CASES[case]
    folder = _damaged_copy(tiny_folder, tmp_path, damage)
    with pytest.raises(UsageError) as err:
        _load(folder, tmp_path)
    assert_one_line(err.value, "--model_name_or_path", *needles)


@pytest.mark.parametrize("content", [_junk(1000), b"", b"hello, not a model"], ids=["random", "empty", "text"])
def test_a_junk_gguf_is_named_in_one_line(content, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    with pytest.raises(UsageError) as err:
        _load(gguf, tmp_path)
    assert_one_line(err.value, "--model_name_or_path", "model.gguf", "GGUF")


def test_an_intact_copy_still_loads(tiny_folder, tmp_path):
    """The checks refuse only damage: an untouched copy loads, every tensor from the file."""
    import torch
    from safetensors.torch import load_file

    model, tok = _load(_damaged_copy(tiny_folder, tmp_path, lambda folder: None), tmp_path)
    stored = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    assert tok.pad_token is not None


def test_an_extra_stored_tensor_loads_with_one_warning(tiny_folder, tmp_path, caplog):
    """Tensors the model does not use are harmless: one warning line, not transformers' report table."""
    from safetensors.torch import load_file, save_file

    def add_tensor(folder: Path):
        stored = load_file(folder / "model.safetensors")
        stored["extra.weight"] = stored["model.norm.weight"].clone()
        save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})

    with caplog.at_level("WARNING"):
        _load(_damaged_copy(tiny_folder, tmp_path, add_tensor), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("extra.weight" in w and "\n" not in w for w in warnings), warnings
    assert not any("LOAD REPORT" in w for w in warnings), warnings


# ----------------------------------------------------------------------------------------------
# Data files: calibration text, instruction data, metrics
# ----------------------------------------------------------------------------------------------
def _gzip_damaged(how: str) -> bytes:
    raw = gzip.compress(b'{"text": "hello world", "instruction": "a", "output": "b"}\n' * 2000)
    if how == "truncated":
        return raw[: len(raw) // 2]
    if how == "crc":
        return raw[:-8] + bytes(8)  # the stream decodes, its checksum and length do not match
    if how == "flipped":
        body = bytearray(raw)
        body[30:60] = _junk(30)
        return bytes(body)
    return b"plain text, not gzip"


# id -> (file name, content)
DATA_FILES = {
    "binary-txt": ("calib.txt", bytes(range(128, 256)) * 20),
    "binary-jsonl": ("calib.jsonl", bytes(range(128, 256)) * 20),
    "binary-json": ("calib.json", _junk(3000)),
    "gz-truncated": ("calib.jsonl.gz", _gzip_damaged("truncated")),
    "gz-bad-checksum": ("calib.jsonl.gz", _gzip_damaged("crc")),
    "gz-flipped-bytes": ("calib.jsonl.gz", _gzip_damaged("flipped")),
    "gz-not-gzip": ("calib.jsonl.gz", _gzip_damaged("not")),
    "gz-binary-inside": ("calib.jsonl.gz", gzip.compress(bytes(range(128, 256)) * 20)),
    "json-nested-too-deep": ("calib.json", b"[" * 100_000 + b"]" * 100_000),
    "jsonl-nested-too-deep": ("calib.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n"),
    "jsonl-number-too-long": ("calib.jsonl", b'{"text": ' + b"9" * 5000 + b"}\n"),
}


@pytest.mark.parametrize("case", sorted(DATA_FILES))
def test_a_bad_calibration_file_is_named_in_one_line(case, tmp_path):
    from amoeba.errors import for_flag
    from amoeba.text_data import load_text

    name, content = DATA_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UsageError) as err, for_flag("--calib_dataset"):  # as Stage 1 reads it
        load_text(str(path))
    assert_one_line(err.value, "--calib_dataset", name)


@pytest.mark.parametrize("case", sorted(c for c in DATA_FILES if not c.endswith("txt")))
def test_a_bad_instruction_file_is_named_in_one_line(case, tmp_path):
    from amoeba.instruct_data import load_examples

    name, content = DATA_FILES[case]
    path = tmp_path / name.replace("calib", "train")
    path.write_bytes(content)
    with pytest.raises(UsageError) as err:
        load_examples(str(path))
    assert_one_line(err.value, "--dataset", path.name)


METRICS_FILES = {
    "random-bytes": _junk(2000),
    "binary": bytes(range(128, 256)) * 10,
    "not-json": b"accuracy: 0.5",
    "empty": b"",
    "a-list": b"[0.5, 0.6]",
    "nested-too-deep": b"[" * 100_000 + b"]" * 100_000,
    "number-too-long": b'{"wikitext2_ppl_l4w1": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("case", sorted(METRICS_FILES))
def test_a_junk_metrics_file_is_named_in_one_line(case, tmp_path):
    from amoeba.run_folder import read_metrics

    path = tmp_path / "metrics.json"
    path.write_bytes(METRICS_FILES[case])
    with pytest.raises(UsageError) as err:
        read_metrics(path, "--metrics_file")
    assert_one_line(err.value, "--metrics_file", "metrics.json")


def test_metrics_that_are_not_finite_numbers_rank_nothing(tmp_path):
    from amoeba.budget import ranking_metric
    from amoeba.run_folder import read_metrics

    path = tmp_path / "metrics.json"
    path.write_text('{"wikitext2_ppl_l4w1": NaN, "wikitext2_ppl_l3w1": 12.5, "wikitext2_ppl_l2w1": Infinity}')
    assert ranking_metric(read_metrics(path), "wikitext2_ppl") == ("wikitext2_ppl", {"l3w1": 12.5})


# ----------------------------------------------------------------------------------------------
# Numbers out of range, and values of absurd length
# ----------------------------------------------------------------------------------------------
def _parse(*argv: str):
    from amoeba.args import parse_args

    return parse_args(list(argv))


# The smallest value of each integer flag; one below it is refused. These are the flags that count things.
COUNT_MINIMUM = {
    **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "source_max_len", "target_max_len", "mmlu_source_max_len", "eval_dataset_size",
                     "max_train_samples", "max_eval_samples", "max_wikitext2_windows", "max_mmlu_samples",
                     "lm_eval_limit", "calib_batch_size", "num_calib_sample", "lora_r", "moe_num_expert",
                     "min_num_layer", "train_num_layer", "width_align", "budget_top", "max_new_tokens",
                     "num_beams", "eval_accumulation_steps"), 1),
    "calib_seqlen": 2,
    **dict.fromkeys(("random_sample_num_layer", "dataloader_num_workers", "top_k", "no_repeat_ngram_size",
                     "seed", "data_seed"), 0),
    **dict.fromkeys(("dp_keep_last_layer", "distill_steps", "max_steps"), -1),
}


@pytest.mark.parametrize("name", sorted(COUNT_MINIMUM))
def test_every_count_flag_refuses_a_value_below_its_minimum(name):
    low = COUNT_MINIMUM[name]
    with pytest.raises(UsageError) as err:
        _parse(f"--{name}", str(low - 1), "--do_train", "False")
    assert_one_line(err.value, f"--{name}")
    _parse(f"--{name}", str(low), "--do_train", "False")


def _float_flags() -> list[str]:
    from amoeba.args import build_parser

    return sorted({a.option_strings[0] for a in build_parser()._actions if a.type is float})


@pytest.mark.parametrize("flag", _float_flags())
def test_every_float_flag_refuses_nan(flag):
    with pytest.raises(UsageError) as err:
        _parse(flag, "nan", "--do_train", "False")
    assert_one_line(err.value, flag, "finite")


# Bounded float flags, each with a value just outside its range.
FLOAT_CASES = [
    ("--learning_rate", "-1"), ("--learning_rate", "0"), ("--learning_rate", "inf"), ("--lora_alpha", "0"),
    ("--temperature", "0"), ("--top_p", "0"), ("--top_p", "1.5"), ("--repetition_penalty", "0"),
    ("--save_steps", "0"), ("--logging_steps", "-1"), ("--budget_latency_ms", "-3"), ("--weight_decay", "-0.1"),
    ("--max_grad_norm", "-1"), ("--num_train_epochs", "-1"), ("--warmup_ratio", "1.5"), ("--kd_weight", "2"),
    ("--kd_weight", "-1"), ("--lora_dropout", "1"), ("--adam_beta1", "1"),
]


@pytest.mark.parametrize("flag, value", FLOAT_CASES)
def test_bounded_float_flags_refuse_values_outside_their_range(flag, value):
    with pytest.raises(UsageError) as err:
        _parse(f"{flag}={value}", "--do_train", "False")
    assert_one_line(err.value, flag)


@pytest.mark.parametrize("argv, flag", [
    (["--max_steps", "-5", "--num_train_epochs", "0"], "--max_steps"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs"),
    (["--max_steps", "0"], "--max_steps"),
    (["--fp16", "--bf16"], "bf16"),  # with CUDA, transformers refuses it first, in its own words
    (["--do_train", "False", "--train_num_width", "9/8"], "--train_num_width"),
    (["--do_train", "False", "--adapter_snapshot_steps", "10,0"], "--adapter_snapshot_steps"),
], ids=["steps-and-epochs", "no-epochs", "no-steps", "fp16-and-bf16", "train-width", "snapshot-steps"])
def test_combinations_that_train_nothing_or_contradict(argv, flag):
    with pytest.raises(UsageError) as err:
        _parse(*argv)
    assert_one_line(err.value, flag)


def test_in_range_values_still_parse():
    args = _parse("--seed", "0", "--kd_weight", "0", "--warmup_ratio", "0", "--max_steps", "-1",
                  "--num_train_epochs", "1", "--eval_num_layer", "[30, 26]", "--eval_num_width", "1,7/8",
                  "--lora_dropout", "0.05", "--train_num_width", "3/4", "--adapter_snapshot_steps", "4,8")
    assert args.eval_layers == (30, 26) and args.eval_widths == (1.0, 0.875) and args.train.max_steps == -1


@pytest.mark.parametrize("flag, value", [
    ("--eval_num_layer", "-" * LONG + "1"),  # ast.literal_eval ran out of memory on this
    ("--eval_num_layer", "1," * (LONG // 2)),
    ("--eval_num_width", "1" * LONG),
    ("--width_choice", "[" * LONG),
    ("--eval_shapes", "30x1," * (LONG // 5)),
    ("--do_lm_eval_task", "arc_easy," * (LONG // 9)),
    ("--lora_modules", "q" * LONG),
    ("--output_dir", "o" * LONG),
    ("--model_name_or_path", "m" * LONG),
    ("--output_dir", "/tmp/" + "o" * 300),  # one name longer than a file system allows
    ("--shrinking_file", "s" * 300 + ".npy"),
], ids=["signs", "many-layers", "digits", "brackets", "shapes", "tasks", "modules", "output", "model",
        "output-name", "strategy-name"])
def test_an_absurdly_long_value_is_refused_in_one_line(flag, value):
    with pytest.raises(UsageError) as err:
        _parse(f"{flag}={value}", "--do_train", "False")
    assert_one_line(err.value, flag)


def test_the_integer_list_parser_is_not_pythons_literal_parser():
    """Within the length limit too: a run of signs made ast.literal_eval recurse out of memory."""
    from amoeba.args import parse_int_list

    for text in ("-" * 4000 + "1", "(" * 4000, "~" * 4000 + "1", "0x10", "1_0", "True"):
        with pytest.raises(UsageError) as err:
            parse_int_list(text, "--eval_num_layer")
        assert_one_line(err.value, "--eval_num_layer")


# ----------------------------------------------------------------------------------------------
# The whole command line: exit code 2, one error line, no traceback
# ----------------------------------------------------------------------------------------------
def test_cli_damaged_weights(tiny_folder, tmp_path):
    folder = _damaged_copy(tiny_folder, tmp_path, _cut("model.safetensors", 20_000))
    proc = run_main("--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "o"), "--do_train", "False")
    assert_usage_error(proc, "--model_name_or_path", "model.safetensors")


def test_cli_binary_calibration_text(tiny_folder, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(bytes(range(128, 256)) * 20)
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(tmp_path / "o"),
                    "--do_train", "False", "--layer_calib_dp", "--calib_dataset", str(calib), "--min_num_layer", "2")
    assert_usage_error(proc, "--calib_dataset", "calib.txt")


@pytest.mark.parametrize("argv, flag", [
    (["--max_mmlu_samples", "0", "--do_mmlu_eval", "True"], "--max_mmlu_samples"),
    (["--fp16", "--bf16"], "bf16"),
    (["--eval_num_layer=" + "-" * LONG + "1"], "--eval_num_layer"),
], ids=["mmlu-samples", "two-precisions", "absurd-length"])
def test_cli_bad_numbers(argv, flag, tiny_folder, tmp_path):
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(tmp_path / "o"),
                    "--do_train", "False", *argv)
    assert_usage_error(proc, flag)
    assert not (tmp_path / "o").exists()  # refused before anything is written
