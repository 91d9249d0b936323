"""Stage 1a: which layers to drop at every depth, chosen by dynamic programming (DESIGN.md 1a).

The table follows the seed exactly. ``N`` candidate layers (the last ``--dp_keep_last_layer`` are never
removed), at most ``M = layers - --min_num_layer`` removed. ``d[n][m]`` is the best calibration score
with ``m`` layers removed among the last ``n`` candidates; at ``(n, m)`` the candidate removes layer
``N - n`` on top of the solution at ``(n-1, m-1)`` and replaces the solution at ``(n-1, m)`` only when
it scores strictly better. The result per ``m`` is a 0/1 mask over all layers.

Speed: every candidate at step ``n`` keeps layers ``0..N-n-1``, so the model runs once over the
calibration batches while the input hidden states of every layer are kept; a candidate whose first
removed layer is ``f`` then starts from the stored input of layer ``f`` and runs only the kept layers
after it. The layers are called with the keyword arguments captured in that full run (rotary
embeddings, attention masks), so this works on stock transformers models without knowing their
internals, and gives the same numbers as running each candidate from the embeddings (``naive=True``).

Also here: the ShortGPT baseline (Block Influence, :func:`block_influence`, :func:`shortgpt_masks`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amoeba.distributed import process_share
from amoeba.elastic import find_decoder, make_elastic
from amoeba.errors import UsageError
from amoeba.files import write_json, write_text
from amoeba.mmlu import answer_target_ids, answer_token_ids, encode_prompts
from amoeba.model_state import model_device
from amoeba.npy import save_npy
from amoeba.strategy import describe_calibration
from amoeba.subnet import Subnet
from amoeba.text_data import TEXT_CORPORA, is_local_text_file, window_nll

logger = logging.getLogger(__name__)

CALIB_DATASETS = ("mmlu",) + TEXT_CORPORA  # what --calib_dataset names (or a local text file)
MMLU_METRICS = ("acc", "loss", "letter_loss")
CALIB_METRICS = MMLU_METRICS + ("ppl",)  # text is always scored by perplexity


# ----------------------------------------------------------------------------------------------
# The dynamic program
# ----------------------------------------------------------------------------------------------
@dataclass
class DPResult:
    """The filled DP table and the per-depth answer.

    ``strategy``: float array ``[N+1, M+1, layers]`` of kept-layer masks over all layers (cells that
    cannot exist, ``m > n``, are all zero); ``metric``: ``d`` as float array ``[N+1, M+1]`` (``inf``/
    ``-inf`` where no subnet was scored); ``final``: the seed's ``{'strategy': {m: mask}, 'metric':
    {m: score}}`` for ``m = 1..M``, plus ``'calibration': {'layers': record}`` once the stage has run (how it
    was calibrated: dataset, split, metric, samples).
    """

    num_layers: int
    candidates: int
    max_removed: int
    keep_last: int
    higher_is_better: bool
    strategy: np.ndarray
    metric: np.ndarray
    final: dict
    evaluations: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def kept_layers(self, removed: int) -> list[int]:
        """Indices of the layers kept when ``removed`` layers are dropped."""
        if removed == 0:
            return list(range(self.num_layers))
        return [int(i) for i in np.flatnonzero(self.final["strategy"][removed] > 0.5)]


def dp_size(num_layers: int, min_num_layer: int, keep_last: int) -> tuple[int, int]:
    """``(N, M)``: removable candidate layers and the most layers removed; bad values raise UsageError."""
    if not 1 <= min_num_layer < num_layers:
        raise UsageError(f"{min_num_layer} must be at least 1 and smaller than the model's {num_layers} layers",
                         "--min_num_layer")
    if keep_last >= num_layers:
        raise UsageError(f"{keep_last} would keep all {num_layers} layers of the model", "--dp_keep_last_layer")
    n = num_layers - keep_last if keep_last > 0 else num_layers
    m = num_layers - min_num_layer
    if m > n:
        raise UsageError(f"{m} layers must go to reach {min_num_layer}, but only the first {n} may be removed "
                         f"(--dp_keep_last_layer {keep_last})", "--min_num_layer")
    return n, m


def select_layers_dp(num_layers: int, min_num_layer: int, keep_last: int,
                     score: Callable[[np.ndarray], float], higher_is_better: bool,
                     progress: bool = True) -> DPResult:
    """Fill the seed's DP table, scoring each candidate mask (over all layers) with ``score``."""
    n_cand, m_max = dp_size(num_layers, min_num_layer, keep_last)
    tail = np.ones(num_layers - n_cand)
    worst = -math.inf if higher_is_better else math.inf
    d = np.full((n_cand + 1, m_max + 1), worst, dtype=np.float64)
    masks = np.zeros((n_cand + 1, m_max + 1, n_cand), dtype=np.float64)
    masks[:, 0] = 1.0  # nothing removed yet: every candidate layer active

    def better(new: float, old: float) -> bool:
        if math.isnan(new):
            return False
        return new > old if higher_is_better else new < old

    evaluations = 0
    start = time.perf_counter()
    bar = tqdm(range(1, n_cand + 1), desc="layer DP", disable=not progress)
    for n in bar:
        for m in range(1, min(n, m_max) + 1):
            candidate = masks[n - 1, m - 1].copy()
            candidate[n_cand - n] = 0.0
            current = float(score(np.concatenate([candidate, tail])))
            evaluations += 1
            if better(current, d[n - 1, m]) or m == n:  # m == n: the only way to remove n of n layers
                d[n, m] = current
                masks[n, m] = candidate
            else:
                d[n, m] = d[n - 1, m]
                masks[n, m] = masks[n - 1, m]
        bar.set_postfix(best=f"{d[n, min(n, m_max)]:.4g}")
    seconds = time.perf_counter() - start
    full = np.concatenate([masks, np.broadcast_to(tail, masks.shape[:2] + tail.shape)], axis=2)
    impossible = np.arange(m_max + 1)[None, :] > np.arange(n_cand + 1)[:, None]
    full[impossible] = 0.0
    final = {"strategy": {m: full[n_cand, m].copy() for m in range(1, m_max + 1)},
             "metric": {m: float(d[n_cand, m]) for m in range(1, m_max + 1)}}
    return DPResult(num_layers, n_cand, m_max, max(keep_last, 0), higher_is_better, full, d, final,
                    evaluations, seconds)


