"""What ``main.py`` runs: check the command, load once, then the stages the flags ask for, in the seed's order.

Stage 1 width calibration (``--width_calib``) ends the run, as in the seed. Otherwise: layer DP
(``--layer_calib_dp``), then the elastic model with the strategy file, training (``--do_train``) or the adapters
of a finished run, export (``--export_dir``) or the budget picker, and evaluation of the requested shapes.
:func:`run` reads as that list; each step is a function below, and each stage is a module of
:mod:`amoeba.stages`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from transformers import set_seed

from amoeba.args import Arguments
from amoeba.compiled import check_compile_command
from amoeba.default_model import materialize_default_model, materialize_model
from amoeba.distributed import check_launch, process_count
from amoeba.elastic import ElasticModel, make_elastic
from amoeba.errors import UsageError, for_flag
from amoeba.export import check_export_target
from amoeba.families import check_width_support
from amoeba.files import writable_dir
from amoeba.loading import LoadSettings, load_model_and_tokenizer
from amoeba.run_folder import find_adapters, save_run_record
from amoeba.sharding import check_fsdp_command
from amoeba.stages.calibration import run_layer_calibration, run_width_calibration
from amoeba.stages.deployment import export_from_args, protected_paths, run_budget
from amoeba.stages.evaluation import check_lm_eval_tasks, run_evaluation
from amoeba.stages.finetuning import load_trained_adapters, run_training
from amoeba.strategy import Strategy, apply_strategy, load_strategy

logger = logging.getLogger(__name__)


def run(args: Arguments) -> None:
    """Run every stage ``args`` asks for."""
    if args.model.materialize_default_model:
        print(f"default model ready at {materialize_default_model()}")
        return
    if args.model.materialize_model:
        with for_flag("--materialize_model"):
            print(f"model ready at {materialize_model(args.model.materialize_model)}")
        return
    check_command(args)
    out = prepare_output_folders(args)
    model, tokenizer = load_model_and_tokenizer(load_settings(args))
    check_width_flags(args, model.config.model_type)
    set_seed(args.train.seed)
    if not args.train.do_train or args.calibration.width_calib:
        # A training run writes its record once it knows the folder is its own (not an earlier run's, which a
        # refused command must leave untouched): see amoeba.stages.finetuning.prepare_trainer.
        save_run_record(out, *args.record())
    if args.calibration.width_calib:
        run_width_calibration(args, model, tokenizer)
        return
    if args.calibration.layer_calib_dp:
        run_layer_calibration(args, model, tokenizer)
        if not (args.train.do_train or wants_evaluation(args) or args.export.export_dir):
            return
    with for_flag("--model_name_or_path"):  # an architecture the elastic model does not cover
        em = make_elastic(model)
    check_shapes(args, em.num_layers)
    strategy = load_elastic_strategy(args, em)
    model, adapters_dir = adapt(args, model, tokenizer, em, strategy, out)
    if wants_budget(args):
        run_budget(args, model, tokenizer, em, strategy, adapters_dir)  # exports the best fitting shape too
    elif args.export.export_dir:
        export_from_args(args, model, tokenizer, em, strategy, adapters_dir)
    if wants_evaluation(args):
        run_evaluation(args, model, tokenizer, em, strategy)


# ----------------------------------------------------------------------------------------------
# What the flags ask for
# ----------------------------------------------------------------------------------------------
def wants_evaluation(args: Arguments) -> bool:
    """True when any evaluation flag is on."""
    e = args.evaluation
    return bool(e.do_mmlu_eval or e.do_eval_wikitext2 or e.do_lm_eval or (args.train.do_eval and not e.no_eval_orig))


def wants_budget(args: Arguments) -> bool:
    """True when a parameter or latency budget is given."""
    return bool(args.budget.budget_params or args.budget.budget_latency_ms is not None)


def load_settings(args: Arguments) -> LoadSettings:
    """How the flags ask for the base model to be loaded."""
    m, t = args.model, args.train
    return LoadSettings(model=m.model_name_or_path, trust_remote_code=m.trust_remote_code,
                        use_auth_token=m.use_auth_token, bf16=bool(getattr(t, "bf16", False)),
                        fp16=bool(getattr(t, "fp16", False)), bits=m.bits, double_quant=m.double_quant,
                        quant_type=m.quant_type, device_map=m.device_map,
                        training=bool(t.do_train and not args.calibration.width_calib), cache_dir=m.cache_dir,
                        sharded=t.shard_settings is not None)


# ----------------------------------------------------------------------------------------------
# Before any work
# ----------------------------------------------------------------------------------------------
def check_command(args: Arguments) -> None:
    """Refuse, before the model loads, files that do not exist, flags that do not go together and lm-eval tasks
    that cannot be had."""
    check_launch(cpu=bool(args.train.use_cpu))
    c = args.calibration
    check_fsdp_command(args.train.shard_settings, do_train=bool(args.train.do_train), bits=args.model.bits,
                       device_map=args.model.device_map, calibrating=bool(c.layer_calib_dp or c.width_calib),
                       exporting=bool(args.export.export_dir or wants_budget(args)), world_size=process_count())
    check_compile_command(bool(args.train.compile_layers), do_train=bool(args.train.do_train), bits=args.model.bits,
                          device_map=args.model.device_map, sharded=args.train.shard_settings is not None,
                          cuda=torch.cuda.is_available() and not args.train.use_cpu, mode=args.train.compile_mode,
                          layers_per_graph=args.train.layers_per_graph)
    e = args.elastic
    if e.shrinking_file and not Path(e.shrinking_file).is_file():
        raise UsageError(f"no such file: {e.shrinking_file}", "--shrinking_file")
    adapter_dir = args.adapters.adapter_dir
    if adapter_dir is not None:
        if args.train.do_train:
            raise UsageError("reads the adapters of a finished run; it cannot be combined with --do_train True",
                             "--adapter_dir")
        if not Path(adapter_dir).is_dir() or find_adapters(adapter_dir) is None:
            raise UsageError(f"no trained adapters in {adapter_dir}", "--adapter_dir")
    if args.evaluation.do_lm_eval and not args.calibration.width_calib:
        check_lm_eval_tasks(args)  # an unknown task, or one without its data, fails before the model loads


def prepare_output_folders(args: Arguments) -> Path:
    """Refuse, before any work, output folders that cannot be written or an export that would replace data;
    return ``--output_dir``, created. ``--export_dir`` follows the export rule
    (:func:`amoeba.export.check_export_target`: never the run's own folder, the model, adapters or strategy
    being read, nor a folder holding them; ``--overwrite`` replaces only an earlier export)."""
    output_dir, export_dir = args.train.output_dir, args.export.export_dir
    if export_dir is not None and not args.calibration.width_calib:  # width calibration ends the run first
        writable_dir(output_dir, "--output_dir", create=False)  # its problems first: it is named first
        check_export_target(export_dir, args.export.overwrite, protected_paths(args))
    return writable_dir(output_dir, "--output_dir")


def check_width_flags(args: Arguments, model_type: str) -> None:
    """Refuse width flags for a family whose width cannot be sliced exactly, before anything is written."""
    for flag, asked in (("--width_calib", args.calibration.width_calib),
                        ("--shrinkable_width", args.elastic.shrinkable_width)):
        if asked:
            with for_flag(flag):
                check_width_support(model_type)


def check_shapes(args: Arguments, num_layers: int) -> None:
    """Refuse depths the model cannot have before any work starts."""
    for layers in list(args.eval_layers or ()) + [d for d, _ in args.eval_shapes or ()]:
        if layers > num_layers:
            raise UsageError(f"{layers} layers asked, the model has {num_layers}", "--eval_num_layer")
    e = args.elastic
    if e.enable_shrinking and e.min_num_layer > num_layers:
        raise UsageError(f"{e.min_num_layer} exceeds the model's {num_layers} layers", "--min_num_layer")


# ----------------------------------------------------------------------------------------------
# The model the later stages share
# ----------------------------------------------------------------------------------------------
def load_elastic_strategy(args: Arguments, em: ElasticModel) -> Optional[Strategy]:
    """The strategy file (``--shrinking_file``), its widths applied to ``em``; None when the flags use none."""
    e = args.elastic
    if e.shrinking_file and (e.enable_shrinking or e.shrinkable_width):
        with for_flag("--shrinking_file"):  # a damaged file, or one made for another model or other widths
            strategy = load_strategy(e.shrinking_file)
            apply_strategy(em, strategy, args.width_choice if e.shrinkable_width else (1.0,),
                           nonuniform=e.nonuniform_width or args.calibration.prune_width_method == "flap")
        return strategy
    if e.shrinking_method == "calib_dp" and e.enable_shrinking and (args.train.do_train or wants_evaluation(args)):
        raise UsageError("--shrinking_method calib_dp needs --shrinking_file (the Stage 1 strategy)",
                         "--shrinking_file")
    return None


def adapt(args: Arguments, model, tokenizer, em: ElasticModel, strategy: Optional[Strategy],
          out: Path) -> tuple[object, Optional[Path]]:
    """The model with its adapters: trained now (``--do_train``), or those of a finished run (``--adapter_dir``,
    else ``--output_dir``'s when it holds some); and the folder they live in (None: the base model)."""
    if args.train.do_train:
        model = run_training(args, model, tokenizer, em, strategy)
        return model, find_adapters(out)
    return model, load_trained_adapters(args, model, em, args.adapters.adapter_dir or out)
