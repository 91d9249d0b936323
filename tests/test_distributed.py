"""Stage 2 across processes on the CPU: two gloo processes under ``torchrun`` against one process with the
same global batch, and the invariants every data-parallel step relies on (same subnets on every rank,
same balancing scale, identical adapters everywhere).

Run as a script under ``torchrun`` (``python tests/test_distributed.py plans OUT FLAGS...``), this file is
also the worker that records, on each rank, the subnets of every micro-batch and the final adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the worker runs as a plain script
    sys.path.insert(0, str(ROOT))

TIMEOUT = 300  # seconds for one two-process run; a hang fails the test instead of blocking CI


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _torchrun(*argv) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 <argv>`` (a free rendezvous port is picked by torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _adapters(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------------------------------------
# Worker (runs on every rank under torchrun)
# ----------------------------------------------------------------------------------------------
def _worker(out: str, flags: list[str]) -> None:
    """Stage 2 through ``prepare_trainer`` with the plan of every micro-batch recorded; each rank writes
    ``rank{r}.json`` (its plans) and ``rank{r}.safetensors`` (its final adapters)."""
    from safetensors.torch import save_file
    from transformers import set_seed

    from amoeba.adapters import adapter_state_dict
    from amoeba.args import parse_args
    from amoeba.elastic import make_elastic
    from amoeba.loading import load_model_and_tokenizer
    from amoeba.pipeline import load_settings
    from amoeba.stages.finetuning import prepare_trainer
    from amoeba.strategy import apply_strategy, load_strategy

    args = parse_args(flags)
    set_seed(args.train.seed)
    model, tok = load_model_and_tokenizer(load_settings(args))
    em = make_elastic(model)
    strategy = load_strategy(args.elastic.shrinking_file)
    apply_strategy(em, strategy, args.width_choice)
    trainer, _ = prepare_trainer(args, model, tok, em, strategy)
    plans = []
    original = trainer.plan_for_step

    def recording():
        plan = original()
        step, micro = trainer._micro_step
        plans.append({"step": step, "micro": micro, "plan": [[r, list(s.layers), s.width] for r, s in plan]})
        return plan

    trainer.plan_for_step = recording
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter_state_dict(em.model).items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(plans))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
from tests.test_training import SANDWICH, _flags, _main, tiny_dir  # noqa: E402,F401  (shared fixture)

torch.set_num_threads(1)


def _stage2_flags(tiny_dir, out, batch: int, *extra) -> list[str]:
    flags = [*SANDWICH, "--shrinking_file", str(tiny_dir / "dp_selection_strategy.npy"), "--use_moe_lora",
             "--moe_num_expert", "3", "--moe_topk", "2", "--max_steps", "3", "--learning_rate", "3e-3",
             "--seed", "11", "--data_seed", "5", "--use_cpu", "True", *extra]
    argv = _flags(tiny_dir, out, *flags)
    argv[argv.index("--per_device_train_batch_size") + 1] = str(batch)
    return argv


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tiny_dir, tmp_path):
    """``torchrun --nproc_per_node 2 main.py ... --ddp_backend gloo`` with 2 examples per process equals
    ``main.py`` with 4 examples per batch, after 3 Adam steps of sandwich training with MoE-LoRA and elastic
    depth and width: adapters to 1e-5 (measured about 4e-6; Adam turns float rounding of near-zero
    gradients into differences of that size).

    Why it can hold: the Trainer (through accelerate) gives every process the same seeded permutation of
    the data and deals its batches out in turn, so ranks 0 and 1 together see the one-process batch; the
    subnets are a function of (seed, global step, micro-batch) only; DDP averages the gradients; and the
    balancing scale uses the loss averaged over processes. The per-process losses are means over each
    process's target tokens, so the equality needs equal target counts per process: here every answer has
    the same length (in general a DDP step weighs each process's examples equally, as the Trainer does).
    A run with another seed lies far outside the tolerance, so the comparison can fail."""
    one = _main(*_stage2_flags(tiny_dir, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("main.py", *_stage2_flags(tiny_dir, tmp_path / "two", 2, "--ddp_backend", "gloo"))
    assert two.returncode == 0, two.stderr[-4000:]

    a, b = _adapters(tmp_path / "one"), _adapters(tmp_path / "two")
    assert max(float(a[k].abs().max()) for k in a if k.endswith("lora_B")) > 1e-3  # training moved them
    diff = _max_diff(a, b)
    assert diff <= 1e-5, diff

    # The logged per-role losses (averaged over processes) follow the one-process run step by step.
    log1 = json.loads((tmp_path / "one" / "training_log.json").read_text())
    log2 = json.loads((tmp_path / "two" / "training_log.json").read_text())
    rows1 = [r for r in log1 if "loss_smallest" in r]
    rows2 = [r for r in log2 if "loss_smallest" in r]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3]
    for r1, r2 in zip(rows1, rows2):
        for key in ("loss_largest", "loss_random1", "loss_random2", "loss_smallest"):
            assert abs(r1[key] - r2[key]) <= 2e-4, (key, r1, r2)

    other = _main(*_stage2_flags(tiny_dir, tmp_path / "other", 4), "--seed", "12")
    assert other.returncode == 0, other.stderr[-3000:]
    assert _max_diff(a, _adapters(tmp_path / "other")) > 100 * 1e-5


def test_every_rank_trains_the_same_subnets_and_ends_with_the_same_adapters(tiny_dir, tmp_path):
    """Two gloo processes with gradient accumulation 2: in every micro-batch both ranks run the same
    sandwich, which is the sampler's draw for (seed, global step, micro-batch index), with skipped layers
    (their adapters get no gradient in that pass; DDP is told to expect it, no hang); both ranks end with
    bitwise identical adapters."""
    from amoeba.elastic import make_elastic
    from amoeba.shapes import layer_masks
    from amoeba.strategy import load_strategy
    from amoeba.training import SandwichSampler, step_rng
    from transformers import AutoModelForCausalLM

    out = tmp_path / "plans"
    flags = _stage2_flags(tiny_dir, tmp_path / "o", 2, "--ddp_backend", "gloo", "--gradient_accumulation_steps", "2")
    run = _torchrun(str(Path(__file__).resolve()), "plans", str(out), *flags)
    assert run.returncode == 0, run.stderr[-4000:]

    plans = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1]
    assert [(p["step"], p["micro"]) for p in plans[0]] == [(s, m) for s in range(3) for m in range(2)]

    em = make_elastic(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"))
    masks = layer_masks(load_strategy(tiny_dir / "dp_selection_strategy.npy"), em.num_layers)
    sampler = SandwichSampler(em, 3, 2, (1.0, 0.875, 0.75, 0.625), masks)
    for p in plans[0]:
        expected = [[r, list(s.layers), s.width] for r, s in sampler.sample(step_rng(11, p["step"], p["micro"]))]
        assert p["plan"] == expected
    depths = {len(layers) for p in plans[0] for _, layers, _ in p["plan"]}
    assert min(depths) < 6  # some passes skipped layers

    from safetensors.torch import load_file

    r0, r1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert _max_diff(r0, r1) == 0.0
    assert max(float(r0[k].abs().max()) for k in r0 if k.endswith("lora_B")) > 1e-3


def test_launch_script_with_accelerate_trains_and_evaluates_on_two_processes(tiny_dir, tmp_path):
    """``scripts/launch_multi_gpu.sh`` through ``accelerate launch`` with ``scripts/accelerate_ddp.yaml``, as
    two CPU processes (gloo): the seed's Stage 2 flags, a Trainer evaluation at the end (a collective every
    process must join) and the MMLU stage after training; one set of results, written by the first process."""
    out = tmp_path / "ft"
    env = dict(_env(), PYTHON=sys.executable, LAUNCHER="accelerate", NGPU="2", PORT=str(_free_port()),
               MODEL=str(tiny_dir / "model"), OUT=str(out), DATASET=str(tiny_dir / "data.jsonl"),
               STRATEGY=str(tiny_dir / "dp_selection_strategy.npy"), MAX_STEPS="2", SOURCE_LEN="32",
               TARGET_LEN="16", EVAL_SIZE="8", GRAD_ACC="1")
    env.setdefault("AMOEBA_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    small = ["--use_cpu", "True", "--ddp_backend", "gloo", "--min_num_layer", "3", "--per_device_train_batch_size",
             "2", "--save_steps", "1", "--eval_steps", "2", "--max_eval_samples", "8", "--max_train_samples", "32",
             "--do_eval_wikitext2", "False", "--max_mmlu_samples", "4", "--mmlu_source_max_len", "64"]
    run = subprocess.run(["bash", str(ROOT / "scripts" / "launch_multi_gpu.sh"), *small], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["sandwich"] == ["largest", "random1", "random2", "smallest"]
    assert results["eval_loss"] == results["eval_loss"] and results["eval_loss"] > 0  # finite, gathered
    assert results["train_samples_per_second"] > 0
    assert (out / "adapter_model" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert "mmlu" in (out / "metrics.json").read_text()
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "launch_multi_gpu.sh")], cwd=ROOT,
                         env=dict(env, LAUNCHER="mpi"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "LAUNCHER" in bad.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mean_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from amoeba.distributed import mean_over_processes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        got = mean_over_processes(torch.tensor(1.0 + 2.0 * rank))  # 1 and 3
        bad = mean_over_processes(torch.tensor(float("nan") if rank == 1 else 2.0))
        Path(out, f"{rank}.json").write_text(json.dumps([float(got), bool(torch.isfinite(bad))]))
    finally:
        dist.destroy_process_group()


def test_loss_mean_over_processes_is_shared_and_propagates_a_nan():
    """The balancing scale is the same on every rank, and a NaN on one rank is seen by all (so every rank
    stops together instead of waiting in the next all-reduce)."""
    import tempfile

    import torch.multiprocessing as mp

    from amoeba.distributed import mean_over_processes

    assert float(mean_over_processes(torch.tensor(2.5))) == 2.5  # no process group: unchanged
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_mean_worker, args=(r, port, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT)
            assert p.exitcode == 0
        results = [json.loads(Path(out, f"{r}.json").read_text()) for r in (0, 1)]
    assert results == [[2.0, False], [2.0, False]]


# ----------------------------------------------------------------------------------------------
# FLAP statistics across processes
# ----------------------------------------------------------------------------------------------
def _flap_result(world: int = 1) -> dict:
    """Stats, scores, masks and compensation biases of FLAP on a tiny GQA model (5 sequences: with 2
    processes the shares are uneven, 3 and 2), flattened into tensors."""
    from amoeba.elastic import make_elastic
    from amoeba.flap import compensation_biases, flap_scores, select_widths, unit_costs, width_dicts
    from tests.conftest import tiny_model

    torch.set_num_threads(1)
    model = tiny_model("gqa", layers=3)
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    em = make_elastic(model)
    s = flap_scores(model, ids, batch_size=2, progress=False)
    sel = select_widths(s.group_score, s.channel_score, (1.0, 0.875, 0.75, 0.625), "global", *unit_costs(em))
    masks, biases = width_dicts(em, sel, compensation_biases(em, s.stats, sel))
    out = {"group_score": s.group_score, "channel_score": s.channel_score,
           "tokens": torch.tensor([float(st.tokens) for st in s.stats])}
    for i, st in enumerate(s.stats):
        out.update({f"{i}.attn_mean": st.attn_mean, f"{i}.attn_var": st.attn_var, f"{i}.mlp_mean": st.mlp_mean,
                    f"{i}.mlp_var": st.mlp_var})
    for name, per_ratio in masks.items():
        for r, m in (per_ratio or {}).items():
            out[f"mask.{name}.{r}"] = torch.as_tensor(np.asarray(m, dtype=np.float64))
    for name, per_ratio in biases.items():
        for r, b in (per_ratio or {}).items():
            out[f"bias.{name}.{r}"] = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return {k: v.detach().to(torch.float64).contiguous() for k, v in out.items()}


def _gloo_worker(rank: int, port: int, out: str, name: str) -> None:
    """One of two gloo processes: computes ``_<name>_result()`` and saves it as ``<name><rank>``."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        save_file(globals()[f"_{name}_result"](), str(Path(out) / f"{name}{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _results_of_two_processes(name: str) -> list[dict]:
    """``_<name>_result()`` as computed by each of two gloo processes (spawned), rank 0 first."""
    import tempfile

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_gloo_worker, args=(r, _free_port_shared(out), out, name)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT)
            assert p.exitcode == 0
        return [load_file(str(Path(out) / f"{name}{r}.safetensors")) for r in (0, 1)]


