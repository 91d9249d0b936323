"""Check: does this GPU's attention kernel give finite gradients on this model, at these padded lengths?

Training computes attention with PyTorch's SDPA, which picks a kernel per call. On H100/H200, the cuDNN kernel's
backward can return NaN query gradients under a finite loss when a padding mask is passed and a row's
log-sum-exp is very negative (pytorch/pytorch#196678); Qwen2.5's attention sinks make such rows. On
Qwen2.5-Coder-1.5B this hit every training batch padded to 193 tokens, so training leaves that kernel out
(``--cudnn_attention`` lets it in again). This script shows whether, and where, a model and machine are affected.

For each padded length it builds one right-padded batch (the longest sequence fills it, the others are shorter;
random token ids), runs the model's forward and backward in ``--dtype`` once per SDPA kernel available here
(cuDNN, memory-efficient, flash, math), and reports the loss, how many input-embedding gradients are not finite,
and each kernel's largest gradient difference from the math kernel's, relative to its largest gradient.

    python scripts/check_attention_grads.py --model models/qwen2.5-coder-1.5b-instruct --lengths 192,193,194 \\
        --out attention_grads.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoeba.args import parse_int_list  # noqa: E402
from amoeba.errors import UsageError  # noqa: E402
from amoeba.files import write_json  # noqa: E402

logger = logging.getLogger("check_attention_grads")

KERNELS = ("cudnn", "efficient", "flash", "math")


def backend(name: str):
    """The SDPA backend of a kernel name."""
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[name]


def padded_batch(length: int, batch: int, vocab: int, seed: int, device) -> dict:
    """Right-padded random token ids: the first sequence is ``length`` long, the others between a third of it and
    it; labels are the ids, -100 at the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = [length] + torch.randint(max(1, length // 3), length + 1, (batch - 1,), generator=g).tolist()
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def gradients(model, batch: dict, kernel: str) -> tuple[float, torch.Tensor]:
    """(loss, gradient of the input embeddings) of one forward and backward with only ``kernel`` allowed."""
    from torch.nn.attention import sdpa_kernel

    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    with sdpa_kernel([backend(kernel)]):
        loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
    return float(loss.detach()), embeds.grad.detach().float()


def check(model, lengths: list[int], batch_size: int, kernels: list[str], seed: int = 0) -> list[dict]:
    """One row per (length, kernel): loss, non-finite gradient count, difference from the math kernel."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = []
    for length in lengths:
        batch = padded_batch(length, batch_size, vocab, seed, device)
        reference = None
        results = {}
        for kernel in ["math", *[k for k in kernels if k != "math"]]:
            try:
                loss, grad = gradients(model, batch, kernel)
            except RuntimeError as err:  # the kernel cannot take these inputs (dtype, mask, device)
                results[kernel] = {"error": str(err).splitlines()[0][:200]}
                continue
            finite = torch.isfinite(grad)
            row = {"loss": loss, "nonfinite_grads": int((~finite).sum()), "grads": grad.numel()}
            if kernel == "math":
                reference = grad
            elif reference is not None and bool(finite.all()) and bool(torch.isfinite(reference).all()):
                scale = float(reference.abs().max()) or 1.0
                row["max_rel_diff_vs_math"] = float((grad - reference).abs().max()) / scale
            results[kernel] = row
        for kernel in kernels:
            rows.append({"length": length, "kernel": kernel, **results[kernel]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| padded length | kernel | loss | non-finite input gradients | max diff from math (relative) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['kernel']} | not available: {r['error']} | | |")
            continue
        diff = r.get("max_rel_diff_vs_math")
        lines.append(f"| {r['length']} | {r['kernel']} | {r['loss']:.4f} | {r['nonfinite_grads']} of {r['grads']} | "
                     f"{'-' if diff is None else f'{diff:.2e}'} |")
    return "\n".join(lines)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (a Hugging Face causal LM)")
    p.add_argument("--lengths", default="192,193,194", help="padded batch lengths to check (comma list)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--kernels", default=None,
                   help="comma list of cudnn, efficient, flash, math (default: those of this device: all four on a "
                        "GPU, math on a CPU)")
    p.add_argument("--out", default=None, help="json file for the rows")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    opts = parse(argv)
    try:
        lengths = list(parse_int_list(opts.lengths, "--lengths"))
        cuda = torch.cuda.is_available()
        kernels = opts.kernels.split(",") if opts.kernels else (list(KERNELS) if cuda else ["math"])
        unknown = [k for k in kernels if k not in KERNELS]
        if unknown:
            raise UsageError(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}", "--kernels")
        if opts.batch < 1 or min(lengths) < 2:
            raise UsageError("needs at least one sequence of at least 2 tokens", "--batch/--lengths")
        if not (Path(opts.model) / "config.json").is_file():
            raise UsageError(f"{opts.model} is not a model folder (no config.json)", "--model")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dtype]
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype, attn_implementation="sdpa")
    model.to("cuda" if cuda else "cpu").requires_grad_(False)
    rows = check(model, lengths, opts.batch, kernels)
    print(markdown(rows))
    if opts.out:
        write_json(opts.out, {"model": opts.model, "dtype": opts.dtype, "batch": opts.batch,
                                     "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                     "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
