"""Working with several processes (``torchrun``, ``accelerate launch``): who this process is, and sharing small
results among all of them.

Every function here also works without ``torch.distributed``: a single process is rank 0 of a world of 1, and a
collective over one process returns its own value. Objects gathered with :func:`gather_from_processes` travel
pickled, so they should be small and on the CPU (numbers, lists, CPU tensors).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from amoeba.errors import UsageError

logger = logging.getLogger(__name__)

# A rank may wait at a gather while the others run long lm-eval shapes: longer than the default group's timeout.
RESULT_TIMEOUT = datetime.timedelta(hours=24)


def is_first_process() -> bool:
    """True on the process that writes a run's files: rank 0 of all processes on all machines (``RANK`` before
    the process group exists), and in a run without a launcher."""
    if _running():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def process_count() -> int:
    """Processes of this launch (``WORLD_SIZE``, set by torchrun and accelerate launch); 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launch(cpu: bool = False) -> None:
    """Refuse a launch that starts more processes on this machine than it has visible GPUs (UsageError): two
    processes would share a GPU, which NCCL refuses deep inside the first collective. Fewer processes than GPUs
    runs, with one warning that the rest stay idle. CPU runs (``cpu``, or no CUDA) are not checked."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local < 2 or cpu or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if local > gpus:
        raise UsageError(f"{local} processes were started on this machine but {gpus} GPU(s) are visible{where}; "
                         f"start one process per GPU (--nproc_per_node {gpus}) or make more GPUs visible")
    if local < gpus and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        logger.warning("%d processes on this machine, %d GPUs visible%s: %d GPU(s) stay idle", local, gpus, where,
                       gpus - local)


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_share(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (default: the running ``torch.distributed`` group), or (0, 1)
    without one."""
    if _running():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gather_from_processes(obj, group=None) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` without a process group)."""
    _, world = process_share(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a detached scalar over all processes (itself without ``torch.distributed``).

    The balancing scale and the divergence check use it, so every process scales by the same factor (a
    data-parallel step then equals one step on the whole global batch) and all stop together on a NaN
    instead of leaving the others waiting in the gradient all-reduce."""
    _, world = process_share()
    return value if world == 1 else sum_over_processes(value) / world


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The sum of a detached tensor over all processes (itself without ``torch.distributed``): counts such as the
    training tokens, which each process sees only its share of."""
    _, world = process_share()
    if world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def results_group() -> Optional[object]:
    """A gloo group over all processes for small, pickled results (evaluation metrics), or None in a
    single-process run. Its own long timeout (:data:`RESULT_TIMEOUT`): a rank with nothing left to do waits for
    the others at the final gather, which may take longer than the default group's timeout (``--ddp_timeout``)."""
    _, world = process_share()
    if world == 1:
        return None
    return dist.new_group(backend="gloo", timeout=RESULT_TIMEOUT)
