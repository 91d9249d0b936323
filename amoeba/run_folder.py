"""The layout of a run's output folder (``--output_dir``), in one place: what is written where, and the one rule
for finding each thing again.

::

    <output_dir>/
        run_args.json                 the resolved arguments, command line and library versions
        adapter_model/                the adapters of a finished Stage 2 run (adapter_config.json + safetensors)
        adapter_model-step<N>/        adapters kept after optimizer step N (--adapter_snapshot_steps)
        checkpoint-<N>/               adapters, optimizer, scheduler, RNG states; complete once trainer_state.json
                                      exists (written last, atomically, after every other file is on disk)
        metrics.json                  evaluation results keyed <metric>_l<layers>w<width>

:func:`find_adapters` is how every stage finds the adapters a folder holds (a run folder, a checkpoint, or an
adapter folder itself); :func:`last_complete_checkpoint` is how resuming and evaluation find the newest intact
checkpoint; :func:`read_metrics` is the one reader of ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import transformers

from amoeba.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config, read_adapter_tensors
from amoeba.distributed import is_first_process
from amoeba.errors import UsageError, shown
from amoeba.files import atomic_path, library_versions, write_json

logger = logging.getLogger(__name__)

RUN_RECORD = "run_args.json"
ADAPTER_DIR = "adapter_model"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"  # the "checkpoint complete" marker: written last
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
METRICS_FILE = "metrics.json"
_METRIC_KEY = re.compile(r"^(?P<metric>.+)_(?P<label>l\d+w[0-9.]+)$")


# ----------------------------------------------------------------------------------------------
# The run record
# ----------------------------------------------------------------------------------------------
def save_run_record(output_dir: str | os.PathLike, arguments: dict, parsed: dict) -> None:
    """Write ``run_args.json`` into ``output_dir``: the resolved ``arguments`` (by group), the ``parsed`` list
    values, the command line and the library versions. Only the first process writes it (several machines may
    not share a folder, and with a shared one a second writer adds nothing)."""
    if not is_first_process():
        return
    record = {"command": sys.argv, "arguments": arguments, "parsed": parsed, "versions": library_versions()}
    write_json(Path(output_dir) / RUN_RECORD, record)


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------
def holds_adapters(folder: str | os.PathLike) -> bool:
    """True when ``folder`` itself is an adapter folder (its config and weights files are there)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def find_adapters(folder: str | os.PathLike) -> Optional[Path]:
    """The adapters ``folder`` holds: ``folder`` itself when it is an adapter folder, else its
    ``adapter_model/``, else that of its newest complete checkpoint whose adapters load and are finite; None
    when there are none."""
    folder = Path(folder)
    if holds_adapters(folder):
        return folder
    final = folder / ADAPTER_DIR
    if (final / CONFIG_FILE).is_file():
        return final
    ckpt = last_complete_checkpoint(folder, resumable=False)
    if ckpt is not None and (ckpt / ADAPTER_DIR / CONFIG_FILE).is_file():
        return ckpt / ADAPTER_DIR
    return None


def snapshot_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the adapters after optimizer step ``step`` are kept (``--adapter_snapshot_steps``)."""
    return Path(output_dir) / f"{ADAPTER_DIR}-step{int(step)}"


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint after optimizer step ``step``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{int(step)}"


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-*`` folder in ``output_dir`` (complete or not), in no particular order."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def nonfinite_names(named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN/inf, in order: one multi-tensor max-abs norm (NaN and inf
    propagate, nothing overflows) and one read-back per device and dtype, not two kernels per tensor."""
    groups: dict = {}
    for i, (_, value) in enumerate(named):
        groups.setdefault((value.device, value.dtype), []).append(i)
    bad = []
    for indices in groups.values():
        norms = torch._foreach_norm([named[i][1] for i in indices], float("inf"))
        finite = torch.isfinite(torch.stack(norms))
        if not bool(finite.all()):
            bad.extend(i for i, ok in zip(indices, finite.tolist()) if not ok)
    return [named[i][0] for i in sorted(bad)]


