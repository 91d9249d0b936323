"""scripts/compare_training_losses.py: paired per-step comparison of Stage 2 runs' logged losses."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_script, ROOT


def _tool():
    return load_script(ROOT / "scripts" / "compare_training_losses.py")


def _run(folder, losses: dict[int, dict], seed=0, distill="sp", data_seed=42, console=None, **one_for_all):
    """A Stage 2 output folder: run_args.json in sections, as main.py writes it, and either training_log.json or
    (``console``: a folder) a console log with the Trainer's lines."""
    folder.mkdir(parents=True)
    args = {"train": {"seed": seed, "data_seed": data_seed, "per_device_train_batch_size": 8,
                      "gradient_accumulation_steps": 1, "logging_steps": 10},
            "data": {"dataset": "alpaca-clean", "source_max_len": 384, "target_max_len": 128},
            "one_for_all": {"distill_method": distill, "kd_weight": 1.0, **one_for_all}}
    (folder / "run_args.json").write_text(json.dumps({"command": [], "arguments": args}))
    records = [{"loss": r["loss_largest"], **r, "step": s} for s, r in sorted(losses.items())]
    if console is None:
        (folder / "training_log.json").write_text(json.dumps(records))
    else:
        console.mkdir(exist_ok=True)
        lines = ["some log line", " 10%|#  | 1/10 [00:01<00:09]\r"]
        for r in records:  # the Trainer prints the values as strings, without the step
            lines.append(str({k: f"{v:.4g}" for k, v in r.items() if k != "step"}))
        lines.append("{'loss': '1.5', 'grad_")  # cut off where the run was stopped
        (console / f"train_{folder.name}.log").write_text("\n".join(lines))
    return folder


def test_paired_differences_on_the_same_steps(tmp_path, capsys):
    """Each role's mean difference and its standard error over the steps both runs logged (within --steps); a run
    stopped early is read from its console log; roles whose loss means something else are marked."""
    tool = _tool()
    ref = {s: {"loss_largest": 2.0 + 0.01 * (s % 30), "loss_smallest": 3.0} for s in range(10, 110, 10)}
    run = {s: {"loss_largest": ref[s]["loss_largest"] - 0.1 - (0.02 if s % 20 else 0.0), "loss_smallest": 3.5}
           for s in range(10, 70, 10)}  # stopped at step 60
    a = _run(tmp_path / "a", ref)
    b = _run(tmp_path / "b", run, distill="none", console=tmp_path / "logs")
    result = tool.compare(a, [b], tmp_path / "logs", (20, 1000))
    entry = result["runs"][0]
    assert entry["last_step"] == 60 and entry["log"].endswith("train_b.log")
    largest = entry["roles"]["loss_largest"]
    diffs = [-0.1 - (0.02 if s % 20 else 0.0) for s in range(20, 70, 10)]  # steps 20..60
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    assert largest["logged_steps"] == 5 and largest["note"] is None
    assert largest["difference"] == pytest.approx(mean, abs=1e-3)  # the console log has 4 significant digits
    assert largest["standard_error"] == pytest.approx(se, abs=1e-3)
    assert largest["reference"] == pytest.approx(sum(ref[s]["loss_largest"] for s in range(20, 70, 10)) / 5)
    assert entry["roles"]["loss_smallest"]["note"].startswith("not comparable")

    assert tool.main([str(b), "--reference", str(a), "--console_logs", str(tmp_path / "logs")]) == 0
    table = capsys.readouterr().out
    assert "| b | largest | 6 |" in table and "not comparable" in table

    # a per-shape run logs its one fixed subnet as "largest": not the sandwich's largest subnet
    fixed = _run(tmp_path / "fixed", ref, train_num_layer=18, train_num_width="0.75", train_distill_full=True)
    roles = tool.compare(a, [fixed], None, (0, 1000))["runs"][0]["roles"]
    assert roles["loss_largest"]["note"] == "not comparable: the fixed subnet 18 x 0.75 against the largest subnet"
    same = tool.compare(fixed, [fixed], None, (0, 1000))["runs"][0]["roles"]["loss_largest"]
    assert same["note"] is None and same["difference"] == 0.0
    assert tool.role_meaning("loss_largest", {"train_num_layer": 18, "train_num_width": "0.75",
                                              "train_distill_full": True, "distill_method": "sp"}) == \
        ("the fixed subnet 18 x 0.75", "distillation loss (full model)")
    assert tool.role_meaning("loss_smallest", {"distill_method": "sp", "kd_weight": 0.0})[1] == "label loss"


def test_runs_on_other_batches_or_without_a_log_are_refused(tmp_path, capsys):
    """A run on other batches (another --data_seed) cannot be paired, and a run with neither training_log.json nor
    a console log has nothing to compare: one line naming the folder, exit 2."""
    tool = _tool()
    losses = {10: {"loss_largest": 2.0}, 20: {"loss_largest": 1.9}}
    a = _run(tmp_path / "a", losses)
    other = _run(tmp_path / "other", losses, data_seed=7)
    assert tool.main([str(other), "--reference", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_seed" in err[0] and str(other) in err[0]

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run_args.json").write_text((a / "run_args.json").read_text())
    assert tool.main([str(bare), "--reference", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--console_logs" in err[0]
    assert tool.main([str(bare), "--reference", str(tmp_path / "nowhere")]) == 2
    assert "run_args.json" in capsys.readouterr().err
    assert tool.main([str(a), "--reference", str(a), "--steps", "9-3"]) == 2
    assert capsys.readouterr().err.startswith("error: --steps:")