# ----------------------------------------------------------------------------------------------
# Running subnets on the calibration set: naive (from the embeddings) or from cached hidden states
# ----------------------------------------------------------------------------------------------
class CalibrationMetric:
    """How a batch's final (normed) hidden states become a score. Subclasses define the three methods."""

    higher_is_better = False
    name = "metric"

    def batch_stats(self, hidden: torch.Tensor, batch: dict):  # pragma: no cover - interface
        """Statistics of one batch from its final normed hidden states ``[b, t, h]``."""
        raise NotImplementedError

    def finish(self, stats: list) -> float:  # pragma: no cover - interface
        """The score from all batches' statistics."""
        raise NotImplementedError


class PerplexityMetric(CalibrationMetric):
    """Perplexity of full token windows (lower is better)."""

    name = "ppl"

    def __init__(self, lm_head: nn.Module):
        self.lm_head = lm_head

    def batch_stats(self, hidden, batch):
        return window_nll(self.lm_head(hidden), batch["input_ids"])

    def finish(self, stats):
        nll = sum(s[0] for s in stats)
        count = sum(s[1] for s in stats)
        return math.exp(nll / count)


class MMLUMetric(CalibrationMetric):
    """MMLU scores from each question's hidden states at its last prompt token (and, for ``loss``, at the
    answer token after it).

    ``kind``: ``acc`` (mean of per-subject accuracies from the answer-letter logits, as
    :func:`amoeba.mmlu.score_mmlu` computes it; higher is better), ``loss`` (the original code's: the
    full-vocabulary language-model cross entropy on each question's ``targets``, the answer letter and the
    end-of-sequence token, averaged over the target tokens of each batch of ``batch_size`` consecutive
    questions, then over the batches; lower is better) or ``letter_loss`` (cross entropy over the four letter
    logits; lower is better). ``batch_size`` groups the questions as the original code's evaluation batches
    did; it need not be the batch size the scorer runs them in.
    """

    KINDS = MMLU_METRICS

    def __init__(self, lm_head: nn.Module, letters: Sequence[int], examples: Sequence, kind: str = "acc",
                 batch_size: int = 8, targets: Optional[Sequence[Sequence[int]]] = None):
        if kind not in self.KINDS:
            raise UsageError(f"'{kind}' does not apply to MMLU ({', '.join(self.KINDS)})", "--calib_metric")
        if kind == "loss" and (targets is None or len(targets) != len(examples)):
            raise ValueError("the language-model loss needs the target tokens of every question")
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size} must be at least 1", "--per_device_eval_batch_size")
        self.lm_head = lm_head
        self.letters = torch.tensor(list(letters))
        self.examples = list(examples)
        self.kind = kind
        self.batch_size = int(batch_size)
        self.targets = [list(t) for t in targets] if targets is not None else None
        self.higher_is_better = kind == "acc"
        self.name = {"acc": "mmlu_acc", "loss": "mmlu_loss", "letter_loss": "mmlu_letter_loss"}[kind]

    def batch_stats(self, hidden, batch):
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = batch["last"].to(hidden.device)
        if self.kind != "loss":
            logits = self.lm_head(hidden[rows, last])[:, self.letters.to(hidden.device)].float().cpu()
            return batch["index"], logits
        # Target j of a row is predicted at its last prompt position + j (the targets follow the prompt).
        nll = torch.zeros(hidden.shape[0], dtype=torch.float64)
        count = torch.zeros(hidden.shape[0], dtype=torch.long)
        for j in range(int(batch["targets"].shape[1])):
            target = batch["targets"][:, j]
            valid = target >= 0
            if not bool(valid.any()):
                continue
            sel = torch.nonzero(valid).reshape(-1)
            at = sel.to(hidden.device)
            logits = self.lm_head(hidden[at, last[at] + j]).float()
            loss = F.cross_entropy(logits, target[sel].to(logits.device), reduction="none")
            nll[sel] += loss.double().cpu()
            count[sel] += 1
        return batch["index"], nll, count

    def finish(self, stats):
        if self.kind == "loss":
            nll = torch.zeros(len(self.examples), dtype=torch.float64)
            count = torch.zeros(len(self.examples), dtype=torch.long)
            for index, part, n in stats:
                nll[index] = part
                count[index] = n
            # The original's mmlu_loss: each batch's mean over its target tokens, averaged over the batches.
            means = [float(nll[i: i + self.batch_size].sum() / count[i: i + self.batch_size].sum())
                     for i in range(0, len(self.examples), self.batch_size)]
            return sum(means) / len(means)
        logits = torch.empty(len(self.examples), 4)
        for index, part in stats:
            logits[index] = part
        answers = torch.tensor([e.answer for e in self.examples])
        if self.kind == "letter_loss":
            return float(F.cross_entropy(logits, answers))
        hits: dict[str, list[bool]] = defaultdict(list)
        for e, p in zip(self.examples, logits.argmax(-1).tolist()):
            hits[e.subject].append(p == e.answer)
        return float(sum(sum(h) / len(h) for h in hits.values()) / len(hits))


