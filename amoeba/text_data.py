"""Plain-text corpora for calibration and perplexity: offline files first, the Hugging Face hub otherwise.

Where data comes from (:func:`resolve_data_dir`): an explicit directory, else ``$AMOEBA_DATA_DIR``, else the hub.
A data directory is laid out like ``shared/data``::

    wikitext2/wikitext-2-raw-v1_test.hfrows.jsonl   # the HF wikitext-2-raw-v1 test rows, {"text": ...}
    calib/c4_demo.jsonl                             # C4-style web text, {"text": ...}
    calib/wiki_demo.txt                             # Wikipedia articles, one per line

Local files (``.txt``, ``.json``, ``.jsonl``, ``.jsonl.gz`` with a ``text`` field) work everywhere. Errors say what
is wrong with a corpus or a file; the caller names the flag it came from (problems with the data directory name
``--data_dir``, the one setting this module reads from the environment too).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from amoeba.distributed import gather_from_processes, process_share
from amoeba.errors import UsageError, shown
from amoeba.model_state import eval_mode, model_device

logger = logging.getLogger(__name__)

TEXT_CORPORA = ("wikitext2", "c4", "wiki")  # the named text corpora (calibration, perplexity)
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".jsonl.gz")

# Offline file of each named corpus (relative to the data directory), per split.
_LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext2/wikitext-2-raw-v1_test.hfrows.jsonl",
    ("c4", "validation"): "calib/c4_demo.jsonl",
    ("wiki", "train"): "calib/wiki_demo.txt",
}
# The split each corpus offers when the caller's split does not apply (calibration samples have one).
_ONLY_SPLIT = {"c4": "validation", "wiki": "train"}
# allenai/c4 is terabytes; one validation shard is the usual calibration source (as in GPTQ/SparseGPT).
_C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"


def resolve_data_dir(path: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The offline data directory: ``path`` when given, else ``$AMOEBA_DATA_DIR`` if set; None for the hub. A
    directory that does not exist raises UsageError."""
    chosen = path or os.environ.get("AMOEBA_DATA_DIR") or None
    if chosen is None:
        return None
    path = Path(os.path.expanduser(str(chosen)))
    if not path.is_dir():
        raise UsageError(f"data directory {path} does not exist", "--data_dir")
    return path


def is_local_text_file(name: str) -> bool:
    """True when ``name`` names a local text corpus file by its suffix."""
    return str(name).lower().endswith(LOCAL_SUFFIXES)


def read_text_content(path: Union[str, os.PathLike], flag: Optional[str] = None) -> str:
    """The whole text of ``path`` as UTF-8 (decompressed first when it ends in ``.gz``).

    A file that cannot be read, a damaged gzip stream and bytes that are not UTF-8 text (a binary file given
    as text) raise UsageError naming ``flag`` and the file."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start} of its text: {err.reason}); is it a binary "
                         "file?", flag) from None
    except (OSError, EOFError, zlib.error) as err:  # gzip: BadGzipFile (an OSError), EOFError, zlib.error
        raise UsageError(f"cannot read {path}: {err}", flag) from None


def read_text_file(path: Union[str, os.PathLike], flag: Optional[str] = None) -> str:
    """The text of a local ``.txt`` file, or the ``text`` fields of a ``.json``/``.jsonl(.gz)`` file
    joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}", flag)
    name = path.name.lower()
    raw = read_text_content(path, flag)
    if name.endswith(".txt"):
        return raw
    rows: list
    if name.endswith(".json"):
        try:
            rows = json.loads(raw)
        except json.JSONDecodeError:
            rows = None  # a .json file written as JSON lines
        except (ValueError, RecursionError) as err:  # a number too long to convert; nesting too deep
            raise UsageError(f"{path} is not valid JSON ({shown(str(err) or 'nested too deeply')})", flag) from None
        if isinstance(rows, dict):
            rows = rows.get("data") or rows.get("rows") or [rows]
        if rows is None:
            rows = _json_lines(raw, path, flag)
    else:
        rows = _json_lines(raw, path, flag)
    texts = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        else:
            raise UsageError(f"{path}: record {i} has no string 'text' field", flag)
    if not texts:
        raise UsageError(f"{path} holds no text", flag)
    return "\n\n".join(texts)


