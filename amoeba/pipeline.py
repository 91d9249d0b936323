"""What ``main.py`` runs: load once, then the stages the flags ask for, in the seed's order.

Stage 1 width calibration (``--width_calib``) ends the run, as in the seed. Otherwise: layer DP
(``--layer_calib_dp``), then the elastic model with the strategy file, training (``--do_train``),
export (``--export_dir``) and evaluation of the requested shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from amoeba.args import Arguments
from amoeba.errors import UsageError

logger = logging.getLogger(__name__)


def wants_evaluation(args: Arguments) -> bool:
    """True when any evaluation flag is on."""
    t = args.train
    return bool(t.do_mmlu_eval or t.do_eval_wikitext2 or t.do_lm_eval or (t.do_eval and not t.no_eval_orig))


def run(args: Arguments) -> None:
    """Run every stage ``args`` asks for."""
    t = args.train
    if args.model.materialize_default_model:
        from amoeba.default_model import materialize_default_model

        path = materialize_default_model()
        print(f"default model ready at {path}")
        return

    from transformers import set_seed

    from amoeba.files import save_run_record
    from amoeba.loading import load_model_and_tokenizer

    if t.shrinking_file and not Path(t.shrinking_file).is_file():
        raise UsageError(f"no such file: {t.shrinking_file}", "--shrinking_file")
    if t.adapter_dir is not None:
        from amoeba.adapters import find_adapter_dir

        if t.do_train:
            raise UsageError("reads the adapters of a finished run; it cannot be combined with --do_train True",
                             "--adapter_dir")
        if not Path(t.adapter_dir).is_dir() or find_adapter_dir(t.adapter_dir) is None:
            raise UsageError(f"no trained adapters in {t.adapter_dir}", "--adapter_dir")
    if t.do_lm_eval and not t.width_calib:  # an unknown task, or one without its data, fails before the model loads
        from amoeba.evaluation import check_lm_eval_tasks

        check_lm_eval_tasks(args)
    out = prepare_output_folders(args)
    model, tokenizer = load_model_and_tokenizer(args.model, t)
    set_seed(t.seed)
    if not t.do_train or t.width_calib:
        # A training run writes its record once it knows the folder is its own (not an earlier run's, which a
        # refused command must leave untouched): see amoeba.training.prepare_trainer.
        save_run_record(out, args)

    if t.width_calib:
        from amoeba.flap import run_width_calibration

        run_width_calibration(args, model, tokenizer)
        return
    if t.layer_calib_dp:
        from amoeba.depth_dp import run_layer_calibration

        run_layer_calibration(args, model, tokenizer)
        if not (t.do_train or wants_evaluation(args) or t.export_dir):
            return

    from amoeba.elastic import make_elastic

    em = make_elastic(model)
    check_shapes(args, em.num_layers)
    strategy = None
    if t.shrinking_file and (t.enable_shrinking or t.shrinkable_width):
        from amoeba.strategy import apply_strategy, load_strategy

        strategy = load_strategy(t.shrinking_file)
        apply_strategy(em, strategy, args.width_choice if t.shrinkable_width else (1.0,),
                       nonuniform=t.nonuniform_width or t.prune_width_method == "flap")
    elif t.shrinking_method == "calib_dp" and t.enable_shrinking and (t.do_train or wants_evaluation(args)):
        raise UsageError("--shrinking_method calib_dp needs --shrinking_file (the Stage 1 strategy)",
                         "--shrinking_file")

    if t.do_train:
        from amoeba.training import run_training

        model = run_training(args, model, tokenizer, em, strategy)
    elif t.adapter_dir is not None or t.use_moe_lora or _has_adapters(out):
        from amoeba.adapters import load_trained_adapters

        model = load_trained_adapters(args, model, em, t.adapter_dir or out)

    if t.budget_params or t.budget_latency_ms is not None:
        from amoeba.budget import run_budget

        run_budget(args, model, tokenizer, em, strategy)  # exports the best fitting shape with --export_dir
    elif t.export_dir:
        from amoeba.export import export_from_args

        export_from_args(args, model, tokenizer, em, strategy)
    if wants_evaluation(args):
        from amoeba.evaluation import run_evaluation

        run_evaluation(args, model, tokenizer, em, strategy)


def prepare_output_folders(args: Arguments) -> Path:
    """Refuse, before any work, output folders that cannot be written or an export that would replace data;
    return ``--output_dir``, created. ``--export_dir`` follows the export rule
    (:func:`amoeba.export.check_export_target`: never the run's own folder, the model, adapters or strategy
    being read, nor a folder holding them; ``--overwrite`` replaces only an earlier export)."""
    from amoeba.files import writable_dir

    t = args.train
    if t.export_dir is not None and not t.width_calib:  # width calibration ends the run before any export
        from amoeba.export import check_export_target, protected_paths

        writable_dir(t.output_dir, "--output_dir", create=False)  # its problems first: it is named first
        check_export_target(t.export_dir, t.overwrite, protected_paths(args))
    return writable_dir(t.output_dir, "--output_dir")


def check_shapes(args: Arguments, num_layers: int) -> None:
    """Refuse depths the model cannot have before any work starts."""
    t = args.train
    for layers in list(args.eval_layers or ()) + [d for d, _ in args.eval_shapes or ()]:
        if layers > num_layers:
            raise UsageError(f"{layers} layers asked, the model has {num_layers}", "--eval_num_layer")
    if t.enable_shrinking and t.min_num_layer > num_layers:
        raise UsageError(f"{t.min_num_layer} exceeds the model's {num_layers} layers", "--min_num_layer")


def _has_adapters(output_dir: Path) -> bool:
    """True when ``output_dir`` holds trained adapters (a finished or checkpointed Stage 2 run)."""
    return (output_dir / "adapter_model").is_dir() or any(output_dir.glob("checkpoint-*/adapter_model"))
