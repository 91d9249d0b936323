"""MMLU: questions, zero/five-shot prompts in the hendrycks/qlora format, and answer-letter scoring.

Prompts are built from the per-subject CSVs of an offline data directory (``mmlu/{dev,val,test}/*.csv``,
header row, integer answers) or from the hub dataset ``cais/mmlu``. The zero-shot validation prompts are
byte-for-byte those of the seed's ``zero_shot_mmlu_val.json``; five-shot prompts put the subject's five
dev-split questions, with their answers, in front of the question.

Prediction as in qlora and the original AmoebaLLM code: the arg-max over the logits of the four answer
letters at the last prompt token. The ``loss`` that :func:`score_mmlu` reports (``mmlu_loss`` in
metrics.json) is our own: the cross entropy over those four logits. qlora and the original code report the
language-model loss instead, the full-vocabulary cross entropy on the answer tokens (the answer letter and
the end-of-sequence token, :func:`answer_target_ids`); the layer DP calibrates on that one with
``--calib_metric loss`` and on the four-letter one with ``--calib_metric letter_loss``.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from amoeba.distributed import gather_from_processes, process_share
from amoeba.errors import UsageError
from amoeba.model_state import eval_mode, model_device

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
SPLITS = {"eval": "val", "validation": "val", "val": "val", "test": "test", "dev": "dev"}
HUB_SPLITS = {"val": "validation", "test": "test", "dev": "dev"}
HUB_DATASET = "cais/mmlu"
SPLIT_NAMES = {"val": "validation", "test": "test", "dev": "dev"}  # as calibration records write them
SAFE_NAME = re.compile(r"[a-z0-9_]+")  # the only names a data folder may hand to a generated file


def _shown(text: str) -> str:
    """``text`` as one printable line (a file name may hold newlines or control characters)."""
    return text if text.isprintable() else ascii(text)


def safe_name(name: str, source, flag: Optional[str] = "--data_dir") -> str:
    """``name``, a string taken from a data file or folder (an MMLU subject from a CSV's file name), if it
    passes the project's one safe-name rule: lowercase ASCII letters, digits and underscores, nothing else.

    Such names go into generated files: lm-eval task configs (task names, and a ``description`` that lm-eval
    renders as a Jinja template, so ``{{ ... }}`` in a file name would run as code) and metrics.json keys.
    Anything else is refused with a UsageError naming ``source`` (the file): the data is the user's, so it is
    reported rather than silently skipped or rewritten.
    """
    if not SAFE_NAME.fullmatch(name):
        raise UsageError(f"{_shown(str(source))}: {ascii(name)} is not a safe name (names taken from data files "
                         "may hold only a-z, 0-9 and _); rename or remove it", flag)
    return name


def subject_of(path: str | os.PathLike, split: str) -> str:
    """The MMLU subject of a per-subject CSV (``<subject>_<split>.csv``), checked by :func:`safe_name`."""
    path = Path(path)
    return safe_name(path.name[: -len(f"_{split}.csv")], path)


def split_name(split: Optional[str]) -> Optional[str]:
    """The MMLU split a flag value names, as records write it: ``eval``/``val``/``validation`` ->
    ``validation``, ``test``, ``dev``; None for anything else."""
    return SPLIT_NAMES.get(SPLITS.get(str(split))) if split is not None else None


@dataclass(frozen=True)
class MMLUExample:
    """One MMLU question: its subject, the full prompt (ending in ``Answer:``) and the answer index 0-3."""

    subject: str
    prompt: str
    answer: int


@dataclass(frozen=True)
class _Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def format_subject(subject: str) -> str:
    """``abstract_algebra`` -> `` abstract algebra`` (leading space, as the hendrycks code writes it)."""
    return "".join(" " + part for part in subject.split("_"))


def prompt_header(subject: str) -> str:
    """The first line of every prompt; "about" is followed by two spaces, as in the seed's prompts."""
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def format_question(q: _Question, with_answer: bool) -> str:
    """A question with its lettered choices, ending in ``Answer:`` (plus `` X\\n\\n`` for an exemplar)."""
    text = q.question
    for letter, choice in zip(LETTERS, q.choices):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if with_answer:
        text += f" {LETTERS[q.answer]}\n\n"
    return text


def _read_csv(path: Path, subject: str) -> list[_Question]:
    # The csv module keeps every field a string: no NA conversion (literal "None" choices survive),
    # no numeric coercion (choices such as "0" stay "0").
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["question", "choice0", "choice1", "choice2", "choice3",
                                                    "answer"]:
        raise UsageError(f"{path}: expected the header question,choice0,choice1,choice2,choice3,answer",
                         "--data_dir")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 6 or row[5].strip() not in ("0", "1", "2", "3"):
            raise UsageError(f"{path}, line {line}: expected 6 columns with an answer 0-3", "--data_dir")
        out.append(_Question(subject, row[0], (row[1], row[2], row[3], row[4]), int(row[5])))
    return out


def _local_split(data_dir: Path, split: str) -> dict[str, list[_Question]]:
    folder = data_dir / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise UsageError(f"no MMLU {split} files (*_{split}.csv) in {folder}", "--data_dir")
    out = {}
    for f in files:
        subject = subject_of(f, split)
        out[subject] = _read_csv(f, subject)
    return out


def _hub_split(split: str) -> dict[str, list[_Question]]:
    from datasets import load_dataset  # deferred: a heavy import that only the hub needs (offline: CSV files)

    try:
        ds = load_dataset(HUB_DATASET, "all", split=HUB_SPLITS[split])
    except Exception as err:  # no network, no cache: say where the data can come from instead
        raise UsageError(f"cannot load {HUB_DATASET} ({HUB_SPLITS[split]}) from the hub: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; set AMOEBA_DATA_DIR "
                         "to an offline data directory", "--data_dir") from None
    out: dict[str, list[_Question]] = defaultdict(list)
    for row in ds:
        safe_name(row["subject"], f"{HUB_DATASET} ({HUB_SPLITS[split]})", None)
        out[row["subject"]].append(_Question(row["subject"], row["question"], tuple(row["choices"]),
                                             int(row["answer"])))
    return dict(sorted(out.items()))


def _questions(split: str, data_dir: Optional[str]) -> dict[str, list[_Question]]:
    if data_dir:
        return _local_split(Path(data_dir), split)
    return _hub_split(split)


def load_mmlu(split: str = "eval", shots: int = 0, data_dir: Optional[str | os.PathLike] = None,
              max_samples: Optional[int] = None) -> list[MMLUExample]:
    """MMLU questions of ``split`` (``eval`` = validation, ``test``, ``dev``) as prompts.

    ``shots``: 0 (``mmlu-zs``) or 5 (``mmlu-fs``: the subject's dev questions as exemplars). ``data_dir``:
    an offline directory laid out like shared/data, or None for the hub. ``max_samples``: keep the first
    this many (in subject order, as the seed's ``select(range(n))``).
    """
    if split not in SPLITS:
        raise UsageError(f"'{split}' is not an MMLU split (eval, test, dev)", "--mmlu_split")
    if shots not in (0, 5):
        raise UsageError(f"{shots}-shot MMLU is not supported (0 or 5)", "--mmlu_dataset")
    name = SPLITS[split]
    data_dir = str(data_dir) if data_dir else None
    questions = _questions(name, data_dir)
    exemplars = _questions("dev", data_dir) if shots else {}
    out = []
    for subject, qs in questions.items():
        shots_text = ""
        if shots:
            dev = exemplars.get(subject, [])
            if len(dev) < shots:
                raise UsageError(f"MMLU subject {subject} has {len(dev)} dev questions, {shots} are needed for "
                                 "five-shot prompts", "--mmlu_dataset")
            shots_text = "".join(format_question(q, True) for q in dev[:shots])
        for q in qs:
            out.append(MMLUExample(subject, prompt_header(subject) + shots_text + format_question(q, False),
                                   q.answer))
            if max_samples is not None and len(out) >= max_samples:
                return out
    return out


def answer_token_ids(tokenizer) -> list[int]:
    """Token ids of the four answer letters as they follow ``Answer:``.

    For SentencePiece (Llama) tokenizers these are qlora's ids (``tokenizer("A")``, i.e. ``▁A``); for
    byte-level BPE tokenizers the letter after ``Answer:`` is `` A``, so that is the token scored.
    """
    base = tokenizer("Answer:", add_special_tokens=False).input_ids
    ids = []
    for letter in LETTERS:
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False).input_ids
        if len(full) == len(base) + 1 and full[: len(base)] == base:
            ids.append(full[-1])
        else:  # the letter merged with its context: fall back to the bare letter, as qlora does
            ids.append(tokenizer(letter, add_special_tokens=False).input_ids[0])
    if len(set(ids)) != 4:
        raise UsageError(f"the tokenizer maps the answer letters to {ids}, not four distinct tokens",
                         "--model_name_or_path")
    return ids


