"""Stage 2 beyond one process: ``--fsdp`` (the frozen base sharded over the processes, :mod:`amoeba.sharding`), the
launch checks, and two machines of one process each. Every multi-process run here is two gloo processes on the
CPU: the installed torch runs FSDP2 (``fully_shard``) on CPU processes, so the sharded path itself is tested."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amoeba.distributed import check_launch
from amoeba.errors import UsageError
from amoeba.sharding import ShardSettings, check_fsdp_command, parse_fsdp
from tests.test_cli import assert_usage_error
from tests.test_distributed import TIMEOUT, _adapters, _env, _free_port, _max_diff, _stage2_flags, _torchrun
from tests.test_training import _main, tiny_dir  # noqa: F401  (shared fixture)

ROOT = Path(__file__).resolve().parents[1]
FSDP = ("--ddp_backend", "gloo", "--fsdp")


def _fsdp_flags(tiny_dir, out, batch: int, *extra) -> list[str]:
    """4 sandwich steps, a checkpoint every 2, gradient checkpointing on (it recomputes sharded layers)."""
    return _stage2_flags(tiny_dir, out, batch, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                         "--save_total_limit", "3", "--gradient_checkpointing", "True", *extra)


# ----------------------------------------------------------------------------------------------
# --fsdp: same results as one process
# ----------------------------------------------------------------------------------------------
def test_fsdp_equals_one_process_resumes_exactly_and_evaluates_in_lockstep(tiny_dir, tmp_path):
    """Two processes with the frozen base sharded (``--fsdp``), 2 examples each, against one unsharded process
    with 4 (only the first process reads the weights; it sends the other its shards): after 4 sandwich steps with elastic depth and width (skipped layers' units gather nothing on either
    process) the adapters agree to 1e-5 (fp32; measured about 1e-6). The MMLU evaluation after training, where
    every process runs every question in step (a sharded layer runs only when all run it), gives the one-process
    numbers. Resuming the sharded run from its step-2 checkpoint ends with the uninterrupted run's adapters, and
    that checkpoint's adapters load in a one-process run."""
    mmlu = ("--do_mmlu_eval", "True", "--max_mmlu_samples", "8", "--mmlu_source_max_len", "64")
    one = _main(*_fsdp_flags(tiny_dir, tmp_path / "one", 4, *mmlu))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("main.py", *_fsdp_flags(tiny_dir, tmp_path / "two", 2, *FSDP, *mmlu))
    assert two.returncode == 0, two.stderr[-4000:]
    assert "sharded over 2 processes" in two.stderr and "DDP over the" in two.stderr
    assert "process 1 builds the model without its weights" in two.stderr  # one copy of the base is read

    a, b = _adapters(tmp_path / "one"), _adapters(tmp_path / "two")
    assert max(float(a[k].abs().max()) for k in a if k.endswith("lora_B")) > 1e-3  # training moved them
    assert _max_diff(a, b) <= 1e-5, _max_diff(a, b)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1.keys() == m2.keys() and any(k.startswith("mmlu_loss") for k in m1)
    for key in m1:
        assert abs(m1[key] - m2[key]) <= 1e-4, (key, m1[key], m2[key])

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    for name in ("checkpoint-4", "adapter_model", "metrics.json"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    again = _torchrun("main.py", *_fsdp_flags(tiny_dir, resumed, 2, *FSDP, "--resume_training"))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from" in again.stderr and "checkpoint-2" in again.stderr
    assert _max_diff(b, _adapters(resumed)) <= 1e-6
    tokens = lambda run: json.loads((tmp_path / run / "train_results.json").read_text())["tokens_seen"]  # noqa: E731
    assert tokens("two") == tokens("one") == tokens("resumed") > 0  # all processes' tokens, across the resume

    evaluated = _main(*_fsdp_flags(tiny_dir, tmp_path / "eval", 4, *mmlu), "--do_train", "False", "--adapter_dir",
                      str(tmp_path / "two" / "checkpoint-2"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert any(k.startswith("mmlu_loss") for k in json.loads((tmp_path / "eval" / "metrics.json").read_text()))


def test_a_base_built_on_the_meta_device_is_sharded_in_halves_and_trains(tiny_dir, tmp_path):
    """``scripts/bench_multi_gpu.py fsdp`` (the 70B-shaped measurement) on a tiny shape: the base is built on the
    meta device, each process allocates only its half of every weight, and the sandwich steps' losses are
    finite."""
    out = tmp_path / "fsdp.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_multi_gpu.py"), "fsdp", "--shape", "tiny",
                          "--cpu", "--steps", "2", "--batch", "1", "--seq_len", "32", "--lora_r", "4", "--experts",
                          "2", "--tokenizer", str(tiny_dir / "model"), "--out", str(out)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["processes"] == 2 and res["all_finite"] and len(res["losses"]) == 2
    share = res["base_parameters_per_process"] / res["base_parameters"]
    assert 0.49 <= share <= 0.51, share  # half of every weight (rows padded to an even split)
    assert res["sandwich"] == ["largest", "random1", "random2", "smallest"]


# ----------------------------------------------------------------------------------------------
# Two machines of one process each
# ----------------------------------------------------------------------------------------------
def test_two_nodes_of_one_process_equal_one_process_and_only_the_first_writes(tiny_dir, tmp_path):
    """The README's multi-node command on one host: two ``torchrun --nnodes 2 --node_rank i`` launches of one
    process each, meeting at one rendezvous address, as two machines would. Global rank, world size and the
    local rank (0 on both) come from the launcher: the adapters equal one process with the whole batch, and the
    second machine's output folder gets only its own RNG state in each checkpoint (resume reads it there),
    never the adapters, results or run record."""
    one = _main(*_fsdp_flags(tiny_dir, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
               str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), "main.py",
               *_fsdp_flags(tiny_dir, tmp_path / f"node{rank}", 2, "--ddp_backend", "gloo")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-4000:]
    assert _max_diff(_adapters(tmp_path / "one"), _adapters(tmp_path / "node0")) <= 1e-5
    tokens = lambda run: json.loads((tmp_path / run / "train_results.json").read_text())["tokens_seen"]  # noqa: E731
    assert tokens("node0") == tokens("one") > 0  # the run's tokens, both processes' shares
    processes = lambda run: json.loads((tmp_path / run / "train_results.json").read_text())["processes"]  # noqa: E731
    assert (processes("one"), processes("node0")) == (1, 2)
    second = sorted(str(p.relative_to(tmp_path / "node1")) for p in (tmp_path / "node1").rglob("*") if p.is_file())
    assert second == ["checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"], second
    assert (tmp_path / "node0" / "run_args.json").is_file()


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, mode", [(None, None), ("full_shard", "full_shard"), ("full_shard auto_wrap", "full_shard"),
                                         (["full_shard", "auto_wrap"], "full_shard"), ("shard_grad_op", "shard_grad_op"),
                                         ("true", "full_shard")])
