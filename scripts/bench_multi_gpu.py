"""Benchmark: Stage 2 on several GPUs, and a base too large for one GPU.

Four measurements, each printing a markdown table and writing its numbers to ``--out`` (json):

- ``ddp``: DDP scaling of the seed's Stage 2 command (``scripts/launch_multi_gpu.sh``: MoE-LoRA with 5 experts,
  widths [1,7/8,3/4,5/8], the smallest subnet at ``MIN_LAYERS`` of the depth) on a random-weight model of
  ``--shape``: samples/s on 1 process vs 2 (one per GPU) at the same per-device batch, and the ratio.
  ``--bits 4`` runs the same with a 4-bit NF4 base (QLoRA under DDP).
- ``equality``: the adapters after ``--steps`` steps of 2 processes x B equal 1 process x 2B. The data has
  equal lengths everywhere (each process's loss is a mean over its own target tokens, so only equal token counts
  make the two the same optimisation problem). The difference is reported against that of the same one-process
  run with another seed, which is the scale of a real change.
- ``fsdp``: ``--fsdp`` Stage 2 on a random base built on the GPUs (never written to disk): the sandwich steps of
  the seed's recipe, their s/step, peak memory per GPU and the losses (finite?).
- ``device_map``: one process spreading a random base over every visible GPU as ``--device_map auto`` does:
  the layer DP on a few candidates, FLAP for widths 7/8 and 3/4, and WikiText-2 perplexity, with time and
  peak memory per GPU.

    python scripts/bench_multi_gpu.py ddp --equal_length --shape 7b --batch 8 --steps 20 --out results/multi_gpu/ddp_bf16_equal512.json
    python scripts/bench_multi_gpu.py ddp --shape 7b --bits 4 --batch 4 --steps 15 --out results/multi_gpu/ddp_4bit_alpaca.json
    python scripts/bench_multi_gpu.py equality --fp32 --shape 7b --batch 8 --steps 5 --out results/multi_gpu/equality_fp32.json
    python scripts/bench_multi_gpu.py fsdp --shape 70b --steps 20 --batch 1 --lora_r 16 --out results/multi_gpu/fsdp_70b.json
    python scripts/bench_multi_gpu.py device_map --shape 70b --out results/multi_gpu/device_map_70b.json
    python scripts/bench_multi_gpu.py fsdp --shape tiny --cpu --out /tmp/fsdp.json      # a smoke run, 2 CPU processes

``--tokenizer`` is any tokenizer folder (the default model's); the random models take its vocabulary size, so
real text (the instruction data, WikiText-2) can be fed. ``AMOEBA_DATA_DIR`` points at the benchmark data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amoeba.files import library_versions, write_json  # noqa: E402

logger = logging.getLogger("bench_multi_gpu")

# Llama shapes (the vocabulary comes from the tokenizer).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
# The seed keeps 20 of Llama-2-7B's 32 layers in its smallest subnet; the same share of the others.
MIN_LAYERS = {"tiny": 3, "7b": 20, "70b": 50}
SEED_STAGE2 = ["--lora_modules", "all", "--enable_shrinking", "--kd_weight", "1", "--random_sample_num_layer", "2",
               "--distill_method", "sp", "--shrinking_method", "first_layers", "--shrinkable_width", "--width_choice",
               "[1,7/8,3/4,5/8]", "--use_moe_lora", "--moe_num_expert", "5", "--moe_topk", "2"]


def parse(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("ddp", "equality", "fsdp", "device_map", "fsdp-worker"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="random Llama shape")
    p.add_argument("--tokenizer", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="tokenizer folder")
    p.add_argument("--model_dir", default=None, help="where ddp/equality write the random model (default: a "
                                                     "temporary folder)")
    p.add_argument("--dataset", default="alpaca-gpt4", help="instruction data of the ddp runs")
    p.add_argument("--batch", type=int, default=8, help="sequences per device and micro-batch")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--bits", type=int, default=16, choices=(4, 16), help="ddp: a 4-bit NF4 base")
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the multi-process runs")
    p.add_argument("--lora_r", type=int, default=64, help="LoRA rank (the seed's 64)")
    p.add_argument("--experts", type=int, default=5, help="MoE-LoRA experts (the seed's 5)")
    p.add_argument("--seq_len", type=int, default=512, help="fsdp: tokens per sequence (384 prompt + 128 answer)")
    p.add_argument("--equal_length", action="store_true", help="ddp: synthetic instructions of exactly 384 + 128 "
                                                                  "tokens instead of --dataset")
    p.add_argument("--fp32", action="store_true", help="ddp/equality: compute in float32 instead of bf16")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo): a smoke run of the code paths")
    p.add_argument("--out", required=True, help="json file for the results")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------
def llama_config(shape: str, vocab: int):
    """The Llama config of ``shape`` with ``vocab`` tokens (untied output matrix, as Llama-2)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False,
                       **SHAPES[shape])


