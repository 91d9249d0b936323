"""Load a base model and its tokenizer: a hub id, a local folder, or a ``.gguf`` file.

Precision follows ``--fp16/--bf16``; ``--bits 4|8`` quantizes through bitsandbytes (CUDA only).
The architecture is checked from the config before any weight is read.

``--device_map`` (``auto`` or a JSON file of module -> device) spreads one model over several GPUs of
one process through accelerate's hooks, for calibration and evaluation of a model too big for one GPU.
The hooks are attached even when the map names one device, so every placement runs the same code.
"""

from __future__ import annotations

import functools
import json
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
DEVICE_MAP_FLAG = "--device_map"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


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


# ----------------------------------------------------------------------------------------------
# --device_map
# ----------------------------------------------------------------------------------------------
def resolve_device_map(value: Optional[str], train_args: TrainingArguments):
    """``--device_map`` as ``from_pretrained`` takes it: None, a strategy name (``auto``, ...) or a dict
    {module name: device}. Combinations that cannot work are refused with a UsageError."""
    if value is None:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UsageError(f"spreads one model over the devices of one process; it cannot run under torchrun or "
                         f"accelerate launch (WORLD_SIZE={world}): start a single process", DEVICE_MAP_FLAG)
    if train_args.do_train and not train_args.width_calib:
        raise UsageError("is for calibration and evaluation; give --do_train False (training a model spread "
                         "over devices is not supported: use torchrun with one model copy per GPU)",
                         DEVICE_MAP_FLAG)
    if value in DEVICE_MAP_STRATEGIES:
        device_map = value
    else:
        device_map = _read_device_map(value)
    if train_args.bits in (4, 8) and isinstance(device_map, dict) and "cpu" in device_map.values():
        raise UsageError(f"{train_args.bits}-bit (bitsandbytes) weights must sit on GPUs; the map places modules "
                         "on the CPU", DEVICE_MAP_FLAG)
    return device_map


def _read_device_map(path: str) -> dict:
    """A JSON object {module name: device} with devices as GPU indices, ``cuda:N`` or ``cpu``."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise UsageError(f"'{path}' is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor a JSON file",
                         DEVICE_MAP_FLAG)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not readable JSON ({err})", DEVICE_MAP_FLAG) from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{path} must hold a non-empty JSON object {{module name: device}}", DEVICE_MAP_FLAG)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out: dict = {}
    for name, device in raw.items():
        index = None
        if isinstance(device, int) and not isinstance(device, bool):
            index = device
        elif isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
            index = int(device[5:])
        elif device != "cpu":
            raise UsageError(f"{path}: '{name}' -> {device!r} is not a device (a GPU index, cuda:N or cpu; "
                             "disk offloading is not supported)", DEVICE_MAP_FLAG)
        if index is not None and not 0 <= index < gpus:
            raise UsageError(f"{path}: '{name}' names GPU {index}, and this machine has {gpus}", DEVICE_MAP_FLAG)
        out[str(name)] = index if index is not None else "cpu"
    if gpus and "cpu" in out.values():
        raise UsageError(f"{path} puts modules on the CPU next to GPUs; offloading is not supported (the elastic "
                         "model reads the weights directly)", DEVICE_MAP_FLAG)
    return out


def _check_placement(model) -> None:
    """Refuse a placement that offloads weights (accelerate keeps them on the meta device until used)."""
    placed = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in placed or ("cpu" in placed and len(placed) > 1):
        where = sorted(k for k, d in model.hf_device_map.items() if str(d) in ("cpu", "disk"))
        raise UsageError(f"the model does not fit on the GPUs: {len(where)} modules ({', '.join(where[:3])}"
                         f"{', ...' if len(where) > 3 else ''}) would be offloaded to the CPU or disk, which is not "
                         "supported; use more GPUs or a lower precision", DEVICE_MAP_FLAG)


def _class_forward(module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def attach_device_hooks(model, device_map) -> None:
    """Make sure accelerate's device hooks sit on the model, then let them follow class changes.

    transformers attaches the hooks only when the map spans several devices; here a one-device map gets
    them too (``force_hooks``), so every placement runs through the same code. A hook calls the forward the
    module had when it was attached; the elastic model later swaps the projections' classes, so the hooks
    are pointed at the class's forward at call time instead.
    """
    from accelerate import dispatch_model

    if getattr(model, "hf_device_map", None) is None:
        if not isinstance(device_map, dict):  # a strategy that put everything on one device
            device_map = {"": next(model.parameters()).device}
        dispatch_model(model, device_map=device_map, force_hooks=True)
        model.hf_device_map = dict(device_map)
    for module in model.modules():
        old = getattr(module, "_old_forward", None)
        if hasattr(module, "_hf_hook") and getattr(old, "__func__", None) is type(module).forward:
            module._old_forward = functools.partial(_class_forward, module)


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
    device_map = resolve_device_map(getattr(model_args, "device_map", None), train_args)
    if device_map is not None and gguf is not None:
        raise UsageError("a .gguf model loads on one device; convert it to a model folder first", DEVICE_MAP_FLAG)
    qconfig = quantization_config(train_args)
    kwargs = dict(dtype=dtype, trust_remote_code=model_args.trust_remote_code, token=token,
                  cache_dir=train_args.cache_dir)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank}
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("loading %s (%s%s)", name, str(dtype).replace("torch.", ""),
                f", {train_args.bits}-bit" if qconfig else "")
    if gguf is not None:
        from amoeba.default_model import load_gguf

        if qconfig is not None:
            raise UsageError("a .gguf model cannot be re-quantized with --bits; convert it to a folder first", "--bits")
        model, tok = load_gguf(Path(where) / gguf, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        except ValueError as err:
            if device_map is None or "dispatched on the CPU or the disk" not in str(err):
                raise
            raise UsageError("the quantized model does not fit on the GPUs (it would be offloaded to the CPU or "
                             "disk, which bitsandbytes cannot run); use more GPUs", DEVICE_MAP_FLAG) from None
        tok = None
        if device_map is not None:
            _check_placement(model)
            attach_device_hooks(model, device_map)
            logger.info("placed on %s", ", ".join(sorted({str(d) for d in model.hf_device_map.values()})))
    if tok is None:
        tok = load_tokenizer(name, model_args.trust_remote_code, token, train_args.cache_dir)
    elif tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if qconfig is None and device_map is None and torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    model.config.use_cache = False
    model.eval()
    return model, tok
