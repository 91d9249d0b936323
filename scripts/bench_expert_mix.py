#!/usr/bin/env python
"""Time the MoE-LoRA expert mix alone: forward, cast and backward of every adapter group of a sandwich step.

The router mixes each group of equal-shaped adapters' experts once per subnet forward (``ShapeRouter._mix_all``):
the experts of the kept layers' adapters are stacked, multiplied by the dense gates, cast to the compute precision,
and in the backward their gradients accumulate into the adapters' ``.grad``. This script runs exactly that on
adapter tensors of a model shape (default: Llama-2-7B, the seed's 5 experts at r=64 on all seven projections,
float32 experts, bfloat16 compute) for the four subnets of the seed's sandwich (32, 24, 22 and 20 of 32 layers), and
prints ms per sandwich step for each way of mixing:

- ``product``: ``gates @ stack`` with autograd's backward (the code before the optimisation; the CPU's default);
- ``hybrid``: :func:`amoeba.adapters.hybrid_mix` (CUDA's default);
- ``elementwise``: :func:`amoeba.adapters.weighted_sum` (an opt-in).

Also reports how far ``hybrid``'s and ``elementwise``'s gradients are from ``product``'s (fp32 rounding).

    python scripts/bench_expert_mix.py                 # CUDA, Llama-2-7B shape
    python scripts/bench_expert_mix.py --smoke         # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from amoeba.adapters import MIX_FUNCTIONS, MIX_METHODS  # noqa: E402


def group_shapes(hidden: int, inter: int, r: int, experts: int) -> list[tuple[tuple, int]]:
    """(expert tensor shape, adapters per layer) of each group of a Llama layer's seven adapted projections."""
    return [((experts, r, hidden), 6), ((experts, r, inter), 1),       # A: q k v o gate up / down
            ((experts, hidden, r), 5), ((experts, inter, r), 2)]       # B: q k v o down / gate up


def make_experts(shapes, layers: int, device) -> list[list[torch.Tensor]]:
    """Per group, the experts of every adapter of every layer (leaves, like the adapters' parameters)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return [[torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(per_layer * layers)]
            for shape, per_layer in shapes]


def sandwich_step(method: str, groups, gates, kept: list[int], per_layer: list[int], cast, upstream) -> None:
    """Forward, cast and backward of every group's mix for each subnet (its first ``k`` layers), as one step."""
    for k in kept:
        outs, grads = [], []
        for gi, (ads, per) in enumerate(zip(groups, per_layer)):
            n = k * per
            stack = torch.stack(ads[:n]).view(n, gates.shape[0], -1)  # as the router stacks them
            outs.append(MIX_FUNCTIONS[method](gates, stack).to(cast))
            grads.append(upstream[gi][:n])
        torch.autograd.backward(outs, grads)


def run(opts) -> dict:
    device = torch.device(opts.device)
    cast = torch.bfloat16
    shapes = group_shapes(opts.hidden, opts.intermediate, opts.r, opts.experts)
    per_layer = [p for _, p in shapes]
    groups = make_experts(shapes, opts.layers, device)
    gates = torch.zeros(opts.experts, device=device)
    gates[1], gates[3] = 0.7, 0.3
    gates.requires_grad_()
    g = torch.Generator(device="cpu").manual_seed(1)
    upstream = [torch.randn(len(ads), ads[0][0].numel(), generator=g).to(device=device, dtype=cast) for ads in groups]
    kept = opts.kept_layers

    # every method's gradients against the product's, on the smallest subnet: each tensor's largest difference
    # relative to its largest entry
    results = {"shape": vars(opts), "rows": {}, "max_relative_gradient_difference": {}}
    leaves = [t for ads in groups for t in ads] + [gates]
    grads = {}
    for method in MIX_METHODS:
        for t in leaves:
            t.grad = None
        sandwich_step(method, groups, gates, kept[-1:], per_layer, cast, upstream)
        grads[method] = [t.grad.clone() for t in leaves if t.grad is not None]
    for method in MIX_METHODS:
        results["max_relative_gradient_difference"][method] = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(grads[method], grads["product"]))

    for method in MIX_METHODS:
        def step():
            for t in leaves:
                t.grad = None
            sandwich_step(method, groups, gates, kept, per_layer, cast, upstream)
        for _ in range(opts.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(opts.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / opts.steps * 1e3
        results["rows"][method] = ms
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--kept", default="32,24,22,20", help="layers of each subnet of the sandwich, comma-separated")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (CPU)")
    ap.add_argument("--out", help="write the numbers here (json)")
    opts = ap.parse_args(argv)
    if opts.smoke:
        opts.hidden, opts.intermediate, opts.layers, opts.r, opts.kept = 64, 160, 4, 8, "4,3"
        opts.warmup, opts.steps = 1, 2
    try:
        opts.kept_layers = [int(k) for k in opts.kept.split(",")]
    except ValueError:
        ap.error(f"--kept: '{opts.kept}' is not a comma-separated list of layer counts")
    if any(not 1 <= k <= opts.layers for k in opts.kept_layers):
        ap.error(f"--kept: each subnet keeps 1 to {opts.layers} layers")
    res = run(opts)
    device = torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else opts.device
    print(f"\nExpert mix of a sandwich step ({opts.kept} of {opts.layers} layers; hidden {opts.hidden}, "
          f"intermediate {opts.intermediate}, r={opts.r}, {opts.experts} experts; {device})\n")
    print("| mix | ms per sandwich step | gradients against the product's (largest relative difference) |\n"
          "| --- | ---: | ---: |")
    for method, ms in res["rows"].items():
        print(f"| {method} | {ms:.2f} | {res['max_relative_gradient_difference'][method]:.1e} |")
    if opts.out:
        Path(opts.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
