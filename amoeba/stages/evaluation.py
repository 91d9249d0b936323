"""Evaluation from the command line: the shapes (``--eval_num_layer`` x ``--eval_num_width``, or ``--eval_shapes``)
and metrics (``--do_mmlu_eval``, ``--do_eval_wikitext2``, ``--do_lm_eval``) the flags ask for.

:func:`run_evaluation` is a list of named steps: plan (shapes, metric groups, what an earlier run recorded),
inputs (MMLU questions, WikiText-2 windows, the lm-eval runner), the shared pass (MMLU and WikiText-2 of every
shape, every process taking part), the lm-eval pass (shapes dealt out round-robin) and the report. The measuring
itself is :mod:`amoeba.evaluation`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from amoeba.args import Arguments
from amoeba.distributed import is_first_process, process_share, results_group
from amoeba.elastic import ElasticModel
from amoeba.errors import UsageError
from amoeba.evaluation import (METRIC_GROUPS, MetricsFile, ShapeResult, evaluate_shape, finished_groups,
                               gather_lm_eval, log_table, mmlu_shots, reuse_recorded, strategy_calibration,
                               warn_if_reported_on_calibration_split, wikitext2_windows)
from amoeba.lm_eval_runner import LMEvalRunner, LMEvalTasks
from amoeba.mmlu import load_mmlu
from amoeba.model_state import eval_mode
from amoeba.report import row_from_result, rows_from_metrics, sort_rows, write_report
from amoeba.run_folder import METRICS_FILE
from amoeba.shapes import Shapes
from amoeba.sharding import is_sharded
from amoeba.subnet import Subnet, width_key

logger = logging.getLogger(__name__)


def check_lm_eval_tasks(args: Arguments) -> None:
    """Resolve ``--do_lm_eval_task`` and check that every task's data can be had, before any model is loaded
    (raises UsageError naming the task otherwise)."""
    tasks = LMEvalTasks(args.lm_eval_tasks, args.data_dir, args.evaluation.lm_eval_include_path)
    try:
        tasks.check_data()
    finally:
        tasks.close()


def evaluation_shapes(args: Arguments, em: ElasticModel, strategy=None) -> list[Subnet]:
    """The subnets to evaluate (depths x widths, in the given order), checked against the model/strategy.

    Every problem is reported at once in one :class:`UsageError`.
    """
    e = args.elastic
    if args.eval_shapes:
        pairs = [(d, width_key(w)) for d, w in args.eval_shapes]
    else:
        pairs = [(d, width_key(w)) for d in (args.eval_layers or (em.num_layers,))
                 for w in (args.eval_widths or (1.0,))]
    depths = tuple(dict.fromkeys(d for d, _ in pairs))
    widths = tuple(dict.fromkeys(w for _, w in pairs))
    # the widths of the strategy's plans when it has them, else uniform widths of --width_choice
    shapes = Shapes.under(em, strategy, e.shrinking_method == "calib_dp", uniform_widths=args.width_choice,
                          uniform_name="--width_choice")
    problems = []
    if e.enable_shrinking:
        bad = [d for d in depths if not e.min_num_layer <= d <= em.num_layers]
        if bad:
            problems.append(f"--eval_num_layer: {', '.join(map(str, bad))} outside [--min_num_layer "
                            f"{e.min_num_layer}, {em.num_layers} layers]")
    else:
        bad = [d for d in depths if d != em.num_layers]
        if bad:
            problems.append(f"--eval_num_layer: {', '.join(map(str, bad))} asked without --enable_shrinking "
                            f"(the model runs all {em.num_layers} layers)")
    narrow = [w for w in widths if w != 1.0]
    if narrow and not e.shrinkable_width:
        problems.append(f"--eval_num_width: {', '.join(f'{w:g}' for w in narrow)} asked without "
                        "--shrinkable_width")
    elif narrow:
        try:
            shapes.check_widths(widths, "--eval_num_width")
        except UsageError as err:
            problems.append(str(err))
    if problems:
        raise UsageError("; ".join(problems))
    return [shapes.subnet(d, w, layer_flag="--eval_num_layer", width_flag="--eval_num_width") for d, w in pairs]


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------
@dataclass
class EvaluationPlan:
    """What this run measures: the ``shapes``, the metric ``groups`` asked for, per shape the groups ``skip``
    (recorded in metrics.json by an earlier run of the same command, ``--eval_skip_existing``), and ``need``: the
    groups some shape still lacks."""

    shapes: list[Subnet]
    mmlu_split: str
    tasks: list[str]
    groups: set[str]
    skip: dict[str, set[str]]
    need: set[str]
    batch_size: int


@dataclass
class EvaluationInputs:
    """What the metrics are computed on, loaded once for every shape (None: not needed)."""

    mmlu_examples: Optional[list] = None
    windows: Optional[torch.Tensor] = None
    runner: Optional[LMEvalRunner] = None

    def close(self) -> None:
        """Release the lm-eval runner's rendered task folder."""
        if self.runner is not None:
            self.runner.close()


