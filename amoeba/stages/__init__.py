"""The stage entries: where the command-line flags stop.

Each module here is one stage of the pipeline as the command line asks for it. It reads the argument groups of
:mod:`amoeba.args`, turns them into typed values and small settings objects, calls the components below it, and
names the flag when a component refuses a value. Nothing below the stages sees a flag; no stage imports another
(:mod:`amoeba.pipeline` runs them in order, and ``tests/test_layering.py`` keeps it that way).

- :mod:`.calibration`: Stage 1, layer selection (DP, ShortGPT) and width selection (FLAP);
- :mod:`.finetuning`: Stage 2, one-for-all fine-tuning: setup, callbacks, outputs;
- :mod:`.evaluation`: evaluation of the requested shapes, resumable, into ``metrics.json`` and a report;
- :mod:`.deployment`: export of one shape, and the budget picker that chooses it.
"""
