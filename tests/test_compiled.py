"""--compile_layers (amoeba/compiled.py): the prepared projections compute the same step bitwise, the compiled
layers train like eager ones, and the flag is refused where it cannot run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from amoeba.adapters import adapted_modules, adapter_state_dict, get_router
from amoeba.compiled import RECOMPILE_LIMIT, check_compile_command, check_compile_mode, compiler_missing
from amoeba.errors import UsageError
from amoeba.stages.finetuning import prepare_trainer, run_training
from tests.test_training import SANDWICH, _setup, tiny_dir  # noqa: F401 (tiny_dir: a fixture)

MOE = ("--use_moe_lora", "--moe_num_expert", "3", "--moe_topk", "2", "--kd_weight", "0.5")


def _step(trainer, model, batch) -> tuple[float, dict]:
    trainer._micro_step = (-1, 0)  # the same router noise for each call
    loss = float(trainer.training_step(model, dict(batch)))
    grads = {k: v.grad.clone() for k, v in adapter_state_dict(model).items() if v.grad is not None}
    model.zero_grad()
    return loss, grads


def _nonzero_adapters(model) -> None:
    """Every adapter's B drawn at random (it starts at zero), so the adapters' gradients depend on every path."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, ad in adapted_modules(model):
            ad.lora_B.normal_(0, 0.05, generator=g)


def _assert_prepared_step_is_bitwise_the_same(trainer, model, em) -> None:
    """One sandwich step with the projections reading the subnet themselves, then with their operands prepared
    before each decoder forward: the same loss and adapter gradients, bitwise (adapters' B made non-zero first)."""
    _nonzero_adapters(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    plain = _step(trainer, model, batch)
    hook = em.decoder.register_forward_pre_hook(lambda module, a: em.prepare_projections())
    prepared = _step(trainer, model, batch)
    hook.remove()
    em.drop_prepared_projections()
    assert {s.width for _, s in trainer.last_plan} > {1.0}  # narrower widths were part of it
    assert plain[0] == prepared[0]
    assert plain[1].keys() == prepared[1].keys() and plain[1]
    assert all(torch.equal(plain[1][k], prepared[1][k]) for k in plain[1])


def test_prepared_projections_give_the_same_sandwich_step_bitwise(tiny_dir, tmp_path):  # noqa: F811
    """Operands handed to the projections before the decoder runs (sliced weights, mixed and cut MoE adapters,
    per-layer FLAP widths and biases): the loss and every adapter gradient of a sandwich step are bitwise those
    of the projections reading the subnet themselves (fp32)."""
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, *MOE)
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    _assert_prepared_step_is_bitwise_the_same(trainer, model, em)


