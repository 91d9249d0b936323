"""Evaluation of any subnet: MMLU, WikiText-2 perplexity and lm-eval tasks, over a grid of shapes.

``--eval_num_layer`` x ``--eval_num_width`` name the shapes (default: the full model). Each shape runs
inside ``em.use(subnet)`` on the one in-memory model, so nothing is copied. Results go to
``output_dir/metrics.json`` keyed as the seed does (``<metric>_l<layers>w<width>``, merged with what the
file already holds, written after every shape), plus a table (``results.md``) and a frontier plot
(``frontier.png``) from :mod:`amoeba.report`.

lm-eval tasks run through lm-eval's own ``HFLM`` wrapped around the elastic model. A task defined in
``--lm_eval_include_path`` (the user's own lm-eval task configs) comes from there; else ``arc_easy``,
``piqa``, ``hellaswag`` and ``mmlu`` read the offline data directory when there is one (task configs in
:mod:`amoeba.lm_eval_tasks`); every other task is lm-eval's stock task from the hub. Tasks are resolved,
and with the hub offline their data looked up, before any model is loaded (:func:`check_lm_eval_tasks`).

Under ``torchrun`` (several processes), MMLU questions and WikiText-2 windows of every shape are split
among the processes batch by batch and gathered (every process gets the one-process numbers); lm-eval,
which runs on one process per shape, takes the shapes round-robin (shape ``i`` on rank ``i % world``).
Rank 0 gathers everything and writes the files; the other ranks write nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from amoeba.args import width_key
from amoeba.elastic import ElasticModel, subnet_for
from amoeba.errors import UsageError
from amoeba.files import write_json
from amoeba.subnet import Subnet
from amoeba.text_data import gather_from_processes

logger = logging.getLogger(__name__)

WIKITEXT2_SEQLEN = 2048  # the seed's window length
METRICS_FILE = "metrics.json"
CALIBRATION_KEY = "strategy_calibration"  # metrics.json: how the strategy in use was calibrated
LM_EVAL_HEADLINE = ("acc", "acc_norm", "exact_match", "word_perplexity")  # shown in tables, in this order


@dataclass
class ShapeResult:
    """Everything measured for one shape: ``metrics`` (all keys, unsuffixed) and ``headline`` (the
    ones a table shows), plus the parameter count and seconds per metric family."""

    subnet: Subnet
    params: int
    metrics: dict[str, float] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
def available_widths(args, em: ElasticModel, strategy) -> tuple[float, ...]:
    """Width ratios that can be evaluated: the strategy's (as applied to ``em``) or ``--width_choice``."""
    if em.width_plans:
        return tuple(sorted({1.0, *em.width_plans}, reverse=True))
    return tuple(sorted({width_key(w) for w in args.width_choice} | {1.0}, reverse=True))


def layer_masks_for(args, strategy) -> Optional[dict]:
    """The strategy's kept-layer masks {removed: mask} with ``--shrinking_method calib_dp``, else None."""
    if args.train.shrinking_method == "calib_dp" and strategy is not None:
        masks = getattr(strategy, "layer_masks", None)
        return dict(masks) if masks else None
    return None


