"""Stage 1, step 2: width selection with FLAP (fluctuation-based structured pruning, Ang et al. 2024).

Calibration text runs through the model one decoder layer at a time. Forward hooks on the inputs of
``o_proj`` (per attention feature) and ``down_proj`` (per MLP channel) accumulate the running mean and
variance of every input channel over all calibration tokens (float64, streaming). A feature's fluctuation
metric is its variance times the squared norm of its weight column (FLAP's "WIFV"); as in FLAP (and the
AmoebaLLM paper's code), the attention score is the **square** of that metric and the MLP score the metric
itself. Scores are standardised within each layer and module type; a KV group (a KV head with its query
heads) scores the mean of its features, so grouped-query models lose whole groups and stay valid GQA
models.

The variance is the exact (unbiased) variance over every calibration token. FLAP's running update instead
processes one sequence at a time (it drops the first sequence's deviations and measures the others from a
running mean); on SmolLM2 with 64 x 256 C4 tokens that moves 0.4-0.7% of the kept channels
(``scripts/bench_flap_variance.py``; the README's table of differences from the original code).

For every width ratio ``r`` (from ``--width_choice``):

- ``--width_mode global`` (default, as FLAP): one threshold across all layers, each unit weighted by the
  parameters it carries: in descending score order, the unit whose cumulative cost is closest to ``r``
  times the total is the threshold, and the units scored above it are kept (FLAP's ``metric >
  threshold``); layers end up with different widths (at least one KV group and one channel each).
- ``--width_mode uniform``: every layer keeps exactly round(r * n) groups and channels.
- ``--width_align N`` (either mode; default 1, FLAP as published): each layer's kept channel count is then
  rounded to a multiple of N, which GPU matrix kernels need to run at full speed once exported.

All ratios cut the same ranking, so a narrower width keeps a subset of a wider one (what makes widths
prefixes in the elastic model). Bias compensation: the mean input of the removed features times their
weight columns becomes a bias on the output of ``o_proj``/``down_proj``, one vector per ratio.

Outputs (:func:`write_width_files`, into ``--output_dir``): ``width_mask.npy`` and ``width_bias.npy`` in the
seed's layout, plus ``width_summary.json``/``.md`` (kept heads and channels per layer and ratio). The flags are
read by Stage 1's entry (:mod:`amoeba.stages.calibration`); :func:`calibrate_widths` takes their values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from amoeba.distributed import process_share
from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.files import write_json, write_text
from amoeba.model_state import eval_mode
from amoeba.npy import save_npy
from amoeba.strategy import module_name
from amoeba.subnet import width_key

logger = logging.getLogger(__name__)

METHODS = ("flap", "magnitude")


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
class RunningStats:
    """Per-feature mean and variance of a stream of activations, in float64 (pairwise merge of Chan et al.)."""

    def __init__(self):
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add every row of ``x`` (``[..., features]``) to the statistics."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(0)
        self.merge(nb, mean_b, (x - mean_b).square_().sum(0))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Combine with the statistics (count, mean, sum of squared deviations) of another set of rows."""
        if n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-feature variance."""
        return self.m2 / max(self.n - 1, 1)


@torch.no_grad()
def merge_across_processes(stats: RunningStats, features: int, device: torch.device) -> RunningStats:
    """The statistics of every process's share of the calibration tokens, merged in rank order (the same
    on every process; equal to one process's streaming statistics up to float64 rounding)."""
    _, world = process_share()
    if world == 1:
        return stats
    mine = torch.zeros(1 + 2 * features, dtype=torch.float64, device=device)
    mine[0] = stats.n
    if stats.n:
        mine[1:1 + features] = stats.mean.to(device)
        mine[1 + features:] = stats.m2.to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(parts, mine)
    out = RunningStats()
    for part in parts:
        out.merge(int(part[0].item()), part[1:1 + features], part[1 + features:])
    return out


@dataclass
class LayerStats:
    """Input statistics of one layer's ``o_proj`` and ``down_proj``, over the original feature order (CPU)."""

    attn_mean: torch.Tensor
    attn_var: torch.Tensor
    mlp_mean: torch.Tensor
    mlp_var: torch.Tensor
    tokens: int


