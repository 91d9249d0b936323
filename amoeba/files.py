"""Atomic file writes, writable-folder checks and the library versions a result records.

Everything a stage writes goes to a temporary file in the same folder first and is then renamed over
the final name, so an interrupted or failed run never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

from amoeba.errors import UsageError

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


def writable_dir(path: str | os.PathLike, flag: str, create: bool = True) -> Path:
    """The folder ``path``, checked to be one this process can write into; with ``create`` it is made (with its
    parents). Everything else is a UsageError naming ``flag``: an empty path (it would mean the current folder),
    a file, a path under a file, a folder without write permission.

    Every folder a command writes into goes through here before any work starts, so a bad one costs one line
    instead of a traceback after the work.
    """
    text = os.fspath(path)
    if not text.strip():
        raise UsageError("an empty path names no folder; give one (e.g. ./output)", flag)
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder", flag)
    nearest = folder
    while not nearest.exists() and not nearest.is_symlink() and nearest.parent != nearest:
        nearest = nearest.parent  # the closest part of the path that exists decides whether it can be made
    if not nearest.is_dir():
        raise UsageError(f"cannot create {folder}: {nearest} is not a folder", flag)
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{nearest} is not writable", flag)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create {folder}: {err.strerror or err}", flag) from None
    return folder


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """The file ``path``, checked to be one this process can write (atomically, beside it): not empty, not a
    folder, in a folder that exists or can be made and is writable. Problems are a UsageError naming ``flag``."""
    text = os.fspath(path)
    if not text.strip():
        raise UsageError("an empty path names no file", flag)
    target = Path(text).expanduser()
    if target.is_dir():
        raise UsageError(f"{target} is a folder; give the path of the file to write", flag)
    writable_dir(target.parent, flag, create=False)
    return target


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
