"""Per-layer widths for the stock transformers decoder families (Llama, Qwen2, Qwen3, Mistral, Gemma 1/2/3, Phi-3).

An exported AmoebaLLM subnet whose layers keep different numbers of heads, KV groups and MLP channels
(FLAP's global threshold gives every layer its own width) cannot be described by a stock config, which
has one size for all layers. This file is saved next to such an export as ``modeling_amoeba.py`` and
registered in its ``config.json`` under ``auto_map``, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the model with every layer at its own size. It needs torch and transformers only.

The config is the family's own (``model_type`` unchanged, top-level sizes those of the full base model)
plus one list, ``per_layer_shapes``: for each decoder layer ``{"num_attention_heads": ...,
"num_key_value_heads": ..., "intermediate_size": ..., "o_proj_bias": bool, "down_proj_bias": bool}``.
The bias flags give ``o_proj``/``down_proj`` an output bias where the family has none (it holds the
pruning's bias compensation).

How: each class below is the family's own ``...ForCausalLM`` with one change. Before the weights are
initialised (``post_init``), every decoder layer is rebuilt by the family's own decoder-layer class from a
copy of the config carrying that layer's sizes. Forward passes, caches (dynamic and static),
``generate`` and ``save_pretrained`` are the family's code, unchanged.

Fused projections: after loading, ``from_pretrained`` runs :meth:`PerLayerShapesMixin.fuse_projections`, which
puts each layer's q/k/v weights into one matrix and gate/up into another. The family's forward still calls
``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one by one; each is now a :class:`FusedPart` returning its slice
of one shared product, computed when the first part is called with that input. Why: in batch-1 decoding a
narrow layer's matrix-vector products are too small to reach the memory bandwidth, and a fixed cost per
kernel dominates; one product instead of three (and two) removes most of it. Inputs of more than
``FUSED_MAX_ROWS`` tokens (prefill) run the parts one by one, from the same fused weights. The files on disk keep the
stock per-projection names (``state_dict`` splits the fused weights back), so the folder is unchanged.
Before attaching adapters by projection name (peft), call :meth:`~PerLayerShapesMixin.unfuse_projections`, or
load with ``fuse_projections=False``. Quantized or offloaded weights are left unfused.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

logger = logging.getLogger(__name__)

SHAPES_KEY = "per_layer_shapes"
# Fusing pays while a product is bound by reading its weights (few tokens: decoding). With many tokens
# (prefill) each product is compute-bound, and separate products keep their outputs contiguous, which
# measured ~3% faster at 2048 tokens on an H200; so above this many rows the parts run one by one.
FUSED_MAX_ROWS = 256
FUSE_KEY = "fuse_projections"  # config flag (default true): fuse q/k/v and gate/up after loading
# (block, projections read from the same input, name of their fused module)
FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))
SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
BIAS_KEYS = {"o_proj_bias": ("self_attn", "o_proj"), "down_proj_bias": ("mlp", "down_proj")}


def layer_shapes(config) -> list:
    """The ``per_layer_shapes`` list of ``config``, checked against its number of layers."""
    shapes = getattr(config, SHAPES_KEY, None)
    if not isinstance(shapes, (list, tuple)) or len(shapes) != config.num_hidden_layers:
        raise ValueError(f"config.{SHAPES_KEY} must list one shape per layer ({config.num_hidden_layers})")
    for i, shape in enumerate(shapes):
        missing = [k for k in SIZE_KEYS if not isinstance(shape.get(k), int) or shape[k] < 1]
        if missing:
            raise ValueError(f"config.{SHAPES_KEY}[{i}] needs positive integers for {', '.join(missing)}")
        if shape["num_attention_heads"] % shape["num_key_value_heads"]:
            raise ValueError(f"config.{SHAPES_KEY}[{i}]: query heads are not a multiple of KV heads")
    return list(shapes)


class LayerConfigView:
    """The model's config as one layer sees it: its own head, KV-head and MLP sizes, every other setting read
    from the model's config at the time (so a later change, e.g. of the attention implementation, reaches it).

    Some attention classes read their head count from their config in ``forward`` (Phi-3 splits its packed q/k/v
    output at ``config.num_attention_heads * head_dim``); with this view each layer reads its own.
    """

    def __init__(self, config, **sizes):
        object.__setattr__(self, "_base", config)
        for key, value in sizes.items():
            object.__setattr__(self, key, value)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_base":  # copy/pickle protocols: not the base config's
            raise AttributeError(name)
        return getattr(self._base, name)


def layer_config(config, shape: dict):
    """A copy of ``config`` with one layer's head, KV-head and MLP sizes (head_dim stays the model's)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cfg = copy.deepcopy(config)
    cfg.head_dim = head_dim
    for key in SIZE_KEYS:
        setattr(cfg, key, int(shape[key]))
    return cfg


