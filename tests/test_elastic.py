"""The elastic model runs exactly the subnet it is set to, on stock transformers models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from amoeba.elastic import get_elastic, make_elastic
from amoeba.errors import UsageError
from amoeba.subnet import Subnet
from tests.conftest import tiny_model

KINDS = ["gqa", "mha", "qwen2", "qwen3", "mistral"]


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _sliced_copy(ref, layers, groups, channels):
    """A physically smaller model: only ``layers``, the first ``groups`` KV groups and ``channels`` channels."""
    cfg = copy.deepcopy(ref.config)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.head_dim = hd
    cfg.num_hidden_layers = len(layers)
    cfg.num_attention_heads, cfg.num_key_value_heads = groups * rep, groups
    cfg.intermediate_size = channels
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    small = type(ref)(cfg).eval()
    src = ref.state_dict()
    out = {}
    q, kv = groups * rep * hd, groups * hd
    for name, tensor in small.state_dict().items():
        key = name
        if ".layers." in name:
            pos = int(name.split(".layers.")[1].split(".")[0])
            key = name.replace(f".layers.{pos}.", f".layers.{layers[pos]}.")
        t = src[key]
        if "q_proj" in name:
            t = t[:q]
        elif "k_proj" in name or "v_proj" in name:
            t = t[:kv]
        elif "o_proj.weight" in name:
            t = t[:, :q]
        elif "gate_proj" in name or "up_proj" in name:
            t = t[:channels]
        elif "down_proj.weight" in name:
            t = t[:, :channels]
        assert t.shape == tensor.shape, (name, t.shape, tensor.shape)
        out[name] = t
    small.load_state_dict(out)
    return small


@pytest.mark.parametrize("kind", KINDS)
def test_full_subnet_equals_unmodified_model(kind, tokens):
    ref = tiny_model(kind)
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    assert set(model.state_dict()) == set(ref.state_dict())
    torch.testing.assert_close(_logits(model, tokens), _logits(ref, tokens), atol=1e-5, rtol=0)
    em.set_subnet(Subnet((0, 2), 0.5))
    em.set_subnet(em.full_subnet())
    torch.testing.assert_close(_logits(model, tokens), _logits(ref, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_skipping_layers_equals_deleting_them(kind, tokens):
    ref = tiny_model(kind, layers=5)
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    keep = (0, 2, 3)
    with em.use(Subnet(keep)):
        got = _logits(model, tokens)
    deleted = _sliced_copy(ref, keep, ref.config.num_key_value_heads, ref.config.intermediate_size)
    torch.testing.assert_close(got, _logits(deleted, tokens), atol=1e-5, rtol=0)
    # the full list is back after the block, and so are the cache slots
    assert len(em.decoder.layers) == 5
    assert [blk.self_attn.layer_idx for blk in em.decoder.layers] == list(range(5))
    torch.testing.assert_close(_logits(model, tokens), _logits(ref, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_width_equals_hand_sliced_copy(kind, ratio, tokens):
    ref = tiny_model(kind)
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    keep = (0, 1, 3)
    with em.use(Subnet(keep, ratio)):
        got = _logits(model, tokens)
    groups, channels = em.layer_sizes(Subnet(keep, ratio))[0]
    assert groups <= em.num_kv_groups and channels < em.intermediate_size
    small = _sliced_copy(ref, keep, groups, channels)
    torch.testing.assert_close(got, _logits(small, tokens), atol=1e-5, rtol=0)


def test_per_layer_width_list(tokens):
    ref = tiny_model("gqa")
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    sub = Subnet((0, 1, 2, 3), (1.0, 0.5, 0.5, 1.0))
    sizes = em.layer_sizes(sub)
    assert sizes[0] == (4, 96) and sizes[1] == (2, 48)
    # Same function as zeroing the removed units of an unmodified copy.
    masked = copy.deepcopy(ref)
    with torch.no_grad():
        for li in (1, 2):
            blk = masked.model.layers[li]
            hd = em.head_dim * em.queries_per_group
            blk.self_attn.o_proj.weight[:, 2 * hd:] = 0
            blk.mlp.down_proj.weight[:, 48:] = 0
    with em.use(sub):
        torch.testing.assert_close(_logits(model, tokens), _logits(masked, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gqa", "mha", "qwen2"])
def test_reorder_preserves_the_function_and_moves_units(kind, tokens):
    ref = tiny_model(kind)
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    g = torch.Generator().manual_seed(3)
    group_orders = [torch.randperm(em.num_kv_groups, generator=g) for _ in range(em.num_layers)]
    channel_orders = [torch.randperm(em.intermediate_size, generator=g) for _ in range(em.num_layers)]
    em.reorder(group_orders, channel_orders)
    torch.testing.assert_close(_logits(model, tokens), _logits(ref, tokens), atol=1e-5, rtol=0)
    # Width 1/2 now keeps the units named first by the orders: same as zeroing the others in the reference.
    masked = copy.deepcopy(ref)
    sub = Subnet(tuple(range(em.num_layers)), 0.5)
    with torch.no_grad():
        for li, (groups, channels) in enumerate(em.layer_sizes(sub)):
            blk = masked.model.layers[li]
            dropped_g = group_orders[li][groups:]
            span = em.head_dim * em.queries_per_group
            for grp in dropped_g.tolist():
                blk.self_attn.o_proj.weight[:, grp * span:(grp + 1) * span] = 0
            blk.mlp.down_proj.weight[:, channel_orders[li][channels:]] = 0
    with em.use(sub):
        torch.testing.assert_close(_logits(model, tokens), _logits(masked, tokens), atol=1e-5, rtol=0)
    assert em.group_kept_mask(0, 1).nonzero().item() == group_orders[0][0].item()


def test_mask_mode_equals_slice_mode(tokens):
    ref = tiny_model("gqa")
    sliced, masked = copy.deepcopy(ref), copy.deepcopy(ref)
    em_s, em_m = make_elastic(sliced), make_elastic(masked)
    em_m.state.sliceable = False  # what packed 4/8-bit weights force
    g = torch.Generator().manual_seed(5)
    orders = ([torch.randperm(4, generator=g) for _ in range(4)], [torch.randperm(96, generator=g) for _ in range(4)])
    em_s.reorder(*orders)
    em_m.reorder(*orders)
    for sub in (Subnet((0, 1, 3), 0.5), Subnet((0, 1, 2, 3), (0.5, 1.0, 0.25, 0.75))):
        with em_s.use(sub), em_m.use(sub):
            torch.testing.assert_close(_logits(masked, tokens), _logits(sliced, tokens), atol=1e-5, rtol=0)


def test_flap_bias_is_added_to_o_and_down(tokens):
    ref = tiny_model("gqa")
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    hidden = ref.config.hidden_size
    bias = {(li, role): torch.randn(hidden) * 0.1 for li in range(4) for role in ("o_proj", "down_proj")}
    em.add_width_plan(0.75, groups=[1, 3, 1, 2], channels=[10, 20, 30, 40], bias=bias)
    plain = copy.deepcopy(ref)
    with torch.no_grad():
        for li, (groups, ch) in enumerate(zip([1, 3, 1, 2], [10, 20, 30, 40])):
            blk = plain.model.layers[li]
            span = em.head_dim * em.queries_per_group
            blk.self_attn.o_proj.weight[:, groups * span:] = 0
            blk.mlp.down_proj.weight[:, ch:] = 0
            blk.self_attn.o_proj.bias = nn.Parameter(bias[(li, "o_proj")].clone())
            blk.mlp.down_proj.bias = nn.Parameter(bias[(li, "down_proj")].clone())
    with em.use(Subnet(tuple(range(4)), 0.75)):
        torch.testing.assert_close(_logits(model, tokens), _logits(plain, tokens), atol=1e-5, rtol=0)
    with em.use(Subnet(tuple(range(4)), 0.5)):  # a ratio without a plan: uniform, no bias
        assert em.layer_sizes(em.subnet)[0] == (2, 48)


def test_gradients_reach_active_parameters_only(tokens):
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    model.train()
    sub = Subnet((0, 2, 3), 0.5)
    em.set_subnet(sub)
    model(tokens, labels=tokens).loss.backward()
    groups, channels = em.layer_sizes(sub)[0]
    q_rows = groups * em.queries_per_group * em.head_dim
    for name, p in model.named_parameters():
        if ".layers.1." in name:
            assert p.grad is None, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        if "q_proj.weight" in name:
            assert p.grad[:q_rows].abs().sum() > 0 and p.grad[q_rows:].abs().sum() == 0, name
        if "down_proj.weight" in name:
            assert p.grad[:, :channels].abs().sum() > 0 and p.grad[:, channels:].abs().sum() == 0, name
        if "gate_proj.weight" in name:
            assert p.grad[channels:].abs().sum() == 0, name


def test_backward_matches_hand_sliced_copy(tokens):
    ref = tiny_model("mha")
    model = copy.deepcopy(ref)
    em = make_elastic(model)
    keep = (1, 2, 3)
    sub = Subnet(keep, 0.5)
    em.set_subnet(sub)
    groups, channels = em.layer_sizes(sub)[0]
    small = _sliced_copy(ref, keep, groups, channels)
    model(tokens, labels=tokens).loss.backward()
    small(tokens, labels=tokens).loss.backward()
    a = model.model.layers[2].mlp.up_proj.weight.grad[:channels]
    b = small.model.layers[1].mlp.up_proj.weight.grad
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_generation_runs_on_a_shallower_narrower_subnet():
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    prompt = torch.tensor([[1, 2, 3, 4]])
    ref = _sliced_copy(copy.deepcopy(model), (0, 3), 2, 48)
    with em.use(Subnet((0, 3), 0.5)):
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    expect = ref.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(out, expect)


def test_bad_subnets_and_architectures():
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    assert get_elastic(model) is em and make_elastic(model) is em
    with pytest.raises(UsageError, match="4 layers"):
        em.set_subnet(Subnet((0, 7)))
    with pytest.raises(ValueError):
        Subnet((0, 1), 1.5)
    with pytest.raises(UsageError, match="KV groups"):
        em.add_width_plan(0.5, [0, 1, 1, 1], [1, 1, 1, 1])
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(UsageError, match="supported: llama"):
        make_elastic(gpt2)


def test_param_count_matches_a_physical_copy():
    ref = tiny_model("qwen2")
    em = make_elastic(copy.deepcopy(ref))
    sub = Subnet((0, 2, 3), 0.5)
    groups, channels = em.layer_sizes(sub)[0]
    small = _sliced_copy(ref, sub.layers, groups, channels)
    assert em.param_count(sub) == sum(p.numel() for p in small.parameters())
    assert em.param_count(em.full_subnet()) == sum(p.numel() for p in ref.parameters())