def random_model_folder(path: Path, shape: str, tokenizer_dir: str) -> Path:
    """A random-weight bf16 model folder of ``shape`` with the tokenizer of ``tokenizer_dir`` (written once)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape, len(tok))).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("random %s model written to %s", shape, path)
    return path


def equal_length_data(path: Path, tokenizer_dir: str, n: int = 256, seed: int = 0, instruction_words: int = 12,
                      answer_words: int = 8) -> Path:
    """Instruction data whose every example has the same token count (``instruction_words`` and ``answer_words``
    words of one token each), so every process of a data-parallel step has as many target tokens as every other."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = [w for w in ("the cat dog house tree water light green blue red small large river stone cloud "
                         "bread apple music paper window road city field night summer winter").split()
             if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = np.random.default_rng(seed)
    rows = [{"instruction": " ".join(rng.choice(words, instruction_words)), "input": "",
             "output": " ".join(rng.choice(words, answer_words))} for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage2_run(opts, nproc: int, model_dir: Path, out: Path, dataset: str, seed: int = 42,
               extra: tuple = ()) -> dict:
    """The seed's Stage 2 command through ``scripts/launch_multi_gpu.sh`` on ``nproc`` processes; its
    ``train_results.json`` plus the wall time of the whole command."""
    env = dict(os.environ, NGPU=str(nproc), PYTHON=sys.executable, MODEL=str(model_dir), OUT=str(out),
               DATASET=dataset, MIN_LAYERS=str(MIN_LAYERS[opts.shape]), MAX_STEPS=str(opts.steps),
               SAVE_STEPS=str(10 ** 6), EVAL_STEPS=str(10 ** 6), GRAD_ACC="1", BITS=str(opts.bits),
               PORT=str(_free_port()), WIDTH="--shrinkable_width --width_choice [1,7/8,3/4,5/8]",
               MOE=f"--use_moe_lora --moe_num_expert {opts.experts} --moe_topk 2")
    flags = ["--per_device_train_batch_size", str(opts.batch), "--do_eval", "False", "--do_mmlu_eval", "False",
             "--do_eval_wikitext2", "False", "--save_strategy", "no", "--shrinking_method", "first_layers",
             "--shrinking_file", "",  # a random model has no Stage 1 strategy: the first layers, uniform widths
             "--lora_r", str(opts.lora_r), "--seed", str(seed), "--logging_steps", "5", *extra]
    if opts.bits == 16:
        flags += ["--fp16", "False", "--bf16", "False" if opts.fp32 else "True"]
    if opts.cpu:
        flags += ["--use_cpu", "True", "--ddp_backend", "gloo"]
    start = time.time()
    run = subprocess.run(["bash", str(ROOT / "scripts" / "launch_multi_gpu.sh"), *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.time() - start
    if run.returncode != 0:
        raise SystemExit(f"Stage 2 on {nproc} process(es) failed ({run.returncode}):\n{run.stderr[-4000:]}")
    results = json.loads((out / "train_results.json").read_text())
    results["command_seconds"] = round(wall, 1)
    return results


def _adapters(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model" / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------
# DDP scaling and equality
# ----------------------------------------------------------------------------------------------
def cmd_ddp(opts, work: Path) -> dict:
    """Samples/s of the seed's Stage 2 on 1 process vs ``--gpus``, the same per-device batch."""
    model_dir = random_model_folder(Path(opts.model_dir or work / f"random-{opts.shape}"), opts.shape, opts.tokenizer)
    dataset = opts.dataset
    if opts.equal_length:  # every sequence 384 + 128 tokens (prompt truncated at 384), so samples/s compare
        dataset = str(equal_length_data(work / "equal512.jsonl", opts.tokenizer, n=opts.steps * opts.batch * opts.gpus
                                        + 64, instruction_words=400, answer_words=127))
    rows = []
    for nproc in (1, opts.gpus):
        res = stage2_run(opts, nproc, model_dir, work / f"ddp{opts.bits}-{nproc}", dataset)
        rows.append({"processes": nproc, "samples_per_second": res["train_samples_per_second"],
                     "tokens_per_second": res.get("tokens_per_second"), "train_runtime": res["train_runtime"],
                     "command_seconds": res["command_seconds"], "train_loss": res.get("train_loss")})
        logger.info("%d process(es): %.2f samples/s", nproc, res["train_samples_per_second"])
    ratio = rows[1]["samples_per_second"] / rows[0]["samples_per_second"]
    return {"rows": rows, "ratio": round(ratio, 3)}


def cmd_equality(opts, work: Path) -> dict:
    """Adapters of ``--gpus`` processes x B vs 1 process x (``--gpus`` x B), and vs another seed."""
    model_dir = random_model_folder(Path(opts.model_dir or work / f"random-{opts.shape}"), opts.shape, opts.tokenizer)
    data = equal_length_data(work / "equal.jsonl", opts.tokenizer)
    common = ("--group_by_length", "False", "--learning_rate", "1e-3", "--warmup_ratio", "0")
    b = opts.batch
    big = argparse.Namespace(**{**vars(opts), "batch": b * opts.gpus})
    one = stage2_run(big, 1, model_dir, work / "eq-one", str(data), 11, common)
    many = stage2_run(opts, opts.gpus, model_dir, work / "eq-many", str(data), 11, common)
    other = stage2_run(big, 1, model_dir, work / "eq-other", str(data), 12, common)
    a, m, o = _adapters(work / "eq-one"), _adapters(work / "eq-many"), _adapters(work / "eq-other")
    scale = max(float(a[k].abs().max()) for k in a if k.endswith("lora_B"))

    def rel(x: dict, y: dict) -> float:  # relative Frobenius distance of all adapter tensors together
        num = sum(float((x[k].float() - y[k].float()).pow(2).sum()) for k in x)
        den = sum(float(x[k].float().pow(2).sum()) for k in x)
        return math.sqrt(num / max(den, 1e-30))

    return {"max_abs_lora_B": scale,
            "max_abs_diff_same_seed": max(float((a[k] - m[k]).abs().max()) for k in a),
            "max_abs_diff_other_seed": max(float((a[k] - o[k]).abs().max()) for k in a),
            "relative_diff_same_seed": rel(a, m), "relative_diff_other_seed": rel(a, o),
            "loss_one": one.get("train_loss"), "loss_many": many.get("train_loss")}


# ----------------------------------------------------------------------------------------------
# FSDP on a base built on the GPUs
# ----------------------------------------------------------------------------------------------
def random_weight_(name: str, tensor: torch.Tensor, generator=None) -> None:
    """A random base weight in place, as a fresh Llama starts: norms 1, every other matrix N(0, 0.02)."""
    if name.endswith("norm.weight"):
        tensor.fill_(1.0)
    else:
        tensor.normal_(0.0, 0.02, generator=generator)


def _fill_random(model, em, seed: int) -> None:
    """Random values for a model built on the meta device and allocated empty: base weights N(0, 0.02) (each
    process its own shard), norms 1, adapters and router as they start, rotary tables recomputed."""
    from torch.distributed.tensor import DTensor

    from amoeba.adapters import MoELoRA, get_router

    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu")
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            random_weight_(name, p.to_local() if isinstance(p, DTensor) else p, gen)
        for module in model.modules():
            if isinstance(module, MoELoRA):
                for e in range(module.num_experts):
                    torch.nn.init.kaiming_uniform_(module.lora_A.data[e], a=math.sqrt(5))
                module.lora_B.data.zero_()
        router = get_router(model)
        if router is not None:
            for layer in (router.lora_route_in, router.lora_route_out, router.lora_noise):
                layer.reset_parameters()
    rotary = em.decoder.rotary_emb
    with torch.device(next(p for p in model.parameters() if p.requires_grad).device):
        em.decoder.rotary_emb = type(rotary)(config=model.config)


def _synthetic_instructions(n: int, seq_len: int, vocab: int):
    """Random token sequences with labels on their last quarter (384 + 128 at 512), as the collator gives them."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    source = seq_len * 3 // 4
    rows = [{"input_ids": r.tolist()} for r in ids]

    def collate(batch):
        x = torch.tensor([b["input_ids"] for b in batch])
        labels = x.clone()
        labels[:, :source] = -100
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}

    return {"train_dataset": Dataset.from_list(rows), "eval_dataset": None, "data_collator": collate}


class StepClock(transformers.TrainerCallback):
    """The seconds of every optimizer step (the GPU waited for at both ends)."""

    def __init__(self):
        self.times: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback API)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback API)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def fsdp_worker(opts, work: Path) -> None:
    """One process of the ``fsdp`` measurement (under torchrun)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer, LlamaForCausalLM

    from amoeba.args import parse_args
    from amoeba.distributed import gather_from_processes
    from amoeba.elastic import make_elastic
    from amoeba.stages.finetuning import prepare_trainer

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo" if opts.cpu else "nccl")
    if torch.cuda.is_available() and not opts.cpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    vocab = len(AutoTokenizer.from_pretrained(opts.tokenizer))
    config = llama_config(opts.shape, vocab)
    started = time.time()
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if not opts.cpu else torch.float32)
    em = make_elastic(model)
    flags = ["--model_name_or_path", opts.tokenizer, "--output_dir", str(work / "fsdp"), "--do_train", "True",
             "--report_to", "none", "--save_strategy", "no", "--group_by_length", "False", "--logging_steps", "1",
             "--max_steps", str(opts.steps), "--per_device_train_batch_size", str(opts.batch),
             "--gradient_accumulation_steps", "1", "--min_num_layer", str(MIN_LAYERS[opts.shape]),
             "--lora_r", str(opts.lora_r), "--fsdp", "full_shard", "--optim", "adamw_torch", *SEED_STAGE2,
             "--moe_num_expert", str(opts.experts)]
    flags += ["--use_cpu", "True", "--ddp_backend", "gloo"] if opts.cpu else ["--bf16", "True"]
    args = parse_args(flags)
    clock = StepClock()
    trainer, _ = prepare_trainer(args, model, None, em, None, callbacks=[clock],
                                 data=_synthetic_instructions(opts.steps * opts.batch * 2, opts.seq_len, vocab))
    _fill_random(model, em, seed=rank)
    built = time.time() - started
    if torch.cuda.is_available() and not opts.cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and not opts.cpu else None
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    mine = {"rank": rank, "peak_gib": peak, "step_seconds": clock.times}
    everyone = gather_from_processes(mine)
    if rank == 0:
        shard = sum(p.to_local().numel() if hasattr(p, "to_local") else 0 for p in model.parameters())
        write_json(Path(opts.out), {
            "what": "fsdp", "shape": opts.shape, "config": SHAPES[opts.shape], "vocab": vocab,
            "processes": dist.get_world_size(), "batch_per_process": opts.batch, "seq_len": opts.seq_len,
            "lora_r": opts.lora_r, "experts": opts.experts,
            "base_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "base_parameters_per_process": shard, "build_seconds": round(built, 1), "losses": losses,
            "all_finite": all(math.isfinite(x) for x in losses), "per_process": everyone,
            "sandwich": [r for r, _ in trainer.last_plan], "versions": library_versions()})
    dist.barrier()
    dist.destroy_process_group()


def cmd_fsdp(opts, work: Path) -> dict:
    """Start ``--gpus`` processes of :func:`fsdp_worker` under torchrun; their results."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(opts.gpus),
            str(Path(__file__).resolve()), "fsdp-worker", "--shape", opts.shape, "--tokenizer", opts.tokenizer,
            "--batch", str(opts.batch), "--steps", str(opts.steps), "--lora_r", str(opts.lora_r),
            "--experts", str(opts.experts), "--seq_len", str(opts.seq_len), "--out", opts.out]
    if opts.cpu:
        argv.append("--cpu")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TMPDIR=str(work))
    run = subprocess.run(argv, cwd=ROOT, env=env)
    if run.returncode != 0:
        raise SystemExit(f"the FSDP run failed ({run.returncode})")
    res = json.loads(Path(opts.out).read_text())
    steps = [t for p in res["per_process"] for t in p["step_seconds"][1:]]  # the first step warms up
    res["seconds_per_step"] = round(sum(steps) / max(len(steps), 1), 3)
    return res


# ----------------------------------------------------------------------------------------------
# One process over every GPU (--device_map auto): Stage 1 and evaluation
# ----------------------------------------------------------------------------------------------
def _dispatch_random(model, config, dtype) -> dict:
    """Place a meta-built model over every visible GPU as ``--device_map auto`` would, with random weights."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    from amoeba.loading import attach_device_hooks

    if torch.cuda.is_available():
        budget = {i: int(torch.cuda.get_device_properties(i).total_memory * 0.85) for i in
                  range(torch.cuda.device_count())}
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=["LlamaDecoderLayer"],
                                           dtype=dtype)
    else:
        device_map = {"": "cpu"}
    gen = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        where = next(d for m, d in sorted(device_map.items(), key=lambda kv: -len(kv[0]))
                     if m == "" or name == m or name.startswith(m + "."))
        device = torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
        value = torch.empty(p.shape, dtype=dtype, device=device)
        random_weight_(name, value, gen if device.type == "cpu" else None)
        set_module_tensor_to_device(model, name, device, value=value)
    rotary = model.model.rotary_emb
    with torch.device(next(model.model.layers[0].parameters()).device):
        model.model.rotary_emb = type(rotary)(config=config)
    attach_device_hooks(model, device_map)
    return device_map


def cmd_device_map(opts, work: Path) -> dict:
    """Layer DP (a few candidates), FLAP and WikiText-2 of a random base spread over every visible GPU."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from amoeba.args import parse_args
    from amoeba.elastic import make_elastic
    from amoeba.pipeline import load_elastic_strategy
    from amoeba.stages.calibration import run_layer_calibration, run_width_calibration
    from amoeba.stages.evaluation import run_evaluation

    tok = AutoTokenizer.from_pretrained(opts.tokenizer)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    config = llama_config(opts.shape, len(tok))
    layers = config.num_hidden_layers
    timings, peaks = {}, {}

    def step(name, fn):
        for i in range(torch.cuda.device_count()):
            torch.empty(0, device=f"cuda:{i}")  # the allocator of each GPU exists before its statistics are reset
            torch.cuda.reset_peak_memory_stats(i)
        start = time.time()
        fn()
        timings[name] = round(time.time() - start, 1)
        peaks[name] = [round(torch.cuda.max_memory_allocated(i) / 2**30, 1) for i in range(torch.cuda.device_count())]
        logger.info("%s: %.1f s, peak GiB per GPU %s", name, timings[name], peaks[name])

    state = {}

    def build():
        with torch.device("meta"):
            model = LlamaForCausalLM(config).to(dtype)
        model.config.use_cache = False
        state["map"] = _dispatch_random(model, config, dtype)
        state["model"] = model.eval()

    step("build", build)
    model = state["model"]
    base = ["--model_name_or_path", opts.tokenizer, "--do_train", "False", "--report_to", "none",
            "--calib_dataset", "wikitext2", "--calib_seqlen", "128", "--num_calib_sample", "4",
            "--calib_batch_size", "4"]
    dp = parse_args(base + ["--output_dir", str(work / "dp"), "--layer_calib_dp", "--min_num_layer", str(layers - 3)])
    step("layer DP", lambda: state.update(dp=run_layer_calibration(dp, model, tok, progress=False)))
    flap = parse_args(base + ["--output_dir", str(work / "flap"), "--width_calib", "--width_choice", "[1,7/8,3/4]",
                              "--prune_width_method", "flap"])
    step("FLAP", lambda: run_width_calibration(flap, model, tok))
    ev = parse_args(base + ["--output_dir", str(work / "eval"), "--do_eval_wikitext2", "True", "--eval_num_layer",
                            f"{layers},{layers - 3}", "--eval_num_width", "1", "--max_wikitext2_windows", "8",
                            "--enable_shrinking", "--shrinking_method", "calib_dp", "--min_num_layer",
                            str(layers - 3), "--shrinking_file", str(work / "dp" / "final_strategy.npy")])
    em = make_elastic(model)
    strategy = load_elastic_strategy(ev, em)  # the depths the layer DP just chose
    step("WikiText-2", lambda: state.update(metrics=run_evaluation(ev, model, tok, em, strategy)))
    return {"what": "device_map", "shape": opts.shape, "config": SHAPES[opts.shape], "vocab": len(tok),
            "parameters": sum(p.numel() for p in model.parameters()),
            "devices": sorted({str(d) for d in state["map"].values()}), "seconds": timings, "peak_gib": peaks,
            "dp_evaluations": state["dp"].evaluations, "metrics": state.get("metrics"),
            "versions": library_versions()}


# ----------------------------------------------------------------------------------------------
def markdown(what: str, res: dict) -> str:
    """The result as a markdown table."""
    if what == "ddp":
        lines = ["| processes | samples/s | train runtime (s) | train loss |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['processes']} | {r['samples_per_second']:.2f} | {r['train_runtime']:.1f} | "
                  f"{r['train_loss']:.4f} |" for r in res["rows"]]
        return "\n".join(lines) + f"\n\nratio {res['ratio']:.2f}x"
    if what == "equality":
        return ("| | max abs diff | relative diff |\n| --- | ---: | ---: |\n"
                f"| N x B vs 1 x NB, same seed | {res['max_abs_diff_same_seed']:.3g} | "
                f"{res['relative_diff_same_seed']:.3g} |\n| 1 x NB, another seed | "
                f"{res['max_abs_diff_other_seed']:.3g} | {res['relative_diff_other_seed']:.3g} |\n\n"
                f"max abs lora_B {res['max_abs_lora_B']:.3g}")
    if what == "fsdp":
        peaks = ", ".join(f"{p['peak_gib']:.1f}" if p["peak_gib"] is not None else "-" for p in res["per_process"])
        return ("| base params | per process | trainable | s/step | peak GiB per GPU | losses finite |\n"
                "| ---: | ---: | ---: | ---: | --- | --- |\n"
                f"| {res['base_parameters'] / 1e9:.2f}B | {res['base_parameters_per_process'] / 1e9:.2f}B | "
                f"{res['trainable_parameters'] / 1e9:.3f}B | {res['seconds_per_step']} | {peaks} | "
                f"{res['all_finite']} |")
    lines = ["| step | seconds | peak GiB per GPU |", "| --- | ---: | --- |"]
    lines += [f"| {k} | {v} | {res['peak_gib'][k]} |" for k, v in res["seconds"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    opts = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="bench_multi_gpu-") as tmp:
        work = Path(tmp)
        if opts.what == "fsdp-worker":
            fsdp_worker(opts, Path(os.environ.get("TMPDIR", tmp)))
            return 0
        run = {"ddp": cmd_ddp, "equality": cmd_equality, "fsdp": cmd_fsdp, "device_map": cmd_device_map}[opts.what]
        res = run(opts, work)
    res.update({"what": opts.what, "shape": opts.shape, "batch_per_process": opts.batch, "steps": opts.steps,
                "bits": opts.bits, "precision": "fp32" if opts.fp32 else ("bf16" if opts.bits == 16 else "fp16"),
                "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "gpus": torch.cuda.device_count(), "versions": library_versions()})
    write_json(Path(opts.out), res)
    print(markdown(opts.what, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
