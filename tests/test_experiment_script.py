"""scripts/experiment.py (and scripts/experiment_smollm2.py, its SmolLM2 preset): the plan of jobs, and the report
built from evaluation folders."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script, ROOT


def _module():
    return load_script(ROOT / "scripts" / "experiment.py")


def _write_metrics(folder, shapes, base, params=100e6):
    folder.mkdir(parents=True)
    metrics = {}
    for i, lab in enumerate(shapes):
        vals = {"wikitext2_ppl": base["ppl"] + i, "arc_easy_acc": base["acc"], "piqa_acc": base["acc"] + 0.1,
                "hellaswag_acc_norm": base["acc"] - 0.1, "mmlu_test_accuracy": 0.25, "params": params - i * 1e6}
        metrics.update({f"{k}_{lab}": v for k, v in vals.items()})
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_plan_rows_and_dependencies(tmp_path):
    exp = _module()
    plan = exp.Plan(exp.parse(["--out", str(tmp_path), "--rows", "pershape,amoeba_long"]))
    train = [j.name for j in plan.train_jobs()]
    assert train == ["train_amoeba"] + [f"train_pershape_{s}" for s in ("l30w1", "l26w0.75", "l22w0.625",
                                                                         "l18w0.625")]
    evals = plan.eval_jobs()
    assert {plan.row_of(j.name) for j in evals} == {"pershape", "amoeba_long"}
    long = [j for j in evals if plan.row_of(j.name) == "amoeba_long"]
    assert not any(j.ready() for j in long)  # they wait for the long run's adapters
    (tmp_path / "train" / "amoeba" / "adapter_model").mkdir(parents=True)
    (tmp_path / "train" / "amoeba" / "adapter_model" / "adapter_config.json").write_text("{}")
    assert all(j.ready() for j in long)
    # one job per shape, so the four start together when the long run ends
    assert [j.argv[j.argv.index("--eval_shapes") + 1] for j in long] == ["30x1", "26x0.75", "22x0.625",
                                                                         "18x0.625"]
    full = exp.Plan(exp.parse(["--out", str(tmp_path)]))
    assert len(full.train_jobs()) == 12 and len(full.eval_jobs()) == 25
    with pytest.raises(SystemExit):
        exp.Plan(exp.parse(["--out", str(tmp_path), "--rows", "nonsense"]))


def test_report_tables_comparisons_and_reproducibility(tmp_path):
    exp = _module()
    plan = exp.Plan(exp.parse(["--out", str(tmp_path), "--depths", "30,18", "--widths", "1,5/8",
                               "--single_shapes", "30x1,18x5/8"]))
    _write_metrics(tmp_path / "eval" / "amoeba_w1", ["l30w1", "l18w1"], {"ppl": 20.0, "acc": 0.49})
    _write_metrics(tmp_path / "eval" / "amoeba_w0.625", ["l30w0.625", "l18w0.625"], {"ppl": 30.0, "acc": 0.41})
    _write_metrics(tmp_path / "eval" / "stage1_w1", ["l30w1", "l18w1"], {"ppl": 25.0, "acc": 0.45})
    _write_metrics(tmp_path / "eval" / "pershape_l18w0.625", ["l18w0.625"], {"ppl": 30.0, "acc": 0.45})
    first = json.loads((tmp_path / "eval" / "amoeba_w0.625" / "metrics.json").read_text())
    (tmp_path / "eval" / "amoeba_repeat").mkdir()
    (tmp_path / "eval" / "amoeba_repeat" / "metrics.json").write_text(
        json.dumps({k: v for k, v in first.items() if k.endswith("l18w0.625")}))
    rows = exp.collect(plan)
    assert set(rows) == {"amoeba", "stage1", "pershape", "amoeba_repeat"}
    assert rows["amoeba"]["l30w1"]["avg_acc"] == pytest.approx((0.49 + 0.59 + 0.39 + 0.25) / 4)
    text = exp.render(plan, rows, {"train_amoeba": {"seconds": 12.0, "runs": 1}}, "python x")
    assert "| (d) AmoebaLLM one-for-all | 43.0 | 37.0 | 43.0 | 37.0 |" in text  # avg accuracy per grid shape
    assert "| (a) Stage 1 only (DP + FLAP) | 40.0 | - | 40.0 | - |" in text
    # (d) - (a) at l30w1: 43.0 - 40.0; (d) - (c) at l18w0.625: 37.0 - 40.0, perplexity ratio 31 / 30
    line = next(ln for ln in text.splitlines() if ln.startswith("| l30w1 |"))
    assert "| +3.0 |" in line
    line = next(ln for ln in text.splitlines() if ln.startswith("| l18w0.625 |"))
    assert "| -3.0 |" in line and f"| {31.0 / 30.0:.3f} |" in line
    assert "identical numbers, every metric" in text
    again = json.loads((tmp_path / "eval" / "amoeba_repeat" / "metrics.json").read_text())
    again["piqa_acc_l18w0.625"] += 0.001
    (tmp_path / "eval" / "amoeba_repeat" / "metrics.json").write_text(json.dumps(again))
    assert "DIFFERENT numbers" in exp.render(plan, exp.collect(plan), {}, "python x")


def test_comparison_gives_mmlu_differences_against_every_measured_per_shape_row(tmp_path):
    """The paper's aims are in MMLU points: the comparison gives (d) - (x) in MMLU next to average accuracy, with a
    column for (c'') once it has results, and none for a (c) the preset does not plan."""
    exp = _module()
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path)]))
    _write_metrics(tmp_path / "eval" / "amoeba_l18w0.75", ["l18w0.75"], {"ppl": 40.0, "acc": 0.40})
    _write_metrics(tmp_path / "eval" / "pershape_kd_total_l18w0.75", ["l18w0.75"], {"ppl": 50.0, "acc": 0.42})
    mmlu = json.loads((tmp_path / "eval" / "pershape_kd_total_l18w0.75" / "metrics.json").read_text())
    mmlu["mmlu_test_accuracy_l18w0.75"] = 0.31
    (tmp_path / "eval" / "pershape_kd_total_l18w0.75" / "metrics.json").write_text(json.dumps(mmlu))
    text = exp.render(plan, exp.collect(plan), {}, "python x")
    header = next(ln for ln in text.splitlines() if ln.startswith("| shape | params"))
    assert "MMLU (d) - (c'') |" in header and "(d) - (c) |" not in header
    line = next(ln for ln in text.splitlines() if ln.startswith("| l18w0.75 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|"))
    at = {name.strip(): cells[i] for i, name in enumerate(header.strip("|").split("|"))}
    # MMLU 25.0 against 31.0; average (40+50+30+25)/4 = 36.25 against (42+52+32+31)/4 = 39.25; ppl 40 / 50
    assert at["MMLU (d) - (c'')"] == "-6.0" and at["(d) - (c'')"] == "-3.0" and at["ppl (d) / (c'')"] == "0.800"
    assert at["MMLU (d) - (a)"] == "-"
    assert "| (c'') per-shape LoRA, distilled, (d)'s total tokens | - / - | - / - | - / - | 39.2 / 50.00 |" in text


def test_ablation_effects_have_error_bars_and_the_seed_noise_floor(tmp_path):
    """Each ablation's effect is (d) minus the ablation, +- two standard errors of the difference (lm-eval's
    errors for its tasks, binomial for MMLU), judged against the noise floor (d) and (d'') give at the smallest
    shape; without (d'') nothing is judged."""
    import math

    exp = _module()
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path)]))
    small = "l18w0.75"

    def write(folder, acc, mmlu):
        _write_metrics(tmp_path / "eval" / folder, [small], {"ppl": 50.0, "acc": acc})
        path = tmp_path / "eval" / folder / "metrics.json"
        m = json.loads(path.read_text())
        m.update({f"mmlu_test_accuracy_{small}": mmlu, f"mmlu_test_micro_accuracy_{small}": mmlu,
                  f"arc_easy_acc_stderr_{small}": 0.01, f"piqa_acc_stderr_{small}": 0.01,
                  f"hellaswag_acc_norm_stderr_{small}": 0.005})
        path.write_text(json.dumps(m))

    write(f"amoeba_{small}", 0.40, 0.30)
    write(f"abl_lora_{small}", 0.40, 0.25)  # MMLU 5 points below (d): an effect
    write(f"abl_nokd_{small}", 0.395, 0.297)  # within the noise
    rows = exp.collect(plan)
    se_mmlu = math.sqrt(0.3 * 0.7 / 14042)
    assert rows["amoeba"][small]["mmlu_se"] == pytest.approx(se_mmlu)
    assert rows["amoeba"][small]["avg_acc_se"] == pytest.approx(
        math.sqrt(0.01 ** 2 + 0.01 ** 2 + 0.005 ** 2 + se_mmlu ** 2) / 4)
    text = "\n".join(exp.ablation_effects(plan, rows))
    assert "not measured yet" in text and "not judged (no noise floor yet)" in text
    write("amoeba_seed1", 0.402, 0.302)  # the seed moves average and MMLU by 0.2 points
    text = "\n".join(exp.ablation_effects(plan, exp.collect(plan)))
    assert "differ by 0.2 average and 0.2 MMLU points at l18w0.75" in text
    lora = next(ln for ln in text.splitlines() if ln.startswith("| (e) plain LoRA"))
    two_se = 200 * math.sqrt(2) * se_mmlu
    assert f"| +5.0 +- {two_se:.1f} |" in lora and "MMLU: yes" in lora and "avg: yes" in lora
    nokd = next(ln for ln in text.splitlines() if ln.startswith("| (e) no distillation"))
    assert "avg: no, MMLU: no" in nokd


def test_regenerate_command_drops_scheduling_flags():
    exp = _module()
    cmd = exp.regenerate_command(["--out", "/x", "--jobs", "9", "--phase=eval", "--steps", "400",
                                  "--deadline_s", "30", "--docs", "docs/RESULTS.md"])
    assert cmd == ("python scripts/experiment_smollm2.py --out output/experiment --steps 400 "
                   "--docs docs/RESULTS.md")


def test_jobs_that_cannot_finish_before_the_deadline_are_not_started(tmp_path):
    """An evaluation job (not resumable) starts only if its expected duration fits before the deadline; when no
    remaining job fits, the driver stops at once instead of idling until the deadline. A resumable (training) job
    always fits: it checkpoints when stopped."""
    import time

    exp = _module()
    evaluation = exp.Job("eval_x", ["--never-run"], tmp_path / "x", want_keys=["k"], expected_s=600.0)
    training = exp.Job("train_x", [], tmp_path / "t", done_file="train_results.json", resumable=True, expected_s=1e9)
    now = time.time()
    assert not evaluation.fits(now, now + 300) and evaluation.fits(now, now + 700)
    assert training.fits(now, now + 1)
    # an evaluation keeps each finished shape: it starts if its first shape can finish
    partial = exp.Job("eval_y", [], tmp_path / "y", want_keys=["k"], expected_s=600.0, first_s=150.0)
    assert partial.fits(now, now + 300) and not partial.fits(now, now + 100)
    start = time.time()
    result = exp.run_jobs([evaluation], tmp_path, parallel=2, deadline=time.time() + 120)
    assert time.time() - start < 10  # did not wait for the deadline
    assert result == {"failed": [], "stopped": ["eval_x"]}  # left for the next run, not a failure
    assert not (tmp_path / "logs" / "eval_x.log").exists()  # never launched


def test_distilled_per_shape_row(tmp_path):
    """Row (c'): each single shape fine-tuned on its own, distilled from the frozen full model; its jobs are the
    per-shape LoRA row's plus --train_distill_full, valid main.py flags, and the report compares (d) with it."""
    from amoeba.args import parse_args

    exp = _module()
    assert "pershape_kd" in exp.__doc__ and "--train_distill_full" in exp.__doc__
    plan = exp.Plan(exp.parse(["--out", str(tmp_path), "--rows", "pershape_kd"]))
    train = plan.train_jobs()
    assert [j.name for j in train] == [f"train_pershape_kd_{s}" for s in ("l30w1", "l26w0.75", "l22w0.625",
                                                                          "l18w0.625")]
    plain = {j.name: j.argv for j in exp.Plan(exp.parse(["--out", str(tmp_path), "--rows", "pershape"])).train_jobs()}
    for job in train:
        twin = plain[job.name.replace("pershape_kd", "pershape")]
        argv = [a.replace("pershape_kd", "pershape") for a in job.argv]
        assert argv == twin + ["--train_distill_full", "True", "--distill_method", "sp", "--kd_weight", "1"]
        t = parse_args(job.argv).one_for_all  # main.py accepts the command
        assert t.train_distill_full and t.train_num_layer is not None and t.kd_weight == 1.0
    evals = plan.eval_jobs()
    assert [plan.row_of(j.name) for j in evals] == ["pershape_kd"] * 4
    assert all(str(tmp_path / "train" / j.name.replace("eval_", "", 1) / "adapter_model") in j.argv for j in evals)
    # the report: (c') in the tables and a (d) - (c') column
    report_plan = exp.Plan(exp.parse(["--out", str(tmp_path), "--depths", "30,18", "--widths", "1,5/8",
                                      "--single_shapes", "30x1,18x5/8"]))
    _write_metrics(tmp_path / "eval" / "amoeba_w0.625", ["l30w0.625", "l18w0.625"], {"ppl": 30.0, "acc": 0.41})
    _write_metrics(tmp_path / "eval" / "pershape_kd_l18w0.625", ["l18w0.625"], {"ppl": 24.0, "acc": 0.43})
    rows = exp.collect(report_plan)
    assert set(rows) == {"amoeba", "pershape_kd"}
    text = exp.render(report_plan, rows, {}, "python x")
    assert "| (c') per-shape LoRA, distilled from the full model |" in text and "(d) - (c')" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| l18w0.625 |"))
    # avg accuracy (d) 37.0 vs (c') 38.5; perplexity 31 / 24
    assert "| -1.5 |" in line and f"| {31.0 / 24.0:.3f} |" in line


def test_resume_only_from_a_complete_checkpoint(tmp_path):
    """A job resumes when a checkpoint has its marker; marker-less folders (a kill during the first checkpoint)
    are removed so that the retry starts afresh instead of being refused."""
    exp = _module()
    out = tmp_path / "job"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"half")
    argv = ["--do_train", "True"]
    exp.resume_argv(out, argv)
    assert argv == ["--do_train", "True"] and not (out / "checkpoint-2").exists()
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-6").mkdir()
    exp.resume_argv(out, argv)
    assert argv[-1] == "--resume_training" and (out / "checkpoint-6").exists()  # resume decides what to skip


