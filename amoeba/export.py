"""Instant deployment: cut one subnet out of the elastic model as a standard, smaller Hugging Face model.

The surgery, in order (each step a small function below):

1. **Adapters merged for that shape.** Under ``em.use(subnet)`` every adapted projection's delta
   ``W_delta[out, in]`` (the MoE-LoRA gates are fixed by the shape) is added to its weight.
2. **Skipped layers dropped**; the kept layers are renumbered 0..L-1 (and ``layer_types`` follows).
3. **Width sliced.** The elastic model keeps the most important KV groups and MLP channels first, so
   the kept units are a prefix: q/k/v/gate/up rows ``[:k]``, o/down columns ``[:, :k]``.
4. **FLAP bias folded** into ``o_proj``/``down_proj`` biases. Llama's ``attention_bias`` switches on
   biases for q/k/v/o together (``mlp_bias`` for gate/up/down), so the others are stored as zeros.
   Architectures without such a switch (Qwen2's ``o_proj``, Mistral) are written as Llama when that is
   the same function (no sliding window in effect); otherwise the export is refused with the reason.
5. **Config updated**: head counts, ``head_dim`` (always explicit), ``intermediate_size``,
   ``num_hidden_layers``, bias flags, ``layer_types``.

Per-layer widths. FLAP's global threshold gives every layer its own head, KV-group and MLP sizes, which
a stock config (one size for all layers) cannot describe. ``export_format="exact"`` (the default) writes
such a subnet at exactly its own sizes: ``config.json`` keeps the base's ``model_type`` and top-level
fields and adds ``per_layer_shapes`` (one entry per layer), and ``modeling_amoeba.py`` (a copy of
:mod:`amoeba.modeling_amoeba`, which subclasses the installed family's classes) is saved beside it and
registered in ``auto_map``; it loads with ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``, without this project. Its parameter count is the subnet's own
(:meth:`ElasticModel.param_count`). ``export_format="padded"`` writes a stock folder instead, every layer
zero-padded to the widest kept one: exact logits, no custom code, but no smaller than its widest layer
(``amoeba_export.json`` records the stored and the effective parameter counts). Uniform shapes are always
written as stock folders; so is a family that the stock config can hold, and the exact format falls back
to per-layer code only where a stock config cannot hold the subnet's FLAP biases.

Adapter contract used by the merge: an adapted projection has a child ``amoeba_adapter`` that offers
``merged_delta() -> Tensor[out_features, in_features]``, its weight delta under the current subnet (the
MoE-LoRA layer of :mod:`amoeba.adapters` does). Entries outside the kept prefix are ignored.

Which shape to export, and where from, is the deployment stage's (:mod:`amoeba.stages.deployment`); what the
export record says about its sources comes from there (``provenance``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from amoeba import modeling_amoeba
from amoeba.elastic import IN_SLICED, OUT_SLICED, ElasticModel, _is_dense_linear
from amoeba.errors import UsageError
from amoeba.files import library_versions, writable_dir, write_json
from amoeba.model_state import eval_mode
from amoeba.subnet import Subnet

logger = logging.getLogger(__name__)

EXPORT_RECORD = "amoeba_export.json"
EXPORT_FORMATS = ("exact", "padded")
MODELING_FILE = "modeling_amoeba.py"  # saved beside exports whose layers have their own sizes
ROLES = OUT_SLICED + IN_SLICED
# Which projections each architecture can give a bias, and through which config flag.
#   "attention_bias": q/k/v/o together; "mlp_bias": gate/up/down together; "fixed": always present.
_BIAS_SUPPORT = {
    "llama": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp_bias": ("gate_proj", "up_proj", "down_proj")},
    "qwen3": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gemma": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gemma2": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gemma3_text": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "olmo2": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "phi3": {},
    "qwen2": {"fixed": ("q_proj", "k_proj", "v_proj")},
    "mistral": {},
}


@dataclass
class SlicedModel:
    """An exported subnet in memory: the model and the numbers its record reports."""

    model: nn.Module
    subnet: Subnet
    model_type: str
    source_model_type: str
    layer_sizes: list[tuple[int, int]]
    padded: bool
    param_count: int
    elastic_param_count: int
    zero_filled: int
    folded_bias: int
    adapters_merged: int
    notes: list[str] = field(default_factory=list)
    per_layer_code: bool = False  # written with per_layer_shapes and modeling_amoeba.py


@dataclass
class ExportPlan:
    """The exported model's config, its class (None: the stock class of ``config.model_type``) and the stored
    (KV groups, MLP channels) of every kept layer."""

    config: Any
    model_class: Optional[type]
    sizes: list[tuple[int, int]]

    @property
    def per_layer_code(self) -> bool:
        """True when the folder needs ``modeling_amoeba.py`` (layers of their own sizes)."""
        return self.model_class is not None


# ---------------------------------------------------------------------------------------- checks
def check_exportable(model: nn.Module, em: ElasticModel) -> None:
    """Refuse a base whose projection weights are packed (4/8-bit): they cannot be sliced or merged."""
    bits = None
    if getattr(model, "is_loaded_in_4bit", False):
        bits = 4
    elif getattr(model, "is_loaded_in_8bit", False):
        bits = 8
    packed = [f"layer {i} {role}" for i in range(em.num_layers)
              for role, mod in em.projections(i).items() if not _is_dense_linear(mod)]
    if bits is not None or packed:
        what = f"{bits}-bit" if bits else "packed (quantized)"
        where = f" ({packed[0]})" if packed else ""
        raise UsageError(f"the base model is loaded {what}{where}; its weights cannot be sliced or have adapters "
                         "merged into them. Load the base in bf16 for export: drop --bits and pass --bf16",
                         "--bits")


def _adapter_delta(module: nn.Module) -> Optional[torch.Tensor]:
    """The merged adapter delta [out_features, in_features] of one projection for the current subnet."""
    adapter = module._modules.get("amoeba_adapter")
    if adapter is None:
        return None
    if not callable(getattr(adapter, "merged_delta", None)):
        raise UsageError(f"cannot merge adapter {type(adapter).__name__}: it offers no merged_delta()")
    delta = adapter.merged_delta()
    w = module.weight
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"adapter delta {tuple(delta.shape)} does not match weight {tuple(w.shape)}")
    return delta


# ---------------------------------------------------------------------------------------- config
def _bias_plan(model_type: str, config, needs: set[str]) -> tuple[str, dict[str, bool]]:
    """(target model_type, bias flags) able to hold a bias on every projection role in ``needs``."""
    support = _BIAS_SUPPORT.get(model_type, {})
    can = {r for roles in support.values() for r in roles}
    if needs <= can:
        flags = {flag: any(r in needs for r in roles) for flag, roles in support.items() if flag != "fixed"}
        return model_type, flags
    # Qwen2 (o_proj) and Mistral (all) have no bias switch: Llama is the same network when no sliding
    # window is in effect, and it has one.
    llama = _BIAS_SUPPORT["llama"]
    if model_type in ("qwen2", "mistral") and _no_sliding_window(config):
        flags = {flag: any(r in needs for r in roles) for flag, roles in llama.items()}
        return "llama", flags
    missing = sorted(needs - can)
    raise UsageError(f"a '{model_type}' model cannot hold a bias on {', '.join(missing)}, so the FLAP bias "
                     "of this width cannot be folded in; export a width calibrated without bias, or a shape "
                     "of width 1", "--eval_num_width")


def _no_sliding_window(config) -> bool:
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return False
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", None) is False:
        window = None
    return window is None or window >= int(getattr(config, "max_position_embeddings", 0) or 0) > 0


def _config_data(em: ElasticModel, subnet: Subnet) -> dict:
    """The source config as a dict, at the subnet's depth (the source config is not touched)."""
    src = em.config
    data = src.to_dict()
    # The elastic model rewrites layer_types only inside a forward; outside it holds the full list.
    types = getattr(src, "layer_types", None)
    data.update(num_hidden_layers=subnet.num_layers, head_dim=em.head_dim, use_cache=True)
    if types:
        data["layer_types"] = [types[i] for i in subnet.layers]
    for key in ("_name_or_path", "architectures", "quantization_config", "auto_map", "transformers_version",
                "model_type"):
        data.pop(key, None)
    return data


