"""lm-eval task configs that read the offline data directory (laid out like shared/data).

The ``*.yaml.tmpl`` files here are lm-eval task YAMLs whose data paths are ``${field}`` placeholders;
:func:`render_tasks` fills them in for the resolved data directory and writes them, with ``utils.py`` (their
``process_docs`` functions), into a folder that lm-eval's ``TaskManager(include_path=...)`` indexes. The
tasks keep the stock names (``arc_easy``, ``piqa``, ``hellaswag``, ``mmlu``) and the stock prompts and metrics.

Nothing is spliced into YAML text: a template is parsed, its placeholders are set as values, and the YAML
emitter writes the result, so a path or name with YAML syntax in it (``: # ' " {``, a newline) stays one
value. The only data-derived names that reach a config, MMLU subjects taken from CSV file names, pass the
project's safe-name rule (:func:`amoeba.mmlu.subject_of`) first; that matters because lm-eval renders some
fields (the MMLU ``description``) as Jinja templates.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path
from string import Template

import yaml

from amoeba.errors import UsageError
from amoeba.files import write_text
from amoeba.mmlu import subject_of

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

# task name -> {template field: file inside the data directory}
LOCAL_FILES = {
    "arc_easy": {"arc_easy_test": "arc/ARC-Easy-Test.jsonl"},
    "piqa": {"piqa_validation": "piqa/valid.jsonl", "piqa_labels": "piqa/valid-labels.lst"},
    "hellaswag": {"hellaswag_validation": "hellaswag/hellaswag_val_full.jsonl.gz"},
}
LOCAL_TASKS = ("arc_easy", "piqa", "hellaswag", "mmlu")
# Template fields that lm-eval hands to `datasets` as `data_files`, which reads them as glob patterns.
DATA_FILE_FIELDS = {"arc_easy_test", "piqa_validation", "hellaswag_validation", "test_file", "val_file",
                    "dev_file"}


class _Function(str):
    """A ``!function module.name`` reference of a template, kept as text and written back with its tag."""


class _TemplateLoader(yaml.SafeLoader):
    """Reads a task template; ``!function`` references stay text (lm-eval resolves them when it loads)."""


_TemplateLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


class _TaskDumper(yaml.SafeDumper):
    """Writes a filled-in task config: plain YAML plus lm-eval's ``!function`` tag."""


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
# Multi-line text (prompts, descriptions) as one double-quoted line with \n escapes, as the templates write it.
_TaskDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))

_WHOLE_FIELD = re.compile(r"\$\{(\w+)\}")


def _fill(node, fields: dict):
    """``node`` with every ``${field}`` placeholder set: a string that is one placeholder becomes the value
    itself (a string or a list); a placeholder inside a longer string is substituted as text."""
    if isinstance(node, dict):
        return {key: _fill(value, fields) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(value, fields) for value in node]
    if isinstance(node, str) and not isinstance(node, _Function) and "${" in node:
        whole = _WHOLE_FIELD.fullmatch(node)
        return fields[whole.group(1)] if whole else Template(node).substitute(fields)
    return node


def render_config(template: str, fields: dict) -> str:
    """The task YAML of the template file ``template`` (in this folder) with its ``${field}`` placeholders set
    to ``fields``, written by the YAML emitter: every value is quoted and escaped as YAML needs."""
    doc = yaml.load((HERE / template).read_text(encoding="utf-8"), Loader=_TemplateLoader)
    return yaml.dump(_fill(doc, fields), Dumper=_TaskDumper, sort_keys=False, width=float("inf"))


def _data_file(path: Path) -> str:
    # `datasets` expands data_files as glob patterns: a folder named e.g. "runs[1]" must match itself only.
    return glob.escape(str(path))


def mmlu_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subjects that have test and dev CSVs in ``data_dir/mmlu``.

    A test file whose name does not give a safe subject name is refused (UsageError naming the file), as
    :func:`amoeba.mmlu.load_mmlu` refuses it: subject names end up in task names and prompts."""
    root = Path(data_dir) / "mmlu"
    subjects = sorted(subject_of(f, "test") for f in (root / "test").glob("*_test.csv"))
    return [s for s in subjects if (root / "dev" / f"{s}_dev.csv").is_file()]


def missing_files(name: str, data_dir: str | os.PathLike) -> list[str]:
    """Files the offline task ``name`` needs that ``data_dir`` lacks (empty when it can run)."""
    root = Path(data_dir)
    if name == "mmlu":
        return [] if mmlu_subjects(root) else [str(root / "mmlu" / "test" / "*_test.csv")]
    return [str(root / rel) for rel in LOCAL_FILES[name].values() if not (root / rel).is_file()]


def render_tasks(names, data_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the YAMLs of the offline tasks ``names`` for ``data_dir`` into ``dest``; return ``dest``."""
    data_dir, dest = Path(data_dir).resolve(), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "utils.py", dest / "utils.py")
    side = {}
    for name in names:
        if name not in LOCAL_TASKS:
            raise ValueError(f"{name} is not an offline task ({', '.join(LOCAL_TASKS)})")
        missing = missing_files(name, data_dir)
        if missing:
            raise UsageError(f"the offline task {name} needs {', '.join(missing)}", "--data_dir")
        if name == "mmlu":
            _render_mmlu(data_dir, dest)
            continue
        fields = {k: str(data_dir / rel) for k, rel in LOCAL_FILES[name].items()}
        side.update(fields)  # utils.py reads side files (PIQA labels) by plain path
        write_text(dest / f"{name}.yaml", render_config(f"{name}.yaml.tmpl", {
            k: _data_file(Path(v)) if k in DATA_FILE_FIELDS else v for k, v in fields.items()}))
    write_text(dest / "local_paths.json", json.dumps(side, indent=1))
    logger.info("offline lm-eval tasks %s from %s", ", ".join(names), data_dir)
    return dest


def _render_mmlu(data_dir: Path, dest: Path) -> None:
    subjects = mmlu_subjects(data_dir)  # every one passed the safe-name rule
    root = data_dir / "mmlu"
    for s in subjects:
        val = root / "val" / f"{s}_val.csv"
        fields = {
            "subject": s,
            "test_file": _data_file(root / "test" / f"{s}_test.csv"),
            # A subject without validation questions still runs: its validation split is the dev file.
            "val_file": _data_file(val if val.is_file() else root / "dev" / f"{s}_dev.csv"),
            "dev_file": _data_file(root / "dev" / f"{s}_dev.csv"),
            # lm-eval renders the description as a Jinja template: it is built from the safe name alone.
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{' '.join(s.split('_'))}.\n\n",
        }
        write_text(dest / f"mmlu_{s}.yaml", render_config("mmlu_subject.yaml.tmpl", fields))
    write_text(dest / "mmlu.yaml", render_config("mmlu_group.yaml.tmpl",
                                                 {"subtasks": [f"mmlu_{s}" for s in subjects]}))