def test_cuda_graph_mode_keeps_operands_at_fixed_addresses_and_the_same_step(monkeypatch, tiny_dir,  # noqa: F811
                                                                             tmp_path):
    """CUDA graphs (``--compile_mode reduce-overhead``) replay a module's tensors where they were recorded, and
    record again when one moved. In that mode every prepared operand of a projection (the router's mixed MoE
    adapters among them) sits at the same address at every training forward of a subnet, where the default mode
    makes new ones; the sandwich step is bitwise the same; undoing frees the kept storage. (The layers run eager
    here: torch.compile is replaced, CUDA graphs need a GPU.)"""
    from amoeba.compiled import compile_layers
    from amoeba.elastic import FIXED_STORAGE
    from amoeba.subnet import Subnet

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, *MOE)
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    router = get_router(model)

    def addresses() -> list:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return [t.data_ptr() if t is not None else None for i in em.subnet.layers
                for mod in em.projections(i).values() for t in mod.amoeba_prepared]

    model.train()
    for mode in ("default", "reduce-overhead"):
        undo = compile_layers(em, mode)
        assert router.fixed_addresses == (mode == "reduce-overhead")
        try:
            for subnet in (em.full_subnet(), Subnet(tuple(range(em.num_layers - 1)), 0.75)):
                with em.use(subnet):
                    runs = [addresses() for _ in range(3)]
                if mode == "default":
                    assert runs[1] != runs[2]  # the mixed adapters are new tensors at each forward
                else:
                    assert runs[0] == runs[1] == runs[2]
        finally:
            undo()
        assert not router.fixed_addresses and not router._fixed_storage
        assert not any(FIXED_STORAGE in vars(mod) for i in range(em.num_layers) for mod in em.projections(i).values())

    _nonzero_adapters(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    plain = _step(trainer, model, batch)
    undo = compile_layers(em, "reduce-overhead")
    try:
        fixed = _step(trainer, model, batch)
    finally:
        undo()
    assert {sub.width for _, sub in trainer.last_plan} > {1.0}
    assert plain[0] == fixed[0] and plain[1].keys() == fixed[1].keys() and plain[1]
    assert all(torch.equal(plain[1][k], fixed[1][k]) for k in plain[1])


@pytest.mark.skipif(compiler_missing(cuda=False) is not None, reason="no C++ compiler for torch.compile on a CPU")
def test_compiled_layers_train_like_eager_ones_and_are_undone_after(tiny_dir, tmp_path):  # noqa: F811
    """Two sandwich steps with every decoder layer compiled: the losses and adapters of eager training to 1e-5,
    within the recompile limit; after training the layers run eager again."""
    from torch._dynamo.utils import counters
    from transformers import set_seed

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile_layers",))):
        out = tmp_path / name
        set_seed(0)  # the same adapter initialisation in both runs
        args, model, tok, em, s = _setup(tiny_dir, out, *SANDWICH, *MOE, "--max_steps", "2", *extra)
        run_training(args, model, tok, em, s)
        losses = [h["loss"] for h in json.loads((out / "training_log.json").read_text()) if "loss" in h]
        runs[name] = (em, {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}, losses)
    (_, eager, eager_loss), (em, compiled, compiled_loss) = runs["eager"], runs["compiled"]
    assert len(eager_loss) == 2
    assert counters["stats"]["unique_graphs"] <= RECOMPILE_LIMIT
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run compiled
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    assert eager.keys() == compiled.keys()
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert float((flat(eager) - flat(compiled)).norm()) <= 1e-6 * float(flat(eager).norm())  # measured 2e-8
    assert all(layer._compiled_call_impl is None for layer in em.all_layers)
    assert all(mod.amoeba_prepared is None for i in range(em.num_layers) for mod in em.projections(i).values())


@pytest.mark.skipif(compiler_missing(cuda=False) is not None, reason="no C++ compiler for torch.compile on a CPU")
def test_checkpointed_layers_are_compiled_with_their_checkpoint_inside(tiny_dir, tmp_path):  # noqa: F811
    """With gradient checkpointing, each layer pass of a sandwich step is one compiled forward: the recomputation runs
    inside the compiled backward, not as a second call of the compiled layer (transformers before 5.24 checkpoints
    outside the layer's call, which ran it twice). transformers' own checkpoint is off while compiled and back after;
    the step's loss and adapter gradients are the eager checkpointed step's to fp32 rounding."""
    from torch.profiler import ProfilerActivity, profile

    from amoeba.compiled import compile_layers

    torch._dynamo.reset()
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, *MOE, "--gradient_checkpointing", "True")
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    assert all(layer.gradient_checkpointing for layer in em.all_layers)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    eager = _step(trainer, model, batch)
    undo = compile_layers(em)
    try:
        assert not any(layer.gradient_checkpointing for layer in em.all_layers)
        compiled = _step(trainer, model, batch)  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(trainer, model, batch)
    finally:
        undo()
    assert all(layer.gradient_checkpointing and layer._compiled_call_impl is None for layer in em.all_layers)
    passes = sum(sub.num_layers for _, sub in trainer.last_plan)
    forwards = sum(e.count for e in prof.key_averages() if e.key == "CompiledFunction")
    backwards = sum(e.count for e in prof.key_averages() if e.key == "CompiledFunctionBackward")
    assert passes > em.num_layers and forwards == backwards == passes
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled[1].keys() == eager[1].keys() and eager[1]
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert float((flat(eager[1]) - flat(compiled[1])).norm()) <= 1e-5 * float(flat(eager[1]).norm())


