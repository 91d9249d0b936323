"""Checkpoints under faults, on the tiny model: a kill while a checkpoint is written (before, during and after its
completion marker), damaged checkpoint files on resume, NaN gradients on a save step, ``--resume_training`` with
nothing to resume, damaged adapter files under ``--adapter_dir``. Resumed runs must end with the adapters of an
uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amoeba.run_folder import TRAINER_STATE, checkpoint_problem, last_complete_checkpoint
from tests.conftest import ROOT
from tests.test_training import _assert_exit_2, _flags, _main, tiny_dir  # noqa: F401 (tiny_dir: a fixture)

torch.set_num_threads(1)

# Six steps, a checkpoint every two, the two newest kept; MoE-LoRA so the router is checkpointed too.
FLAGS = ("--use_moe_lora", "--moe_num_expert", "2", "--moe_topk", "1", "--max_steps", "6", "--save_strategy",
         "steps", "--save_steps", "2", "--save_total_limit", "2", "--learning_rate", "3e-3", "--seed", "3",
         "--data_seed", "5")
WEIGHTS = Path("adapter_model") / "adapter_model.safetensors"
CONFIG = Path("adapter_model") / "adapter_config.json"

# Runs main.py with a fault injected at step KILL_STEP: os._exit(137) leaves the files as SIGKILL would (no
# cleanup, no finally blocks), at the moment KILL_WHERE names.
HARNESS = r"""
import os, sys
import torch

STEP, WHERE = int(os.environ["KILL_STEP"]), os.environ["KILL_WHERE"]
target = os.path.join(f"checkpoint-{STEP}", "")


def die():
    os._exit(137)


if WHERE == "optimizer_half_written":
    plain_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(target + "optimizer.pt"):
            import io

            buf = io.BytesIO()
            plain_save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        return plain_save(obj, f, *args, **kwargs)

    torch.save = save
elif WHERE in ("marker_not_renamed", "marker_renamed"):
    plain_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(target + "trainer_state.json"):
            if WHERE == "marker_renamed":
                plain_replace(src, dst, *args, **kwargs)
            die()
        return plain_replace(src, dst, *args, **kwargs)

    os.replace = replace
elif WHERE == "nan_gradients":
    from amoeba.adapters import adapted_modules
    from amoeba.training import SandwichTrainer

    plain_step = SandwichTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        loss = plain_step(self, model, inputs, *args, **kwargs)  # finite
        if self.state.global_step == STEP - 1:  # the update that makes step STEP, a save step
            adapted_modules(self.em.model)[0][2].lora_A.grad.fill_(float("nan"))
        return loss

    SandwichTrainer.training_step = training_step

from main import main

