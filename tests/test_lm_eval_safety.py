"""Names from data folders never reach a generated lm-eval config unchecked, values are written as YAML
values, and lm-eval tasks run offline: from the configs a user hands in (``--lm_eval_include_path``), or
else they stop with one line before any model is loaded."""

from __future__ import annotations

import glob
import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml

from amoeba.errors import UsageError
from amoeba.lm_eval_tasks import LOCAL_TASKS, render_tasks
from amoeba.mmlu import load_mmlu
from tests.conftest import ROOT
from tests.test_cli import assert_usage_error, run_main, tiny_folder  # noqa: F401 (tiny_folder: a fixture)

SAMPLE = ROOT / "amoeba" / "sample_data"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MARKER = "PWNED"
# A file name that lm-eval, given it as the MMLU description, would run as a shell command (creating MARKER in
# the working folder). No "_" (the old description split on it), no "/" (a file name), no "[*?" (globs).
PAYLOAD = 'a{{(lipsum|attr("\\x5f\\x5fglobals\\x5f\\x5f")).os.system("touch ' + MARKER + '")}}'
UNSAFE_NAMES = [
    PAYLOAD,
    "x\ntask: evil",  # YAML injection through a newline
    "abc\n",          # a trailing newline, which "^...$" would let through
    "Formal_Logic",
    "formal-logic",
    "formal logic",
    "a: {b}",
    "",               # "_test.csv"
    "logique_é",
]


def _mmlu_data(root: Path, subjects=("formal_logic",)) -> Path:
    """A data directory holding a few of the sample's MMLU CSVs."""
    for split in ("test", "dev", "val"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            shutil.copyfile(SAMPLE / "mmlu" / split / f"{s}_{split}.csv", root / "mmlu" / split / f"{s}_{split}.csv")
    return root


def _plant(data: Path, name: str, splits=("test", "dev")) -> None:
    for split in splits:
        shutil.copyfile(SAMPLE / "mmlu" / split / f"formal_logic_{split}.csv",
                        data / "mmlu" / split / f"{name}_{split}.csv")


def _assert_refused(err: pytest.ExceptionInfo, name: str, split: str) -> None:
    message = str(err.value)
    assert message.startswith("--data_dir: ") and "\n" not in message, message
    assert f"_{split}.csv" in message and ascii(name) in message and "not a safe name" in message, message


# ------------------------------------------------------------------------------------------------------
# Names from data files
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=ascii)
def test_unsafe_subject_file_names_are_refused_by_every_reader(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # where the payload would leave its marker
    data = _mmlu_data(tmp_path / "data")
    _plant(data, name, ("test", "dev", "val"))
    dest = tmp_path / "tasks"
    with pytest.raises(UsageError) as err:
        render_tasks(["mmlu"], data, dest)
    _assert_refused(err, name, "test")
    assert not list(dest.glob("mmlu*.yaml"))  # nothing rendered
    for split, shots, where in (("test", 0, "test"), ("eval", 0, "val"), ("test", 5, "test")):
        with pytest.raises(UsageError) as err:
            load_mmlu(split, shots, data)
        _assert_refused(err, name, where)
    assert not (tmp_path / MARKER).exists()


def test_an_unsafe_name_among_the_exemplars_is_refused(tmp_path):
    data = _mmlu_data(tmp_path / "data")
    _plant(data, "formal logic", ("dev",))
    assert load_mmlu("test", 0, data)  # zero-shot never reads dev
    with pytest.raises(UsageError) as err:
        load_mmlu("test", 5, data)
    _assert_refused(err, "formal logic", "dev")


def test_payload_file_name_stops_the_run_before_anything_runs(tiny_folder, tmp_path):
    data = _mmlu_data(tmp_path / "data")
    _plant(data, PAYLOAD)
    run = tmp_path / "run"
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(run), "--do_train", "False",
                    "--do_lm_eval", "True", "--do_lm_eval_task", "mmlu", "--lm_eval_limit", "1",
                    "--data_dir", str(data), cwd=tmp_path, env_extra=OFFLINE)
    assert_usage_error(proc, "--data_dir", f"{PAYLOAD}_test.csv", "not a safe name")
    assert not (tmp_path / MARKER).exists()
    assert not run.exists()  # refused before the output folder (and the model) was touched


# Every character YAML, Jinja or a glob gives a meaning to, plus text outside the Basic Multilingual Plane
# (a JSON string escapes it as a surrogate pair, which YAML rejects).
WEIRD_DIR = "d: #x 'q' \"dq\" {{ 7 }} {% x %} & ! | > % @ ` [1] * ? , é 😀"