def test_fsdp_words_parse_to_the_sharding_mode(value, mode):
    got = parse_fsdp(value)
    assert (got.mode if got is not None else None) == mode


@pytest.mark.parametrize("value, needle", [("offload", "CPU offload"), ("hybrid_shard", "hybrid"),
                                           ("no_shard", "DDP"), ("full_shard shard_grad_op", "not full_shard"),
                                           ("fast", "unknown option")])
def test_fsdp_options_this_path_cannot_do_are_refused(value, needle):
    with pytest.raises(UsageError, match=needle) as err:
        parse_fsdp(value)
    assert err.value.flag == "--fsdp"


@pytest.mark.parametrize("changes, needle", [
    ({"do_train": False}, "--do_train True"), ({"bits": 4}, "--bits 4"), ({"bits": 8}, "--bits 8"),
    ({"device_map": "auto"}, "--device_map"), ({"calibrating": True}, "--layer_calib_dp"),
    ({"exporting": True}, "--export_dir"), ({"world_size": 1}, "torchrun")])
def test_fsdp_combinations_it_cannot_run_are_refused(changes, needle):
    setting = dict(do_train=True, bits=16, device_map=None, calibrating=False, exporting=False, world_size=2)
    check_fsdp_command(ShardSettings(), **setting)  # the combination that runs
    with pytest.raises(UsageError, match=needle.replace("-", r"\-")):
        check_fsdp_command(ShardSettings(), **{**setting, **changes})


@pytest.mark.parametrize("extra, needles", [
    (("--fsdp", "offload"), ("--fsdp", "offload")),
    (("--fsdp_config", "fsdp.json"), ("--fsdp_config", "--fsdp alone")),
    (("--fsdp", "--do_train", "False", "--do_mmlu_eval", "True"), ("--fsdp", "--do_train True")),
    (("--fsdp", "--layer_calib_dp"), ("--fsdp", "calibration")),
    (("--fsdp", "--device_map", "auto"), ("--fsdp", "--device_map")),
])
def test_fsdp_refusals_come_before_the_model_loads(tiny_dir, tmp_path, extra, needles):
    """One line naming the flag or combination, exit 2, before any model is read (the model path does not
    exist)."""
    argv = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "o"),
            "--dataset", str(tiny_dir / "data.jsonl"), "--do_train", "True", "--use_cpu", "True", *extra]
    assert_usage_error(_main(*argv), *needles)


def test_more_processes_than_visible_gpus_is_refused_and_fewer_warned(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(UsageError, match=r"4 processes were started on this machine but 2 GPU\(s\) are visible "
                                         r"\(CUDA_VISIBLE_DEVICES=0,1\).*--nproc_per_node 2"):
        check_launch()
    check_launch(cpu=True)  # gloo processes on the CPU: nothing to compare
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with caplog.at_level("WARNING"):
        check_launch()
    assert "2 GPU(s) stay idle" in caplog.text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_launch()  # a single process is never refused here
