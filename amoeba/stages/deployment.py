"""Deployment from the command line: export one shape (``--export_dir``), or choose the best shape for a budget
(``--budget_params``, ``--budget_latency_ms``) and export that.

The surgery is :mod:`amoeba.export`'s and the ranking :mod:`amoeba.budget`'s; here the flags name the shape, the
folders an export must never overwrite, and what the export record says about its sources: the base model, the
strategy file (with its hash) and the adapter folder that was actually loaded.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from torch import nn

from amoeba.args import Arguments
from amoeba.budget import (Candidate, choose, markdown, parse_param_budget, rank_candidates, ranking_metric,
                           read_latency_table, strategy_scores)
from amoeba.elastic import ElasticModel
from amoeba.errors import UsageError, for_flag
from amoeba.export import export_subnet, file_sha256
from amoeba.files import write_json, write_text
from amoeba.run_folder import METRICS_FILE, read_metrics
from amoeba.shapes import Shapes
from amoeba.subnet import Subnet

logger = logging.getLogger(__name__)


def protected_paths(args: Arguments) -> list[tuple[str, str, str]]:
    """What an export of this run may never be nor contain, as ``(path, flag, what)`` for
    :func:`amoeba.export.check_export_target`: the run's ``--output_dir``, and the model, adapters and strategy it
    reads."""
    paths = [(args.train.output_dir, "--output_dir", "the run's own output folder")]
    model = args.model.model_name_or_path
    if model and Path(model).expanduser().exists():  # a hub id names no local folder
        paths.append((model, "--model_name_or_path", "the model being read"))
    if args.adapters.adapter_dir:
        paths.append((args.adapters.adapter_dir, "--adapter_dir", "the adapters being read"))
    if args.elastic.shrinking_file:
        paths.append((args.elastic.shrinking_file, "--shrinking_file", "the strategy file being read"))
    return paths


def export_provenance(args: Arguments, adapters_dir: Optional[Path]) -> dict[str, Any]:
    """Base model, strategy file (and its hash) and adapter folder of an export, for its record.
    ``adapters_dir``: the folder the adapters in the model were loaded from (or trained into); None without
    adapters."""
    shrinking_file = args.elastic.shrinking_file
    strategy_file = shrinking_file if shrinking_file and Path(shrinking_file).is_file() else None
    return {
        "base_model": args.model.model_name_or_path,
        "strategy_file": strategy_file,
        "strategy_sha256": file_sha256(strategy_file) if strategy_file else None,
        "adapters_dir": str(adapters_dir) if adapters_dir is not None else None,
        "shrinking_method": args.elastic.shrinking_method,
    }


def export_shapes(args: Arguments, em: ElasticModel, strategy) -> Shapes:
    """The shapes an export can have: the strategy's (its depths with ``calib_dp``, its loaded widths), or without a
    strategy the first layers at any uniform width."""
    return Shapes.under(em, strategy, args.elastic.shrinking_method == "calib_dp",
                        uniform_widths=() if strategy is not None else None)


def requested_shape(args: Arguments, num_layers: int) -> tuple[int, float]:
    """(layers, width) of the one shape ``--export_dir`` exports: the first of ``--eval_shapes``, or the first of
    ``--eval_num_layer``/``--eval_num_width`` (default: the full model)."""
    layers = args.eval_layers[0] if args.eval_layers else num_layers
    width = args.eval_widths[0] if args.eval_widths else 1.0
    if args.eval_shapes:
        layers, width = args.eval_shapes[0]
        if len(args.eval_shapes) > 1:
            logger.warning("--export_dir exports one shape: %d layers x width %g (the first of --eval_shapes)",
                           layers, width)
    elif (args.eval_layers and len(args.eval_layers) > 1) or (args.eval_widths and len(args.eval_widths) > 1):
        logger.warning("--export_dir exports one shape: %d layers x width %g (the first of each list)",
                       layers, width)
    return layers, width


def _export(args: Arguments, model: nn.Module, tokenizer, em: ElasticModel, subnet: Subnet,
            provenance: dict[str, Any]) -> Path:
    x = args.export
    return export_subnet(model, tokenizer, em, subnet, x.export_dir, overwrite=x.overwrite, provenance=provenance,
                         export_format=x.export_format, protected=protected_paths(args))


def export_from_args(args: Arguments, model: nn.Module, tokenizer, em: ElasticModel, strategy,
                     adapters_dir: Optional[Path] = None) -> Path:
    """``--export_dir``: export the shape :func:`requested_shape` names; a shape the strategy lacks is refused.
    ``adapters_dir``: where the model's adapters came from, for the record."""
    layers, width = requested_shape(args, em.num_layers)
    subnet = export_shapes(args, em, strategy).subnet(layers, width, layer_flag="--eval_num_layer",
                                                      width_flag="--eval_num_width")
    return _export(args, model, tokenizer, em, subnet, export_provenance(args, adapters_dir))


