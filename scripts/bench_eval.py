"""Wall time of the seed's evaluation tasks (MMLU, ARC-Easy, PIQA, HellaSwag) for one subnet shape.

Loads the model once, makes it elastic (with the strategy's depth masks and FLAP widths when a strategy
file is given), then times each task on the chosen shape: MMLU through :func:`amoeba.mmlu.score_mmlu`,
the others through lm-eval's HFLM around the in-memory model (offline configs with a data directory).
Prints a markdown table and writes the numbers to ``--out`` (json).

    # the seed's evaluation tasks in full at 24 layers x 7/8 (GPU)
    python scripts/bench_eval.py --shrinking_file dp_selection_strategy.npy --layers 24 --width 0.875
    # a few minutes on a CPU
    python scripts/bench_eval.py --shrinking_file dp_selection_strategy.npy --mmlu_samples 64 --lm_eval_limit 40
    # tiny random model, seconds (checks the script itself)
    python scripts/bench_eval.py --smoke
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amoeba.default_model import DEFAULT_MODEL_DIR  # noqa: E402
from amoeba.files import library_versions, write_json  # noqa: E402
from amoeba.subnet import width_key  # noqa: E402

logger = logging.getLogger("bench_eval")
TASKS = ("arc_easy", "piqa", "hellaswag")


def parse() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / DEFAULT_MODEL_DIR), help="model folder")
    p.add_argument("--shrinking_file", default=None, help="strategy file (depth masks + FLAP widths); without "
                                                          "it: the first layers and uniform widths")
    p.add_argument("--layers", type=int, default=24, help="depth of the shape to time")
    p.add_argument("--width", type=float, default=0.875, help="width ratio of the shape to time")
    p.add_argument("--width_choice", default="[1,7/8,3/4,5/8]", help="widths to take from the strategy")
    p.add_argument("--data_dir", default=os.environ.get("AMOEBA_DATA_DIR"), help="offline data directory")
    p.add_argument("--mmlu_dataset", default="mmlu-fs", choices=("mmlu-zs", "mmlu-fs"), help="the seed's default "
                                                                                         "is five-shot")
    p.add_argument("--mmlu_split", default="eval", choices=("eval", "test"))
    p.add_argument("--mmlu_samples", type=int, default=None, help="MMLU questions (default: all)")
    p.add_argument("--lm_eval_limit", type=int, default=None, help="examples per lm-eval task (default: all)")
    p.add_argument("--tasks", default=",".join(TASKS), help="lm-eval tasks")
    p.add_argument("--prefix_cache", action="store_true",
                   help="also time MMLU with --mmlu_prefix_cache (the exemplars once per batch, as a KV cache; how "
                        "many predictions differ from the plain run) and each lm-eval task with --lm_eval_prefix_cache "
                        "(each shared context once; how far each metric moved)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny random model (4 layers) and tiny limits")
    p.add_argument("--out", default=str(ROOT / "output" / "bench_eval.json"), help="json result file")
    return p.parse_args()


def load(a: argparse.Namespace, device: str, dtype: torch.dtype):
    """(model, tokenizer) on ``device``: the real model, or a tiny random one for --smoke."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(a.model)
    if a.smoke:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def main() -> None:
    """Time each task on one shape and report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    a = parse()
    if a.smoke:
        a.layers, a.width = 3, 0.75
        a.mmlu_samples = a.mmlu_samples or 8
        a.lm_eval_limit = a.lm_eval_limit or 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    batch = a.batch_size or (32 if device == "cuda" else 8)

    from amoeba.args import parse_ratio_list
    from amoeba.elastic import make_elastic
    from amoeba.lm_eval_runner import LMEvalRunner
    from amoeba.mmlu import load_mmlu, score_mmlu
    from amoeba.shapes import Shapes

    t0 = time.perf_counter()
    model, tok = load(a, device, dtype)
    em = make_elastic(model)
    masks = None
    if a.shrinking_file and not a.smoke:
        from amoeba.strategy import apply_strategy, load_strategy

        strategy = load_strategy(a.shrinking_file)
        apply_strategy(em, strategy, parse_ratio_list(a.width_choice), nonuniform=True)
        masks = strategy.layer_masks
    subnet = Shapes(em, masks).subnet(a.layers, width_key(a.width))
    load_s = time.perf_counter() - t0
    logger.info("shape %s: %d of %d parameters, on %s (%s)", subnet.label, em.param_count(subnet),
                em.param_count(em.full_subnet()), device, str(dtype).replace("torch.", ""))

    rows = []
    with em.use(subnet):
        start = time.perf_counter()
        examples = load_mmlu(a.mmlu_split, 0 if a.mmlu_dataset == "mmlu-zs" else 5, a.data_dir, a.mmlu_samples)
        prep = time.perf_counter() - start
        _sync(device)
        start = time.perf_counter()
        s = score_mmlu(model, tok, examples, batch_size=batch)
        _sync(device)
        run = time.perf_counter() - start
        rows.append({"task": f"mmlu ({a.mmlu_dataset}, {a.mmlu_split})", "examples": len(examples),
                     "setup_s": prep, "eval_s": run, "metric": "accuracy", "value": s["accuracy"]})
        if a.prefix_cache:
            _sync(device)
            start = time.perf_counter()
            cached = score_mmlu(model, tok, examples, batch_size=batch, prefix_cache=True)
            _sync(device)
            run = time.perf_counter() - start
            changed = sum(x != y for x, y in zip(s["predictions"], cached["predictions"]))
            rows.append({"task": f"mmlu ({a.mmlu_dataset}, {a.mmlu_split}), prefix cache", "examples": len(examples),
                         "setup_s": 0.0, "eval_s": run, "metric": "accuracy", "value": cached["accuracy"],
                         "predictions_changed": changed})
        for task in [t for t in a.tasks.split(",") if t]:
            plain = None
            for cached in (False, True) if a.prefix_cache else (False,):
                start = time.perf_counter()
                runner = LMEvalRunner(model, tok, [task], a.data_dir, batch_size=batch, limit=a.lm_eval_limit,
                                      prefix_cache=cached)
                prep = time.perf_counter() - start
                try:
                    _sync(device)
                    start = time.perf_counter()
                    flat, _ = runner.run()
                    _sync(device)
                    run = time.perf_counter() - start
                finally:
                    runner.close()
                n = sum(v.get("effective", 0) for v in runner.samples.values())
                metric = "acc_norm" if f"{task}_acc_norm" in flat else "acc"
                row = {"task": task + (", prefix cache" if cached else ""), "examples": n, "setup_s": prep,
                       "eval_s": run, "metric": metric, "value": flat.get(f"{task}_{metric}", float("nan"))}
                if cached:  # the same numbers up to rounding: how far each metric moved
                    row["metrics_moved"] = {k: flat[k] - plain[k] for k in plain if k in flat and
                                            isinstance(plain[k], float)}
                plain = flat
                rows.append(row)

    total = sum(r["eval_s"] for r in rows if "prefix cache" not in r["task"])  # the plain evaluation's time
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or "CPU")
    result = {"shape": subnet.label, "layers": subnet.num_layers, "width": subnet.width,
              "params": em.param_count(subnet), "params_full": em.param_count(em.full_subnet()),
              "device": device_name, "cpu_threads": torch.get_num_threads(), "dtype": str(dtype), "batch_size": batch,
              "model": "tiny random (smoke)" if a.smoke else a.model, "strategy": a.shrinking_file,
              "load_s": load_s, "rows": rows, "total_eval_s": total, "command": sys.argv,
              "versions": library_versions()}
    write_json(a.out, result)
    print(f"\nshape {subnet.label} ({result['params'] / 1e6:.1f}M of {result['params_full'] / 1e6:.1f}M "
          f"parameters), {device_name}, {str(dtype).replace('torch.', '')}, batch {batch}\n")
    print("| task | examples | setup (s) | eval (s) | examples/s | metric |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        rate = r["examples"] / r["eval_s"] if r["eval_s"] > 0 else float("nan")
        print(f"| {r['task']} | {r['examples']} | {r['setup_s']:.1f} | {r['eval_s']:.1f} | {rate:.2f} | "
              f"{r['metric']} {r['value']:.4f}"
              + (f" ({r['predictions_changed']} predictions differ from the plain run)" if "predictions_changed" in r
                 else "")
              + (f" (largest change of a metric from the plain run: "
                 f"{max((abs(v) for v in r['metrics_moved'].values()), default=0.0):.4f})" if "metrics_moved" in r
                 else "") + " |")
    print(f"| total | | | {total:.1f} | | |")
    print(f"\nwritten to {a.out}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