@dataclass
class FlapScores:
    """Importance of every KV group and MLP channel, in the original unit order.

    ``group_score`` [layers, kv_groups] and ``channel_score`` [layers, channels] are standardised per layer
    and module type (comparable across layers); ``attn_feature_score``/``mlp_feature_score`` are the raw
    per-feature scores before standardisation (for FLAP, the attention one is the squared WIFV). ``stats`` is None for the magnitude method (no activations).
    """

    group_score: torch.Tensor
    channel_score: torch.Tensor
    attn_feature_score: torch.Tensor
    mlp_feature_score: torch.Tensor
    stats: Optional[list[LayerStats]]
    method: str


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the last dimension; a constant row becomes zeros."""
    std = x.std(dim=-1, keepdim=True)
    z = (x - x.mean(dim=-1, keepdim=True)) / std
    return torch.where(torch.isfinite(z), z, torch.zeros_like(z))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense tensor (bitsandbytes 4/8-bit weights are de-quantized)."""
    if hasattr(module, "get_base_layer"):  # a PEFT wrapper
        module = module.get_base_layer()
    w = module.weight
    if type(w) in (nn.Parameter, torch.Tensor) and w.dtype.is_floating_point:
        return w.detach()
    from peft.utils.integrations import dequantize_bnb_weight  # deferred: only packed (bitsandbytes) weights

    return dequantize_bnb_weight(w, state=getattr(module, "state", None)).detach()


def _layouts(em, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj input map, down_proj input map): current position -> original index (the model may be reordered)."""
    return em.feature_order(layer, "o_proj").cpu(), em.feature_order(layer, "down_proj").cpu()


def _to_original(vec: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(vec)
    out[mapping.to(vec.device)] = vec
    return out


# ----------------------------------------------------------------------------------------------
# The layer-at-a-time loop
# ----------------------------------------------------------------------------------------------
class _CallRecorder(nn.Module):
    """Stands in for one decoder layer during the capture pass: records its call, returns its input."""

    def __init__(self, index: int, layer: nn.Module, sink: dict):
        super().__init__()
        self.index, self.sink = index, sink
        for attr in ("attention_type", "is_sliding", "sliding_window", "layer_idx", "layer_type"):
            if hasattr(layer, attr) and not isinstance(getattr(layer, attr), nn.Module):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states, *args, **kwargs):  # noqa: D102 (see class)
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink["calls"].append((args, kwargs))
        return hidden_states


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _capture_layer_calls(em, input_ids: torch.Tensor, batch_size: int):
    """Run the decoder once with every layer replaced by a recorder: per batch, the first layer's hidden
    states and every layer's positional and keyword arguments exactly as the decoder passes them (masks
    can differ per layer, e.g. sliding-window layers)."""
    decoder = em.decoder
    real_layers = decoder.layers
    sink: dict = {}
    recorders = nn.ModuleList([_CallRecorder(i, blk, sink) for i, blk in enumerate(real_layers)])
    hidden, calls = [], []
    device = em.model.get_input_embeddings().weight.device
    decoder.layers = recorders
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink.clear()
            sink["calls"] = []
            batch = input_ids[start:start + batch_size].to(device)
            decoder(input_ids=batch, use_cache=False)
            if len(sink["calls"]) != len(real_layers):
                raise RuntimeError(f"the decoder called {len(sink['calls'])} of its {len(real_layers)} layers")
            hidden.append(sink["hidden"])
            calls.append(sink["calls"])
    finally:
        decoder.layers = real_layers
        sink.clear()
    return hidden, calls


def _collective_device(dev: torch.device) -> torch.device:
    """Where the statistics travel: the layer's GPU with NCCL, the CPU with gloo."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "nccl" and torch.cuda.is_available():
        return dev if dev.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def collect_input_stats(em, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = True) -> list[LayerStats]:
    """Mean and variance of the inputs of every layer's ``o_proj`` and ``down_proj`` over ``input_ids``,
    computed one decoder layer at a time (each layer's outputs become the next layer's inputs).

    Under ``torch.distributed`` (``torchrun``), each process takes its share of the calibration sequences
    and the per-layer statistics are merged across processes, so every process gets the one-process result.
    """
    rank, world = process_share()
    if world > 1:
        input_ids = torch.tensor_split(input_ids, world)[rank]
        progress = progress and rank == 0

    model = em.model
    use_cache = getattr(model.config, "use_cache", None)
    out: list[LayerStats] = []
    try:
        model.config.use_cache = False
        with eval_mode(model), em.use(em.full_subnet()):
            hidden, calls = _capture_layer_calls(em, input_ids, max(1, int(batch_size)))
            bar = tqdm(range(em.num_layers), desc="FLAP layers", unit="layer", disable=not progress)
            for i in bar:
                layer = em.all_layers[i]
                dev = _device_of(layer)
                proj = em.projections(i)
                attn, mlp = RunningStats(), RunningStats()
                hooks = [proj["o_proj"].register_forward_hook(lambda m, a, o: attn.update(a[0])),
                         proj["down_proj"].register_forward_hook(lambda m, a, o: mlp.update(a[0]))]
                try:
                    for b, h in enumerate(hidden):
                        args, kwargs = calls[b][i]
                        y = layer(_move(h, dev), *_move(args, dev), **_move(kwargs, dev))
                        hidden[b] = y[0] if isinstance(y, (tuple, list)) else y
                finally:
                    for hk in hooks:
                        hk.remove()
                attn = merge_across_processes(attn, proj["o_proj"].in_features, _collective_device(dev))
                mlp = merge_across_processes(mlp, proj["down_proj"].in_features, _collective_device(dev))
                q_map, c_map = _layouts(em, i)
                out.append(LayerStats(_to_original(attn.mean.cpu(), q_map), _to_original(attn.variance.cpu(), q_map),
                                      _to_original(mlp.mean.cpu(), c_map), _to_original(mlp.variance.cpu(), c_map),
                                      attn.n))
                del attn, mlp
            del hidden, calls
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return out