def _subnet_config(em: ElasticModel, subnet: Subnet, groups: int, channels: int, model_type: str,
                   bias_flags: dict[str, bool]):
    """The stock config of the exported model: one size for every layer."""
    src = em.config
    data = _config_data(em, subnet)
    data.update(num_attention_heads=groups * em.queries_per_group, num_key_value_heads=groups,
                intermediate_size=channels)
    data.update(bias_flags)
    if model_type == src.model_type:
        config = AutoConfig.for_model(src.model_type, **data)
    else:
        # Llama and Mistral are the same network as the source here (checked by the callers).
        known = set(AutoConfig.for_model(model_type).to_dict())
        if model_type == "mistral":
            data["sliding_window"] = None
        dropped = sorted(k for k in data if k not in known)
        logger.info("writing the %s subnet as %s (same function); dropped config keys: %s", src.model_type,
                    model_type, ", ".join(dropped) or "none")
        data = {k: v for k, v in data.items() if k in known}
        config = AutoConfig.for_model(model_type, **data)
    config.architectures = [_causal_lm_class(config.model_type)]
    return config


def _per_layer_plan(em: ElasticModel, subnet: Subnet, sizes: list[tuple[int, int]]) -> ExportPlan:
    """Every kept layer at its own sizes: the base's config plus ``per_layer_shapes``, loaded through
    ``modeling_amoeba.py`` (the family's own classes, layers rebuilt at their sizes)."""
    model_type = em.config.model_type
    cls = modeling_amoeba.CLASS_FOR_MODEL_TYPE.get(model_type)
    if cls is None:
        raise UsageError(f"the exact export of per-layer widths covers "
                         f"{', '.join(sorted(modeling_amoeba.CLASS_FOR_MODEL_TYPE))}; "
                         f"a '{model_type}' model is not among them. Pass --export_format padded for a stock "
                         "folder with every layer padded to the widest one", "--export_format")
    shapes = []
    for layer, (groups, channels) in zip(subnet.layers, sizes):
        shape = {"num_attention_heads": groups * em.queries_per_group, "num_key_value_heads": groups,
                 "intermediate_size": channels}
        proj = em.projections(layer)
        for role in IN_SLICED:  # a FLAP bias where the family has no bias slot
            if em.state.bias[layer].get(role) is not None and getattr(proj[role], "bias", None) is None:
                shape[f"{role}_bias"] = True
        shapes.append(shape)
    data = _config_data(em, subnet)
    data[modeling_amoeba.SHAPES_KEY] = shapes
    data["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    config = AutoConfig.for_model(model_type, **data)
    config.architectures = [cls.__name__]
    return ExportPlan(config, cls, list(sizes))


def _bias_needs(em: ElasticModel, subnet: Subnet) -> set[str]:
    """Projection roles that carry a bias in some kept layer (the base's own or a FLAP bias)."""
    needs = set()
    for layer in subnet.layers:
        for role, mod in em.projections(layer).items():
            if getattr(mod, "bias", None) is not None:
                needs.add(role)
        needs.update(role for role, b in em.state.bias[layer].items() if b is not None)
    return needs


def plan_export(em: ElasticModel, subnet: Subnet, export_format: str = "exact") -> ExportPlan:
    """How ``subnet`` is written; call under ``em.use(subnet)`` (the plan reads that subnet's FLAP biases).

    ``exact``: a stock config when one holds the subnet without zero-filled heads or channels (uniform
    widths), else every layer at its own sizes through ``modeling_amoeba.py``. ``padded``: always a stock
    config, every layer padded with zeros to the widest kept one.
    """
    if export_format not in EXPORT_FORMATS:
        raise UsageError(f"'{export_format}' is not one of {', '.join(EXPORT_FORMATS)}", "--export_format")
    exact = export_format == "exact"
    sizes = em.layer_sizes(subnet)
    if exact and len(set(sizes)) > 1:
        return _per_layer_plan(em, subnet, sizes)
    try:
        model_type, flags = _bias_plan(em.config.model_type, em.config, _bias_needs(em, subnet))
    except UsageError:
        if exact:  # the per-layer code gives o_proj/down_proj a bias slot in any family
            return _per_layer_plan(em, subnet, sizes)
        raise
    widest = max(g for g, _ in sizes)
    model_type, groups = _fit_head_count(em, model_type, flags, widest)
    if exact and groups > widest:  # a stock config would need zero-filled heads
        return _per_layer_plan(em, subnet, sizes)
    channels = max(c for _, c in sizes)
    config = _subnet_config(em, subnet, groups, channels, model_type, flags)
    return ExportPlan(config, None, [(groups, channels)] * subnet.num_layers)


def _causal_lm_class(model_type: str) -> str:
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, AutoModelForCausalLM.__name__)


