"""Which subnet "L layers x width w" is: the one rule every stage uses when a shape is named by two numbers.

- **Depth.** Under a strategy's kept-layer masks ({number removed: 0/1 mask over all layers}, the seed's
  ``--shrinking_method calib_dp``) the L-layer subnet keeps the layers of the mask that removes ``N - L``;
  without masks it keeps the first L layers (the seed's ``first_layers``). All ``N`` layers need no mask.
- **Width.** A ratio the elastic model holds a width plan for (the strategy's FLAP widths: per-layer sizes and
  biases) runs as that plan; any other ratio is uniform (``round(r * n)`` heads/channels per layer). Which ratios
  a run may ask for is :attr:`Shapes.widths`: the planned ones when there are plans, else the uniform ones it was
  given (None: any ratio).

Errors say what is wrong with the numbers; the flags they came from are the caller's to name (``layer_flag``,
``width_flag``).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from amoeba.elastic import ElasticModel
from amoeba.errors import UsageError
from amoeba.subnet import Subnet, width_key

logger = logging.getLogger(__name__)


def layer_masks(strategy, num_layers: int, flag: Optional[str] = None) -> Optional[dict[int, np.ndarray]]:
    """The strategy's kept-layer masks {removed: mask} as flat arrays, checked to cover ``num_layers`` layers; None
    without a strategy. ``strategy`` is a :class:`amoeba.strategy.Strategy` (or anything with ``layer_masks``) or
    the seed's dict."""
    if strategy is None:
        return None
    masks = getattr(strategy, "layer_masks", None)
    if masks is None and isinstance(strategy, dict):
        masks = strategy.get("layer_masks") or strategy.get("strategy")
    if not masks:
        raise UsageError("the strategy holds no layer masks", flag)
    out = {}
    for k, m in masks.items():
        m = np.asarray(m).reshape(-1)
        if m.size != num_layers:
            raise UsageError(f"the strategy belongs to a model with {m.size} layers; this model has {num_layers}",
                             flag)
        out[int(k)] = m
    return out


def strategy_file_widths(strategy) -> list[float]:
    """The width ratios a strategy file holds masks for (none for a depth-only file or no strategy)."""
    widths = getattr(strategy, "widths", None)
    widths = widths() if callable(widths) else widths
    return list(widths or [])


class Shapes:
    """The subnets of one elastic model under one strategy, named by (layers, width).

    ``masks``: kept-layer masks {removed: mask} (:func:`layer_masks`), or None for the first layers.
    ``uniform_widths``: the ratios a run may ask for when the model holds no width plans (None: any ratio);
    ``uniform_name`` says where they come from in messages. ``file_widths``: the strategy file's ratios, for hints.
    """

    def __init__(self, em: ElasticModel, masks: Optional[dict] = None,
                 uniform_widths: Optional[Sequence[float]] = None, uniform_name: str = "the uniform widths",
                 file_widths: Sequence[float] = ()):
        self.em = em
        self.masks = masks
        self.planned = bool(em.width_plans)
        if self.planned:
            self.widths: Optional[tuple[float, ...]] = tuple(sorted({1.0, *em.width_plans}, reverse=True))
        elif uniform_widths is not None:
            self.widths = tuple(sorted({1.0, *(width_key(w) for w in uniform_widths)}, reverse=True))
        else:
            self.widths = None
        self.uniform_name = uniform_name
        self.file_widths = [width_key(w) for w in file_widths]

    @classmethod
    def under(cls, em: ElasticModel, strategy=None, strategy_depths: bool = True,
              uniform_widths: Optional[Sequence[float]] = None, uniform_name: str = "the uniform widths") -> "Shapes":
        """The shapes under ``strategy`` (None: no strategy): depths from its kept-layer masks when
        ``strategy_depths`` (the seed's ``calib_dp``), else the first layers; widths as :class:`Shapes` says."""
        masks = layer_masks(strategy, em.num_layers) if strategy is not None and strategy_depths else None
        return cls(em, masks, uniform_widths, uniform_name, strategy_file_widths(strategy))

    @property
    def num_layers(self) -> int:
        """Layers of the full model."""
        return self.em.num_layers

    def depths(self, min_layers: int) -> list[int]:
        """The depths there are subnets of, deepest first: the strategy's, or every one from the full depth down
        to ``min_layers`` (at least 1)."""
        n = self.num_layers
        if self.masks:
            return sorted({n - int(m) for m in self.masks}, reverse=True)
        return list(range(n, max(1, min(min_layers, n)) - 1, -1))

    def check_widths(self, widths: Sequence[float], flag: Optional[str] = None) -> None:
        """Refuse, in one UsageError, the ratios of ``widths`` that are not among :attr:`widths`."""
        if self.widths is None:
            return
        bad = [w for w in dict.fromkeys(width_key(w) for w in widths) if w not in self.widths]
        if not bad:
            return
        where = "the strategy's widths" if self.planned else self.uniform_name
        msg = (f"{', '.join(f'{w:g}' for w in bad)} not among {where} "
               f"({', '.join(f'{w:g}' for w in self.widths)})")
        extra = [w for w in self.file_widths if w not in self.widths]
        if extra:
            msg += f"; the file also has {', '.join(f'{w:g}' for w in extra)}: add them to --width_choice"
        raise UsageError(msg, flag)

    def subnet(self, layers: int, width: float = 1.0, layer_flag: Optional[str] = None,
               width_flag: Optional[str] = None) -> Subnet:
        """The subnet of ``layers`` layers at ``width`` (see the module docstring); a width the run does not have, or
        a depth the strategy lacks, raises UsageError."""
        self.check_widths([width], width_flag)
        n = self.num_layers
        if not 1 <= layers <= n:
            raise UsageError(f"{layers} layers asked, the model has {n}", layer_flag)
        removed = n - layers
        if removed == 0:
            return Subnet(tuple(range(n)), width)
        if self.masks is not None:
            if removed not in self.masks:
                have = sorted(n - k for k in self.masks)
                raise UsageError(f"the strategy has no {layers}-layer subnet (it has {have})", layer_flag)
            return Subnet.from_mask(self.masks[removed], width)
        return Subnet(tuple(range(layers)), width)

    def grid(self, min_layers: int) -> list[tuple[int, float]]:
        """Every (layers, width) pair there is a subnet of (:meth:`depths` x :attr:`widths`), largest first; needs
        a finite set of widths."""
        if self.widths is None:
            raise ValueError("the widths of these shapes are open; give uniform_widths")
        return [(d, w) for d in self.depths(min_layers) for w in self.widths]