sys.exit(main(sys.argv[1:]))
"""


def _harness(where: str, step: int, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               KILL_STEP=str(step), KILL_WHERE=where)
    return subprocess.run([sys.executable, "-c", HARNESS, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _adapters(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same(reference: dict, path: Path) -> None:
    got = _adapters(path)
    assert reference.keys() == got.keys()
    diff = max(float((reference[k] - got[k]).abs().max()) for k in reference)
    assert diff <= 1e-6, diff


def _resume(tiny_dir, out: Path, caplog) -> tuple:
    """``--resume_training`` in this process; (exit code, stderr, warnings logged, info lines logged)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        proc = _main(*_flags(tiny_dir, out, *FLAGS, "--resume_training"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("amoeba")]
    infos = [r.getMessage() for r in caplog.records if r.name.startswith("amoeba")]
    return proc, warnings, infos


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """An uninterrupted run: (its output folder, its final adapters)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _main(*_flags(tiny_dir, out, *FLAGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    return out, _adapters(out / WEIGHTS)


# ----------------------------------------------------------------------------------------------
# A kill while a checkpoint is written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, resumes_from", [("optimizer_half_written", 2), ("marker_not_renamed", 2),
                                                 ("marker_renamed", 4)])
def test_kill_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path, reference,
                                                                                 caplog, where, resumes_from):
    """Killed while checkpoint-4 is written: before its marker exists (the optimizer file half written, or every
    file written and the marker's temporary file not yet renamed) it is skipped, with one warning naming it, and
    the run resumes from checkpoint-2; after the marker it resumes from checkpoint-4. Either way the final
    adapters are those of the uninterrupted run."""
    out = tmp_path / "run"
    killed = _harness(where, 4, *_flags(tiny_dir, out, *FLAGS))
    assert killed.returncode == 137, killed.stderr[-3000:]  # the fault fired at the moment named
    ckpt4 = out / "checkpoint-4"
    if where == "marker_not_renamed":  # the marker comes last: everything else is already there
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", str(WEIGHTS), str(CONFIG)):
            assert (ckpt4 / name).is_file(), name
    assert (ckpt4 / TRAINER_STATE).is_file() == (where == "marker_renamed")
    assert last_complete_checkpoint(out) == out / f"checkpoint-{resumes_from}"

    proc, warnings, infos = _resume(tiny_dir, out, caplog)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{resumes_from}'}" in infos
    skips = [w for w in warnings if "skipping" in w]
    if resumes_from == 2:
        assert len(skips) == 1 and str(ckpt4) in skips[0] and TRAINER_STATE in skips[0], warnings
    else:
        assert not skips, warnings
    _assert_same(reference[1], out / WEIGHTS)
    assert not list(ckpt4.glob(f".{TRAINER_STATE}.*"))  # no temporary marker left behind


# ----------------------------------------------------------------------------------------------
# Damaged files in the newest checkpoint
# ----------------------------------------------------------------------------------------------
def _nan_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    tensors = _adapters(path)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "amoeba-moe-lora"})


def _nan_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    next(iter(state["state"].values()))["exp_avg"].view(-1)[0] = float("inf")
    torch.save(state, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


DAMAGE = {  # what each does to checkpoint-6, and a word the skip reason must contain
    "empty_marker": (lambda c: (c / TRAINER_STATE).write_text(""), TRAINER_STATE),
    "truncated_marker": (lambda c: _truncate(c / TRAINER_STATE), TRAINER_STATE),
    "foreign_marker": (lambda c: (c / TRAINER_STATE).write_text(json.dumps(
        dict(json.loads((c / TRAINER_STATE).read_text()), written_by="another program"))), TRAINER_STATE),
    "truncated_optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt"),
    "random_optimizer": (lambda c: (c / "optimizer.pt").write_bytes(os.urandom(256)), "optimizer.pt"),
    "nonfinite_optimizer": (lambda c: _nan_optimizer(c / "optimizer.pt"), "non-finite"),
    "missing_scheduler": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt"),
    "truncated_rng": (lambda c: _truncate(c / "rng_state.pth"), "rng_state.pth"),
    "truncated_adapters": (lambda c: _truncate(c / WEIGHTS), "adapter_model.safetensors"),
    "nan_adapters": (lambda c: _nan_safetensors(c / WEIGHTS), "non-finite"),
    "binary_adapter_config": (lambda c: (c / CONFIG).write_bytes(b"\xff\xfe\x00junk"), "adapter_config.json"),
    "mistyped_adapter_config": (lambda c: (c / CONFIG).write_text(
        json.dumps(dict(json.loads((c / CONFIG).read_text()), r="four"))), "adapter_config.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_says_so(tiny_dir, tmp_path, reference, caplog, damage):
    """A damaged newest checkpoint is skipped with one warning naming it and why; the run resumes from the older
    intact one, with no traceback, and ends with the uninterrupted run's adapters."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-4", "checkpoint-6"):
        shutil.copytree(reference[0] / name, out / name)
    spoil, why = DAMAGE[damage]
    spoil(out / "checkpoint-6")
    assert why in checkpoint_problem(out / "checkpoint-6")
    assert checkpoint_problem(out / "checkpoint-4") is None

    proc, warnings, infos = _resume(tiny_dir, out, caplog)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    skips = [w for w in warnings if "skipping" in w]
    assert len(skips) == 1 and str(out / "checkpoint-6") in skips[0] and why in skips[0], warnings
    assert f"resuming from {out / 'checkpoint-4'}" in infos
    _assert_same(reference[1], out / WEIGHTS)
    assert checkpoint_problem(out / "checkpoint-6") is None  # written again, whole


def test_resume_with_no_valid_checkpoint_or_none_at_all_exits_2(tiny_dir, tmp_path, reference):
    """No checkpoint validates: one line naming each and why, exit 2, nothing deleted. No checkpoint at all: one
    line saying there is nothing to resume, exit 2 (not a silent fresh run)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-4", "checkpoint-6"):
        shutil.copytree(reference[0] / name, out / name)
    (out / "checkpoint-6" / TRAINER_STATE).write_text("")
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = _main(*_flags(tiny_dir, out, *FLAGS, "--resume_training"))
    _assert_exit_2(proc, "--resume_training", "checkpoint-6", TRAINER_STATE, "checkpoint-4", "optimizer.pt")
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.startswith("checkpoint-")} == before

    empty = tmp_path / "empty"
    proc = _main(*_flags(tiny_dir, empty, *FLAGS, "--resume_training"))
    _assert_exit_2(proc, "--resume_training", "no checkpoint")
    assert not list(empty.glob("checkpoint-*")) and not (empty / "adapter_model").exists()


# ----------------------------------------------------------------------------------------------
# Non-finite state is never checkpointed
# ----------------------------------------------------------------------------------------------
def test_nan_gradients_on_a_save_step_stop_and_name_the_previous_good_checkpoint(tiny_dir, tmp_path, reference,
                                                                                 caplog):
    """Finite loss, NaN gradients on step 4 (a save step): the run stops with one line (exit 2, as the NaN-loss
    stop) naming checkpoint-2 as the last good checkpoint; no checkpoint-4 of NaN adapters is written, and
    checkpoint-2 resumes to the uninterrupted run's adapters."""
    out = tmp_path / "run"
    proc = _harness("nan_gradients", 4, *_flags(tiny_dir, out, *FLAGS))
    _assert_exit_2(proc, "non-finite", "step 4", f"the last good checkpoint is {out / 'checkpoint-2'}",
                   "--resume_training")
    assert not (out / "checkpoint-4").exists() and not (out / "adapter_model").exists()
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    resumed, warnings, _ = _resume(tiny_dir, out, caplog)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [w for w in warnings if "skipping" in w]
    _assert_same(reference[1], out / WEIGHTS)


def test_nan_gradients_on_the_last_step_write_no_final_adapters(tiny_dir, tmp_path):
    """Without a checkpoint at the end, NaN gradients on the last step still never become the run's adapters."""
    from transformers import TrainerCallback

    from amoeba.adapters import adapted_modules
    from amoeba.stages.finetuning import run_training
    from amoeba.training import TrainingDiverged
    from tests.test_training import _setup

    class Poison(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                adapted_modules(model)[0][2].lora_A.grad.fill_(float("nan"))

    out = tmp_path / "run"
    args, model, tok, em, s = _setup(tiny_dir, out, "--max_steps", "2", strategy=False)
    with pytest.raises(TrainingDiverged, match="non-finite gradients in .* at step 2 .*stopped without applying "
                                               "them, no checkpoint was written yet"):
        run_training(args, model, tok, em, s, callbacks=[Poison()])
    assert not (out / "adapter_model").exists()


# ----------------------------------------------------------------------------------------------
# Durability: every file is on disk before the marker, which is renamed into place
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps file descriptors to paths through /proc")
def test_every_checkpoint_file_is_synced_before_the_marker_is_renamed_into_place(tiny_dir, tmp_path, monkeypatch):
    from amoeba.stages.finetuning import run_training
    from tests.test_training import _setup

    events: list[tuple[str, str]] = []
    plain_fsync, plain_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return plain_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", os.path.realpath(dst)))
        return plain_replace(src, dst, *args, **kwargs)

    out = tmp_path / "run"
    args, model, tok, em, s = _setup(tiny_dir, out, "--max_steps", "2", "--save_strategy", "steps",
                                     "--save_steps", "2", strategy=False)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_training(args, model, tok, em, s)
    monkeypatch.undo()

    ckpt = Path(os.path.realpath(out / "checkpoint-2"))
    marker = str(ckpt / TRAINER_STATE)
    renamed = events.index(("rename", marker))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    files = {str(p) for p in ckpt.rglob("*") if p.is_file() and p.name != TRAINER_STATE}
    assert files and files <= synced, sorted(files - synced)
    assert str(ckpt) in synced and str(ckpt / "adapter_model") in synced  # their entries too
    tmp_synced = [path for kind, path in events[:renamed] if kind == "fsync" and
                  Path(path).name.startswith(f".{TRAINER_STATE}.")]
    assert tmp_synced, "the marker's temporary file is fsynced before the rename"
    assert ("fsync", str(ckpt)) in events[renamed + 1:]  # and the rename itself made durable
    assert checkpoint_problem(ckpt) is None


# ----------------------------------------------------------------------------------------------
# --adapter_dir with damaged files
# ----------------------------------------------------------------------------------------------
ADAPTER_DAMAGE = {
    "truncated_safetensors": (lambda d: _truncate(d / "adapter_model.safetensors"), "adapter_model.safetensors"),
    "random_safetensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(os.urandom(512)),
                           "adapter_model.safetensors"),
    "nan_safetensors": (lambda d: _nan_safetensors(d / "adapter_model.safetensors"), "adapter_model.safetensors"),
    "empty_config": (lambda d: (d / "adapter_config.json").write_text(""), "adapter_config.json"),
    "binary_config": (lambda d: (d / "adapter_config.json").write_bytes(b"\x80\x81\x82"), "adapter_config.json"),
    "mistyped_config": (lambda d: (d / "adapter_config.json").write_text(
        json.dumps(dict(json.loads((d / "adapter_config.json").read_text()), r="four"))), "adapter_config.json"),
    "config_without_rank": (lambda d: (d / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in json.loads((d / "adapter_config.json").read_text()).items() if k != "r"})),
        "adapter_config.json"),
}


@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
def test_adapter_dir_with_damaged_files_exits_2_naming_the_file(tiny_dir, tmp_path, reference, damage):
    adapters = tmp_path / "adapters"
    shutil.copytree(reference[0] / "adapter_model", adapters)
    spoil, name = ADAPTER_DAMAGE[damage]
    spoil(adapters)
    argv = _flags(tiny_dir, tmp_path / "eval", "--use_moe_lora", "--moe_num_expert", "2", "--moe_topk", "1",
                  "--adapter_dir", str(adapters))
    argv[argv.index("--do_train") + 1] = "False"
    _assert_exit_2(_main(*argv), str(adapters / name))
    shutil.rmtree(adapters)
    shutil.copytree(reference[0] / "adapter_model", adapters)
    assert _main(*argv).returncode == 0  # the same command with intact adapters works