def test_qwen_preset_plan_rows_shapes_and_metrics(tmp_path):
    """The second model's experiment: rows (a), (b), (d) at the single shapes only; (c') at (d)'s tokens per shape
    and (c'') at (d)'s total; (d) again with another seed on the smallest shape; five-shot MMLU and full lm-eval
    sets; with no strategy file yet, Stage 1 as the seed's Steps 1 and 2 comes first."""
    exp = _module()
    strategy = tmp_path / "strategies" / "qwen.npy"
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--strategy",
                               str(strategy), "--eval_split", "0"]))  # the parts: the next test
    assert plan.grid == plan.single == [(28, 1.0), (26, 0.875), (24, 0.75), (18, 0.75)]
    train = {j.name: j.argv for j in plan.train_jobs()}
    assert "train_pershape_l28w1" not in train and "train_pershape_kd_l28w1" in train  # no plain-LoRA (c)
    steps = {n: int(a[a.index("--max_steps") + 1]) for n, a in train.items()}
    assert steps["train_amoeba"] == steps["train_pershape_kd_l18w0.75"] == 1000
    assert steps["train_pershape_kd_total_l18w0.75"] == 250  # 4 shapes x 250 = (d)'s 1000 steps of batches
    assert all(a[a.index("--max_skipped_steps") + 1] == "20" for a in train.values())
    with pytest.raises(SystemExit) as refused:
        exp.parse(["--preset", "qwen2.5-coder-1.5b", "--max_skipped_steps", "-1"])
    assert refused.value.code == 2
    seed = train["train_amoeba_seed1"]
    assert seed[len(seed) - 1 - seed[::-1].index("--seed") + 1] == "1"  # the last --seed wins
    evals = {j.name: j for j in plan.eval_jobs()}
    assert "eval_amoeba_repeat" not in evals  # the reproducibility check was made on SmolLM2
    assert evals["eval_amoeba_seed1"].argv[evals["eval_amoeba_seed1"].argv.index("--eval_shapes") + 1] == "18x0.75"
    argv = evals["eval_stage1_w0.75"].argv
    assert argv[argv.index("--eval_shapes") + 1] == "24x0.75,18x0.75"
    # trained rows: one job per shape (their adapters last one GPU session), each reading those adapters
    shapes_of = lambda prefix: sorted(  # noqa: E731
        j.argv[j.argv.index("--eval_shapes") + 1] for n, j in evals.items() if n.startswith(prefix))
    every = ["18x0.75", "24x0.75", "26x0.875", "28x1"]
    assert shapes_of("eval_amoeba_l") == shapes_of("eval_abl_nokd_") == every
    assert "eval_amoeba_w0.75" not in evals and "eval_abl_lora" not in evals
    assert str(tmp_path / "train" / "abl_nobal" / "adapter_model") in evals["eval_abl_nobal_l24w0.75"].argv
    assert exp.row_of_folder("abl_nobal_l24w0.75") == "abl_nobal" and exp.row_of_folder("amoeba_l28w1") == "amoeba"
    assert argv[argv.index("--mmlu_dataset") + 1] == "mmlu-fs" and "--lm_eval_limit" not in argv
    assert argv[argv.index("--mmlu_prefix_cache") + 1] == "True"  # the preset's: from row (d) on
    plain = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--strategy",
                                str(strategy), "--mmlu_prefix_cache", "0"]))
    assert not any("--mmlu_prefix_cache" in j.argv for j in plain.eval_jobs())  # how rows (a) and (b) were measured
    cached = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--strategy",
                                 str(strategy), "--mmlu_prefix_cache", "1", "--eval_split", "0"]))
    argv = {j.name: j for j in cached.eval_jobs()}["eval_amoeba_l28w1"].argv
    assert argv[argv.index("--mmlu_prefix_cache") + 1] == "True"
    assert not any(j.ready() for j in evals.values())  # all wait for the strategy file

    layers, widths = plan.calibrate_jobs()
    flag = lambda a, f: a[a.index(f) + 1]  # noqa: E731
    assert (flag(layers.argv, "--calib_dataset"), flag(layers.argv, "--calib_mmlu_split"),
            flag(layers.argv, "--num_calib_sample"), flag(layers.argv, "--calib_metric"),
            flag(layers.argv, "--min_num_layer"), flag(layers.argv, "--dp_keep_last_layer")) == \
        ("mmlu", "eval", "40", "acc", "18", "1")
    assert "--layer_calib_dp" in layers.argv and "--width_calib" in widths.argv
    assert (flag(widths.argv, "--prune_width_method"), flag(widths.argv, "--width_choice")) == ("flap",
                                                                                                "[1,7/8,3/4,5/8]")
    code = exp.main(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--strategy", str(strategy),
                     "--phase", "train"])
    assert code == 2  # no strategy and no calibrate phase: said, nothing started
    assert not (tmp_path / "train").exists()