def first_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor with a NaN/inf, or None."""
    bad = nonfinite_names(named)
    return bad[0] if bad else None


def _short(err: BaseException) -> str:
    """The first line of an exception's message, at most 160 characters (for a one-line reason)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _load_state_file(path: Path):
    """``torch.load`` of a checkpoint's optimizer/scheduler/RNG file the way the Trainer reads it (tensors and
    plain containers only; numpy RNG state allowed)."""
    try:  # imported here: older transformers do not have it (and need nothing extra allowed)
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:
        safe_globals = contextlib.nullcontext
    with safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_problem(folder, resumable: bool = True) -> Optional[str]:
    """Why ``checkpoint-N`` cannot be resumed, or None when it validates.

    Valid: the marker (``trainer_state.json``) is present and a JSON object; the adapters' config and
    safetensors load and hold finite values; with ``resumable`` (what resuming needs, beyond the adapters that
    evaluation reads) the marker holds the global step, and the optimizer, scheduler and RNG files are present
    and load, the optimizer state finite."""
    folder = Path(folder)
    marker = folder / TRAINER_STATE
    if not marker.is_file():
        return f"no {TRAINER_STATE} (the checkpoint was not completed)"
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is not readable JSON ({_short(err)})"
    if not isinstance(state, dict) or (resumable and not isinstance(state.get("global_step"), int)):
        return f"{TRAINER_STATE} holds no trainer state"
    if resumable:
        try:
            transformers.TrainerState(**state)  # what the Trainer makes of it on resume
        except (TypeError, ValueError) as err:
            return f"{TRAINER_STATE} is not a trainer state this transformers can read ({_short(err)})"
    try:
        read_adapter_config(folder / ADAPTER_DIR)
        read_adapter_tensors(folder / ADAPTER_DIR)
    except UsageError as err:
        return str(err)
    if not resumable:
        return None
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth"
    scaler = [folder / SCALER_FILE] if (folder / SCALER_FILE).is_file() else []  # fp16 on CUDA only
    for path in [folder / OPTIMIZER_FILE, folder / SCHEDULER_FILE, *scaler, *rng]:
        if not path.is_file():
            return f"no {path.name}"
        try:
            loaded = _load_state_file(path)
        except Exception as err:  # noqa: BLE001 -- any failure to read the file makes the checkpoint unusable
            return f"{path.name} cannot be loaded ({_short(err)})"
        if path.name == OPTIMIZER_FILE:
            slots = loaded.get("state", {}) if isinstance(loaded, dict) else {}
            named = [(f"{path.name} ({slot} of parameter {key})", value)
                     for key, values in (slots.items() if isinstance(slots, dict) else ())
                     for slot, value in (values.items() if isinstance(values, dict) else ())
                     if torch.is_tensor(value) and value.is_floating_point()]
            bad = first_nonfinite(named)
            if bad:
                return f"{bad} holds non-finite values"
    return None


def last_complete_checkpoint(output_dir, skipped: Optional[list] = None, resumable: bool = True) -> Optional[Path]:
    """The newest ``checkpoint-N`` in ``output_dir`` that validates (:func:`checkpoint_problem`; ``resumable=False``:
    its adapters only), or None.

    Newer checkpoints that do not validate (a run killed while saving, a damaged file) are passed over; each is
    appended to ``skipped`` as ``(path, reason)`` when a list is given."""
    candidates = sorted((p for p in checkpoint_folders(output_dir) if _step_of(p) >= 0), key=_step_of, reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path, resumable)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
    return None


# --- writing a checkpoint durably: every file on disk before the marker that vouches for them
def fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)
    except OSError:
        return  # e.g. folders on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without fsync for this kind of file (e.g. some network mounts for folders)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then the folders themselves (deepest first) and ``folder``'s parent, so
    the files and their names are on disk."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(Path(root))
        for name in files:
            fsync(Path(root) / name)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync(d)
    fsync(folder.parent)


def write_marker(state, path: Path) -> None:
    """Write the trainer state as ``path`` (the completion marker) last: the rest of the checkpoint folder is
    synced first, then the marker goes to a temporary file, is fsynced and renamed over ``path``."""
    _sync_tree(path.parent)
    text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"  # as TrainerState.save_to_json
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync(path.parent)


def remove_marker(folder: Path) -> None:
    """Remove the marker of a checkpoint folder about to be rewritten, and temporary markers a kill left behind."""
    marker = folder / TRAINER_STATE
    if marker.is_file():
        logger.warning("%s is being written again; its earlier marker is removed first", folder)
        marker.unlink()
        fsync(folder)
    for tmp in folder.glob(f".{TRAINER_STATE}.*"):  # atomic_path's temporary names
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# metrics.json
# ----------------------------------------------------------------------------------------------
def metric_key(metric: str, label: str) -> str:
    """The metrics.json key of ``metric`` measured on the shape ``label`` (the seed's ``<metric>_l24w0.875``)."""
    return f"{metric}_{label}"


def split_metric_key(key: str) -> Optional[tuple[str, str]]:
    """(metric, shape label) of a metrics.json key, or None for a key of no shape."""
    m = _METRIC_KEY.match(key)
    return (m["metric"], m["label"]) if m else None


def read_metrics(path: str | os.PathLike, flag: Optional[str] = None) -> dict:
    """The metrics already in ``path``, {} when there is no such file.

    A file that is not UTF-8 JSON holding an object raises one UsageError naming the file (and ``flag``)."""
    path = Path(path)
    if not path.is_file():
        return {}
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
    return data


def values_by_shape(metrics: dict) -> dict[str, dict[str, float]]:
    """{metric: {shape label: value}} of the finite numbers in a metrics.json dict (NaN, inf, text and keys of no
    shape are left out)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = split_metric_key(key)
        if parts is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            continue
        if math.isfinite(value):
            out.setdefault(parts[0], {})[parts[1]] = value
    return out
