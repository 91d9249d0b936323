"""Measuring subnets: MMLU, WikiText-2 perplexity and lm-eval tasks, one shape at a time, into metrics.json.

Each shape runs inside ``em.use(subnet)`` on the one in-memory model, so nothing is copied
(:func:`evaluate_shape`). Results are keyed as the seed does (``<metric>_l<layers>w<width>``) and go to
``metrics.json`` (:class:`MetricsFile`: merged with what the file already holds, written after every shape, so
a run stopped later keeps what it measured); a table and a frontier plot come from :mod:`amoeba.report`.
lm-eval tasks run through :mod:`amoeba.lm_eval_runner`.

Under ``torchrun`` (several processes), MMLU questions and WikiText-2 windows of every shape are split among the
processes batch by batch and gathered (every process gets the one-process numbers); lm-eval, which runs on one
process per shape, takes the shapes round-robin (shape ``i`` on rank ``i % world``, :func:`gather_lm_eval`).
Rank 0 writes the files; the other ranks write nothing. Which shapes and metrics a command asks for is the
evaluation stage's (:mod:`amoeba.stages.evaluation`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from amoeba.distributed import gather_from_processes
from amoeba.elastic import ElasticModel
from amoeba.files import write_json
from amoeba.lm_eval_runner import LMEvalRunner
from amoeba.mmlu import score_mmlu, split_name
from amoeba.run_folder import metric_key, read_metrics
from amoeba.strategy import portable_path
from amoeba.subnet import Subnet
from amoeba.text_data import load_text, perplexity, token_windows

logger = logging.getLogger(__name__)

WIKITEXT2_SEQLEN = 2048  # the seed's window length
CALIBRATION_KEY = "strategy_calibration"  # metrics.json: how the strategy in use was calibrated
LM_EVAL_HEADLINE = ("acc", "acc_norm", "exact_match", "word_perplexity")  # shown in tables, in this order
METRIC_GROUPS = ("mmlu", "wikitext2", "lm_eval")


@dataclass
class ShapeResult:
    """Everything measured for one shape: ``metrics`` (all keys, unsuffixed) and ``headline`` (the
    ones a table shows), plus the parameter count and seconds per metric family."""

    subnet: Subnet
    params: int
    metrics: dict[str, float] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: "ShapeResult") -> None:
        """Take in what ``other`` measured on the same shape."""
        self.metrics.update(other.metrics)
        self.headline.update(other.headline)
        self.seconds.update(other.seconds)

    def finish(self) -> None:
        """The parameter count goes last, as every shape's final key."""
        self.metrics["params"] = float(self.params)


# ----------------------------------------------------------------------------------------------
# metrics.json
# ----------------------------------------------------------------------------------------------
def suffixed(metrics: dict, subnet: Subnet) -> dict:
    """``metrics`` keyed as the seed does: ``<metric>_l<layers>w<width>``."""
    return {metric_key(k, subnet.label): v for k, v in metrics.items()}


def finished_groups(existing: dict, label: str, mmlu_split: str, tasks: Sequence[str]) -> set[str]:
    """The metric groups (``mmlu``, ``wikitext2``, ``lm_eval``) that ``existing`` (metrics.json) already holds
    for the shape ``label``; lm-eval counts only when every task has its headline metric."""
    done = set()
    if f"mmlu_{mmlu_split}_accuracy_{label}" in existing:
        done.add("mmlu")
    if f"wikitext2_ppl_{label}" in existing:
        done.add("wikitext2")
    if tasks and all(any(f"{t}_{m}_{label}" in existing for m in LM_EVAL_HEADLINE) for t in tasks):
        done.add("lm_eval")
    return done


def reuse_recorded(res: "ShapeResult", existing: dict, groups: set[str], mmlu_split: str,
                    tasks: Sequence[str]) -> None:
    """Show the recorded values of the skipped metric ``groups`` in this run's table."""
    names = {"mmlu": [f"mmlu_{mmlu_split}_accuracy", "mmlu_loss"], "wikitext2": ["wikitext2_ppl"],
             "lm_eval": [f"{k}_{m}" for k in tasks for m in LM_EVAL_HEADLINE]}
    for group in ("mmlu", "wikitext2", "lm_eval"):
        for name in names[group] if group in groups else ():
            value = existing.get(f"{name}_{res.subnet.label}")
            if isinstance(value, (int, float)):
                res.headline[name] = float(value)