def test_calibrate_phase_makes_the_strategy_file_and_its_view(tmp_path):
    """The calibrate phase on a tiny model: the layer DP on MMLU validation questions and FLAP widths run as
    main.py jobs, then merge into the strategy file with its readable view; a second run finds it and does
    nothing."""
    from tests.conftest import tiny_model
    from tests.test_training import _tokenizer

    model_dir = tmp_path / "model"
    tiny_model("gqa", layers=6).save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    exp = _module()
    strategy = tmp_path / "strategies" / "tiny.npy"
    argv = ["--preset", "qwen2.5-coder-1.5b", "--smoke", "--out", str(tmp_path / "run"), "--model", str(model_dir),
            "--strategy", str(strategy), "--depths", "6,4", "--single_shapes", "6x1,4x3/4", "--phase", "calibrate"]
    assert exp.main(argv) == 0
    from amoeba.strategy import load_strategy

    merged = load_strategy(strategy)
    assert merged.num_layers == 6 and merged.widths() == [0.625, 0.75, 0.875, 1.0]
    assert {1, 2} <= set(merged.layer_masks) and merged.layer_masks[2].sum() == 4  # down to 4 layers
    assert merged.calibration["layers"]["dataset"] == "mmlu" and merged.calibration["layers"]["split"] == "validation"
    assert strategy.with_suffix(".md").is_file()
    commands = (tmp_path / "run" / "commands.sh").read_text()
    assert commands.count("--layer_calib_dp") == 1 and commands.count("--width_calib") == 1
    before = strategy.stat().st_mtime_ns
    assert exp.main(argv) == 0
    assert strategy.stat().st_mtime_ns == before and (tmp_path / "run" / "commands.sh").read_text() == commands


