"""Load a base model and its tokenizer: a hub id, a local folder, or a ``.gguf`` file.

Precision follows ``--fp16/--bf16``; ``--bits 4|8`` quantizes through bitsandbytes (CUDA only).

Every local model is checked in one place, :func:`check_model_source`, before a library reads it (the JSON
files parse, a weight file exists and each safetensors file is as long as its header says, a tokenizer file
exists, a ``.gguf`` starts with the GGUF magic); what only the libraries can find (a mistyped value in
config.json, weights that do not fit the config, a damaged ``.bin``) is translated where they are called
(:func:`_reading`). Either way a bad model gives one :class:`UsageError` naming the file and the problem.

``--device_map`` (``auto`` or a JSON file of module -> device) spreads one model over several GPUs of
one process through accelerate's hooks, for calibration and evaluation of a model too big for one GPU.
The hooks are attached even when the map names one device, so every placement runs the same code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import dispatch_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from amoeba.default_model import DEFAULT_MODEL_DIR, load_gguf
from amoeba.distributed import is_first_process
from amoeba.errors import UsageError, for_flag, shown
from amoeba.families import family_of

logger = logging.getLogger(__name__)

FLAG = "--model_name_or_path"
DEVICE_MAP_FLAG = "--device_map"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# The weight files from_pretrained looks for, in its order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Files a tokenizer is built from (one is enough); the JSON files next to them must parse.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Config sizes the model is built from: a zero or negative one fails deep inside torch.
CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit on its JSON header


@dataclass(frozen=True)
class LoadSettings:
    """How to load the base model: ``model`` (a hub id, a local folder or a ``.gguf`` file), whether its own code
    may run (``trust_remote_code``) and the machine's hub token be used (``use_auth_token``); precision (``bf16``,
    ``fp16``: CUDA only; else fp32) or bitsandbytes quantization (``bits`` 4 or 8 with ``double_quant`` and
    ``quant_type``); ``device_map`` (a strategy name or a JSON file) to spread it over the GPUs of one process,
    which ``training`` refuses; the hub's ``cache_dir``; ``sharded``: the weights stay on the CPU, to be sharded over the
    processes' GPUs (``--fsdp``, :mod:`amoeba.sharding`)."""

    model: str
    trust_remote_code: bool = False
    use_auth_token: bool = False
    bf16: bool = False
    fp16: bool = False
    bits: int = 16
    double_quant: bool = True
    quant_type: str = "nf4"
    device_map: Optional[str] = None
    training: bool = False
    cache_dir: Optional[str] = None
    sharded: bool = False


def compute_dtype(settings: LoadSettings) -> torch.dtype:
    """The dtype weights are loaded in: bf16, fp16 (CUDA only; fp32 on a CPU), else fp32."""
    if settings.bf16:
        return torch.bfloat16
    if settings.fp16:
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
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as err:  # e.g. a name longer than the file system allows
        raise UsageError(f"'{shown(name)}' cannot be a model: {err.strerror or err}", FLAG) from None
    if path.suffix == ".gguf":
        if not is_file:
            raise UsageError(f"no such file: {name}", FLAG)
        return str(path.parent), path.name
    if exists:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"{name} is not a model folder (no config.json)", FLAG)
        return str(path), None
    if name == DEFAULT_MODEL_DIR:
        raise UsageError(f"{name} does not exist yet; create it with: python main.py --materialize_default_model",
                         FLAG)
    if _looks_local(name) or name.count("/") != 1:
        raise UsageError(f"no such model folder or file: {name}", FLAG)
    return name, None  # a hub id such as meta-llama/Llama-2-7b-hf


@dataclass(frozen=True)
class ModelSource:
    """A checked ``--model_name_or_path``: what ``from_pretrained`` reads, and how messages name its parts."""

    name: str  # as the user gave it
    where: str  # a local folder, the folder of a .gguf file, or a hub id
    gguf: Optional[str] = None  # the .gguf file name inside ``where``
    weights: Optional[str] = None  # the weight file (or the folder of a sharded model), when local

    @property
    def local(self) -> bool:
        """True for a folder or .gguf on this machine (a hub id is fetched into the cache when loaded)."""
        return self.gguf is not None or Path(self.where).is_dir()

    def file(self, name: str) -> str:
        """How messages name one of the model's files: its path, the .gguf file, or hub id plus file name."""
        if self.gguf is not None:
            return str(Path(self.where) / self.gguf)
        return str(Path(self.where) / name) if self.local else f"{self.where} ({name})"