def test_data_paths_with_yaml_special_characters_stay_values(tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / WEIRD_DIR
    for sub in ("arc", "piqa", "hellaswag"):
        shutil.copytree(SAMPLE / sub, data / sub)
    _mmlu_data(data)
    dest = render_tasks(list(LOCAL_TASKS), data, tmp_path / "tasks")
    manager = TaskManager(include_path=str(dest), include_defaults=False)
    loaded = manager.load(["arc_easy", "piqa", "hellaswag", "mmlu"])["tasks"]
    expected = {
        "arc_easy": (data / "arc" / "ARC-Easy-Test.jsonl", "test",
                     len((SAMPLE / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines())),
        "piqa": (data / "piqa" / "valid.jsonl", "validation",
                 len((SAMPLE / "piqa" / "valid.jsonl").read_text().splitlines())),
        "hellaswag": (data / "hellaswag" / "hellaswag_val_full.jsonl.gz", "validation",
                      len(gzip.open(SAMPLE / "hellaswag" / "hellaswag_val_full.jsonl.gz", "rt").read().splitlines())),
        "mmlu_formal_logic": (data / "mmlu" / "test" / "formal_logic_test.csv", "test",
                              sum(e.subject == "formal_logic" for e in load_mmlu("test", 0, SAMPLE))),
    }
    for name, (path, split, n) in expected.items():
        task = loaded[name]
        # the path lm-eval hands to `datasets` matches this one file only, and every row loads
        assert task.config.dataset_kwargs["data_files"][split] == glob.escape(str(path.resolve()))
        assert len(list(task.eval_docs)) == n, name
    assert loaded["mmlu_formal_logic"].config.description == (
        "The following are multiple choice questions (with answers) about formal logic.\n\n")
    assert json.loads((dest / "local_paths.json").read_text())["piqa_labels"] == str(
        (data / "piqa" / "valid-labels.lst").resolve())


# ------------------------------------------------------------------------------------------------------
# Tasks offline
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, data_dir, needles", [
    ("winogrande", "from-env", ["winogrande", "offline", "--lm_eval_include_path DIR"]),
    ("arc_easy", "", ["arc_easy", "--data_dir", "--lm_eval_include_path DIR"]),
])
def test_task_without_offline_data_is_one_line_before_the_model_loads(tiny_folder, tmp_path, task, data_dir,
                                                                        needles):
    run = tmp_path / "run"
    env = dict(OFFLINE, HF_HOME=str(tmp_path / "hf"))  # an empty cache: nothing can come from there
    if data_dir == "":
        env["AMOEBA_DATA_DIR"] = ""
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(run), "--do_train", "False",
                    "--do_lm_eval", "True", "--do_lm_eval_task", task, "--lm_eval_limit", "2", env_extra=env)
    assert_usage_error(proc, "--do_lm_eval_task", *needles)
    assert not run.exists()


QUESTIONS = [("w1 w2 w3", ["w4", "w5"], 0), ("w6 w7", ["w8", "w9", "w10"], 2), ("w11", ["w12", "w13"], 1),
             ("w14 w15", ["w16", "w17"], 1), ("w18 w19 w20", ["w21", "w22"], 0)]


def _task_config(name: str, data_file: Path) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "output_type": "multiple_choice", "test_split": "test",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "label", "doc_to_choice": "choices",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


@pytest.fixture(scope="module")
def own_tasks(tmp_path_factory) -> Path:
    """A user's folder of lm-eval task configs over a small local jsonl: ``tiny_mc``, ``winogrande`` and
    ``arc_easy`` (the same questions under stock names) and ``broken_mc`` (its data file is missing)."""
    root = tmp_path_factory.mktemp("own_tasks")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    folder = root / "tasks"
    folder.mkdir()
    for name, path in (("tiny_mc", data), ("winogrande", data), ("arc_easy", data),
                       ("broken_mc", root / "missing.jsonl")):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(_task_config(name, path), sort_keys=False))
    return folder


def test_own_task_configs_run_offline_through_the_evaluation(tiny_folder, own_tasks, tmp_path):
    run = tmp_path / "run"
    env = dict(OFFLINE, HF_HOME=str(tmp_path / "hf"))
    proc = run_main("--model_name_or_path", str(tiny_folder), "--output_dir", str(run), "--do_train", "False",
                    "--do_lm_eval", "True", "--do_lm_eval_task", "tiny_mc,winogrande",
                    "--lm_eval_include_path", str(own_tasks), env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("tiny_mc_acc_l4w1", "winogrande_acc_l4w1"):
        assert 0.0 <= metrics[key] <= 1.0, metrics
    assert metrics["tiny_mc_acc_l4w1"] == metrics["winogrande_acc_l4w1"]  # the same questions, the same model


def test_own_task_configs_take_precedence_and_broken_ones_are_one_line(own_tasks):
    from amoeba.lm_eval_runner import LMEvalTasks

    tasks = LMEvalTasks(["arc_easy", "tiny_mc", "piqa"], str(SAMPLE), str(own_tasks))
    try:
        assert (tasks.user, tasks.local, tasks.hub) == (["arc_easy", "tiny_mc"], ["piqa"], [])
    finally:
        tasks.close()
    broken = LMEvalTasks(["broken_mc"], str(SAMPLE), str(own_tasks))
    with pytest.raises(UsageError) as err:
        broken.check_data()
    message = str(err.value)
    assert message.startswith("--lm_eval_include_path: ") and "broken_mc" in message and "\n" not in message
    with pytest.raises(UsageError, match="'tiny_mcq' \\(closest: tiny_mc.*not in lm-eval's tasks nor in the configs"):
        LMEvalTasks(["tiny_mcq"], str(SAMPLE), str(own_tasks))


@pytest.mark.parametrize("value", ["missing", "", "a_file"])
def test_include_path_must_be_a_folder(tmp_path, capsys, value):
    import main

    (tmp_path / "a_file").write_text("task: x\n")
    path = str(tmp_path / value) if value else ""
    code = main.main(["--output_dir", str(tmp_path / "run"), "--do_train", "False", "--do_lm_eval", "True",
                      "--lm_eval_include_path", path])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--lm_eval_include_path: no such folder" in lines[0]
    assert not (tmp_path / "run").exists()