@torch.no_grad()
def flap_scores(model, input_ids: Optional[torch.Tensor], batch_size: int = 8, method: str = "flap",
                progress: bool = True) -> FlapScores:
    """Score every KV group and MLP channel of ``model`` (any Llama-family model; made elastic if needed).

    ``method="flap"``: variance of the unit's input times its squared weight-column norm (WIFV), from the
    calibration tokens ``input_ids`` [n, seqlen], squared for the attention features (as FLAP scores
    ``o_proj``). ``method="magnitude"``: the L2 norm of the unit's weight columns in ``o_proj``/``down_proj``
    (no activations; ``input_ids`` is not used).
    """
    if method not in METHODS:
        raise UsageError(f"'{method}' is not one of {', '.join(METHODS)}")
    em = make_elastic(model)
    stats = None
    if method == "flap":
        if input_ids is None or input_ids.numel() == 0:
            raise ValueError("FLAP needs calibration tokens")
        stats = collect_input_stats(em, input_ids, batch_size, progress)
    attn_var = [st.attn_var for st in stats] if stats is not None else None
    mlp_var = [st.mlp_var for st in stats] if stats is not None else None
    groups, channels, attn_raw, mlp_raw = wifv_scores(em, attn_var, mlp_var)
    return FlapScores(groups, channels, attn_raw, mlp_raw, stats, method)


@torch.no_grad()
def wifv_scores(em, attn_var: Optional[Sequence[torch.Tensor]], mlp_var: Optional[Sequence[torch.Tensor]]):
    """(KV group scores [layers, groups], channel scores [layers, channels], raw attention and MLP feature
    scores) from per-layer input variances over the original feature order, by FLAP's rule: WIFV (variance x
    squared weight-column norm), squared for attention, standardised per layer and module, a KV group scoring
    the mean of its features. Without variances (``None``), the weight-column L2 norms (``magnitude``)."""
    block = em.queries_per_group * em.head_dim
    attn_raw, mlp_raw, groups, channels = [], [], [], []
    for i in range(em.num_layers):
        proj = em.projections(i)
        q_map, c_map = _layouts(em, i)
        col_o = _to_original(dense_weight(proj["o_proj"]).to(torch.float64).square().sum(0).cpu(), q_map)
        col_d = _to_original(dense_weight(proj["down_proj"]).to(torch.float64).square().sum(0).cpu(), c_map)
        if attn_var is not None:
            # FLAP squares the attention metric (not the MLP one) before standardisation; this changes
            # which heads win, since a head scores the mean of its standardised features.
            a = (attn_var[i].to(torch.float64) * col_o).square()
            m = mlp_var[i].to(torch.float64) * col_d
        else:
            a, m = col_o.sqrt(), col_d.sqrt()
        attn_raw.append(a)
        mlp_raw.append(m)
        groups.append(_standardise(a).reshape(em.num_kv_groups, block).mean(1))
        channels.append(_standardise(m))
    return torch.stack(groups), torch.stack(channels), torch.stack(attn_raw), torch.stack(mlp_raw)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------
