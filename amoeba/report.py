"""Human-readable evaluation results: a markdown table of shapes x metrics and a frontier plot.

``results.md`` lists every evaluated shape with its parameter count and headline metrics;
``frontier.png`` plots each headline metric against parameters and joins the Pareto-optimal shapes
(the best score for at most that many parameters).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from amoeba.files import atomic_path, write_text

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = ("ppl", "perplexity", "loss")
_PARAMS_KEY = re.compile(r"^params_(l(\d+)w(.+))$")


@dataclass
class ReportRow:
    """One shape in the report: its label (``l24w0.875``), depth, width text, parameters and metrics."""

    label: str
    layers: int
    width: str
    params: int
    headline: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def row_from_result(result) -> ReportRow:
    """A :class:`ReportRow` from an evaluation result (``subnet``, ``params``, ``headline``, ``seconds``)."""
    sub = result.subnet
    width = "per-layer" if isinstance(sub.width, tuple) else f"{sub.width:g}"
    return ReportRow(sub.label, sub.num_layers, width, int(result.params), dict(result.headline),
                     dict(getattr(result, "seconds", {}) or {}))


def rows_from_metrics(metrics: dict, names: Sequence[str], skip: Sequence[str] = ()) -> list[ReportRow]:
    """Rows for the shapes recorded in a metrics.json dict (found by their ``params_<label>`` key), with the
    metrics ``names`` where present; labels in ``skip`` are left out."""
    rows = []
    for key, value in metrics.items():
        m = _PARAMS_KEY.match(key)
        if not m or m.group(1) in skip or not isinstance(value, (int, float)):
            continue
        label = m.group(1)
        headline = {n: float(metrics[f"{n}_{label}"]) for n in names
                    if isinstance(metrics.get(f"{n}_{label}"), (int, float))}
        rows.append(ReportRow(label, int(m.group(2)), m.group(3), int(value), headline))
    return rows


def sort_rows(rows: Sequence[ReportRow]) -> list[ReportRow]:
    """Deepest first, then widest."""
    def width_value(r: ReportRow) -> float:
        try:
            return float(r.width)
        except ValueError:
            return 0.0

    return sorted(rows, key=lambda r: (-r.layers, -width_value(r), r.label))


def lower_is_better(metric: str) -> bool:
    """True for perplexities and losses (the metric's name ends in, or has as a part, ppl, perplexity or loss);
    accuracies and every other metric are better when higher."""
    metric = metric.lower()
    return any(metric.endswith(s) or f"_{s}_" in metric for s in LOWER_IS_BETTER)


def metric_columns(results: Sequence) -> list[str]:
    """Headline metric names over all shapes, in first-seen order."""
    cols: dict[str, None] = {}
    for r in results:
        cols.update(dict.fromkeys(r.headline))
    return list(cols)


def _fmt(value: Optional[float], metric: str) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    if lower_is_better(metric):
        return f"{value:.3f}" if value < 1000 else f"{value:.4g}"
    return f"{value:.4f}"


def markdown_table(results: Sequence, total_params: Optional[int] = None) -> str:
    """A markdown table: one row per shape (layers, width, parameters, fraction of the full model, metrics)."""
    cols = metric_columns(results)
    head = ["shape", "layers", "width", "params (M)"] + (["params / full"] if total_params else []) + cols
    lines = ["| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in results:
        row = [r.label, str(r.layers), r.width, f"{r.params / 1e6:.2f}"]
        if total_params:
            row.append(f"{r.params / total_params:.3f}")
        row += [_fmt(r.headline.get(c), c) for c in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]], lower: bool) -> list[int]:
    """Indices of the points on the frontier (fewest parameters for a score), by increasing parameters."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1] if lower else -points[i][1]))
    front, best = [], None
    for i in order:
        y = points[i][1]
        if not math.isfinite(y):
            continue
        if best is None or (y < best if lower else y > best):
            front.append(i)
            best = y
    return front


def plot_metrics(cols: Sequence[str]) -> list[str]:
    """The metrics worth a panel: accuracies and perplexities; ``acc`` gives way to ``acc_norm`` of the
    same task, and losses stay in the table."""
    names = set(cols)
    return [c for c in cols if not c.endswith("_loss") and not (c.endswith("_acc") and f"{c}_norm" in names)]


def plot_frontier(results: Sequence, path: str | Path) -> Optional[Path]:
    """Write a PNG with one panel per plotted metric (score vs parameters); None when nothing to plot."""
    cols = plot_metrics(metric_columns(results))
    if not cols or not results:
        return None
    import matplotlib  # deferred: a slow import, only for the plot

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # after choosing the file-only backend

    n = len(cols)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, cols):
        pts = [(r.params / 1e6, r.headline.get(metric, float("nan"))) for r in results]
        labels = [r.label for r in results]
        lower = lower_is_better(metric)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        for (x, y), label in zip(pts, labels):
            if math.isfinite(y):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        front = pareto_front(pts, lower)
        if len(front) > 1:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red", zorder=2,
                    label="frontier")
            ax.legend(fontsize=7, loc="best")
        if lower and all(p[1] > 0 for p in pts if math.isfinite(p[1])) and "ppl" in metric:
            ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(metric + (" (lower is better)" if lower else ""))
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(output_dir: str | Path, results: Sequence, total_params: Optional[int] = None) -> dict:
    """Write ``results.md`` and ``frontier.png`` for ``results`` (:class:`ReportRow`) into ``output_dir``;
    return their paths."""
    output_dir = Path(output_dir)
    if not results:
        return {}
    table = markdown_table(results, total_params)
    text = "# Evaluation results\n\n" + table
    seconds = [r for r in results if getattr(r, "seconds", None)]
    if seconds:
        text += "\nWall time per shape (s): " + "; ".join(
            f"{r.label}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()) for r in seconds) + "\n"
    write_text(output_dir / "results.md", text)
    paths = {"table": output_dir / "results.md"}
    png = plot_frontier(results, output_dir / "frontier.png")
    if png is not None:
        paths["plot"] = png
    logger.info("results table: %s%s", paths["table"], f", plot: {png}" if png else "")
    return paths