def test_a_packed_run_continues_elsewhere_without_retraining(tmp_path):
    """--pack keeps metrics, logs and curves but no weights; unpacked into --out on another machine, training whose
    every evaluation is done is not run again, and no evaluation becomes ready from adapters without weights."""
    import tarfile

    exp = _module()
    out = tmp_path / "run"
    strategy = tmp_path / "s.npy"
    strategy.write_bytes(b"x")
    argv = ["--preset", "qwen2.5-coder-1.5b", "--out", str(out), "--strategy", str(strategy), "--rows", "amoeba",
            "--eval_split", "0"]
    plan = exp.Plan(exp.parse(argv))
    snapshot = out / "train" / "amoeba" / "adapter_model-step1000"
    snapshot.mkdir(parents=True)
    (snapshot / "adapter_config.json").write_text("{}")
    (snapshot / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    ckpt = out / "train" / "amoeba" / "checkpoint-50"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (out / "train" / "amoeba" / "train_results.json").write_text("{}")
    evals = plan.eval_jobs()
    assert all(j.ready() for j in evals)
    for job in evals:  # every evaluation of (d) finished
        shapes = job.argv[job.argv.index("--eval_shapes") + 1].split(",")
        _write_metrics(job.out, [exp.label(int(s.split("x")[0]), float(s.split("x")[1])) for s in shapes],
                       {"ppl": 10.0, "acc": 0.5})
    assert all(j.done() for j in evals)
    archive = exp.pack(out, tmp_path / "carry" / "run.tgz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "train/amoeba/train_results.json" in names and "eval/amoeba_l28w1/metrics.json" in names
    assert not any("adapter_model" in n or "checkpoint-" in n or n.endswith(".safetensors") for n in names)

    elsewhere = tmp_path / "elsewhere"
    with tarfile.open(archive) as tar:
        tar.extractall(elsewhere, filter="data")
    moved = exp.Plan(exp.parse([*argv[:2], "--out", str(elsewhere), *argv[4:]]))
    moved_evals = moved.eval_jobs()
    assert all(j.done() for j in moved_evals)
    assert [j.name for j in moved.needed_training(moved.train_jobs(), moved_evals)] == []
    # with one evaluation still to do, its training runs again (its weights did not travel)
    (elsewhere / "eval" / "amoeba_l28w1" / "metrics.json").unlink()
    again = moved.needed_training(moved.train_jobs(), moved.eval_jobs())
    assert [j.name for j in again] == ["train_amoeba"]
    # ... for real: its record no longer marks it done, and, as it starts, the earlier record is kept beside
    assert not again[0].done()
    exp.set_aside_record(again[0])
    kept = list((elsewhere / "train" / "amoeba").glob("train_results.earlier-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == "{}"
    assert not any(j.ready() for j in moved.eval_jobs() if not j.done())


def test_the_whole_model_is_measured_once_for_stage1_and_shortgpt(tmp_path):
    exp = _module()
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--rows",
                               "stage1,shortgpt"]))
    shapes = {j.name: j.argv[j.argv.index("--eval_shapes") + 1] for j in plan.eval_jobs()}
    assert shapes["eval_stage1_w1"] == "28x1" and "eval_shortgpt_w1" not in shapes
    assert shapes["eval_shortgpt_w0.75"] == "24x0.75,18x0.75"
    _write_metrics(tmp_path / "eval" / "stage1_w1", ["l28w1"], {"ppl": 9.0, "acc": 0.6})
    _write_metrics(tmp_path / "eval" / "shortgpt_w0.875", ["l26w0.875"], {"ppl": 12.0, "acc": 0.5})
    rows = exp.collect(plan)
    assert rows["shortgpt"]["l28w1"] == rows["stage1"]["l28w1"] and rows["shortgpt"]["l26w0.875"]["piqa_acc"] == 0.6
    only_b = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--rows", "shortgpt"]))
    assert "28x1" in [j.argv[j.argv.index("--eval_shapes") + 1] for j in only_b.eval_jobs()]


def test_each_report_in_docs_keeps_its_own_plot(tmp_path):
    """--docs: the plot goes beside the tables under a name of their own, so two models' reports in docs/ do not
    overwrite each other's figure."""
    from pathlib import Path

    exp = _module()
    assert exp.docs_figure_name(Path("docs/results_tables.md")) == "results_frontier.png"
    assert exp.docs_figure_name(Path("docs/results_qwen_tables.md")) == "results_qwen_frontier.png"
    assert exp.docs_figure_name(Path("x/summary.md")) == "summary_frontier.png"
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path / "run"), "--rows",
                               "stage1"]))
    _write_metrics(tmp_path / "run" / "eval" / "stage1_w1", ["l28w1"], {"ppl": 9.0, "acc": 0.6})
    _write_metrics(tmp_path / "run" / "eval" / "stage1_w0.75", ["l24w0.75", "l18w0.75"], {"ppl": 30.0, "acc": 0.4})
    docs = tmp_path / "docs" / "results_qwen_tables.md"
    exp.report(plan, str(docs), "python scripts/experiment.py --preset qwen2.5-coder-1.5b")
    text = docs.read_text()
    pytest.importorskip("matplotlib")
    assert "](results_qwen_frontier.png)" in text and (docs.parent / "results_qwen_frontier.png").is_file()
    assert not (docs.parent / "results_frontier.png").exists()
    # ARC-E, PIQA, HellaSwag, MMLU: 60, 70, 50, 25 (average 51.2) and 40, 50, 30, 25 (36.25)
    assert "| (a) Stage 1 only (DP + FLAP) | 51.2 | - | 36.3 | 36.3 |" in text