def _final_norm(decoder: nn.Module) -> nn.Module:
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise UsageError(f"{type(decoder).__name__} has no final norm; the layer DP supports Llama-family models")
    return norm


class LayerDropScorer:
    """Scores kept-layer masks on fixed calibration batches.

    ``naive=True`` runs every candidate through the whole (elastic) model from the embeddings.
    Otherwise the per-layer inputs of one full run are kept (on ``store_device``) and a candidate
    runs only from its first removed layer on.
    """

    def __init__(self, model: nn.Module, batches: list[dict], metric: CalibrationMetric, naive: bool = False,
                 store_device: Optional[torch.device] = None, progress: bool = True):
        self.model = model
        self.em = make_elastic(model)
        self.decoder = self.em.decoder
        self.layers = list(self.em.all_layers)
        self.norm = _final_norm(self.decoder)
        # Under torch.distributed each process scores its share of the batches; score() gathers the
        # per-batch statistics, so every process takes the same decisions as one process would.
        self.rank, self.world = process_share()
        self.batches = list(batches)[self.rank::self.world]
        self.metric = metric
        self.naive = naive
        self.device = model_device(model)
        self.higher_is_better = metric.higher_is_better
        self.calls = 0
        self.layer_calls = 0
        self.record: dict = {}  # how the calibration set was made (Stage 1's entry fills it in)
        self._inputs: list[list[torch.Tensor]] = []  # [batch][layer] input hidden states (+ final output)
        self._kwargs: list[list[dict]] = []
        self._positional: list[bool] = []
        self.store_device = store_device
        if not naive:
            self._capture(progress)

    # -- naive ------------------------------------------------------------------------------
    def _run_naive(self, mask: np.ndarray, batch: dict) -> torch.Tensor:
        with self.em.use(Subnet.from_mask(mask, 1.0)):
            out = self.decoder(**_model_inputs(batch, self.device), use_cache=False)
        self.layer_calls += int((mask > 0.5).sum())
        return out.last_hidden_state

    # -- cached -----------------------------------------------------------------------------
    def _capture(self, progress: bool) -> None:
        """One full run: keep every layer's input hidden states and keyword arguments."""
        store = self.store_device or self._choose_store_device()
        current: dict = {}
        handles = []

        def pre_hook(index):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                current["inputs"].append(hidden.detach().to(store))
                current["kwargs"].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
                current["positional"] = bool(args)
            return hook

        def last_hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            current["inputs"].append(hidden.detach().to(store))

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(self.layers[-1].register_forward_hook(last_hook))
        try:
            with torch.no_grad(), self.em.use(Subnet.full(len(self.layers))):
                for batch in tqdm(self.batches, desc="hidden states", disable=not progress, leave=False):
                    current.update(inputs=[], kwargs=[], positional=True)
                    self.decoder(**_model_inputs(batch, self.device), use_cache=False)
                    if len(current["inputs"]) != len(self.layers) + 1:
                        raise RuntimeError("the decoder did not call every layer once; cannot cache its inputs")
                    self._inputs.append(current["inputs"])
                    self._kwargs.append(current["kwargs"])
                    self._positional.append(current["positional"])
        finally:
            for h in handles:
                h.remove()
        self.store_device = store
        size = sum(t.numel() * t.element_size() for per in self._inputs for t in per)
        logger.info("cached %d layer inputs x %d batches (%.1f MB on %s)", len(self.layers) + 1, len(self.batches),
                    size / 2**20, store)

    def _choose_store_device(self) -> torch.device:
        """The model's device when the cached states fit comfortably in its free memory, else the CPU."""
        if self.device.type != "cuda":
            return self.device
        elem = next(self.model.parameters()).element_size()
        tokens = sum(int(b["input_ids"].numel()) for b in self.batches)
        need = tokens * self.model.config.hidden_size * (len(self.layers) + 1) * elem
        free, _ = torch.cuda.mem_get_info(self.device)
        if need < 0.5 * free:
            return self.device
        logger.info("keeping %.1f GB of cached hidden states in CPU memory", need / 2**30)
        return torch.device("cpu")

    def _run_cached(self, mask: np.ndarray, b: int) -> torch.Tensor:
        removed = np.flatnonzero(mask < 0.5)
        first = int(removed[0]) if removed.size else len(self.layers)
        hidden = self._inputs[b][first].to(self.device)
        for k in range(first + 1, len(self.layers)):
            if mask[k] < 0.5:
                continue
            kwargs = self._kwargs[b][k]
            out = self.layers[k](hidden, **kwargs) if self._positional[b] else \
                self.layers[k](hidden_states=hidden, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            self.layer_calls += 1
        return self.norm(hidden)

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, mask: np.ndarray) -> float:
        """The metric of the subnet keeping the layers where ``mask`` is 1."""
        mask = np.asarray(mask, dtype=np.float64).reshape(-1)
        if mask.shape[0] != len(self.layers):
            raise ValueError(f"mask over {mask.shape[0]} layers for a {len(self.layers)}-layer model")
        stats = []
        for b, batch in enumerate(self.batches):
            hidden = self._run_naive(mask, batch) if self.naive else self._run_cached(mask, b)
            stats.append(self.metric.batch_stats(hidden, batch))
        if self.world > 1:
            shares = [None] * self.world
            torch.distributed.all_gather_object(shares, stats)
            stats = [s for share in shares for s in share]
        self.calls += 1
        return self.metric.finish(stats)

    __call__ = score