def _json_lines(raw: str, path: Path, flag: Optional[str]) -> list:
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({err.msg})", flag) from None
        except (ValueError, RecursionError) as err:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({shown(str(err) or 'nested too deeply')})",
                             flag) from None
    return rows


def load_text(name_or_path: str, split: str = "test", data_dir: Union[str, os.PathLike, None] = None) -> str:
    """One corpus as a single string.

    ``wikitext2`` gives ``"\\n\\n".join(rows)`` of the HF ``wikitext-2-raw-v1`` split (the usual
    perplexity text); ``c4`` the C4 validation sample; ``wiki`` the Wikipedia sample; a path to a
    ``.txt/.json/.jsonl/.jsonl.gz`` file its text. ``data_dir`` (or ``$AMOEBA_DATA_DIR``) selects
    offline files; without one the hub is used.
    """
    name = str(name_or_path)
    key = name.lower()
    if key not in TEXT_CORPORA and (is_local_text_file(name) or Path(name).is_file()):
        if not is_local_text_file(name):
            raise UsageError(f"{name}: local corpora must be {', '.join(LOCAL_SUFFIXES)} files")
        return read_text_file(name)
    if key not in TEXT_CORPORA:
        raise UsageError(f"unknown text corpus '{name}'; known: {', '.join(TEXT_CORPORA)}, "
                         f"or a local {'/'.join(LOCAL_SUFFIXES)} file")
    split = _ONLY_SPLIT.get(key, split)
    root = resolve_data_dir(data_dir)
    if root is not None:
        rel = _LOCAL_FILES.get((key, split))
        if rel is None:
            have = [s for (k, s) in _LOCAL_FILES if k == key]
            raise UsageError(f"the offline data directory has no '{split}' split of {key} (it has {have})")
        path = root / rel
        if not path.is_file():
            raise UsageError(f"{key}: expected the offline file {path}", "--data_dir")
        text = read_text_file(path, "--data_dir")
        logger.info("%s/%s: %d characters from %s", key, split, len(text), path)
        return text
    return _load_from_hub(key, split)