# ---------------------------------------------------------------------------------------- surgery
def _sliced_projection(em: ElasticModel, layer: int, role: str, kept: int, size: int,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor], int, bool]:
    """(weight, bias or None, zero-filled count, adapter merged) of one projection, sliced to ``kept``
    units of the prefix and padded with zeros to ``size`` (rows for q/k/v/gate/up, columns for o/down).

    Runs under ``em.use(subnet)`` so the adapter delta and the FLAP bias are those of the subnet.
    """
    mod = em.projections(layer)[role]
    weight = mod.weight.detach()
    delta = _adapter_delta(mod)
    bias = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    zero = 0
    if role in OUT_SLICED:
        w = weight[:kept].float()
        if delta is not None:
            w = w + delta[:kept].float()
        b = bias[:kept].float() if bias is not None else None
        if kept < size:
            w = torch.cat([w, w.new_zeros(size - kept, w.shape[1])])
            zero += (size - kept) * w.shape[1]
            if b is not None:
                b = torch.cat([b, b.new_zeros(size - kept)])
                zero += size - kept
    else:
        w = weight[:, :kept].float()
        if delta is not None:
            w = w + delta[:, :kept].float()
        if kept < size:
            w = torch.cat([w, w.new_zeros(w.shape[0], size - kept)], dim=1)
            zero += w.shape[0] * (size - kept)
        b = bias.float() if bias is not None else None
        flap = em.state.bias[layer].get(role)
        if flap is not None:
            flap = flap.detach().to(device=w.device, dtype=torch.float32).reshape(-1)
            if flap.numel() != w.shape[0]:
                raise ValueError(f"layer {layer} {role}: FLAP bias of {flap.numel()} for {w.shape[0]} outputs")
            b = flap if b is None else b + flap
    return w.to(out_dtype), (b.to(out_dtype) if b is not None else None), zero, delta is not None


