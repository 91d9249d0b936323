"""Model families beyond Llama: Gemma, Gemma 2, Gemma 3 (text) and OLMo-2, on tiny random configs built here.

For each family the elastic model must compute what the unmodified model computes (full shape), what a
copy with the skipped layers deleted computes (depth; Gemma 2/3 interleave sliding-window and full-attention
layers, so the KV cache must follow the kept layers' types during generation), and what a hand-sliced copy
computes (width, by prefix slices of reordered weights). OLMo-2 normalises q and k over the whole projection,
so a narrower head count changes that norm: width is refused there, depth works.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.families import FAMILIES, family_of
from amoeba.subnet import Subnet
from tests.conftest import tiny_config, tiny_model

IDS = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(4))
PROMPT = IDS[:1, :10]
NEW = 8  # prompt + new tokens run past the sliding window (4): a misaligned cache changes the tokens
KEEP = (0, 2, 3, 5)  # of 6 layers: sliding, sliding, full, full (the alternation broken on purpose)


def family_config(kind: str, layers: int = 6, **overrides):
    """A tiny random config of one family (see ``tests.conftest.tiny_config``), 6 layers by default."""
    return tiny_config(kind, layers, **overrides)


def family_model(kind: str, seed: int = 0, **overrides):
    """A tiny random model of ``kind`` in eval mode, fp32, with non-trivial norms."""
    return tiny_model(kind, 6, seed=seed, **overrides)


def _deleted_copy(model, keep):
    """The unmodified model with every layer outside ``keep`` deleted (and renumbered, as a shallower model)."""
    d = copy.deepcopy(model)
    d.model.layers = nn.ModuleList([d.model.layers[i] for i in keep])
    for pos, layer in enumerate(d.model.layers):
        layer.self_attn.layer_idx = pos
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = pos
    if getattr(d.config, "layer_types", None):
        d.config.layer_types = [model.config.layer_types[i] for i in keep]
    d.config.num_hidden_layers = len(keep)
    return d


def _generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)[0].tolist()


WIDTH_FAMILIES = ["gemma", "gemma2", "gemma3_text", "phi3"]
ALL = WIDTH_FAMILIES + ["olmo2"]


@pytest.mark.parametrize("kind", ALL)
def test_full_shape_equals_the_unmodified_model(kind):
    model = family_model(kind)
    ref = copy.deepcopy(model)
    make_elastic(model)
    with torch.no_grad():
        assert (model(IDS).logits - ref(IDS).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ALL)
def test_skipping_layers_equals_deleting_them_with_both_caches(kind):
    model = family_model(kind)
    deleted = _deleted_copy(model, KEEP)
    em = make_elastic(model)
    with em.use(Subnet(KEEP, 1.0)):
        with torch.no_grad():
            err = (model(IDS).logits - deleted(IDS).logits).abs().max().item()
        dynamic, static = _generate(model), _generate(model, cache_implementation="static")
    assert err < 1e-5
    assert dynamic == static == _generate(deleted)
    # the full model afterwards is untouched (layer list, layer types, cache slots)
    assert len(model.model.layers) == 6
    if getattr(model.config, "layer_types", None):
        assert model.config.layer_types == family_config(kind).layer_types
    assert _generate(model) == _generate(family_model(kind))


def _hand_sliced(model, kind, groups: int, channels: int):
    """A fresh model of the narrower config holding prefix slices of ``model``'s (reordered) weights."""
    from transformers import AutoModelForCausalLM

    cfg = family_config(kind)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    narrow = family_config(kind, num_attention_heads=groups * rep, num_key_value_heads=groups,
                           intermediate_size=channels, head_dim=hd)  # explicit: fewer heads, same head size
    small = AutoModelForCausalLM.from_config(narrow, dtype=torch.float32).eval()
    q, kv = groups * rep * hd, groups * hd
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": channels, "up_proj": channels}
    cols = {"o_proj": q, "down_proj": channels}
    full = {"q_proj": cfg.num_attention_heads * hd, "k_proj": cfg.num_key_value_heads * hd,
            "v_proj": cfg.num_key_value_heads * hd, "gate_proj": cfg.intermediate_size,
            "up_proj": cfg.intermediate_size}
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    state = {}
    for name, tensor in model.state_dict().items():
        role = name.split(".")[-2]
        if role in packed:  # Phi-3: each part of the packed rows keeps its own prefix
            parts, start = [], 0
            for part in packed[role]:
                parts.append(tensor[start:start + rows[part]])
                start += full[part]
            tensor = torch.cat(parts)
        elif name.endswith(".weight") and role in rows:
            tensor = tensor[: rows[role]]
        elif name.endswith(".bias") and role in rows:
            tensor = tensor[: rows[role]]
        elif name.endswith(".weight") and role in cols:
            tensor = tensor[:, : cols[role]]
        state[name] = tensor.clone()
    small.load_state_dict(state)
    return small


