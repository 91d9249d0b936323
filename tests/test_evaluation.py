"""Evaluation of subnets: WikiText-2 and lm-eval parity with plain transformers/lm-eval, determinism,
metric keys for a grid, the report, and bad input through main.py."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amoeba.args import parse_args
from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.evaluation import evaluate_shape
from amoeba.lm_eval_runner import LMEvalRunner, lm_eval_keys
from amoeba.stages.evaluation import evaluation_shapes, run_evaluation
from amoeba.subnet import Subnet
from conftest import ROOT, tiny_model

DATA = Path(os.environ["AMOEBA_DATA_DIR"])
LAYERS = 4


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_model_dir))


def _model():
    return tiny_model("gqa", layers=LAYERS, vocab_size=49152, max_position_embeddings=128)


def _args(out, *extra):
    return parse_args(["--output_dir", str(out), "--do_train", "False", *extra])


class _Strategy:
    """Depth masks as a strategy file holds them: {removed: 0/1 mask over all layers}."""

    def __init__(self, masks):
        self.layer_masks = masks

    def widths(self):
        return []


def test_wikitext2_perplexity_equals_plain_transformers(tokenizer, tmp_path):
    from amoeba.evaluation import wikitext2_windows

    plain = _model()
    model = copy.deepcopy(plain)
    em = make_elastic(model)
    args = _args(tmp_path, "--do_eval_wikitext2", "True")
    windows = wikitext2_windows(model, tokenizer, args.data_dir)
    assert windows.shape[1] == 128  # the model's maximum (128) is below the seed's 2048
    windows = windows[:12]
    res = evaluate_shape(model, tokenizer, em, em.full_subnet(), wikitext_windows=windows, batch_size=5)
    with torch.no_grad():  # reference: transformers' own shifted loss, one window at a time
        losses = [plain(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert res.metrics["wikitext2_ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    # a shallower shape is a different model: its perplexity must differ
    shallow = evaluate_shape(model, tokenizer, em, Subnet((0, 1, 2)), wikitext_windows=windows, batch_size=5)
    assert shallow.metrics["wikitext2_ppl"] != pytest.approx(res.metrics["wikitext2_ppl"], rel=1e-4)


def test_lm_eval_through_the_elastic_model_equals_lm_eval_on_the_plain_model(tokenizer, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from amoeba.lm_eval_tasks import render_tasks

    tasks = ["arc_easy", "piqa", "hellaswag"]
    plain = _model()
    model = copy.deepcopy(plain)
    em = make_elastic(model)
    folder = render_tasks(tasks, DATA, tmp_path / "tasks")
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=plain, tokenizer=tokenizer, batch_size=4), tasks=tasks,
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                                  limit=3, log_samples=False, bootstrap_iters=1000)
    expected = lm_eval_keys(ref["results"])
    assert {"arc_easy_acc", "arc_easy_acc_norm", "piqa_acc", "piqa_acc_norm", "hellaswag_acc",
            "hellaswag_acc_norm"} <= expected.keys()
    args = _args(tmp_path / "run", "--do_lm_eval", "True", "--do_lm_eval_task", ",".join(tasks),
                 "--lm_eval_limit", "3", "--per_device_eval_batch_size", "4")
    got = run_evaluation(args, model, tokenizer, em, None)
    for key, value in expected.items():
        assert got[f"{key}_l{LAYERS}w1"] == pytest.approx(value, abs=1e-9), key


def test_offline_lm_eval_mmlu_docs_match_our_mmlu_questions(tmp_path):
    from lm_eval.tasks import TaskManager

    from amoeba.lm_eval_tasks import render_tasks
    from amoeba.mmlu import load_mmlu

    folder = render_tasks(["mmlu"], DATA, tmp_path / "tasks")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert "mmlu" in manager.all_groups and len([t for t in manager.all_subtasks if t.startswith("mmlu_")]) == 57
    task = manager.load(["mmlu_college_mathematics"])["tasks"]["mmlu_college_mathematics"]
    docs = list(task.eval_docs)
    ours = [e for e in load_mmlu("test", 0, DATA) if e.subject == "college_mathematics"]
    assert len(docs) == len(ours) == 100
    for doc, e in zip(docs, ours):
        assert doc["answer"] == e.answer
        body = task.doc_to_text(doc)  # lm-eval strips the question; ours keeps it verbatim
        assert e.prompt.endswith(body.split("\nA. ", 1)[1]) and doc["question"].strip() in e.prompt
    assert any(c == "None" for doc in docs for c in doc["choices"])  # kept as text, not NaN


def test_grid_keys_determinism_report_and_merge(tokenizer, tmp_path):
    model = _model()
    em = make_elastic(model)
    masks = {0: [1, 1, 1, 1], 1: [1, 0, 1, 1], 2: [1, 0, 0, 1]}
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"earlier_result": 1.5}))
    args = _args(out, "--do_mmlu_eval", "True", "--mmlu_dataset", "mmlu-zs", "--max_mmlu_samples", "4",
                 "--do_lm_eval", "True", "--do_lm_eval_task", "piqa", "--lm_eval_limit", "1",
                 "--enable_shrinking", "--min_num_layer", "2", "--shrinking_method", "calib_dp",
                 "--shrinkable_width", "--width_choice", "[1,3/4]",
                 "--eval_num_layer", "4,2", "--eval_num_width", "1,3/4")
    first = run_evaluation(args, model, tokenizer, em, _Strategy(masks))
    labels = ["l4w1", "l4w0.75", "l2w1", "l2w0.75"]
    for label in labels:
        for metric in ("mmlu_test_accuracy", "mmlu_loss", "piqa_acc", "piqa_acc_norm", "params",
                       "mmlu_test_accuracy_abstract_algebra"):
            assert f"{metric}_{label}" in first, f"{metric}_{label}"
    # the 2-layer shape runs the strategy's layers 0 and 3, not the first two
    assert first["params_l2w1"] == em.param_count(Subnet((0, 3)))
    assert first["params_l4w0.75"] < first["params_l4w1"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["earlier_result"] == 1.5 and all(saved[k] == v for k, v in first.items())
    second = run_evaluation(args, model, tokenizer, em, _Strategy(masks))
    assert second == first  # same numbers twice
    table = (out / "results.md").read_text()
    for label in labels:
        assert f"| {label} |" in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert em.subnet == em.full_subnet()  # evaluation leaves the model as it found it


def test_resume_measures_only_what_metrics_json_lacks(tokenizer, tmp_path, monkeypatch):
    import amoeba.evaluation

    model = _model()
    em = make_elastic(model)
    masks = {0: [1, 1, 1, 1], 2: [1, 0, 0, 1]}
    out = tmp_path / "run"
    flags = ["--do_mmlu_eval", "True", "--mmlu_dataset", "mmlu-zs", "--max_mmlu_samples", "4",
             "--do_lm_eval", "True", "--do_lm_eval_task", "piqa", "--lm_eval_limit", "2",
             "--enable_shrinking", "--min_num_layer", "2", "--shrinking_method", "calib_dp", "--eval_num_layer", "4,2"]
    args = _args(out, *flags, "--eval_skip_existing")
    # a first run that stops in lm-eval's second shape keeps the first shape's lm-eval metrics
    real_run, calls = LMEvalRunner.run, []

    def failing_run(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return real_run(self)

    monkeypatch.setattr(LMEvalRunner, "run", failing_run)
    with pytest.raises(RuntimeError, match="stopped"):
        run_evaluation(args, model, tokenizer, em, _Strategy(masks))
    saved = json.loads((out / "metrics.json").read_text())
    assert "piqa_acc_l4w1" in saved and "mmlu_test_accuracy_l2w1" in saved and "piqa_acc_l2w1" not in saved
    # the resumed run measures only l2w1's lm-eval (and, its record removed, l4w1's MMLU)
    del saved["mmlu_test_accuracy_l4w1"]
    (out / "metrics.json").write_text(json.dumps(saved))
    scored, real_score = [], amoeba.evaluation.score_mmlu

    def counting_score(*a, **k):
        scored.append(1)
        return real_score(*a, **k)

    monkeypatch.setattr(amoeba.evaluation, "score_mmlu", counting_score)
    calls.clear()
    monkeypatch.setattr(LMEvalRunner, "run", lambda self: (calls.append(1), real_run(self))[1])
    resumed = run_evaluation(args, model, tokenizer, em, _Strategy(masks))
    assert len(scored) == 1 and len(calls) == 1
    assert "piqa_acc_l2w1" in resumed and "piqa_acc_l4w1" not in resumed and "mmlu_test_accuracy_l4w1" in resumed
    # the same numbers as one uninterrupted run
    full = run_evaluation(_args(tmp_path / "fresh", *flags), model, tokenizer, em, _Strategy(masks))
    final = json.loads((out / "metrics.json").read_text())
    for key, value in full.items():
        assert final[key] == pytest.approx(value, abs=1e-9), key
    def table(folder):  # the rows, without the line of measured seconds
        return [x for x in (folder / "results.md").read_text().splitlines() if x.startswith("|")]

    assert table(out) == table(tmp_path / "fresh") and len(table(out)) == 4


def test_mmlu_reports_the_test_split_by_default_and_records_the_strategy_calibration(tokenizer, tmp_path, caplog):
    """An evaluation run reports MMLU test (what papers report), not the validation split the layer DP
    calibrates on by default; metrics.json records how the strategy was calibrated; reporting the
    calibration split on purpose warns."""
    import logging

    import numpy as np

    from amoeba.strategy import Strategy

    model = _model()
    em = make_elastic(model)
    record = {"method": "dp", "dataset": "mmlu", "split": "validation", "metric": "acc", "questions": 320}
    strategy = Strategy({0: np.ones(LAYERS, dtype=np.float32)}, calibration={"layers": record},
                        source=str(tmp_path / "dp_selection_strategy.npy"))
    flags = ["--do_mmlu_eval", "True", "--mmlu_dataset", "mmlu-zs", "--max_mmlu_samples", "2"]
    assert parse_args(["--do_train", "True"]).evaluation.mmlu_split == "eval"  # a run that trains: validation
    args = _args(tmp_path / "default", *flags)
    assert args.evaluation.mmlu_split == "test"
    with caplog.at_level(logging.WARNING, logger="amoeba.evaluation"):
        got = run_evaluation(args, model, tokenizer, em, strategy)
    assert "mmlu_test_accuracy_l4w1" in got and not any(k.startswith("mmlu_eval") for k in got)
    saved = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert saved["strategy_calibration"] == {"strategy_file": "dp_selection_strategy.npy", "layers": record}
    assert not [r for r in caplog.records if "calibrated on" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amoeba.evaluation"):
        got = run_evaluation(_args(tmp_path / "eval", *flags, "--mmlu_split", "eval"), model, tokenizer, em, strategy)
    assert "mmlu_eval_accuracy_l4w1" in got
    warned = [r.getMessage() for r in caplog.records if "calibrated on" in r.getMessage()]
    assert len(warned) == 1 and "validation" in warned[0]
    # a strategy without a record (older files) leaves none behind in metrics.json
    run_evaluation(_args(tmp_path / "default", *flags), model, tokenizer, em, Strategy({0: np.ones(LAYERS)}))
    assert "strategy_calibration" not in json.loads((tmp_path / "default" / "metrics.json").read_text())


def test_shape_validation_names_the_flag(tmp_path):
    model = _model()
    em = make_elastic(model)
    base = ["--enable_shrinking", "--min_num_layer", "3"]
    with pytest.raises(UsageError, match="--eval_num_layer: 2 outside"):
        evaluation_shapes(_args(tmp_path, *base, "--eval_num_layer", "2"), em)
    with pytest.raises(UsageError, match="--eval_num_width: 0.5 not among --width_choice"):
        evaluation_shapes(_args(tmp_path, *base, "--shrinkable_width", "--width_choice", "[1,3/4]",
                                "--eval_num_width", "0.5"), em)
    with pytest.raises(UsageError, match="without --shrinkable_width"):
        evaluation_shapes(_args(tmp_path, *base, "--eval_num_width", "0.75"), em)
    with pytest.raises(UsageError, match="no 3-layer subnet"):
        evaluation_shapes(_args(tmp_path, *base, "--shrinking_method", "calib_dp", "--eval_num_layer", "3"), em,
                          _Strategy({0: [1, 1, 1, 1], 2: [1, 0, 0, 1]}))
    shapes = evaluation_shapes(_args(tmp_path, *base, "--shrinking_method", "first_layers",
                                     "--eval_num_layer", "3"), em)
    assert shapes == [Subnet((0, 1, 2), 1.0)]
    # a list of shapes instead of a grid, in the given order
    shapes = evaluation_shapes(_args(tmp_path, *base, "--shrinking_method", "first_layers", "--shrinkable_width",
                                     "--width_choice", "[1,3/4]", "--eval_shapes", "4x3/4,3x1"), em)
    assert shapes == [Subnet((0, 1, 2, 3), 0.75), Subnet((0, 1, 2), 1.0)]
    with pytest.raises(UsageError, match="--eval_num_layer: 2 outside"):
        evaluation_shapes(_args(tmp_path, *base, "--eval_shapes", "4x1,2x1"), em)
    with pytest.raises(UsageError, match="--eval_shapes.*LAYERSxWIDTH"):
        _args(tmp_path, *base, "--eval_shapes", "4-1")
    with pytest.raises(UsageError, match="--eval_shapes.*not both"):
        _args(tmp_path, *base, "--eval_shapes", "4x1", "--eval_num_layer", "3")
    # with FLAP plans on the model, only their ratios are valid widths
    em.add_width_plan(0.5, [2] * LAYERS, [48] * LAYERS)
    with pytest.raises(UsageError, match="not among the strategy's widths \\(1, 0.5\\)"):
        evaluation_shapes(_args(tmp_path, *base, "--shrinkable_width", "--eval_num_width", "0.75"), em)


def test_unknown_lm_eval_task_lists_the_closest_names(tokenizer):
    with pytest.raises(UsageError, match="'arc_esay' \\(closest: arc_easy"):
        LMEvalRunner(_model(), tokenizer, ["arc_esay"], str(DATA))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_model")
    _model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--enable_shrinking", "--min_num_layer", "3", "--eval_num_layer", "2"], "--eval_num_layer"),
    (["--use_moe_lora"], "no trained adapters"),
])
def test_bad_input_exits_2_with_one_line(tiny_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "main.py"), "--model_name_or_path", str(tiny_dir), "--output_dir", str(out),
           "--do_train", "False", "--do_mmlu_eval", "True", "--max_mmlu_samples", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists()


def test_damaged_metrics_file_is_refused_and_kept(tmp_path):
    model = _model()
    em = make_elastic(model)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(UsageError, match="metrics.json"):
        run_evaluation(_args(tmp_path, "--do_mmlu_eval", "True"), model, None, em, None)
    assert (tmp_path / "metrics.json").read_text() == "{not json"


@pytest.mark.real_model
def test_seed_evaluation_command_on_smollm2(real_model_dir, tmp_path):
    """The seed's evaluation command (without --bits 8, which needs CUDA) at 24 layers, width 7/8."""
    strategy = ROOT / "dp_selection_strategy.npy"
    if not strategy.is_file():  # a depth-only stand-in: widths are then uniform over --width_choice
        import numpy as np

        from amoeba.strategy import Strategy, save_strategy

        masks = {m: np.array([1.0] * (29 - m) + [0.0] * m + [1.0], dtype=np.float32) for m in range(13)}
        strategy = save_strategy(Strategy(layer_masks=masks, metric={m: 0.0 for m in masks}),
                                 tmp_path / "strategy.npy", view=False)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main.py"), "--model_name_or_path", str(real_model_dir),
           "--output_dir", str(out), "--do_train", "False", "--do_eval", "True", "--do_mmlu_eval", "True",
           "--bf16", "--enable_shrinking", "--min_num_layer", "18", "--shrinking_method", "calib_dp",
           "--shrinking_file", str(strategy), "--shrinkable_width", "--width_choice", "[1,7/8,3/4,5/8]",
           "--prune_width_method", "flap", "--eval_num_layer", "24", "--eval_num_width", "0.875",
           "--do_lm_eval", "True", "--do_lm_eval_task", "arc_easy,piqa,hellaswag",
           "--lm_eval_limit", "2", "--max_mmlu_samples", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mmlu_test_accuracy_l24w0.875", "arc_easy_acc_l24w0.875", "piqa_acc_norm_l24w0.875",
                "hellaswag_acc_norm_l24w0.875", "params_l24w0.875"):
        assert key in metrics, key
    assert metrics["params_l24w0.875"] < 0.85 * 134_515_008  # fewer layers and narrower than the full model
    assert (out / "results.md").is_file() and (out / "frontier.png").is_file()


