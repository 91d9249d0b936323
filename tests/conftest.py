"""Shared fixtures: tiny random Llama-family models (MHA and GQA), the real model, offline data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"

# Tests read real benchmark files from ../shared/data unless told otherwise.
os.environ.setdefault("AMOEBA_DATA_DIR", str(SHARED_DATA))


def load_script(path: Path):
    """A script (not a package module) imported as a module named after its file; registered in ``sys.modules``,
    where dataclasses and pickling look their module up."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_config(kind: str = "gqa", layers: int = 4, **overrides):
    """A tiny random config. kind: gqa (Llama-3 style), mha (Llama-2 style), qwen2, qwen3, mistral, gemma,
    gemma2 and gemma3_text (sliding window 4, sliding and full-attention layers alternating), olmo2, phi3."""
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, Olmo2Config,
                              Phi3Config, Qwen2Config, Qwen3Config)

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                  tie_word_embeddings=False)
    common.update(overrides)
    if kind == "mha":
        common["num_key_value_heads"] = common["num_attention_heads"]
        return LlamaConfig(**common)
    if kind == "gqa":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    if kind == "mistral":
        return MistralConfig(**common)
    if kind == "gemma":
        return GemmaConfig(**{"head_dim": 8, **common})
    # eager attention: the implementation the Gemma 2/3 authors recommend (soft-capping), and what CPUs run
    gemma_common = dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=16, attn_implementation="eager")
    if kind == "gemma2":
        return Gemma2Config(**{**gemma_common, **common})
    if kind == "gemma3_text":
        return Gemma3TextConfig(sliding_window_pattern=2, **{**gemma_common, **common})
    if kind == "olmo2":
        return Olmo2Config(**common)
    if kind == "phi3":  # q/k/v and gate/up packed; a partial rotary (Phi-4-mini's layout)
        return Phi3Config(partial_rotary_factor=0.75, pad_token_id=0, **common)  # no head_dim, as Phi-3 configs
    raise ValueError(kind)


def tiny_model(kind: str = "gqa", layers: int = 4, seed: int = 0, **overrides):
    """A tiny random causal LM in eval mode, fp32, with non-trivial weights everywhere."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers, **overrides), dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so tests cannot pass by symmetry
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def attach_trained_moe(model, em, widths=(1.0, 0.75), seed: int = 5) -> None:
    """MoE-LoRA adapters (3 experts, top-2) with their shape router on ``model``, "trained": random weights, so
    every adapter changes the output; the model is left in eval mode."""
    from amoeba.adapters import AdapterConfig, attach_adapters, structure_of

    attach_adapters(model, em, AdapterConfig(r=4, alpha=8, num_experts=3, topk=2, use_router=True,
                                             widths=list(widths), **structure_of(em)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()


@pytest.fixture
def tokens():
    """A small batch of token ids."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)


@pytest.fixture(scope="session")
def real_model_dir():
    """The real SmolLM2-135M-Instruct folder (materialised once; skipped if the package is missing)."""
    from amoeba.default_model import is_materialized, materialize_default_model, packaged_gguf
    from amoeba.errors import UsageError

    if not is_materialized(REAL_MODEL_DIR):
        try:
            packaged_gguf()
        except UsageError as err:
            pytest.skip(str(err))
        materialize_default_model(REAL_MODEL_DIR)
    return REAL_MODEL_DIR
