"""Per-layer widths for the stock transformers decoder families (Llama, Qwen2, Qwen3, Mistral, Gemma).

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
"""

from __future__ import annotations

import copy

from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaForCausalLM
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

SHAPES_KEY = "per_layer_shapes"
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


def layer_config(config, shape: dict):
    """A copy of ``config`` with one layer's head, KV-head and MLP sizes (head_dim stays the model's)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cfg = copy.deepcopy(config)
    cfg.head_dim = head_dim
    for key in SIZE_KEYS:
        setattr(cfg, key, int(shape[key]))
    return cfg


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
            # The attention reads settings such as the attention implementation from its config at run
            # time: point it at the model's own config so later changes reach every layer.
            layer.self_attn.config = config
            for flag, (block, role) in BIAS_KEYS.items():
                parent = getattr(layer, block)
                old = getattr(parent, role)
                if shape.get(flag) and old.bias is None:
                    setattr(parent, role, nn.Linear(old.in_features, old.out_features, bias=True,
                                                    device=old.weight.device, dtype=old.weight.dtype))
            rebuilt.append(layer)
        decoder.layers = nn.ModuleList(rebuilt)

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


class AmoebaGemmaForCausalLM(PerLayerShapesMixin, GemmaForCausalLM):
    """Gemma with per-layer widths."""


CLASS_FOR_MODEL_TYPE = {
    "llama": AmoebaLlamaForCausalLM,
    "mistral": AmoebaMistralForCausalLM,
    "qwen2": AmoebaQwen2ForCausalLM,
    "qwen3": AmoebaQwen3ForCausalLM,
    "gemma": AmoebaGemmaForCausalLM,
}