def evaluation_shapes(args, em: ElasticModel, strategy=None) -> list[Subnet]:
    """The subnets to evaluate (depths x widths, in the given order), checked against the model/strategy.

    Every problem is reported at once in one :class:`UsageError`.
    """
    t = args.train
    if args.eval_shapes:
        pairs = [(d, width_key(w)) for d, w in args.eval_shapes]
    else:
        pairs = [(d, width_key(w)) for d in (args.eval_layers or (em.num_layers,))
                 for w in (args.eval_widths or (1.0,))]
    depths = tuple(dict.fromkeys(d for d, _ in pairs))
    widths = tuple(dict.fromkeys(w for _, w in pairs))
    problems = []
    if t.enable_shrinking:
        bad = [d for d in depths if not t.min_num_layer <= d <= em.num_layers]
        if bad:
            problems.append(f"--eval_num_layer: {', '.join(map(str, bad))} outside [--min_num_layer "
                            f"{t.min_num_layer}, {em.num_layers} layers]")
    else:
        bad = [d for d in depths if d != em.num_layers]
        if bad:
            problems.append(f"--eval_num_layer: {', '.join(map(str, bad))} asked without --enable_shrinking "
                            f"(the model runs all {em.num_layers} layers)")
    narrow = [w for w in widths if w != 1.0]
    if narrow and not t.shrinkable_width:
        problems.append(f"--eval_num_width: {', '.join(f'{w:g}' for w in narrow)} asked without "
                        "--shrinkable_width")
    elif narrow:
        allowed = available_widths(args, em, strategy)
        bad = [w for w in widths if w not in allowed]
        if bad:
            where = "the strategy's widths" if em.width_plans else "--width_choice"
            msg = (f"--eval_num_width: {', '.join(f'{w:g}' for w in bad)} not among {where} "
                   f"({', '.join(f'{w:g}' for w in allowed)})")
            have = strategy.widths() if strategy is not None and hasattr(strategy, "widths") else []
            extra = [w for w in have if w not in allowed]
            if extra:
                msg += f"; the file also has {', '.join(f'{w:g}' for w in extra)}: add them to --width_choice"
            problems.append(msg)
    if problems:
        raise UsageError("; ".join(problems))
    masks = layer_masks_for(args, strategy)
    return [subnet_for(em, d, w, masks, flag="--eval_num_layer") for d, w in pairs]


# ----------------------------------------------------------------------------------------------
# metrics.json
# ----------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> dict:
    """The metrics already in ``path`` ({} if none); a file that is not a JSON object is refused."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} exists but is not readable JSON ({err}); move it away to start afresh",
                         "--output_dir") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} exists but does not hold a JSON object", "--output_dir")
    return data


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


def _reuse_recorded(res: "ShapeResult", existing: dict, groups: set[str], mmlu_split: str,
                    tasks: Sequence[str]) -> None:
    """Show the recorded values of the skipped metric ``groups`` in this run's table."""
    names = {"mmlu": [f"mmlu_{mmlu_split}_accuracy", "mmlu_loss"], "wikitext2": ["wikitext2_ppl"],
             "lm_eval": [f"{k}_{m}" for k in tasks for m in LM_EVAL_HEADLINE]}
    for group in ("mmlu", "wikitext2", "lm_eval"):
        for name in names[group] if group in groups else ():
            value = existing.get(f"{name}_{res.subnet.label}")
            if isinstance(value, (int, float)):
                res.headline[name] = float(value)


