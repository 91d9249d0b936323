"""Output folders and exports: nothing a user has is lost, a bad destination is one line, a good run is quiet.

- ``--overwrite`` replaces only an earlier export (marked by ``amoeba_export.json``), never the run's own
  ``--output_dir``, the model, adapters or strategy being read, nor a folder holding any of them;
- a refused training command leaves the earlier run's ``run_args.json`` as it was;
- every folder a command writes into is checked first (one ``error:`` line naming the flag, exit 2);
- argparse's own errors are one line too, and a successful run's stderr holds only this project's logging.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from amoeba.errors import UsageError
from tests.conftest import load_script, ROOT, tiny_model
from tests.test_cli import assert_usage_error, run_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA Llama folder whose tokenizer and config agree on the special tokens (so transformers has
    nothing to say about them), and a small instruction dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("guards")
    model_dir = root / "model"
    tiny_model("gqa", pad_token_id=122, bos_token_id=121, eos_token_id=122).save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(120)}
    vocab.update({"<unk>": 120, "<s>": 121, "</s>": 122})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    rows = [{"instruction": " ".join(f"w{w}" for w in rng.integers(0, 60, 4)), "input": "", "output": "w90 w91"}
            for _ in range(8)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove nothing was changed or removed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_run(folder: Path) -> dict[str, bytes]:
    """A folder that looks like a finished training run; returns its snapshot."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (folder / "run_args.json").write_text('{"command": ["the earlier run"]}')
    (folder / "training_log.json").write_text("[]")
    return _snapshot(folder)


def _run(tiny: Path, out: Path, *extra: str):
    """``pipeline.run`` in this process (refusals come before any model work, so this is fast)."""
    from amoeba.args import parse_args
    from amoeba.pipeline import run

    run(parse_args(["--model_name_or_path", str(tiny / "model"), "--output_dir", str(out), "--do_train", "False",
                    *extra]))