def test_flap_statistics_split_over_two_processes_equal_one_process():
    """Two gloo processes each take part of the calibration sequences; the merged per-layer statistics,
    the scores, the kept heads/channels and the compensation biases equal one process's (biases to 1e-5,
    measured about 1e-15; masks exactly), on both ranks."""
    one = _flap_result()
    ranks = _results_of_two_processes("flap")
    assert float(one["tokens"][0]) == 5 * 16
    assert any(k.startswith("bias.") and float(v.abs().max()) > 1e-3 for k, v in one.items())
    for got in ranks:
        assert got.keys() == one.keys()
        for k, v in one.items():
            if k.startswith("mask."):
                assert torch.equal(got[k], v), k
            else:
                assert torch.allclose(got[k], v, rtol=0, atol=1e-5 if k.startswith("bias.") else 1e-9), k


# ----------------------------------------------------------------------------------------------
# Layer DP across processes
# ----------------------------------------------------------------------------------------------
def _dp_result(naive: bool = False) -> dict:
    """The layer DP (perplexity on 5 random windows in 3 batches of 2, 2 and 1) of a tiny 6-layer model."""
    from amoeba.depth_dp import LayerDropScorer, PerplexityMetric, select_layers_dp, text_batches
    from tests.conftest import tiny_model

    torch.set_num_threads(1)
    model = tiny_model("gqa", layers=6).eval()
    windows = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    scorer = LayerDropScorer(model, text_batches(windows, 2), PerplexityMetric(model.lm_head), naive=naive,
                             progress=False)
    res = select_layers_dp(6, 2, 1, scorer, higher_is_better=False, progress=False)
    return {"strategy": torch.as_tensor(res.strategy), "metric": torch.as_tensor(res.metric),
            "batches": torch.tensor([float(len(scorer.batches))])}