def _reordered_with_a_slice(kind: str, seed: int, ratio: float, groups: int, channels: int):
    """(elastic model with random unit orders and a width plan ``ratio`` of these sizes, hand-sliced copy)."""
    model = family_model(kind)
    em = make_elastic(model)
    g = torch.Generator().manual_seed(seed)
    em.reorder([torch.randperm(em.num_kv_groups, generator=g) for _ in range(em.num_layers)],
               [torch.randperm(em.intermediate_size, generator=g) for _ in range(em.num_layers)])
    em.add_width_plan(ratio, [groups] * em.num_layers, [channels] * em.num_layers)
    return model, em, _hand_sliced(model, kind, groups=groups, channels=channels)


@pytest.mark.parametrize("kind", WIDTH_FAMILIES)
def test_a_width_equals_a_hand_sliced_copy(kind):
    model, em, small = _reordered_with_a_slice(kind, 1, 0.5, groups=2, channels=40)
    with em.use(Subnet(tuple(range(6)), 0.5)), torch.no_grad():
        err = (model(IDS).logits - small(IDS).logits).abs().max().item()
    assert err < 1e-5


def test_olmo2_refuses_width_in_one_line_and_keeps_depth():
    model = family_model("olmo2")
    em = make_elastic(model)
    assert not em.width_supported
    with pytest.raises(UsageError) as err:
        em.set_subnet(Subnet(tuple(range(6)), 0.5))
    assert "olmo2" in str(err.value) and "depth" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError):
        em.add_width_plan(0.5, [2] * 6, [40] * 6)
    em.set_subnet(Subnet(KEEP, 1.0))  # depth is fine


def test_the_family_table_names_every_supported_family():
    from amoeba.families import SUPPORTED_MODEL_TYPES

    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)
    assert family_of("gemma3_text").name.startswith("Gemma 3")
    assert not FAMILIES["olmo2"].width and "olmo2" in SUPPORTED_MODEL_TYPES
    assert "phi3" in SUPPORTED_MODEL_TYPES and FAMILIES["phi3"].packed


def test_an_unsupported_family_gets_one_line_listing_the_supported_ones():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UsageError) as err:
        make_elastic(model)
    msg = str(err.value)
    assert "gpt_neox" in msg and "gemma3_text" in msg and "olmo2" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "olmo2", "phi3"])
def test_the_layer_dp_runs_and_its_cached_scores_equal_the_naive_ones(kind, tmp_path):
    from amoeba.stages.calibration import run_layer_calibration
    from tests.test_depth_dp import CharTokenizer, _args

    model = family_model(kind)
    flags = ("--min_num_layer", "3", "--dp_keep_last_layer", "1")
    cached = run_layer_calibration(_args(tmp_path, *flags), model, CharTokenizer(), progress=False)
    naive = run_layer_calibration(_args(tmp_path, *flags, "--output_dir", str(tmp_path / "naive")), model,
                                  CharTokenizer(), naive=True, progress=False)
    for removed in (1, 2, 3):
        assert cached.final["strategy"][removed].sum() == 6 - removed
        np.testing.assert_array_equal(naive.final["strategy"][removed], cached.final["strategy"][removed])
        assert naive.final["metric"][removed] == pytest.approx(cached.final["metric"][removed], rel=1e-5)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "olmo2", "phi3"])
