"""The strategy file (``dp_selection_strategy.npy``): which layers and which heads/channels each subnet keeps.

Layout (the seed's, so files move between this project and the original AmoebaLLM code both ways)::

    {"strategy":   {num_removed: 0/1 mask over all layers},          # 1..M (0 = all layers, implied)
     "metric":     {num_removed: calibration score},
     "width_mask": {"model.layers.{i}.self_attn.q_proj": {ratio: 0/1 mask over OUTPUT features}, ...,
                    "model.layers.{i}.self_attn.o_proj": None, ...},   # masks on q/k/v/gate/up
     "bias":       {"model.layers.{i}.self_attn.o_proj": {ratio: bias vector}, ...,
                    "model.layers.{i}.self_attn.q_proj": None, ...},   # FLAP biases on o/down
     "info":       {"head_dim": ..., ...},                             # optional, ours; the original ignores it
     "calibration": {"layers": {"method": "dp", "dataset": "mmlu", "split": "validation", "metric": "acc",
                                "questions": 320, ...},
                     "widths": {"method": "flap", "calibration": "c4, 512 x 1024 tokens", ...}}  # optional, ours

A depth-only file (``final_strategy.npy``) has only ``strategy`` and ``metric``.

Loading never executes code (:mod:`amoeba.npy`): the ``.npy`` header is parsed as a literal and a pickled
payload goes through a restricted unpickler that admits numpy arrays, dtypes, scalars and plain containers only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from amoeba.errors import UsageError
from amoeba.files import write_json, write_text
from amoeba.npy import compressed, load_npy_dict, save_npy
from amoeba.subnet import width_key

logger = logging.getLogger(__name__)

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASKED_ROLES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # masks over output features
BIASED_ROLES = ("o_proj", "down_proj")  # FLAP bias added to the output
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Ratios the original code's FLAP step wrote (prune.py: pruning_ratio_list = [0.8, 0.65, 0.5]).
ORIGINAL_FLAP_RATIOS = (0.8, 0.65, 0.5)

_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                   r"(?:\.base_layer)?$")


def module_name(layer: int, role: str) -> str:
    """The canonical module name used as a key of ``width_mask``/``bias``."""
    return f"model.layers.{layer}.{_GROUP[role]}.{role}"


def parse_module_name(name: str) -> Optional[tuple[int, str]]:
    """(layer, role) of a module name, with or without the PEFT prefix ``base_model.model.``; None if foreign."""
    m = _NAME.search(str(name))
    if m is None:
        return None
    return int(m.group(1)), m.group(3)


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------
@dataclass
class Strategy:
    """The contents of a strategy file, normalised.

    ``layer_masks[m]``: float32 0/1 mask over all layers with ``m`` layers removed (key 0 = all kept).
    ``metric[m]``: calibration score of that depth. ``width_mask[name]``: {ratio: float32 0/1 mask over the
    module's output features} for q/k/v/gate/up, None for o/down. ``bias[name]``: {ratio: float32 bias} for
    o/down, None for the others. ``info``: optional facts about the model it was made for (head_dim...).
    ``calibration``: optional records of how the layers (``layers``: dataset, split, metric, samples) and the
    widths (``widths``) were calibrated; files without one (the original code's, older ones) load with ``{}``.
    """

    layer_masks: dict[int, np.ndarray]
    metric: dict[int, float] = field(default_factory=dict)
    width_mask: dict[str, Optional[dict[float, np.ndarray]]] = field(default_factory=dict)
    bias: dict[str, Optional[dict[float, np.ndarray]]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    source: Optional[str] = None
    original_layout: bool = False  # names with the PEFT prefix: written by the original AmoebaLLM code
    calibration: dict = field(default_factory=dict)  # how it was calibrated: {"layers": {...}, "widths": {...}}

    @property
    def num_layers(self) -> int:
        """Number of layers of the model the strategy was made for."""
        if self.layer_masks:
            return int(len(next(iter(self.layer_masks.values()))))
        layers = [p[0] for p in map(parse_module_name, self.width_mask) if p is not None]
        return max(layers) + 1 if layers else 0

    def widths(self) -> list[float]:
        """The width ratios the file holds masks for, ascending."""
        keys = set()
        for d in self.width_mask.values():
            if d:
                keys.update(d)
        return sorted(keys)

    @property
    def has_width(self) -> bool:
        """True when the file holds width masks."""
        return bool(self.widths())

    def depths(self) -> list[int]:
        """The layer counts the file has a kept-layer mask for, ascending."""
        n = self.num_layers
        return sorted(n - m for m in self.layer_masks)

    def mask_of(self, layer: int, role: str, ratio: float) -> Optional[np.ndarray]:
        """The 0/1 mask of one q/k/v/gate/up projection at ``ratio`` (None if absent)."""
        d = self.width_mask.get(module_name(layer, role))
        return None if not d else d.get(width_key(ratio))

    def bias_of(self, layer: int, role: str, ratio: float) -> Optional[np.ndarray]:
        """The FLAP bias of one o/down projection at ``ratio`` (None if absent)."""
        d = self.bias.get(module_name(layer, role))
        return None if not d else d.get(width_key(ratio))

    def to_dict(self) -> dict:
        """The seed's dict layout (what :func:`save_strategy` stores)."""
        out: dict = {
            "strategy": {int(m): np.asarray(v, dtype=np.float32) for m, v in sorted(self.layer_masks.items())
                         if m != 0 or not np.all(v > 0.5)},
            "metric": {int(m): float(v) for m, v in sorted(self.metric.items())},
        }
        if self.width_mask or self.bias:
            out["width_mask"] = {k: (None if v is None else {float(r): np.asarray(a, np.float32)
                                                             for r, a in sorted(v.items(), reverse=True)})
                                 for k, v in self.width_mask.items()}
            out["bias"] = {k: (None if v is None else {float(r): np.asarray(a, np.float32)
                                                       for r, a in sorted(v.items(), reverse=True)})
                           for k, v in self.bias.items()}
        if self.info:
            out["info"] = dict(self.info)
        if self.calibration:
            out["calibration"] = {k: dict(v) for k, v in self.calibration.items()}
        return out


def _as_int_key(key, what: str, problems: list[str]) -> Optional[int]:
    try:
        value = float(key)
        if value != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        problems.append(f"{what} key {key!r} is not a whole number")
        return None


def _as_ratio_key(key, name: str, problems: list[str]) -> Optional[float]:
    try:
        value = float(key)
    except (TypeError, ValueError):
        problems.append(f"width key {key!r} of {name} is not a number")
        return None
    if not 0 < value <= 1:
        problems.append(f"width key {value:g} of {name} is outside (0, 1]")
        return None
    return width_key(value)


def _as_vector(value, what: str, problems: list[str]) -> Optional[np.ndarray]:
    try:
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError
        arr = arr.astype(np.float32).reshape(-1)
    except (TypeError, ValueError):
        problems.append(f"{what} is not a numeric array")
        return None
    if not np.all(np.isfinite(arr)):
        problems.append(f"{what} holds NaN or infinite values")
        return None
    return arr


def normalise_width_dict(raw: Any, what: str, problems: list[str], binary: bool) -> tuple[dict, bool]:
    """Normalise a ``width_mask`` or ``bias`` dict: canonical module names, ratio keys via
    :func:`width_key`, float32 arrays. Returns (dict, True when names carried the PEFT prefix)."""
    out: dict[str, Optional[dict[float, np.ndarray]]] = {}
    prefixed = False
    if raw is None:
        return out, prefixed
    if not isinstance(raw, dict):
        problems.append(f"'{what}' is a {type(raw).__name__}, not a dict of modules")
        return out, prefixed
    foreign = []
    for name, per_ratio in raw.items():
        parsed = parse_module_name(name)
        if parsed is None:
            foreign.append(str(name))
            continue
        prefixed |= str(name).startswith("base_model.")
        canon = module_name(*parsed)
        if per_ratio is None or (isinstance(per_ratio, dict) and not per_ratio):
            out.setdefault(canon, None)
            continue
        if not isinstance(per_ratio, dict):
            problems.append(f"'{what}' entry {name} is a {type(per_ratio).__name__}, not a dict of ratios")
            continue
        entry: dict[float, np.ndarray] = {}
        for r, arr in per_ratio.items():
            key = _as_ratio_key(r, str(name), problems)
            vec = _as_vector(arr, f"'{what}' of {name} at {r}", problems) if key is not None else None
            if key is None or vec is None:
                continue
            if binary:
                if not np.all((vec == 0) | (vec == 1)):
                    problems.append(f"mask of {name} at {r} is not 0/1")
                    continue
            entry[key] = vec
        out[canon] = entry
    if foreign:
        problems.append(f"'{what}' names {len(foreign)} module(s) that are not q/k/v/o/gate/up/down projections of "
                        f"decoder layers, e.g. {foreign[0]}")
    return out, prefixed


_PLAIN = (str, int, float, bool, type(None))


def is_plain_record(value) -> bool:
    """True for JSON-like values (strings, numbers, booleans, None, and lists/dicts of them): what a
    calibration record may hold, so that it reads back through the restricted unpickler and into JSON."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain_record(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_record(v) for k, v in value.items())
    return False


def _calibration_records(raw: Any, problems: list[str]) -> dict:
    """The ``calibration`` entry of a strategy file: {part: record} with plain (JSON-like) records; absent -> {}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in raw.items()):
        problems.append("'calibration' is not a dict of records ({'layers': {...}, 'widths': {...}})")
        return {}
    if not is_plain_record(raw):
        problems.append("'calibration' holds values other than text, numbers and lists")
        return {}
    return {k: dict(v) for k, v in raw.items()}


def strategy_from_dict(obj: Any, path: str = "<strategy>", flag: Optional[str] = None) -> Strategy:
    """Build a :class:`Strategy` from a loaded dict (ours or the original code's); report every problem at once."""
    if not isinstance(obj, dict):
        raise UsageError(f"{path} does not hold a strategy dict", flag)
    problems: list[str] = []
    if "strategy" not in obj and "width_mask" not in obj:
        if any(parse_module_name(k) for k in obj):
            raise UsageError(f"{path} holds per-module width masks or biases only (width_mask.npy / width_bias.npy); "
                             "merge them with the layer strategy: python utils/merge_depth_width.py", flag)
        raise UsageError(f"{path} is not a strategy file: it has no 'strategy' entry (keys: "
                         f"{', '.join(map(str, list(obj)[:8]))})", flag)

    layer_masks: dict[int, np.ndarray] = {}
    raw_layers = obj.get("strategy")
    if raw_layers is not None:
        if not isinstance(raw_layers, dict):
            problems.append(f"'strategy' is a {type(raw_layers).__name__}, not a dict of layer masks")
        else:
            for key, mask in raw_layers.items():
                m = _as_int_key(key, "'strategy'", problems)
                vec = _as_vector(mask, f"layer mask {key}", problems) if m is not None else None
                if vec is None:
                    continue
                if not np.all((vec == 0) | (vec == 1)):
                    problems.append(f"layer mask {m} is not 0/1")
                    continue
                removed = int((vec < 0.5).sum())
                if removed != m:
                    problems.append(f"layer mask {m} removes {removed} layers, its key says {m}")
                    continue
                layer_masks[m] = vec
            lengths = {len(v) for v in layer_masks.values()}
            if len(lengths) > 1:
                problems.append(f"layer masks have different lengths {sorted(lengths)}")

    metric: dict[int, float] = {}
    raw_metric = obj.get("metric") or {}
    if isinstance(raw_metric, dict):
        for key, value in raw_metric.items():
            m = _as_int_key(key, "'metric'", problems)
            if m is None:
                continue
            try:
                metric[m] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
            except (TypeError, ValueError, IndexError):
                problems.append(f"metric {key} is not a number")
    else:
        problems.append(f"'metric' is a {type(raw_metric).__name__}, not a dict")

    width_mask, pre1 = normalise_width_dict(obj.get("width_mask"), "width_mask", problems, binary=True)
    bias, pre2 = normalise_width_dict(obj.get("bias"), "bias", problems, binary=False)
    info = obj.get("info") if isinstance(obj.get("info"), dict) else {}
    calibration = _calibration_records(obj.get("calibration"), problems)
    if problems:
        raise UsageError(f"{path} is not a valid strategy file: " + "; ".join(problems), flag)

    strategy = Strategy(layer_masks, metric, width_mask, bias, dict(info), source=str(path),
                        original_layout=pre1 or pre2, calibration=calibration)
    n = strategy.num_layers
    if n == 0:
        raise UsageError(f"{path} holds neither layer masks nor width masks", flag)
    if 0 not in strategy.layer_masks:
        strategy.layer_masks[0] = np.ones(n, dtype=np.float32)
    strategy.layer_masks = dict(sorted(strategy.layer_masks.items()))
    return strategy


def load_strategy(path: str | os.PathLike, flag: Optional[str] = None) -> Strategy:
    """Load a strategy file (ours or the original AmoebaLLM code's) safely; see the module docstring."""
    return strategy_from_dict(load_npy_dict(path, flag), str(path), flag)


# ----------------------------------------------------------------------------------------------
# Saving, with a readable view
# ----------------------------------------------------------------------------------------------
def view_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The readable view of the strategy file ``path``: ``<stem>.json`` and ``<stem>.md`` beside it (``x.npy`` and
    ``x.npy.gz`` alike: ``x.json``, ``x.md``)."""
    path = Path(path)
    base = path.with_suffix("") if compressed(path) else path
    return base.with_suffix(".json"), base.with_suffix(".md")


def save_strategy(strategy: Strategy, path: str | os.PathLike, view: bool = True) -> Path:
    """Write ``strategy`` in the seed's layout (atomically; gzip-compressed when ``path`` ends in ``.gz``) and, with
    ``view``, ``<stem>.json``/``<stem>.md``."""
    path = Path(path)
    save_npy(path, strategy.to_dict())
    if view:
        summary = describe_strategy(strategy)
        summary["source"] = portable_path(path)  # the file this view describes
        json_path, md_path = view_paths(path)
        write_json(json_path, summary)
        write_text(md_path, render_markdown(summary, path.name))
    logger.info("strategy written to %s", path)
    return path


def width_layer_sizes(strategy: Strategy, ratio: float, head_dim: Optional[int] = None) -> list[dict]:
    """Per-layer kept sizes at ``ratio``: q/kv features, heads/KV groups (when ``head_dim`` is known), channels."""
    head_dim = head_dim or strategy.info.get("head_dim")
    rows = []
    for layer in range(strategy.num_layers):
        q, k, g = (strategy.mask_of(layer, r, ratio) for r in ("q_proj", "k_proj", "gate_proj"))
        row: dict = {"layer": layer}
        if q is not None and k is not None:
            row["q_features"] = f"{int(q.sum())}/{len(q)}"
            row["kv_features"] = f"{int(k.sum())}/{len(k)}"
            if head_dim:
                row["heads"] = f"{int(q.sum()) // head_dim}/{len(q) // head_dim}"
                row["kv_groups"] = f"{int(k.sum()) // head_dim}/{len(k) // head_dim}"
        if g is not None:
            row["channels"] = f"{int(g.sum())}/{len(g)}"
        rows.append(row)
    return rows


def describe_strategy(strategy: Strategy) -> dict:
    """A JSON-ready summary: kept layers and score per depth, kept heads/channels per width."""
    n = strategy.num_layers
    depths = []
    for m, mask in sorted(strategy.layer_masks.items()):
        kept = [int(i) for i in np.flatnonzero(mask > 0.5)]
        depths.append({"num_layers": n - m, "num_removed": m, "score": strategy.metric.get(m),
                       "kept_layers": kept, "removed_layers": [i for i in range(n) if i not in kept]})
    widths = [{"ratio": r, "layers": width_layer_sizes(strategy, r)} for r in sorted(strategy.widths(), reverse=True)]
    return {"num_layers": n, "source": portable_path(strategy.source),
            "written_by_original_code": strategy.original_layout, "info": strategy.info,
            "calibration": strategy.calibration, "depths": depths, "widths": widths}


def portable_path(path: Optional[str | os.PathLike]) -> Optional[str]:
    """``path`` as a written record holds it: relative to the working directory when it lies inside it,
    else the file name alone, so that no file carries the path of the machine it was made on."""
    if path is None:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return p.name


def describe_calibration(record: Optional[dict]) -> str:
    """One readable line for a calibration record: ``method: dp; dataset: c4; split: validation; ...``."""
    if not record:
        return "not recorded"
    return "; ".join(f"{k}: {v}" for k, v in record.items() if not isinstance(v, (dict, list)))


def render_markdown(summary: dict, title: str) -> str:
    """The markdown view of :func:`describe_strategy`'s summary."""
    lines = [f"# {title}", "", f"Model layers: {summary['num_layers']}.", ""]
    calibration = summary.get("calibration") or {}
    if calibration:
        lines += ["## Calibration", ""]
        lines += [f"- {part}: {describe_calibration(record)}" for part, record in calibration.items()]
        lines.append("")
    lines += ["## Depths", "",
             "| layers | removed | score | removed layers | kept layers |", "| ---: | ---: | ---: | --- | --- |"]
    for d in summary["depths"]:
        score = "" if d["score"] is None else f"{d['score']:.6g}"
        lines.append(f"| {d['num_layers']} | {d['num_removed']} | {score} | "
                     f"{', '.join(map(str, d['removed_layers'])) or '-'} | {', '.join(map(str, d['kept_layers']))} |")
    if summary["widths"]:
        widths = summary["widths"]
        with_heads = all("heads" in row for w in widths for row in w["layers"])
        legend = ("heads / KV groups / MLP channels kept" if with_heads else
                  "q features / kv features / MLP channels kept (head size unknown)")
        lines += ["", "## Widths", "", f"Per layer: {legend}.", "",
                  "| layer | " + " | ".join(f"width {w['ratio']:g}" for w in widths) + " |",
                  "| ---: | " + " | ".join("---:" for _ in widths) + " |"]
        keys = ("heads", "kv_groups", "channels") if with_heads else ("q_features", "kv_features", "channels")
        for i in range(summary["num_layers"]):
            cells = []
            for w in widths:
                row = w["layers"][i]
                cells.append(" / ".join(str(row.get(k, "?")).split("/")[0] for k in keys))
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Validation against a model, and applying widths to the elastic model
# ----------------------------------------------------------------------------------------------
def _expected_sizes(em) -> dict[str, int]:
    q = em.num_heads * em.head_dim
    kv = em.num_kv_groups * em.head_dim
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": em.intermediate_size,
            "up_proj": em.intermediate_size, "o_proj": int(em.config.hidden_size),
            "down_proj": int(em.config.hidden_size)}


