"""AmoebaLLM: fine-tune a Llama-family LLM once, then cut out and deploy subnets of any shape.

The library is organised one module per concept, in three layers; imports only point down
(``tests/test_layering.py`` checks it):

- **Stages** read the command-line flags: ``args`` (the one parser, one argument group per stage), ``pipeline``
  (the stage order) and the stage entries in ``stages/`` (calibration, fine-tuning, evaluation, deployment).
- **Components** do the work on typed values: ``loading``, ``elastic`` (the elastic model), ``strategy``,
  ``depth_dp`` and ``flap`` (Stage 1), ``adapters`` and ``training`` (Stage 2), ``evaluation`` with ``mmlu``,
  ``text_data`` and ``lm_eval_runner``, ``export``, ``budget``, ``report``, ``instruct_data``, ``default_model``.
- **Shared rooms** hold what several stages need to agree on: ``subnet`` (the value object and ``width_key``),
  ``shapes`` (which subnet "L layers x width w" is), ``run_folder`` (where a run keeps its adapters, checkpoints
  and metrics.json), ``npy`` (safe .npy files), ``distributed`` (process groups), ``model_state`` (eval mode),
  ``files`` (atomic writes) and ``errors``.
"""

import logging

__version__ = "0.1.0"


class DropMessage(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``prefixes`` (for library
    warnings about something this project does on purpose; each use says why)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# bitsandbytes warns at import, on every CPU run, that an optional CPU 4-bit kernel package is missing. The 4-bit
# path runs only on CUDA here (--bits 4 needs a GPU), so the message is never about the user's command: drop
# exactly that one. Set before any module of this package imports bitsandbytes (through peft/transformers).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
# The same attempt, through the ``kernels`` package, also says offline that it skips the hub's publisher check for that
# kernel (seen with kernels 0.19.1 and HF_HUB_OFFLINE=1): the same kernel, the same reason to drop it.
logging.getLogger("kernels._internals.hf_hub").addFilter(
    DropMessage("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"))
