"""Instruction data for one-for-all fine-tuning, in the qlora style.

``--dataset`` names Alpaca (``alpaca``: tatsu-lab/alpaca), Alpaca-cleaned (``alpaca-clean``:
yahma/alpaca-cleaned), Alpaca-GPT4 (``alpaca-gpt4``: vicgalle/alpaca-gpt4), or a local ``.json``
(a list of records, or one record per line) / ``.jsonl`` file. Named datasets come from the Hugging Face
hub, or from the offline data directory (``--data_dir`` / ``$AMOEBA_DATA_DIR``) when one is set.

Records are ``{instruction, input, output}`` (formatted with the Alpaca prompt template) or, with
``--dataset_format input-output``, ``{input, output}`` used as they are. The collator tokenizes on the
fly: ``bos + prompt`` (at most ``--source_max_len`` tokens) then ``response + eos`` (at most
``--target_max_len``); labels are -100 on the prompt and on padding.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from amoeba.errors import UsageError, shown
from amoeba.text_data import read_text_content

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The Stanford Alpaca prompt template (as qlora uses it).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)

# name -> (hub id, file under the offline data directory)
NAMED_DATASETS = {
    "alpaca": ("tatsu-lab/alpaca", "instruct/alpaca_cleaned_51941.jsonl.gz"),
    "alpaca-clean": ("yahma/alpaca-cleaned", "instruct/alpaca_cleaned_51941.jsonl.gz"),
    "alpaca-gpt4": ("vicgalle/alpaca-gpt4", "instruct/alpaca_gpt4_en_demo_999.json"),
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
FORMATS = ("alpaca", "input-output")


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca prompt for one instruction (with its optional input)."""
    if context:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------
