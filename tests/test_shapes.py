"""Which subnet "L layers x width w" is: the strategy's kept layers or the first ones, and only the widths the run
has; every stage asks the same :class:`amoeba.shapes.Shapes`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.shapes import Shapes, layer_masks
from amoeba.subnet import Subnet
from tests.conftest import tiny_model


def _elastic(plan: bool = False):
    em = make_elastic(tiny_model("gqa", layers=4))
    if plan:
        em.add_width_plan(0.5, [em.num_kv_groups // 2] * 4, [em.intermediate_size // 2] * 4)
    return em


def test_depth_from_the_strategy_masks_or_the_first_layers():
    em = _elastic()
    masks = {0: [1, 1, 1, 1], 1: [1, 0, 1, 1], 2: [1, 0, 0, 1]}
    shapes = Shapes(em, masks)
    assert shapes.subnet(3, 1.0).layers == (0, 2, 3)
    assert shapes.subnet(2, 0.5) == Subnet((0, 3), 0.5)
    assert shapes.subnet(4, 1.0).layers == (0, 1, 2, 3)  # all layers need no mask
    assert Shapes(em).subnet(2, 1.0).layers == (0, 1)  # first_layers
    with pytest.raises(UsageError, match="--eval_num_layer: the strategy has no 1-layer subnet \\(it has \\[2,"):
        shapes.subnet(1, 1.0, layer_flag="--eval_num_layer")
    with pytest.raises(UsageError, match="^9 layers asked, the model has 4$"):  # no flag: the caller names it
        shapes.subnet(9, 1.0)
    assert shapes.depths(1) == [4, 3, 2] and Shapes(em).depths(2) == [4, 3, 2]


def test_widths_are_the_plans_when_there_are_plans_else_the_uniform_ones():
    em = _elastic(plan=True)
    strategy = SimpleNamespace(layer_masks={0: np.ones(4), 1: np.array([1, 0, 1, 1.0])}, widths=[1.0, 0.5, 0.25])
    shapes = Shapes.under(em, strategy, uniform_widths=())  # as an export resolves its shape
    assert shapes.widths == (1.0, 0.5) and shapes.subnet(3, 0.5).layers == (0, 2, 3)
    with pytest.raises(UsageError, match="--eval_num_layer.*no 2-layer subnet"):
        shapes.subnet(2, 0.5, layer_flag="--eval_num_layer", width_flag="--eval_num_width")
    with pytest.raises(UsageError, match="--eval_num_width: 0.75 not among the strategy's widths \\(1, 0.5\\); the "
                                         "file also has 0.25"):
        shapes.subnet(3, 0.75, layer_flag="--eval_num_layer", width_flag="--eval_num_width")
    uniform = Shapes(_elastic(), uniform_widths=(1.0, 0.75), uniform_name="--width_choice")
    assert uniform.grid(3) == [(4, 1.0), (4, 0.75), (3, 1.0), (3, 0.75)]
    with pytest.raises(UsageError, match="0.5 not among --width_choice \\(1, 0.75\\)"):
        uniform.check_widths([0.75, 0.5])
    assert Shapes(_elastic()).subnet(4, 0.3).width == 0.3  # no uniform widths given: any ratio
    assert Shapes.under(em, strategy, strategy_depths=False).subnet(3, 1.0).layers == (0, 1, 2)


def test_layer_masks_must_cover_the_model():
    strategy = SimpleNamespace(layer_masks={0: np.ones(6), 1: np.array([1, 1, 0, 1, 1, 1.0])})
    assert sorted(layer_masks(strategy, 6)) == [0, 1]
    assert layer_masks(None, 6) is None
    with pytest.raises(UsageError, match="--shrinking_file: the strategy belongs to a model with 6 layers; this "
                                         "model has 4"):
        layer_masks(strategy, 4, "--shrinking_file")