def _requested(width_choice: Iterable[float]) -> list[float]:
    return [w for w in dict.fromkeys(width_key(r) for r in width_choice) if w != 1.0]


def validate_strategy(strategy: Strategy, em, width_choice: Sequence[float] = (1.0,),
                      flag: Optional[str] = None) -> None:
    """Check ``strategy`` against the elastic model ``em``; raise one UsageError listing every mismatch."""
    where = strategy.source or "the strategy"
    problems: list[str] = []
    if strategy.num_layers != em.num_layers:
        problems.append(f"it is for a {strategy.num_layers}-layer model, this model has {em.num_layers} layers")
    sizes = _expected_sizes(em)
    bad_len: list[str] = []
    beyond = set()
    for table, kind in ((strategy.width_mask, "mask"), (strategy.bias, "bias")):
        for name, per_ratio in table.items():
            layer, role = parse_module_name(name)
            if layer >= em.num_layers:
                beyond.add(layer)
                continue
            for r, arr in (per_ratio or {}).items():
                if len(arr) != sizes[role]:
                    bad_len.append(f"{kind} of {name} at {r:g} has {len(arr)} entries, the model's {role} has "
                                   f"{sizes[role]} {'outputs' if kind == 'mask' else 'output features'}")
    if beyond:
        problems.append(f"width entries name layer(s) {sorted(beyond)[:5]} beyond the model's {em.num_layers}")
    if bad_len:
        more = f" (and {len(bad_len) - 3} more)" if len(bad_len) > 3 else ""
        problems.append("; ".join(bad_len[:3]) + more)
    requested = _requested(width_choice)
    if strategy.has_width and requested:
        have = strategy.widths()
        missing = [r for r in requested if r not in have]
        if missing:
            msg = (f"--width_choice asks for width(s) {', '.join(f'{r:g}' for r in missing)}, the file has "
                   f"{', '.join(f'{r:g}' for r in have)}")
            if set(have) <= set(ORIGINAL_FLAP_RATIOS) or strategy.original_layout:
                msg += (" (a file written by the original AmoebaLLM code holds FLAP ratios 0.8, 0.65, 0.5: use "
                        "--width_choice [1,0.8,0.65,0.5], or recompute widths with --width_calib)")
            problems.append(msg)
        for r in [r for r in requested if r in have]:
            absent = [module_name(i, role) for i in range(min(em.num_layers, strategy.num_layers))
                      for role in MASKED_ROLES if strategy.mask_of(i, role, r) is None]
            if absent:
                problems.append(f"width {r:g} has no mask for {len(absent)} module(s), e.g. {absent[0]}")
    if problems:
        raise UsageError(f"{where} does not fit the model: " + "; ".join(problems), flag)


