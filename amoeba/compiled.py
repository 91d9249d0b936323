"""Stage 2 with compiled decoder layers (``--compile_layers``): ``torch.compile`` of each layer, for training.

A layer reads which rows and columns of its weights the current subnet keeps from Python state; compiled as it is,
every layer and width would be a graph of its own (the recompile limit is reached within a few sandwich steps).
So the elastic model first hands each projection its operands as tensors, before every decoder forward
(:meth:`amoeba.elastic.ElasticModel.prepare_projections`); inside, a layer then depends only on tensor shapes, and
a few graphs with symbolic shapes serve every layer, width and sequence length once warmed up. A 4-bit base (its
weights packed, so widths are 0/1 masks over full-size products) is compiled the same way, its masks handed over as
tensors; bitsandbytes' 4-bit products are operators the compiler keeps whole. The numbers are the same computation
(equal to the eager step up to the compiler's rounding; tested on the CPU, 4-bit too).

Off by default. Where the compiler cannot run (no Triton with CUDA, no C++ compiler on a CPU), asking for it is a
usage error (exit 2), as are the combinations not covered (8-bit bases, FSDP, ``--device_map``).

With gradient checkpointing (the default), the checkpoint is taken inside the compiled function: each layer pass is
one compiled forward (keeping only the layer's inputs) and one compiled backward that recomputes the activations
itself, fused with the gradient kernels. transformers before 5.24 checkpoints outside the layer's call, which would
run the compiled forward a second time in the backward, a third host-side pass over the layer's operators; a step
bound by launching them (the 4-bit seed settings) pays for every pass.

``--compile_mode reduce-overhead`` (CUDA GPUs) also captures each compiled layer's forward and backward as CUDA
graphs, recorded at a subnet shape's first steps and replayed after: one launch per graph instead of one per kernel,
for steps bound by launching kernels (a small model, a 4-bit base). A graph's replay reads the tensors a module held
where they were when it was recorded, and the compiler records again when one has moved; so in this mode the
operands made anew at each forward (the mixed MoE adapters above all) are written into storage kept at fixed
addresses (``prepare_projections(fixed_addresses=True)``, ``ShapeRouter.fixed_addresses``). Without that every
replay was a new recording: SmolLM2-135M's step took 2.6 s on an H200 instead of 0.07 s (docs/BENCHMARKS.md).
Graphs are also recorded per input shape, and training changes shapes at every step (each batch padded to its
longest example, random subnets' widths), so in training this mode records more than it replays and is slower than
eager (measured; compile_layers warns of it): it pays on the benchmark's fixed batches.

``--layers_per_graph N`` compiles runs of N consecutive decoder layers as one call instead of each layer alone
(:class:`LayerGroup`): every compiled call costs host time (the compiler's guards and runtime wrappers, and with CUDA
graphs the graph trees' bookkeeping around each replay), which bounds a small model's graphed step (SmolLM2-135M's
sandwich made 94 compiled forwards and as many backwards; docs/BENCHMARKS.md, fifteenth measurement). The same
computation; with checkpointing the checkpoint then holds the group's input only and the backward recomputes the
group's N layers at once (N layers' activations alive in the backward instead of one). Only training forwards are
grouped, without a KV cache (a cache is sized per layer); evaluation runs the layers eager. Not shown to pay yet, and a
6-layer graph compiles in 45-100 s on an H200 host against about 20 s for one layer (sixteenth measurement).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from amoeba.adapters import get_router
from amoeba.errors import UsageError

logger = logging.getLogger(__name__)

FLAG = "--compile_layers"
MODE_FLAG = "--compile_mode"
GROUP_FLAG = "--layers_per_graph"
# torch.compile's modes offered: "reduce-overhead" adds CUDA graphs (one launch per compiled layer call)
MODES = ("default", "reduce-overhead")
# graphs a compiled layer may collect before the compiler gives up on it (largest + random + smallest subnets,
# full-width and sliced layers, a few sequence-length specialisations): well above what a sandwich needs
RECOMPILE_LIMIT = 64
# CUDA graphs are recorded per input shape; measured in training (docs/BENCHMARKS.md, thirteenth measurement)
GRAPHS_IN_TRAINING = (
    f"{MODE_FLAG} reduce-overhead records CUDA graphs for every new input shape, and training changes shapes at every "
    "step (batches padded to their longest example, random subnets' widths): a 20-step SmolLM2-135M run on an H200 "
    "took 3.8 s per step after its first (314 s), against 0.89 s eager; it pays only for fixed shapes (2-3x on the "
    "benchmark's fixed batch), so keep the default mode for training")


def compiler_missing(cuda: Optional[bool] = None) -> Optional[str]:
    """Why ``torch.compile`` cannot build kernels here, or None when it can."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++, c++ or clang++) on the PATH for the CPU backend"


