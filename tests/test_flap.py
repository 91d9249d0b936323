"""FLAP width selection: statistics, scores, selection modes, bias compensation, files."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.flap import collect_input_stats, compensation_biases, flap_scores, select_widths, unit_costs, width_dicts
from amoeba.npy import load_npy_dict
from amoeba.stages.calibration import run_width_calibration
from amoeba.strategy import Strategy, apply_strategy, load_strategy, module_name, save_strategy
from amoeba.subnet import Subnet
from tests.conftest import SHARED_DATA, tiny_model
from tests.test_strategy import masked_reference_logits

RATIOS = (1.0, 0.875, 0.75, 0.625)
MODELS = {
    "mha": dict(kind="mha"),
    "gqa": dict(kind="gqa"),
    "qwen2": dict(kind="qwen2"),
    # layers with different attention masks (full, then sliding window): each layer gets its own kwargs
    "qwen2-sliding": dict(kind="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    # sliding-window and full-attention layers alternating, norms after attention and MLP, per-head q/k norms
    "gemma2": dict(kind="gemma2"),
    "gemma3_text": dict(kind="gemma3_text"),
    "phi3": dict(kind="phi3"),  # q/k/v and gate/up packed
}


def _model(name, layers=3, **extra):
    spec = dict(MODELS[name])
    return tiny_model(spec.pop("kind"), layers=layers, **spec, **extra)


def _ids(n=5, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _full_forward_inputs(model, ids):
    """Inputs of every o_proj/down_proj from one ordinary forward pass (hooks), as float64 [tokens, features]."""
    seen: dict = {}
    hooks = []
    for i, blk in enumerate(model.model.layers):
        for key, mod in (("o", blk.self_attn.o_proj), ("d", blk.mlp.down_proj)):
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, k=(i, key): seen.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


class _CharTokenizer:
    """Enough of a tokenizer for text_data: one token per character, inside the tiny vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(ch) % 128 for ch in text]}