@dataclass
class Processes:
    """The processes taking part: ``group`` (None in a single-process run), this ``rank`` and the ``world``."""

    group: Optional[object] = None
    rank: int = 0
    world: int = 1
    lead: bool = True  # False on the other processes of a lockstep evaluation (each measures everything)

    @property
    def writer(self) -> bool:
        """True on the process that writes the files (rank 0)."""
        return self.rank == 0 and self.lead


def plan_evaluation(args: Arguments, shapes: list[Subnet], strategy, metrics: MetricsFile,
                    procs: Processes) -> EvaluationPlan:
    """The metric groups the flags ask for of ``shapes``, and what metrics.json already holds of them (decided
    once, before this run writes anything, alike on every rank); records the strategy's calibration in
    metrics.json."""
    e = args.evaluation
    groups = {g for g, on in zip(METRIC_GROUPS, (e.do_mmlu_eval, e.do_eval_wikitext2, e.do_lm_eval)) if on}
    tasks = list(args.lm_eval_tasks) if e.do_lm_eval else []
    calibration = strategy_calibration(strategy, args.elastic.shrinking_file)
    metrics.record_calibration(calibration)
    if e.do_mmlu_eval and procs.writer:
        warn_if_reported_on_calibration_split(calibration, e.mmlu_split)
    skip = {s.label: finished_groups(metrics.now, s.label, e.mmlu_split, tasks) & groups if e.eval_skip_existing
            else set() for s in shapes}
    if procs.group is not None:
        torch.distributed.barrier(group=procs.group)
    if e.eval_skip_existing:
        logger.info("resuming: recorded metric groups per shape: %s",
                    {k: sorted(v) for k, v in skip.items() if v} or "none")
    need = {g for g in groups if any(g not in done for done in skip.values())}
    return EvaluationPlan(shapes, e.mmlu_split, tasks, groups, skip, need,
                          batch_size=int(args.train.per_device_eval_batch_size or 8))


def load_inputs(args: Arguments, model, tokenizer, plan: EvaluationPlan) -> EvaluationInputs:
    """The MMLU questions, WikiText-2 windows and lm-eval runner that some shape still needs."""
    e = args.evaluation
    inputs = EvaluationInputs()
    if "mmlu" in plan.need:
        inputs.mmlu_examples = load_mmlu(plan.mmlu_split, mmlu_shots(e.mmlu_dataset), args.data_dir,
                                         e.max_mmlu_samples)
        logger.info("MMLU %s (%s): %d questions", plan.mmlu_split, e.mmlu_dataset, len(inputs.mmlu_examples))
    if "wikitext2" in plan.need:
        inputs.windows = wikitext2_windows(model, tokenizer, args.data_dir, e.max_wikitext2_windows)
    if "lm_eval" in plan.need:  # on every rank, so a bad task name stops every rank alike
        inputs.runner = LMEvalRunner(model, tokenizer, args.lm_eval_tasks, args.data_dir, batch_size=plan.batch_size,
                                     limit=e.lm_eval_limit, include_path=e.lm_eval_include_path,
                                     prefix_cache=e.lm_eval_prefix_cache)
    return inputs


def measure_shared(args: Arguments, model, tokenizer, em: ElasticModel, plan: EvaluationPlan,
                   inputs: EvaluationInputs, metrics: MetricsFile, procs: Processes) -> list[ShapeResult]:
    """MMLU and WikiText-2 of every shape, every process taking part in every shape (nothing waits on lm-eval);
    a shape without lm-eval work is finished and written here."""
    results = []
    for subnet in tqdm(plan.shapes, desc="shapes", disable=len(plan.shapes) < 2 or not procs.writer):
        logger.info("evaluating %s (%d layers, width %s)", subnet.label, subnet.num_layers, subnet.width)
        done = plan.skip[subnet.label]
        res = evaluate_shape(model, tokenizer, em, subnet,
                             mmlu_examples=None if "mmlu" in done else inputs.mmlu_examples,
                             mmlu_split=plan.mmlu_split,
                             wikitext_windows=None if "wikitext2" in done else inputs.windows,
                             batch_size=plan.batch_size, mmlu_max_len=args.evaluation.mmlu_source_max_len,
                             mmlu_prefix_cache=args.evaluation.mmlu_prefix_cache, group=procs.group,
                             progress=procs.writer)
        reuse_recorded(res, metrics.now, done, plan.mmlu_split, plan.tasks)
        results.append(res)
        if inputs.runner is None or "lm_eval" in done:
            res.finish()
        metrics.keep(res)
    return results