@pytest.mark.skipif(compiler_missing(cuda=False) is not None, reason="no C++ compiler for torch.compile on a CPU")
def test_compiled_training_builds_its_graphs_in_the_first_steps(tiny_dir, tmp_path):  # noqa: F811
    """What makes compiled layers pay in training: batches of varying length and random subnets (per-layer widths
    from the strategy) reuse the graphs of the first steps. Ten steps build no graph more than two do (CUDA graphs,
    recorded per concrete shape, are what does not have this; docs/BENCHMARKS.md, thirteenth measurement)."""
    from torch._dynamo.utils import counters
    from transformers import set_seed

    folder = tmp_path / "varied"
    folder.mkdir()
    for name in ("model", "dp_selection_strategy.npy"):
        (folder / name).symlink_to(tiny_dir / name)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):  # 2 to 29 words: every batch padded to another length
        words = rng.integers(0, 60, int(rng.integers(2, 30)))
        rows.append({"instruction": " ".join(f"w{w}" for w in words), "input": "", "output": f"w90 w{words[0] + 1}"})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    graphs = {}
    for steps in (2, 10):
        torch._dynamo.reset()
        counters.clear()
        set_seed(0)
        out = tmp_path / f"s{steps}"
        args, model, tok, em, s = _setup(folder, out, *SANDWICH, *MOE, "--max_steps", str(steps), "--compile_layers")
        run_training(args, model, tok, em, s)
        graphs[steps] = counters["stats"]["unique_graphs"]
    assert graphs[2] >= 1 and graphs[10] == graphs[2]  # measured: 8 and 8


def test_training_compiles_checkpointed_layers_with_the_checkpoint_inside(tiny_dir, tmp_path):  # noqa: F811
    """Stage 2 with --compile_layers and gradient checkpointing: checkpointing is switched on before the layers are
    compiled, so every layer is compiled with its checkpoint inside (transformers' own checkpoint off while
    compiled, back on after training)."""
    from amoeba.compiled import checkpointed_call

    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, *MOE, "--gradient_checkpointing", "True",
                                     "--compile_layers")
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    try:
        for layer in em.all_layers:
            assert not layer.gradient_checkpointing
            assert layer._compiled_call_impl.args == (layer,)
            assert layer._compiled_call_impl.func._torchdynamo_orig_callable is checkpointed_call
    finally:
        trainer.uncompile()
    assert all(layer.gradient_checkpointing and layer._compiled_call_impl is None for layer in em.all_layers)


def test_compile_layers_is_refused_where_it_cannot_run(monkeypatch):
    for kwargs, needle in ((dict(do_train=False), "--do_train True"), (dict(bits=8), "8-bit"),
                           (dict(device_map="auto"), "--device_map"), (dict(sharded=True), "--fsdp")):
        call = dict(do_train=True, bits=16, device_map=None, sharded=False, cuda=False)
        call.update(kwargs)
        with pytest.raises(UsageError, match=needle) as err:
            check_compile_command(True, **call)
        assert err.value.flag == "--compile_layers"
    monkeypatch.setattr("amoeba.compiled.shutil.which", lambda name: None)
    with pytest.raises(UsageError, match="no C\\+\\+ compiler"):
        check_compile_command(True, do_train=True, bits=16, device_map=None, sharded=False, cuda=False)
    check_compile_command(False, do_train=False, bits=8, device_map="auto", sharded=True, cuda=False)  # off: nothing
    if compiler_missing(cuda=False) is None:  # a 4-bit base compiles (masked widths; tested below)
        check_compile_command(True, do_train=True, bits=4, device_map=None, sharded=False, cuda=False)