def _args(tmp_path, corpus, output_dir=None, **calibration):
    c = dict(calib_dataset=str(corpus), calib_seqlen=16, num_calib_sample=6, calib_batch_size=4,
             prune_width_method="flap", width_mode="global", width_align=1)
    c.update(calibration)
    train = SimpleNamespace(seed=0, output_dir=output_dir or str(tmp_path / "width_calib"))
    return SimpleNamespace(calibration=SimpleNamespace(**c), train=train, width_choice=RATIOS, data_dir=None)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "width", "layer", "head", "channel", "the", "of", "and"]
    path.write_text(" ".join(rng.choice(words, 600)), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Statistics: one layer at a time equals one full forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_layer_at_a_time_stats_equal_full_forward(name):
    model = _model(name)
    ids = _ids()
    stats = collect_input_stats(make_elastic(model), ids, batch_size=2, progress=False)
    ref = _full_forward_inputs(model, ids)
    for i, st in enumerate(stats):
        assert st.tokens == ids.numel()
        for key, mean, var in (("o", st.attn_mean, st.attn_var), ("d", st.mlp_mean, st.mlp_var)):
            x = ref[(i, key)]
            torch.testing.assert_close(mean, x.mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(var, x.var(0), rtol=1e-5, atol=1e-7)


def test_stats_leave_the_model_as_they_found_it():
    model = _model("gqa")
    model.config.use_cache = True
    model.train()
    em = make_elastic(model)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    layers = model.model.layers
    collect_input_stats(em, _ids(), batch_size=3, progress=False)
    assert model.config.use_cache is True and model.training
    assert model.model.layers is layers
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def test_scores_ignore_an_earlier_reordering():
    """Scores and masks are over the original units even when the model was reordered before."""
    model = _model("gqa")
    fresh = flap_scores(copy.deepcopy(model), _ids(), batch_size=2, progress=False)
    em = make_elastic(model)
    torch.manual_seed(0)
    em.reorder([torch.randperm(em.num_kv_groups) for _ in range(3)],
               [torch.randperm(em.intermediate_size) for _ in range(3)])
    moved = flap_scores(model, _ids(), batch_size=2, progress=False)
    torch.testing.assert_close(moved.group_score, fresh.group_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moved.channel_score, fresh.channel_score, rtol=1e-5, atol=1e-6)
    for a, b in zip(moved.stats, fresh.stats):
        torch.testing.assert_close(a.attn_mean, b.attn_mean, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Scores and selection
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mha", "gqa", "gemma3_text"])
def test_attention_is_scored_by_whole_kv_groups(name):
    model = _model(name)
    s = flap_scores(model, _ids(), batch_size=5, progress=False)
    em = make_elastic(model)
    assert s.group_score.shape == (3, em.num_kv_groups)
    block = em.queries_per_group * em.head_dim
    for i in range(3):
        raw = s.attn_feature_score[i]
        z = (raw - raw.mean()) / raw.std()
        torch.testing.assert_close(s.group_score[i], z.reshape(-1, block).mean(1))
        # the same ranking as the summed WIFV of the group's query-head columns
        assert torch.equal(torch.argsort(s.group_score[i]), torch.argsort(raw.reshape(-1, block).sum(1)))
        # attention: the square of WIFV = input variance x squared weight-column norm (as FLAP)
        w = em.projections(i)["o_proj"].weight.detach().double()
        torch.testing.assert_close(raw, (s.stats[i].attn_var * w.square().sum(0)).square())
        w_d = em.projections(i)["down_proj"].weight.detach().double()
        torch.testing.assert_close(s.mlp_feature_score[i], s.stats[i].mlp_var * w_d.square().sum(0))
    sel = select_widths(s.group_score, s.channel_score, RATIOS, "uniform", *unit_costs(em))
    masks, _ = width_dicts(em, sel, compensation_biases(em, s.stats, sel))
    for r in RATIOS:
        for i in range(3):
            k = masks[module_name(i, "k_proj")][r].reshape(em.num_kv_groups, em.head_dim)
            q = masks[module_name(i, "q_proj")][r].reshape(em.num_kv_groups, block)
            assert (k == k[:, :1]).all() and (q == k[:, :1]).all()


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_kept_sets_are_nested_across_ratios(mode):
    model = _model("gqa", layers=4)
    s = flap_scores(model, _ids(), batch_size=5, progress=False)
    em = make_elastic(model)
    ratios = (1.0, 0.9, 0.875, 0.75, 0.625, 0.5, 0.3)
    sel = select_widths(s.group_score, s.channel_score, ratios, mode, *unit_costs(em))
    for wide, narrow in zip(ratios, ratios[1:]):
        assert not (sel.groups[narrow] & ~sel.groups[wide]).any()
        assert not (sel.channels[narrow] & ~sel.channels[wide]).any()
    assert sel.groups[1.0].all() and sel.channels[1.0].all()
    assert (sel.groups[0.3].sum(1) >= 1).all() and (sel.channels[0.3].sum(1) >= 1).all()


def test_uniform_mode_keeps_exact_counts():
    model = _model("gqa", layers=3)
    s = flap_scores(model, _ids(), batch_size=5, progress=False)
    em = make_elastic(model)
    sel = select_widths(s.group_score, s.channel_score, RATIOS + (0.1,), "uniform", *unit_costs(em))
    for r in RATIOS + (0.1,):
        assert (sel.groups[r].sum(1) == max(1, int(r * em.num_kv_groups + 0.5))).all()  # as elastic.py rounds
        assert (sel.channels[r].sum(1) == max(1, int(r * em.intermediate_size + 0.5))).all()
        for i in range(3):  # the top-scored units of each layer
            kc = int(sel.channels[r][i].sum())
            top = torch.argsort(s.channel_score[i], descending=True, stable=True)[:kc].numpy()
            assert sel.channels[r][i][top].all()


def test_global_mode_keeps_the_asked_parameter_fraction():
    model = tiny_model("gqa", layers=4, num_attention_heads=16, num_key_value_heads=8, intermediate_size=256)
    s = flap_scores(model, _ids(), batch_size=5, progress=False)
    em = make_elastic(model)
    g_cost, c_cost = unit_costs(em)
    assert g_cost == 64 * em.head_dim * (2 * em.queries_per_group + 2) and c_cost == 3 * 64
    sel = select_widths(s.group_score, s.channel_score, RATIOS + (0.5,), "global", g_cost, c_cost)
    masks, _ = width_dicts(em, sel, compensation_biases(em, None, sel, enabled=False))
    total = 4 * (em.num_heads * em.head_dim * 64 * 2 + em.num_kv_groups * em.head_dim * 64 * 2
                 + em.intermediate_size * 64 * 3)
    for r in RATIOS + (0.5,):
        kept = sum(masks[module_name(i, "q_proj")][r].sum() * 64 * 2 + masks[module_name(i, "k_proj")][r].sum() * 64 * 2
                   + masks[module_name(i, "gate_proj")][r].sum() * 64 * 3 for i in range(4))
        assert kept / total == pytest.approx(sel.kept_fraction[r])
        assert abs(kept / total - r) <= g_cost / total + 1e-9


def _original_flap_masks(model, ids, remaining):
    """FLAP's AL-AM selection as the AmoebaLLM paper's code computes it, written here from its math for an
    MHA Llama (heads of ``head_dim`` features instead of its hard-coded 128): per layer, the o_proj metric
    is (fluctuation x squared column norm) ** 2, the down_proj metric is unsquared; both are standardised
    per layer (torch.std), a head scores the mean of its features; all units are sorted together, heads
    weighing 4 * head_dim / 3 channels (its 512 / 3), the threshold is the unit whose cumulative weight is
    closest to ``remaining`` of the total, and the units scored strictly above it are kept. The fluctuation
    is the exact variance over all tokens (see the module docstring)."""
    inputs = _full_forward_inputs(model, ids)
    layers = len(model.model.layers)
    hd = model.config.hidden_size // model.config.num_attention_heads
    attn, mlp = [], []
    for i in range(layers):
        blk = model.model.layers[i]
        var_o = inputs[(i, "o")].var(0)
        var_d = inputs[(i, "d")].var(0)
        attn.append((var_o * blk.self_attn.o_proj.weight.detach().double().pow(2).sum(0)) ** 2)
        mlp.append(var_d * blk.mlp.down_proj.weight.detach().double().pow(2).sum(0))

    def standardise(x):
        return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)

    attn_metric = standardise(torch.stack(attn)).reshape(layers, -1, hd).mean(dim=2)
    mlp_metric = standardise(torch.stack(mlp))
    metric = torch.cat([attn_metric.reshape(-1), mlp_metric.reshape(-1)])
    ranked, index = torch.sort(metric, descending=True)
    weight = torch.ones_like(ranked)
    weight[index < attn_metric.numel()] = 4 * hd / 3
    out = {}
    for r in remaining:
        threshold = ranked[torch.argmin(torch.abs(torch.cumsum(weight, 0) - weight.sum() * r))]
        out[r] = ((attn_metric > threshold).numpy(), (mlp_metric > threshold).numpy())
    return out


def test_global_selection_equals_the_original_flap_scoring_and_threshold():
    """Heads and channels kept at 1/2, 5/8 and 3/4 on a tiny MHA Llama are exactly the original's."""
    model = tiny_model("mha", layers=4, num_attention_heads=8, intermediate_size=96, seed=3)
    ids = _ids(n=6, seqlen=24, seed=2)
    ratios = (0.5, 0.625, 0.75)
    reference = _original_flap_masks(copy.deepcopy(model), ids, ratios)
    s = flap_scores(model, ids, batch_size=4, progress=False)
    em = make_elastic(model)
    sel = select_widths(s.group_score, s.channel_score, ratios, "global", *unit_costs(em))
    for r in ratios:
        heads, channels = reference[r]
        assert heads.any(1).all() and channels.any(1).all()  # no layer emptied: the floor of one unit is idle
        np.testing.assert_array_equal(sel.groups[r], heads, err_msg=f"heads at {r}")
        np.testing.assert_array_equal(sel.channels[r], channels, err_msg=f"channels at {r}")
        assert not heads.all() and not channels.all()


def test_attention_is_ranked_by_the_squared_metric_in_uniform_mode_too():
    """Squaring before standardisation changes which head wins when a head's features disagree."""
    model = tiny_model("mha", layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48, seed=5)
    em = make_elastic(model)
    ids = _ids(n=4, seqlen=16, seed=4)
    s = flap_scores(model, ids, batch_size=4, progress=False)
    hd = em.head_dim
    for i in range(2):
        w = em.projections(i)["o_proj"].weight.detach().double().square().sum(0)
        z = s.stats[i].attn_var * w
        squared = ((z.square() - z.square().mean()) / z.square().std()).reshape(-1, hd).mean(1)
        torch.testing.assert_close(s.group_score[i], squared)
    sel = select_widths(s.group_score, s.channel_score, (0.5,), "uniform", *unit_costs(em))
    for i in range(2):
        top = torch.argsort(s.group_score[i], descending=True, stable=True)[:2].numpy()
        assert sel.groups[0.5][i][top].all() and sel.groups[0.5][i].sum() == 2


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_channel_alignment_rounds_each_layer_and_keeps_the_best_channels(mode):
    model = tiny_model("gqa", layers=4, intermediate_size=100)
    s = flap_scores(model, _ids(), batch_size=5, progress=False)
    em = make_elastic(model)
    ratios = (1.0, 0.875, 0.75, 0.625, 0.3)
    plain = select_widths(s.group_score, s.channel_score, ratios, mode, *unit_costs(em))
    aligned = select_widths(s.group_score, s.channel_score, ratios, mode, *unit_costs(em), align=8)
    for r in ratios:
        np.testing.assert_array_equal(aligned.groups[r], plain.groups[r])  # heads untouched
        for i in range(4):
            k, k8 = int(plain.channels[r][i].sum()), int(aligned.channels[r][i].sum())
            if r == 1.0:
                assert k8 == 100
                continue
            assert k8 % 8 == 0 and abs(k8 - k) <= 4 and k8 >= 8
            top = torch.argsort(s.channel_score[i], descending=True, stable=True)[:k8].numpy()
            assert aligned.channels[r][i][top].all()
    for wide, narrow in zip(ratios, ratios[1:]):
        assert not (aligned.channels[narrow] & ~aligned.channels[wide]).any()


# ----------------------------------------------------------------------------------------------
# Bias compensation and the files
# ----------------------------------------------------------------------------------------------
def test_bias_equals_mean_input_of_removed_features_times_their_columns():
    model = _model("qwen2")
    ids = _ids()
    s = flap_scores(model, ids, batch_size=2, progress=False)
    em = make_elastic(model)
    sel = select_widths(s.group_score, s.channel_score, RATIOS, "global", *unit_costs(em))
    biases = compensation_biases(em, s.stats, sel)
    ref = _full_forward_inputs(model, ids)
    block = em.queries_per_group * em.head_dim
    for r in RATIOS:
        for i in range(3):
            removed_q = ~np.repeat(sel.groups[r][i], block)
            removed_c = ~sel.channels[r][i]
            w_o = em.projections(i)["o_proj"].weight.detach().double().numpy()
            w_d = em.projections(i)["down_proj"].weight.detach().double().numpy()
            mean_o, mean_d = ref[(i, "o")].mean(0).numpy(), ref[(i, "d")].mean(0).numpy()
            hand_o, hand_d = np.zeros(64), np.zeros(64)
            for f in np.flatnonzero(removed_q):
                hand_o += w_o[:, f] * mean_o[f]
            for f in np.flatnonzero(removed_c):
                hand_d += w_d[:, f] * mean_d[f]
            np.testing.assert_allclose(biases[r][i][0], hand_o, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(biases[r][i][1], hand_d, rtol=1e-4, atol=1e-6)
            if r == 1.0:
                assert not biases[r][i][0].any() and not biases[r][i][1].any()


@pytest.mark.parametrize("name", ["gqa", "qwen2", "gemma2", "gemma3_text", "phi3"])
def test_width_calibration_end_to_end(name, corpus, tmp_path, tokens):
    """--width_calib files -> merge -> load -> elastic model at each width == masked copy plus biases."""
    model = _model(name)
    ref_model = copy.deepcopy(model)
    args = _args(tmp_path, corpus)
    summary = run_width_calibration(args, model, _CharTokenizer())
    out = tmp_path / "width_calib"
    masks, bias = load_npy_dict(out / "width_mask.npy"), load_npy_dict(out / "width_bias.npy")
    assert set(masks) == {module_name(i, r) for i in range(3) for r in
                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert masks[module_name(0, "o_proj")] is None and bias[module_name(0, "q_proj")] is None
    assert sorted(masks[module_name(2, "up_proj")]) == sorted(RATIOS)
    info = json.loads((out / "width_summary.json").read_text())
    assert info["info"]["head_dim"] == 8 and info["bias"] is True and summary["num_tokens"] == 6 * 16
    assert "| layer |" in (out / "width_summary.md").read_text()

    depth = {"strategy": {1: np.array([1.0, 0.0, 1.0])}, "metric": {1: 1.0}}
    np.save(tmp_path / "final_strategy.npy", depth)
    from tests.test_strategy import _merge_module

    assert _merge_module().main(["--depth", str(tmp_path / "final_strategy.npy"), "--width_mask",
                                 str(out / "width_mask.npy"), "--width_bias", str(out / "width_bias.npy"),
                                 "--out", str(tmp_path / "dp.npy")]) == 0
    strategy = load_strategy(tmp_path / "dp.npy")
    assert strategy.info["head_dim"] == 8 and "kv_groups" in (tmp_path / "dp.json").read_text()
    fresh = copy.deepcopy(ref_model)
    em = make_elastic(fresh)
    apply_strategy(em, strategy, RATIOS)
    for r in RATIOS[1:]:
        with em.use(Subnet((0, 1, 2), r)):
            with torch.no_grad():
                got = fresh(tokens).logits
        torch.testing.assert_close(got, masked_reference_logits(ref_model, strategy, r, tokens), atol=1e-5, rtol=1e-4)


def test_without_bias_and_magnitude_baselines(corpus, tmp_path):
    model = _model("gqa")
    run_width_calibration(_args(tmp_path, corpus), model, _CharTokenizer(), bias=False)
    bias = load_npy_dict(tmp_path / "width_calib" / "width_bias.npy")
    assert all(not v.any() for d in bias.values() if d for v in d.values())

    args = _args(tmp_path, tmp_path / "no-such-corpus.txt", prune_width_method="magnitude", width_mode="uniform",
                 output_dir=str(tmp_path / "mag"))
    summary = run_width_calibration(args, model, _CharTokenizer())  # no calibration text needed
    assert summary["calibration"].startswith("none") and summary["bias"] is False
    s = flap_scores(model, None, method="magnitude")
    em = make_elastic(model)
    w = em.projections(1)["down_proj"].weight.detach().double()
    torch.testing.assert_close(s.mlp_feature_score[1], w.norm(dim=0))
    masks = load_npy_dict(tmp_path / "mag" / "width_mask.npy")
    kept = masks[module_name(1, "gate_proj")][0.75] > 0
    top = torch.argsort(w.norm(dim=0), descending=True, stable=True)[: int(kept.sum())].numpy()
    assert kept[top].all()


def test_bad_calibration_dataset(tmp_path):
    model = _model("gqa")
    with pytest.raises(UsageError, match="mmlu is for the layer DP"):
        run_width_calibration(_args(tmp_path, "mmlu"), model, _CharTokenizer())
    with pytest.raises(UsageError, match="known"):
        run_width_calibration(_args(tmp_path, "bookcorpus"), model, _CharTokenizer())
    assert not (tmp_path / "width_calib" / "width_mask.npy").exists()


# ----------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_flap_on_smollm2(real_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    corpus = SHARED_DATA / "calib" / "c4_demo.jsonl"
    if not corpus.is_file():
        pytest.skip("no shared C4 sample")
    args = _args(tmp_path, corpus, calib_seqlen=64, num_calib_sample=4)
    summary = run_width_calibration(args, model, tok)
    assert summary["info"]["num_kv_groups"] == 3 and summary["info"]["head_dim"] == 64
    for r in RATIOS:
        assert summary["widths"][f"{r:g}"]["kept_param_fraction"] == pytest.approx(r, abs=0.01)
    masks = load_npy_dict(tmp_path / "width_calib" / "width_mask.npy")
    assert masks[module_name(29, "q_proj")][0.75].shape == (576,)
    em = make_elastic(model)
    strategy = Strategy({0: np.ones(30, np.float32)}, width_mask=masks,
                        bias=load_npy_dict(tmp_path / "width_calib" / "width_bias.npy"))
    save_strategy(strategy, tmp_path / "s.npy")
    apply_strategy(em, load_strategy(tmp_path / "s.npy"), RATIOS)
    assert set(em.width_plans) == {0.875, 0.75, 0.625}
