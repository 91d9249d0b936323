"""Choosing a shape for a budget: the best subnets that fit a parameter or latency budget.

Candidates are every shape the loaded strategy offers (its depths x the loaded widths; without a
strategy, depths from ``--min_num_layer`` to the full depth at the ``--width_choice`` widths). Each is
scored by, in order of preference:

1. an evaluation metric from ``metrics.json`` (``--metrics_file``, default ``<output_dir>/metrics.json``;
   ``--budget_metric`` names it, e.g. ``mmlu_eval_accuracy`` or ``wikitext2_ppl``; keys are
   ``<metric>_l<layers>w<width>`` as the evaluation writes them). Perplexity and loss: lower is better;
   anything else: higher is better;
2. the strategy's calibration score of the depth (it exists for full width only; its direction is read
   from the scores themselves: removing layers makes a model worse, so a score that grows with the
   number of removed layers is a lower-is-better one).

A shape without a score ranks after the scored ones, larger first. ``--budget_params`` is a count
(``1.2e9``), a fraction of the full model (``0.6``) or a percentage (``60%``); ``--budget_latency_ms``
needs ``--latency_table`` (the json written by ``scripts/bench_latency.py``) and reads the column
``--latency_key`` of each shape. The fitting shapes are printed best first and written to
``<output_dir>/budget.json`` and ``budget.md``; with ``--export_dir`` the best one is exported (the flags are
read by the deployment stage, :mod:`amoeba.stages.deployment`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from amoeba.elastic import ElasticModel
from amoeba.errors import UsageError
from amoeba.export import stored_param_count
from amoeba.report import lower_is_better
from amoeba.run_folder import values_by_shape
from amoeba.shapes import Shapes
from amoeba.subnet import Subnet

logger = logging.getLogger(__name__)

PREFERRED_METRICS = ("mmlu_eval_accuracy", "mmlu_test_accuracy", "arc_easy_acc_norm", "arc_easy_acc",
                     "hellaswag_acc_norm", "piqa_acc", "wikitext2_ppl")


@dataclass
class Candidate:
    """One shape with its size, score and (when a table is given) latency."""

    label: str
    num_layers: int
    width: float
    params: int
    export_params: int
    param_ratio: float
    score: Optional[float] = None
    score_source: Optional[str] = None
    latency_ms: Optional[float] = None
    fits: bool = True


def parse_param_budget(text: str, full_params: int, flag: Optional[str] = None) -> int:
    """A parameter budget from ``1.2e9``, ``0.6`` (fraction of the full model) or ``60%``."""
    body = str(text).strip().replace("_", "").replace(",", "")
    try:
        if body.endswith("%"):
            value = float(body[:-1]) / 100.0 * full_params
        else:
            value = float(body)
            if 0 < value <= 1:
                value *= full_params
    except ValueError:
        raise UsageError(f"'{text}' is not a parameter count, a fraction or a percentage", flag) from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"'{text}' must be positive", flag)
    return int(value)


def exported_param_count(em: ElasticModel, subnet: Subnet, export_format: str = "exact") -> int:
    """Parameters the exported folder stores in ``export_format``: the subnet's own count for exact exports of
    per-layer widths; with ``padded``, every layer as wide as the widest kept one."""
    return stored_param_count(em, subnet, export_format)


def ranking_metric(metrics: dict, name: Optional[str] = None,
                   source: str = "the metrics") -> tuple[Optional[str], dict[str, float]]:
    """(metric name, {shape label: value}) that ranks shapes, from a metrics.json dict (read from ``source``):
    ``name``, else the first of :data:`PREFERRED_METRICS` it has, else its first metric by name. Values that are not
    finite numbers (NaN, inf) rank nothing and are left out; a ``name`` it lacks raises UsageError."""
    by_metric = values_by_shape(metrics)
    if name is None:
        name = next((p for p in PREFERRED_METRICS if p in by_metric), None)
        if name is None and by_metric:
            name = sorted(by_metric)[0]
    elif name not in by_metric:
        raise UsageError(f"{source} has no metric '{name}' (it has {sorted(by_metric) or 'none'})")
    return name, by_metric.get(name, {})


def strategy_scores(em: ElasticModel, strategy) -> tuple[dict[int, float], bool]:
    """({num_layers: calibration score}, higher_is_better) from the strategy's per-depth metric."""
    metric = dict(getattr(strategy, "metric", None) or {})
    if not metric:
        return {}, True
    ordered = [metric[m] for m in sorted(metric)]
    # More layers removed is worse: a score that rises with removals is lower-is-better (perplexity, loss).
    higher = not (len(ordered) > 1 and ordered[-1] > ordered[0])
    return {em.num_layers - int(m): float(v) for m, v in metric.items()}, higher