def test_moe_lora_one_for_all_training_lowers_the_loss(kind, tmp_path):
    """A short sandwich run with MoE-LoRA (widths too where the family has them) on a tiny folder."""
    from amoeba.stages.finetuning import run_training
    from tests.test_training import SANDWICH, _setup, _strategy_dict, _tokenizer

    folder = tmp_path / "tiny"
    model = family_model(kind)
    model.save_pretrained(folder / "model")
    _tokenizer().save_pretrained(folder / "model")
    np.save(folder / "dp_selection_strategy.npy", _strategy_dict(model))
    rng = np.random.default_rng(0)
    rows = [{"instruction": " ".join(f"w{w}" for w in words), "input": "", "output": f"w90 w91 w{words[0] + 1}"}
            for words in rng.integers(0, 60, (48, 3))]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sandwich = list(SANDWICH)
    if not FAMILIES[kind].width:  # depth only: no width flags
        sandwich = [f for f in sandwich if f not in ("--shrinkable_width", "--width_choice", "[1,7/8,3/4,5/8]")]
    torch.manual_seed(0)
    args, model, tok, em, s = _setup(folder, tmp_path / "o", *sandwich, "--max_steps", "30", "--learning_rate",
                                     "2e-2", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
                                     "--use_moe_lora", "--moe_num_expert", "3", "--moe_topk", "2")
    run_training(args, model, tok, em, s)
    log = [row for row in json.loads((tmp_path / "o" / "training_log.json").read_text()) if "loss_largest" in row]
    assert len(log) == 30
    first, last = log[0], log[-1]
    for role in ("loss_largest", "loss_smallest"):
        assert math.isfinite(last[role]) and last[role] < first[role], (role, first, last)
    assert (tmp_path / "o" / "adapter_model" / "adapter_model.safetensors").is_file()


def test_the_command_line_refuses_olmo2_width_in_one_line(tmp_path):
    from tests.test_cli import assert_usage_error, run_main
    from tests.test_training import _tokenizer

    olmo = tmp_path / "olmo2"
    family_model("olmo2").save_pretrained(olmo)
    _tokenizer().save_pretrained(olmo)
    for flags in (("--width_calib",), ("--do_train", "True", "--shrinkable_width", "--dataset", "alpaca")):
        out = tmp_path / flags[-1].strip("-")
        proc = run_main("--model_name_or_path", str(olmo), "--output_dir", str(out), *flags)
        assert_usage_error(proc, flags[0] if flags[0] == "--width_calib" else "--shrinkable_width", "olmo2",
                           "depth only")
        assert not any(out.iterdir())  # nothing written


@pytest.mark.parametrize("kind", ["gemma3_text", "phi3"])
def test_a_width_in_bf16_equals_the_hand_sliced_copy_in_bf16(kind):
    """Slicing is the same arithmetic on the same bf16 weights as a hand-sliced bf16 copy."""
    model, em, small = _reordered_with_a_slice(kind, 2, 0.75, groups=2, channels=56)
    small.to(torch.bfloat16)
    model.to(torch.bfloat16)
    with em.use(Subnet(tuple(range(6)), 0.75)), torch.no_grad():
        got, want = model(IDS).logits.float(), small(IDS).logits.float()
    assert torch.equal(got, want) or (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_gemma3_with_tied_embeddings_exports_and_loads_with_the_same_logits(tmp_path):
    """Gemma checkpoints tie the (large) embedding to the output: the export keeps the tie and counts it once."""
    from transformers import AutoModelForCausalLM

    from amoeba.export import export_subnet

    model = family_model("gemma3_text", tie_word_embeddings=True)
    em = make_elastic(model)
    em.add_width_plan(0.5, [2] * 6, [48] * 6)
    subnet = Subnet(KEEP, 0.5)
    with em.use(subnet), torch.no_grad():
        ref = model(IDS).logits
    folder = export_subnet(model, None, em, subnet, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert sum(p.numel() for p in loaded.parameters()) == em.param_count(subnet)
    assert loaded.config.layer_types == [family_config("gemma3_text").layer_types[i] for i in KEEP]
    with torch.no_grad():
        assert (loaded(IDS).logits - ref).abs().max().item() < 1e-5


def test_a_quantized_packed_projection_is_refused_in_one_line():
    """Packed 4/8-bit weights (a flat byte layout) cannot be split into parts: Phi-3 needs 16 or 32 bits."""
    model = family_model("phi3")
    attn = model.model.layers[0].self_attn
    attn.qkv_proj.weight = nn.Parameter(attn.qkv_proj.weight.detach().flatten(), requires_grad=False)  # packed
    with pytest.raises(UsageError) as err:
        make_elastic(model)
    assert "qkv_proj" in str(err.value) and "--bits" in str(err.value) and "\n" not in str(err.value)
