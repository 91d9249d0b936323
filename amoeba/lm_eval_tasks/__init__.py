"""lm-eval task configs that read the offline data directory (laid out like shared/data).

The ``*.yaml.tmpl`` files here are lm-eval task YAMLs with the data paths left open; :func:`render_tasks`
fills them in with the resolved data directory and writes them, with ``utils.py`` (their ``process_docs``
functions), into a folder that lm-eval's ``TaskManager(include_path=...)`` indexes. The tasks keep the
stock names (``arc_easy``, ``piqa``, ``hellaswag``, ``mmlu``) and the stock prompts and metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from string import Template

from amoeba.errors import UsageError

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

# task name -> {template field: file inside the data directory}
LOCAL_FILES = {
    "arc_easy": {"arc_easy_test": "arc/ARC-Easy-Test.jsonl"},
    "piqa": {"piqa_validation": "piqa/valid.jsonl", "piqa_labels": "piqa/valid-labels.lst"},
    "hellaswag": {"hellaswag_validation": "hellaswag/hellaswag_val_full.jsonl.gz"},
}
LOCAL_TASKS = ("arc_easy", "piqa", "hellaswag", "mmlu")


def _quoted(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar


def mmlu_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subjects that have test and dev CSVs in ``data_dir/mmlu``."""
    root = Path(data_dir) / "mmlu"
    subjects = sorted(f.name[: -len("_test.csv")] for f in (root / "test").glob("*_test.csv"))
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
        side.update(fields)
        text = Template((HERE / f"{name}.yaml.tmpl").read_text(encoding="utf-8"))
        (dest / f"{name}.yaml").write_text(text.substitute({k: _quoted(v) for k, v in fields.items()}),
                                           encoding="utf-8")
    (dest / "local_paths.json").write_text(json.dumps(side, indent=1), encoding="utf-8")
    logger.info("offline lm-eval tasks %s from %s", ", ".join(names), data_dir)
    return dest


def _render_mmlu(data_dir: Path, dest: Path) -> None:
    subject_tmpl = Template((HERE / "mmlu_subject.yaml.tmpl").read_text(encoding="utf-8"))
    subjects = mmlu_subjects(data_dir)
    root = data_dir / "mmlu"
    for s in subjects:
        val = root / "val" / f"{s}_val.csv"
        fields = {
            "subject": s,
            "test_file": _quoted(str(root / "test" / f"{s}_test.csv")),
            # A subject without validation questions still runs: its validation split is the dev file.
            "val_file": _quoted(str(val if val.is_file() else root / "dev" / f"{s}_dev.csv")),
            "dev_file": _quoted(str(root / "dev" / f"{s}_dev.csv")),
            "description": _quoted("The following are multiple choice questions (with answers) about "
                                   f"{' '.join(s.split('_'))}.\n\n"),
        }
        (dest / f"mmlu_{s}.yaml").write_text(subject_tmpl.substitute(fields), encoding="utf-8")
    group = Template((HERE / "mmlu_group.yaml.tmpl").read_text(encoding="utf-8"))
    (dest / "mmlu.yaml").write_text(group.substitute(subtasks="\n".join(f"  - mmlu_{s}" for s in subjects)),
                                    encoding="utf-8")