def check_model_source(name: str) -> ModelSource:
    """Resolve ``--model_name_or_path`` and check its files before any library reads them.

    The one place a local model is validated: config.json is a JSON object naming a supported architecture;
    the weights exist (a sharded model's index lists files that exist) and every safetensors file is as long
    as its header says; a tokenizer file exists and the tokenizer's JSON files parse; a ``.gguf`` starts with
    the GGUF magic bytes. Only the small JSON files and the weights' headers are read. Problems raise
    UsageError naming the file.
    """
    where, gguf = resolve_model_path(name)
    if gguf is not None:
        _check_gguf(Path(where) / gguf)
        return ModelSource(name, where, gguf, str(Path(where) / gguf))
    folder = Path(where)
    if not folder.is_dir():
        return ModelSource(name, where)
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise _bad(folder / "config.json", "is not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise _bad(folder / "config.json", "names no model_type (the architecture, e.g. llama)")
    _check_architecture(model_type)
    weights = _weight_files(folder)
    for file in weights:
        if file.name.endswith(".safetensors"):
            _check_safetensors(file)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise _bad(folder, f"holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    for file in TOKENIZER_JSON:
        if (folder / file).is_file():
            _read_json(folder / file)
    return ModelSource(name, where, None, str(weights[0] if len(weights) == 1 else folder))


def _bad(path, problem: str) -> UsageError:
    return UsageError(f"{path} {problem}", FLAG)


def _check_architecture(model_type: str) -> None:
    with for_flag(FLAG):
        family_of(model_type)


def _read_json(path: Path):
    """The parsed JSON of one of the model's small files (config, tokenizer, shard index)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(path, "is missing") from None
    except UnicodeDecodeError:
        raise _bad(path, "is not text (not UTF-8): a damaged or binary file") from None
    except json.JSONDecodeError as err:
        raise _bad(path, f"is not valid JSON ({err.msg}: line {err.lineno} column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # a number too long to convert; nesting too deep
        raise _bad(path, f"is not valid JSON ({shown(str(err) or 'nested too deeply')})") from None
    except OSError as err:
        raise _bad(path, f"cannot be read ({err.strerror or err})") from None


def _weight_files(folder: Path) -> list[Path]:
    """The weight files from_pretrained will read from ``folder`` (every shard of a sharded model)."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        index = _read_json(file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise _bad(file, "has no weight_map {tensor name: shard file}")
        shards = [folder / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise _bad(shard, f"is missing (listed in {file.name})")
        return shards
    raise _bad(folder, f"holds no weights (none of {', '.join(WEIGHT_FILES)})")


def _read_head(path: Path, count: int, start: int = 0) -> tuple[bytes, int]:
    """(``count`` bytes of ``path`` from ``start``, the file's size)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(count), os.fstat(fh.fileno()).st_size
    except OSError as err:
        raise _bad(path, f"cannot be read ({err.strerror or err})") from None


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors the header places:
    its size must be exactly what the header describes (a cut-short copy is not)."""
    head, size = _read_head(path, 8)
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < length <= min(size - 8, MAX_SAFETENSORS_HEADER):
        raise _bad(path, f"is not a safetensors file, or is cut short ({size} bytes)")
    raw, _ = _read_head(path, length, start=8)
    try:
        header = json.loads(raw.decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise _bad(path, "is not a safetensors file (its header does not parse)") from None
    if 8 + length + end != size:
        raise _bad(path, f"is damaged or cut short: its header describes {8 + length + end} bytes, the file has "
                         f"{size}")


def _check_gguf(path: Path) -> None:
    if _read_head(path, 4)[0] != b"GGUF":
        raise _bad(path, "is not a GGUF file (it does not start with the GGUF magic bytes)")


def _library_errors() -> tuple[type, ...]:
    """What transformers, safetensors, torch and huggingface_hub raise on a file they cannot use."""
    errors = [OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError, EOFError, OverflowError,
              pickle.UnpicklingError]
    with contextlib.suppress(ImportError):  # where the installed safetensors has its own error type
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import StrictDataclassError  # a mistyped value in config.json

        errors.append(StrictDataclassError)
    return tuple(errors)


@contextlib.contextmanager
def _reading(what: str, source: str):
    """Turn a library's failure to read ``what`` from ``source`` into one UsageError line.

    Runs around every from_pretrained call. The files were checked already (check_model_source); what fails
    here is what only the library sees, so its own message is kept, on one line."""
    try:
        yield
    except UsageError:
        raise
    except _library_errors() as err:
        if isinstance(err, torch.cuda.OutOfMemoryError):  # the machine's limit, not the files' fault
            raise
        if isinstance(err, pickle.UnpicklingError):  # torch.load's message is a page about weights_only
            text = "damaged, or not a weights file that torch.load reads safely"
        else:
            text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise UsageError(f"cannot load {what} from {source}: {shown(text, 300)}", FLAG) from None


def _check_config_sizes(config, source: str) -> None:
    for key in CONFIG_SIZES:
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _bad(source, f"gives {key} = {value!r}; it must be a positive integer")


def load_config(name: str, trust_remote_code: bool = False, token=None):
    """The model config, with the files checked and the architecture checked against the supported family."""
    return _load_config(check_model_source(name), trust_remote_code, token)


def _load_config(source: ModelSource, trust_remote_code: bool, token):
    where = source.file("config.json")
    with _reading("the config", where):
        config = AutoConfig.from_pretrained(source.where, gguf_file=source.gguf, trust_remote_code=trust_remote_code,
                                            token=token)
    _check_architecture(config.model_type)
    _check_config_sizes(config, where)
    return config


def quantization_config(settings: LoadSettings):
    """A ``BitsAndBytesConfig`` for ``--bits 4|8`` (None otherwise); CUDA is required."""
    if settings.bits not in (4, 8):
        return None
    if not torch.cuda.is_available():
        raise UsageError(f"{settings.bits}-bit loading uses bitsandbytes and needs a CUDA GPU, and this machine "
                         "has none; drop --bits (or use --bits 16)", "--bits")
    return BitsAndBytesConfig(
        load_in_4bit=settings.bits == 4,
        load_in_8bit=settings.bits == 8,
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=compute_dtype(settings),
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_quant_type=settings.quant_type,
    )


# ----------------------------------------------------------------------------------------------
# --device_map
# ----------------------------------------------------------------------------------------------
def resolve_device_map(value: Optional[str], training: bool = False, bits: int = 16):
    """``--device_map`` as ``from_pretrained`` takes it: None, a strategy name (``auto``, ...) or a dict
    {module name: device}. Combinations that cannot work (``training``, ``bits`` 4/8 on the CPU) are refused with a
    UsageError."""
    if value is None:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UsageError(f"spreads one model over the devices of one process; it cannot run under torchrun or "
                         f"accelerate launch (WORLD_SIZE={world}): start a single process", DEVICE_MAP_FLAG)
    if training:
        raise UsageError("is for calibration and evaluation; give --do_train False (training a model spread "
                         "over devices is not supported: use torchrun with one model copy per GPU)",
                         DEVICE_MAP_FLAG)
    if value in DEVICE_MAP_STRATEGIES:
        device_map = value
    else:
        device_map = _read_device_map(value)
    if bits in (4, 8) and isinstance(device_map, dict) and "cpu" in device_map.values():
        raise UsageError(f"{bits}-bit (bitsandbytes) weights must sit on GPUs; the map places modules "
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
    return _load_tokenizer(check_model_source(name), trust_remote_code, token, cache_dir)


def _load_tokenizer(source: ModelSource, trust_remote_code: bool, token, cache_dir):
    folder = source.local and source.gguf is None
    with _reading("the tokenizer", source.where if folder else source.file("tokenizer")):
        tok = AutoTokenizer.from_pretrained(source.where, gguf_file=source.gguf, padding_side="right",
                                            use_fast=True, trust_remote_code=trust_remote_code, token=token,
                                            cache_dir=cache_dir)
    _set_pad_token(tok)
    return tok


def _set_pad_token(tok) -> None:
    if tok.pad_token is None:
        # Reuse an existing token rather than growing the vocabulary: exported subnets keep the
        # base model's embedding shape. Padding is excluded by the attention mask and labels.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        logger.info("tokenizer had no pad token; using %r", tok.pad_token)


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' load report (a table of every tensor that did not load) while this module
    loads weights: missing, mismatched and unused tensors become one line here (:func:`_check_loaded`). A
    report with CONVERSION entries passes: transformers' error after it points the reader to them."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "LOAD REPORT" not in text or "CONVERSION" in text


def _check_loaded(info: dict, source: str) -> None:
    """Refuse weights that do not make the model: tensors of the wrong shape, or tensors missing (which
    transformers would fill with random values)."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: str(m[0]))
    if mismatched:
        key, stored, wanted = mismatched[0][:3]
        raise _bad(source, f"does not fit config.json: {len(mismatched)} tensors have other shapes (e.g. {key}: "
                           f"{list(stored)} stored, {list(wanted)} by the config)")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise _bad(source, f"lacks {len(missing)} of the model's tensors (e.g. {missing[0]}): weights of another "
                           "model, or incomplete")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.warning("%s: %d stored tensors are not part of the model and were ignored (e.g. %s)", source,
                       len(unexpected), unexpected[0])


def _from_pretrained(source: ModelSource, kwargs: dict):
    """``AutoModelForCausalLM.from_pretrained`` with its failures translated and the loaded tensors checked."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    report_logger.addFilter(hold)
    try:
        with _reading("the weights", source.weights or source.where):
            try:
                # Mismatched shapes are reported by _check_loaded, with the first tensor named, not by a table.
                model, info = AutoModelForCausalLM.from_pretrained(source.where, output_loading_info=True,
                                                                   ignore_mismatched_sizes=True, **kwargs)
            except ValueError as err:
                if "dispatched on the CPU or the disk" not in str(err):
                    raise
                raise UsageError("the quantized model does not fit on the GPUs (it would be offloaded to the CPU "
                                 "or disk, which bitsandbytes cannot run); use more GPUs", DEVICE_MAP_FLAG) from None
    finally:
        report_logger.removeFilter(hold)
    _check_loaded(info, source.weights or source.where)
    return model


def load_model_and_tokenizer(settings: LoadSettings):
    """Load the base model (eval mode, ``use_cache`` off) and tokenizer as ``settings`` say."""
    name = settings.model
    token = True if settings.use_auth_token else None
    source = check_model_source(name)  # fails fast on a bad path, file or architecture
    config = _load_config(source, settings.trust_remote_code, token)
    where, gguf = source.where, source.gguf
    dtype = compute_dtype(settings)
    device_map = resolve_device_map(settings.device_map, settings.training, settings.bits)
    if device_map is not None and gguf is not None:
        raise UsageError("a .gguf model loads on one device; convert it to a model folder first", DEVICE_MAP_FLAG)
    qconfig = quantization_config(settings)
    kwargs = dict(dtype=dtype, trust_remote_code=settings.trust_remote_code, token=token,
                  cache_dir=settings.cache_dir)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank}
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("loading %s (%s%s)", name, str(dtype).replace("torch.", ""),
                f", {settings.bits}-bit" if qconfig else "")
    if settings.sharded and gguf is None and not is_first_process():
        # --fsdp: only the first process reads the weights; the others build the model without memory and receive
        # their shards from it (amoeba.sharding), so a machine holds one copy of the base, not one per process.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=settings.trust_remote_code)
        tok = None
        logger.info("process %s builds the model without its weights: the first process sends its shards",
                    os.environ.get("RANK"))
    elif gguf is not None:
        if qconfig is not None:
            raise UsageError("a .gguf model cannot be re-quantized with --bits; convert it to a folder first", "--bits")
        with _reading("the model", source.file(gguf)):
            model, tok = load_gguf(Path(where) / gguf, dtype=dtype)
    else:
        model = _from_pretrained(source, kwargs)
        tok = None
        if device_map is not None:
            _check_placement(model)
            attach_device_hooks(model, device_map)
            logger.info("placed on %s", ", ".join(sorted({str(d) for d in model.hf_device_map.values()})))
    if tok is None:
        tok = _load_tokenizer(source, settings.trust_remote_code, token, settings.cache_dir)
    else:
        _set_pad_token(tok)
    if qconfig is None and device_map is None and torch.cuda.is_available() and not settings.sharded:
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    model.config.use_cache = False
    model.eval()
    return model, tok
