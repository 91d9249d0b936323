"""The value object that names one subnet: which decoder layers run, and how wide they are, and the one
spelling of a width ratio (:func:`width_key`) that every table of widths is keyed by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

Width = Union[float, tuple[float, ...]]


def width_key(ratio: float) -> float:
    """Canonical key for a width ratio, so 7/8 and 0.875 name the same width everywhere."""
    return round(float(ratio), 6)


@dataclass(frozen=True)
class Subnet:
    """One shape of the elastic model.

    ``layers``: indices of the kept decoder layers, ascending. ``width``: a single ratio (the key of a
    width plan, e.g. a FLAP ratio from the strategy file, or a uniform ratio) or one ratio per kept
    layer (uniform within each layer, no FLAP bias).
    """

    layers: tuple[int, ...]
    width: Width = 1.0

    def __post_init__(self):
        layers = tuple(int(i) for i in self.layers)
        if not layers:
            raise ValueError("a subnet keeps at least one layer")
        if list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"kept layers must be distinct ascending indices, got {layers}")
        object.__setattr__(self, "layers", layers)
        if isinstance(self.width, (tuple, list)):
            widths = tuple(width_key(w) for w in self.width)
            if len(widths) != len(layers):
                raise ValueError(f"{len(widths)} per-layer widths for {len(layers)} kept layers")
            if any(not 0 < w <= 1 for w in widths):
                raise ValueError(f"width ratios must lie in (0, 1], got {widths}")
            object.__setattr__(self, "width", widths)
        else:
            w = width_key(self.width)
            if not 0 < w <= 1:
                raise ValueError(f"width ratio must lie in (0, 1], got {self.width}")
            object.__setattr__(self, "width", w)

    @classmethod
    def full(cls, num_layers: int) -> "Subnet":
        """The whole model."""
        return cls(tuple(range(num_layers)), 1.0)

    @classmethod
    def from_mask(cls, mask: Sequence, width: Width = 1.0) -> "Subnet":
        """Build from a 0/1 kept-layer mask over all layers (the strategy file's layout)."""
        mask = np.asarray(mask).reshape(-1)
        return cls(tuple(int(i) for i in np.flatnonzero(mask > 0.5)), width)

    @property
    def num_layers(self) -> int:
        """Number of kept layers."""
        return len(self.layers)

    def mask(self, total_layers: int) -> np.ndarray:
        """0/1 float mask over all ``total_layers`` layers."""
        out = np.zeros(total_layers, dtype=np.float32)
        out[list(self.layers)] = 1.0
        return out

    def width_of(self, position: int) -> float:
        """Width ratio of the ``position``-th kept layer."""
        return self.width[position] if isinstance(self.width, tuple) else self.width

    @property
    def label(self) -> str:
        """Short name used in metric keys, e.g. ``l24w0.875`` (the seed's suffix)."""
        if isinstance(self.width, tuple):
            return f"l{self.num_layers}w" + "-".join(f"{w:g}" for w in self.width)
        return f"l{self.num_layers}w{self.width:g}"
