"""AmoebaLLM: fine-tune a Llama-family LLM once, then cut out and deploy subnets of any shape.

The library is organised one module per concept:

- ``args``: the command-line argument dataclasses (the seed README's flags).
- ``errors``: the exception type that ``main.py`` turns into a one-line message and exit code 2.
- ``loading``: model and tokenizer loading (hub id, local folder, ``.gguf`` file, 4/8-bit).
- ``default_model``: materialises the default SmolLM2-135M-Instruct folder offline.
- ``subnet``: the small value object describing one subnet (kept layers, width).
- ``elastic``: the elastic model that runs exactly the current subnet, on stock transformers.
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
