"""Atomic file writes and the run record every output directory keeps.

Everything a stage writes goes to a temporary file in the same folder first and is then renamed over
the final name, so an interrupted or failed run never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "bitsandbytes", "numpy",
             "safetensors")


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes the file private (0600); give it the permissions a plain write would
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (non-JSON values become strings)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = "not installed"
    return out


def save_run_record(output_dir: str | os.PathLike, args) -> None:
    """Write ``run_args.json`` (resolved arguments, command line, library versions) into ``output_dir``."""
    groups = {}
    for name in ("model", "data", "train", "generation"):
        obj = getattr(args, name)
        groups[name] = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    record = {
        "command": sys.argv,
        "arguments": groups,
        "parsed": {"width_choice": args.width_choice, "eval_layers": args.eval_layers,
                   "eval_widths": args.eval_widths, "lm_eval_tasks": args.lm_eval_tasks,
                   "data_dir": args.data_dir},
        "versions": library_versions(),
    }
    write_json(Path(output_dir) / "run_args.json", record)
