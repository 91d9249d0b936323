"""The command line: every seed command parses verbatim, list flags parse safely, bad values are refused."""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from amoeba.args import flag_values, parse_args, parse_int_list, parse_ratio_list
from amoeba.errors import UsageError

SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seed" / "AmoebaLLM-README.md"


def seed_commands() -> list[list[str]]:
    """The argument lists of every `python main.py` command in the seed README."""
    out = []
    for line in SEED_README.read_text().splitlines():
        if "python main.py" in line:
            out.append(shlex.split(line.split("python main.py", 1)[1]))
    return out


def test_the_seed_readme_has_five_main_commands():
    assert len(seed_commands()) == 5


@pytest.mark.parametrize("index", range(5))
def test_seed_command_parses_verbatim(index):
    argv = seed_commands()[index]
    args = parse_args(argv)
    t = SimpleNamespace(**flag_values(args.groups().values()))  # every flag by name, whichever group holds it
    assert args.model.model_name_or_path.startswith("meta-llama/")
    assert args.width_choice == (1.0, 0.875, 0.75, 0.625)
    if "--layer_calib_dp" in argv:
        assert t.layer_calib_dp and t.calib_dataset == "mmlu" and t.calib_metric == "acc"
        assert t.num_calib_sample == 40 and t.min_num_layer == 20 and t.dp_keep_last_layer == 1
        assert t.do_train is False and t.no_eval_orig and t.enable_shrinking
    if "--width_calib" in argv:
        assert t.width_calib and t.num_calib_sample == 512 and t.prune_width_method == "flap"
        assert args.model.use_auth_token
    if "--dataset" in argv:
        assert args.data.dataset == "alpaca-gpt4" and t.do_train and t.do_mmlu_eval and t.do_eval_wikitext2
        assert t.lora_modules == "all" and args.data.source_max_len == 384 and args.data.target_max_len == 128
        assert t.gradient_accumulation_steps == 4 and t.max_steps == 10000 and t.save_steps == 1000
        assert t.eval_strategy == "steps" and t.eval_steps == 1000  # --evaluation_strategy, the old name
        assert t.ddp_find_unused_parameters is True and t.data_seed == 42
        assert t.shrinking_method == "calib_dp" and t.shrinking_file == "dp_selection_strategy.npy"
        assert t.kd_weight == 1 and t.random_sample_num_layer == 2 and t.distill_method == "sp"
    if "--use_moe_lora" in argv:
        assert t.use_moe_lora and t.moe_num_expert == 5 and t.moe_topk == 2 and t.shrinkable_width
    if "--bits" in argv:
        assert t.bits == 8 and t.bf16
        assert args.eval_layers == (24,) and args.eval_widths == (0.875,)
        assert args.lm_eval_tasks == ("arc_easy", "piqa", "hellaswag") and t.do_lm_eval


def test_width_choice_is_parsed_without_eval():
    assert parse_ratio_list("[1,7/8,3/4,5/8]") == (1.0, 0.875, 0.75, 0.625)
    assert parse_ratio_list("1, 0.75,0.625") == (1.0, 0.75, 0.625)
    for bad in ("[1,__import__('os')]", "[1,2]", "[0]", "[1,1]", "[]", "[1,7/0]"):
        with pytest.raises(UsageError, match="--width_choice"):
            parse_ratio_list(bad)


def test_layer_grid_parses():
    assert parse_int_list("30,26,22,18", "--eval_num_layer") == (30, 26, 22, 18)
    with pytest.raises(UsageError, match="--eval_num_layer"):
        parse_int_list("24,x", "--eval_num_layer")
    with pytest.raises(UsageError):
        parse_int_list("0", "--eval_num_layer")


def test_grids_and_bad_values():
    args = parse_args(["--eval_num_layer", "30,26", "--eval_num_width", "1,3/4", "--do_train", "False"])
    assert args.eval_layers == (30, 26) and args.eval_widths == (1.0, 0.75)
    with pytest.raises(UsageError, match="--eval_num_width"):
        parse_args(["--eval_num_width", "1.5"])
    with pytest.raises(UsageError, match="--moe_topk"):
        parse_args(["--use_moe_lora", "--moe_num_expert", "2", "--moe_topk", "3"])
    with pytest.raises(UsageError, match="--bits"):
        parse_args(["--bits", "3"])
    with pytest.raises(UsageError, match="unknown argument"):
        parse_args(["--no_such_flag", "1"])
    with pytest.raises(UsageError, match="--export_format: 'tight'"):
        parse_args(["--export_format", "tight"])
    with pytest.raises(UsageError, match="--width_align: 0"):
        parse_args(["--width_align", "0"])
    assert parse_args(["--width_align", "8", "--do_train", "False"]).calibration.width_align == 8


def test_fp16_on_a_cpu_falls_back_to_fp32():
    import torch

    args = parse_args(["--fp16", "--do_train", "False"])
    if not torch.cuda.is_available():
        assert args.train.fp16 is False and args.train.fp16_requested
