"""``--device_map``: loading through accelerate's device hooks gives the same numbers as a plain load.

On a machine without GPUs the map puts every module on ``cpu``, named one by one (one decoder layer down to
its projections), which runs the code path of a model spread over GPUs: accelerate hooks on every mapped
module, the elastic model's class-swapped projections behind them. The elastic subnets, MMLU and
WikiText-2 scoring, FLAP statistics, the layer DP with its cached hidden states and lm-eval all agree with
the plain load; combinations that cannot work exit with one error line (code 2).
"""

from __future__ import annotations

import json

import pytest
import torch

from amoeba.args import parse_args
from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.loading import load_model_and_tokenizer
from amoeba.pipeline import load_settings
from amoeba.strategy import apply_strategy, load_strategy
from amoeba.subnet import Subnet
from tests.test_training import _assert_exit_2, _main, tiny_dir  # noqa: F401  (shared fixture)

torch.set_num_threads(1)

LAYERS = 6
SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _map_file(tmp_path, device="cpu") -> str:
    """Every module on ``device``, layer 0 named down to its projections (each gets its own hook)."""
    dm = {"model.embed_tokens": device, "model.rotary_emb": device, "model.norm": device, "lm_head": device}
    dm.update({f"model.layers.0.{m}": device for m in SPLIT})
    dm.update({f"model.layers.{i}": device for i in range(1, LAYERS)})
    path = tmp_path / "device_map.json"
    path.write_text(json.dumps(dm))
    return str(path)


def _load(tiny_dir, out, *extra):
    args = parse_args(["--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(out),
                       "--do_train", "False", "--report_to", "none", *extra])
    model, tok = load_model_and_tokenizer(load_settings(args))
    em = make_elastic(model)
    apply_strategy(em, load_strategy(tiny_dir / "dp_selection_strategy.npy"), (1.0, 0.875, 0.75, 0.625),
                   nonuniform=True)
    return model, tok, em


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    """(plain load, load through --device_map with a per-module all-cpu map)."""
    tmp = tmp_path_factory.mktemp("device_map")
    return _load(tiny_dir, tmp / "plain"), _load(tiny_dir, tmp / "mapped", "--device_map", _map_file(tmp))


SUBNETS = [Subnet(tuple(range(LAYERS)), 1.0), Subnet((0, 1, 3, 5), 0.75), Subnet((0, 2, 5), 0.625)]


def test_hooks_sit_on_every_mapped_module_and_subnets_equal_the_plain_load(pair):
    (plain, _, em_p), (mapped, _, em_m) = pair
    assert hasattr(mapped.model.layers[1], "_hf_hook") and hasattr(mapped.model.layers[0].self_attn.q_proj,
                                                                   "_hf_hook")
    assert not hasattr(plain.model.layers[1], "_hf_hook")
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(3))
    outs = []
    for sub in SUBNETS:
        with em_p.use(sub), torch.no_grad():
            a = plain(input_ids=ids).logits
        with em_m.use(sub), torch.no_grad():
            b = mapped(input_ids=ids).logits
        assert torch.equal(a, b), sub
        outs.append(b)
    # the narrow subnets really ran narrow behind the hooks (layer 0's projections are hooked one by one)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    with em_m.use(Subnet((0,), 0.625)), torch.no_grad():
        narrow = mapped.model.layers[0].self_attn.q_proj(torch.ones(1, 64))
    assert narrow.shape[-1] < 64  # the elastic forward runs behind the projection's own hook


