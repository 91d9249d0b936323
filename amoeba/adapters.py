"""LoRA and shape-aware MoE-LoRA on the elastic projections, without forking peft.

Every elastic projection (see :class:`amoeba.elastic.ElasticLinearMixin`) calls its child module
``amoeba_adapter`` as ``adapter(x, out_k)``, where ``x`` is the input it actually used (already narrowed
to the kept input features for ``o_proj``/``down_proj`` in a narrower subnet) and ``out_k`` the kept
output size (None at full width). The adapter returns the output delta.

- :class:`MoELoRA` holds E experts (A_e, B_e) and applies ``(sum_e g_e B_e)(sum_e g_e A_e) x * alpha/r``.
  With one expert and no router (gate 1) it is plain LoRA, numerically the same as peft's.
- :class:`ShapeRouter` is one router for the whole model. Its input is the current subnet's shape (the
  kept-layer 0/1 mask and the one-hot width); it maps it through Linear(input -> 16) -> Linear(16 -> experts)
  (no activation between, as the paper's router) to the top-k expert gates. Noisy top-k gating while
  training, deterministic at evaluation, so a subnet's adapter is a fixed matrix that export can merge into
  its weights. Adapters saved with the earlier single-layer router load for evaluation and export (converted
  exactly, see :func:`upgrade_single_layer_router`).

Adapters are saved in the model's ORIGINAL head/channel order (the elastic model may have permuted its
dense weights by importance), so adapters trained on a bf16 model load on an 8-bit one and back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from amoeba.elastic import (ATTN_ROLES, IN_SLICED, MLP_ROLES, OUT_SLICED, ElasticModel, copy_to_fixed_address,
                            get_elastic)
from amoeba.errors import UsageError
from amoeba.files import atomic_path, write_json
from amoeba.subnet import Subnet

logger = logging.getLogger(__name__)

ALL_ROLES = ATTN_ROLES + MLP_ROLES
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "amoeba-moe-lora"
ROUTER_ATTR = "amoeba_router"
ROUTER_HIDDEN = 16  # the hidden size of the paper's router (two linear layers, no activation)
# the router tensors of adapters saved by earlier versions (a single linear layer to the expert logits)
LEGACY_ROUTER_KEYS = ("router.lora_gate_weight", "router.lora_gate_bias", "router.lora_noise_weight",
                      "router.lora_noise_bias")


@dataclass
class AdapterConfig:
    """What the adapters of a model are: saved next to their weights as ``adapter_config.json``."""

    r: int
    alpha: float
    dropout: float = 0.0
    modules: list[str] = field(default_factory=lambda: list(ALL_ROLES))
    num_experts: int = 1
    topk: int = 1
    use_router: bool = False
    widths: list[float] = field(default_factory=lambda: [1.0])
    num_layers: int = 0
    model_type: str = ""
    hidden_size: int = 0
    intermediate_size: int = 0
    num_kv_groups: int = 0
    queries_per_group: int = 0
    head_dim: int = 0
    format: str = FORMAT
    layout: str = "original"  # rows/columns in the base model's original head/channel order

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"rank r={self.r} must be at least 1")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be at least 1")
        if self.use_router and not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be between 1 and num_experts ({self.num_experts})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")

    def structure(self) -> dict:
        """The fields that must agree between saved adapters and the model they are loaded into."""
        keys = ("num_layers", "hidden_size", "intermediate_size", "num_kv_groups", "queries_per_group",
                "head_dim")
        return {k: getattr(self, k) for k in keys}


# ----------------------------------------------------------------------------------------------
# The router
# ----------------------------------------------------------------------------------------------
class ShapeRouter(nn.Module):
    """One router for the whole model: subnet shape -> top-k expert gates.

    Input features x: the kept-layer 0/1 mask over all layers, concatenated with the one-hot of the width
    (a subnet with per-layer widths uses the width key nearest to their mean). Expert logits:
    ``lora_route_out(lora_route_in(x))``, i.e. W2 (W1 x + b1) + b2 with W1 [16, input] and W2 [experts, 16]
    and no activation between, as the paper's router. While training, Gaussian noise scaled by
    ``softplus(lora_noise(x))`` (one linear layer) is added to the logits before the top-k (noisy top-k
    gating); in eval mode the gates are a deterministic function of the shape. The gates are the softmax of
    the chosen logits. All three layers start as ``nn.Linear`` does. The router runs in its own precision
    (fp32) even under autocast, so the experts a shape gets do not depend on the compute precision.

    Gates are computed once per model forward (a forward pre-hook on the decoder calls
    :meth:`current`, outside any gradient-checkpointed layer) and cached; in eval mode the cache lives
    until the subnet or the router's parameters change.
    """

    def __init__(self, num_layers: int, num_widths: int, num_experts: int, topk: int,
                 widths: Optional[list[float]] = None, hidden: int = ROUTER_HIDDEN):
        super().__init__()
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk={topk} must be between 1 and num_experts ({num_experts})")
        self.num_layers, self.num_widths = int(num_layers), int(num_widths)
        self.num_experts, self.topk, self.hidden = int(num_experts), int(topk), int(hidden)
        self.widths = [float(w) for w in (widths if widths is not None else [1.0] * num_widths)]
        if len(self.widths) != self.num_widths:
            raise ValueError(f"{len(self.widths)} width values for {num_widths} widths")
        d = self.num_layers + self.num_widths
        # Trainable modules carry the ``lora_`` prefix like every adapter tensor (filtering by name works).
        self.lora_route_in = nn.Linear(d, self.hidden)
        self.lora_route_out = nn.Linear(self.hidden, self.num_experts)
        self.lora_noise = nn.Linear(d, self.num_experts)
        self.noise_seed: Optional[int] = None
        self.suspended = False  # True while the model runs without adapters (see adapters_disabled)
        self._em: Optional[ElasticModel] = None
        self._forward_id = 0
        self._cache_key = None
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._members: list[tuple[int, MoELoRA]] = []  # (layer, adapter); plain references, not submodules
        self._mixes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mixed_stamp = None
        # How the experts of a group of adapters are mixed (one of MIX_METHODS): "product", one batched matrix product
        # with autograd's backward; "hybrid", element-wise kernels with a matrix-vector product for the gates' gradient
        # (:func:`hybrid_mix`); "elementwise", element-wise kernels only (:func:`weighted_sum`, an opt-in for
        # measurements). All agree to fp32 rounding. "auto" (the default): "hybrid" on CUDA, where it halves the mix's
        # time on the Llama-2-7B shape (docs/BENCHMARKS.md), and "product" elsewhere, which keeps the CPU's numbers
        # exactly as they were.
        self.mix = "auto"
        # Mixed adapters written into storage kept per group, so each adapter's mix sits at the same address at every
        # forward of a subnet: CUDA graphs of compiled layers (amoeba.compiled, --compile_mode reduce-overhead) read a
        # module's tensors where they were recorded, and record again when one moved.
        self.fixed_addresses: bool = False
        self._fixed_storage: dict[tuple, torch.Tensor] = {}

    def bind(self, em: ElasticModel) -> None:
        """Read the current subnet from ``em`` and recompute gates at every decoder forward."""
        object.__setattr__(self, "_em", em)  # a plain reference, not a submodule
        em.decoder.register_forward_pre_hook(self._on_decoder_forward)

    def _on_decoder_forward(self, module, args):
        self._forward_id += 1
        if self._em is not None and not self.suspended:
            self.current()  # computed here, outside gradient-checkpointed layers

    def width_index(self, width) -> int:
        """Index of the router's width nearest to ``width`` (a ratio, or per-layer ratios: their mean)."""
        w = sum(width) / len(width) if isinstance(width, tuple) else float(width)
        return min(range(self.num_widths), key=lambda j: (abs(self.widths[j] - w), j))

    def features(self, subnet: Subnet) -> torch.Tensor:
        """The router input of ``subnet``: layer mask (num_layers) then one-hot width (num_widths)."""
        x = torch.zeros(self.num_layers + self.num_widths, dtype=torch.float32)
        x[list(subnet.layers)] = 1.0
        x[self.num_layers + self.width_index(subnet.width)] = 1.0
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free expert logits for router input(s) ``x`` [..., input]: W2 (W1 x + b1) + b2."""
        return self.lora_route_out(self.lora_route_in(x))

    def route(self, subnet: Subnet, noisy: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert indices [topk], gates [topk]) for ``subnet``; noisy defaults to ``self.training``."""
        noisy = self.training if noisy is None else noisy
        w = self.lora_route_in.weight
        with torch.autocast(device_type=w.device.type, enabled=False):
            x = to_device_async(self.features(subnet), w.device).to(w.dtype)
            logits = self.logits(x)
            if noisy:
                std = F.softplus(self.lora_noise(x))
                if self.noise_seed is not None:  # reproducible noise (same on every process, survives resume)
                    g = torch.Generator().manual_seed(int(self.noise_seed))
                    eps = torch.randn(self.num_experts, generator=g)
                else:
                    eps = torch.randn(self.num_experts)
                logits = logits + to_device_async(eps, w.device).to(w.dtype) * std
            top, idx = torch.topk(logits, self.topk)
            return idx, torch.softmax(top, dim=-1)

    def gates(self, subnet: Subnet, noisy: Optional[bool] = None) -> torch.Tensor:
        """Dense gates over all experts (zeros outside the top-k) for ``subnet``."""
        return self._dense(*self.route(subnet, noisy))

    def _dense(self, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.num_experts, dtype=g.dtype, device=g.device).index_put((idx,), g)

    def _param_version(self) -> tuple:
        # the experts' versions too: evaluation caches their mix, which must follow an in-place load
        return (tuple(p._version for p in self.parameters()),
                tuple((ad.lora_A._version, ad.lora_B._version) for _, ad in self._members))

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates of the elastic model's current subnet as (indices [topk], gates [topk]) (cached; see
        the class docstring)."""
        return self._current()[:2]

    def current_dense(self) -> torch.Tensor:
        """The current gates as a dense vector over all experts (zeros outside the top-k), cached."""
        return self._current()[2]

    def add_member(self, layer: int, adapter: "MoELoRA") -> None:
        """Register an adapter of decoder layer ``layer`` whose experts this router mixes."""
        self._members.append((int(layer), adapter))

    def mixed(self, adapter: "MoELoRA") -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r] times alpha/r) of ``adapter`` mixed with the current gates (see :meth:`_mix_all`)."""
        # validated once per forward and subnet, not once per adapter (evaluation's check reads every
        # expert's version)
        stamp = (self._forward_id, self._em.subnet if self._em is not None else None)
        if stamp != self._mixed_stamp:
            self._current()
            self._mixed_stamp = stamp
        m = self._mixes.get(id(adapter))
        if m is None:  # not registered, or its layer is not in the subnet: mix it alone
            dense = self._cache[2]
            m = mix_experts(dense, adapter.lora_A, adapter.lora_B, dense * adapter.scaling)
        return m

    def _mix_all(self, subnet: Subnet, dense: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Mix the experts of every registered adapter of the subnet's layers at once.

        Adapters of equal shape are stacked and mixed by one matrix product, and the mixed matrices are cast to
        the autocast precision once: a few dozen kernels per forward instead of about ten per adapter, which
        is what a small model's training step is bound by. Skipped layers' adapters stay out of the graph (no
        gradient, so no optimizer update for them).
        """
        kept = set(subnet.layers)
        groups: dict[tuple, list[MoELoRA]] = {}
        sizes: dict[tuple, int] = {}  # each group's adapters in all layers (the rows of its kept storage)
        for layer, ad in self._members:
            key = _group_key(ad)
            sizes[key] = sizes.get(key, 0) + 1
            if layer in kept:
                groups.setdefault(key, []).append(ad)
        mixes = {}
        for key, ads in groups.items():
            shape_a, shape_b, device, dtype, scaling = key
            e, n = shape_a[0], len(ads)
            cast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            with torch.autocast(device_type=device.type, enabled=False):
                # stacked on a new first dim, so each adapter's gradient is a contiguous slice the optimizer
                # can take as it is (no copy per parameter)
                g = dense.to(device=device, dtype=dtype)
                stack_a = torch.stack([ad.lora_A for ad in ads]).view(n, e, -1)
                stack_b = torch.stack([ad.lora_B for ad in ads]).view(n, e, -1)
                mix = MIX_FUNCTIONS[self.mix_method(device)]
                a_all, b_all = mix(g, stack_a), mix(g * scaling, stack_b)
                a_all, b_all = a_all.view(n, *shape_a[1:]), b_all.view(n, *shape_b[1:])
                if self.fixed_addresses:  # the copy casts too
                    store, rows = self._fixed_storage, sizes[key]
                    a_all, b_all = (copy_to_fixed_address(store, (key, part), t, rows, cast or dtype)
                                    for part, t in (("a", a_all), ("b", b_all)))
                elif cast is not None:  # once here instead of once per adapter inside each product
                    a_all, b_all = a_all.to(cast), b_all.to(cast)
            for ad, a, b in zip(ads, a_all.unbind(0), b_all.unbind(0)):
                mixes[id(ad)] = (a, b)
        return mixes

    @property
    def mix(self) -> str:
        """How the experts are mixed: "auto" or one of MIX_METHODS (see ``__init__``); checked when set."""
        return self._mix

    @mix.setter
    def mix(self, name: str) -> None:
        if name not in MIX_CHOICES:
            raise ValueError(f"unknown expert mix {name!r}; one of {', '.join(MIX_CHOICES)}")
        self._mix = name

    def mix_method(self, device: torch.device) -> str:
        """The way experts on ``device`` are mixed: ``self.mix``, with "auto" resolved (see ``__init__``)."""
        if self._mix == "auto":
            return "hybrid" if device.type == "cuda" else "product"
        return self._mix

    def use_fixed_addresses(self, on: bool) -> None:
        """Mix into kept storage from now on (``on``), or as before, the storage freed (see ``fixed_addresses``)."""
        self.fixed_addresses = bool(on)
        if not on:
            self._fixed_storage.clear()

    def _current(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._em is None:
            raise RuntimeError("the router is not bound to an elastic model")
        subnet = self._em.subnet
        if self.training:
            key = ("train", subnet, self._forward_id, self.noise_seed)
        else:
            dev = self.lora_route_in.weight.device
            autocast = torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type)
            key = ("eval", subnet, self._param_version(), dev, autocast)
        if key != self._cache_key or self._cache is None:
            with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
                # fixed gates at evaluation: no graph kept alive across forwards
                idx, g = self.route(subnet)
                self._cache = (idx, g, self._dense(idx, g))
                # here too, once per forward and outside gradient-checkpointed layers: the mixed adapters
                self._mixes = self._mix_all(subnet, self._cache[2])
            self._cache_key = key
        return self._cache


def _group_key(ad: "MoELoRA") -> tuple:
    """Adapters mixed together by one product: the same shapes, device, type and scaling."""
    return tuple(ad.lora_A.shape), tuple(ad.lora_B.shape), ad.lora_A.device, ad.lora_A.dtype, ad.scaling


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without the host waiting: a copy from pageable memory to a GPU first waits
    for the GPU's queued work, so the next subnet's forward could not be queued while the last one's backward
    runs; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def mix_experts(gates: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                b_gates: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_e g_e A_e, sum_e h_e B_e) for dense gates g [E] and h = ``b_gates`` (default g).

    Mixing with the dense gate vector (zeros outside the top-k) instead of gathering the chosen experts
    keeps the number of kernels per adapter low, which is what a step of a small model is bound by; the
    unchosen experts get exactly zero gradient either way. The mix runs in the adapters' own precision even
    under autocast: casting the two mixed matrices costs two kernels, casting the expert stacks and the
    gates four.
    """
    e = lora_A.shape[0]
    with torch.autocast(device_type=lora_A.device.type, enabled=False):
        g = gates.to(device=lora_A.device, dtype=lora_A.dtype).view(1, e)
        h = g if b_gates is None else b_gates.to(device=lora_B.device, dtype=lora_B.dtype).view(1, e)
        a = (g @ lora_A.view(e, -1)).view(lora_A.shape[1:])
        b = (h @ lora_B.view(e, -1)).view(lora_B.shape[1:])
    return a, b


class _WeightedSum(torch.autograd.Function):
    """out[n] = sum_e g[e] * stack[n, e] for gates g [E] and a stack [N, E, X] (see :func:`weighted_sum`)."""

    @staticmethod
    def forward(ctx, gates: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(gates, stack)
        return _weighted_slices(gates, stack)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        # the gates' gradient: one dot product per expert, each over one expert's slice of the stack
        return _mix_backward(ctx, grad, lambda stack: torch.stack([(stack[:, i] * grad).sum()
                                                                    for i in range(stack.shape[1])]))


class _HybridMix(_WeightedSum):
    """:class:`_WeightedSum` with the gates' gradient by a batched matrix-vector product (see :func:`hybrid_mix`)."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        # per adapter the gradient [1, X] times its stack [X, E], summed over adapters
        return _mix_backward(ctx, grad, lambda stack: (grad.unsqueeze(1) @ stack.transpose(1, 2)).sum(0).view(-1))


def _mix_backward(ctx, grad: torch.Tensor, grad_of_gates) -> tuple:
    """(gates' gradient by ``grad_of_gates(stack)``, the stack's gradient) of a mix saved as (gates, stack)."""
    gates, stack = ctx.saved_tensors
    grad_gates = grad_of_gates(stack) if ctx.needs_input_grad[0] else None
    # the stack's gradient, an outer product: one element-wise kernel, written once, as the optimizer needs it
    grad_stack = grad.unsqueeze(1) * gates.view(1, -1, 1) if ctx.needs_input_grad[1] else None
    return grad_gates, grad_stack


def _check_fit(name: str, gates: torch.Tensor, stack: torch.Tensor) -> None:
    if gates.dim() != 1 or stack.dim() != 3 or stack.shape[1] != gates.shape[0]:
        raise ValueError(f"{name}: gates {tuple(gates.shape)} do not fit a stack {tuple(stack.shape)}")


def hybrid_mix(gates: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """sum_e gates[e] * stack[:, e] ([N, X]) for gates [E] and stack [N, E, X], differentiable in both: how the
    router mixes a group of adapters' experts on CUDA by default.

    Each part takes the fastest of the kernels measured for it (``scripts/bench_expert_mix.py``; docs/BENCHMARKS.md):
    the forward and the stack's gradient (an outer product of the output's gradient and the gates) element-wise, as
    :func:`weighted_sum`; the gates' gradient as one batched matrix-vector product, reading the stack once. The plain
    product ``gates.view(1, 1, E) @ stack`` pairs a dimension of E (a handful of experts) with one of millions, and
    cuBLAS runs it, and the outer product of its backward, far below the memory bandwidth. The stack's gradient
    equals the product's exactly (each entry is the same single product); the output and the gates' gradient
    agree to fp32 rounding.
    """
    _check_fit("hybrid_mix", gates, stack)
    return _HybridMix.apply(gates, stack)


def _weighted_slices(gates: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """sum_e gates[e] * stack[:, e], one element-wise kernel per expert."""
    out = stack[:, 0] * gates[0]
    for i in range(1, stack.shape[1]):
        out.addcmul_(stack[:, i], gates[i])
    return out


def weighted_sum(gates: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """sum_e gates[e] * stack[:, e] ([N, X]) for gates [E] and stack [N, E, X], differentiable in both.

    The same as ``gates.view(1, 1, E) @ stack``, but as element-wise kernels in both directions. The product
    pairs a dimension of E (a handful of experts) with one of millions (every adapter entry of a group), and
    cuBLAS runs such a product and its backward (an outer product and a long reduction) on fp32 CUDA cores
    in hundreds of launches: on a Llama-2-7B shape (H200, bf16, 4 x 512) a step's products took 62 ms more than
    a plain LoRA step's, 26 ms of it in 512 such launches (docs/BENCHMARKS.md). Here
    the forward reads each expert's slice once, and the backward writes the stack's gradient once and reads
    the stack once more for the gates' gradient.
    """
    _check_fit("weighted_sum", gates, stack)
    return _WeightedSum.apply(gates, stack)


def _plain_product(gates: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``gates [E] @ stack [N, E, X]`` as one batched product, autograd's backward (see :func:`hybrid_mix`)."""
    return (gates.view(1, 1, -1) @ stack).squeeze(1)


MIX_FUNCTIONS = {"product": _plain_product, "hybrid": hybrid_mix, "elementwise": weighted_sum}
MIX_METHODS = tuple(MIX_FUNCTIONS)
MIX_CHOICES = MIX_METHODS + ("auto",)  # what ShapeRouter.mix and --moe_mix accept


# ----------------------------------------------------------------------------------------------
# The adapter layer
# ----------------------------------------------------------------------------------------------
class MoELoRA(nn.Module):
    """LoRA with E experts mixed by the shared :class:`ShapeRouter` (plain LoRA: E=1, no router).

    ``lora_A``: [E, r, in_features] (kaiming-uniform, as peft), ``lora_B``: [E, out_features, r] (zeros).
    The delta is ``(sum_e g_e B_e)(sum_e g_e A_e) dropout(x) * alpha / r``; A's columns are cut to the
    input actually given and B's rows to ``out_k`` (prefix slicing of the elastic model).
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 num_experts: int = 1, router: Optional[ShapeRouter] = None):
        super().__init__()
        if num_experts > 1 and router is None:
            raise ValueError("more than one expert needs a router")
        if router is not None and router.num_experts != num_experts:
            raise ValueError(f"router has {router.num_experts} experts, the layer {num_experts}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.alpha, self.num_experts = int(r), float(alpha), int(num_experts)
        self.scaling = self.alpha / self.r
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r))
        for e in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "router", router)  # shared by all layers; registered once on the model
        object.__setattr__(self, "host", None)  # (elastic state, layer, role), for mask-mode widths

    def extra_repr(self) -> str:  # noqa: D102
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"experts={self.num_experts}")

    def combined(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r] times alpha/r) mixed with the current gates.

        The scaling rides on B (a small matrix) rather than on the output (tokens x out): one kernel less per
        adapter and pass, on far less memory.
        """
        if self.router is None:
            # views, not [0]: indexing would add a scatter into a zero tensor to every backward
            a, b = self.lora_A.view(self.lora_A.shape[1:]), self.lora_B.view(self.lora_B.shape[1:])
            return a, b * self.scaling
        return self.router.mixed(self)

    def forward(self, x: torch.Tensor, out_k: Optional[int] = None) -> torch.Tensor:
        """The output delta for input ``x`` (last dim: the kept input features) and kept outputs ``out_k``."""
        a, b = self.combined()
        in_k = x.shape[-1]
        if in_k != self.in_features:
            a = a[:, :in_k]
        masked = self.host is not None and not self.host[0].sliceable
        if out_k is not None and not masked:
            b = b[:out_k]
        # Under autocast the products cast their operands themselves; an explicit cast to the adapters' fp32
        # would only add a round trip (two kernels per adapter and pass) that autocast undoes.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
        h = self.dropout(h)
        delta = F.linear(F.linear(h, a), b)
        if masked and out_k is not None:
            state, layer, role = self.host
            delta = delta * state.unit_mask(layer, role, delta.shape[-1], out_k, delta.device, delta.dtype)
        return delta.to(x.dtype)

    def merged_delta(self) -> torch.Tensor:
        """The weight delta [out_features, in_features] this adapter adds under the current subnet's gates: what
        export merges into the projection's weight (the contract :mod:`amoeba.export` relies on). The layout is
        the projection's current one; export slices the kept rows and columns out of it. The gates are the
        deterministic (evaluation) ones, even while the model is in training mode."""
        with torch.no_grad():
            router = self.router
            if router is None:
                a, b = self.lora_A[0], self.lora_B[0]
            else:
                a, b = mix_experts(router.gates(router._em.subnet, noisy=False), self.lora_A, self.lora_B)
            return (b @ a) * self.scaling


# ----------------------------------------------------------------------------------------------
# Attaching adapters
# ----------------------------------------------------------------------------------------------
def structure_of(em: ElasticModel) -> dict:
    """The model-shape fields of an :class:`AdapterConfig` for the model behind ``em``."""
    return _structure(em)


def _structure(em: ElasticModel) -> dict:
    return dict(num_layers=em.num_layers, model_type=str(getattr(em.config, "model_type", "")),
                hidden_size=int(em.config.hidden_size), intermediate_size=em.intermediate_size,
                num_kv_groups=em.num_kv_groups, queries_per_group=em.queries_per_group, head_dim=em.head_dim)


def attach_adapters(model: nn.Module, em: ElasticModel, config: AdapterConfig) -> list[nn.Module]:
    """Put adapters described by ``config`` on the projections, freeze the base; return adapted modules."""
    if getattr(model, "_amoeba_adapter_config", None) is not None:
        raise ValueError("the model already has adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    router = None
    if config.use_router:
        router = ShapeRouter(em.num_layers, len(config.widths), config.num_experts, config.topk, config.widths)
        device = next(model.parameters()).device
        router.to(device)
        model.add_module(ROUTER_ATTR, router)
        router.bind(em)
    adapted = []
    for layer in range(em.num_layers):
        for role, mod in em.projections(layer).items():
            if role not in config.modules:
                continue
            device = _module_device(mod)
            adapter = MoELoRA(mod.in_features, mod.out_features, config.r, config.alpha, config.dropout,
                              config.num_experts, router).to(device)
            object.__setattr__(adapter, "host", (em.state, layer, role))
            if router is not None:
                router.add_member(layer, adapter)
            mod.add_module("amoeba_adapter", adapter)
            adapted.append(mod)
    object.__setattr__(model, "_amoeba_adapter_config", config)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("adapters: %s on %d modules (r=%d, alpha=%g, %d expert(s)%s); trainable %d of %d parameters "
                "(%.2f%%)", "MoE-LoRA" if config.use_router else "LoRA", len(adapted), config.r, config.alpha,
                config.num_experts, f", top-{config.topk}" if config.use_router else "", n_train, n_all,
                100.0 * n_train / max(n_all, 1))
    return adapted


def _module_device(mod: nn.Module) -> torch.device:
    for p in mod.parameters(recurse=False):
        return p.device
    return torch.device("cpu")


def adapter_config(model: nn.Module) -> Optional[AdapterConfig]:
    """The :class:`AdapterConfig` of a model with adapters, else None."""
    return getattr(model, "_amoeba_adapter_config", None)


def adapted_modules(model: nn.Module) -> list[tuple[int, str, MoELoRA]]:
    """(layer, role, adapter) of every adapter of the model."""
    out = []
    for mod in model.modules():
        adapter = mod._modules.get("amoeba_adapter") if hasattr(mod, "_modules") else None
        if isinstance(adapter, MoELoRA):
            out.append((mod.amoeba_layer, mod.amoeba_role, adapter))
    return sorted(out, key=lambda t: (t[0], ALL_ROLES.index(t[1])))


def get_router(model: nn.Module) -> Optional[ShapeRouter]:
    """The model's :class:`ShapeRouter`, or None (plain LoRA)."""
    r = model._modules.get(ROUTER_ATTR)
    return r if isinstance(r, ShapeRouter) else None


def set_expert_mix(model: nn.Module, mix: str) -> None:
    """Mix the model's MoE-LoRA experts by ``mix`` (one of MIX_CHOICES; see ``ShapeRouter.mix``, which checks it); a
    model without a router (plain LoRA) has nothing to mix."""
    router = get_router(model)
    if router is not None:
        router.mix = mix


def remove_adapters(model: nn.Module) -> None:
    """Detach every adapter and the router (the base model's modules and keys are left as loaded)."""
    for mod in model.modules():
        if "amoeba_adapter" in getattr(mod, "_modules", {}):
            del mod._modules["amoeba_adapter"]
    if ROUTER_ATTR in model._modules:
        del model._modules[ROUTER_ATTR]
    if getattr(model, "_amoeba_adapter_config", None) is not None:
        object.__setattr__(model, "_amoeba_adapter_config", None)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base inside the block: every adapter is detached from its projection and the
    router computes no gates; both come back afterwards, whatever happens inside.

    Fixed-shape distillation runs its teacher (the full base model) this way. Detaching (rather than a flag
    checked in every projection) means the base forward costs exactly what a model without adapters costs.
    """
    detached = []
    for mod in model.modules():
        adapter = mod._modules.get("amoeba_adapter") if hasattr(mod, "_modules") else None
        if adapter is not None:
            detached.append((mod, adapter))
    router = get_router(model)
    for mod, _ in detached:
        del mod._modules["amoeba_adapter"]
    if router is not None:
        router.suspended = True
    try:
        yield
    finally:
        for mod, adapter in detached:
            mod._modules["amoeba_adapter"] = adapter
        if router is not None:
            router.suspended = False


# ----------------------------------------------------------------------------------------------
# Saving and loading (original head/channel order)
# ----------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter and router tensor in the model's CURRENT layout, keyed ``layers.{i}.{role}.lora_A``
    / ``router.lora_route_in.weight`` (independent of the model class and of wrappers)."""
    sd = {}
    for layer, role, adapter in adapted_modules(model):
        sd[f"layers.{layer}.{role}.lora_A"] = adapter.lora_A
        sd[f"layers.{layer}.{role}.lora_B"] = adapter.lora_B
    router = get_router(model)
    if router is not None:
        for name, p in router.named_parameters():
            sd[f"router.{name}"] = p
    return sd


def _unit_index(em: ElasticModel, layer: int, role: str) -> Optional[torch.Tensor]:
    """Original feature index of each current row (q/k/v/gate/up) or column (o/down); None = identity."""
    idx = em.feature_order(layer, role).cpu().long()
    if torch.equal(idx, torch.arange(idx.numel())):
        return None
    return idx


def _to_original(em, layer, role, a, b):
    idx = _unit_index(em, layer, role)
    if idx is None:
        return a, b
    if role in OUT_SLICED:
        out = torch.empty_like(b)
        out[:, idx] = b
        return a, out
    out = torch.empty_like(a)
    out[:, :, idx] = a
    return out, b


def _from_original(em, layer, role, a, b):
    idx = _unit_index(em, layer, role)
    if idx is None:
        return a, b
    if role in OUT_SLICED:
        return a, b[:, idx]
    assert role in IN_SLICED
    return a[:, :, idx], b


def save_adapters(model: nn.Module, directory, em: Optional[ElasticModel] = None) -> Path:
    """Write the adapters (safetensors, original layout) and ``adapter_config.json`` into ``directory``."""
    config = adapter_config(model)
    if config is None:
        raise ValueError("the model has no adapters to save")
    em = em or get_elastic(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, role, adapter in adapted_modules(model):
        a, b = _to_original(em, layer, role, adapter.lora_A.detach().cpu(), adapter.lora_B.detach().cpu())
        tensors[f"layers.{layer}.{role}.lora_A"] = a.contiguous()
        tensors[f"layers.{layer}.{role}.lora_B"] = b.contiguous()
    router = get_router(model)
    if router is not None:
        for name, p in router.named_parameters():
            tensors[f"router.{name}"] = p.detach().cpu().contiguous()
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    write_json(directory / CONFIG_FILE, asdict(config))
    return directory


def read_adapter_config(directory) -> AdapterConfig:
    """The :class:`AdapterConfig` saved in ``directory`` (UsageError when missing or not ours)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise UsageError(f"{directory} holds no adapters ({CONFIG_FILE} and {WEIGHTS_FILE} expected)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise UsageError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UsageError(f"{path} is not an adapter configuration written by this project")
    known = AdapterConfig.__dataclass_fields__
    fields = {k: v for k, v in raw.items() if k in known}
    for key, value in fields.items():
        kind = _CONFIG_TYPES.get(key)
        if kind is not None and not _is_kind(value, kind):
            raise UsageError(f"{path} is damaged: {key} is {value!r}")
    try:
        return AdapterConfig(**fields)
    except (TypeError, ValueError) as err:  # a missing field, or a value the config refuses (UsageError)
        raise UsageError(f"{path} is damaged: {err}") from None


# The JSON type of each AdapterConfig field ("number": int or float; lists: of that element type).
_CONFIG_TYPES = {"r": "int", "alpha": "number", "dropout": "number", "modules": "list[str]", "num_experts": "int",
                 "topk": "int", "use_router": "bool", "widths": "list[number]", "num_layers": "int",
                 "model_type": "str", "hidden_size": "int", "intermediate_size": "int", "num_kv_groups": "int",
                 "queries_per_group": "int", "head_dim": "int", "format": "str", "layout": "str"}


def _is_kind(value, kind: str) -> bool:
    if kind.startswith("list["):
        return isinstance(value, list) and all(_is_kind(v, kind[5:-1]) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str)


def read_adapter_tensors(directory) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/adapter_model.safetensors``; UsageError naming the file when it cannot be read
    (truncated, not safetensors) or holds NaN/inf."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for every kind of damage
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"{path} cannot be read as safetensors ({text})") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UsageError(f"{path} holds non-finite values ({key})")
    return tensors


def upgrade_single_layer_router(tensors: dict[str, torch.Tensor], router: ShapeRouter, directory,
                                resuming: bool = False) -> dict[str, torch.Tensor]:
    """Express a single-layer router saved by earlier versions (logits W x + b) as this two-layer router.

    Detected by the saved keys (``router.lora_gate_weight`` without ``router.lora_route_in.weight``). Two
    linear layers without activation compute any linear map of rank at most their hidden size, so with at most
    ``router.hidden`` experts the conversion is exact: W1 = [W; 0], b1 = [b; 0], W2 = [I 0], b2 = 0 gives
    W2 (W1 x + b1) + b2 = W x + b for every shape, i.e. the same experts and gates. The noise layer is unchanged.
    Refused (UsageError naming ``directory``) with more experts than that, or when ``resuming`` (the optimizer
    state of such a checkpoint belongs to the old parameters). Returns ``tensors`` with the router keys replaced.
    """
    if "router.lora_gate_weight" not in tensors or "router.lora_route_in.weight" in tensors:
        return tensors
    missing = [k for k in LEGACY_ROUTER_KEYS if k not in tensors]
    if missing:
        raise UsageError(f"{directory / WEIGHTS_FILE} holds an incomplete single-layer router (no {missing[0]})")
    if resuming:
        raise UsageError(f"{directory} was saved with the earlier single-layer MoE-LoRA router: it can be evaluated "
                         "or exported, not resumed; start a new run", "--resume_training")
    w, b = tensors["router.lora_gate_weight"], tensors["router.lora_gate_bias"]
    experts, width = w.shape
    if experts > router.hidden:
        raise UsageError(f"{directory} was saved with the earlier single-layer MoE-LoRA router over {experts} experts, "
                         f"which the two-layer router (hidden size {router.hidden}) cannot express; retrain it")
    w_in = torch.zeros(router.hidden, width, dtype=w.dtype)
    w_in[:experts] = w
    b_in = torch.zeros(router.hidden, dtype=b.dtype)
    b_in[:experts] = b
    w_out = torch.zeros(experts, router.hidden, dtype=w.dtype)
    w_out[:, :experts] = torch.eye(experts, dtype=w.dtype)
    out = {k: v for k, v in tensors.items() if k not in LEGACY_ROUTER_KEYS}
    out.update({"router.lora_route_in.weight": w_in, "router.lora_route_in.bias": b_in,
                "router.lora_route_out.weight": w_out,
                "router.lora_route_out.bias": torch.zeros(experts, dtype=b.dtype),
                "router.lora_noise.weight": tensors["router.lora_noise_weight"],
                "router.lora_noise.bias": tensors["router.lora_noise_bias"]})
    logger.warning("%s: single-layer MoE-LoRA router of an earlier version, converted exactly to the two-layer router",
                   directory)
    return out


def load_adapters(model: nn.Module, em: ElasticModel, directory, resuming: bool = False) -> list[nn.Module]:
    """Load adapters saved by :func:`save_adapters` into ``model`` (adding them if it has none).

    Raises UsageError when they were made for a model of another shape. A single-layer router of an earlier
    version is converted (:func:`upgrade_single_layer_router`), unless ``resuming`` training, which refuses it.
    """
    directory = Path(directory)
    saved = read_adapter_config(directory)
    here = AdapterConfig(r=1, alpha=1, **_structure(em)).structure()
    if saved.structure() != here:
        diff = ", ".join(f"{k} {saved.structure()[k]} vs {here[k]}" for k in here if saved.structure()[k] != here[k])
        raise UsageError(f"the adapters in {directory} belong to another model ({diff}; saved vs this model)")
    current = adapter_config(model)
    if current is None:
        attach_adapters(model, em, saved)
    else:
        mine = (current.r, current.num_experts, current.use_router, sorted(current.modules), current.widths)
        theirs = (saved.r, saved.num_experts, saved.use_router, sorted(saved.modules), saved.widths)
        if mine != theirs:
            raise UsageError(f"the adapters in {directory} (r={saved.r}, experts={saved.num_experts}, modules="
                             f"{','.join(saved.modules)}) differ from the model's (r={current.r}, experts="
                             f"{current.num_experts}, modules={','.join(current.modules)})")
    tensors = read_adapter_tensors(directory)
    router = get_router(model)
    if router is not None:
        tensors = upgrade_single_layer_router(tensors, router, directory, resuming)
    expected = set(adapter_state_dict(model))
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise UsageError(f"{directory / WEIGHTS_FILE} does not match its config (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    with torch.no_grad():
        for layer, role, adapter in adapted_modules(model):
            a = tensors[f"layers.{layer}.{role}.lora_A"]
            b = tensors[f"layers.{layer}.{role}.lora_B"]
            if a.shape != adapter.lora_A.shape or b.shape != adapter.lora_B.shape:
                raise UsageError(f"{directory}: layer {layer} {role} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                 f"the model needs {tuple(adapter.lora_A.shape)}, {tuple(adapter.lora_B.shape)}")
            a, b = _from_original(em, layer, role, a, b)
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
        if router is not None:
            for name, p in router.named_parameters():
                t = tensors[f"router.{name}"]
                if t.shape != p.shape:
                    raise UsageError(f"{directory}: router.{name} has shape {tuple(t.shape)}; the model needs "
                                     f"{tuple(p.shape)}")
                p.copy_(t)
    return [mod for mod in model.modules() if "amoeba_adapter" in getattr(mod, "_modules", {})]