def _role_sizes(em: ElasticModel, groups: int, channels: int) -> dict[str, int]:
    """Rows (q/k/v/gate/up) or columns (o/down) of each projection at ``groups`` KV groups, ``channels``."""
    hd, qpg = em.head_dim, em.queries_per_group
    return dict(q_proj=groups * qpg * hd, k_proj=groups * hd, v_proj=groups * hd, o_proj=groups * qpg * hd,
                gate_proj=channels, up_proj=channels, down_proj=channels)


def _state_dict_for(em: ElasticModel, subnet: Subnet, stored: list[tuple[int, int]],
                    target_keys: dict[str, torch.Size], dtype: torch.dtype) -> tuple[dict, dict]:
    """The exported model's state dict, built key by key from the target model's own keys; ``stored`` gives
    each kept layer's stored (KV groups, channels), at least its kept ones (the rest is zero-filled)."""
    model = em.model
    source = {k: v for k, v in model.state_dict().items()}
    prefix = _layers_prefix(model, em)
    stats = dict(zero_filled=0, folded_bias=0, adapters_merged=0)
    projected: dict[str, torch.Tensor] = {}
    for pos, (layer, (g, c), (sg, sc)) in enumerate(zip(subnet.layers, em.layer_sizes(subnet), stored)):
        kept, sizes = _role_sizes(em, g, c), _role_sizes(em, sg, sc)
        for role in ROLES:
            w, b, zero, merged = _sliced_projection(em, layer, role, kept[role], sizes[role], dtype)
            sub = "self_attn" if role in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"{prefix}{pos}.{sub}.{role}"
            projected[f"{key}.weight"] = w
            stats["zero_filled"] += zero
            stats["adapters_merged"] += int(merged)
            if f"{key}.bias" in target_keys:
                if b is None:
                    b = w.new_zeros(target_keys[f"{key}.bias"])
                    stats["zero_filled"] += b.numel()
                elif getattr(em.projections(layer)[role], "bias", None) is None:
                    stats["folded_bias"] += b.numel()  # a FLAP bias where the base had none
                projected[f"{key}.bias"] = b
            elif b is not None:
                raise ValueError(f"{key}: the exported architecture has no bias slot for a nonzero bias")
        for block, packed, names in em.family.packed:  # e.g. Phi-3: q/k/v written as one qkv_proj, in order
            key = f"{prefix}{pos}.{block}"
            for kind in ("weight", "bias"):
                parts = [projected.pop(f"{key}.{name}.{kind}", None) for name in names]
                if any(t is not None for t in parts):
                    projected[f"{key}.{packed}.{kind}"] = torch.cat(parts)
    out = {}
    for key, shape in target_keys.items():
        if key in projected:
            tensor = projected[key]
        else:
            src_key = _source_key(key, prefix, subnet)
            if src_key not in source:
                raise ValueError(f"exported key {key} has no source ({src_key})")
            tensor = source[src_key].detach()
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{key}: built {tuple(tensor.shape)}, the exported model expects {tuple(shape)}")
        out[key] = tensor
    return out, stats