def test_mmlu_wikitext_flap_and_layer_dp_equal_the_plain_load(pair):
    from amoeba.depth_dp import LayerDropScorer, PerplexityMetric, select_layers_dp, text_batches
    from amoeba.evaluation import evaluate_shape
    from amoeba.flap import flap_scores
    from amoeba.mmlu import load_mmlu
    from amoeba.text_data import resolve_data_dir

    examples = load_mmlu("eval", 0, resolve_data_dir(), 5)
    windows = torch.randint(0, 120, (3, 32), generator=torch.Generator().manual_seed(4))
    got = []
    for model, tok, em in pair:
        res = evaluate_shape(model, tok, em, SUBNETS[1], mmlu_examples=examples, wikitext_windows=windows,
                             batch_size=2, progress=False)
        flap = flap_scores(model, windows, batch_size=2, progress=False)
        scorer = LayerDropScorer(model, text_batches(windows, 2), PerplexityMetric(model.lm_head), progress=False)
        dp = select_layers_dp(LAYERS, 2, 1, scorer, higher_is_better=False, progress=False)
        got.append((res.metrics, flap.group_score, flap.channel_score, dp.strategy, dp.metric))
    (m1, g1, c1, s1, d1), (m2, g2, c2, s2, d2) = got
    assert m1 == m2 and "wikitext2_ppl" in m1 and "mmlu_eval_accuracy" in m1
    assert torch.equal(g1, g2) and torch.equal(c1, c2)
    assert (s1 == s2).all()
    assert torch.equal(torch.as_tensor(d1), torch.as_tensor(d2))


def test_lm_eval_equals_the_plain_load(pair):
    from amoeba.lm_eval_runner import LMEvalRunner
    from amoeba.text_data import resolve_data_dir

    flat = []
    for model, tok, em in pair:
        runner = LMEvalRunner(model, tok, ["piqa"], str(resolve_data_dir()), batch_size=2, limit=2)
        try:
            with em.use(SUBNETS[2]):
                flat.append(runner.run()[0])
        finally:
            runner.close()
    assert flat[0] == flat[1] and "piqa_acc" in flat[0]


def test_main_evaluation_with_a_device_map_writes_the_plain_metrics(tiny_dir, tmp_path):
    """main.py evaluating two shapes (MMLU, WikiText-2) with --device_map equals the plain run exactly."""
    flags = ["--model_name_or_path", str(tiny_dir / "model"), "--do_train", "False", "--report_to", "none",
             "--enable_shrinking", "--min_num_layer", "3", "--shrinking_method", "calib_dp", "--shrinking_file",
             str(tiny_dir / "dp_selection_strategy.npy"), "--shrinkable_width", "--eval_shapes", "6x1,4x3/4",
             "--do_mmlu_eval", "True", "--mmlu_dataset", "mmlu-zs", "--max_mmlu_samples", "4",
             "--do_eval_wikitext2", "True", "--max_wikitext2_windows", "2", "--per_device_eval_batch_size", "2"]
    for name, extra in (("plain", []), ("mapped", ["--device_map", _map_file(tmp_path)])):
        run = _main(*flags, "--output_dir", str(tmp_path / name), *extra)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("plain", "mapped"))
    assert a == b and "wikitext2_ppl_l4w0.75" in a


def test_bad_device_maps_exit_2_with_one_line(tiny_dir, tmp_path, monkeypatch):
    base = ["--model_name_or_path", str(tiny_dir / "model"), "--output_dir", str(tmp_path / "o"),
            "--do_mmlu_eval", "True", "--max_mmlu_samples", "2"]
    good = _map_file(tmp_path)
    _assert_exit_2(_main(*base, "--do_train", "False", "--device_map", "everywhere"), "--device_map",
                   "neither one of auto")
    _assert_exit_2(_main(*base, "--device_map", good), "--device_map", "--do_train False")
    (tmp_path / "disk.json").write_text(json.dumps({"": "disk"}))
    _assert_exit_2(_main(*base, "--do_train", "False", "--device_map", str(tmp_path / "disk.json")),
                   "--device_map", "disk offloading is not supported")
    (tmp_path / "gpu.json").write_text(json.dumps({"": 0}))
    if not torch.cuda.is_available():
        _assert_exit_2(_main(*base, "--do_train", "False", "--device_map", str(tmp_path / "gpu.json")),
                       "--device_map", "names GPU 0")
    (tmp_path / "bad.json").write_text("[1, 2]")
    _assert_exit_2(_main(*base, "--do_train", "False", "--device_map", str(tmp_path / "bad.json")),
                   "--device_map", "JSON object")
    _assert_exit_2(_main(*base, "--do_train", "False", "--bits", "4", "--device_map", good), "--device_map",
                   "4-bit")
    from amoeba.loading import resolve_device_map

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    with pytest.raises(UsageError, match="--device_map: .*torchrun"):
        resolve_device_map("auto")