def test_compile_layers_without_training_exits_2_in_one_line(tmp_path, capsys):
    from main import main

    code = main(["--model_name_or_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o"),
                 "--do_train", "False", "--compile_layers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile_layers" in err[0] and "--do_train True" in err[0]


def test_compile_mode_is_checked_and_reaches_every_layer(monkeypatch, tiny_dir, tmp_path, capsys, caplog):  # noqa: F811
    """--compile_mode: an unknown mode, CUDA graphs without a GPU and a mode without --compile_layers are refused by
    main.py in one line naming --compile_mode (exit 2); the mode reaches torch.compile for every layer, and with CUDA
    graphs each decoder forward (one subnet's) starts a new graph step, before the projections are prepared at
    fixed addresses."""
    for mode, cuda, needle in (("max-speed", True, "not one of"), ("reduce-overhead", False, "need a CUDA GPU")):
        with pytest.raises(UsageError, match=needle) as err:
            check_compile_mode(mode, cuda)
        assert err.value.flag == "--compile_mode"
    check_compile_mode("reduce-overhead", True)

    from main import main

    base = ["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path / "m"), "--do_train", "True"]
    for extra, needle in ((["--compile_layers", "--compile_mode", "reduce-overhead"], "need a CUDA GPU"),
                          (["--compile_layers", "--compile_mode", "max-speed"], "not one of"),
                          (["--compile_mode", "reduce-overhead"], "needs --compile_layers")):
        code = main(base + extra)
        err_lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err_lines) == 1 and "--compile_mode" in err_lines[0] and needle in err_lines[0]
    assert not (tmp_path / "m").exists()  # refused before anything was written

    from amoeba.compiled import compile_layers

    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, *MOE)
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    modes, events = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("step"))
    prepare = em.prepare_projections
    monkeypatch.setattr(em, "prepare_projections", lambda **kw: (events.append(("prepare", kw)), prepare(**kw))[1])
    with caplog.at_level(logging.WARNING, logger="amoeba.compiled"):
        undo = compile_layers(em, "reduce-overhead")
    # the measured cost of CUDA graphs in training is said once, in one line
    said = [r.getMessage() for r in caplog.records if "reduce-overhead" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "default mode" in said[0]
    try:
        assert modes == [{"dynamic": True, "mode": "reduce-overhead"}] * len(em.all_layers)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert events == ["step", ("prepare", {"fixed_addresses": True})] * 2
    finally:
        undo()
    modes.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amoeba.compiled"):
        compile_layers(em)()
    assert not caplog.records  # the default mode has nothing to warn of
    assert modes == [{"dynamic": True, "mode": "default"}] * len(em.all_layers)


def _4bit_setup(tiny_dir, out, *extra):
    """The tiny model on a bitsandbytes NF4 base (bitsandbytes runs it on the CPU too): masked widths, the seed's
    MoE-LoRA sandwich, gradient checkpointing."""
    from transformers import set_seed

    from amoeba.args import parse_args
    from tests.test_training import _4bit_elastic, _flags, _tokenizer

    args = parse_args(_flags(tiny_dir, out, *SANDWICH, *MOE, "--gradient_checkpointing", "True", *extra))
    model, em, s = _4bit_elastic(tiny_dir, args)
    set_seed(0)  # the same adapters in every run
    trainer, _ = prepare_trainer(args, model, _tokenizer(), em, s)
    return trainer, model, em


def test_prepared_projections_of_a_4bit_base_give_the_same_sandwich_step_bitwise(tiny_dir, tmp_path):  # noqa: F811
    """A packed 4-bit base, whose widths are 0/1 masks: the masks and the mixed adapters handed over as tensors give
    a sandwich step's loss and every adapter gradient bitwise as the projections reading the subnet themselves."""
    trainer, model, em = _4bit_setup(tiny_dir, tmp_path / "o")
    _assert_prepared_step_is_bitwise_the_same(trainer, model, em)


@pytest.mark.skipif(compiler_missing(cuda=False) is not None, reason="no C++ compiler for torch.compile on a CPU")
def test_compiled_layers_of_a_4bit_base_train_like_eager_ones(tiny_dir, tmp_path):  # noqa: F811
    """--compile_layers on a 4-bit base (masked widths, gradient checkpointing, the seed's settings): three sandwich
    steps give eager training's losses and adapters to fp32 rounding, within the recompile limit, without a graph
    break."""
    from torch._dynamo.utils import counters

    from amoeba.compiled import compile_layers

    flat = lambda d: torch.cat([d[k].detach().flatten() for k in sorted(d)])  # noqa: E731
    runs = {}
    for name in ("eager", "compiled"):
        torch._dynamo.reset()
        counters.clear()
        trainer, model, em = _4bit_setup(tiny_dir, tmp_path / name, "--max_steps", "3", "--learning_rate", "1e-2")
        start = flat(adapter_state_dict(model)).clone()
        undo = compile_layers(em) if name == "compiled" else (lambda: None)
        try:
            trainer.train()
        finally:
            undo()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = (losses, flat(adapter_state_dict(model)).clone(), start)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    (eager_loss, eager, start), (compiled_loss, compiled, _) = runs["eager"], runs["compiled"]
    assert len(eager_loss) == 3
    assert 1 <= graphs <= RECOMPILE_LIMIT and breaks == 0
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    moved = float((eager - start).norm())
    assert moved > 1e-3 * float(start.norm())  # the steps trained the adapters
    assert float((eager - compiled).norm()) <= 1e-4 * moved
    assert all(layer._compiled_call_impl is None for layer in em.all_layers)


def test_side_effects_under_checkpoint_are_allowed_while_compiled_and_restored_after(monkeypatch, caplog):
    """While layers are compiled, the compiler may keep a checkpointed layer whose forward writes Python state
    (transformers 5.25's kernels-wrapped attention); undoing puts the setting back. A torch without the setting warns
    once, naming the flag, instead of compiling nothing silently."""
    from amoeba import compiled

    config = torch._dynamo.config
    name = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    if not hasattr(config, name):
        pytest.skip("this torch has no such setting")
    before = getattr(config, name)
    restore = compiled._allow_side_effects_under_checkpoint()
    assert getattr(config, name) is True
    restore()
    assert getattr(config, name) == before
    monkeypatch.setattr(compiled, "torch", type("T", (), {"_dynamo": type("D", (), {"config": object()})}))
    with caplog.at_level("WARNING", logger="amoeba.compiled"):
        assert compiled._allow_side_effects_under_checkpoint() is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["--compile_layers"]


def test_layer_runs_split_evenly_and_never_across_attention_types():
    from amoeba.compiled import layer_runs

    assert [len(r) for r in layer_runs(30, 8)] == [8, 8, 7, 7]
    assert [len(r) for r in layer_runs(6, 1)] == [1] * 6
    assert [len(r) for r in layer_runs(5, 30)] == [5]
    types = ["sliding", "sliding", "full", "sliding", "sliding", "sliding", "full"]
    runs = layer_runs(len(types), 2, types)
    assert [list(r) for r in runs] == [[0, 1], [2], [3, 4], [5], [6]]
    assert all(len({types[i] for i in r}) == 1 for r in runs)
    assert [i for r in layer_runs(17, 4, ["full"] * 17) for i in r] == list(range(17))


def test_grouped_layers_give_the_same_sandwich_step_bitwise_and_are_undone(monkeypatch, tiny_dir,  # noqa: F811
                                                                           tmp_path):
    """--layers_per_graph: while the decoder runs, its layer list is the subnet's layers in runs of N (one call
    each), and after it the subnet's own list again; the sandwich step (checkpointed) is bitwise the eager one,
    the groups are built once per layer list and reused, and undoing drops them. A forward without gradients
    (evaluation, generation) is not grouped. (torch.compile is replaced by the function itself here: the compiled
    groups are tested below.)"""
    from amoeba.compiled import LayerGroup, compile_layers

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", *SANDWICH, *MOE, "--gradient_checkpointing", "True")
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    _nonzero_adapters(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    plain = _step(trainer, model, batch)
    seen = []
    hook = em.decoder.register_forward_pre_hook(lambda module, a: seen.append(list(module.layers)))
    undo = compile_layers(em, "default", layers_per_graph=2)  # its hook runs after the one above
    try:
        grouped = _step(trainer, model, batch)
        assert em.decoder.layers is em.all_layers and not any(layer.gradient_checkpointing for layer in em.all_layers)
        calls = []
        monkeypatch.setattr(LayerGroup, "forward", lambda self, h, *a, **k: (calls.append(len(self.members)),
                                                                               h)[1])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert calls == [2, 2, 2]  # the full model's 6 layers in three calls
        with torch.no_grad():  # not training: the layers as they are (a cache, if any, is made per layer)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
        assert calls == [2, 2, 2]
        monkeypatch.undo()
    finally:
        hook.remove()
        undo()
    plan = [sub for _, sub in trainer.last_plan]
    assert {sub.width for sub in plan} > {1.0} and any(sub.num_layers < em.num_layers for sub in plan)
    assert [len(layers) for layers in seen[:len(plan)]] == [sub.num_layers for sub in plan]
    assert plain[0] == grouped[0] and plain[1].keys() == grouped[1].keys() and plain[1]
    assert all(torch.equal(plain[1][k], grouped[1][k]) for k in plain[1])
    assert em.decoder.layers is em.all_layers
    assert all(layer.gradient_checkpointing and layer._compiled_call_impl is None for layer in em.all_layers)


def test_grouped_layers_keep_sliding_window_and_full_attention_apart(monkeypatch):
    """Gemma 2 alternates sliding-window and full-attention layers, whose masks the decoder picks by
    ``config.layer_types``: grouped, the full model and a depth subnet that breaks the alternation give the logits
    of ungrouped layers (train mode, gradients on), no group mixes two types, and the config's types are back
    after each forward."""
    from amoeba.compiled import LayerGroup, compile_layers
    from amoeba.elastic import make_elastic
    from amoeba.subnet import Subnet
    from tests.test_families import IDS, KEEP, family_model

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = family_model("gemma2").train()
    types = list(model.config.layer_types)
    assert len(set(types)) == 2
    em = make_elastic(model)
    subnets = (em.full_subnet(), Subnet(KEEP, 0.75))
    want = []
    for sub in subnets:
        with em.use(sub):
            want.append(model(IDS).logits.detach())
    seen = []
    forward = LayerGroup.forward
    index = {id(layer): i for i, layer in enumerate(em.all_layers)}  # a subnet renumbers its layers' layer_idx

    def counted(self, *args, **kwargs):
        seen.append((self.attention_type, [types[index[id(m)]] for m in self.members]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LayerGroup, "forward", counted)
    undo = compile_layers(em, layers_per_graph=2)
    try:
        for sub, logits in zip(subnets, want):
            with em.use(sub):
                assert torch.equal(model(IDS).logits.detach(), logits)
            assert model.config.layer_types == types and em.decoder.layers is em.all_layers
    finally:
        undo()
    kept = [types[i] for i in KEEP]
    # the full model: 6 alternating layers, one group each; the subnet's sliding, sliding, full, full: two groups
    assert seen == [(t, [t]) for t in types] + [(kept[0], kept[:2]), (kept[2], kept[2:])]


@pytest.mark.skipif(compiler_missing(cuda=False) is not None, reason="no C++ compiler for torch.compile on a CPU")
def test_layers_compiled_in_runs_make_one_compiled_call_per_run(tiny_dir, tmp_path):  # noqa: F811
    """--layers_per_graph 3 with checkpointing: the full model (6 layers) and a 3-layer subnet make one compiled
    forward and one compiled backward per run of 3 layers (3 of each), not one per layer; the loss and adapter
    gradients are eager's to fp32 rounding, and one graph serves every run (the subnet's too)."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    from amoeba.compiled import compile_layers
    from amoeba.subnet import Subnet

    torch._dynamo.reset()
    counters.clear()
    args, model, tok, em, s = _setup(tiny_dir, tmp_path / "o", "--gradient_checkpointing", "True")
    trainer, _ = prepare_trainer(args, model, tok, em, s)
    _nonzero_adapters(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()

    def step() -> tuple[list, dict]:
        losses = []
        for subnet in (em.full_subnet(), Subnet((0, 2, 5), 1.0)):
            with em.use(subnet):
                loss = model(**batch).loss
                loss.backward()
                losses.append(float(loss.detach()))
        grads = {k: v.grad.clone() for k, v in adapter_state_dict(model).items() if v.grad is not None}
        model.zero_grad()
        return losses, grads

    eager = step()
    undo = compile_layers(em, layers_per_graph=3)
    try:
        compiled = step()  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        undo()
    forwards = sum(e.count for e in prof.key_averages() if e.key == "CompiledFunction")
    backwards = sum(e.count for e in prof.key_averages() if e.key == "CompiledFunctionBackward")
    assert forwards == backwards == 3  # 6 + 3 layers in runs of 3
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled[1].keys() == eager[1].keys() and eager[1]
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert float((flat(eager[1]) - flat(compiled[1])).norm()) <= 1e-5 * float(flat(eager[1]).norm())
    assert em.decoder.layers is em.all_layers
    assert all(layer.gradient_checkpointing and layer._compiled_call_impl is None for layer in em.all_layers)


def test_layers_per_graph_is_checked(tiny_dir, tmp_path, capsys):  # noqa: F811
    """--layers_per_graph below 1, or above 1 without --compile_layers: one line naming it, exit 2, nothing
    written."""
    from main import main

    base = ["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path / "m"), "--do_train", "True"]
    for extra, needle in ((["--compile_layers", "--layers_per_graph", "0"], "at least 1"),
                          (["--layers_per_graph", "4"], "needs --compile_layers")):
        code = main(base + extra)
        err_lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err_lines) == 1 and "--layers_per_graph" in err_lines[0] and needle in err_lines[0]
    assert not (tmp_path / "m").exists()