def _load_from_hub(key: str, split: str) -> str:
    """The corpus from the Hugging Face hub (needs network access)."""
    from datasets import load_dataset  # deferred: a heavy import that only the hub needs (offline: local files)

    if key == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    elif key == "c4":
        rows = load_dataset("allenai/c4", data_files={"validation": _C4_SHARD}, split="validation")["text"]
    else:
        raise UsageError(f"{key} has no hub source; give an offline data directory (--data_dir or "
                         "$AMOEBA_DATA_DIR) holding calib/wiki_demo.txt")
    return "\n\n".join(rows)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor (no special tokens: windows are cut anywhere)."""
    # A long text exceeds the tokenizer's model_max_length on purpose; the windows cut it afterwards.
    verbosity = logging.getLogger("transformers.tokenization_utils_base").level
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        logging.getLogger("transformers.tokenization_utils_base").setLevel(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def calibration_split(dataset: str, data_dir: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """The split calibration text of ``dataset`` comes from: ``train`` where the corpus has one, the only split of
    a calibration sample (C4: ``validation``), WikiText-2 ``test`` offline (the only split there); None for a
    local file."""
    key = str(dataset).lower()
    if key not in TEXT_CORPORA:
        return None
    if key == "wikitext2" and resolve_data_dir(data_dir) is not None:
        return "test"
    return _ONLY_SPLIT.get(key, "train")


def calibration_text(dataset: str, data_dir: Union[str, os.PathLike, None] = None,
                     purpose: str = "calibration") -> str:
    """The text calibration reads from ``dataset``: its training split, the only split of a calibration sample.
    Offline WikiText-2 has only its test split, which is then used with a warning naming ``purpose`` (its
    WikiText-2 test perplexities become biased)."""
    split = calibration_split(dataset, data_dir)
    if str(dataset).lower() == "wikitext2" and split == "test":
        logger.warning("!!! %s calibrates on the WikiText-2 TEST split (the only one offline): WikiText-2 test "
                       "perplexities of what it selects are then biased; prefer --calib_dataset c4 !!!", purpose)
    return load_text(dataset, split or "train", data_dir)


def token_windows(tokenizer, text: Union[str, torch.Tensor], seqlen: int, n: Optional[int] = None,
                  seed: Optional[int] = None) -> torch.Tensor:
    """Token windows ``[n, seqlen]`` cut from ``text`` (a string or already tokenized ids).

    ``seed=None`` (evaluation): consecutive, non-overlapping windows from the start, all of them or
    the first ``n``. With a seed (calibration): ``n`` windows at random offsets, reproducible.
    """
    if seqlen < 2:
        raise UsageError(f"sequence length {seqlen} is too short (at least 2 tokens)")
    ids = text if isinstance(text, torch.Tensor) else tokenize_text(tokenizer, text)
    ids = ids.reshape(-1).long()
    total = ids.numel()
    if total < seqlen:
        raise UsageError(f"the text has {total} tokens, fewer than one window of {seqlen}")
    if seed is None:
        count = total // seqlen if n is None else min(n, total // seqlen)
        return ids[: count * seqlen].view(count, seqlen).clone()
    if n is None or n < 1:
        raise ValueError("random windows need a count n >= 1")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, total - seqlen + 1, (n,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


# Logits kept at once by perplexity(): a batch of 32 windows of 2048 tokens over Qwen2.5's 151,936-token vocabulary
# is 19.9 GB of bf16 logits, which ran out of memory with four evaluations sharing an H200.
LOGITS_BUDGET_BYTES = 4 * 2**30


def rows_per_forward(model: torch.nn.Module, seqlen: int, budget_bytes: Optional[int] = None) -> int:
    """How many windows of ``seqlen`` tokens one forward may take so that its logits (vocabulary x tokens, in
    the model's dtype) stay within ``budget_bytes`` (default :data:`LOGITS_BUDGET_BYTES`); at least 1."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else int(model.config.vocab_size)
    itemsize = next(model.parameters()).element_size()
    budget = LOGITS_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (seqlen * vocab * itemsize))


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) of full windows, computed in float32.

    One window at a time: a float32 copy of a whole batch's logits (32 x 2048 x 49k vocabulary: 13 GB, twice
    over for the log-softmax) would exhaust a GPU that several evaluations share.
    """
    target = input_ids[:, 1:].to(logits.device)
    nll = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        nll += F.cross_entropy(logits[row, :-1, :].float(), target[row], reduction="sum")
    return float(nll), int(target.numel())


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
               progress: bool = False, group=None) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` ``[n, seqlen]``.

    Batched, without gradients, on the model's device; logits are scored in float32. A batch whose logits would
    pass :data:`LOGITS_BUDGET_BYTES` runs as several forwards of fewer windows (the sum is the same). With ``group`` (a
    ``torch.distributed`` group every member calls this with the same windows), each process scores the
    batches ``rank, rank + world, ...`` and the per-batch sums are gathered and added in batch order, so
    every process returns the one-process number (the batches are the same, so are their sums).
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor, got {tuple(windows.shape)}")
    rank, world = process_share(group) if group is not None else (0, 1)
    device = model_device(model)
    sums: list[tuple[int, float, int]] = []
    rows = min(batch_size, rows_per_forward(model, windows.shape[1]))
    with eval_mode(model):
        starts = list(range(0, windows.shape[0], batch_size))[rank::world]
        for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
            batch = windows[start: start + batch_size].to(device)
            nll, count = 0.0, 0
            for part in batch.split(rows):
                part_nll, part_count = window_nll(model(input_ids=part, use_cache=False).logits, part)
                nll, count = nll + part_nll, count + part_count
            sums.append((start, nll, count))
    if world > 1:
        sums = sorted(s for share in gather_from_processes(sums, group) for s in share)
    total_nll, total_tokens = 0.0, 0
    for _, nll, count in sums:  # batch order: the same additions as one process makes
        total_nll += nll
        total_tokens += count
    return math.exp(total_nll / total_tokens)