class FusedLinear(nn.Module):
    """Several projections of the same input as one matrix product (q/k/v, or gate/up).

    The rows of ``weight`` are the parts' weights, stacked in order. :meth:`output_for` returns the whole
    product; it is computed once per input and reused by the parts that follow, then dropped.
    """

    def __init__(self, parts: Sequence[nn.Linear], names: Sequence[str], attr: str):
        super().__init__()
        ref = parts[0].weight
        self.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=ref.requires_grad)
        self.has_bias = tuple(p.bias is not None for p in parts)
        if any(self.has_bias):
            bias = torch.cat([p.bias.detach() if p.bias is not None else ref.new_zeros(p.out_features) for p in parts])
            self.bias = nn.Parameter(bias, requires_grad=ref.requires_grad)
        else:
            self.register_parameter("bias", None)
        self.names, self.attr = tuple(names), attr
        self.sizes = tuple(p.out_features for p in parts)
        self.starts = tuple(sum(self.sizes[:i]) for i in range(len(parts)))
        self.in_features = parts[0].in_features
        self._input: Optional[torch.Tensor] = None
        self._output: Optional[torch.Tensor] = None
        self._left = 0
        # On disk and in state_dict the parts keep their own names: a stock checkpoint layout.
        self.register_state_dict_post_hook(FusedLinear._split_state)
        self._join_handle = None

    def install(self, block: nn.Module) -> None:
        """Put this module on ``block`` in place of its parts (the names of ``names``)."""
        setattr(block, self.attr, self)
        for i, name in enumerate(self.names):
            setattr(block, name, FusedPart(self, i))
        # On the block, not here: load_state_dict hands each child only the keys under the child's name.
        self._join_handle = block.register_load_state_dict_pre_hook(self._join_state)

    def uninstall(self, block: nn.Module) -> None:
        """Give ``block`` its parts back as plain ``nn.Linear`` modules."""
        for i, name in enumerate(self.names):
            setattr(block, name, self.part_linear(i))
        delattr(block, self.attr)
        if self._join_handle is not None:
            self._join_handle.remove()
            self._join_handle = None

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        """The fused product for ``x``: computed when a part first asks for this input, reused by the others."""
        if self._input is not x or self._left == 0:
            self._input, self._output, self._left = x, F.linear(x, self.weight, self.bias), len(self.sizes)
        out = self._output
        self._left -= 1
        if self._left == 0:  # every part served: hold no activation between calls
            self._input = self._output = None
        return out

    def part_linear(self, index: int) -> nn.Linear:
        """Part ``index`` as a plain ``nn.Linear`` holding a copy of its rows."""
        start, size = self.starts[index], self.sizes[index]
        w = self.weight.detach()
        lin = nn.Linear(self.in_features, size, bias=self.has_bias[index], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w[start:start + size])
            if self.has_bias[index]:
                lin.bias.copy_(self.bias.detach()[start:start + size])
        lin.weight.requires_grad_(self.weight.requires_grad)
        return lin

    @staticmethod
    def _split_state(module: "FusedLinear", state_dict, prefix: str, local_metadata) -> None:
        base = prefix[: len(prefix) - len(module.attr) - 1]  # the block's prefix
        weight, bias = state_dict.pop(prefix + "weight"), state_dict.pop(prefix + "bias", None)
        for name, start, size, has_bias in zip(module.names, module.starts, module.sizes, module.has_bias):
            # Copies, not views: checkpoint writers refuse tensors that share memory.
            state_dict[f"{base}{name}.weight"] = weight.detach()[start:start + size].clone()
            if has_bias:
                state_dict[f"{base}{name}.bias"] = bias.detach()[start:start + size].clone()

    def _join_state(self, block: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
        """Load hook of the block: stock per-projection keys become this module's fused keys."""
        keys = [f"{prefix}{name}.weight" for name in self.names]
        if not all(k in state_dict for k in keys):
            return
        own = f"{prefix}{self.attr}."
        state_dict[own + "weight"] = torch.cat([state_dict.pop(k) for k in keys])
        if self.bias is not None:
            state_dict[own + "bias"] = torch.cat([
                state_dict.pop(f"{prefix}{name}.bias") if has else self.bias.new_zeros(size)
                for name, size, has in zip(self.names, self.sizes, self.has_bias)])


class FusedPart(nn.Module):
    """One projection of a :class:`FusedLinear`: called as before, returns its slice of the fused product."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        # A plain attribute, not a submodule: the fused weights are registered once, on the parent block.
        self.__dict__["fused"] = fused
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        """This part's rows of the fused weight (a view), for code that reads a projection's dtype or shape."""
        start = self.fused.starts[self.index]
        return self.fused.weight[start:start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (see class)
        fused, start, size = self.fused, self.fused.starts[self.index], self.out_features
        if x.numel() > FUSED_MAX_ROWS * x.shape[-1]:  # many tokens: this part's rows alone (see FUSED_MAX_ROWS)
            bias = fused.bias[start:start + size] if fused.bias is not None else None
            return F.linear(x, fused.weight[start:start + size], bias)
        return fused.output_for(x).narrow(-1, start, size)


def _plain_linears(block: nn.Module, names: Sequence[str]) -> Optional[list]:
    """The named projections of ``block`` if all are plain, materialised ``nn.Linear`` of one device and dtype."""
    parts = [getattr(block, name, None) for name in names]
    if any(type(p) is not nn.Linear or p.weight.is_meta or getattr(p, "_hf_hook", None) is not None for p in parts):
        return None
    if len({(p.weight.device, p.weight.dtype) for p in parts}) != 1:
        return None
    return parts


def fuse_projections(model: nn.Module) -> int:
    """Fuse each decoder layer's q/k/v and gate/up projections into one product each (any model of these
    families, per-layer or stock); returns how many groups were fused. Groups whose weights are quantized,
    offloaded or not yet loaded stay as they are."""
    fused = 0
    for layer in model.model.layers:
        for block_name, names, attr in FUSED_GROUPS:
            block = getattr(layer, block_name, None)
            parts = _plain_linears(block, names) if block is not None else None
            if parts is not None:
                FusedLinear(parts, names, attr).install(block)
                fused += 1
    if fused:
        logger.info("fused q/k/v and gate/up projections in %d blocks", fused)
    return fused


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections` (e.g. before attaching adapters by projection name); returns how many
    groups were split back into plain ``nn.Linear`` modules."""
    split = 0
    for layer in model.model.layers:
        for block_name, _, attr in FUSED_GROUPS:
            block = getattr(layer, block_name, None)
            group = getattr(block, attr, None) if block is not None else None
            if isinstance(group, FusedLinear):
                group.uninstall(block)
                split += 1
    return split