class MetricsFile:
    """``metrics.json`` of a run while an evaluation fills it.

    ``before`` is what the file held (laid under this run's metrics at the end), ``now`` what it holds now:
    :meth:`keep` writes a shape's metrics at once. Only the ``writer`` process (rank 0) writes. A file that is not
    a JSON object of metrics is refused before any work (UsageError naming ``flag``) and left as it is.
    """

    def __init__(self, path: str | os.PathLike, writer: bool = True, flag: Optional[str] = None):
        self.path = Path(path)
        self.writer = writer
        self.now = read_metrics(self.path, flag)
        self.before = dict(self.now)

    def record_calibration(self, calibration: dict) -> None:
        """Record what the reported subnets were chosen on (a record of an earlier strategy would mislead)."""
        if not self.writer:
            return
        if calibration:
            self.now[CALIBRATION_KEY] = calibration
        else:
            self.now.pop(CALIBRATION_KEY, None)
        self.before = dict(self.now)

    def keep(self, res: ShapeResult) -> None:
        """Write the shape's metrics now: a run that fails or is stopped later keeps what it measured."""
        if self.writer:
            self.now.update(suffixed(res.metrics, res.subnet))
            write_json(self.path, self.now)

    def finish(self, results: Sequence[ShapeResult]) -> dict:
        """Lay this run's metrics over what the file held before, in shape order, and write that; return the
        metrics of this run (keyed as in the file)."""
        run_metrics: dict = {}
        for res in results:
            run_metrics.update(suffixed(res.metrics, res.subnet))
        self.now = dict(self.before)
        self.now.update(run_metrics)
        if self.writer:
            write_json(self.path, self.now)
        return run_metrics


# ----------------------------------------------------------------------------------------------
# Measuring one shape
# ----------------------------------------------------------------------------------------------
def wikitext2_windows(model, tokenizer, data_dir: Optional[str] = None, limit: Optional[int] = None) -> torch.Tensor:
    """The WikiText-2 test text as consecutive windows of the seed's 2048 tokens (shorter when the model's
    positions are fewer); the first ``limit`` windows only when given."""
    max_pos = getattr(model.config, "max_position_embeddings", None) or WIKITEXT2_SEQLEN
    seqlen = min(WIKITEXT2_SEQLEN, int(max_pos))
    text = load_text("wikitext2", "test", data_dir)
    windows = token_windows(tokenizer, text, seqlen)
    if limit is not None and limit < windows.shape[0]:
        # The first windows, in order: a fixed, reproducible subset for quick runs.
        logger.warning("WikiText-2 test: only the first %d of %d windows (--max_wikitext2_windows)",
                       limit, windows.shape[0])
        windows = windows[:limit]
    logger.info("WikiText-2 test: %d windows of %d tokens", windows.shape[0], seqlen)
    return windows


def mmlu_shots(dataset: str) -> int:
    """Exemplars per MMLU prompt: 0 for ``mmlu-zs``, 5 otherwise (``mmlu-fs``, the seed's ``mmlu``)."""
    return 0 if dataset == "mmlu-zs" else 5


