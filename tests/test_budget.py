"""Choosing a shape for a budget: the fitting shapes, their ranking, and the export of the best."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from amoeba.args import parse_args
from amoeba.budget import choose, exported_param_count, lower_is_better, parse_param_budget, strategy_scores
from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.export import EXPORT_RECORD, slice_subnet
from amoeba.stages.deployment import budget_candidates, run_budget
from amoeba.subnet import Subnet
from tests.conftest import REAL_MODEL_DIR, tiny_model


def _setup(nonuniform=False):
    """A tiny elastic model with a width plan 0.5 and a strategy of depths 4, 3, 2."""
    model = tiny_model("gqa", 4)
    em = make_elastic(model)
    if nonuniform:
        em.add_width_plan(0.5, [1, 2, 3, 2], [30, 60, 40, 50])
    else:
        em.add_width_plan(0.5, [em.num_kv_groups // 2] * 4, [em.intermediate_size // 2] * 4)
    strategy = SimpleNamespace(layer_masks={0: np.ones(4), 1: np.array([1, 1, 0, 1.0]), 2: np.array([1, 0, 0, 1.0])},
                               metric={1: 11.0, 2: 15.0}, widths=[1.0, 0.5])
    return model, em, strategy


def _args(tmp_path, *extra):
    return parse_args(["--output_dir", str(tmp_path), "--do_train", "False", "--shrinking_method", "calib_dp",
                       *extra])


def test_param_budget_forms():
    assert parse_param_budget("1.5e6", 10_000_000) == 1_500_000
    assert parse_param_budget("0.25", 1000) == 250
    assert parse_param_budget("60%", 1000) == 600
    for bad in ("abc", "-3", "0"):
        with pytest.raises(UsageError, match="--budget_params"):
            parse_param_budget(bad, 1000, "--budget_params")


def test_metric_direction():
    assert lower_is_better("wikitext2_ppl") and lower_is_better("mmlu_eval_loss")
    assert not lower_is_better("mmlu_eval_accuracy")
    _, em, strategy = _setup()
    scores, higher = strategy_scores(em, strategy)
    assert scores == {3: 11.0, 2: 15.0} and higher is False  # grows with removals: a perplexity


def test_ranking_by_evaluation_metric(tmp_path):
    model, em, strategy = _setup()
    metrics = {"mmlu_eval_accuracy_l4w1": 0.50, "mmlu_eval_accuracy_l4w0.5": 0.41,
               "mmlu_eval_accuracy_l3w1": 0.45, "mmlu_eval_accuracy_l3w0.5": 0.30,
               "mmlu_eval_accuracy_l2w1": 0.33, "wikitext2_ppl_l4w1": 9.0}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    args = _args(tmp_path)
    ranked, info = budget_candidates(args, em, strategy)
    assert info["metric"] == "mmlu_eval_accuracy" and info["higher_is_better"]
    assert [c.label for c in ranked] == ["l4w1", "l3w1", "l4w0.5", "l2w1", "l3w0.5", "l2w0.5"]  # unscored last
    full = em.param_count(em.full_subnet())
    budget = int(0.8 * full)
    fitting = choose(ranked, budget, None)
    assert all(c.export_params <= budget for c in fitting)
    assert [c for c in ranked if c not in fitting] and all(c.export_params > budget for c in ranked
                                                           if c not in fitting)
    assert fitting[0].label == "l3w1"  # the best accuracy among those that fit
    # Perplexity ranks lower-first.
    args = _args(tmp_path, "--budget_metric", "wikitext2_ppl")
    ranked, info = budget_candidates(args, em, strategy)
    assert not info["higher_is_better"] and ranked[0].label == "l4w1" and ranked[0].score == 9.0


def test_calibration_scores_without_evaluation(tmp_path):
    model, em, strategy = _setup()
    ranked, info = budget_candidates(_args(tmp_path), em, strategy)
    assert info["metric"] == "calibration"
    scored = [c.label for c in ranked if c.score is not None]
    assert scored == ["l3w1", "l2w1"]  # lower calibration perplexity first; the full depth has no score


def test_latency_budget_uses_the_table(tmp_path):
    model, em, strategy = _setup()
    table = {"rows": {"l4w1": {"decode_b1_compiled_ms": 10.0}, "l3w1": {"decode_b1_compiled_ms": 7.6},
                      "l4w0.5": {"decode_b1_compiled_ms": 6.0}, "l2w0.5": {"decode_b1_compiled_ms": 3.0}}}
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(table))
    (tmp_path / "metrics.json").write_text(json.dumps({"arc_easy_acc_l4w1": 0.6, "arc_easy_acc_l3w1": 0.55,
                                                       "arc_easy_acc_l4w0.5": 0.5, "arc_easy_acc_l2w0.5": 0.3}))
    args = _args(tmp_path, "--budget_latency_ms", "7", "--latency_table", str(path),
                 "--export_dir", str(tmp_path / "best"))
    fitting = run_budget(args, model, None, em, strategy)
    assert [c.label for c in fitting] == ["l4w0.5", "l2w0.5"]  # shapes missing from the table never fit
    record = json.loads((tmp_path / "best" / EXPORT_RECORD).read_text())
    assert record["shape"]["label"] == "l4w0.5" and record["budget"]["budget_latency_ms"] == 7.0
    lines = (tmp_path / "budget.md").read_text().splitlines()
    ranks = [ln for ln in lines if ln.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert len(ranks) == 2 and "l4w0.5" in ranks[0]
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert len(saved["all"]) == 6 and len(saved["fitting"]) == 2


def test_bad_budgets_are_refused(tmp_path):
    model, em, strategy = _setup()
    with pytest.raises(UsageError, match="--budget_params.*no shape fits"):
        run_budget(_args(tmp_path, "--budget_params", "100"), model, None, em, strategy)
    with pytest.raises(UsageError, match="--budget_latency_ms.*--latency_table"):
        run_budget(_args(tmp_path, "--budget_latency_ms", "5"), model, None, em, strategy)
    (tmp_path / "lat.json").write_text(json.dumps({"rows": {"l4w1": {"prefill_512_ms": 3.0}}}))
    with pytest.raises(UsageError, match="--latency_key.*prefill_512_ms"):
        run_budget(_args(tmp_path, "--budget_latency_ms", "5", "--latency_table", str(tmp_path / "lat.json")),
                   model, None, em, strategy)
    with pytest.raises(UsageError, match="--budget_metric"):
        run_budget(_args(tmp_path, "--budget_params", "0.9", "--budget_metric", "nope"), model, None, em, strategy)


def test_exported_param_count_matches_the_export():
    model, em, strategy = _setup(nonuniform=True)
    subnet = Subnet((0, 1, 3), 0.5)
    exact = exported_param_count(em, subnet)
    assert exact == slice_subnet(model, em, subnet).param_count == em.param_count(subnet)  # per-layer widths
    padded = exported_param_count(em, subnet, "padded")
    assert padded == slice_subnet(model, em, subnet, "padded").param_count
    assert padded > exact  # the stock form pads every layer to the widest


def test_budget_counts_and_exports_the_exact_form(tmp_path):
    """A budget between the exact and the padded size of a per-layer shape: it fits, and it is exported exact."""
    model, em, strategy = _setup(nonuniform=True)
    subnet = Subnet((0, 1, 2, 3), 0.5)
    exact, padded = exported_param_count(em, subnet), exported_param_count(em, subnet, "padded")
    budget = str((exact + padded) // 2)
    (tmp_path / "metrics.json").write_text(json.dumps({"mmlu_eval_accuracy_l4w0.5": 0.5, "mmlu_eval_accuracy_l2w1": 0.3,
                                                       "mmlu_eval_accuracy_l3w0.5": 0.2}))
    fitting = run_budget(_args(tmp_path, "--budget_params", budget, "--export_dir", str(tmp_path / "best")),
                         model, None, em, strategy)
    assert fitting[0].label == "l4w0.5" and fitting[0].export_params == exact
    record = json.loads((tmp_path / "best" / EXPORT_RECORD).read_text())
    assert record["param_count"] == exact and record["per_layer_code"]
    padded_fit = run_budget(_args(tmp_path, "--budget_params", budget, "--export_format", "padded"),
                            model, None, em, strategy)
    assert "l4w0.5" not in [c.label for c in padded_fit]  # its stock form is over the budget


@pytest.mark.real_model
def test_pipeline_budget_flags_export_the_best(tmp_path, real_model_dir):
    """The flags through main's pipeline: no strategy, first layers, uniform widths from --width_choice."""
    from transformers import AutoTokenizer

    from amoeba.pipeline import run

    folder = tmp_path / "tiny"
    tiny_model("gqa", 4).save_pretrained(folder)
    AutoTokenizer.from_pretrained(REAL_MODEL_DIR).save_pretrained(folder)
    out = tmp_path / "run"
    args = parse_args(["--model_name_or_path", str(folder), "--output_dir", str(out), "--do_train", "False",
                       "--min_num_layer", "2", "--budget_params", "60%", "--export_dir", str(tmp_path / "exp")])
    run(args)
    saved = json.loads((out / "budget.json").read_text())
    assert {c["num_layers"] for c in saved["all"]} == {4, 3, 2}
    assert {c["width"] for c in saved["all"]} == {1.0, 0.875, 0.75, 0.625}
    best = saved["fitting"][0]  # no scores: the largest shape that fits
    assert best["export_params"] == max(c["export_params"] for c in saved["fitting"])
    assert best["export_params"] <= 0.6 * saved["budget"]["full_params"]
    record = json.loads((tmp_path / "exp" / EXPORT_RECORD).read_text())
    assert record["shape"]["label"] == best["label"] and record["param_count"] == best["export_params"]
    torch.testing.assert_close(torch.tensor(record["param_ratio"]), torch.tensor(best["param_ratio"]), rtol=1e-9,
                               atol=0)