# Reading files (with line numbers for every complaint)
# ----------------------------------------------------------------------------------------------
def _open_text(path: Path) -> str:
    return read_text_content(path, "--dataset")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_records(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(line number, record) for every record of a ``.json`` list or ``.json``/``.jsonl`` lines file.

    An empty file, or one that is not valid JSON, raises UsageError naming the file and the line.
    """
    path = Path(path)
    text = _open_text(path)
    if not text.strip():
        raise UsageError(f"{path} is empty", "--dataset")
    start = len(text) - len(text.lstrip())
    decoder = json.JSONDecoder()
    if text[start] == "[":
        return _read_array(text, start, path, decoder)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}, line {n}: not valid JSON ({err.msg}, column {err.colno})",
                             "--dataset") from None
        except (ValueError, RecursionError) as err:  # a number too long to convert; nesting too deep
            raise UsageError(f"{path}, line {n}: not valid JSON ({shown(str(err) or 'nested too deeply')})",
                             "--dataset") from None
    if not out:
        raise UsageError(f"{path} holds no records", "--dataset")
    return out


def _read_array(text: str, pos: int, path: Path, decoder: json.JSONDecoder) -> list[tuple[int, object]]:
    """Decode a JSON list element by element, remembering the line each element starts on."""
    out = []
    pos += 1  # past '['
    n = len(text)

    def skip_ws(p):
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        raise UsageError(f"{path} holds an empty list", "--dataset")
    while True:
        pos = skip_ws(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})",
                             "--dataset") from None
        except (ValueError, RecursionError) as err:
            raise UsageError(f"{path}, line {_line_of(text, pos)}: not valid JSON "
                             f"({shown(str(err) or 'nested too deeply')})", "--dataset") from None
        out.append((_line_of(text, pos), obj))
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            if text[pos + 1:].strip():
                raise UsageError(f"{path}, line {_line_of(text, pos + 1)}: unexpected text after the list",
                                 "--dataset")
            return out
        raise UsageError(f"{path}, line {_line_of(text, min(pos, n - 1))}: expected ',' or ']' in the list",
                         "--dataset")


def format_records(records: Sequence[tuple[int, object]], path, dataset_format: Optional[str]) -> list[dict]:
    """Turn raw records into ``{input, output}`` examples (Alpaca prompt applied); check every field."""
    fmt = dataset_format
    if fmt is None:  # guess from the first record
        first = records[0][1]
        fmt = "alpaca" if isinstance(first, dict) and "instruction" in first else "input-output"
    if fmt not in FORMATS:
        raise UsageError(f"'{fmt}' is not one of {', '.join(FORMATS)}", "--dataset_format")
    need = ("instruction", "output") if fmt == "alpaca" else ("input", "output")
    out = []
    for line, rec in records:
        if not isinstance(rec, dict):
            raise UsageError(f"{path}, line {line}: a record must be a JSON object, got {type(rec).__name__}",
                             "--dataset")
        for key in need:
            if not isinstance(rec.get(key), str):
                raise UsageError(f"{path}, line {line}: record has no text field '{key}' (format {fmt} needs "
                                 f"{', '.join(need)})", "--dataset")
        ctx = rec.get("input") or ""
        if not isinstance(ctx, str):
            raise UsageError(f"{path}, line {line}: field 'input' must be text", "--dataset")
        if fmt == "alpaca":
            out.append({"input": alpaca_prompt(rec["instruction"], ctx), "output": rec["output"]})
        else:
            out.append({"input": rec["input"], "output": rec["output"]})
    return out


# ----------------------------------------------------------------------------------------------
# Loading a dataset by name or path
# ----------------------------------------------------------------------------------------------
def is_local_dataset(name: str) -> bool:
    """True when ``--dataset`` names a local file (by its suffix)."""
    return name.endswith(LOCAL_SUFFIXES)


def load_examples(name: str, dataset_format: Optional[str] = None, data_dir: Optional[str] = None,
                  cache_dir: Optional[str] = None):
    """The formatted examples of ``--dataset`` as a ``datasets.Dataset`` with columns input, output."""
    from datasets import Dataset  # deferred: datasets takes seconds to import, only Stage 2 data needs it

    if is_local_dataset(name):
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise UsageError(f"no such file: {name}", "--dataset")
        records = read_records(path)
        return Dataset.from_list(format_records(records, path, dataset_format))
    if name not in NAMED_DATASETS:
        raise UsageError(f"'{name}' is not one of {', '.join(NAMED_DATASETS)} nor a .json/.jsonl file",
                         "--dataset")
    hub_id, offline = NAMED_DATASETS[name]
    if dataset_format not in (None, "alpaca"):
        raise UsageError(f"{name} is in the alpaca format, not {dataset_format}", "--dataset_format")
    if data_dir:
        path = Path(data_dir) / offline
        if not path.is_file():
            raise UsageError(f"the offline data directory {data_dir} has no {offline} (for --dataset {name})",
                             "--data_dir")
        if name == "alpaca":
            logger.warning("offline: --dataset alpaca reads Alpaca-cleaned (%s), the cleaned version of Alpaca",
                           path)
        logger.info("reading %s from %s", name, path)
        return Dataset.from_list(format_records(read_records(path), path, "alpaca"))
    from datasets import load_dataset  # deferred, as above: only the hub needs it

    try:
        raw = load_dataset(hub_id, split="train", cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {hub_id} from the Hugging Face hub ({first}); offline, set "
                         "AMOEBA_DATA_DIR or --data_dir to a data directory", "--dataset") from None
    raw = raw.map(lambda ex: {"input": alpaca_prompt(ex["instruction"], ex.get("input") or ""),
                              "output": ex["output"]}, remove_columns=raw.column_names)
    return raw


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------
@dataclass
class InstructionCollator:
    """Tokenize ``{input, output}`` examples into a right-padded causal-LM batch.

    ``attention_mask`` comes from the sequence lengths (the pad token may equal eos, so it cannot be
    told apart by id). ``labels`` are -100 on the prompt (unless ``train_on_source``) and on padding.

    ``padding_free``: the examples laid end to end in rows no longer than the longest instead (:func:`pack_batch`),
    ``position_ids`` restarting at 0 for each and no ``attention_mask``; transformers' models then mask attention
    example by example. Little padding is computed. The same loss as the padded batch.
    """

    tokenizer: object
    source_max_len: int
    target_max_len: int
    train_on_source: bool = False
    padding_free: bool = False

    def __post_init__(self):
        if self.source_max_len < 1:
            raise UsageError(f"{self.source_max_len} must be at least 1", "--source_max_len")
        if self.target_max_len < 1:
            raise UsageError(f"{self.target_max_len} must be at least 1", "--target_max_len")

    def encode(self, example: dict) -> tuple[list[int], list[int]]:
        """(source ids, target ids) of one example, truncated to the flag lengths."""
        tok = self.tokenizer
        src = tok(example["input"], add_special_tokens=False)["input_ids"]
        tgt = tok(example["output"], add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            src = [tok.bos_token_id] + src
        if tok.eos_token_id is not None:
            tgt = tgt + [tok.eos_token_id]
        return src[: self.source_max_len], tgt[: self.target_max_len]

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        rows = [self.encode(ex) for ex in examples]
        width = max(len(s) + len(t) for s, t in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (s, t) in enumerate(rows):
            seq = s + t
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
            if self.train_on_source:
                labels[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            else:
                labels[i, len(s): len(seq)] = torch.tensor(t, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return pack_batch(batch) if self.padding_free else batch


def pack_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch without its padding (``--padding_free``): its examples end to end in rows no longer
    than the longest example (longest first, each into the first row with room), ``position_ids`` restarting at 0
    for each example, no ``attention_mask`` (transformers' models then mask attention example by example). A
    row's unused end is one filler segment (positions from 0, no targets) that no example attends to. No
    example's first token is a target: it would be predicted from the end of the example before. Rows, not one
    long row: attention's work grows with the square of a row's length. ``num_tokens``: the examples' tokens."""
    ids, keep = batch["input_ids"], batch["attention_mask"].bool()
    lengths = keep.sum(1).tolist()
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX  # never a target in the padded batch either: nothing precedes it
    filler = ids[~keep][0] if (~keep).any() else ids[0, 0]
    out_ids = torch.full((len(rows), width), int(filler), dtype=ids.dtype)
    out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=labels.dtype)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            out_ids[r, at:at + n] = ids[i, :n]
            out_labels[r, at:at + n] = labels[i, :n]
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the filler: a segment of its own
    device = ids.device
    return {"input_ids": out_ids.to(device), "position_ids": positions.to(device), "labels": out_labels.to(device),
            "num_tokens": torch.tensor(sum(lengths), device=device)}


