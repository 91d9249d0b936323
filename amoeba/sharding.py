"""Stage 2 on a base that does not fit one GPU (``--fsdp``): the frozen base weights sharded over the processes.

FSDP2 (``torch.distributed.fsdp.fully_shard``) wraps every decoder layer and then the whole model, so each process
keeps 1/N of every base weight and gathers a layer's weights just before it runs (again in the backward pass,
after ``full_shard``; kept from the forward with ``shard_grad_op``). The adapters and the MoE router are left out
of the sharding (``ignored_params``): they are small, stay whole on every process, and DDP, which the Trainer wraps
around the model as in any multi-process run, averages their gradients. So the optimizer, the checkpoints and
the adapter files are exactly those of a one-GPU or DDP run, and load in one.

Why layer skipping and width slicing stay correct:

- every process runs the same subnet in each pass (the sampler is a function of the seed and the step), so all
  gather the same layers in the same order, and a skipped layer's unit gathers nothing on any process;
- the frozen weights get no gradient, so no unit ever reduce-scatters; the only gradient collective is DDP's
  all-reduce of the adapters, on the default process group, while the gathers run on a group of their own;
- width slicing reads ``weight[:k]`` inside the projection's forward, where the layer's weights are gathered whole.

Evaluation after such a run keeps every process in lockstep (each measures everything, the first one writes), since
a sharded layer only runs when every process runs it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from amoeba.errors import UsageError

logger = logging.getLogger(__name__)

FLAG = "--fsdp"
# --fsdp word -> reshard_after_forward: full_shard gathers each layer again for its backward (least memory),
# shard_grad_op keeps the gathered layer from forward to backward (fewer gathers, more memory).
MODES = {"full_shard": True, "shard_grad_op": False}
# Words the Trainer's --fsdp accepts that this path does on its own or not at all.
ALWAYS = {"auto_wrap"}  # every decoder layer is a unit anyway
REFUSED = {"offload": "CPU offload of the base weights", "hybrid_shard": "hybrid sharding",
           "hybrid_shard_zero2": "hybrid sharding", "no_shard": "no_shard (that is DDP: leave out --fsdp)"}
_SHARDED_ATTR = "_amoeba_sharded"


@dataclass(frozen=True)
class ShardSettings:
    """How the base is sharded: ``reshard_after_forward`` (``full_shard``: True, ``shard_grad_op``: False)."""

    reshard_after_forward: bool = True

    @property
    def mode(self) -> str:
        """The ``--fsdp`` word these settings come from."""
        return "full_shard" if self.reshard_after_forward else "shard_grad_op"


def parse_fsdp(value) -> Optional[ShardSettings]:
    """``--fsdp`` as settings: None when not given; ``full_shard`` (the default of a bare ``--fsdp``) or
    ``shard_grad_op``, optionally with ``auto_wrap``. Other options are refused (UsageError)."""
    if value is None or value is False or value == "" or value == []:
        return None
    words = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    words = [str(getattr(w, "value", w)).strip().lower() for w in words]
    words = ["full_shard" if w in ("true", "1") else w for w in words if w]
    for word in words:
        if word in REFUSED:
            raise UsageError(f"'{word}': {REFUSED[word]} is not supported; use full_shard or shard_grad_op", FLAG)
        if word not in MODES and word not in ALWAYS:
            raise UsageError(f"unknown option '{word}'; use full_shard or shard_grad_op (auto_wrap is implied)", FLAG)
    modes = [w for w in words if w in MODES]
    if len(set(modes)) > 1:
        raise UsageError(f"choose one of full_shard and shard_grad_op, not {' and '.join(sorted(set(modes)))}", FLAG)
    return ShardSettings(reshard_after_forward=MODES[modes[0]] if modes else True)


def check_fsdp_command(settings: Optional[ShardSettings], *, do_train: bool, bits: int, device_map, calibrating: bool,
                       exporting: bool, world_size: int) -> None:
    """Refuse, before the model loads, a ``--fsdp`` run combined with what this path cannot do (UsageError)."""
    if settings is None:
        return
    if not do_train:
        raise UsageError("shards the base for Stage 2 training (--do_train True); calibration and evaluation of a "
                         "large base spread it over the GPUs with --device_map auto instead", FLAG)
    if bits in (4, 8):
        raise UsageError(f"cannot shard a {bits}-bit base (--bits {bits}); train it with DDP "
                         "(scripts/launch_multi_gpu.sh), or leave out --bits to shard the 16-bit base", FLAG)
    if device_map:
        raise UsageError("cannot be combined with --device_map: FSDP spreads the base over the processes itself",
                         FLAG)
    if calibrating:
        raise UsageError("cannot be combined with Stage 1 calibration (--layer_calib_dp, --width_calib): calibrate "
                         "in a separate run with --device_map auto", FLAG)
    if exporting:
        raise UsageError("cannot be combined with --export_dir or a budget: export in a separate run from the saved "
                         "adapters (with --device_map auto for a large base)", FLAG)
    if world_size < 2:
        raise UsageError("shards the base over several processes, and this run is one; start it with torchrun "
                         "--nproc_per_node N (or scripts/launch_multi_gpu.sh)", FLAG)


def is_sharded(model: nn.Module) -> bool:
    """True once :func:`shard_frozen_base` sharded ``model``."""
    return bool(getattr(model, _SHARDED_ATTR, False))


def _count(flag: bool, device: torch.device) -> int:
    """How many processes have ``flag``."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value)
    return int(value.item())