def _layers_prefix(model: nn.Module, em: ElasticModel) -> str:
    """State-dict prefix of the decoder layers, e.g. ``model.layers.``."""
    for name, mod in model.named_modules():
        if mod is em.decoder:
            return f"{name}.layers." if name else "layers."
    raise ValueError("decoder not found among the model's modules")


def _source_key(key: str, prefix: str, subnet: Subnet) -> str:
    """The source model's key for an exported key (layer positions map back to original indices)."""
    if key.startswith(prefix):
        pos, rest = key[len(prefix):].split(".", 1)
        return f"{prefix}{subnet.layers[int(pos)]}.{rest}"
    return key


def _build(em: ElasticModel, subnet: Subnet, plan: ExportPlan, dtype: torch.dtype):
    """(empty target model, its state dict, counts, tied) for ``subnet`` (set already) as ``plan`` says."""
    target = _empty_model(plan, dtype)
    tied = bool(getattr(plan.config, "tie_word_embeddings", False))
    target_keys = {k: v.shape for k, v in target.state_dict().items()}
    if tied:
        target_keys = {k: s for k, s in target_keys.items() if not k.startswith("lm_head.")}
    state, stats = _state_dict_for(em, subnet, plan.sizes, target_keys, dtype)
    return target, state, stats, tied


def _empty_model(plan: ExportPlan, dtype: torch.dtype) -> nn.Module:
    """The exported model with its parameters on the meta device (buffers such as rope are real)."""
    plan.config.dtype = dtype
    with init_empty_weights():
        if plan.model_class is not None:
            return plan.model_class._from_config(plan.config, dtype=dtype)
        return AutoModelForCausalLM.from_config(plan.config, dtype=dtype)


def stored_param_count(em: ElasticModel, subnet: Subnet, export_format: str = "exact") -> int:
    """Parameters the exported folder of ``subnet`` holds in ``export_format`` (built on the meta device, so
    nothing is sliced or allocated); tied embeddings count once."""
    with em.use(subnet):
        plan = plan_export(em, subnet, export_format)
    target = _empty_model(plan, torch.float32)
    total = sum(p.numel() for p in target.parameters())
    out_emb, in_emb = target.get_output_embeddings(), target.get_input_embeddings()
    if (getattr(plan.config, "tie_word_embeddings", False) and out_emb is not None
            and out_emb.weight is not in_emb.weight):
        total -= out_emb.weight.numel()
    return int(total)


# Families whose config refuses a head count that does not divide hidden_size, even with head_dim explicit
HEAD_COUNT_DIVIDES_HIDDEN = ("llama", "gemma", "gemma2", "gemma3_text")


def _fit_head_count(em: ElasticModel, model_type: str, flags: dict[str, bool], groups: int) -> tuple[str, int]:
    """(model_type, KV groups) that the config validators accept.

    Llama's config insists that ``hidden_size`` is a multiple of ``num_attention_heads`` even when
    ``head_dim`` is explicit (e.g. 28 heads of 128 in a 4096 model). Without biases the same network is
    written as Mistral with no sliding window, which has no such check; with biases the head count is
    padded with zero heads up to the next count that passes (exact, but no attention saving there). Gemma 1/2/3
    check the same and have no such sibling: their heads are padded the same way (the exact format then writes
    every layer at its own size instead, see :func:`plan_export`).
    """
    hidden = int(em.config.hidden_size)
    if model_type not in HEAD_COUNT_DIVIDES_HIDDEN or hidden % (groups * em.queries_per_group) == 0:
        return model_type, groups
    if model_type == "llama" and not any(flags.values()):
        logger.info("%d heads do not divide hidden size %d, which Llama's config refuses: writing the same "
                    "network as mistral (no sliding window)", groups * em.queries_per_group, hidden)
        return "mistral", groups
    for g in range(groups + 1, em.num_kv_groups + 1):
        if hidden % (g * em.queries_per_group) == 0:
            logger.warning("%d heads do not divide hidden size %d and a bias is needed: padding to %d zero-filled "
                           "heads", groups * em.queries_per_group, hidden, g * em.queries_per_group)
            return model_type, g
    return model_type, em.num_kv_groups