def test_report_covers_earlier_shapes_and_marks_the_frontier(tmp_path):
    from amoeba.report import markdown_table, pareto_front, rows_from_metrics, sort_rows, write_report

    metrics = {"params_l4w1": 100.0, "piqa_acc_norm_l4w1": 0.6, "wikitext2_ppl_l4w1": 10.0,
               "params_l3w0.75": 60.0, "piqa_acc_norm_l3w0.75": 0.55, "wikitext2_ppl_l3w0.75": 14.0,
               "params_l3w1": 80.0, "piqa_acc_norm_l3w1": 0.5, "other_key": 3.0}
    rows = sort_rows(rows_from_metrics(metrics, ["piqa_acc_norm", "wikitext2_ppl"], skip=["l3w1"]))
    assert [r.label for r in rows] == ["l4w1", "l3w0.75"]
    assert rows[1].layers == 3 and rows[1].width == "0.75" and rows[1].headline == {
        "piqa_acc_norm": 0.55, "wikitext2_ppl": 14.0}
    table = markdown_table(rows, total_params=100)
    assert "| l3w0.75 | 3 | 0.75 | 0.00 | 0.600 | 0.5500 | 14.000 |" in table
    # frontier: (params, score); for accuracy higher is better, for perplexity lower
    pts = [(100, 0.6), (60, 0.55), (80, 0.5), (90, 0.7)]
    assert pareto_front(pts, lower=False) == [1, 3]
    assert pareto_front([(100, 10.0), (60, 14.0), (80, 15.0)], lower=True) == [1, 0]
    paths = write_report(tmp_path, rows, total_params=100)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG" and "l4w1" in paths["table"].read_text()