def test_ddp_runs_the_sandwich_trainings_alone_over_every_gpu(tmp_path):
    """--ddp 1 with two GPUs (the qwen preset): (d), its second seed and the ablations train over both GPUs with
    torchrun, half the batch each (the same examples per step), one at a time and with nothing beside them;
    per-shape trainings and evaluations keep one GPU each. One GPU, or --ddp 0: no DDP."""
    exp = _module()
    argv = ["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--strategy", str(tmp_path / "s.npy")]
    plan = exp.Plan(exp.parse([*argv, "--gpus", "0,1"]))
    train = {j.name: j for j in plan.train_jobs()}
    batch = lambda j: int(j.argv[j.argv.index("--per_device_train_batch_size") + 1])  # noqa: E731
    sandwich = ["train_amoeba", "train_amoeba_seed1", "train_abl_lora", "train_abl_nobal", "train_abl_nokd"]
    assert all(train[n].all_gpus and batch(train[n]) == 4 for n in sandwich)
    assert not train["train_pershape_kd_l18w0.75"].all_gpus and batch(train["train_pershape_kd_l18w0.75"]) == 8
    assert not any(j.all_gpus for j in plan.eval_jobs())
    for one_gpu in (["--gpus", "0"], ["--gpus", "0,1", "--ddp", "0"], []):
        single = {j.name: j for j in exp.Plan(exp.parse([*argv, *one_gpu])).train_jobs()}
        assert not single["train_amoeba"].all_gpus and batch(single["train_amoeba"]) == 8

    torchrun, env = exp.job_launcher(train["train_amoeba"], ["0", "1"])
    assert torchrun == ["--standalone", "--nproc_per_node", "2"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["NCCL_NVLS_ENABLE"] == "0"
    assert exp.job_launcher(train["train_pershape_kd_l18w0.75"], ["0", "1"]) == ([], {})

    # scheduling: the DDP job waits for the GPUs to empty, and nothing starts beside it
    ready = [exp.Job(n, [], tmp_path / n, done_file="d", all_gpus=n.startswith("ddp")) for n in ("ddp", "one", "two")]
    ddp, one, two = ready
    assert exp.pick_job([ddp, one], [], 0.0, float("inf")) is ddp
    assert exp.pick_job([ddp, one], [two], 0.0, float("inf")) is None  # does not let "one" jump ahead
    assert exp.pick_job([one, two], [ddp], 0.0, float("inf")) is None
    assert exp.pick_job([one, ddp], [two], 0.0, float("inf")) is one
    with pytest.raises(SystemExit) as bad:
        exp.parse([*argv, "--gpus", "0,1,2", "--batch_size", "8"])
    assert bad.value.code == 2


def test_the_report_lists_each_runs_tokens_processes_and_skipped_steps(tmp_path):
    exp = _module()
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path)]))
    for name, res in (("amoeba", {"tokens_seen": 794545, "processes": 2, "skipped_steps": [308, 404]}),
                      ("pershape_kd_l18w0.75", {"tokens_seen": 1234}),  # a run from before --ddp: one process
                      ("broken", {})):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "train_results.json").write_text(json.dumps(res))
    lines = exp.training_tokens(plan)
    assert "| amoeba | 794,545 | 2 | 308, 404 |" in lines
    assert "| pershape_kd_l18w0.75 | 1,234 | 1 | none |" in lines
    assert not any("broken" in line for line in lines)