@torch.no_grad()
def slice_subnet(model: nn.Module, em: ElasticModel, subnet: Subnet, export_format: str = "exact") -> SlicedModel:
    """Build ``subnet`` of the elastic model as a smaller transformers model (in memory), as ``export_format``
    says (see :func:`plan_export`).

    The result lives on the source model's device and dtype and does not share storage with it.
    """
    check_exportable(model, em)
    em.check(subnet)
    sizes = em.layer_sizes(subnet)
    ref = em.projections(subnet.layers[0])["q_proj"].weight
    dtype, device = ref.dtype, ref.device

    # eval mode: a shape-aware router gives its deterministic (evaluation) gates
    with eval_mode(model), em.use(subnet):
        plan = plan_export(em, subnet, export_format)
        target, state, stats, tied = _build(em, subnet, plan, dtype)
    padded = list(plan.sizes) != list(sizes)
    if padded and len(set(sizes)) > 1:
        logger.warning("subnet %s has per-layer widths; --export_format padded zero-pads every layer to the widest "
                       "(%d KV groups, %d channels): exact logits, stock config, not minimal", subnet.label,
                       *plan.sizes[0])
    state = {k: v.to(device).clone() for k, v in state.items()}
    missing, unexpected = target.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if not k.startswith("lm_head.")]:
        raise ValueError(f"exported state dict mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        target.tie_weights()
    target.to(device)
    target.eval()
    stored = sum(p.numel() for p in target.parameters())  # tied weights are one parameter
    model_type = plan.config.model_type
    notes = []
    if model_type != em.config.model_type:
        notes.append(f"written as {model_type}, the same network: a {em.config.model_type} config cannot hold "
                     "this shape (its biases or its head count)")
    if plan.per_layer_code:
        notes.append(f"every layer at its own sizes (config per_layer_shapes); load with trust_remote_code=True "
                     f"({MODELING_FILE})")
    if padded:
        notes.append("zero-padded to the widest kept layer (exact logits)")
    return SlicedModel(target, subnet, model_type, em.config.model_type, list(sizes), padded, int(stored),
                       em.param_count(subnet), stats["zero_filled"], stats["folded_bias"],
                       stats["adapters_merged"], notes, plan.per_layer_code)


# ---------------------------------------------------------------------------------------- writing
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (identifies the strategy an export came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_subnet(model: nn.Module, tokenizer, em: ElasticModel, subnet: Subnet, out_dir: str | os.PathLike,
                  overwrite: bool = False, provenance: Optional[dict[str, Any]] = None,
                  export_format: str = "exact", protected: Sequence[tuple[Any, str, str]] = ()) -> Path:
    """Write ``subnet`` as a Hugging Face model folder (safetensors, config, tokenizer, record).

    Per-layer widths in the ``exact`` format also get ``modeling_amoeba.py`` (see the module docstring).
    The folder is written to a temporary sibling and renamed into place. Whether ``out_dir`` may be written,
    or replaced, is decided by :func:`check_export_target` (``overwrite`` and the ``protected`` paths, see
    :func:`protected_paths`). ``provenance`` (base model, strategy file and hash, adapters folder, ...) is
    stored in ``amoeba_export.json`` with the shape and parameter counts.
    """
    out = check_export_target(out_dir, overwrite, protected)
    sliced = slice_subnet(model, em, subnet, export_format)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        sliced.model.save_pretrained(tmp)
        if sliced.per_layer_code:
            shutil.copyfile(modeling_amoeba.__file__, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            logger.warning("no tokenizer given: the export holds the model only")
        write_json(tmp / EXPORT_RECORD, export_record(sliced, em, provenance))
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s: %d layers, %d parameters (%.3f of the full model) to %s", subnet.label,
                subnet.num_layers, sliced.param_count, sliced.param_count / em.param_count(em.full_subnet()), out)
    return out


def export_record(sliced: SlicedModel, em: ElasticModel, provenance: Optional[dict[str, Any]] = None) -> dict:
    """The ``amoeba_export.json`` content: where the export came from and what it holds."""
    subnet = sliced.subnet
    full = em.param_count(em.full_subnet())
    record = {
        "base_model": getattr(em.config, "_name_or_path", None) or None,
        "strategy_file": None,
        "strategy_sha256": None,
        "adapters_dir": None,
        "shape": {
            "label": subnet.label,
            "num_layers": subnet.num_layers,
            "kept_layers": list(subnet.layers),
            "width": list(subnet.width) if isinstance(subnet.width, tuple) else subnet.width,
            "kv_groups_per_layer": [g for g, _ in sliced.layer_sizes],
            "mlp_channels_per_layer": [c for _, c in sliced.layer_sizes],
            "padded_to_widest_layer": sliced.padded,
        },
        "per_layer_code": sliced.per_layer_code,
        "model_type": sliced.model_type,
        "source_model_type": sliced.source_model_type,
        "param_count": sliced.param_count,
        "elastic_param_count": sliced.elastic_param_count,
        "zero_filled_params": sliced.zero_filled,
        "folded_bias_params": sliced.folded_bias,
        "full_model_param_count": full,
        "param_ratio": sliced.param_count / full,
        "adapters_merged": sliced.adapters_merged,
        "notes": sliced.notes,
        "versions": library_versions(),
    }
    record.update(provenance or {})
    return record


def is_export_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder this project wrote as an export: its ``amoeba_export.json`` is a record
    with the shape and parameter count (the marker :func:`check_export_target` requires before replacing it)."""
    record = Path(path) / EXPORT_RECORD
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("shape"), dict) and "param_count" in data


def _within(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (both absolute and normalised)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_export_target(out_dir: str | os.PathLike, overwrite: bool = False,
                        protected: Sequence[tuple[Any, str, str]] = (), flag: str = "--export_dir") -> Path:
    """The one rule for where an export may be written; returns ``out_dir`` as a Path or raises UsageError.

    - ``out_dir`` is never one of the ``protected`` paths (``(path, its flag, what it is)``: the run's output
      folder, the model, adapters and strategy being read) nor a folder holding one of them, whether or not it
      exists yet, and with or without ``overwrite``;
    - an existing ``out_dir`` is replaced only with ``overwrite`` and only when it is an earlier export of this
      project (:func:`is_export_folder`); any other folder or file is never deleted;
    - its parent must exist or be creatable, and be writable.
    A new subfolder of a protected folder (an export inside the run folder) is fine.
    """
    text = os.fspath(out_dir)
    if not text.strip():
        raise UsageError("an empty path names no folder; give the folder to write the export to", flag)
    out = Path(text).expanduser()
    # compare both the path as given and with links resolved: whichever way the names meet, refuse
    mine = {os.path.abspath(out), os.path.realpath(out)}
    for path, what_flag, what in protected:
        if path is None or not os.fspath(path).strip():
            continue
        theirs = {os.path.abspath(Path(path).expanduser()), os.path.realpath(Path(path).expanduser())}
        if any(_within(p, m) for p in theirs for m in mine):
            same = bool(mine & theirs)
            raise UsageError(f"{out} {'is' if same else 'holds'} {what} ({what_flag} {path}); an export never "
                             "replaces it, choose another folder (a new subfolder is fine)", flag)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"{out} exists and is not a folder", flag)
        if not overwrite:
            raise UsageError(f"{out} already exists; pass --overwrite to replace an earlier export", flag)
        if not is_export_folder(out):
            raise UsageError(f"{out} is not an export written by this project (it has no valid {EXPORT_RECORD}); "
                             "--overwrite only replaces earlier exports, choose another folder", flag)
    writable_dir(out.parent, flag, create=False)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (an earlier export, see :func:`check_export_target`) is
    moved aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not is_export_folder(out):  # checked before the work; refuse again if it changed since
        raise UsageError(f"{out} is no longer an export written by this project; nothing was replaced",
                         "--export_dir")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_symlink():  # a link to the earlier export was replaced: drop the link, not what it points to
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