@dataclass
class WidthSelection:
    """Kept KV groups ``groups[r]`` [layers, kv_groups] and MLP channels ``channels[r]`` [layers, channels]
    (boolean, original order) per width ratio, and the kept fraction of the prunable parameters."""

    ratios: tuple[float, ...]
    groups: dict[float, np.ndarray]
    channels: dict[float, np.ndarray]
    kept_fraction: dict[float, float] = field(default_factory=dict)
    mode: str = "global"


def unit_costs(em) -> tuple[int, int]:
    """Parameters carried by one KV group (q/k/v rows and o columns) and by one MLP channel."""
    hidden = int(em.config.hidden_size)
    return hidden * em.head_dim * (2 * em.queries_per_group + 2), 3 * hidden


def align_channels(kept: int, align: int, total: int) -> int:
    """``kept`` rounded to the nearest multiple of ``align`` (at least ``align``, at most ``total``)."""
    if align <= 1:
        return kept
    return min(total, max(align, int(kept / align + 0.5) * align))


def select_widths(group_score: torch.Tensor, channel_score: torch.Tensor, ratios: Sequence[float], mode: str,
                  group_cost: int, channel_cost: int, align: int = 1) -> WidthSelection:
    """Pick the kept units for every ratio from one ranking (so kept sets are nested across ratios).

    ``align > 1`` then rounds every layer's kept MLP channels to the nearest multiple of ``align`` (its
    best-scored channels), so the matrix shapes suit GPU kernels (bf16 tensor cores want multiples of 8);
    FLAP itself is ``align=1``. Rounding is monotone, so kept sets stay nested.
    """
    if mode not in ("global", "uniform"):
        raise UsageError(f"'{mode}' is not global or uniform")
    gs = group_score.detach().cpu().to(torch.float64).numpy()
    cs = channel_score.detach().cpu().to(torch.float64).numpy()
    layers, n_groups = gs.shape
    n_channels = cs.shape[1]
    ratios = tuple(dict.fromkeys(width_key(r) for r in ratios))
    total = layers * (n_groups * group_cost + n_channels * channel_cost)
    sel = WidthSelection(ratios, {}, {}, {}, mode)
    if mode == "global":
        scores = np.concatenate([gs.reshape(-1), cs.reshape(-1)])
        costs = np.concatenate([np.full(gs.size, group_cost, np.float64), np.full(cs.size, channel_cost, np.float64)])
        order = np.argsort(-scores, kind="stable")
        cum = np.cumsum(costs[order])
    for r in ratios:
        if r >= 1.0:
            g_keep = np.ones_like(gs, dtype=bool)
            c_keep = np.ones_like(cs, dtype=bool)
        elif mode == "global":
            # FLAP's threshold is the unit whose cumulative cost is closest to the target; it keeps the
            # units scored strictly above it.
            k = int(np.argmin(np.abs(cum - r * total)))
            keep = scores > scores[order[k]]  # ties with the threshold go too, as in FLAP
            g_keep = keep[:gs.size].reshape(gs.shape)
            c_keep = keep[gs.size:].reshape(cs.shape)
            for i in range(layers):  # every layer keeps at least its best group and channel
                if not g_keep[i].any():
                    g_keep[i, np.argmax(gs[i])] = True
                if not c_keep[i].any():
                    c_keep[i, np.argmax(cs[i])] = True
        else:
            kg = max(1, int(r * n_groups + 0.5))
            kc = max(1, int(r * n_channels + 0.5))
            g_keep = np.zeros_like(gs, dtype=bool)
            c_keep = np.zeros_like(cs, dtype=bool)
            for i in range(layers):
                g_keep[i, np.argsort(-gs[i], kind="stable")[:kg]] = True
                c_keep[i, np.argsort(-cs[i], kind="stable")[:kc]] = True
        if align > 1 and r < 1.0:
            for i in range(layers):
                k = align_channels(int(c_keep[i].sum()), align, n_channels)
                c_keep[i] = False
                c_keep[i, np.argsort(-cs[i], kind="stable")[:k]] = True
        sel.groups[r], sel.channels[r] = g_keep, c_keep
        sel.kept_fraction[r] = float((g_keep.sum() * group_cost + c_keep.sum() * channel_cost) / total)
    return sel