def suffixed(metrics: dict, subnet: Subnet) -> dict:
    """``metrics`` keyed as the seed does: ``<metric>_l<layers>w<width>``."""
    return {f"{k}_{subnet.label}": v for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# lm-eval
# ----------------------------------------------------------------------------------------------
def lm_eval_keys(results: dict) -> dict[str, float]:
    """Flatten lm-eval's ``results["results"]`` into ``<task>_<metric>`` floats (filters other than
    ``none`` are kept as a suffix; aliases and non-numeric entries are dropped)."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}_{metric}" if filt == "none" else f"{task}_{metric}_{filt}"
            out[name] = float(value)
    return out


_MANAGERS: dict = {}


def _task_manager(include_path: Optional[str] = None):
    """lm-eval's index of its own tasks, plus the task configs in ``include_path`` when given (which, as in
    lm-eval, take precedence over stock tasks of the same name). Built once per process and folder: it parses
    thousands of YAML files."""
    if include_path not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[include_path] = TaskManager(include_path=include_path)
    return _MANAGERS[include_path]


def _hub_offline() -> bool:
    """True when ``datasets`` may not reach the hub (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line error."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the data had to come from the network and could not"."""
    errors: list[type[BaseException]] = [ConnectionError]
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.exceptions.ConnectionError)
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.TransportError)
    return tuple(errors)


def _inside(path, folder: str) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder)


class LMEvalTasks:
    """Where each requested lm-eval task comes from, decided before any model is loaded:

    1. a config in ``--lm_eval_include_path`` (the user's own lm-eval task YAMLs, taken as lm-eval's own
       ``include_path`` takes them: they may reference stock tasks and ``!function`` helpers next to them);
    2. else, with a data directory, this project's offline config (:data:`amoeba.lm_eval_tasks.LOCAL_TASKS`),
       rendered into a temporary folder;
    3. else lm-eval's stock task, whose data comes from the Hugging Face hub (or its cache).

    ``managers`` pairs each lm-eval ``TaskManager`` with the names it serves. Unknown names raise UsageError
    with the closest known names; :meth:`check_data` finds tasks whose data cannot be had.
    """

    def __init__(self, tasks: Sequence[str], data_dir: Optional[str], include_path: Optional[str] = None):
        from amoeba.lm_eval_tasks import LOCAL_TASKS, render_tasks

        self.tasks = list(dict.fromkeys(tasks))
        if not self.tasks:
            raise UsageError("no lm-eval task given", "--do_lm_eval_task")
        if include_path is not None and (not include_path or not Path(include_path).is_dir()):
            raise UsageError(f"no such folder: '{include_path}'", "--lm_eval_include_path")
        self.include_path = str(Path(include_path).resolve()) if include_path else None
        self.data_dir = data_dir
        self.managers: list[tuple[object, list[str]]] = []
        self._tmp: Optional[str] = None
        shipped = [t for t in self.tasks if data_dir and t in LOCAL_TASKS]
        # lm-eval's index (with the user's folder): only built when a task may come from there (it takes seconds).
        self._manager = None
        if self.include_path or len(shipped) < len(self.tasks):
            self._manager = _task_manager(self.include_path)
        self.user = [t for t in self.tasks if self._in_include_path(t)]
        self.local = [t for t in shipped if t not in self.user]
        self.hub = [t for t in self.tasks if t not in self.user and t not in self.local]
        if self.hub:
            self._refuse_unknown()
        if self.user or self.hub:
            self.managers.append((self._manager, [t for t in self.tasks if t in self.user or t in self.hub]))
        if self.local:
            from lm_eval.tasks import TaskManager

            self._tmp = tempfile.mkdtemp(prefix="amoeba_lm_eval_")
            try:
                render_tasks(self.local, data_dir, self._tmp)
            except BaseException:
                self.close()
                raise
            # Only the rendered folder: the offline configs must not be shadowed by the stock ones.
            self.managers.append((TaskManager(include_path=self._tmp, include_defaults=False), self.local))
        logger.info("lm-eval tasks: %s", "; ".join(
            f"{what} {', '.join(names)}" for what, names in (("from --lm_eval_include_path:", self.user),
                                                          ("offline, from the data directory:", self.local),
                                                          ("lm-eval's own:", self.hub)) if names))

    def _in_include_path(self, name: str) -> bool:
        """True when ``name`` (a task, group or tag) is defined by a config in ``--lm_eval_include_path``."""
        if not self.include_path:
            return False
        manager = self._manager
        entry = manager.task_index.get(name)
        if entry is None:
            return False
        if entry.yaml_path is None:  # a tag: defined by the tasks that carry it
            return any(_inside(getattr(manager.task_index.get(t), "yaml_path", None), self.include_path)
                       for t in entry.tags)
        return _inside(entry.yaml_path, self.include_path)

    def _refuse_unknown(self) -> None:
        manager = self._manager
        known = set(manager.all_tasks)
        unknown = [t for t in self.hub if t not in known]
        if not unknown:
            return
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hints.append(f"'{name}'" + (f" (closest: {', '.join(close)})" if close else ""))
        where = (f" (not in lm-eval's tasks nor in the configs of {self.include_path}; a YAML there that does not "
                 "parse is skipped)" if self.include_path else "")
        raise UsageError(f"unknown lm-eval task {'; '.join(hints)}{where}", "--do_lm_eval_task")

    def check_data(self) -> None:
        """Load every task that does not come from the rendered offline folder, so that one without its data
        fails here, with one line naming it and how to supply it, not as a traceback after the model is loaded:
        the user's own configs always (they are local and their mistakes are best found early), lm-eval's stock
        tasks when the hub is offline (they can then only come from the cache)."""
        offline = _hub_offline()
        names = self.user + (self.hub if offline else [])
        if not names:
            return
        for name in [t for t in self.tasks if t in names]:
            try:
                self._manager.load([name])
            except Exception as err:  # noqa: BLE001 - any failure to build the task is the user's to fix
                logger.debug("lm-eval task %s does not load", name, exc_info=True)
                raise self.unavailable([name], err) from None

    def unavailable(self, names: Sequence[str], err: BaseException) -> UsageError:
        """The one-line error for the tasks ``names`` whose data or config failed with ``err``: what failed,
        and how to supply the task instead."""
        from amoeba.lm_eval_tasks import LOCAL_TASKS

        names = list(names)
        which = f"lm-eval task{'s' if len(names) > 1 else ''} {', '.join(names)}"
        own = all(t in self.user for t in names)
        flag = "--lm_eval_include_path" if own else "--do_lm_eval_task"
        offline = _hub_offline()
        # Offline, a stock dataset that is not cached fails with ConnectionError or, on some paths, FileNotFoundError.
        if not (isinstance(err, _connection_errors()) or (offline and not own and isinstance(err, FileNotFoundError))):
            source = f" from {self.include_path}" if own else ""
            return UsageError(f"the {which}{source} does not load: {type(err).__name__}: {_reason(err)}", flag)
        where = (" from the Hugging Face hub, which is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), and nothing is "
                 "cached" if offline else "")
        if own:
            how = f"point its config in {self.include_path} at local files"
        else:
            how = (f"this project ships offline configs for {', '.join(LOCAL_TASKS)} only: give a task config over "
                   "local files with --lm_eval_include_path DIR (see README)")
            if any(t in LOCAL_TASKS for t in names) and not self.data_dir:
                how = (f"set --data_dir (or AMOEBA_DATA_DIR) to an offline data directory, which this project's "
                       f"configs for {', '.join(LOCAL_TASKS)} read, or give a task config over local files with "
                       "--lm_eval_include_path DIR (see README)")
        return UsageError(f"the {which} cannot get its data{where} ({_reason(err)}); {how}", flag)

    def close(self) -> None:
        """Remove the rendered task folder."""
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def check_lm_eval_tasks(args) -> None:
    """Resolve ``--do_lm_eval_task`` and check that every task's data can be had, before any model is loaded
    (raises UsageError naming the task otherwise)."""
    tasks = LMEvalTasks(args.lm_eval_tasks, args.data_dir, args.train.lm_eval_include_path)
    try:
        tasks.check_data()
    finally:
        tasks.close()


def _quiet_in_memory_model_warnings() -> None:
    """Drop lm-eval's two warnings about being handed a model object instead of a name: passing the in-memory
    elastic model, in one process, is how this project uses lm-eval on purpose, so they never concern the user."""
    from amoeba import DropMessage

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, DropMessage) for f in hf_logger.filters):
        hf_logger.addFilter(DropMessage("`pretrained` model kwarg is not of type `str`",
                                        "Passed an already-initialized model through `pretrained`"))


class LMEvalRunner:
    """Runs lm-eval tasks on the in-memory model through lm-eval's ``HFLM`` (one wrapper for all shapes).

    Where each task comes from is :class:`LMEvalTasks`'s decision (the user's ``--lm_eval_include_path``
    configs, this project's offline configs, or lm-eval's stock tasks). Unknown names raise UsageError with
    the closest known names; a task whose data cannot be fetched raises UsageError naming it.
    """

    def __init__(self, model, tokenizer, tasks: Sequence[str], data_dir: Optional[str], batch_size: int = 8,
                 limit: Optional[int] = None, num_fewshot: Optional[int] = None,
                 include_path: Optional[str] = None):
        if limit is not None and limit < 1:
            raise UsageError(f"{limit} must be at least 1", "--lm_eval_limit")
        self.sources = LMEvalTasks(tasks, data_dir, include_path)
        self.tasks = self.sources.tasks
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.managers = self.sources.managers
        self.samples: dict = {}  # lm-eval's "n-samples" of the last run: {task: {original, effective}}
        from lm_eval.models.huggingface import HFLM

        _quiet_in_memory_model_warnings()
        try:
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        except BaseException:
            self.close()
            raise

    def run(self) -> tuple[dict[str, float], dict]:
        """Evaluate every task on the model's current subnet: (flat metrics, lm-eval's raw results)."""
        import lm_eval

        flat, raw = {}, {}
        for manager, names in self.managers:
            try:
                with _as_local_rank_zero():
                    out = lm_eval.simple_evaluate(model=self.lm, tasks=names, task_manager=manager,
                                                  limit=self.limit, num_fewshot=self.num_fewshot,
                                                  log_samples=False, bootstrap_iters=1000)
            except _connection_errors() as err:  # the data had to come from the network and could not
                logger.debug("lm-eval tasks %s could not get their data", names, exc_info=True)
                raise self.sources.unavailable(names, err) from None
            if out is None:  # non-zero ranks of a distributed run get nothing back
                continue
            raw.update(out["results"])
            self.samples.update(out.get("n-samples", {}))
            flat.update(lm_eval_keys(out["results"]))
        return flat, raw

    def close(self) -> None:
        """Remove the rendered task folder."""
        self.sources.close()


@contextlib.contextmanager
def _as_local_rank_zero():
    """Run lm-eval as the only process: ``simple_evaluate`` returns results only where ``LOCAL_RANK`` is 0,
    and under ``torchrun`` a rank's lm-eval shapes are its own, run with a single-process ``HFLM``."""
    before = os.environ.get("LOCAL_RANK")
    if before is None or before == "0":
        yield
        return
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        os.environ["LOCAL_RANK"] = before


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
RESULT_TIMEOUT = datetime.timedelta(hours=24)  # a rank may wait while others run long lm-eval shapes