def _mesh(device_type: str):
    """A one-dimensional mesh over every process on a process group of its own, so the weight gathers never
    interleave with DDP's all-reduce of the adapters on the default group."""
    group = dist.new_group(ranks=list(range(dist.get_world_size())))
    return DeviceMesh.from_group(group, device_type)


def shard_frozen_base(model: nn.Module, layers: nn.ModuleList, settings: ShardSettings) -> None:
    """Shard every frozen base weight of ``model`` over the processes (FSDP2): one unit per decoder layer of
    ``layers`` and one for the rest (embeddings, final norm, output matrix). Trainable parameters (adapters,
    router) stay whole, and DDP is told to leave the sharded ones alone. Call after the adapters are attached and
    before the Trainer wraps the model; the weights may start on the CPU (each process keeps its shard on its
    GPU), or on the meta device: then every tensor is allocated empty, to be filled by the caller."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise UsageError("shards the base over several processes; start the run with torchrun", FLAG)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    trainable = {p for p in model.parameters() if p.requires_grad}
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    # A base built on the meta device is allocated empty below, each process holding its shard only. When the first
    # process read the weights (the others built theirs without memory: amoeba.loading), it sends each process
    # its shards; when every process built on the meta device (a benchmark's random base), the caller fills them.
    empty = any(p.is_meta for p in model.parameters())
    readers = _count(not empty, device)
    if readers not in (0, 1, dist.get_world_size()) or (readers == 1 and empty == (dist.get_rank() == 0)):
        raise RuntimeError("sharding expects the weights on every process, on the first only, or on none")
    send = readers == 1  # the first process sends, the others receive
    full = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad} if send and not empty else {}
    # the replicated part (adapters, router, buffers such as rotary tables) lives on this process's device
    for p in trainable:
        if not p.is_meta:
            p.data = p.data.to(device)
    mesh = _mesh(device.type)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                    ignored_params={p for p in layer.parameters() if p in trainable})
    fully_shard(model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, ignored_params=trainable)
    if empty:
        model.to_empty(device=device)
    if send:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   strict=False))
        del full  # the first process's whole copy goes; adapters, router and buffers follow from DDP (rank 0's)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    # DDP would broadcast (and check) every parameter it manages; the sharded ones are not its to touch.
    model._ddp_params_and_buffers_to_ignore = frozen_names
    setattr(model, _SHARDED_ATTR, True)
    world = dist.get_world_size()
    total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    logger.info("FSDP (%s): %d frozen base parameters sharded over %d processes (%d each), %d decoder-layer units; "
                "%d trainable parameters replicated", settings.mode, total, world, -(-total // world), len(layers),
                sum(p.numel() for p in trainable))


def wrap_replicated(model: nn.Module, accelerator, find_unused_parameters: bool, bucket_cap_mb=None,
                    broadcast_buffers=None) -> nn.Module:
    """The training wrapper of a sharded model: DDP over its replicated (trainable) parameters, the sharded ones
    left out (:func:`shard_frozen_base` named them), with accelerate's mixed precision on its forward.

    accelerate refuses to put DDP around a model that holds sharded (DTensor) parameters, so the Trainer's own
    wrapping is replaced by this: the model is prepared for autocast only, then wrapped here. The adapters'
    gradients are views into DDP's buckets (``gradient_as_bucket_view``): one copy of them less in memory."""
    model = accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
    kwargs = {"find_unused_parameters": bool(find_unused_parameters), "gradient_as_bucket_view": True}
    if bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = bucket_cap_mb
    if broadcast_buffers is not None:
        kwargs["broadcast_buffers"] = broadcast_buffers
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() and accelerator.device.type == "cuda" \
        else None
    replicated = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("DDP over the %d replicated trainable parameters; the sharded base stays with FSDP", replicated)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)