def test_the_report_names_the_rows_whose_mmlu_used_the_prefix_cache(tmp_path):
    """Rows measured with --mmlu_prefix_cache and rows measured without it sit in one table; the report says
    which are which, from each evaluation's run_args.json (an evaluation without metrics does not count)."""
    exp = _module()
    plan = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path)]))
    for folder, cached, done in (("stage1_w1", False, True), ("amoeba_l28w1", True, True),
                                 ("abl_lora_l28w1", True, False)):
        if done:
            _write_metrics(tmp_path / "eval" / folder, ["l28w1"], {"ppl": 14.0, "acc": 0.5})
        else:
            (tmp_path / "eval" / folder).mkdir(parents=True)
        record = {"arguments": {"evaluation": {"mmlu_prefix_cache": cached}}}
        (tmp_path / "eval" / folder / "run_args.json").write_text(json.dumps(record))
    assert exp.prefix_cached_rows(plan) == ["amoeba"]
    text = exp.render(plan, exp.collect(plan), {}, "python x")
    assert "MMLU with the prefix cache (`--mmlu_prefix_cache`: each batch's shared exemplars run once): " \
           "(d) AmoebaLLM one-for-all; the other rows without it." in text
    assert "--lm_eval_prefix_cache" not in text  # no row used the lm-eval one
    record = {"arguments": {"evaluation": {"mmlu_prefix_cache": True, "lm_eval_prefix_cache": True}}}
    (tmp_path / "eval" / "amoeba_l28w1" / "run_args.json").write_text(json.dumps(record))
    assert exp.prefix_cached_rows(plan, "lm_eval_prefix_cache") == ["amoeba"]
    assert "shared by several answers runs once): (d) AmoebaLLM one-for-all; the other rows without it." in \
        exp.render(plan, exp.collect(plan), {}, "python x")
    flags = exp.Plan(exp.parse(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--lm_eval_prefix_cache",
                                "1"])).eval_flags()
    assert flags[flags.index("--lm_eval_prefix_cache") + 1] == "True"
    assert "--lm_eval_prefix_cache" not in plan.eval_flags()  # off unless asked for


