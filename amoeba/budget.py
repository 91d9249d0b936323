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
``<output_dir>/budget.json`` and ``budget.md``; with ``--export_dir`` the best one is exported.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from amoeba.args import shown, width_key
from amoeba.elastic import ElasticModel
from amoeba.errors import UsageError
from amoeba.files import write_json, write_text
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


def parse_param_budget(text: str, full_params: int, flag: str = "--budget_params") -> int:
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
    from amoeba.export import stored_param_count

    return stored_param_count(em, subnet, export_format)


def candidate_shapes(em: ElasticModel, strategy, args) -> list[tuple[int, float]]:
    """(layers, width) pairs the run can build: the strategy's depths x the loaded widths."""
    t = args.train
    masks = getattr(strategy, "layer_masks", None) if t.shrinking_method == "calib_dp" else None
    if masks:
        depths = sorted({em.num_layers - int(m) for m in masks}, reverse=True)
    else:
        depths = list(range(em.num_layers, max(1, min(t.min_num_layer, em.num_layers)) - 1, -1))
    if strategy is not None and em.width_plans:
        widths = sorted(set(em.width_plans) | {1.0}, reverse=True)
    elif strategy is not None:
        widths = [1.0]
    else:
        widths = sorted({width_key(w) for w in args.width_choice} | {1.0}, reverse=True)
    return [(n, w) for n in depths for w in widths]