def _width_units(strategy: Strategy, em, ratio: float, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept KV groups, kept MLP channels) of ``layer`` at ``ratio`` as boolean vectors over original units."""
    where = strategy.source or "the strategy"
    hd, rep, groups = em.head_dim, em.queries_per_group, em.num_kv_groups
    q, k, v, gate, up = (strategy.mask_of(layer, r, ratio) for r in MASKED_ROLES)
    k_units = k.reshape(groups, hd) > 0.5
    if not np.all(k_units == k_units[:, :1]):
        raise UsageError(f"{where}: width {ratio:g}, layer {layer}: the k_proj mask does not keep whole heads of "
                         f"{hd} features")
    kept_groups = k_units[:, 0]
    expect_q = np.repeat(kept_groups, rep * hd)
    if not np.array_equal(q > 0.5, expect_q) or not np.array_equal(v > 0.5, np.repeat(kept_groups, hd)):
        raise UsageError(f"{where}: width {ratio:g}, layer {layer}: q/k/v masks do not keep whole KV groups (a KV "
                         f"head with its {rep} query head(s))")
    if not np.array_equal(gate > 0.5, up > 0.5):
        raise UsageError(f"{where}: width {ratio:g}, layer {layer}: gate_proj and up_proj masks differ")
    return kept_groups, gate > 0.5


def _importance_order(kept: list[np.ndarray], what: str, where: str) -> np.ndarray:
    """Units ordered by how many ratios keep them (most first); ``kept`` is ordered by descending ratio and
    must be nested (each set inside the previous one)."""
    for wide, narrow in zip(kept, kept[1:]):
        if np.any(narrow & ~wide):
            raise UsageError(f"{where}: {what}: the kept sets are not nested across widths (a narrower width keeps "
                             "a unit that a wider one drops), so widths cannot be prefixes")
    count = np.sum(np.stack(kept), axis=0) if kept else np.zeros(0)
    return np.argsort(-count, kind="stable")


def _current_positions(order_now, wanted: np.ndarray):
    """Translate an order over original unit indices into positions of the model's current unit order."""
    now = torch.as_tensor(order_now, dtype=torch.long)
    inv = torch.empty_like(now)
    inv[now] = torch.arange(len(now))
    return inv[torch.as_tensor(wanted, dtype=torch.long)]