def evaluate_shape(model, tokenizer, em: ElasticModel, subnet: Subnet, *, mmlu_examples=None,
                   mmlu_split: str = "eval", wikitext_windows=None, lm_runner: Optional[LMEvalRunner] = None,
                   batch_size: int = 8, mmlu_max_len: int = 2048, mmlu_prefix_cache: bool = False, group=None,
                   progress: bool = True) -> ShapeResult:
    """Measure one shape with whatever is given (MMLU examples, WikiText-2 windows, an lm-eval runner).

    With ``group`` (a ``torch.distributed`` group whose members all call this for the same shape), MMLU
    questions and WikiText-2 windows are split among its processes and every process gets the whole result.
    """
    result = ShapeResult(subnet, em.param_count(subnet))
    with em.use(subnet), torch.no_grad():
        if mmlu_examples is not None:
            start = time.perf_counter()
            s = score_mmlu(model, tokenizer, mmlu_examples, batch_size=batch_size, max_len=mmlu_max_len,
                           progress=progress, group=group, prefix_cache=mmlu_prefix_cache)
            acc_key = f"mmlu_{mmlu_split}_accuracy"
            result.metrics.update({acc_key: s["accuracy"], "mmlu_loss": s["loss"],
                                   f"mmlu_{mmlu_split}_micro_accuracy": s["accuracy_micro"]})
            result.metrics.update({f"{acc_key}_{subj}": v for subj, v in s["per_subject"].items()})
            result.headline.update({acc_key: s["accuracy"], "mmlu_loss": s["loss"]})
            result.seconds["mmlu"] = time.perf_counter() - start
        if wikitext_windows is not None:
            start = time.perf_counter()
            ppl = perplexity(model, wikitext_windows, batch_size=batch_size, progress=progress, group=group)
            result.metrics["wikitext2_ppl"] = ppl
            result.headline["wikitext2_ppl"] = ppl
            result.seconds["wikitext2"] = time.perf_counter() - start
        if lm_runner is not None:
            start = time.perf_counter()
            flat, _ = lm_runner.run()
            result.metrics.update(flat)
            for task in lm_runner.tasks:
                found = False
                for metric in LM_EVAL_HEADLINE:
                    if f"{task}_{metric}" in flat:
                        result.headline[f"{task}_{metric}"] = flat[f"{task}_{metric}"]
                        found = True
                if not found:  # a task with other metrics: show them all but their standard errors
                    result.headline.update({k: v for k, v in flat.items()
                                            if k.startswith(f"{task}_") and "_stderr" not in k})
            result.seconds["lm_eval"] = time.perf_counter() - start
    return result


def strategy_calibration(strategy, path=None) -> dict:
    """What metrics.json records about the strategy in use: its file (name or working-directory-relative path)
    and how it was calibrated (the file's ``calibration`` records); {} when the strategy has no record."""
    records = getattr(strategy, "calibration", None) or {}
    if not records:
        return {}
    return {"strategy_file": portable_path(path or getattr(strategy, "source", None)),
            **{part: dict(record) for part, record in records.items()}}


def warn_if_reported_on_calibration_split(calibration: dict, mmlu_split: str) -> bool:
    """Warn (and return True) when the MMLU split reported is the one the strategy's layers were chosen on:
    those subnets were picked for doing well on exactly these questions."""
    layers = (calibration or {}).get("layers") or {}
    if layers.get("dataset") != "mmlu" or split_name(layers.get("split")) is None:
        return False
    if split_name(layers["split"]) != split_name(mmlu_split):
        return False
    logger.warning("!!! MMLU is reported on the %s split, the split the strategy's layers were calibrated on "
                   "(%s questions, metric %s): its accuracies are biased; report another split (--mmlu_split) or "
                   "calibrate on another (--calib_mmlu_split) !!!", split_name(mmlu_split),
                   layers.get("questions", "?"), layers.get("metric"))
    return True


def gather_lm_eval(results: list[ShapeResult], rank: int, world: int, group) -> list[ShapeResult]:
    """Every rank's lm-eval shapes merged into one list (shape ``i`` came from rank ``i % world``)."""
    mine = {i: results[i] for i in range(rank, len(results), world)}
    merged = list(results)
    for share in gather_from_processes(mine, group):
        for i, res in share.items():
            merged[i] = res
    return merged


def log_table(results: Sequence[ShapeResult]) -> None:
    """One log line per shape: its parameters and headline metrics."""
    for r in results:
        parts = [f"{k}={v:.4f}" if math.isfinite(v) else f"{k}={v}" for k, v in r.headline.items()]
        logger.info("%-14s params=%d %s", r.subnet.label, r.params, " ".join(parts))
