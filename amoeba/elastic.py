"""The elastic model: any depth and width of a stock Hugging Face Llama-family model, no fork.

How it works, on the installed transformers:

- **Depth.** A forward pre-hook on the decoder swaps its ``layers`` list for the kept layers (and
  renumbers their cache slots and ``config.layer_types`` to match); a forward hook that always runs
  puts the full list back. Parameters of every layer stay registered, so optimizers, ``state_dict``
  and DDP see the whole model, while skipped layers get no gradient.
- **Width.** Each layer's KV groups (a KV head with its query heads; plain heads for MHA) and MLP
  channels are ordered by importance once (a function-preserving permutation of weight rows and
  columns). Width ``r`` is then a prefix: q/k/v/gate/up use ``weight[:k]`` and o/down use
  ``weight[:, :k]``, so a narrower subnet does less arithmetic. The projections are the original
  modules with their class swapped for an elastic subclass, so ``state_dict`` keys do not change.
- **Masks** only where a weight cannot be sliced (bitsandbytes 4/8-bit): the same kept sets, the same
  result, full-size arithmetic.
- **One shared state**: every elastic projection reads the current subnet's sizes from a single
  :class:`ElasticState`; setting a subnet is O(layers), no loop over modules.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amoeba.errors import UsageError
from amoeba.families import check_width_support, family_of
from amoeba.modeling_amoeba import LayerConfigView
from amoeba.subnet import Subnet, width_key

logger = logging.getLogger(__name__)

ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")
OUT_SLICED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
IN_SLICED = ("o_proj", "down_proj")


@dataclass
class WidthPlan:
    """Per-layer kept KV groups and MLP channels for one width key, with optional FLAP biases.

    ``bias[(layer, role)]`` (role ``o_proj`` or ``down_proj``) is added to that module's output: the
    mean contribution of the removed heads/channels (FLAP's bias compensation).
    """

    groups: tuple[int, ...]
    channels: tuple[int, ...]
    bias: Optional[dict[tuple[int, str], torch.Tensor]] = None


class ElasticState:
    """The current subnet as every elastic projection sees it (one object per model)."""

    def __init__(self, num_layers: int):
        # dims[layer] = None when the layer runs at full width, else (q_out, kv_out, mlp_channels)
        self.dims: list[Optional[tuple[int, int, int]]] = [None] * num_layers
        self.bias: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.sliceable = True
        # Kept unit order per layer (original indices, most important first); used by masks.
        self.group_order: list[torch.Tensor] = []
        self.channel_order: list[torch.Tensor] = []
        self.head_dim = 0
        self.queries_per_group = 1
        self._mask_cache: dict = {}
        self._bias_cache: dict = {}

    def out_in(self, layer: int, role: str) -> tuple[Optional[int], Optional[int]]:
        """(kept output size or None, kept input size or None) of one projection now."""
        d = self.dims[layer]
        if d is None:
            return None, None
        q_out, kv_out, ch = d
        if role == "q_proj":
            return q_out, None
        if role in ("k_proj", "v_proj"):
            return kv_out, None
        if role == "o_proj":
            return None, q_out
        if role in ("gate_proj", "up_proj"):
            return ch, None
        return None, ch  # down_proj

    def unit_mask(self, layer: int, role: str, size: int, kept: int, device, dtype) -> torch.Tensor:
        """0/1 vector over ``size`` features keeping the ``kept`` most important ones (mask mode)."""
        key = (layer, role, size, kept, device, dtype)
        m = self._mask_cache.get(key)
        if m is None:
            if role in ("gate_proj", "up_proj", "down_proj"):
                order, unit = self.channel_order[layer], 1
            elif role == "q_proj" or role == "o_proj":
                order, unit = self.group_order[layer], self.head_dim * self.queries_per_group
            else:
                order, unit = self.group_order[layer], self.head_dim
            units = order[: kept // unit]
            m = torch.zeros(size // unit, dtype=dtype, device=device)
            m[units.to(device)] = 1
            m = m.repeat_interleave(unit)
            self._mask_cache[key] = m
        return m

    def output_bias(self, layer: int, role: str, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The FLAP bias of this projection under the current subnet, cast like ``like``."""
        b = self.bias[layer].get(role)
        if b is None:
            return None
        key = (id(b), like.device, like.dtype)
        cached = self._bias_cache.get(key)
        if cached is None:
            cached = b.to(device=like.device, dtype=like.dtype)
            self._bias_cache[key] = cached
        return cached


class ElasticLinearMixin:
    """Mixed into the class of each q/k/v/o/gate/up/down projection (see :func:`_make_elastic_class`).

    ``amoeba_state``/``amoeba_layer``/``amoeba_role`` locate the module; ``amoeba_adapter``, when set,
    is called as ``adapter(x, out_k)`` on the (possibly narrowed) input and returns the output delta.
    """

    amoeba_state: ElasticState
    amoeba_layer: int
    amoeba_role: str
    amoeba_prepared: Optional[tuple] = None  # set by ElasticModel.prepare_projections (compiled layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (documented on the class)
        prepared = self.amoeba_prepared
        if prepared is not None:
            return self._prepared_forward(x, prepared)
        st = self.amoeba_state
        out_k, in_k = st.out_in(self.amoeba_layer, self.amoeba_role)
        if out_k is None and in_k is None:
            y = super().forward(x)
        elif st.sliceable:
            y = F.linear(x, *self.kept_weight(out_k, in_k))
        else:
            if in_k is not None:
                x = x * st.unit_mask(self.amoeba_layer, self.amoeba_role, x.shape[-1], in_k, x.device, x.dtype)
            y = super().forward(x)
            if out_k is not None:
                y = y * st.unit_mask(self.amoeba_layer, self.amoeba_role, y.shape[-1], out_k, y.device, y.dtype)
        adapter = self._modules.get("amoeba_adapter")
        if adapter is not None:
            y = y + adapter(x, out_k)
        extra = st.output_bias(self.amoeba_layer, self.amoeba_role, y)
        if extra is not None:
            y = y + extra
        return y


    def kept_weight(self, out_k: Optional[int], in_k: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) cut to the kept ``out_k`` rows and ``in_k`` columns (None: all), as views."""
        weight, bias = self.weight, self.bias
        if out_k is not None:
            weight = weight[:out_k]
            bias = bias[:out_k] if bias is not None else None
        if in_k is not None:
            weight = weight[:, :in_k]
        return weight, bias

    def _prepared_forward(self, x: torch.Tensor, prepared: tuple) -> torch.Tensor:
        """The same computation from tensors taken before the layer ran (:meth:`ElasticModel.prepare_projections`):
        no read of per-layer Python state, so a compiled layer serves every layer and width. ``weight`` None: a
        packed (4-bit) base, its widths by the 0/1 masks ``in_mask`` / ``out_mask`` (None: all kept)."""
        weight, bias, a, b, extra, in_mask, out_mask = prepared
        if weight is None:
            if in_mask is not None:
                x = x * in_mask.to(x.dtype)  # 0/1: the same numbers in any dtype
            y = super().forward(x)
            if out_mask is not None:
                y = y * out_mask.to(y.dtype)
        else:
            y = F.linear(x, weight, bias)
        if a is not None:
            h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
            delta = F.linear(F.linear(self._modules["amoeba_adapter"].dropout(h), a), b)
            if out_mask is not None:  # only a packed base has masks
                delta = delta * out_mask.to(delta.dtype)
            y = y + delta.to(x.dtype)
        if extra is not None:
            y = y + extra.to(device=y.device, dtype=y.dtype)
        return y


_ELASTIC_CLASSES: dict[type, type] = {}


def _make_elastic_class(base: type) -> type:
    """An elastic subclass of a linear class (cached), so isinstance checks and state_dict keep working."""
    cls = _ELASTIC_CLASSES.get(base)
    if cls is None:
        cls = type(f"Elastic{base.__name__}", (ElasticLinearMixin, base), {"__module__": __name__})
        _ELASTIC_CLASSES[base] = cls
    return cls


def _is_dense_linear(module: nn.Module) -> bool:
    """True when the weight is a plain 2-D parameter that can be sliced (not packed 4/8-bit)."""
    w = getattr(module, "weight", None)
    return type(w) is nn.Parameter and w.dim() == 2


class PackedProjection(nn.Module):
    """A packed projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) held as its parts.

    The family's forward still calls it once and splits its output; each part (``q_proj``, ``k_proj``, ...) is
    a linear module of its own, so it slices, reorders, takes adapters and exports like Llama's. ``state_dict``
    and ``load_state_dict`` use the packed key (``...qkv_proj.weight``), as the checkpoint does.
    """

    def __init__(self, packed: nn.Linear, names: Sequence[str], sizes: Sequence[int]):
        super().__init__()
        weight, bias = packed.weight.detach(), packed.bias
        start = 0
        for name, size in zip(names, sizes):
            part = nn.Linear(packed.in_features, size, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            part.weight = nn.Parameter(weight[start:start + size].clone(), requires_grad=packed.weight.requires_grad)
            if bias is not None:
                part.bias = nn.Parameter(bias.detach()[start:start + size].clone(), requires_grad=bias.requires_grad)
            self.add_module(name, part)
            start += size
        self.names = tuple(names)
        self.register_state_dict_post_hook(PackedProjection._pack_state)
        self.register_load_state_dict_pre_hook(PackedProjection._unpack_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (see class)
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)

    @staticmethod
    def _pack_state(module: "PackedProjection", state_dict, prefix: str, local_metadata) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in module.names]
            if all(k in state_dict for k in keys):
                state_dict[prefix + kind] = torch.cat([state_dict.pop(k) for k in keys])

    @staticmethod
    def _unpack_state(module: "PackedProjection", state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
        for kind in ("weight", "bias"):
            packed = state_dict.pop(prefix + kind, None)
            if packed is None:
                continue
            start = 0
            for name in module.names:
                size = getattr(module, name).out_features
                state_dict[f"{prefix}{name}.{kind}"] = packed[start:start + size]
                start += size


def _unpack_projections(model: nn.Module, layers: nn.ModuleList, family) -> None:
    """Hold each packed projection of the family as its parts (see :class:`PackedProjection`)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    sizes = {"q_proj": config.num_attention_heads * head_dim, "k_proj": kv, "v_proj": kv,
             "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    for layer in layers:
        for block_name, packed_name, names in family.packed:
            block = getattr(layer, block_name)
            packed = getattr(block, packed_name)
            if isinstance(packed, PackedProjection):
                continue
            if not _is_dense_linear(packed):
                raise UsageError(f"{config.model_type}: the packed {packed_name} of a quantized model cannot be "
                                 "split into its parts; load it in 16 or 32 bits (without --bits)")
            setattr(block, packed_name, PackedProjection(packed, names, [sizes[n] for n in names]))


def _role_module(block: nn.Module, role: str) -> nn.Module:
    """The projection ``role`` of an attention or MLP block, also when it is a part of a packed projection."""
    module = getattr(block, role, None)
    if module is not None:
        return module
    for child in block.children():
        if isinstance(child, PackedProjection) and role in child.names:
            return getattr(child, role)
    raise UsageError(f"{type(block).__name__} has no {role}")


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder (the module holding ``layers``) of a causal LM, through PEFT wrappers too."""
    m = model
    for _ in range(4):
        if hasattr(m, "layers") and isinstance(m.layers, nn.ModuleList):
            return m
        inner = getattr(m, "model", None) or getattr(m, "base_model", None)
        if inner is None or inner is m:
            break
        m = inner
    raise UsageError(f"cannot find the decoder layers of {type(model).__name__}")


FIXED_STORAGE = "_amoeba_fixed_storage"  # a projection's operand storage for prepare_projections(fixed_addresses=True)


def copy_to_fixed_address(store: dict, slot, t: torch.Tensor, rows: Optional[int] = None,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` copied (as ``dtype``, default its own) into the first rows of the storage ``store`` keeps for ``slot``,
    differentiable: the same values at the same address at every call. The storage has ``rows`` rows (default
    ``t``'s) and is allocated again only when its shape, type or device no longer fit."""
    dtype = dtype or t.dtype
    shape = (rows if rows is not None else t.shape[0], *t.shape[1:])
    kept = store.get(slot)
    if kept is None or tuple(kept.shape) != shape or kept.dtype != dtype or kept.device != t.device:
        kept = store[slot] = torch.empty(shape, dtype=dtype, device=t.device)
    return kept.detach()[:t.shape[0]].copy_(t)  # a fresh autograd history at each call; the gradient flows to t


def _at_fixed_address(mod: nn.Module, slot: str, t: torch.Tensor) -> torch.Tensor:
    """:func:`copy_to_fixed_address` into storage ``mod`` keeps (not a buffer: no state dict entry)."""
    return copy_to_fixed_address(mod.__dict__.setdefault(FIXED_STORAGE, {}), slot, t)


class ElasticModel:
    """Run any subnet of a Llama-family causal LM. Create with :func:`make_elastic`.

    The wrapped ``model`` stays a normal ``transformers`` model: call it, train it, evaluate it; it
    runs whatever subnet was set last (the full model at first).
    """

    def __init__(self, model: nn.Module):
        config = model.config
        self.family = family_of(getattr(config, "model_type", None))
        self.model = model
        self.config = config
        self.decoder = find_decoder(model)
        self.all_layers: nn.ModuleList = self.decoder.layers
        self.num_layers = len(self.all_layers)
        if self.family.packed:
            _unpack_projections(model, self.all_layers, self.family)
        attn0 = self.all_layers[0].self_attn
        self.head_dim = int(getattr(attn0, "head_dim", config.hidden_size // config.num_attention_heads))
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_groups = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        if self.num_heads % self.num_kv_groups:
            raise UsageError(f"{self.num_heads} query heads do not split into {self.num_kv_groups} KV groups")
        self.queries_per_group = self.num_heads // self.num_kv_groups
        self.intermediate_size = int(_role_module(self.all_layers[0].mlp, "gate_proj").out_features)
        self.state = ElasticState(self.num_layers)
        self.state.head_dim = self.head_dim
        self.state.queries_per_group = self.queries_per_group
        self.state.group_order = [torch.arange(self.num_kv_groups) for _ in range(self.num_layers)]
        self.state.channel_order = [torch.arange(self.intermediate_size) for _ in range(self.num_layers)]
        self.width_plans: dict[float, WidthPlan] = {}
        self._subnet = Subnet.full(self.num_layers)
        self._kept: Optional[nn.ModuleList] = None
        self._orig_layer_types = list(getattr(config, "layer_types", None) or []) or None
        self._wrap_projections()
        if self.family.packed:
            self._follow_head_counts()
        self.decoder.register_forward_pre_hook(self._enter_depth, with_kwargs=True)
        self.decoder.register_forward_hook(self._leave_depth, always_call=True)

    # ------------------------------------------------------------------ structure
    def projections(self, layer: int) -> dict[str, nn.Module]:
        """The seven projections of one decoder layer, by role."""
        blk = self.all_layers[layer]
        mods = {r: _role_module(blk.self_attn, r) for r in ATTN_ROLES}
        mods.update({r: _role_module(blk.mlp, r) for r in MLP_ROLES})
        return mods

    def _wrap_projections(self) -> None:
        sliceable = True
        for i in range(self.num_layers):
            for role, mod in self.projections(i).items():
                if not isinstance(mod, ElasticLinearMixin):
                    sliceable &= _is_dense_linear(mod)
                    mod.__class__ = _make_elastic_class(type(mod))
                mod.amoeba_state, mod.amoeba_layer, mod.amoeba_role = self.state, i, role
        self.state.sliceable = sliceable
        logger.info("elastic model: %d layers, %d KV groups x %d queries, head dim %d, MLP %d, %s width",
                    self.num_layers, self.num_kv_groups, self.queries_per_group, self.head_dim,
                    self.intermediate_size, "sliced" if sliceable else "masked")

    def _follow_head_counts(self) -> None:
        """Attention that splits a packed q/k/v output by its config's head counts (Phi-3) reads, per layer, a
        view of the config whose counts follow the current subnet (set by a pre-hook before each call)."""
        for i, layer in enumerate(self.all_layers):
            attn = layer.self_attn
            attn.config = LayerConfigView(self.config, num_attention_heads=self.num_heads)
            attn.register_forward_pre_hook(lambda module, args, i=i: self._set_head_counts(module, i))

    def _set_head_counts(self, attn: nn.Module, layer: int) -> None:
        dims = self.state.dims[layer] if self.state.sliceable else None
        q_out, kv_out = (dims[0], dims[1]) if dims is not None else (self.num_heads * self.head_dim,
                                                                     self.num_kv_groups * self.head_dim)
        attn.config.num_attention_heads = q_out // self.head_dim
        attn.num_key_value_heads = kv_out // self.head_dim

    @property
    def width_supported(self) -> bool:
        """False for families whose width cannot be sliced exactly (see :mod:`amoeba.families`)."""
        return self.family.width

    @property
    def sliceable(self) -> bool:
        """True when width is taken by slicing weights (dense), False when by masks (4/8-bit)."""
        return self.state.sliceable

    # ------------------------------------------------------------------ depth hooks
    def _enter_depth(self, module, args, kwargs):
        if self._kept is None:
            return None
        module.layers = self._kept
        for pos, blk in enumerate(self._kept):
            _set_layer_idx(blk, pos)
        if self._orig_layer_types is not None:
            self.config.layer_types = [self._orig_layer_types[i] for i in self._subnet.layers]
            # transformers 5.17 passes ``past_key_values``, later versions ``cache``
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:
                _align_cache(cache, self._orig_layer_types, self._subnet.layers)
        return None

    def _leave_depth(self, module, args, output):
        if self._kept is None:
            return
        module.layers = self.all_layers
        for idx in self._subnet.layers:
            _set_layer_idx(self.all_layers[idx], idx)
        if self._orig_layer_types is not None:
            self.config.layer_types = list(self._orig_layer_types)

    # ------------------------------------------------------------------ compiled layers
    def prepare_projections(self, fixed_addresses: bool = False) -> None:
        """Give each projection of the current subnet's layers its operands as tensors: the kept weight rows and
        columns and bias (a packed base: its 0/1 input and output masks instead), the mixed and cut adapter
        matrices and the FLAP bias (the paths of :class:`ElasticLinearMixin`, computed once per forward outside
        the layers). Run before every decoder forward by :mod:`amoeba.compiled`; the numbers are the same as
        without it.

        ``fixed_addresses``: the operands computed anew at each forward (plain LoRA's scaled B, a packed base's
        masks) are copied into storage kept per projection, so each sits at the same address at every forward (the
        router does the same for the mixed MoE adapters, see :class:`amoeba.adapters.ShapeRouter`). The compiler
        takes tensors held by modules as fixed inputs of a CUDA graph, whose replay reads them where they were
        recorded; at a new address the graph is recorded again, at every forward."""
        st = self.state
        keep = _at_fixed_address if fixed_addresses else (lambda mod, slot, t: t)
        for i in self._subnet.layers:
            for role, mod in self.projections(i).items():
                out_k, in_k = st.out_in(i, role)
                weight = bias = in_mask = out_mask = None
                if st.sliceable:
                    weight, bias = mod.kept_weight(out_k, in_k)
                else:  # float32 masks, cast to the operand's dtype in the layer (under autocast it is not known here)
                    device = mod.weight.device
                    if in_k is not None:
                        in_mask = keep(mod, "in_mask", st.unit_mask(i, role, mod.in_features, in_k, device,
                                                                    torch.float32))
                    if out_k is not None:
                        out_mask = keep(mod, "out_mask", st.unit_mask(i, role, mod.out_features, out_k, device,
                                                                      torch.float32))
                a = b = None
                adapter = mod._modules.get("amoeba_adapter")
                if adapter is not None:
                    a, b = adapter.combined()
                    if adapter.router is None:  # plain LoRA: A is the parameter itself, B its scaled copy
                        b = keep(mod, "lora_b", b)
                    # MoE-LoRA: the router mixes into kept storage itself (see compile_layers), a product per group
                    if st.sliceable:  # masked widths keep every column and row
                        a = a[:, :in_k] if in_k is not None else a
                        b = b[:out_k] if out_k is not None else b
                mod.amoeba_prepared = (weight, bias, a, b, st.bias[i].get(role), in_mask, out_mask)

    def drop_prepared_projections(self) -> None:
        """Back to reading the subnet at each call (see :meth:`prepare_projections`); the storage kept for fixed
        addresses is freed."""
        for i in range(self.num_layers):
            for mod in self.projections(i).values():
                mod.amoeba_prepared = None
                mod.__dict__.pop(FIXED_STORAGE, None)

    # ------------------------------------------------------------------ subnets
    @property
    def subnet(self) -> Subnet:
        """The subnet the model runs now."""
        return self._subnet

    def full_subnet(self) -> Subnet:
        """The whole model as a subnet."""
        return Subnet.full(self.num_layers)

    def layer_sizes(self, subnet: Subnet) -> list[tuple[int, int]]:
        """(kept KV groups, kept MLP channels) of every kept layer of ``subnet``."""
        if isinstance(subnet.width, tuple):
            return [self._uniform_sizes(w) for w in subnet.width]
        plan = self.width_plans.get(subnet.width)
        if plan is not None:
            return [(plan.groups[i], plan.channels[i]) for i in subnet.layers]
        return [self._uniform_sizes(subnet.width)] * subnet.num_layers

    def _uniform_sizes(self, ratio: float) -> tuple[int, int]:
        groups = max(1, int(ratio * self.num_kv_groups + 0.5))
        channels = max(1, int(ratio * self.intermediate_size + 0.5))
        return groups, channels

    def check(self, subnet: Subnet) -> None:
        """Raise UsageError when ``subnet`` does not fit this model."""
        if subnet.layers[-1] >= self.num_layers:
            raise UsageError(f"layer {subnet.layers[-1]} asked, the model has {self.num_layers} layers")

    def set_subnet(self, subnet: Subnet) -> None:
        """Make the model run ``subnet`` from now on."""
        self.check(subnet)
        if not self.width_supported and subnet.width != 1.0 and any(
                g < self.num_kv_groups or c < self.intermediate_size for g, c in self.layer_sizes(subnet)):
            check_width_support(self.config.model_type, f"subnet {subnet.label}")
        st = self.state
        plan = None if isinstance(subnet.width, tuple) else self.width_plans.get(subnet.width)
        st.dims = [None] * self.num_layers
        st.bias = [{} for _ in range(self.num_layers)]
        for layer, (groups, channels) in zip(subnet.layers, self.layer_sizes(subnet)):
            if groups < self.num_kv_groups or channels < self.intermediate_size:
                q_out = groups * self.queries_per_group * self.head_dim
                st.dims[layer] = (q_out, groups * self.head_dim, channels)
            if plan is not None and plan.bias:
                for role in IN_SLICED:
                    b = plan.bias.get((layer, role))
                    if b is not None:
                        st.bias[layer][role] = b
        full_depth = subnet.num_layers == self.num_layers
        self._kept = None if full_depth else nn.ModuleList([self.all_layers[i] for i in subnet.layers])
        self._subnet = subnet

    @contextlib.contextmanager
    def use(self, subnet: Subnet) -> Iterator[None]:
        """Run ``subnet`` inside the block, then restore the previous one."""
        previous = self._subnet
        self.set_subnet(subnet)
        try:
            yield
        finally:
            self.set_subnet(previous)

    # ------------------------------------------------------------------ width plans and order
    def add_width_plan(self, ratio: float, groups: Sequence[int], channels: Sequence[int],
                       bias: Optional[dict[tuple[int, str], torch.Tensor]] = None) -> None:
        """Register per-layer kept sizes (and FLAP biases) under the width key ``ratio``."""
        groups, channels = tuple(int(g) for g in groups), tuple(int(c) for c in channels)
        check_width_support(self.config.model_type, f"width plan {ratio:g}")
        if len(groups) != self.num_layers or len(channels) != self.num_layers:
            raise UsageError(f"width plan {ratio:g} covers {len(groups)} layers, the model has {self.num_layers}")
        if min(groups) < 1 or max(groups) > self.num_kv_groups:
            raise UsageError(f"width plan {ratio:g}: KV groups per layer must lie in [1, {self.num_kv_groups}]")
        if min(channels) < 1 or max(channels) > self.intermediate_size:
            raise UsageError(f"width plan {ratio:g}: MLP channels per layer must lie in [1, "
                             f"{self.intermediate_size}]")
        self.width_plans[width_key(ratio)] = WidthPlan(groups, channels, dict(bias) if bias else None)

    def reorder(self, group_order: Sequence[torch.Tensor], channel_order: Sequence[torch.Tensor]) -> None:
        """Put each layer's KV groups and MLP channels in the given order (most important first).

        Orders are in the current unit order. Dense weights are permuted (function-preserving); packed
        weights keep their layout and the order drives the masks instead.
        """
        if len(group_order) != self.num_layers or len(channel_order) != self.num_layers:
            raise ValueError("one group order and one channel order per layer are needed")
        for i in range(self.num_layers):
            g = torch.as_tensor(group_order[i], dtype=torch.long).cpu()
            c = torch.as_tensor(channel_order[i], dtype=torch.long).cpu()
            _check_perm(g, self.num_kv_groups, f"layer {i} group order")
            _check_perm(c, self.intermediate_size, f"layer {i} channel order")
            if self.sliceable:
                self._permute_layer(i, g, c)
            self.state.group_order[i] = self.state.group_order[i][g]
            self.state.channel_order[i] = self.state.channel_order[i][c]
        self.state._mask_cache.clear()

    @torch.no_grad()
    def _permute_layer(self, i: int, g: torch.Tensor, c: torch.Tensor) -> None:
        p = self.projections(i)
        q_rows = expand_units(g, self._unit_size("q_proj"))
        kv_rows = expand_units(g, self._unit_size("k_proj"))
        for role, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows),
                           ("gate_proj", c), ("up_proj", c)):
            _permute_rows(p[role], rows)
        _permute_cols(p["o_proj"], q_rows)
        _permute_cols(p["down_proj"], c)

    def _unit_size(self, role: str) -> int:
        """Features of one unit of ``role``: a KV group's query heads (q/o), one KV head (k/v), one channel."""
        if role in MLP_ROLES:
            return 1
        return self.head_dim * (self.queries_per_group if role in ("q_proj", "o_proj") else 1)

    def feature_order(self, layer: int, role: str) -> torch.Tensor:
        """The original index of each feature of ``role`` in ``layer`` as its weight holds them now: the output rows
        of q/k/v/gate/up, the input columns of o/down. Dense weights are permuted by importance (:meth:`reorder`);
        packed (4/8-bit) ones keep the original layout, so for them this is the identity."""
        size = self.intermediate_size if role in MLP_ROLES else self.num_kv_groups * self._unit_size(role)
        if not self.sliceable:
            return torch.arange(size)
        if role in MLP_ROLES:
            return self.state.channel_order[layer]
        return expand_units(self.state.group_order[layer], self._unit_size(role))

    def group_kept_mask(self, layer: int, groups: int) -> torch.Tensor:
        """Boolean mask over the original KV groups of ``layer`` kept at ``groups`` groups."""
        m = torch.zeros(self.num_kv_groups, dtype=torch.bool)
        m[self.state.group_order[layer][:groups]] = True
        return m

    def channel_kept_mask(self, layer: int, channels: int) -> torch.Tensor:
        """Boolean mask over the original MLP channels of ``layer`` kept at ``channels`` channels."""
        m = torch.zeros(self.intermediate_size, dtype=torch.bool)
        m[self.state.channel_order[layer][:channels]] = True
        return m

    # ------------------------------------------------------------------ accounting
    def param_count(self, subnet: Optional[Subnet] = None) -> int:
        """Parameters that ``subnet`` (default: the current one) uses, as its exact export holds them: the kept
        rows and columns, and a FLAP bias vector where the width plan adds one to a projection without bias."""
        subnet = subnet or self._subnet
        plan = None if isinstance(subnet.width, tuple) else self.width_plans.get(subnet.width)
        flap_bias = (plan.bias or {}) if plan is not None else {}
        total = sum(p.numel() for n, p in self.model.named_parameters()
                    if ".layers." not in n and "amoeba_adapter" not in n and "lora_" not in n)
        out_emb = self.model.get_output_embeddings()
        if out_emb is not None and out_emb.weight is self.model.get_input_embeddings().weight:
            pass  # tied: counted once by named_parameters already
        hidden = self.config.hidden_size
        for layer, (groups, channels) in zip(subnet.layers, self.layer_sizes(subnet)):
            p = self.projections(layer)
            q_out = groups * self.queries_per_group * self.head_dim
            kv_out = groups * self.head_dim
            n = hidden * q_out * 2 + hidden * kv_out * 2 + hidden * channels * 3
            for role, size in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out),
                               ("gate_proj", channels), ("up_proj", channels)):
                if getattr(p[role], "bias", None) is not None:
                    n += size
            for role in IN_SLICED:
                if getattr(p[role], "bias", None) is not None or flap_bias.get((layer, role)) is not None:
                    n += hidden
            blk = self.all_layers[layer]
            n += sum(prm.numel() for name, prm in blk.named_parameters()
                     if not any(r in name for r in ATTN_ROLES + MLP_ROLES))
            total += n
        return int(total)