def test_the_pack_is_renewed_as_each_job_ends(tmp_path, monkeypatch):
    """With --pack, what finished is packed as soon as its job ends, not only at the end: a session whose device
    time runs out during later jobs still carries the earlier jobs' metrics."""
    import tarfile
    import time

    exp = _module()
    out = tmp_path / "run"
    first = exp.Job("eval_first", ["--help"], out / "eval" / "first", want_keys=["k"])  # main.py --help: ends at once
    second = exp.Job("eval_second", ["--help"], out / "eval" / "second", want_keys=["k"])
    packed = []

    def on_finished(job):  # stands in for the job's own metrics, then packs as the driver does
        job.out.mkdir(parents=True, exist_ok=True)
        (job.out / "metrics.json").write_text(json.dumps({"k": 1}))
        with tarfile.open(exp.pack(out, tmp_path / "carry.tgz")) as tar:
            packed.append((job.name, sorted(n for n in tar.getnames() if n.endswith("metrics.json"))))

    exp.run_jobs([first, second], out, parallel=1, deadline=time.time() + 300, on_finished=on_finished)
    assert packed == [("eval_first", ["eval/first/metrics.json"]),
                      ("eval_second", ["eval/first/metrics.json", "eval/second/metrics.json"])]

    # the driver passes a callback that packs to --pack while its jobs still run
    strategy = tmp_path / "s.npy"
    strategy.write_bytes(b"x")
    target = tmp_path / "pack" / "run.tgz"
    seen = []

    def fake_run_jobs(jobs, out_dir, parallel, deadline, gpus=None, on_finished=None):
        assert on_finished is not None and not target.exists()
        on_finished(jobs[0])
        seen.append(target.is_file())
        return {"failed": [], "stopped": []}

    monkeypatch.setattr(exp, "run_jobs", fake_run_jobs)
    assert exp.main(["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path / "run2"), "--strategy", str(strategy),
                     "--rows", "amoeba", "--phase", "eval", "--pack", str(target)]) == 0
    assert seen == [True]


