"""Load an exported subnet folder the way a user of it would (transformers only) and check that it runs.

The folder is loaded with ``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code=True`` only when it
carries ``modeling_amoeba.py``, i.e. per-layer widths), in bf16 or, with ``--load_in_4bit``, quantized to
4-bit NF4 by bitsandbytes (CUDA). It generates greedily from a prompt with the dynamic and the static KV cache,
and prints one json line: parameters, load time, generated text, whether both caches agree, how far each
generation is from greedy under a plain forward (bf16 near-ties can make the two caches differ), and, for a 4-bit
load, the top-1 agreement of its next-token logits with the bf16 load of the same folder.

    python scripts/check_export.py --folder output/export_l22w0.75
    python scripts/check_export.py --folder output/export_l22w0.75 --load_in_4bit    # on a CUDA GPU

This script does not import the framework: it proves the folder stands on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_cli(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, help="An exported model folder (written by --export_dir).")
    p.add_argument("--prompt", default="The capital of France is", help="Text to continue.")
    p.add_argument("--new_tokens", type=int, default=16, help="Tokens to generate.")
    p.add_argument("--load_in_4bit", action="store_true", help="Quantize to 4-bit NF4 with bitsandbytes (CUDA).")
    p.add_argument("--out", default=None, help="Also write the json result to this file.")
    a = p.parse_args(argv)
    if not (Path(a.folder) / "config.json").is_file():
        p.error(f"--folder: {a.folder} holds no config.json")
    return a


def load(folder: str, four_bit: bool):
    """(model, tokenizer, custom code?) of an exported folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    custom = (Path(folder) / "modeling_amoeba.py").is_file()
    kwargs = dict(dtype=torch.bfloat16, trust_remote_code=custom)
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if not four_bit and torch.cuda.is_available():
        model.to("cuda")
    return model, AutoTokenizer.from_pretrained(folder), custom


def greedy_gap(model, ids, prompt_len: int) -> float:
    """How far generated tokens are from greedy under a plain forward of the whole sequence: the largest
    (best logit - chosen token's logit) / (the logits' spread) over the generated positions. 0 for exact
    greedy decoding; a few hundredths where bf16 rounding flips near-ties."""
    import torch

    with torch.no_grad():
        logits = model(ids).logits[0, prompt_len - 1:-1].float()
    chosen = ids[0, prompt_len:]
    best, worst = logits.max(-1).values, logits.min(-1).values
    got = logits.gather(-1, chosen[:, None])[:, 0]
    return float(((best - got) / (best - worst)).max())


def main(argv=None) -> int:
    """Load, generate with both caches, compare; print the json result."""
    import torch

    a = parse_cli(argv)
    t0 = time.perf_counter()
    model, tok, custom = load(a.folder, a.load_in_4bit)
    load_s = time.perf_counter() - t0
    device = next(model.parameters()).device
    prompt = tok(a.prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        logits = model(**prompt).logits[0, -1].float()
        gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        dynamic = model.generate(**prompt, **gen)
        static = model.generate(**prompt, **gen, cache_implementation="static")
    n = prompt["input_ids"].shape[1]
    result = {
        "folder": a.folder, "per_layer_code": custom, "load_in_4bit": a.load_in_4bit, "load_s": round(load_s, 2),
        "params": sum(p.numel() for p in model.parameters()), "device": str(device),
        "generated": tok.decode(dynamic[0, n:], skip_special_tokens=True),
        "static_cache_agrees": bool(torch.equal(dynamic, static)),
        "dynamic_greedy_gap": greedy_gap(model, dynamic, n),
        "static_greedy_gap": greedy_gap(model, static, n),
    }
    if a.load_in_4bit:
        del model
        ref, _, _ = load(a.folder, False)
        with torch.no_grad():
            ref_logits = ref(**prompt.to(next(ref.parameters()).device)).logits[0, -1].float()
        result["top1_agrees_with_bf16"] = bool(ref_logits.argmax() == logits.to(ref_logits.device).argmax())
        result["top5_overlap_with_bf16"] = len(set(ref_logits.topk(5).indices.tolist())
                                               & set(logits.topk(5).indices.tolist()))
    line = json.dumps(result)
    print(line)
    if a.out:
        Path(a.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