class PerLayerShapesMixin:
    """Rebuilds the decoder layers at the sizes of ``config.per_layer_shapes``, before weight init."""

    def post_init(self):  # noqa: D102 (see class)
        self._rebuild_layers()
        super().post_init()

    def _rebuild_layers(self) -> None:
        config = self.config
        decoder = self.model
        layer_class = type(decoder.layers[0])
        rebuilt = []
        for i, shape in enumerate(layer_shapes(config)):
            layer = layer_class(layer_config(config, shape), i)
            # The attention reads settings such as the attention implementation (and, in some families, its
            # head count) from its config at run time: a view of the model's config with this layer's sizes.
            layer.self_attn.config = LayerConfigView(config, **{k: int(shape[k]) for k in SIZE_KEYS})
            for flag, (block, role) in BIAS_KEYS.items():
                parent = getattr(layer, block)
                old = getattr(parent, role)
                if shape.get(flag) and old.bias is None:
                    setattr(parent, role, nn.Linear(old.in_features, old.out_features, bias=True,
                                                    device=old.weight.device, dtype=old.weight.dtype))
            rebuilt.append(layer)
        decoder.layers = nn.ModuleList(rebuilt)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The family's ``from_pretrained``, then :meth:`fuse_projections` unless the config says
        ``fuse_projections: false`` (or ``fuse_projections=False`` is passed)."""
        fuse = kwargs.pop(FUSE_KEY, None)
        model = super().from_pretrained(*args, **kwargs)
        if fuse if fuse is not None else getattr(model.config, FUSE_KEY, True):
            model.fuse_projections()
        return model

    def fuse_projections(self) -> int:
        """See :func:`fuse_projections`."""
        return fuse_projections(self)

    def unfuse_projections(self) -> int:
        """See :func:`unfuse_projections`."""
        return unfuse_projections(self)

    def _get_static_cache_init_shape(self):
        """(KV heads per layer, head dim) for an eagerly initialised static cache."""
        parent = getattr(super(), "_get_static_cache_init_shape", None)
        found = parent() if parent is not None else None
        if found is None:
            return None
        return [int(s["num_key_value_heads"]) for s in layer_shapes(self.config)], found[1]


class AmoebaLlamaForCausalLM(PerLayerShapesMixin, LlamaForCausalLM):
    """Llama with per-layer widths."""


class AmoebaMistralForCausalLM(PerLayerShapesMixin, MistralForCausalLM):
    """Mistral with per-layer widths."""


class AmoebaQwen2ForCausalLM(PerLayerShapesMixin, Qwen2ForCausalLM):
    """Qwen2 with per-layer widths."""


class AmoebaQwen3ForCausalLM(PerLayerShapesMixin, Qwen3ForCausalLM):
    """Qwen3 with per-layer widths."""


class AmoebaPhi3ForCausalLM(PerLayerShapesMixin, Phi3ForCausalLM):
    """Phi-3 (Phi-3.5, Phi-4-mini) with per-layer widths."""


class AmoebaGemmaForCausalLM(PerLayerShapesMixin, GemmaForCausalLM):
    """Gemma with per-layer widths."""


class AmoebaGemma2ForCausalLM(PerLayerShapesMixin, Gemma2ForCausalLM):
    """Gemma 2 with per-layer widths."""


class AmoebaGemma3ForCausalLM(PerLayerShapesMixin, Gemma3ForCausalLM):
    """Gemma 3 (text) with per-layer widths."""


CLASS_FOR_MODEL_TYPE = {
    "llama": AmoebaLlamaForCausalLM,
    "mistral": AmoebaMistralForCausalLM,
    "qwen2": AmoebaQwen2ForCausalLM,
    "qwen3": AmoebaQwen3ForCausalLM,
    "gemma": AmoebaGemmaForCausalLM,
    "gemma2": AmoebaGemma2ForCausalLM,
    "gemma3_text": AmoebaGemma3ForCausalLM,
    "phi3": AmoebaPhi3ForCausalLM,
}
