"""Small facts about a model every measuring loop needs: where its inputs go, and a temporary eval mode.

Calibration, evaluation, perplexity and export all run the model in eval mode (dropout off, the MoE router's
gates deterministic) and must hand it back as they found it, also when they fail: :func:`eval_mode`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block; afterwards it is in the mode it was in before, whatever
    happens inside."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where input ids must go)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device