def test_layer_dp_split_over_two_processes_equals_one_process():
    """Two gloo processes score their share of the calibration batches (2 and 1 of 3) and gather the
    statistics: the DP table (scores to 1e-9 relative) and every kept-layer mask equal one process's, on
    both ranks."""
    one = _dp_result()
    assert float(one["batches"][0]) == 3
    ranks = _results_of_two_processes("dp")
    assert [float(r["batches"][0]) for r in ranks] == [2, 1]  # each process ran only its share
    finite = torch.isfinite(one["metric"])
    assert int(finite.sum()) > 10
    for got in ranks:
        assert torch.equal(got["strategy"], one["strategy"])
        assert torch.equal(torch.isfinite(got["metric"]), finite)
        assert torch.allclose(got["metric"][finite], one["metric"][finite], rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------------------------
# Evaluation across processes
# ----------------------------------------------------------------------------------------------
EVAL_REL = 1e-6  # relative tolerance of every metric; the split runs the same batches, so measured 0


def _eval_flags(tiny_dir, out, shapes: str, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(out), "--do_train", "False",
            "--report_to", "none", "--enable_shrinking", "--min_num_layer", "3", "--shrinking_method", "calib_dp",
            "--shrinking_file", str(tiny_dir / "dp_selection_strategy.npy"), "--shrinkable_width",
            "--width_choice", "[1,7/8,3/4,5/8]", "--eval_shapes", shapes, "--per_device_eval_batch_size", "2",
            "--do_mmlu_eval", "True", "--mmlu_dataset", "mmlu-zs", "--do_eval_wikitext2", "True",
            "--do_lm_eval", "True", "--do_lm_eval_task", "piqa", "--lm_eval_limit", "2", *extra]


def _same_metrics(one: Path, two: Path) -> float:
    """Assert both metrics.json files hold the same keys and values (to EVAL_REL); the largest relative
    difference."""
    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((two / "metrics.json").read_text())
    assert list(a) == list(b)  # same keys in the same order
    worst = 0.0
    for k, v in a.items():
        rel = abs(v - b[k]) / max(abs(v), 1e-30)
        assert rel <= EVAL_REL, (k, v, b[k])
        worst = max(worst, rel)
    return worst


def test_evaluation_split_over_two_processes_equals_one_process(tiny_dir, tmp_path):
    """``torchrun --nproc_per_node 2 main.py`` evaluating 3 shapes (MMLU on 7 questions, WikiText-2 on 3
    windows, lm-eval piqa): MMLU batches and WikiText-2 windows are split within each shape, lm-eval shapes
    go to ranks 0, 1, 0; rank 0 writes metrics.json, equal to one process's (every key, to 1e-6 relative;
    measured 0: each batch is the same batch in both runs, and the sums are added in the same order), plus
    results.md and frontier.png."""
    shapes = "6x1,5x7/8,4x3/4"
    extra = ["--max_mmlu_samples", "7", "--max_wikitext2_windows", "3"]
    one = _main(*_eval_flags(tiny_dir, tmp_path / "one", shapes, *extra))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("main.py", *_eval_flags(tiny_dir, tmp_path / "two", shapes, *extra, "--ddp_backend", "gloo"))
    assert two.returncode == 0, two.stderr[-4000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for label in ("l6w1", "l5w0.875", "l4w0.75"):
        for key in ("mmlu_test_accuracy", "mmlu_loss", "wikitext2_ppl", "piqa_acc", "params"):
            assert f"{key}_{label}" in metrics, (key, label)
    assert len({metrics[f"wikitext2_ppl_{lb}"] for lb in ("l6w1", "l5w0.875", "l4w0.75")}) == 3
    assert _same_metrics(tmp_path / "one", tmp_path / "two") <= EVAL_REL
    assert "lm-eval shapes ['l6w1', 'l4w0.75'] here" in two.stderr  # rank 0's round-robin share
    assert "lm-eval shapes ['l5w0.875'] here" in two.stderr
    for name in ("results.md", "frontier.png"):
        assert (tmp_path / "two" / name).is_file()
    assert "| l5w0.875 |" in (tmp_path / "two" / "results.md").read_text()


def test_prefix_cached_mmlu_split_over_two_processes_equals_one_plain_process(tiny_dir, tmp_path):
    """Five-shot MMLU with --mmlu_prefix_cache on two processes (each runs its share of the one-subject batches,
    the rows are gathered) gives one plain process's metrics, on two shapes (to 1e-5: the cache is the same
    computation in another order)."""
    shapes = "6x1,4x3/4"
    extra = ["--max_mmlu_samples", "9", "--mmlu_dataset", "mmlu-fs", "--do_eval_wikitext2", "False",
             "--do_lm_eval", "False"]
    one = _main(*_eval_flags(tiny_dir, tmp_path / "one", shapes, *extra))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("main.py", *_eval_flags(tiny_dir, tmp_path / "two", shapes, *extra, "--ddp_backend", "gloo",
                                            "--mmlu_prefix_cache", "True"))
    assert two.returncode == 0, two.stderr[-4000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert list(a) == list(b) and "mmlu_loss_l4w0.75" in a
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, value, b[key])


def test_evaluation_with_a_rank_without_shapes_or_windows_does_not_hang(tiny_dir, tmp_path):
    """One shape on two processes: rank 1 has no lm-eval shape and no WikiText-2 window (1 window), and
    one of the two MMLU batches; the run ends (no hang) with one process's metrics."""
    extra = ["--max_mmlu_samples", "3", "--max_wikitext2_windows", "1"]
    one = _main(*_eval_flags(tiny_dir, tmp_path / "one", "4x3/4", *extra))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("main.py", *_eval_flags(tiny_dir, tmp_path / "two", "4x3/4", *extra, "--ddp_backend", "gloo"))
    assert two.returncode == 0, two.stderr[-4000:]
    assert "lm-eval shapes [] here" in two.stderr
    assert _same_metrics(tmp_path / "one", tmp_path / "two") <= EVAL_REL


_PORTS: dict = {}


def _free_port_shared(key: str) -> int:
    """One free port per process group (both ranks must be told the same one)."""
    if key not in _PORTS:
        _PORTS[key] = _free_port()
    return _PORTS[key]


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "plans":
        _worker(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit("usage: torchrun --nproc_per_node 2 tests/test_distributed.py plans OUT FLAGS...")