def check_compile_command(compile_layers: bool, do_train: bool, bits: int, device_map: Optional[str],
                          sharded: bool, cuda: Optional[bool] = None, mode: str = "default",
                          layers_per_graph: int = 1) -> None:
    """Refuse ``--compile_layers`` (and its ``--compile_mode``, ``--layers_per_graph``) where it cannot run, before
    the model loads."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    check_layers_per_graph(layers_per_graph, compile_layers)
    if not compile_layers:
        if mode != "default":
            raise UsageError("needs --compile_layers", MODE_FLAG)
        return
    check_compile_mode(mode, cuda)
    if not do_train:
        raise UsageError("compiles the layers for training; add --do_train True", FLAG)
    if bits == 8:
        raise UsageError("is not supported with an 8-bit base (--bits 8)", FLAG)
    if device_map:
        raise UsageError("is not supported with --device_map (layers on several devices)", FLAG)
    if sharded:
        raise UsageError("is not supported with --fsdp", FLAG)
    why = compiler_missing(cuda)
    if why is not None:
        raise UsageError(f"torch.compile cannot run here: {why}", FLAG)


def check_compile_mode(mode: str, cuda: bool) -> None:
    """Refuse a ``--compile_mode`` that is not offered, or CUDA graphs without a CUDA GPU."""
    if mode not in MODES:
        raise UsageError(f"{mode!r} is not one of {', '.join(MODES)}", MODE_FLAG)
    if mode == "reduce-overhead" and not cuda:
        raise UsageError("reduce-overhead captures CUDA graphs, which need a CUDA GPU", MODE_FLAG)


def check_layers_per_graph(layers_per_graph: int, compile_layers: bool = True) -> None:
    """Refuse a ``--layers_per_graph`` below 1, or above 1 without ``--compile_layers``."""
    if layers_per_graph < 1:
        raise UsageError(f"must be at least 1, got {layers_per_graph}", GROUP_FLAG)
    if layers_per_graph > 1 and not compile_layers:
        raise UsageError("needs --compile_layers", GROUP_FLAG)


class LayerGroup(nn.Module):
    """Consecutive decoder layers called as one layer (``--layers_per_graph``): each member is called in turn with
    the same arguments, on the hidden states the one before returned. The members stay registered where they are
    (the decoder's layer list); a group is only the decoder's layer list while the decoder runs."""

    def __init__(self, layers: Sequence[nn.Module], layer_type: Optional[str] = None):
        super().__init__()
        self.members = list(layers)  # a plain list: not submodules, so state_dict and parameters do not change
        self.attention_type = layer_type
        self.gradient_checkpointing = False  # read by transformers' layer call; the compiled call checkpoints

    def forward(self, hidden_states, *args, **kwargs):  # noqa: D102 (see class)
        out = hidden_states
        for layer in self.members:
            out = layer(hidden_states, *args, **kwargs)
            hidden_states = out[0] if isinstance(out, tuple) else out  # older layers return (hidden_states, ...)
        return out


def layer_runs(count: int, per_graph: int, layer_types: Optional[Sequence[str]] = None) -> list[range]:
    """Positions of ``count`` consecutive layers split into runs of at most ``per_graph``, of equal size as far as
    they go (30 layers by 8: 8, 8, 7, 7); a run never spans two attention types (``layer_types``: sliding-window and
    full-attention layers take different masks from the decoder)."""
    runs, start = [], 0
    while start < count:  # stretches of one attention type
        end = count if layer_types is None else next(
            (j for j in range(start + 1, count) if layer_types[j] != layer_types[start]), count)
        parts = -(-(end - start) // per_graph)
        sizes = [(end - start) // parts + (i < (end - start) % parts) for i in range(parts)]
        for size in sizes:
            runs.append(range(start, start + size))
            start += size
    return runs


class LayerGrouping:
    """While the decoder runs, its layer list (the current subnet's) is a list of :class:`LayerGroup`, each called
    through ``call`` (a compiled function of the group and the layer's arguments); ``config.layer_types`` then
    names one type per group. Groups are kept per layer list, so a subnet met again calls the same groups (the
    same compiled graphs, and with CUDA graphs the same recordings)."""

    def __init__(self, decoder: nn.Module, per_graph: int, call: Callable):
        self.decoder, self.per_graph, self.call = decoder, per_graph, call
        self._groups: dict[tuple, nn.ModuleList] = {}
        self._saved: Optional[tuple] = None
        self._restore = decoder.register_forward_hook(self._leave, prepend=True, always_call=True)

    def groups(self, layers: Sequence[nn.Module], layer_types: Optional[Sequence[str]]) -> nn.ModuleList:
        """The groups of ``layers`` (built at their first forward; they stay in training mode, the only one grouped)."""
        key = (tuple(map(id, layers)), tuple(layer_types) if layer_types is not None else None)
        if key not in self._groups:
            groups = nn.ModuleList()
            for run in layer_runs(len(layers), self.per_graph, layer_types):
                group = LayerGroup([layers[i] for i in run], layer_types[run[0]] if layer_types is not None else None)
                group._compiled_call_impl = partial(self.call, group)
                groups.append(group)
            self._groups[key] = groups
        return self._groups[key]

    def enter(self, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        """Make the decoder's layer list (as the subnet left it) its groups, undone when the decoder returns, and
        return the decoder's arguments with ``use_cache=False``. Only for a training forward (gradients on) that is
        given no cache: a cache is sized and typed per layer (from ``config.layer_types``, which names groups here)
        and training reads none; any other forward (evaluation, generation) runs the layers as they are, eager."""
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None or not (
                self.decoder.training and torch.is_grad_enabled()):
            return None
        config = self.decoder.config
        layers = self.decoder.layers
        layer_types = getattr(config, "layer_types", None)
        layer_types = list(layer_types[:len(layers)]) if layer_types else None
        groups = self.groups(layers, layer_types)
        self._saved = (layers, getattr(config, "layer_types", None))
        self.decoder.layers = groups
        if layer_types is not None:
            config.layer_types = [group.attention_type for group in groups]
        return args, {**kwargs, "use_cache": False}

    def _leave(self, module, args, output) -> None:
        if self._saved is None:
            return
        self.decoder.layers, layer_types = self._saved
        if layer_types is not None:
            self.decoder.config.layer_types = layer_types
        self._saved = None

    def remove(self) -> None:
        """Stop grouping; the groups (and the graphs they hold) are dropped."""
        self._restore.remove()
        self._groups.clear()


def _no_duck_sizing() -> Callable[[], None]:
    """Stop the compiler from taking symbolic sizes that happen to be equal for one (duck sizing), and return the
    function that puts the setting back. A group's graph holds several layers' operands, whose sizes and storage
    offsets (the mixed adapters are views into one buffer) coincide differently in every group: each coincidence
    became a guard, and each group a graph of its own (measured: 5 graphs for 3 groups of a 6-layer model)."""
    return _set_until_undone(torch.fx.experimental._config, "use_duck_shape", False)


def _set_until_undone(config, name: str, value) -> Callable[[], None]:
    """Set a compiler setting and return the function that puts its earlier value back."""
    before = getattr(config, name)
    setattr(config, name, value)
    return partial(setattr, config, name, before)


def plain_call(layer, *args, **kwargs):
    """``layer``'s call: the function a layer group is compiled as without checkpointing (the group an argument, so
    one function serves every group)."""
    return layer._call_impl(*args, **kwargs)


def checkpointed_call(layer, *args, **kwargs):
    """``layer``'s call under non-reentrant activation checkpointing while it trains (with gradients), plain
    otherwise: the function a checkpointed layer is compiled as, so the compiler sees the checkpoint and puts the
    recomputation into the compiled backward. One function for every layer (the layer is an argument, not part of
    the function), so its graphs serve them all."""
    if layer.training and torch.is_grad_enabled():
        return checkpoint(layer._call_impl, *args, use_reentrant=False, **kwargs)
    return layer._call_impl(*args, **kwargs)


def _allow_side_effects_under_checkpoint() -> Optional[Callable[[], None]]:
    """Let the compiler keep a checkpointed layer whole when its forward writes Python state, and return the function
    that puts the setting back (None where this torch has no such setting).

    transformers 5.25 wraps the attention's forward with the ``kernels`` package, which sets a context variable
    at every call. Inside a checkpoint the compiler refuses that write (eager checkpointing would replay it in the
    backward), gives the whole layer up and runs it eager: nothing was compiled, silently. The variable only says which
    hub kernels the call may use and is reset before the call returns, so not replaying it is safe."""
    config = torch._dynamo.config
    name = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    if not hasattr(config, name):
        logger.warning("%s: this torch cannot let a checkpointed layer's forward write Python state; a layer that "
                       "does (transformers 5.25's attention) runs uncompiled under gradient checkpointing", FLAG)
        return None
    return _set_until_undone(config, name, True)


def compile_layers(em, mode: str = "default", layers_per_graph: int = 1) -> Callable[[], None]:
    """Compile every decoder layer of ``em`` (symbolic shapes; torch.compile's ``mode``) and prepare its projections
    before each decoder forward; return the function that undoes both (evaluation after training runs eager).

    With ``mode="reduce-overhead"`` (CUDA graphs) each decoder forward also starts a new graph step: a subnet's
    forward and backward are done before the next one starts, so the graphs may reuse their memory. With
    ``layers_per_graph`` above 1 runs of that many consecutive layers of the subnet are compiled as one call
    (:class:`LayerGrouping`) instead of each layer alone."""
    check_layers_per_graph(layers_per_graph)
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, limit_name) < RECOMPILE_LIMIT:
        setattr(config, limit_name, RECOMPILE_LIMIT)
    graphs = mode == "reduce-overhead"
    if graphs:
        logger.warning(GRAPHS_IN_TRAINING)

    grouping: Optional[LayerGrouping] = None
    duck_sizing: Optional[Callable[[], None]] = None

    def before_decoder(module, args, kwargs):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        em.prepare_projections(fixed_addresses=graphs)
        if grouping is not None:  # after the depth hook: the subnet's layers are the decoder's now
            return grouping.enter(args, kwargs)
        return None

    hook = em.decoder.register_forward_pre_hook(before_decoder, with_kwargs=True)
    router = get_router(em.model)
    if router is not None:  # CUDA graphs: the mixed adapters at fixed addresses (see prepare_projections)
        router.use_fixed_addresses(graphs)
    compiled_checkpointed = torch.compile(checkpointed_call, dynamic=True, mode=mode)  # compiles at its first call
    checkpointed = [layer for layer in em.all_layers if getattr(layer, "gradient_checkpointing", False)]
    for layer in checkpointed:  # transformers' own checkpoint off: ours takes it
        layer.gradient_checkpointing = False
    if layers_per_graph > 1:
        call = compiled_checkpointed if checkpointed else torch.compile(plain_call, dynamic=True, mode=mode)
        grouping = LayerGrouping(em.decoder, layers_per_graph, call)
        duck_sizing = _no_duck_sizing()
    else:
        for layer in em.all_layers:
            if layer in checkpointed:
                layer._compiled_call_impl = partial(compiled_checkpointed, layer)
            else:
                layer.compile(dynamic=True, mode=mode)
    side_effects = _allow_side_effects_under_checkpoint() if checkpointed else None
    logger.info("%s: %d decoder layers compiled%s%s%s (the first steps compile, later ones reuse)", FLAG,
                len(em.all_layers), f", {layers_per_graph} per graph" if grouping is not None else "",
                f", mode {mode}" if mode != "default" else "",
                ", activation checkpointing inside" if checkpointed else "")

    def undo() -> None:
        hook.remove()
        if grouping is not None:
            grouping.remove()
            duck_sizing()
        em.drop_prepared_projections()
        for layer in em.all_layers:
            layer._compiled_call_impl = None
        for layer in checkpointed:
            layer.gradient_checkpointing = True
        if side_effects is not None:
            side_effects()
        if router is not None:
            router.use_fixed_addresses(False)
        if graphs:  # the recorded graphs hold their memory pool until their trees are cleared
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()

    return undo