def read_metrics(path: Path, name: Optional[str], flag: str = "--metrics_file") -> tuple[Optional[str], dict]:
    """(metric name, {label: value}) from an evaluation ``metrics.json``.

    A file that is not UTF-8 JSON holding an object raises UsageError naming ``flag``; values that are not
    finite numbers (NaN, inf) rank nothing and are left out."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a metrics file: it is not text (not UTF-8)", flag) from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not a metrics file: not valid JSON ({err.msg}, line {err.lineno} column "
                         f"{err.colno})", flag) from None
    except (ValueError, RecursionError) as err:  # a number too long to convert; nesting too deep
        raise UsageError(f"{path} is not a metrics file: not valid JSON ({shown(str(err) or 'nested too deeply')})",
                         flag) from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}", flag) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a json object of metrics", flag)
    key_re = re.compile(r"^(?P<metric>.+)_(?P<label>l\d+w[0-9.]+)$")
    by_metric: dict[str, dict[str, float]] = {}
    for key, value in data.items():
        m = key_re.match(key)
        if not m or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            continue
        if math.isfinite(value):
            by_metric.setdefault(m["metric"], {})[m["label"]] = value
    if name is None:
        name = next((p for p in PREFERRED_METRICS if p in by_metric), None)
        if name is None and by_metric:
            name = sorted(by_metric)[0]
    elif name not in by_metric:
        raise UsageError(f"{path} has no metric '{name}' (it has {sorted(by_metric) or 'none'})", "--budget_metric")
    return name, by_metric.get(name, {})


def lower_is_better(metric: str) -> bool:
    """Perplexity and loss are better when lower; accuracies when higher."""
    return any(s in metric.lower() for s in ("ppl", "perplexity", "loss"))


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


def rank_candidates(em: ElasticModel, strategy, args) -> tuple[list[Candidate], dict]:
    """Every candidate shape with size, score and latency, best first; plus a summary of the sources."""
    from amoeba.export import resolve_subnet

    t = args.train
    full = em.param_count(em.full_subnet())
    metrics_path = Path(t.metrics_file) if t.metrics_file else Path(t.output_dir) / "metrics.json"
    if t.metrics_file and not metrics_path.is_file():
        raise UsageError(f"no such file: {metrics_path}", "--metrics_file")
    metric_name, evaluated = (read_metrics(metrics_path, t.budget_metric) if metrics_path.is_file()
                              else (None, {}))
    if t.budget_metric and not evaluated:
        raise UsageError(f"no evaluation results for '{t.budget_metric}' (looked in {metrics_path})",
                         "--budget_metric")
    calib, calib_higher = strategy_scores(em, strategy)
    latencies = read_latency_table(t.latency_table, t.latency_key) if t.latency_table else {}

    out = []
    for n, w in candidate_shapes(em, strategy, args):
        subnet = resolve_subnet(em, strategy, n, w, t.shrinking_method)
        params = em.param_count(subnet)
        c = Candidate(subnet.label, n, w, params, exported_param_count(em, subnet, t.export_format), params / full)
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
    info = dict(metric=metric_name or ("calibration" if calib else None), higher_is_better=higher,
                metrics_file=str(metrics_path) if evaluated else None, latency_table=t.latency_table,
                latency_key=t.latency_key if t.latency_table else None, full_params=full)
    return out, info


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


def run_budget(args, model, tokenizer, em: ElasticModel, strategy) -> list[Candidate]:
    """``--budget_params`` / ``--budget_latency_ms``: print the best fitting shapes, export the best on request."""
    t = args.train
    if t.budget_latency_ms is not None and not t.latency_table:
        raise UsageError("a latency budget needs a measured table: pass --latency_table (the json of "
                         "scripts/bench_latency.py)", "--budget_latency_ms")
    if t.budget_latency_ms is not None and t.budget_latency_ms <= 0:
        raise UsageError(f"{t.budget_latency_ms} must be positive", "--budget_latency_ms")
    if t.budget_top < 1:
        raise UsageError(f"{t.budget_top} must be at least 1", "--budget_top")
    candidates, info = rank_candidates(em, strategy, args)
    max_params = parse_param_budget(t.budget_params, info["full_params"]) if t.budget_params else None
    fitting = choose(candidates, max_params, t.budget_latency_ms)
    info.update(budget_params=max_params, budget_latency_ms=t.budget_latency_ms)
    out = Path(t.output_dir)
    write_json(out / "budget.json", {"budget": info, "fitting": [asdict(c) for c in fitting],
                                     "all": [asdict(c) for c in candidates]})
    if not fitting:
        smallest = min(candidates, key=lambda c: c.export_params)
        what = []
        if max_params is not None:
            what.append(f"{max_params:,} parameters (smallest shape {smallest.label}: {smallest.export_params:,})")
        if t.budget_latency_ms is not None:
            timed = [c for c in candidates if c.latency_ms is not None]
            fastest = min(timed, key=lambda c: c.latency_ms) if timed else None
            what.append(f"{t.budget_latency_ms} ms" + (f" (fastest shape {fastest.label}: {fastest.latency_ms:.3f} ms)"
                                                        if fastest else " (no shape of this model is in the table)"))
        raise UsageError(f"no shape fits the budget of {' and '.join(what)}",
                         "--budget_params" if max_params is not None else "--budget_latency_ms")
    table = markdown(fitting[: t.budget_top], info)
    header = (f"Best shapes within the budget ({len(fitting)} of {len(candidates)} fit), ranked by "
              f"{info['metric'] or 'size'} ({'higher' if info['higher_is_better'] else 'lower'} is better):\n")
    write_text(out / "budget.md", header + "\n" + table)
    print(header + table)
    if t.export_dir:
        from amoeba.export import export_provenance, export_subnet, protected_paths, resolve_subnet

        best = fitting[0]
        subnet = resolve_subnet(em, strategy, best.num_layers, best.width, t.shrinking_method)
        provenance = export_provenance(args, model)
        provenance["budget"] = {k: info[k] for k in ("budget_params", "budget_latency_ms", "metric", "latency_key")}
        provenance["budget"]["score"] = best.score
        export_subnet(model, tokenizer, em, subnet, t.export_dir, overwrite=t.overwrite, provenance=provenance,
                      export_format=t.export_format, protected=protected_paths(args))
        print(f"exported {best.label} to {t.export_dir}")
    return fitting