@torch.no_grad()
def compensation_biases(em, stats: Optional[list[LayerStats]], selection: WidthSelection,
                        enabled: bool = True) -> dict[float, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """FLAP's bias per ratio and layer: (o_proj bias, down_proj bias), each the mean input of the removed
    features times their weight columns. Zeros when ``enabled`` is False or there are no statistics."""
    hidden = int(em.config.hidden_size)
    block = em.queries_per_group * em.head_dim
    out: dict[float, dict[int, tuple[np.ndarray, np.ndarray]]] = {r: {} for r in selection.ratios}
    for i in range(em.num_layers):
        if not enabled or stats is None:
            for r in selection.ratios:
                out[r][i] = (np.zeros(hidden, np.float32), np.zeros(hidden, np.float32))
            continue
        proj = em.projections(i)
        q_map, c_map = _layouts(em, i)
        w_o = dense_weight(proj["o_proj"]).to(torch.float64)
        w_d = dense_weight(proj["down_proj"]).to(torch.float64)
        mean_o = stats[i].attn_mean[q_map].to(w_o.device)  # current layout, like the weight columns
        mean_d = stats[i].mlp_mean[c_map].to(w_d.device)
        for r in selection.ratios:
            removed_q = torch.from_numpy(~np.repeat(selection.groups[r][i], block))[q_map].to(w_o.device)
            removed_c = torch.from_numpy(~selection.channels[r][i])[c_map].to(w_d.device)
            b_o = w_o[:, removed_q] @ mean_o[removed_q]
            b_d = w_d[:, removed_c] @ mean_d[removed_c]
            out[r][i] = (b_o.float().cpu().numpy(), b_d.float().cpu().numpy())
        del w_o, w_d
    return out


def width_dicts(em, selection: WidthSelection, biases: dict) -> tuple[dict, dict]:
    """The seed's ``width_mask`` and ``width_bias`` dicts (module name -> {ratio: array} or None)."""
    hd, rep = em.head_dim, em.queries_per_group
    masks: dict[str, Optional[dict]] = {}
    bias: dict[str, Optional[dict]] = {}
    for i in range(em.num_layers):
        for role in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            masks[module_name(i, role)] = None if role in ("o_proj", "down_proj") else {}
            bias[module_name(i, role)] = {} if role in ("o_proj", "down_proj") else None
        for r in selection.ratios:
            g = selection.groups[r][i]
            c = selection.channels[r][i].astype(np.float32)
            masks[module_name(i, "q_proj")][r] = np.repeat(g, rep * hd).astype(np.float32)
            masks[module_name(i, "k_proj")][r] = np.repeat(g, hd).astype(np.float32)
            masks[module_name(i, "v_proj")][r] = np.repeat(g, hd).astype(np.float32)
            masks[module_name(i, "gate_proj")][r] = c
            masks[module_name(i, "up_proj")][r] = c.copy()
            bias[module_name(i, "o_proj")][r] = biases[r][i][0]
            bias[module_name(i, "down_proj")][r] = biases[r][i][1]
    return masks, bias


def model_info(em) -> dict:
    """Shape facts stored with a strategy, so a readable view can speak of heads and groups."""
    return {"model_type": getattr(em.config, "model_type", None), "num_layers": em.num_layers,
            "hidden_size": int(em.config.hidden_size), "num_heads": em.num_heads, "num_kv_groups": em.num_kv_groups,
            "queries_per_group": em.queries_per_group, "head_dim": em.head_dim,
            "intermediate_size": em.intermediate_size}


def selection_summary(em, selection: WidthSelection) -> dict:
    """Kept KV groups/heads/channels per layer and ratio, and the kept parameter fraction."""
    out = {}
    for r in selection.ratios:
        rows = [{"layer": i, "kv_groups": int(selection.groups[r][i].sum()),
                 "heads": int(selection.groups[r][i].sum()) * em.queries_per_group,
                 "channels": int(selection.channels[r][i].sum())} for i in range(em.num_layers)]
        out[f"{r:g}"] = {"kept_param_fraction": round(selection.kept_fraction[r], 6), "layers": rows}
    return out


def _summary_markdown(summary: dict) -> str:
    ratios = list(summary["widths"])
    lines = ["# Width calibration", "",
             f"Method: {summary['method']}, mode: {summary['mode']}"
             + (f", channels per layer a multiple of {summary['channel_align']}"
                if summary.get("channel_align", 1) > 1 else "") + ", bias compensation: "
             f"{'on' if summary['bias'] else 'off'}. Calibration: {summary['calibration']}.", "",
             "Kept fraction of the prunable parameters (attention and MLP projections): "
             + ", ".join(f"{r}: {summary['widths'][r]['kept_param_fraction']:.4f}" for r in ratios) + ".", "",
             "Kept KV groups / MLP channels per layer:", "",
             "| layer | " + " | ".join(f"width {r}" for r in ratios) + " |",
             "| ---: | " + " | ".join("---:" for _ in ratios) + " |"]
    n = len(next(iter(summary["widths"].values()))["layers"]) if ratios else 0
    for i in range(n):
        cells = [f"{summary['widths'][r]['layers'][i]['kv_groups']} / {summary['widths'][r]['layers'][i]['channels']}"
                 for r in ratios]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_width_files(output_dir: str | Path, masks: dict, bias: dict, summary: dict) -> None:
    """Write ``width_mask.npy``, ``width_bias.npy`` (atomically) and the readable ``width_summary`` files."""
    out = Path(output_dir)
    save_npy(out / "width_mask.npy", masks)
    save_npy(out / "width_bias.npy", bias)
    write_json(out / "width_summary.json", summary)
    write_text(out / "width_summary.md", _summary_markdown(summary))


# ----------------------------------------------------------------------------------------------
# The whole calibration
# ----------------------------------------------------------------------------------------------
@dataclass
class WidthCalibration:
    """What width calibration found: the seed-layout ``masks`` and ``bias`` dicts, and a readable ``summary``."""

    masks: dict
    bias: dict
    summary: dict
    selection: WidthSelection


def calibrate_widths(model, input_ids: Optional[torch.Tensor], ratios: Sequence[float], method: str = "flap",
                     mode: str = "global", align: int = 1, batch_size: int = 8, bias: bool = True,
                     data: str = "", started: Optional[float] = None) -> WidthCalibration:
    """Score, select and compensate: the width masks and biases of every ratio in ``ratios``.

    ``input_ids`` [n, seqlen]: the calibration tokens (``method="flap"``; None for ``magnitude``), described by
    ``data`` in the summary. ``bias=False`` gives zero biases (the "FLAP without bias compensation" baseline).
    ``started``: when the calibration began (``time.time()``, the loading of its data included), for the
    summary's ``elapsed_s``; default now."""
    start = time.time() if started is None else started
    em = make_elastic(model)
    ratios = tuple(dict.fromkeys(width_key(r) for r in ratios))
    scores = flap_scores(model, input_ids, batch_size, method=method)
    group_cost, channel_cost = unit_costs(em)
    align = int(align or 1)
    selection = select_widths(scores.group_score, scores.channel_score, ratios, mode, group_cost, channel_cost,
                              align)
    with_bias = bool(bias) and scores.stats is not None
    biases = compensation_biases(em, scores.stats, selection, enabled=with_bias)
    masks, bias_dict = width_dicts(em, selection, biases)
    calib = ("none (weight magnitudes)" if input_ids is None else
             f"{data}, {input_ids.shape[0]} x {input_ids.shape[1]} tokens")
    summary = {"method": method, "mode": mode, "channel_align": align, "bias": with_bias, "calibration": calib,
               "num_tokens": None if scores.stats is None else scores.stats[0].tokens,
               "info": model_info(em), "widths": selection_summary(em, selection),
               "elapsed_s": round(time.time() - start, 2)}
    return WidthCalibration(masks, bias_dict, summary, selection)
