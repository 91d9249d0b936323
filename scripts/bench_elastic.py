"""Benchmark: forward+backward time of elastic subnets against the full model.

A Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, MLP 11008) with random bf16 weights is
made elastic; each subnet runs forward and backward (base weights frozen, as in adapter training:
gradients flow to the activations) on a fixed batch. Width is taken two ways: by slicing weights
(the default elastic model) and by masks (what the original code did, and what packed 4-bit
weights force). Timing uses CUDA events (medians) on a GPU, wall clock on a CPU.

    python scripts/bench_elastic.py --out results/bench_elastic.json          # the GPU benchmark
    python scripts/bench_elastic.py --smoke                                    # tiny, runs on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoeba.elastic import make_elastic  # noqa: E402
from amoeba.subnet import Subnet  # noqa: E402

logger = logging.getLogger("bench_elastic")

SHAPES = [(32, 1.0), (32, 0.875), (32, 0.75), (32, 0.625), (24, 1.0), (24, 0.75), (20, 1.0), (20, 0.625)]


def build_model(smoke: bool, device: str, dtype: torch.dtype):
    """A random-weight Llama built directly on ``device`` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    model.enable_input_require_grads()  # gradients reach the activations, as with adapters
    model.train()
    return model


def time_step(model, batch, reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of one forward+backward on ``batch``."""
    def step():
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _non_layer_params(em) -> int:
    return sum(p.numel() for n, p in em.model.named_parameters() if ".layers." not in n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, runs on a CPU")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seqlen", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as json here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        args.batch, args.seqlen, args.reps, args.warmup = 2, 128, 3, 1
    model = build_model(args.smoke, device, dtype)
    em = make_elastic(model)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=gen).to(device)
    non_layer = _non_layer_params(em)
    rows = []
    full_total = em.param_count(em.full_subnet())
    full_dec = full_total - non_layer
    base = {}
    for mode in ("sliced", "masked"):
        em.state.sliceable = mode == "sliced"
        for layers, ratio in SHAPES:
            if mode == "masked" and ratio == 1.0 and layers != 32:
                continue
            sub = Subnet(tuple(range(layers)), ratio)
            em.set_subnet(sub)
            ms = time_step(model, batch, args.reps, args.warmup, cuda)
            if (layers, ratio) == (32, 1.0):
                base[mode] = ms
            total = em.param_count(sub)
            rows.append({"mode": mode, "layers": layers, "width": ratio, "ms": ms,
                         "tokens_per_s": args.batch * args.seqlen / ms * 1e3,
                         "param_ratio_total": full_total / total,
                         "param_ratio_decoder": full_dec / (total - non_layer)})
            logger.info("%s %2d x %.3f: %.1f ms", mode, layers, ratio, ms)
    em.set_subnet(em.full_subnet())
    dense_ms = base["sliced"]
    for r in rows:
        r["speedup"] = dense_ms / r["ms"]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"device": device_name, "dtype": str(dtype), "batch": args.batch, "seqlen": args.seqlen,
              "smoke": args.smoke, "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nforward+backward, {device_name}, {dtype}, batch {args.batch} x {args.seqlen}"
          f"{' (smoke)' if args.smoke else ''}\n")
    print("| width by | layers | width | ms/step | tokens/s | speedup vs full | param ratio (decoder) | "
          "param ratio (total) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['layers']} | {r['width']:g} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['speedup']:.2f}x | {r['param_ratio_decoder']:.2f}x | {r['param_ratio_total']:.2f}x |")


if __name__ == "__main__":
    main()