def read_latency_table(path: str, key: str) -> dict[str, float]:
    """{shape label: milliseconds} from a ``bench_latency.py`` json (column ``key``)."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UsageError(f"cannot read a latency table from {path}: {err}", "--latency_table") from None
    out = {label: float(r[key]) for label, r in rows.items() if isinstance(r, dict) and r.get(key) is not None}
    if not out:
        columns = sorted({k for r in rows.values() for k in r if k.endswith("_ms")})
        raise UsageError(f"{path} has no column '{key}' (columns: {', '.join(columns)})", "--latency_key")
    return out


def rank_candidates(shapes: Shapes, pairs: Sequence[tuple[int, float]], evaluated: dict[str, float],
                    metric_name: Optional[str], strategy=None, latencies: Optional[dict[str, float]] = None,
                    export_format: str = "exact") -> tuple[list[Candidate], bool]:
    """Every shape of ``pairs`` ((layers, width)) with its size, score and latency, best first; and whether a
    higher score is better.

    Scores: ``evaluated`` ({shape label: value} of ``metric_name``), else, with no evaluated metric at all, the
    strategy's calibration score of the depth (full width only)."""
    em = shapes.em
    full = em.param_count(em.full_subnet())
    calib, calib_higher = strategy_scores(em, strategy)
    latencies = latencies or {}
    out = []
    for n, w in pairs:
        subnet = shapes.subnet(n, w)
        params = em.param_count(subnet)
        c = Candidate(subnet.label, n, w, params, exported_param_count(em, subnet, export_format), params / full)
        if subnet.label in evaluated:
            c.score, c.score_source = evaluated[subnet.label], metric_name
        elif not evaluated and w == 1.0 and n in calib:
            c.score, c.score_source = calib[n], "calibration"
        c.latency_ms = latencies.get(subnet.label)
        out.append(c)

    higher = not lower_is_better(metric_name) if evaluated else calib_higher

    def order(c: Candidate):
        if c.score is None:
            return (1, -c.params)
        return (0, -c.score if higher else c.score)

    out.sort(key=order)
    return out, higher


def choose(candidates: list[Candidate], max_params: Optional[int], max_latency_ms: Optional[float]) -> list[Candidate]:
    """Mark which candidates fit; return the fitting ones (in ranking order)."""
    for c in candidates:
        c.fits = True
        if max_params is not None and c.export_params > max_params:
            c.fits = False
        if max_latency_ms is not None and (c.latency_ms is None or c.latency_ms > max_latency_ms):
            c.fits = False
    return [c for c in candidates if c.fits]


def markdown(rows: list[Candidate], info: dict) -> str:
    """A table of the given candidates."""
    metric = info.get("metric") or "score"
    lines = [f"| rank | shape | layers | width | parameters | of full | {metric} | latency ms |",
             "|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(rows, 1):
        score = "-" if c.score is None else f"{c.score:.4g}" + (" (calib)" if c.score_source == "calibration" else "")
        lat = "-" if c.latency_ms is None else f"{c.latency_ms:.3f}"
        lines.append(f"| {i} | {c.label} | {c.num_layers} | {c.width:g} | {c.export_params:,} | "
                     f"{c.export_params / info['full_params']:.3f} | {score} | {lat} |")
    return "\n".join(lines) + "\n"
