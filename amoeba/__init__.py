"""AmoebaLLM: fine-tune a Llama-family LLM once, then cut out and deploy subnets of any shape.

The library is organised one module per concept:

- ``args``: the command-line argument dataclasses (the seed README's flags).
- ``errors``: the exception type that ``main.py`` turns into a one-line message and exit code 2.
- ``loading``: model and tokenizer loading (hub id, local folder, ``.gguf`` file, 4/8-bit).
- ``default_model``: materialises the default SmolLM2-135M-Instruct folder offline.
- ``subnet``: the small value object describing one subnet (kept layers, width).
- ``elastic``: the elastic model that runs exactly the current subnet, on stock transformers.
"""

__version__ = "0.1.0"
