"""Load a base model and its tokenizer: a hub id, a local folder, or a ``.gguf`` file.

Precision follows ``--fp16/--bf16``; ``--bits 4|8`` quantizes through bitsandbytes (CUDA only).
The architecture is checked from the config before any weight is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from amoeba.args import DEFAULT_MODEL_DIR, ModelArguments, TrainingArguments
from amoeba.elastic import SUPPORTED_MODEL_TYPES
from amoeba.errors import UsageError

logger = logging.getLogger(__name__)

FLAG = "--model_name_or_path"


def compute_dtype(train_args: TrainingArguments) -> torch.dtype:
    """The dtype weights are loaded in: bf16, fp16 (CUDA only; fp32 on a CPU), else fp32."""
    if getattr(train_args, "bf16", False):
        return torch.bfloat16
    if getattr(train_args, "fp16", False):
        if torch.cuda.is_available():
            return torch.float16
        logger.warning("--fp16 on a machine without CUDA: computing in float32 instead")
        return torch.float32
    return torch.float32


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep).split(os.sep, 2)[-1] \
        or name.endswith(".gguf") or name == DEFAULT_MODEL_DIR or name.count("/") > 1


def resolve_model_path(name: str) -> tuple[str, Optional[str]]:
    """(folder or hub id, gguf file name or None) for ``--model_name_or_path``; missing paths raise."""
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"no such file: {name}", FLAG)
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"{name} is not a model folder (no config.json)", FLAG)
        return str(path), None
    if name == DEFAULT_MODEL_DIR:
        raise UsageError(f"{name} does not exist yet; create it with: python main.py --materialize_default_model",
                         FLAG)
    if _looks_local(name) or name.count("/") != 1:
        raise UsageError(f"no such model folder or file: {name}", FLAG)
    return name, None  # a hub id such as meta-llama/Llama-2-7b-hf


def load_config(name: str, trust_remote_code: bool = False, token=None):
    """The model config, with the architecture checked against the supported family."""
    from transformers import AutoConfig

    where, gguf = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code,
                                            token=token)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load '{name}': {first}", FLAG) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"architecture '{config.model_type}' of {name} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}", FLAG)
    return config


def quantization_config(train_args: TrainingArguments):
    """A ``BitsAndBytesConfig`` for ``--bits 4|8`` (None otherwise); CUDA is required."""
    if train_args.bits not in (4, 8):
        return None
    if not torch.cuda.is_available():
        raise UsageError(f"{train_args.bits}-bit loading uses bitsandbytes and needs a CUDA GPU, and this machine "
                         "has none; drop --bits (or use --bits 16)", "--bits")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=train_args.bits == 4,
        load_in_8bit=train_args.bits == 8,
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=compute_dtype(train_args),
        bnb_4bit_use_double_quant=train_args.double_quant,
        bnb_4bit_quant_type=train_args.quant_type,
    )


def load_tokenizer(name: str, trust_remote_code: bool = False, token=None, cache_dir=None):
    """The tokenizer, right-padded, with a pad token set when it has none (unk, else eos)."""
    from transformers import AutoTokenizer

    where, gguf = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf, padding_side="right", use_fast=True,
                                        trust_remote_code=trust_remote_code, token=token, cache_dir=cache_dir)
    if tok.pad_token is None:
        # Reuse an existing token rather than growing the vocabulary: exported subnets keep the
        # base model's embedding shape. Padding is excluded by the attention mask and labels.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        logger.info("tokenizer had no pad token; using %r", tok.pad_token)
    return tok


def load_model_and_tokenizer(model_args: ModelArguments, train_args: TrainingArguments):
    """Load the base model (eval mode, ``use_cache`` off) and tokenizer from ``--model_name_or_path``."""
    from transformers import AutoModelForCausalLM

    name = model_args.model_name_or_path
    token = True if model_args.use_auth_token else None
    load_config(name, model_args.trust_remote_code, token)  # fails fast on a bad path or architecture
    where, gguf = resolve_model_path(name)
    dtype = compute_dtype(train_args)
    qconfig = quantization_config(train_args)
    kwargs = dict(dtype=dtype, trust_remote_code=model_args.trust_remote_code, token=token,
                  cache_dir=train_args.cache_dir)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank}
    logger.info("loading %s (%s%s)", name, str(dtype).replace("torch.", ""),
                f", {train_args.bits}-bit" if qconfig else "")
    if gguf is not None:
        from amoeba.default_model import load_gguf

        if qconfig is not None:
            raise UsageError("a .gguf model cannot be re-quantized with --bits; convert it to a folder first", "--bits")
        model, tok = load_gguf(Path(where) / gguf, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        tok = None
    if tok is None:
        tok = load_tokenizer(name, model_args.trust_remote_code, token, train_args.cache_dir)
    elif tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if qconfig is None and torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    model.config.use_cache = False
    model.eval()
    return model, tok