def expand_units(units: torch.Tensor, size: int) -> torch.Tensor:
    """The feature indices of whole units, in the units' order: unit ``u`` of ``size`` features covers features
    ``u * size`` to ``u * size + size - 1``."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _align_cache(cache, original_types: Sequence[str], kept: Sequence[int]) -> None:
    """Give an empty KV cache built for every layer one slot per kept layer, of that layer's type.

    ``generate`` builds its cache from the full config before the first forward, so slot ``p`` has the type
    of layer ``p``; a depth subnet runs its kept layers at positions 0..n-1, and where sliding-window and
    full-attention layers alternate (Gemma 2/3), slot ``p`` must have the type of the ``p``-th kept layer.
    The cache's own (still empty) slots are reused, by deep copy, so their class and settings stay the
    installed version's own.
    """
    slots = getattr(cache, "layers", None)
    if not isinstance(slots, list) or len(slots) != len(original_types):
        return  # not a per-layer cache, or already built for the kept layers
    if all(original_types[i] == original_types[p] for p, i in enumerate(kept)):
        return  # the types already line up
    if cache.get_seq_length() != 0:
        raise UsageError("a KV cache that already holds tokens was filled by another depth; start a new cache")
    cache.layers = [copy.deepcopy(slots[i]) for i in kept]


def _set_layer_idx(block: nn.Module, idx: int) -> None:
    """Point a decoder layer's KV-cache slot at ``idx`` (depth changes renumber kept layers)."""
    if hasattr(block, "self_attn") and hasattr(block.self_attn, "layer_idx"):
        block.self_attn.layer_idx = idx
    if hasattr(block, "layer_idx"):
        block.layer_idx = idx


def _check_perm(p: torch.Tensor, n: int, what: str) -> None:
    if p.numel() != n or not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise ValueError(f"{what} is not a permutation of {n} units")


def _permute_rows(lin: nn.Module, rows: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[rows.to(lin.weight.device)].contiguous()
    if getattr(lin, "bias", None) is not None:
        lin.bias.data = lin.bias.data[rows.to(lin.bias.device)].contiguous()


def _permute_cols(lin: nn.Module, cols: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[:, cols.to(lin.weight.device)].contiguous()


def make_elastic(model: nn.Module) -> ElasticModel:
    """Make ``model`` elastic (idempotent) and return its :class:`ElasticModel` handle."""
    existing = getattr(model, "_amoeba_elastic", None)
    if existing is not None:
        return existing
    em = ElasticModel(model)
    object.__setattr__(model, "_amoeba_elastic", em)  # not a submodule: keep state_dict unchanged
    return em


def get_elastic(model: nn.Module) -> ElasticModel:
    """The :class:`ElasticModel` handle of a model made elastic earlier."""
    em = getattr(model, "_amoeba_elastic", None)
    if em is None:
        raise ValueError("the model is not elastic; call make_elastic(model) first")
    return em