def _unit_orders(kept: dict, rank_by: Sequence[float], em, where: str) -> tuple[list, list]:
    """Per layer, the new order of KV groups and MLP channels (as positions of the current order): a unit kept
    at more of the widths ``rank_by`` ranks higher. ``kept[r][layer]`` = (kept groups, kept channels); the
    kept sets must be nested across ``rank_by``."""
    group_orders, channel_orders = [], []
    for layer in range(em.num_layers):
        g_order = _importance_order([kept[r][layer][0] for r in rank_by], f"layer {layer} KV groups", where)
        c_order = _importance_order([kept[r][layer][1] for r in rank_by], f"layer {layer} MLP channels", where)
        group_orders.append(_current_positions(em.state.group_order[layer], g_order))
        channel_orders.append(_current_positions(em.state.channel_order[layer], c_order))
    return group_orders, channel_orders


def apply_strategy(em, strategy: Strategy, width_choice: Sequence[float], nonuniform: bool = True) -> None:
    """Give the elastic model ``em`` the strategy's widths for every ratio in ``width_choice``.

    Each layer's KV groups and MLP channels are reordered once by importance, so every width is a prefix. The
    ranking uses every width of the file when their kept sets are nested, so the unit order, and with it the
    bf16 rounding of every result, does not depend on which widths ``--width_choice`` asks for (even none);
    otherwise the requested widths alone (they must be nested). With ``nonuniform`` each ratio gets the file's
    per-layer sizes and FLAP biases as a width plan, otherwise widths stay uniform (round(r * n) per layer, no
    bias). Depth masks are read by callers (``strategy.layer_masks``). Ratio 1.0 is the full model.
    """
    validate_strategy(strategy, em, width_choice)
    ratios = sorted((r for r in _requested(width_choice) if r in strategy.widths()), reverse=True)
    if not strategy.has_width:
        if _requested(width_choice):
            logger.warning("the strategy has no width masks; widths %s stay uniform (first units)",
                           ", ".join(f"{r:g}" for r in _requested(width_choice)))
        return
    where = strategy.source or "the strategy"
    n = em.num_layers

    def kept_units(r):
        return [_width_units(strategy, em, r, layer) for layer in range(n)]

    kept = {r: kept_units(r) for r in ratios}
    every = sorted((r for r in strategy.widths() if r != 1.0), reverse=True)
    orders = None
    if every != ratios:
        try:
            kept_all = {r: kept[r] if r in kept else kept_units(r) for r in every}
            orders = _unit_orders(kept_all, every, em, where)
        except UsageError as err:
            logger.info("units ranked by the requested widths only, not by all of the file's: %s", err)
    if orders is None and ratios:
        orders = _unit_orders(kept, ratios, em, where)
    if orders is not None:
        em.reorder(*orders)

    for r in ratios:
        if not nonuniform:
            em.width_plans.pop(width_key(r), None)
            continue
        groups, channels, bias = [], [], {}
        for layer in range(n):
            g, c = (int(units.sum()) for units in kept[r][layer])
            if g == 0 or c == 0:
                logger.warning("%s: width %g keeps no %s in layer %d; keeping its most important one (the file's "
                               "bias assumed none kept)", where, r, "KV group" if g == 0 else "MLP channel", layer)
            groups.append(max(g, 1))
            channels.append(max(c, 1))
            for role in ("o_proj", "down_proj"):
                b = strategy.bias_of(layer, role, r)
                if b is not None and np.any(b != 0):
                    bias[(layer, role)] = torch.from_numpy(np.asarray(b, dtype=np.float32).copy())
        em.add_width_plan(r, groups, channels, bias=bias or None)
    logger.info("strategy widths applied: %s (%s)", ", ".join(f"{r:g}" for r in ratios),
                "per-layer FLAP plans" if nonuniform else "uniform")