def test_ablations_can_be_evaluated_at_chosen_shapes_only(tmp_path, capsys):
    """--ablation_shapes: the ablations (e) are evaluated at those single shapes only (one job each, with the qwen
    preset's job per shape), the rest of the plan unchanged; a shape outside --single_shapes, or a malformed one,
    is one line naming the flag, exit 2."""
    exp = _module()
    base = ["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--rows", "amoeba,abl_lora,abl_nokd",
            "--eval_split", "0"]
    every = [j.name for j in exp.Plan(exp.parse(base)).eval_jobs()]
    chosen = [j.name for j in exp.Plan(exp.parse([*base, "--ablation_shapes", "18x3/4"])).eval_jobs()]
    assert [n for n in every if n.startswith("eval_abl_lora")] == [
        "eval_abl_lora_l28w1", "eval_abl_lora_l26w0.875", "eval_abl_lora_l24w0.75", "eval_abl_lora_l18w0.75"]
    assert [n for n in chosen if "abl_" in n] == ["eval_abl_lora_l18w0.75", "eval_abl_nokd_l18w0.75"]
    assert [n for n in chosen if "abl_" not in n] == [n for n in every if "abl_" not in n]
    for bad, needle in (("20x1", "--ablation_shapes: 20x1 not among --single_shapes"),
                        ("18by3", "--ablation_shapes: '18by3' is not LAYERSxWIDTH")):
        assert exp.main([*base, "--ablation_shapes", bad, "--phase", "report"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {needle}"), err


def test_a_trained_shape_is_evaluated_in_parts_side_by_side(tmp_path):
    """--eval_split (the qwen preset's): each trained shape's evaluation is three main.py jobs (MMLU with WikiText-2,
    HellaSwag, ARC-Easy with PIQA), each asking main.py for its metrics only and done when it has them; the report
    merges their folders into one cell; a shape already evaluated whole keeps that job, and its training is not
    needed again."""
    from amoeba.args import parse_args

    exp = _module()
    rows = ["--preset", "qwen2.5-coder-1.5b", "--out", str(tmp_path), "--rows", "amoeba_seed1,abl_nokd",
            "--ablation_shapes", "18x3/4"]
    plan = exp.Plan(exp.parse(rows))
    evals = {j.name: j for j in plan.eval_jobs()}
    parts = ("mmlu", "hellaswag", "arc_piqa")
    assert sorted(evals) == sorted(f"eval_{r}_l18w0.75_{p}" for r in ("abl_nokd", "amoeba_seed1") for p in parts)
    asked = {}
    for part in parts:
        job = evals[f"eval_abl_nokd_l18w0.75_{part}"]
        assert job.out == tmp_path / "eval" / f"abl_nokd_l18w0.75_{part}"
        assert plan.row_of(job.name) == "abl_nokd" and exp.row_of_folder(job.out.name) == "abl_nokd"
        assert str(tmp_path / "train" / "abl_nokd" / "adapter_model") in job.argv
        args = parse_args(job.argv)  # as main.py reads the job's command: its part's flags come last and win
        e = args.evaluation
        asked[part] = (e.do_mmlu_eval, e.do_eval_wikitext2, e.do_lm_eval and tuple(args.lm_eval_tasks))
        assert e.mmlu_dataset == "mmlu-fs" and e.eval_skip_existing
    assert asked == {"mmlu": (True, True, False), "hellaswag": (False, False, ("hellaswag",)),
                     "arc_piqa": (False, False, ("arc_easy", "piqa"))}
    # together the parts measure every metric of a whole evaluation, each once, and every lm-eval task of it
    measured = [m for _, metrics in exp.EVAL_PARTS.values() for m in metrics]
    assert sorted(measured) == sorted((exp.PPL, *exp.ACC_METRICS))
    assert sorted(t for *_, tasks in asked.values() if tasks for t in tasks) == sorted(exp.LM_EVAL_TASKS)
    keys = {p: evals[f"eval_abl_nokd_l18w0.75_{p}"].want_keys for p in parts}
    assert keys == {"mmlu": ["wikitext2_ppl_l18w0.75", "mmlu_test_accuracy_l18w0.75"],
                    "hellaswag": ["hellaswag_acc_norm_l18w0.75"],
                    "arc_piqa": ["arc_easy_acc_l18w0.75", "piqa_acc_l18w0.75"]}

    # each part's metrics in its folder: the part is done, and the report's cell has them all
    values = {"wikitext2_ppl": 250.0, "mmlu_test_accuracy": 0.25, "hellaswag_acc_norm": 0.31,
              "arc_easy_acc": 0.34, "piqa_acc": 0.57}
    for part in parts:
        folder = tmp_path / "eval" / f"abl_nokd_l18w0.75_{part}"
        folder.mkdir(parents=True)
        mine = {k: values[k.rsplit("_", 1)[0]] for k in keys[part]}
        (folder / "metrics.json").write_text(json.dumps({**mine, "params_l18w0.75": 7e8}))
        assert evals[f"eval_abl_nokd_l18w0.75_{part}"].done()
    cell = exp.collect(plan)["abl_nokd"]["l18w0.75"]
    assert {k: cell[k] for k in values} == values and cell["params"] == 7e8
    assert cell["avg_acc"] == pytest.approx((0.34 + 0.57 + 0.31 + 0.25) / 4)

    # (d'') evaluated whole before (its folder has no shape in its name): kept, and not trained again; the
    # ablation, one part short, is
    (tmp_path / "eval" / "abl_nokd_l18w0.75_hellaswag" / "metrics.json").unlink()
    seed = tmp_path / "eval" / "amoeba_seed1"
    seed.mkdir(parents=True)
    (seed / "metrics.json").write_text(json.dumps({f"{k}_l18w0.75": v for k, v in values.items()}))
    again = exp.Plan(exp.parse(rows))
    evals = {j.name: j for j in again.eval_jobs()}
    assert "eval_amoeba_seed1" in evals and evals["eval_amoeba_seed1"].done()
    assert not any(n.startswith("eval_amoeba_seed1_") for n in evals)
    needed = [j.name for j in again.needed_training(again.train_jobs(), list(evals.values()))]
    assert needed == ["train_abl_nokd"]
    whole = exp.Plan(exp.parse([*rows, "--eval_split", "0"]))
    assert sorted(j.name for j in whole.eval_jobs()) == ["eval_abl_nokd_l18w0.75", "eval_amoeba_seed1"]