# ----------------------------------------------------------------------------------------------
# --overwrite: one rule
# ----------------------------------------------------------------------------------------------
EXPORT_CASES = {
    # name: (export folder relative to the test folder, what it must not replace)
    "the run's own output folder": ("run", "--output_dir"),
    "a folder holding the run": (".", "--output_dir"),
    "the model being read": ("model_copy", "--model_name_or_path"),
    "a folder holding the model": ("models", "--model_name_or_path"),
    "a folder that is no export": ("other", "not an export written by this project"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_overwrite_never_replaces_what_is_not_an_earlier_export(tmp_path, tiny, case):
    import shutil

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _earlier_run(run_dir)
    model = tmp_path / "models" / "model_copy"
    shutil.copytree(tiny / "model", model)
    (tmp_path / "model_copy").symlink_to(model)  # the model, reached by another name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    target, needle = EXPORT_CASES[case]
    with pytest.raises(UsageError) as err:
        from amoeba.args import parse_args
        from amoeba.pipeline import run

        run(parse_args(["--model_name_or_path", str(model), "--output_dir", str(run_dir), "--do_train", "False",
                        "--export_dir", str(tmp_path / target), "--overwrite"]))
    assert err.value.flag == "--export_dir" and needle in str(err.value), str(err.value)
    assert _snapshot(tmp_path) == before  # nothing lost, nothing written


def test_overwrite_replaces_an_earlier_export_inside_the_run_folder(tmp_path, tiny):
    from amoeba.export import EXPORT_RECORD

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kept = _earlier_run(run_dir)
    _run(tiny, run_dir, "--export_dir", str(run_dir / "export"))  # a new subfolder of the run: fine
    first = json.loads((run_dir / "export" / EXPORT_RECORD).read_text())
    (run_dir / "export" / "stale.txt").write_text("from the earlier export")
    with pytest.raises(UsageError, match="--overwrite"):
        _run(tiny, run_dir, "--export_dir", str(run_dir / "export"))
    _run(tiny, run_dir, "--export_dir", str(run_dir / "export"), "--overwrite")
    assert not (run_dir / "export" / "stale.txt").exists()
    assert json.loads((run_dir / "export" / EXPORT_RECORD).read_text())["param_count"] == first["param_count"]
    now = _snapshot(run_dir)
    assert all(now[name] == data for name, data in kept.items() if name != "run_args.json")
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("relation", ["same", "holds", "through a link", "inside (fine)"])
@pytest.mark.parametrize("exists", [True, False])
def test_export_target_rule(tmp_path, relation, exists):
    from amoeba.export import check_export_target

    protected = tmp_path / "base" / "adapters"
    protected.mkdir(parents=True)
    (tmp_path / "link").symlink_to(protected)
    target = {"same": protected, "holds": tmp_path / "base", "through a link": tmp_path / "link",
              "inside (fine)": protected / ("sub" if exists else "new")}[relation]
    if exists and relation == "inside (fine)":
        target.mkdir()
        (target / "amoeba_export.json").write_text(json.dumps({"shape": {}, "param_count": 1}))
    if not exists and relation != "inside (fine)":
        protected = tmp_path / "not_yet" / "adapters"  # the rule holds for folders that do not exist yet
        target = {"same": protected, "holds": protected.parent, "through a link": tmp_path / "link2"}[relation]
        if relation == "through a link":
            (tmp_path / "link2").symlink_to(protected)
    pairs = [(protected, "--adapter_dir", "the adapters being read")]
    if relation == "inside (fine)":
        assert check_export_target(target, True, pairs) == target
        return
    with pytest.raises(UsageError, match="the adapters being read") as err:
        check_export_target(target, True, pairs)
    assert err.value.flag == "--export_dir"


def test_is_export_folder_needs_a_valid_record(tmp_path):
    from amoeba.export import is_export_folder

    for name, text in {"empty": "", "junk": "{", "list": "[]", "other json": '{"a": 1}'}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "amoeba_export.json").write_text(text)
        assert not is_export_folder(tmp_path / name), name
    assert not is_export_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# A refused training command leaves the earlier run as it was
# ----------------------------------------------------------------------------------------------
def test_refused_training_keeps_the_earlier_run_record(tmp_path, tiny):
    from amoeba.args import parse_args
    from amoeba.pipeline import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = _earlier_run(run_dir)
    args = parse_args(["--model_name_or_path", str(tiny / "model"), "--output_dir", str(run_dir), "--do_train",
                       "True", "--dataset", str(tiny / "data.jsonl"), "--report_to", "none", "--max_steps", "1"])
    with pytest.raises(UsageError, match="already holds checkpoints"):
        run(args)
    assert _snapshot(run_dir) == before


# ----------------------------------------------------------------------------------------------
# One guard for writable output folders
# ----------------------------------------------------------------------------------------------
def _unwritable(tmp_path: Path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


BAD_FOLDERS = {
    "empty": lambda tmp: "",
    "a file": lambda tmp: tmp / "afile",
    "under a file": lambda tmp: tmp / "afile" / "out",
    "not writable": lambda tmp: _unwritable(tmp) / "out",
}


@pytest.mark.parametrize("flag", ["--output_dir", "--export_dir"])
@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_output_folders_are_refused_before_any_work(tmp_path, tiny, flag, case):
    if case == "not writable" and os.geteuid() == 0:
        pytest.skip("permissions do not stop root from writing")
    from amoeba.files import writable_dir

    (tmp_path / "afile").write_text("a file")
    bad = BAD_FOLDERS[case](tmp_path)
    with pytest.raises(UsageError) as err:
        writable_dir(bad, flag)
    assert err.value.flag == flag
    good = tmp_path / "good"
    extra = ["--output_dir", str(bad)] if flag == "--output_dir" else ["--output_dir", str(good), "--export_dir",
                                                                       str(bad)]
    with pytest.raises(UsageError) as err:
        from amoeba.args import parse_args
        from amoeba.pipeline import run

        run(parse_args(["--model_name_or_path", str(tiny / "model"), "--do_train", "False", *extra]))
    assert err.value.flag == flag, str(err.value)
    assert (tmp_path / "afile").read_text() == "a file"
    assert not good.exists()  # refused before anything was written


def test_empty_output_dir_is_one_line_and_writes_nothing(tmp_path, tiny):
    proc = run_main("--model_name_or_path", str(tiny / "model"), "--do_train", "False", "--output_dir", "",
                    cwd=tmp_path)
    assert_usage_error(proc, "--output_dir")
    assert not list(tmp_path.iterdir())  # nothing written into the current folder


def _merge_script():
    return load_script(ROOT / "utils" / "merge_depth_width.py")


@pytest.mark.parametrize("case", ["a folder", "under a file", "empty"])
def test_merge_out_must_be_a_writable_file(tmp_path, capsys, case):
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "folder").mkdir()
    out = {"a folder": tmp_path / "folder", "under a file": tmp_path / "afile" / "s.npy", "empty": ""}[case]
    assert _merge_script().main(["--out", str(out), "--depth", str(tmp_path / "missing.npy")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--out" in err[0], err
    assert (tmp_path / "afile").read_text() == "a file" and not any((tmp_path / "folder").iterdir())


# ----------------------------------------------------------------------------------------------
# Noise: argparse errors are one line, a good run's stderr is this project's logging only
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--bits", "x"], "--bits"),
    (["--bits"], "--bits"),
    (["--learning_rate", "abc"], "--learning_rate"),
    (["--do_train", "maybe"], "--do_train"),
    (["--output_dir"], "--output_dir"),
])
def test_argparse_errors_are_usage_errors(argv, flag):
    from amoeba.args import parse_args

    with pytest.raises(UsageError) as err:
        parse_args(argv)
    assert err.value.flag == flag and "\n" not in str(err.value)


def test_argparse_error_prints_one_line():
    proc = run_main("--bits", "x")
    assert_usage_error(proc, "--bits", "'x'")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]  # no usage text before it