def measure_lm_eval(model, tokenizer, em: ElasticModel, plan: EvaluationPlan, inputs: EvaluationInputs,
                    results: list[ShapeResult], metrics: MetricsFile, procs: Processes) -> list[ShapeResult]:
    """The lm-eval tasks of this rank's shapes (shape ``i`` on rank ``i % world``), then every rank's results
    gathered."""
    for i in range(procs.rank, len(plan.shapes), procs.world):
        subnet = plan.shapes[i]
        if "lm_eval" in plan.skip[subnet.label]:
            continue  # recorded, and finished in the shared pass
        logger.info("lm-eval on %s (%d layers, width %s)", subnet.label, subnet.num_layers, subnet.width)
        results[i].add(evaluate_shape(model, tokenizer, em, subnet, lm_runner=inputs.runner,
                                      batch_size=plan.batch_size))
        results[i].finish()
        metrics.keep(results[i])
    if procs.group is not None:
        results = gather_lm_eval(results, procs.rank, procs.world, procs.group)
    return results


def write_evaluation_report(out_dir: Path, em: ElasticModel, results: list[ShapeResult], metrics: MetricsFile) -> None:
    """``results.md`` and ``frontier.png``: every shape metrics.json knows (earlier runs' too), with this run's
    metric names."""
    for res in results:
        logger.info("%s: %s", res.subnet.label, ", ".join(f"{k}={v:.4g}" for k, v in res.headline.items()))
    rows = [row_from_result(r) for r in results]
    names = list(dict.fromkeys(k for r in results for k in r.headline))
    rows += rows_from_metrics(metrics.now, names, skip=[r.label for r in rows])
    write_report(out_dir, sort_rows(rows), total_params=em.param_count(em.full_subnet()))
    log_table(results)


def run_evaluation(args: Arguments, model, tokenizer, em: ElasticModel, strategy=None) -> dict:
    """Evaluate every requested shape with every requested metric; write metrics.json, results.md and
    frontier.png into ``--output_dir``. Returns the metrics of this run, keyed as in metrics.json.

    Under ``torchrun`` every process calls this: MMLU and WikiText-2 are split within each shape, lm-eval
    shapes are dealt out round-robin, rank 0 writes the files and every rank returns the same metrics.
    """
    e = args.evaluation
    out_dir = Path(args.train.output_dir)
    metrics = MetricsFile(out_dir / METRICS_FILE, flag="--output_dir")  # a damaged file fails before any work
    shapes = evaluation_shapes(args, em, strategy)
    if not (e.do_mmlu_eval or e.do_eval_wikitext2 or e.do_lm_eval):
        logger.info("no evaluation metric requested (--do_mmlu_eval, --do_eval_wikitext2, --do_lm_eval); the "
                    "held-out loss of --do_eval belongs to training runs")
        return {}
    if is_sharded(model):
        # A sharded layer runs only when every process runs it: each process measures everything, in step with
        # the others, and the first one writes.
        procs = Processes(None, 0, 1, lead=is_first_process())
    else:
        group = results_group()
        procs = Processes(group, *process_share(group))
    metrics.writer = procs.writer
    if procs.world > 1:
        logger.info("evaluating %d shapes on %d processes (rank %d): MMLU/WikiText-2 split within each shape, "
                    "lm-eval shapes %s here", len(shapes), procs.world, procs.rank,
                    [s.label for s in shapes[procs.rank::procs.world]] if e.do_lm_eval else "none")
    plan = plan_evaluation(args, shapes, strategy, metrics, procs)
    inputs = load_inputs(args, model, tokenizer, plan)
    try:
        with eval_mode(model):  # dropout off, MoE router deterministic
            results = measure_shared(args, model, tokenizer, em, plan, inputs, metrics, procs)
            if inputs.runner is not None:
                results = measure_lm_eval(model, tokenizer, em, plan, inputs, results, metrics, procs)
    finally:
        inputs.close()
    run_metrics = metrics.finish(results)
    if procs.writer:
        write_evaluation_report(out_dir, em, results, metrics)
    return run_metrics