def evaluation_group():
    """A gloo group over all processes for the evaluation's (small, pickled) results, or None in a
    single-process run. Its own long timeout: a rank without lm-eval shapes waits for the others at the
    final gather, which may take longer than the default group's timeout (``--ddp_timeout``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=RESULT_TIMEOUT)


# ----------------------------------------------------------------------------------------------
# The evaluation run
# ----------------------------------------------------------------------------------------------
def _wikitext2_windows(args, model, tokenizer) -> torch.Tensor:
    from amoeba.text_data import load_text, token_windows

    max_pos = getattr(model.config, "max_position_embeddings", None) or WIKITEXT2_SEQLEN
    seqlen = min(WIKITEXT2_SEQLEN, int(max_pos))
    text = load_text("wikitext2", "test", args.data_dir)
    windows = token_windows(tokenizer, text, seqlen)
    limit = args.train.max_wikitext2_windows
    if limit is not None and limit < windows.shape[0]:
        # The first windows, in order: a fixed, reproducible subset for quick runs.
        logger.warning("WikiText-2 test: only the first %d of %d windows (--max_wikitext2_windows)",
                       limit, windows.shape[0])
        windows = windows[:limit]
    logger.info("WikiText-2 test: %d windows of %d tokens", windows.shape[0], seqlen)
    return windows


def _mmlu_shots(dataset: str) -> int:
    return 0 if dataset == "mmlu-zs" else 5


def evaluate_shape(model, tokenizer, em: ElasticModel, subnet: Subnet, *, mmlu_examples=None,
                   mmlu_split: str = "eval", wikitext_windows=None, lm_runner: Optional[LMEvalRunner] = None,
                   batch_size: int = 8, mmlu_max_len: int = 2048, group=None,
                   progress: bool = True) -> ShapeResult:
    """Measure one shape with whatever is given (MMLU examples, WikiText-2 windows, an lm-eval runner).

    With ``group`` (a ``torch.distributed`` group whose members all call this for the same shape), MMLU
    questions and WikiText-2 windows are split among its processes and every process gets the whole result.
    """
    from amoeba.mmlu import score_mmlu

    result = ShapeResult(subnet, em.param_count(subnet))
    with em.use(subnet), torch.no_grad():
        if mmlu_examples is not None:
            start = time.perf_counter()
            s = score_mmlu(model, tokenizer, mmlu_examples, batch_size=batch_size, max_len=mmlu_max_len,
                           progress=progress, group=group)
            acc_key = f"mmlu_{mmlu_split}_accuracy"
            result.metrics.update({acc_key: s["accuracy"], "mmlu_loss": s["loss"],
                                   f"mmlu_{mmlu_split}_micro_accuracy": s["accuracy_micro"]})
            result.metrics.update({f"{acc_key}_{subj}": v for subj, v in s["per_subject"].items()})
            result.headline.update({acc_key: s["accuracy"], "mmlu_loss": s["loss"]})
            result.seconds["mmlu"] = time.perf_counter() - start
        if wikitext_windows is not None:
            from amoeba.text_data import perplexity

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


def run_evaluation(args, model, tokenizer, em: ElasticModel, strategy=None) -> dict:
    """Evaluate every requested shape with every requested metric; write metrics.json, results.md and
    frontier.png into ``--output_dir``. Returns the metrics of this run, keyed as in metrics.json.

    Under ``torchrun`` every process calls this: MMLU and WikiText-2 are split within each shape, lm-eval
    shapes are dealt out round-robin, rank 0 writes the files and every rank returns the same metrics.
    """
    from amoeba.report import row_from_result, rows_from_metrics, sort_rows, write_report

    from amoeba.args import resolve_mmlu_split

    t = args.train
    mmlu_split = resolve_mmlu_split(t)
    out_dir = Path(t.output_dir)
    metrics_path = out_dir / METRICS_FILE
    existing = read_metrics(metrics_path)  # fail before any work if the file is damaged
    shapes = evaluation_shapes(args, em, strategy)
    batch_size = int(t.per_device_eval_batch_size or 8)
    wants = t.do_mmlu_eval or t.do_eval_wikitext2 or t.do_lm_eval
    if not wants:
        logger.info("no evaluation metric requested (--do_mmlu_eval, --do_eval_wikitext2, --do_lm_eval); the "
                    "held-out loss of --do_eval belongs to training runs")
        return {}

    group = evaluation_group()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if group else (0, 1)
    writer = rank == 0
    calibration = strategy_calibration(strategy, t.shrinking_file)
    if writer:  # what the reported subnets were chosen on; a record of an earlier strategy would mislead
        if calibration:
            existing[CALIBRATION_KEY] = calibration
        else:
            existing.pop(CALIBRATION_KEY, None)
    if t.do_mmlu_eval and writer:
        warn_if_reported_on_calibration_split(calibration, mmlu_split)
    if world > 1:
        logger.info("evaluating %d shapes on %d processes (rank %d): MMLU/WikiText-2 split within each shape, "
                    "lm-eval shapes %s here", len(shapes), world, rank,
                    [s.label for s in shapes[rank::world]] if t.do_lm_eval else "none")
    tasks = list(args.lm_eval_tasks) if t.do_lm_eval else []
    # Resuming: what metrics.json holds is decided once, before this run writes anything (every rank alike).
    wanted = {g for g, on in (("mmlu", t.do_mmlu_eval), ("wikitext2", t.do_eval_wikitext2),
                              ("lm_eval", t.do_lm_eval)) if on}
    skip = {s.label: finished_groups(existing, s.label, mmlu_split, tasks) & wanted if t.eval_skip_existing
            else set() for s in shapes}
    if group is not None:
        torch.distributed.barrier(group=group)
    if t.eval_skip_existing:
        logger.info("resuming: recorded metric groups per shape: %s",
                    {k: sorted(v) for k, v in skip.items() if v} or "none")
    need = {g for g in wanted if any(g not in done for done in skip.values())}  # what some shape still lacks
    mmlu_examples = None
    if "mmlu" in need:
        from amoeba.mmlu import load_mmlu

        mmlu_examples = load_mmlu(mmlu_split, _mmlu_shots(t.mmlu_dataset), args.data_dir, t.max_mmlu_samples)
        logger.info("MMLU %s (%s): %d questions", mmlu_split, t.mmlu_dataset, len(mmlu_examples))
    windows = _wikitext2_windows(args, model, tokenizer) if "wikitext2" in need else None
    runner = None
    if "lm_eval" in need:  # on every rank, so a bad task name stops every rank alike
        runner = LMEvalRunner(model, tokenizer, args.lm_eval_tasks, args.data_dir, batch_size=batch_size,
                              limit=t.lm_eval_limit, include_path=t.lm_eval_include_path)

    was_training = model.training
    model.eval()  # dropout off, MoE router deterministic
    results: list[ShapeResult] = []
    base = dict(existing)  # what the file held before: this run's keys are laid over it in shape order

    def keep(res: ShapeResult) -> None:
        """Write the shape's metrics now: a run that fails or is stopped later keeps what it measured."""
        if writer:
            existing.update(suffixed(res.metrics, res.subnet))
            write_json(metrics_path, existing)

    try:
        # Shared metrics first: every process takes part in every shape (nothing waits on lm-eval).
        for subnet in tqdm(shapes, desc="shapes", disable=len(shapes) < 2 or not writer):
            logger.info("evaluating %s (%d layers, width %s)", subnet.label, subnet.num_layers, subnet.width)
            done = skip[subnet.label]
            res = evaluate_shape(model, tokenizer, em, subnet,
                                 mmlu_examples=None if "mmlu" in done else mmlu_examples,
                                 mmlu_split=mmlu_split, wikitext_windows=None if "wikitext2" in done else windows,
                                 batch_size=batch_size, mmlu_max_len=t.mmlu_source_max_len, group=group,
                                 progress=writer)
            _reuse_recorded(res, existing, done, mmlu_split, tasks)
            results.append(res)
            if runner is None or "lm_eval" in done:
                _finish(res)
            keep(res)
        if runner is not None:
            for i in range(rank, len(shapes), world):
                subnet = shapes[i]
                if "lm_eval" in skip[subnet.label]:
                    continue  # recorded, and finished above
                res = results[i]
                logger.info("lm-eval on %s (%d layers, width %s)", subnet.label, subnet.num_layers, subnet.width)
                part = evaluate_shape(model, tokenizer, em, subnet, lm_runner=runner, batch_size=batch_size)
                res.metrics.update(part.metrics)
                res.headline.update(part.headline)
                res.seconds.update(part.seconds)
                _finish(res)
                keep(res)
            if group is not None:
                results = _gather_lm_eval(results, rank, world, group)
    finally:
        model.train(was_training)
        if runner is not None:
            runner.close()
    run_metrics: dict = {}
    for res in results:
        run_metrics.update(suffixed(res.metrics, res.subnet))
    existing = base
    existing.update(run_metrics)
    if not writer:
        return run_metrics
    write_json(metrics_path, existing)
    for res in results:
        logger.info("%s: %s", res.subnet.label, ", ".join(f"{k}={v:.4g}" for k, v in res.headline.items()))
    # The table covers every shape metrics.json knows, earlier runs' too, with this run's metric names.
    rows = [row_from_result(r) for r in results]
    names = list(dict.fromkeys(k for r in results for k in r.headline))
    rows += rows_from_metrics(existing, names, skip=[r.label for r in rows])
    write_report(out_dir, sort_rows(rows), total_params=em.param_count(em.full_subnet()))
    _log_table(results)
    return run_metrics