def _model_inputs(batch: dict, device: torch.device) -> dict:
    out = {"input_ids": batch["input_ids"].to(device)}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            out[key] = batch[key].to(device)
    return out


# ----------------------------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------------------------
def text_batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    """Batches of equal-length token windows."""
    return [{"input_ids": windows[i: i + batch_size]} for i in range(0, windows.shape[0], batch_size)]


def mmlu_batches(tokenizer, examples: Sequence, batch_size: int, max_len: int,
                 targets: Optional[Sequence[Sequence[int]]] = None) -> list[dict]:
    """Right-padded prompt batches (longest first), with each row's last prompt position and its index.

    With ``targets`` (token ids per example), each prompt is followed by its targets, and the batch holds
    them as ``targets`` ``[rows, most targets]`` (-1 where a row has fewer)."""
    encoded = encode_prompts(tokenizer, [e.prompt for e in examples], max_len)
    tails = [list(t)[:-1] for t in targets] if targets is not None else [[] for _ in examples]  # the last
    # target is only predicted, never read as input
    order = sorted(range(len(encoded)), key=lambda i: (-(len(encoded[i]) + len(tails[i])), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        width = max(len(encoded[i]) + len(tails[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        last = torch.empty(len(rows), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = encoded[i] + tails[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            last[r] = len(encoded[i]) - 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "last": last,
                 "index": torch.tensor(rows)}
        if targets is not None:
            most = max(len(targets[i]) for i in rows)
            tgt = torch.full((len(rows), max(most, 1)), -1, dtype=torch.long)
            for r, i in enumerate(rows):
                tgt[r, : len(targets[i])] = torch.tensor(list(targets[i]), dtype=torch.long)
            batch["targets"] = tgt
        batches.append(batch)
    return batches


def mmlu_scorer(model: nn.Module, tokenizer, examples: Sequence, kind: str = "acc", group_size: int = 8,
                batch_size: int = 8, max_len: int = 2048, naive: bool = False,
                progress: bool = True) -> LayerDropScorer:
    """A scorer of kept-layer masks on the MMLU ``examples`` by ``kind`` (:class:`MMLUMetric`; ``loss`` groups the
    questions as the original code's evaluation batches of ``group_size``), run ``batch_size`` questions at a time,
    prompts cut to their last ``max_len`` tokens."""
    lm_head = model.get_output_embeddings()
    letters = answer_token_ids(tokenizer)
    targets = [answer_target_ids(tokenizer, e.answer, letters) for e in examples] if kind == "loss" else None
    metric = MMLUMetric(lm_head, letters, examples, kind=kind, batch_size=group_size, targets=targets)
    batches = mmlu_batches(tokenizer, examples, batch_size, max_len, targets=targets)
    return LayerDropScorer(model, batches, metric, naive=naive, progress=progress)


def text_scorer(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, naive: bool = False,
                progress: bool = True) -> LayerDropScorer:
    """A scorer of kept-layer masks by the perplexity of the token ``windows`` [n, seqlen], ``batch_size`` windows
    at a time."""
    metric = PerplexityMetric(model.get_output_embeddings())
    return LayerDropScorer(model, text_batches(windows, batch_size), metric, naive=naive, progress=progress)


def mmlu_calibration_examples(pool: Sequence, num_batches: int, batch_size: int,
                              max_samples: Optional[int] = None) -> list:
    """The questions the layer DP calibrates on, taken as the original code takes them: its evaluation
    loader runs through the split in order (subject by subject) in batches of ``batch_size`` and stops after
    ``num_batches`` (``--num_calib_sample``) batches, so the first ``num_batches * batch_size`` questions;
    with ``max_samples`` (``--max_mmlu_samples``) the original evaluates the first ``max_samples`` questions
    whole instead."""
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1", "--per_device_eval_batch_size")
    if max_samples is not None:
        if max_samples < 1:
            raise UsageError(f"{max_samples} must be at least 1", "--max_mmlu_samples")
        want, flag = max_samples, "--max_mmlu_samples"
    else:
        if num_batches < 1:
            raise UsageError(f"{num_batches} must be at least 1", "--num_calib_sample")
        want, flag = num_batches * batch_size, "--num_calib_sample"
    if want > len(pool):
        logger.warning("%s asks for %d MMLU questions, the split has %d: calibrating on all of them", flag, want,
                       len(pool))
    return list(pool[:want])


def calibration_metric_name(dataset: str, calib_metric: Optional[str]) -> str:
    """``acc``, ``loss``, ``letter_loss`` (MMLU) or ``ppl`` (text); a metric that does not fit the data raises
    UsageError."""
    if dataset == "mmlu":
        if calib_metric in (None, "acc"):
            return "acc"
        if calib_metric in ("loss", "letter_loss"):
            return calib_metric
        raise UsageError(f"'{calib_metric}' does not apply to MMLU (acc, loss or letter_loss)", "--calib_metric")
    if calib_metric in ("acc", "letter_loss"):
        raise UsageError(f"{calib_metric} needs --calib_dataset mmlu; text data ({dataset}) is scored by "
                         "perplexity", "--calib_metric")
    return "ppl"


def check_calib_dataset(name: str) -> str:
    """The normalised dataset name (a known corpus or a local file); anything else raises UsageError."""
    key = str(name).lower()
    if key in CALIB_DATASETS:
        return key
    if is_local_text_file(name):
        if not Path(name).is_file():
            raise UsageError(f"no such file: {name}", "--calib_dataset")
        return str(name)
    raise UsageError(f"unknown calibration dataset '{name}'; known: {', '.join(CALIB_DATASETS)}, or a local "
                     ".txt/.json/.jsonl/.jsonl.gz file", "--calib_dataset")


def dataset_record_name(dataset: str) -> str:
    """A calibration dataset as a record names it: a corpus name, or a local file's name (no machine path)."""
    return dataset if dataset in CALIB_DATASETS else Path(dataset).name


def dp_table_rows(result: DPResult) -> list[dict]:
    """One row per depth: layers kept and removed, and the score."""
    rows = []
    for m in range(1, result.max_removed + 1):
        kept = result.kept_layers(m)
        rows.append({"num_layers": result.num_layers - m, "removed": m,
                     "removed_layers": sorted(set(range(result.num_layers)) - set(kept)),
                     "kept_layers": kept, "score": result.final["metric"][m]})
    return rows


def write_dp_outputs(output_dir: Path, result: DPResult) -> None:
    """``final_strategy.npy`` (seed layout), ``full_strategy.npy`` and ``metric.npy`` (numeric arrays),
    and ``dp_table.json`` / ``dp_table.md`` (readable)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    save_npy(output_dir / "final_strategy.npy", result.final)
    save_npy(output_dir / "full_strategy.npy", result.strategy.astype(np.float32))
    save_npy(output_dir / "metric.npy", result.metric)
    rows = dp_table_rows(result)
    write_json(output_dir / "dp_table.json", {
        "num_layers": result.num_layers, "candidates": result.candidates, "max_removed": result.max_removed,
        "keep_last": result.keep_last, "higher_is_better": result.higher_is_better,
        "evaluations": result.evaluations, "seconds": round(result.seconds, 3), **result.info, "depths": rows})
    metric = result.info.get("metric", "score")
    record = result.final.get("calibration", {}).get("layers")
    calibration = f"\n\nCalibration: {describe_calibration(record)}." if record else ""
    write_depth_table(output_dir, f"Layer selection ({metric}, {'higher' if result.higher_is_better else 'lower'} "
                      "is better)", f"{result.num_layers} layers, candidates 0..{result.candidates - 1}, "
                      f"{result.evaluations} subnets scored in {result.seconds:.1f} s.{calibration}", metric, rows)


def write_depth_table(output_dir: Path, title: str, intro: str, metric: str, rows: Sequence[dict]) -> None:
    """``dp_table.md``: one line per depth (layers, removed, score, removed layers)."""
    lines = [f"# {title}", "", intro, "", f"| layers | removed | {metric} | removed layers |",
             "| ---: | ---: | ---: | --- |"]
    lines += [f"| {r['num_layers']} | {r['removed']} | {r['score']:.4f} | {', '.join(map(str, r['removed_layers']))} |"
              for r in rows]
    write_text(output_dir / "dp_table.md", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def block_influence(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """ShortGPT's Block Influence of every decoder layer: ``1 - cos(input, output)`` averaged over tokens."""
    layers = find_decoder(model).layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
            sums[i] += cos.double().sum().cpu()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    device = model_device(model)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start: start + batch_size].to(device)
            model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sums / count).numpy()


def shortgpt_masks(bi: np.ndarray, min_layers: int, keep_last: int = 0) -> dict[int, np.ndarray]:
    """{removed m: mask} dropping the ``m`` layers of lowest Block Influence (never the last ``keep_last``)."""
    bi = np.asarray(bi, dtype=np.float64)
    num_layers = bi.shape[0]
    order = [int(i) for i in np.argsort(bi, kind="stable") if i < num_layers - keep_last]
    out = {}
    for m in range(1, num_layers - min_layers + 1):
        mask = np.ones(num_layers)
        mask[order[:m]] = 0.0
        out[m] = mask
    return out


def first_layers_masks(num_layers: int, min_layers: int) -> dict[int, np.ndarray]:
    """{removed m: mask} keeping the first ``num_layers - m`` layers (the seed's ``first_layers``)."""
    out = {}
    for m in range(1, num_layers - min_layers + 1):
        mask = np.zeros(num_layers)
        mask[: num_layers - m] = 1.0
        out[m] = mask
    return out