# ----------------------------------------------------------------------------------------------
# Choosing a shape for a budget
# ----------------------------------------------------------------------------------------------
def budget_candidates(args: Arguments, em: ElasticModel, strategy) -> tuple[list[Candidate], dict]:
    """Every shape the run can build, with size, score and latency, best first; plus a summary of the sources.

    The shapes: the strategy's depths x its loaded widths; without a strategy, every depth from the full one down
    to ``--min_num_layer`` at the uniform ``--width_choice`` widths."""
    b = args.budget
    metrics_path = Path(b.metrics_file) if b.metrics_file else Path(args.train.output_dir) / METRICS_FILE
    if b.metrics_file and not metrics_path.is_file():
        raise UsageError(f"no such file: {metrics_path}", "--metrics_file")
    metric_name, evaluated = None, {}
    if metrics_path.is_file():
        with for_flag("--budget_metric"):
            metric_name, evaluated = ranking_metric(read_metrics(metrics_path, "--metrics_file"), b.budget_metric,
                                                    str(metrics_path))
    if b.budget_metric and not evaluated:
        raise UsageError(f"no evaluation results for '{b.budget_metric}' (looked in {metrics_path})",
                         "--budget_metric")
    latencies = read_latency_table(b.latency_table, b.latency_key) if b.latency_table else {}
    shapes = Shapes.under(em, strategy, args.elastic.shrinking_method == "calib_dp",
                          uniform_widths=() if strategy is not None else args.width_choice)
    ranked, higher = rank_candidates(shapes, shapes.grid(args.elastic.min_num_layer), evaluated, metric_name,
                                     strategy, latencies, args.export.export_format)
    calibrated = bool(strategy_scores(em, strategy)[0])
    info = dict(metric=metric_name or ("calibration" if calibrated else None),
                higher_is_better=higher, metrics_file=str(metrics_path) if evaluated else None,
                latency_table=b.latency_table, latency_key=b.latency_key if b.latency_table else None,
                full_params=em.param_count(em.full_subnet()))
    return ranked, info


def _no_fit_message(candidates: list[Candidate], max_params: Optional[int], max_latency_ms: Optional[float]) -> str:
    """Why no shape fits: the budgets, each with the smallest or fastest shape there is."""
    smallest = min(candidates, key=lambda c: c.export_params)
    what = []
    if max_params is not None:
        what.append(f"{max_params:,} parameters (smallest shape {smallest.label}: {smallest.export_params:,})")
    if max_latency_ms is not None:
        timed = [c for c in candidates if c.latency_ms is not None]
        fastest = min(timed, key=lambda c: c.latency_ms) if timed else None
        what.append(f"{max_latency_ms} ms" + (f" (fastest shape {fastest.label}: {fastest.latency_ms:.3f} ms)"
                                              if fastest else " (no shape of this model is in the table)"))
    return f"no shape fits the budget of {' and '.join(what)}"


def run_budget(args: Arguments, model, tokenizer, em: ElasticModel, strategy,
               adapters_dir: Optional[Path] = None) -> list[Candidate]:
    """``--budget_params`` / ``--budget_latency_ms``: print the best fitting shapes, export the best on request
    (``--export_dir``; ``adapters_dir`` as for :func:`export_from_args`)."""
    b = args.budget
    if b.budget_latency_ms is not None and not b.latency_table:
        raise UsageError("a latency budget needs a measured table: pass --latency_table (the json of "
                         "scripts/bench_latency.py)", "--budget_latency_ms")
    if b.budget_latency_ms is not None and b.budget_latency_ms <= 0:
        raise UsageError(f"{b.budget_latency_ms} must be positive", "--budget_latency_ms")
    if b.budget_top < 1:
        raise UsageError(f"{b.budget_top} must be at least 1", "--budget_top")
    candidates, info = budget_candidates(args, em, strategy)
    max_params = parse_param_budget(b.budget_params, info["full_params"], "--budget_params") if b.budget_params \
        else None
    fitting = choose(candidates, max_params, b.budget_latency_ms)
    info.update(budget_params=max_params, budget_latency_ms=b.budget_latency_ms)
    out = Path(args.train.output_dir)
    write_json(out / "budget.json", {"budget": info, "fitting": [asdict(c) for c in fitting],
                                     "all": [asdict(c) for c in candidates]})
    if not fitting:
        raise UsageError(_no_fit_message(candidates, max_params, b.budget_latency_ms),
                         "--budget_params" if max_params is not None else "--budget_latency_ms")
    table = markdown(fitting[: b.budget_top], info)
    header = (f"Best shapes within the budget ({len(fitting)} of {len(candidates)} fit), ranked by "
              f"{info['metric'] or 'size'} ({'higher' if info['higher_is_better'] else 'lower'} is better):\n")
    write_text(out / "budget.md", header + "\n" + table)
    print(header + table)
    if args.export.export_dir:
        best = fitting[0]
        subnet = export_shapes(args, em, strategy).subnet(best.num_layers, best.width)
        provenance = export_provenance(args, adapters_dir)
        provenance["budget"] = {k: info[k] for k in ("budget_params", "budget_latency_ms", "metric", "latency_key")}
        provenance["budget"]["score"] = best.score
        _export(args, model, tokenizer, em, subnet, provenance)
        print(f"exported {best.label} to {args.export.export_dir}")
    return fitting