def strategy_calibration(strategy, path=None) -> dict:
    """What metrics.json records about the strategy in use: its file (name or working-directory-relative path)
    and how it was calibrated (the file's ``calibration`` records); {} when the strategy has no record."""
    from amoeba.strategy import portable_path

    records = getattr(strategy, "calibration", None) or {}
    if not records:
        return {}
    return {"strategy_file": portable_path(path or getattr(strategy, "source", None)),
            **{part: dict(record) for part, record in records.items()}}


def warn_if_reported_on_calibration_split(calibration: dict, mmlu_split: str) -> bool:
    """Warn (and return True) when the MMLU split reported is the one the strategy's layers were chosen on:
    those subnets were picked for doing well on exactly these questions."""
    from amoeba.mmlu import split_name

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


def _finish(res: ShapeResult) -> None:
    """The parameter count goes last, as every shape's final key."""
    res.metrics["params"] = float(res.params)


def _gather_lm_eval(results: list[ShapeResult], rank: int, world: int, group) -> list[ShapeResult]:
    """Every rank's lm-eval shapes merged into one list (shape ``i`` came from rank ``i % world``)."""
    mine = {i: results[i] for i in range(rank, len(results), world)}
    merged = list(results)
    for share in gather_from_processes(mine, group):
        for i, res in share.items():
            merged[i] = res
    return merged


def _log_table(results: Sequence[ShapeResult]) -> None:
    for r in results:
        parts = [f"{k}={v:.4f}" if math.isfinite(v) else f"{k}={v}" for k, v in r.headline.items()]
        logger.info("%-14s params=%d %s", r.subnet.label, r.params, " ".join(parts))