def answer_target_ids(tokenizer, answer: int, letters: Optional[Sequence[int]] = None) -> list[int]:
    """The tokens the original code's MMLU loss is taken on, after the prompt: the answer letter (the token of
    :func:`answer_token_ids`; for Llama's tokenizer the original's ``tokenizer("A</s>")`` gives the same) and
    the end-of-sequence token when the tokenizer has one."""
    letters = list(letters) if letters is not None else answer_token_ids(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    return [letters[answer]] + ([int(eos)] if eos is not None else [])


def encode_prompts(tokenizer, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each prompt as qlora builds them: BOS text + prompt, no other special tokens.

    Prompts longer than ``max_len`` lose their beginning (the question and ``Answer:`` at the end stay).
    """
    bos = tokenizer.bos_token or ""
    enc = tokenizer([bos + p for p in prompts], add_special_tokens=False).input_ids
    return [ids[-max_len:] for ids in enc]


def shared_prefix_batches(encoded: Sequence[Sequence[int]], subjects: Sequence[str],
                          batch_size: int) -> list[tuple[int, list[int]]]:
    """Batches of one subject each, longest prompts first, with the number of leading tokens all of the batch's
    prompts share (the header and the five exemplars of a five-shot prompt; 0 when they share none). At least
    one token of each prompt is left after it: the last one, whose logits are read."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, subject in enumerate(subjects):
        by_subject[subject].append(i)
    out = []
    for subject in sorted(by_subject):
        rows = sorted(by_subject[subject], key=lambda i: (-len(encoded[i]), i))
        for start in range(0, len(rows), batch_size):
            batch = rows[start: start + batch_size]
            first, shared = encoded[batch[0]], min(len(encoded[i]) for i in batch) - 1
            for i in batch[1:]:
                shared = next((k for k in range(shared) if encoded[i][k] != first[k]), shared)
            out.append((shared, batch))
    return out


class _PrefixCaches:
    """KV caches of shared prompt prefixes: each prefix runs once (one sequence), and every batch that shares it
    gets its own copy, repeated for its rows (the model extends the cache it is given)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.tokens: Optional[tuple[int, ...]] = None
        self.cache = None

    def for_batch(self, prefix: Sequence[int], rows: int):
        if self.tokens != tuple(prefix):  # batches come subject by subject: keep the last prefix only
            out = self.model(input_ids=torch.tensor([list(prefix)], device=self.device), use_cache=True,
                             logits_to_keep=1)
            self.tokens, self.cache = tuple(prefix), out.past_key_values
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


@torch.no_grad()
def letter_logits(model, tokenizer, examples: Sequence[MMLUExample], batch_size: int = 8,
                  max_len: int = 2048, progress: bool = True, group=None, prefix_cache: bool = False) -> torch.Tensor:
    """float32 [n, 4] logits of the answer letters at each prompt's last token, in ``examples`` order.

    Prompts are batched longest first; each row's logits are taken at its own last real token, with
    position ids counted over real tokens only, so left and right padding give the same numbers. With
    ``group`` (a ``torch.distributed`` group whose members all call this with the same examples), each
    process runs the batches ``rank, rank + world, ...`` and the rows are gathered: every process gets
    the logits one process computes, batch for batch.

    ``prefix_cache`` (``--mmlu_prefix_cache``): batches hold one subject each, and the tokens their prompts
    share (a five-shot prompt's header and exemplars, about four fifths of it) run once, as one sequence whose
    KV cache (copied for each batch that shares it) the rest of each prompt then attends to. The same
    computation with about a fifth of the tokens for five-shot prompts; the numbers differ only by rounding
    (fp32: 1e-5, tested), bf16's included.
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1", "--per_device_eval_batch_size")
    letters = torch.tensor(answer_token_ids(tokenizer))
    encoded = encode_prompts(tokenizer, [e.prompt for e in examples], max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left" and not prefix_cache
    device = model_device(model)
    out = torch.empty(len(encoded), 4, dtype=torch.float32)
    rank, world = process_share(group) if group is not None else (0, 1)
    if prefix_cache:
        planned = shared_prefix_batches(encoded, [e.subject for e in examples], batch_size)
    else:
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        planned = [(0, order[i: i + batch_size]) for i in range(0, len(order), batch_size)]
    prefixes = _PrefixCaches(model, device)
    with eval_mode(model):
        batches = planned[rank::world]
        for shared, batch in tqdm(batches, desc="MMLU", disable=not progress, leave=False):
            rest = [encoded[i][shared:] for i in batch]
            width = max(len(r) for r in rest)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            last = torch.empty(len(batch), dtype=torch.long)
            for row, tokens in enumerate(rest):
                n = len(tokens)
                start = width - n if left else 0
                ids[row, start: start + n] = torch.tensor(tokens)
                mask[row, start: start + n] = 1
                last[row] = start + n - 1
            positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
            keep = torch.unique(last)  # only the positions whose logits are read: keeps memory small
            extra = {}
            if shared:
                extra["past_key_values"] = prefixes.for_batch(encoded[batch[0]][:shared], len(batch))
                mask = torch.cat([torch.ones(len(batch), shared, dtype=torch.long), mask], dim=1)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep.to(device), **extra).logits
            col = torch.searchsorted(keep, last)
            picked = logits[torch.arange(len(batch), device=logits.device), col.to(logits.device)]
            out[torch.tensor(batch)] = picked[:, letters.to(picked.device)].float().cpu()
    if world > 1:
        rows = [i for _, batch in batches for i in batch]
        for got, values in gather_from_processes((rows, out[rows].clone()), group):
            if got:
                out[torch.tensor(got)] = values
    return out


def score_mmlu(model, tokenizer, examples: Sequence[MMLUExample], batch_size: int = 8, max_len: int = 2048,
               progress: bool = True, group=None, prefix_cache: bool = False) -> dict:
    """Accuracy and loss of ``model`` on ``examples``.

    Returns ``accuracy`` (mean of per-subject accuracies, as qlora reports), ``accuracy_micro`` (over all
    questions), ``loss`` (mean cross entropy over the four letter logits; not qlora's language-model loss, see
    the module docstring), ``per_subject`` {subject:
    accuracy}, ``predictions`` (letter index per example) and ``n``.
    """
    if not examples:
        raise UsageError("no MMLU questions to score", "--max_mmlu_samples")
    logits = letter_logits(model, tokenizer, examples, batch_size, max_len, progress, group=group,
                           prefix_cache=prefix_cache)
    answers = torch.tensor([e.answer for e in examples])
    preds = logits.argmax(-1)
    loss = F.cross_entropy(logits, answers).item()
    hits: dict[str, list[bool]] = defaultdict(list)
    for e, p in zip(examples, preds.tolist()):
        hits[e.subject].append(p == e.answer)
    per_subject = {s: sum(h) / len(h) for s, h in sorted(hits.items())}
    accuracy = sum(per_subject.values()) / len(per_subject)
    micro = (preds == answers).float().mean().item()
    if not math.isfinite(loss):
        logger.warning("MMLU loss is not finite (%s)", loss)
    return {"accuracy": accuracy, "accuracy_micro": micro, "loss": loss, "per_subject": per_subject,
            "predictions": preds.tolist(), "n": len(examples)}
