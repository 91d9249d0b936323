"""The model families the elastic model runs, and what each of them allows.

One table, keyed by ``config.model_type``. The README's family table says the same in prose; the tests in
``tests/test_families.py`` (and the Llama/Qwen/Mistral tests elsewhere) back every supported row.

What the elastic model needs from a family: decoder layers in ``model.layers`` with ``self_attn.{q,k,v,o}_proj``
and ``mlp.{gate,up,down}_proj`` as linear modules (or packed ones, which it holds as their parts), and nothing
that reads a statistic over all heads (or all channels) of one projection. Depth works for every family here;
width where ``width`` is true.
"""

from __future__ import annotations

from dataclasses import dataclass

from amoeba.errors import UsageError


@dataclass(frozen=True)
class Family:
    """One model family: its name, whether width can be sliced exactly, and its limits."""

    name: str
    width: bool = True
    limits: str = ""
    # packed projections: (block, packed module, its parts in output order), e.g. Phi-3's qkv_proj
    packed: tuple = ()


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 1/2/3 and Llama-architecture models (SmolLM2, TinyLlama, ...)"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2, Qwen2.5 (attention biases)"),
    "qwen3": Family("Qwen3 (dense)", limits="per-head q/k norms (sliced with their heads, exact)"),
    "gemma": Family("Gemma"),
    "gemma2": Family("Gemma 2", limits="sliding-window and full-attention layers alternate; a depth subnet's KV "
                                       "cache is given one slot per kept layer, of that layer's type"),
    "gemma3_text": Family("Gemma 3 (text: 270M, 1B; the text model of larger checkpoints)",
                          limits="as Gemma 2, plus per-head q/k norms; multimodal checkpoints (model_type "
                                 "gemma3) are not supported as such"),
    "olmo2": Family("OLMo-2", width=False,
                    limits="depth only: q and k are normalised over the whole projection (one RMS over all heads), "
                           "so dropping heads changes the kept heads' values; width is refused"),
    "phi3": Family("Phi-3, Phi-3.5, Phi-4-mini",
                   limits="q/k/v and gate/up are packed into one projection each: the elastic model holds them as "
                          "their parts (each sliced like Llama's) and the export packs them again; dense weights only",
                   packed=(("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                           ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))),
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: str | None) -> Family:
    """The family of ``model_type``; a UsageError naming the supported ones when there is none."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise UsageError(f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return family


def check_width_support(model_type: str | None, what: str = "") -> None:
    """Raise a UsageError when ``model_type`` is a depth-only family (its width cannot be sliced exactly);
    ``what`` (e.g. the subnet asked for) opens the message."""
    family = FAMILIES.get(model_type or "")
    if family is not None and not family.width:
        raise UsageError(f"{what + ': ' if what else ''}width is not supported for {model_type}: {family.limits}")