# what stderr may hold on a run that succeeds: this project's log lines and progress bars
OWN_LOG = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) amoeba\.")
PROGRESS = re.compile(r"^\s*[^|]*\d+%\|.*\|")
NOISE = ("gemm_4bit_forward", "kernels-community", "FutureWarning", "DeprecationWarning", "UserWarning",
         "gradient_checkpointing", "usage:")


def test_a_successful_training_run_prints_nothing_but_its_own_log(tmp_path, tiny):
    """The default --gradient_checkpointing on, one step: stderr holds no library warning (the bitsandbytes CPU
    kernel notice, transformers' deprecation of the checkpointing names) and nothing else that is not ours."""
    proc = run_main("--model_name_or_path", str(tiny / "model"), "--output_dir", str(tmp_path / "run"),
                    "--dataset", str(tiny / "data.jsonl"), "--do_train", "True", "--max_steps", "1",
                    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                    "--source_max_len", "16", "--target_max_len", "4", "--lora_r", "2", "--save_strategy", "no",
                    "--dataloader_num_workers", "0", "--optim", "adamw_torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model").is_dir() and (tmp_path / "run" / "run_args.json").is_file()
    for needle in NOISE:
        assert needle not in proc.stderr, proc.stderr[-3000:]
    foreign = [seg for seg in re.split(r"[\r\n]+", proc.stderr)
               if seg.strip() and not OWN_LOG.match(seg) and not PROGRESS.match(seg)]
    assert not foreign, foreign


def test_the_package_builds_without_setuptools_warnings(tmp_path):
    """pyproject.toml says what setuptools needs (an SPDX license, the data folders as package data): building
    the package prints no warning, and the wheel holds the lm-eval templates and the offline data sample."""
    import shutil
    import subprocess
    import sys
    import zipfile

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject.toml needs setuptools 77 or newer (pip's isolated build installs it)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "amoeba", src / "amoeba", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if re.search(r"\w+Warning\b", ln)]
    assert not warnings, warnings
    names = zipfile.ZipFile(tmp_path / "dist" / proc.stdout.split()[-1]).namelist()
    assert "amoeba/lm_eval_tasks/mmlu_subject.yaml.tmpl" in names and "amoeba/sample_data/NOTICE.md" in names
    data = [p for p in (ROOT / "amoeba" / "sample_data").rglob("*") if p.is_file()]
    assert all(f"amoeba/{p.relative_to(ROOT / 'amoeba').as_posix()}" in names for p in data)
    assert not [n for n in names if "__pycache__" in n]


def test_lm_eval_in_memory_model_warnings_are_dropped_and_nothing_else(caplog):
    """lm-eval warns twice when handed a model object (what evaluation does on purpose): those two go, its other
    warnings stay."""
    import logging

    from amoeba.lm_eval_runner import _quiet_in_memory_model_warnings

    _quiet_in_memory_model_warnings()
    _quiet_in_memory_model_warnings()  # idempotent: one filter
    hf = logging.getLogger("lm_eval.models.huggingface")
    assert len(hf.filters) == 1
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.huggingface"):
        hf.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
        hf.warning("Passed an already-initialized model through `pretrained`, assuming single-process call")
        hf.warning("something else about the user's task")
    assert [r.getMessage() for r in caplog.records] == ["something else about the user's task"]