def packed_sequences_supported() -> bool:
    """Whether this transformers keeps examples packed into one row apart (attention masked example by example
    from the position ids), which ``--padding_free`` needs."""
    try:  # deferred: only --padding_free asks, and old transformers versions lack the module
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


# ----------------------------------------------------------------------------------------------
# Train / eval split
# ----------------------------------------------------------------------------------------------
def split_examples(dataset, eval_size: int, seed: int):
    """(train, eval) with ``eval_size`` examples held out at random (seeded); capped to keep training data."""
    n = len(dataset)
    if n < 2:
        raise UsageError(f"the dataset has {n} example(s); at least 2 are needed to hold out an evaluation set",
                         "--eval_dataset_size")
    if eval_size < 1:
        raise UsageError(f"{eval_size} must be at least 1 when evaluating", "--eval_dataset_size")
    if eval_size >= n:
        capped = max(1, n // 10)
        logger.warning("--eval_dataset_size %d is not smaller than the dataset (%d examples): holding out %d",
                       eval_size, n, capped)
        eval_size = capped
    parts = dataset.train_test_split(test_size=eval_size, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


@dataclass(frozen=True)
class InstructionData:
    """Which instruction data a run trains on and how it is cut: ``dataset`` (a name or a local file) in
    ``dataset_format``, from ``data_dir`` (offline) or the hub (cached in ``cache_dir``); ``eval_size`` examples
    held out at random with ``split_seed`` (None: no evaluation split); both sets truncated to ``max_train`` /
    ``max_eval`` examples; prompts of at most ``source_max_len`` tokens, responses of at most
    ``target_max_len``, labels on the prompt too with ``train_on_source``; a ``length`` column for the Trainer's
    length-grouped sampler with ``group_by_length``; batches without padding with ``padding_free``."""

    dataset: str
    dataset_format: Optional[str] = None
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    eval_size: Optional[int] = None
    split_seed: int = 42
    max_train: Optional[int] = None
    max_eval: Optional[int] = None
    source_max_len: int = 1024
    target_max_len: int = 256
    train_on_source: bool = False
    group_by_length: bool = True
    padding_free: bool = False


def make_data_module(tokenizer, data: InstructionData) -> dict:
    """``train_dataset``, ``eval_dataset`` (None without ``eval_size``) and ``data_collator`` for the Trainer."""
    dataset = load_examples(data.dataset, data.dataset_format, data.data_dir, data.cache_dir)
    if len(dataset) == 0:
        raise UsageError(f"{data.dataset} holds no examples", "--dataset")
    eval_dataset = None
    if data.eval_size is not None:
        dataset, eval_dataset = split_examples(dataset, data.eval_size, data.split_seed)
        if data.max_eval is not None and len(eval_dataset) > data.max_eval:
            eval_dataset = eval_dataset.select(range(data.max_eval))
    if data.max_train is not None and len(dataset) > data.max_train:
        dataset = dataset.select(range(data.max_train))
    if data.group_by_length:
        # The length sampler reads this column (characters: a cheap proxy for tokens, as qlora).
        def add_length(ex):
            return {"length": len(ex["input"]) + len(ex["output"])}

        dataset = dataset.map(add_length)
        if eval_dataset is not None:
            eval_dataset = eval_dataset.map(add_length)
    logger.info("instruction data %s: %d training examples, %s evaluation examples", data.dataset, len(dataset),
                len(eval_dataset) if eval_dataset is not None else "no")
    collator = InstructionCollator(tokenizer, data.source_max_len, data.target_max_len, data.train_on_source,
                                   data.padding_free)
    return {"train_dataset": dataset, "eval_dataset": eval_dataset, "data_collator": collator}
