"""scripts/bench_stage2.py --compare: the rows it measures, their FLOP accounting and the --profile summary."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import load_script, ROOT


def _bench():
    return load_script(ROOT / "scripts" / "bench_stage2.py")


def test_compare_rows_flops_and_profile_on_the_tiny_case(tmp_path, caplog):
    """The peer, our full-model step and our sandwich (before/after) on one batch: the sandwich's model FLOPs are
    the sum of its subnets' (4 N_sub T each), the full-model rows count the peer's, and --profile attributes each
    step's time to operators whose shares add up to at most the whole."""
    pytest.importorskip("peft")
    bench = _bench()
    out = tmp_path / "cmp.json"
    with caplog.at_level("INFO"):
        assert bench.main(["--smoke", "--compare", "tiny", "--profile", "1", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["compare"][0]
    rows = {r["step"]: r for r in case["rows"]}
    # each row is logged as soon as it is measured (a run cut off by a time limit still tells how far it got)
    logged = [m for m in caplog.messages if "s/step over" in m]
    assert [m.rsplit(": ", 1)[0] for m in logged] == list(rows)
    assert any("warm-up step 1/" in m for m in caplog.messages)
    assert list(rows) == ["peer: peft LoRA, full model", "ours: full model (before)", "ours: full model (after)",
                          "ours: sandwich (before)", "ours: sandwich (after)"]
    peer = rows["peer: peft LoRA, full model"]
    assert rows["ours: full model (after)"]["model_flops"] == peer["model_flops"]
    sandwich = rows["ours: sandwich (after)"]
    assert sandwich["subnets"] == ["l6w1", "l5w0.75", "l4w0.875", "l3w0.625"]
    assert peer["model_flops"] < sandwich["model_flops"] < 4 * peer["model_flops"]
    for r in rows.values():
        assert r["seconds"] > 0 and r["tokens_per_second"] == pytest.approx(case["tokens"] / r["seconds"])
        p = r["profile"]
        assert p["time"] == "cpu" and p["operators_per_step"] > 100
        assert 0 < sum(t["share"] for t in p["top"]) <= 1.0 + 1e-9
        assert p["top"] == sorted(p["top"], key=lambda t: t["self_ms_per_step"], reverse=True)
    # the sandwich runs four subnets: more operators than one full-model step
    assert sandwich["profile"]["operators_per_step"] > rows["ours: full model (after)"]["profile"]["operators_per_step"]
    # each row's profile is logged as soon as it is taken (a 7B profile takes minutes)
    profiled = [m for m in caplog.messages if ": profile: " in m]
    assert [m.split(": profile: ")[0] for m in profiled] == list(rows)


def test_split_after_times_each_optimisation_alone(tmp_path, capsys):
    """--split_after adds the sandwich with the switches' settings that "before" (every position's logits, the
    plain product mix) and "after" (today's defaults: logits at the answer positions, the device's default mix) do
    not time, and every row of ours records the settings it ran with. Without --compare: exit 2."""
    pytest.importorskip("peft")
    bench = _bench()
    out = tmp_path / "split.json"
    assert bench.main(["--smoke", "--compare", "tiny", "--split_after", "--out", str(out)]) == 0
    rows = {r["step"]: r for r in json.loads(out.read_text())["compare"][0]["rows"]}
    settings = {k: (r.get("logits_at_targets"), r.get("mix")) for k, r in rows.items()}
    # on the CPU the default mix is the plain product, so "default expert mix alone" is "before" and is not timed again
    assert settings == {"peer: peft LoRA, full model": (None, None),
                        "ours: full model (before)": (False, "product"), "ours: full model (after)": (True, "product"),
                        "ours: sandwich (before)": (False, "product"), "ours: sandwich (after)": (True, "product"),
                        "ours: sandwich (element-wise mix alone)": (False, "elementwise"),
                        "ours: sandwich (answer-only logits, element-wise mix)": (True, "elementwise")}
    sandwich_flops = rows["ours: sandwich (after)"]["model_flops"]
    assert rows["ours: sandwich (element-wise mix alone)"]["model_flops"] == sandwich_flops
    assert rows["ours: sandwich (element-wise mix alone)"]["subnets"] == rows["ours: sandwich (after)"]["subnets"]
    capsys.readouterr()
    assert bench.main(["--smoke", "--split_after", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: --split_after: times rows of --compare; add --compare"


def test_compiled_rows_report_what_the_compiler_did(tmp_path):
    """--compile adds our two steps with compiled layers, and the case records what torch.compile did: graphs
    built, calls captured, and no graph break inside a decoder layer (a break would split each layer into pieces
    run eagerly in between)."""
    pytest.importorskip("peft")
    from amoeba.compiled import compiler_missing

    if compiler_missing(cuda=False) is not None:
        pytest.skip("no C++ compiler for torch.compile's CPU backend")
    bench = _bench()
    out = tmp_path / "compiled.json"
    assert bench.main(["--smoke", "--compare", "tiny", "--compile", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["compare"][0]
    rows = {r["step"]: r for r in case["rows"]}
    assert "compile_error" not in case
    assert rows["ours: sandwich (compiled)"]["subnets"] == rows["ours: sandwich (after)"]["subnets"]
    assert rows["ours: full model (compiled)"]["seconds"] > 0
    compiler = case["compiler"]
    assert compiler["frames.total"] >= 1 and compiler["stats.unique_graphs"] >= 1
    assert compiler["stats.calls_captured"] > compiler["stats.unique_graphs"]
    assert not [k for k in compiler if k.startswith("graph_break.")]


def test_compiled_only_times_the_peer_and_the_compiled_rows(tmp_path, capsys):
    """--compiled_only skips our eager rows (a short run that profiles the compiled steps): the peer and the two
    compiled rows remain, each profiled; without --compile it is a usage error (one line, exit 2)."""
    pytest.importorskip("peft")
    from amoeba.compiled import compiler_missing

    bench = _bench()
    assert bench.main(["--smoke", "--compare", "tiny", "--compiled_only", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --compiled_only: skips the eager rows of the compiled "
                                               "comparison; add --compare and --compile")
    if compiler_missing(cuda=False) is not None:
        pytest.skip("no C++ compiler for torch.compile's CPU backend")
    out = tmp_path / "compiled.json"
    assert bench.main(["--smoke", "--compare", "tiny", "--compile", "--compiled_only", "--profile", "1",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["compare"][0]["rows"]
    assert [r["step"] for r in rows] == ["peer: peft LoRA, full model", "ours: full model (compiled)",
                                         "ours: sandwich (compiled)"]
    assert all(r["profile"]["operators_per_step"] > 0 for r in rows)
    assert len(rows[2]["subnets"]) == 4 and rows[1]["subnets"] == rows[0]["subnets"]


def test_host_profile_lists_where_the_hosts_step_time_goes(tmp_path, capsys):
    """--host_profile: each of our rows gets the Python functions of its step ranked by own and by cumulative time
    under cProfile, per step; one training_step per step, one backward per subnet, and no
    function's cumulative time exceeds the profiled step's. Without --compare, or a negative count: exit 2."""
    pytest.importorskip("peft")
    bench = _bench()
    assert bench.main(["--smoke", "--host_profile", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: --host_profile: profiles the rows of --compare; add --compare"
    assert bench.main(["--smoke", "--compare", "tiny", "--host_profile", "-1", "--out", str(tmp_path / "x.json")]) == 2
    assert "--host_profile" in capsys.readouterr().err
    out = tmp_path / "host.json"
    assert bench.main(["--smoke", "--compare", "tiny", "--host_profile", "2", "--out", str(out)]) == 0
    rows = {r["step"]: r for r in json.loads(out.read_text())["compare"][0]["rows"]}
    assert "profile" not in rows["peer: peft LoRA, full model"]
    for name in ("ours: full model (after)", "ours: sandwich (after)"):
        host = rows[name]["profile"]["host"]
        assert host["steps"] == 2 and host["wall_ms_per_step"] > 0
        own = [h["own_ms_per_step"] for h in host["by_own_time"]]
        assert own == sorted(own, reverse=True) and len(own) == 25
        cumulative = {h["function"]: h for h in host["by_cumulative_time"]}
        step = next(h for f, h in cumulative.items() if f.endswith("(training_step)"))
        assert step["calls_per_step"] == 1
        assert all(h["cumulative_ms_per_step"] <= host["wall_ms_per_step"] * 1.01 for h in cumulative.values())
    # one backward per subnet (accelerate's, which the trainer calls)
    backwards = {name: next(h["calls_per_step"] for h in rows[name]["profile"]["host"]["by_cumulative_time"]
                            if h["function"].startswith("accelerator.py:") and h["function"].endswith("(backward)"))
                 for name in ("ours: full model (after)", "ours: sandwich (after)")}
    assert backwards == {"ours: full model (after)": 1, "ours: sandwich (after)": 4}
    assert "Host functions by own time under cProfile" in capsys.readouterr().out


def test_random_checkpoints_get_their_own_tokenizer(tmp_path):
    """The random 7B checkpoint needs no real model's tokenizer: a word-level one of the model's vocabulary,
    loadable by AutoTokenizer, mapping every id below the vocabulary size to one token and back."""
    from transformers import AutoTokenizer

    bench = _bench()
    bench.random_tokenizer(tmp_path, 500)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 500 and tok.pad_token_id == tok.eos_token_id == 2
    ids = [0, 1, 2, 3, 77, 499]
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_same_losses_before_and_after_the_step_optimisations(tmp_path):
    """--same_losses: the sandwich trained from one start before and after the optimisations. On the CPU (fp32)
    the losses are bitwise equal, and the trainable tensors are back at their start afterwards; the hybrid expert mix
    (CUDA's default) and the element-wise one (an opt-in) train the same curve to fp32 rounding, and the curve moves (the optimizer
    steps, so equal losses are not a frozen model's)."""
    pytest.importorskip("peft")
    from amoeba.subnet import Subnet
    from tests.conftest import tiny_model

    bench = _bench()
    flags = list(bench.SEED_LLAMA2_FLAGS)
    flags[flags.index("--min_num_layer") + 1] = "1"
    flags += ["--learning_rate", "1e-2"]
    args, model, em, trainer = bench.build(str(ROOT / "models" / "smollm2-135m-instruct"), tmp_path, flags,
                                           tiny_model("gqa", layers=6), None)
    plan = [("largest", em.full_subnet()), ("random1", Subnet(tuple(range(5)), 0.75)),
            ("smallest", Subnet(tuple(range(3)), 0.625))]
    batch = bench.synthetic_batch(2, 24, 8, int(model.config.vocab_size), "cpu")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    found = bench.step_settings(trainer, model)
    out = bench.same_losses(trainer, model, batch, plan, 6, bench.BEFORE, (True, "auto"))  # the CPU's: the product
    assert out["before"] == out["after"] and out["max_relative_difference"] == 0.0
    assert len(set(out["before"])) == 6
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    assert bench.step_settings(trainer, model) == found and trainer.state.global_step == 0
    for mix in ("hybrid", "elementwise"):  # CUDA's default and the opt-in: the same curve to fp32 rounding
        mixed = bench.same_losses(trainer, model, batch, plan, 6, bench.BEFORE, (True, mix))
        assert mixed["before"] == out["before"]
        assert 0 <= mixed["max_relative_difference"] < 1e-5


def test_real_lengths_add_the_padding_free_sandwich(tmp_path, capsys):
    """--real_lengths: the batch's rows take real examples' lengths (padding in the padded batch); the padding-free
    sandwich runs on the same examples, every row counts the real tokens; a missing dataset or tokenizer folder is
    one line naming its flag, exit 2."""
    pytest.importorskip("peft")
    bench = _bench()
    out = tmp_path / "cmp.json"
    assert bench.main(["--smoke", "--compare", "tiny", "--real_lengths", "alpaca-clean", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["compare"][0]
    rows = {r["step"]: r for r in case["rows"]}
    assert list(rows)[-1] == "ours: sandwich, padding-free (after)"
    assert rows["ours: sandwich, padding-free (after)"]["model_flops"] == rows["ours: sandwich (after)"]["model_flops"]
    assert 0 < case["tokens"] <= case["padded_positions"] and case["real_lengths"] == "alpaca-clean"
    for r in rows.values():
        assert r["tokens_per_second"] == pytest.approx(case["tokens"] / r["seconds"])
    assert bench.main(["--smoke", "--compare", "tiny", "--real_lengths", str(tmp_path / "none.jsonl"),
                       "--out", str(out)]) == 2
    capsys.readouterr()
    missing = tmp_path / "no-model"
    assert bench.main(["--smoke", "--compare", "tiny", "--real_lengths", "alpaca-clean", "--model", str(missing),
                       "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --model: no such model folder or file: {missing}"]


def test_packed_batch_gives_the_padded_batchs_loss():
    """The padding-free form of a batch (the bench and --padding_free share pack_batch) gives the padded batch's
    label loss on a model: the same targets, attention kept within each example (a filler segment included)."""
    from amoeba.instruct_data import pack_batch
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    model = tiny_model("gqa", layers=2).eval()
    model.config.use_cache = False
    ids = torch.randint(0, 100, (4, 10))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7, [1] * 2 + [0] * 8])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :1] = -100
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    packed = pack_batch(padded)
    # rows: 10; 6 + 3 + filler 1; 2 + filler 8
    assert packed["input_ids"].shape == (3, 10) and int(packed["num_tokens"]) == 21
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    feed = {k: v for k, v in packed.items() if k != "num_tokens"}
    with torch.no_grad():
        want = model(**padded).loss
        got = model(**feed).loss
        leaky = model(**{k: v for k, v in feed.items() if k != "position_ids"}).loss  # one sequence per row
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(leaky) - float(want)) > 1e-3  # the check can fail: without the masks the loss differs


def test_count_ops_lists_the_float32_products(tmp_path, capsys):
    """--count_ops: one step's operations, and the matrix products autocast leaves in float32 (the router and the
    experts' weight mix, which take CUDA-core kernels on a GPU) with their shapes; the batch's token activations are
    never among them: every product over the tokens runs in bf16."""
    pytest.importorskip("peft")
    bench = _bench()
    out = tmp_path / "ops.json"
    assert bench.main(["--smoke", "--count_ops", "--out", str(out)]) == 0
    ops = json.loads(out.read_text())["ops"]
    listed = ops["fp32_products"]
    assert 0 < ops["fp32_matrix_products"] == sum(e["calls"] for e in listed) < ops["matrix_products"]
    tokens = ops["batch_tokens"]
    for e in listed:
        assert e["operator"] in bench.MATRIX_PRODUCTS
        operands = [s for s in e["input_shapes"] if len(s) >= 2]
        assert all(math.prod(s[:-1]) != tokens for s in operands), e  # no [tokens, features] operand
    printed = capsys.readouterr().out
    assert f"({ops['fp32_matrix_products']} with a float32 input)" in printed
    assert printed.count("  float32: ") == len(listed)


def test_compile_mode_needs_the_compiled_rows_and_cuda_graphs_a_gpu(tmp_path, capsys):
    """--compile_mode reduce-overhead (CUDA graphs) without --compile, or without a CUDA GPU: one line, exit 2."""
    bench = _bench()
    out = str(tmp_path / "c.json")
    assert bench.main(["--smoke", "--compare", "tiny", "--compile_mode", "reduce-overhead", "--out", out]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --compile_mode: applies to the compiled rows; add --compare and --compile"]
    if not torch.cuda.is_available():
        assert bench.main(["--smoke", "--compare", "tiny", "--compile", "--compile_mode", "reduce-overhead",
                           "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "need a CUDA GPU" in err[0]
    assert not (tmp_path / "c.json").exists()


def test_layers_per_graph_is_a_list_of_whole_numbers_for_the_compiled_rows(tmp_path, capsys):
    """--layers_per_graph: distinct values in the order given; a non-number, a value below 1, or a value above 1
    without the compiled rows: one line naming it, exit 2, nothing written."""
    bench = _bench()
    assert bench.layers_per_graph_list("1,6,6,30") == [1, 6, 30]
    out = str(tmp_path / "c.json")
    for extra, message in ((["--compile", "--layers_per_graph", "1,x"], "'x' is not a whole number"),
                           (["--compile", "--layers_per_graph", "0"], "must be at least 1, got 0"),
                           (["--layers_per_graph", "4"], "applies to the compiled rows; add --compare and --compile")):
        assert bench.main(["--smoke", "--compare", "tiny", *extra, "--out", out]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: --layers_per_graph: {message}"]
    assert not (tmp_path / "c.json").exists()


def test_kernel_sources_name_the_launching_operator():
    """--profile_kernels: each matching device kernel is traced to the operator that launched it (the innermost
    aten:: operator above its launch, with input shapes and dtypes) and the operators above that; kernels are
    grouped by all of these, counted per profiled step, the costliest group first; others are left out."""
    from collections import namedtuple

    bench = _bench()
    Kernel = namedtuple("Kernel", "name device duration")

    class Event:
        def __init__(self, name, parent=None, kernels=(), shapes=(), dtypes=()):
            self.name, self.cpu_parent, self.kernels = name, parent, list(kernels)
            self.input_shapes, self.input_dtypes = list(shapes), list(dtypes)

    fp32 = "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_ffma"
    root = Event("autograd::engine::evaluate_function: MmBackward0")
    node = Event("MmBackward0", root)
    mm = Event("aten::mm", node, shapes=[[4096, 64], [64, 4096]], dtypes=["float", "float"])
    linear = Event("aten::linear", None)
    bf16 = Event("aten::mm", linear, shapes=[[512, 4096], [4096, 4096]], dtypes=["c10::BFloat16"] * 2)
    events = [root, node, mm, linear, bf16,
              Event("cudaLaunchKernel", mm, kernels=[Kernel(fp32, 0, 30.0)]),
              Event("cudaLaunchKernel", mm, kernels=[Kernel(fp32, 0, 50.0)]),
              Event("cudaLaunchKernel", bf16, kernels=[Kernel("nvjet_tst_bf16", 0, 900.0)]),
              Event("cudaLaunchKernel", bf16, kernels=[Kernel(fp32, 0, 10.0)])]
    found = bench.kernel_sources(events, r"f32f32|sgemm", steps=2)
    assert [(k["operator"], k["input_dtypes"], k["launches_per_step"]) for k in found] == [
        ("aten::mm", "['float', 'float']", 1.0), ("aten::mm", "['c10::BFloat16', 'c10::BFloat16']", 0.5)]
    assert found[0]["device_ms_per_step"] == pytest.approx(0.04)
    assert found[0]["called_from"] == "MmBackward0 < autograd::engine::evaluate_function: MmBackward0"
    assert found[0]["input_shapes"] == "[[4096, 64], [64, 4096]]" and found[1]["called_from"] == "aten::linear"
    assert bench.kernel_sources(events, "no such kernel", steps=1) == []


def test_profile_kernels_needs_profiled_rows_and_a_regex(tmp_path, capsys):
    """--profile_kernels without --compare and --profile, or with a pattern that does not compile: one line, exit 2,
    nothing written."""
    bench = _bench()
    out = str(tmp_path / "k.json")
    assert bench.main(["--smoke", "--compare", "tiny", "--profile_kernels", "f32", "--out", out]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --profile_kernels: looks into the profiles of --compare; add --compare and --profile"]
    assert bench.main(["--smoke", "--compare", "tiny", "--profile", "1", "--profile_kernels", "f32(", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --profile_kernels: not a regular expression")
    assert not (tmp_path / "k.json").exists()


def test_our_timed_steps_run_under_the_trainings_autocast(tmp_path):
    """Trainer.train() runs the model's forward under its mixed-precision autocast (accelerate wraps the forward);
    the benchmark calls training_step directly, so build() prepares the model the same way: with --bf16 every
    decoder layer runs under bf16 autocast, and the adapters' products over the tokens are bf16, not float32."""
    pytest.importorskip("peft")
    from tests.conftest import tiny_model

    bench = _bench()
    flags = list(bench.SEED_LLAMA2_FLAGS) + ["--bf16"]
    flags[flags.index("--min_num_layer") + 1] = "1"
    args, model, em, trainer = bench.build(str(ROOT / "models" / "smollm2-135m-instruct"), tmp_path, flags,
                                           tiny_model("gqa", layers=6), None)
    assert trainer.accelerator.mixed_precision == "bf16"
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
             for layer in em.all_layers]
    products = []  # (dtypes, shapes) of every matrix product of the step
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) in bench.MATRIX_PRODUCTS:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                products.append(({t.dtype for t in tensors}, [tuple(t.shape) for t in tensors]))
            return func(*args, **(kwargs or {}))

    batch = bench.synthetic_batch(3, 24, 7, int(model.config.vocab_size), "cpu")  # 93 tokens: no model dimension
    with Products():
        trainer.training_step(model, dict(batch))
    for h in hooks:
        h.remove()
    assert len(seen) >= 6 and all(seen)  # every layer of every subnet of the sandwich
    over_tokens = [dtypes for dtypes, shapes in products if any(93 in shape for shape in shapes)]
    assert len(over_tokens) > 50 and all(dtypes == {torch.bfloat16} for dtypes in over_tokens)
