"""lm-eval tasks on the in-memory elastic model, through lm-eval's own ``HFLM`` (no fork of lm-eval).

Where each task comes from is decided before any model is loaded (:class:`LMEvalTasks`): a task defined in the
user's own lm-eval task configs (``include_path``, lm-eval's ``--include_path``) comes from there; else
``arc_easy``, ``piqa``, ``hellaswag`` and ``mmlu`` read the offline data directory when there is one (task
configs in :mod:`amoeba.lm_eval_tasks`); every other task is lm-eval's stock task from the hub. With the hub
offline, their data is looked up then too (:meth:`LMEvalTasks.check_data`), so a task that cannot be had fails in
one line before the work. :class:`LMEvalRunner` evaluates them on whatever subnet the model runs.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from amoeba import DropMessage
from amoeba.errors import UsageError
from amoeba.lm_eval_prefix import context_sharing_hflm
from amoeba.lm_eval_tasks import LOCAL_TASKS, render_tasks

logger = logging.getLogger(__name__)


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
        from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds to import, only --do_lm_eval needs it

        _MANAGERS[include_path] = TaskManager(include_path=include_path)
    return _MANAGERS[include_path]


def _hub_offline() -> bool:
    """True when ``datasets`` may not reach the hub (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    import datasets  # deferred: a heavy import that only lm-eval's data needs

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
        import requests  # only where installed: what the hub client raises when it has no connection

        errors.append(requests.exceptions.ConnectionError)
    with contextlib.suppress(ImportError):
        import httpx  # only where installed (newer hub clients)

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
            from lm_eval.tasks import TaskManager  # deferred: lm-eval is slow to import

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


def _quiet_in_memory_model_warnings() -> None:
    """Drop lm-eval's two warnings about being handed a model object instead of a name: passing the in-memory
    elastic model, in one process, is how this project uses lm-eval on purpose, so they never concern the user."""
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, DropMessage) for f in hf_logger.filters):
        hf_logger.addFilter(DropMessage("`pretrained` model kwarg is not of type `str`",
                                        "Passed an already-initialized model through `pretrained`"))


class LMEvalRunner:
    """Runs lm-eval tasks on the in-memory model through lm-eval's ``HFLM`` (one wrapper for all shapes).

    Where each task comes from is :class:`LMEvalTasks`'s decision (the user's ``--lm_eval_include_path``
    configs, this project's offline configs, or lm-eval's stock tasks). Unknown names raise UsageError with
    the closest known names; a task whose data cannot be fetched raises UsageError naming it. With
    ``prefix_cache`` (``--lm_eval_prefix_cache``) the wrapper runs each shared context once
    (:func:`amoeba.lm_eval_prefix.context_sharing_hflm`).
    """

    def __init__(self, model, tokenizer, tasks: Sequence[str], data_dir: Optional[str], batch_size: int = 8,
                 limit: Optional[int] = None, num_fewshot: Optional[int] = None,
                 include_path: Optional[str] = None, prefix_cache: bool = False):
        if limit is not None and limit < 1:
            raise UsageError(f"{limit} must be at least 1", "--lm_eval_limit")
        self.sources = LMEvalTasks(tasks, data_dir, include_path)
        self.tasks = self.sources.tasks
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.managers = self.sources.managers
        self.samples: dict = {}  # lm-eval's "n-samples" of the last run: {task: {original, effective}}
        if prefix_cache:
            HFLM = context_sharing_hflm()
        else:
            from lm_eval.models.huggingface import HFLM  # deferred: lm-eval is slow to import

        _quiet_in_memory_model_warnings()
        try:
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        except BaseException:
            self.close()
            raise

    def run(self) -> tuple[dict[str, float], dict]:
        """Evaluate every task on the model's current subnet: (flat metrics, lm-eval's raw results)."""
        import lm_eval  # deferred: lm-eval is slow to import

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
