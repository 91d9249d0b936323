"""LoRA / shape-aware MoE-LoRA on the elastic projections: parity with peft, routing, slicing, save/load."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from amoeba.adapters import (ALL_ROLES, AdapterConfig, ShapeRouter, _structure, adapted_modules, adapter_state_dict,
                             attach_adapters, get_router, load_adapters, remove_adapters, save_adapters,
                             hybrid_mix, weighted_sum)
from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.stages.finetuning import load_trained_adapters, parse_lora_modules
from amoeba.subnet import Subnet
from tests.conftest import tiny_model


def _config(em, **kw) -> AdapterConfig:
    base = dict(r=4, alpha=8.0, num_experts=1, topk=1, use_router=False, widths=[1.0])
    base.update(kw)
    return AdapterConfig(**base, **_structure(em))


def _moe(em, model, experts=3, topk=2, widths=(1.0, 0.75, 0.5)):
    return attach_adapters(model, em, _config(em, num_experts=experts, topk=topk, use_router=True,
                                              widths=list(widths)))


def _randomize_b(model, seed=0, scale=0.05):
    """LoRA B starts at zero; give it values so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, ad in adapted_modules(model):
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * scale)


def _reference_logits(router, x):
    """The paper's router by hand from its weights: Linear(input -> 16), then Linear(16 -> experts), nothing
    between."""
    w1, b1 = router.lora_route_in.weight.detach(), router.lora_route_in.bias.detach()
    w2, b2 = router.lora_route_out.weight.detach(), router.lora_route_out.bias.detach()
    return w2 @ (w1 @ x + b1) + b2


def _random_order(em, seed):
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randperm(em.num_kv_groups, generator=g) for _ in range(em.num_layers)]
    chans = [torch.randperm(em.intermediate_size, generator=g) for _ in range(em.num_layers)]
    return groups, chans


def test_one_expert_equals_peft_lora(tokens):
    """Plain LoRA (one expert, no router) gives peft's logits and gradients for the same A/B."""
    from peft import LoraConfig, get_peft_model

    ref = tiny_model("gqa")
    ours = copy.deepcopy(ref)
    with torch.no_grad():
        base_logits = ref(tokens).logits
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ALL_ROLES)))
    em = make_elastic(ours)
    attach_adapters(ours, em, _config(em))
    g = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for layer, role, ad in adapted_modules(ours):
            parent = "self_attn" if role in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            mod = getattr(getattr(peft_model.base_model.model.model.layers[layer], parent), role)
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.1)
            ad.lora_A[0].copy_(mod.lora_A["default"].weight)
            ad.lora_B[0].copy_(mod.lora_B["default"].weight)
            pairs.append((ad, mod))
    peft_model.train()
    ours.train()
    out_p = peft_model(tokens).logits
    out_o = ours(tokens).logits
    torch.testing.assert_close(out_o, out_p, rtol=1e-5, atol=1e-5)
    assert (out_o - base_logits).abs().max() > 1e-3  # the adapters do change the output
    out_p.square().mean().backward()
    out_o.square().mean().backward()
    for ad, mod in pairs:
        torch.testing.assert_close(ad.lora_A.grad[0], mod.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ad.lora_B.grad[0], mod.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    # Only adapter tensors train, and they all carry the lora_ prefix.
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_router_gates_depend_only_on_shape_and_are_fixed_in_eval():
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    _moe(em, model, experts=4, topk=2)
    router = get_router(model)
    router.eval()
    a = Subnet((0, 1, 2, 3), 1.0)
    b = Subnet((0, 1, 3), 0.5)
    em.set_subnet(a)
    idx_a, g_a = router.current()
    # Same shape -> same gates, whatever ran in between and whatever the tokens are.
    model(torch.randint(0, 128, (1, 5)))
    em.set_subnet(b)
    model(torch.randint(0, 128, (2, 7)))
    em.set_subnet(a)
    idx_a2, g_a2 = router.current()
    assert torch.equal(idx_a, idx_a2) and torch.equal(g_a, g_a2)
    assert abs(float(g_a.sum()) - 1.0) < 1e-6 and g_a.numel() == 2
    # The gates are softmax over the top-k of W2 (W1 [mask, one-hot width] + b1) + b2.
    x = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    top, top_idx = torch.topk(_reference_logits(router, x), 2)
    assert torch.equal(idx_a, top_idx)
    torch.testing.assert_close(g_a, torch.softmax(top, -1))
    # Per-layer widths route by the nearest trained width (mean 0.55 -> 0.5).
    feats = router.features(Subnet((0, 1), (0.6, 0.5)))
    assert feats.tolist() == [1, 1, 0, 0, 0, 0, 1]
    # A new router state (after an optimizer step) invalidates the cached gates.
    with torch.no_grad():
        router.lora_route_out.bias[idx_a[0]] -= 100.0
    idx_a3, _ = router.current()
    assert int(idx_a[0]) not in idx_a3.tolist()


def test_router_noise_is_seeded_in_training():
    router = ShapeRouter(4, 2, 6, 2, [1.0, 0.5])
    router.train()
    s = Subnet((0, 1, 2, 3), 1.0)
    router.noise_seed = 7
    g1 = router.gates(s)
    g2 = router.gates(s)
    torch.testing.assert_close(g1, g2)  # same seed, same noise
    seen = set()
    for seed in range(40):
        router.noise_seed = seed
        seen.add(tuple(router.gates(s).nonzero().flatten().tolist()))
    assert len(seen) > 1  # noisy top-k explores other experts while training
    router.eval()
    assert len({tuple(router.gates(s).nonzero().flatten().tolist()) for _ in range(5)}) == 1


def test_gradients_reach_only_kept_layers_and_kept_features():
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    _moe(em, model)
    _randomize_b(model)
    model.train()
    sub = Subnet((0, 2), 0.5)  # 2 of 4 layers, half of the KV groups and channels
    em.set_subnet(sub)
    model(torch.randint(0, 128, (2, 6))).logits.square().mean().backward()
    groups, chans = em.layer_sizes(sub)[0]
    hd, rep = em.head_dim, em.queries_per_group
    kept_out = {"q_proj": groups * rep * hd, "k_proj": groups * hd, "v_proj": groups * hd,
                "gate_proj": chans, "up_proj": chans}
    kept_in = {"o_proj": groups * rep * hd, "down_proj": chans}
    for layer, role, ad in adapted_modules(model):
        if layer not in sub.layers:
            assert ad.lora_A.grad is None or not ad.lora_A.grad.any(), (layer, role)
            continue
        assert ad.lora_A.grad.abs().sum() > 0 and ad.lora_B.grad.abs().sum() > 0, (layer, role)
        if role in kept_out:
            assert not ad.lora_B.grad[:, kept_out[role]:].any(), role
        else:
            assert not ad.lora_A.grad[:, :, kept_in[role]:].any(), role
    router = get_router(model)
    for layer in (router.lora_route_in, router.lora_route_out):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def _routed_training_pass(configure, subnet, experts=3, noise_seed=3, autocast=False):
    """(logits, gradients) of one training forward of ``subnet`` through a routed MoE-LoRA tiny model, the
    router set up by ``configure(router)`` first."""
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    _moe(em, model, experts=experts)
    _randomize_b(model)
    router = get_router(model)
    configure(router)
    model.train()
    router.noise_seed = noise_seed
    em.set_subnet(subnet)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(torch.arange(12).view(2, 6)).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_pass(a, b, tol, skipped_layer) -> int:
    """Logits and every gradient of two passes agree within ``tol``; the skipped layer's adapters have none.
    Returns how many router tensors got a gradient."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.allclose(out_a, out_b, rtol=tol, atol=tol * 1e-2)
    assert grads_a.keys() == grads_b.keys()
    routed = 0
    for name, g in grads_a.items():
        if grads_b[name] is None:
            assert g is None and f".{skipped_layer}." in name, name
            continue
        routed += "router" in name
        ref = grads_b[name]
        assert torch.allclose(g, ref, rtol=tol, atol=tol * float(ref.abs().max())), name
    return routed


@pytest.mark.parametrize("autocast", [False, True])
def test_mixing_all_adapters_at_once_equals_mixing_each(autocast):
    """The router mixes the experts of every adapter of the subnet in one product per shape; outputs and every
    gradient (experts and router) equal mixing each adapter on its own, also in a training forward under bf16
    autocast (within bf16 rounding) and for adapters of skipped layers (no gradient)."""
    def each_alone(router):
        router._members.clear()  # every adapter falls back to mixing its own experts

    subnet = Subnet((0, 2, 3), 0.75)
    batched = _routed_training_pass(lambda router: None, subnet, autocast=autocast)
    alone = _routed_training_pass(each_alone, subnet, autocast=autocast)
    _assert_same_pass(batched, alone, 2e-2 if autocast else 1e-5, skipped_layer=1)


def test_hybrid_mix_is_the_gate_product_with_its_gradients():
    """CUDA's default mix equals ``g @ stack`` to fp32 rounding, its experts' gradient is autograd's exactly (the same
    single products), the gates' to rounding (float64 gradcheck too); gates that do not fit the stack are refused."""
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(5, generator=g).requires_grad_()
    stack = torch.randn(6, 5, 300, generator=g).requires_grad_()
    out = hybrid_mix(gates, stack)
    ref_out = (gates.view(1, 1, 5) @ stack).squeeze(1)
    upstream = torch.randn(out.shape, generator=g)
    mine = torch.autograd.grad(out, (gates, stack), upstream)
    ref = torch.autograd.grad(ref_out, (gates, stack), upstream)
    assert torch.allclose(out, ref_out, rtol=1e-6, atol=1e-6) and torch.equal(mine[1], ref[1])
    assert torch.allclose(mine[0], ref[0], rtol=1e-5, atol=1e-3)  # sums of 1,800 products, about 40 in size
    assert torch.autograd.gradcheck(hybrid_mix, (gates.detach().double().requires_grad_(),
                                                 stack.detach()[:2, :, :7].double().requires_grad_()))
    with pytest.raises(ValueError, match="do not fit"):
        hybrid_mix(gates, stack[:, :4])


def test_router_mix_methods_resolve_by_device():
    """"auto" mixes by the hybrid on CUDA and by the plain product elsewhere; an unknown name is refused when set."""
    router = ShapeRouter(num_layers=2, num_widths=1, num_experts=3, topk=2)
    assert router.mix_method(torch.device("cuda")) == "hybrid"
    assert router.mix_method(torch.device("cpu")) == "product"
    router.mix = "elementwise"
    assert router.mix_method(torch.device("cuda")) == "elementwise"
    with pytest.raises(ValueError, match="unknown expert mix 'fast'"):
        router.mix = "fast"
    assert router.mix == "elementwise"  # the refused name was not kept


def test_weighted_sum_is_the_gate_product_with_its_gradients():
    """The element-wise expert mix equals ``g @ stack`` and its two gradients (float64 gradcheck and against
    autograd of the product), and refuses gates that do not fit the stack."""
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_()
    stack = torch.randn(3, 5, 7, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(weighted_sum, (gates, stack))
    out = weighted_sum(gates, stack)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(out, (gates, stack), upstream)
    ref_out = (gates.view(1, 1, 5) @ stack).squeeze(1)
    ref = torch.autograd.grad(ref_out, (gates, stack), upstream)
    assert torch.allclose(out, ref_out, rtol=1e-12, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(mine, ref))
    with pytest.raises(ValueError, match="do not fit"):
        weighted_sum(gates, stack[:, :4])


@pytest.mark.parametrize("method", ["elementwise", "hybrid"])
@pytest.mark.parametrize("autocast", [False, True])
def test_every_expert_mix_trains_like_the_matrix_product(method, autocast):
    """The router's ways of mixing a group of adapters' experts (element-wise, an opt-in; the product with its
    hand-written backward, CUDA's default) give the same logits and the same gradients for every expert and the
    router as the plain matrix product (the CPU's default), to fp32 rounding (bf16 rounding under autocast), in a
    training forward of a narrow subnet."""
    def mixing(name):
        return lambda router: setattr(router, "mix", name)

    subnet = Subnet((0, 1, 3), 0.75)
    passes = [_routed_training_pass(mixing(m), subnet, experts=5, noise_seed=5, autocast=autocast)
              for m in (method, "product")]
    routed = _assert_same_pass(*passes, 2e-2 if autocast else 1e-5, skipped_layer=2)
    assert routed == 6  # the router's three layers (weights and biases) got gradients through the mix


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_merged_delta_reproduces_the_adapted_subnet(kind, tokens):
    """W + merged_delta (adapters removed) gives the adapted subnet's logits: what export relies on."""
    model = tiny_model(kind, layers=4)
    em = make_elastic(model)
    em.reorder(*_random_order(em, 1))
    _moe(em, model)
    _randomize_b(model, scale=0.1)
    model.eval()
    plain = copy.deepcopy(model)
    remove_adapters(plain)
    merged = copy.deepcopy(model)
    for sub in (Subnet((0, 1, 2, 3), 1.0), Subnet((0, 1, 3), 0.75), Subnet((1, 2), 0.5)):
        em.set_subnet(sub)
        with torch.no_grad():
            want = model(tokens).logits
            deltas = {(l, r): m.amoeba_adapter.merged_delta() for l in range(em.num_layers)
                      for r, m in em.projections(l).items()}
        model.train()  # merging always uses the deterministic gates, never noisy ones
        torch.testing.assert_close(em.projections(1)["v_proj"].amoeba_adapter.merged_delta(), deltas[(1, "v_proj")])
        model.eval()
        em2 = make_elastic(merged)
        remove_adapters(merged)
        with torch.no_grad():
            for (l, r), d in deltas.items():
                em2.projections(l)[r].weight.copy_(model.get_submodule(
                    f"model.layers.{l}.{'self_attn' if r in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{r}"
                ).weight + d)
            em2.set_subnet(sub)
            got = merged(tokens).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            em_plain = make_elastic(plain)
            em_plain.set_subnet(sub)
            assert (plain(tokens).logits - want).abs().max() > 1e-3  # the adapters matter in this subnet
        merged = copy.deepcopy(model)


def test_saved_adapters_are_portable_across_unit_orders_and_mask_mode(tmp_path, tokens):
    """Saved in the original head/channel order: a differently ordered model and a masked (quantized-style)
    model give the same outputs for every subnet."""
    src = tiny_model("gqa", layers=4, seed=5)
    base_a, base_b = copy.deepcopy(src), copy.deepcopy(src)
    em = make_elastic(src)
    order = _random_order(em, 2)
    em.reorder(*order)
    _moe(em, src)
    _randomize_b(src, scale=0.1)
    with torch.no_grad():
        get_router(src).lora_route_out.bias.normal_()
    save_adapters(src, tmp_path / "ad", em)
    src.eval()

    em_a = make_elastic(base_a)  # another importance order
    em_a.reorder(*_random_order(em_a, 9))
    em_a.reorder(*order)  # cumulative: now a third, different layout
    load_adapters(base_a, em_a, tmp_path / "ad")
    em_b = make_elastic(base_b)  # mask mode: weights stay in place, the order drives masks
    em_b.state.sliceable = False
    em_b.reorder(*order)
    load_adapters(base_b, em_b, tmp_path / "ad")
    base_a.eval()
    base_b.eval()
    with torch.no_grad():
        for sub in (Subnet((0, 1, 2, 3), 1.0), Subnet((0, 2, 3), 0.5), Subnet((1, 3), 0.75)):
            outs = []
            for m, e in ((src, em), (base_a, em_a), (base_b, em_b)):
                e.set_subnet(sub)
                outs.append(m(tokens).logits)
            # Mask mode, same importance order: every subnet agrees.
            torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-5)
            if sub.width == 1.0:  # another order keeps other heads at narrow widths; full width must agree
                torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_and_wrong_model(tmp_path):
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    _moe(em, model)
    _randomize_b(model)
    save_adapters(model, tmp_path / "ad", em)
    other = tiny_model("gqa", layers=4, seed=1)
    load_adapters(other, make_elastic(other), tmp_path / "ad")
    a, b = adapter_state_dict(model), adapter_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    deeper = tiny_model("gqa", layers=5)
    with pytest.raises(UsageError, match="another model"):
        load_adapters(deeper, make_elastic(deeper), tmp_path / "ad")


def test_lora_modules_flag():
    assert parse_lora_modules("all") == list(ALL_ROLES)
    assert parse_lora_modules("v_proj,q_proj") == ["q_proj", "v_proj"]
    with pytest.raises(UsageError, match="--lora_modules"):
        parse_lora_modules("q_proj,lm_head")
    model = tiny_model("gqa", layers=2)
    em = make_elastic(model)
    adapted = attach_adapters(model, em, _config(em, modules=["q_proj", "v_proj"]))
    assert len(adapted) == 4 and {m.amoeba_role for m in adapted} == {"q_proj", "v_proj"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_load_trained_adapters_finds_checkpoints_and_complains(tmp_path):
    train = types.SimpleNamespace(use_moe_lora=True, moe_num_expert=3, moe_topk=2, moe_mix="elementwise")
    args = types.SimpleNamespace(adapters=train, elastic=types.SimpleNamespace(shrinkable_width=False),
                                 width_choice=(1.0,))
    model = tiny_model("gqa", layers=2)
    em = make_elastic(model)
    with pytest.raises(UsageError, match="no trained adapters"):
        load_trained_adapters(args, model, em, tmp_path)
    src = tiny_model("gqa", layers=2)
    src_em = make_elastic(src)
    _moe(src_em, src)
    ckpt = tmp_path / "checkpoint-4"
    save_adapters(src, ckpt / "adapter_model", src_em)
    (ckpt / "trainer_state.json").write_text("{}")
    train.moe_num_expert = 5
    with pytest.raises(UsageError, match="--use_moe_lora"):
        load_trained_adapters(args, model, em, tmp_path)
    train.moe_num_expert = 3
    load_trained_adapters(args, model, em, tmp_path)
    assert get_router(model) is not None and not model.training
    assert get_router(model).mix == "elementwise"  # --moe_mix reaches evaluation's router too
    a, b = adapter_state_dict(model), adapter_state_dict(src)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.real_model
def test_real_model_adapters_move_between_sliced_and_masked_layouts(real_model_dir, tmp_path):
    """SmolLM2 (GQA 9/3 heads, head dim 64): MoE-LoRA adapters trained on the importance-ordered bf16 model
    load into a model that keeps the original layout and masks widths (the 4/8-bit path): same logits."""
    from transformers import AutoModelForCausalLM

    from amoeba.strategy import apply_strategy, strategy_from_dict
    from tests.test_strategy import random_strategy

    def load():
        return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()

    src, masked = load(), load()
    strategy = strategy_from_dict(random_strategy(src, ratios=(1.0, 0.75, 0.5), seed=3))
    em = make_elastic(src)
    apply_strategy(em, strategy, (1.0, 0.75, 0.5))
    _moe(em, src, experts=3, topk=2, widths=(1.0, 0.75, 0.5))
    _randomize_b(src, scale=0.02)
    src.eval()
    save_adapters(src, tmp_path / "ad", em)
    em_m = make_elastic(masked)
    em_m.state.sliceable = False  # as for packed weights: nothing moves, masks pick the kept units
    apply_strategy(em_m, strategy, (1.0, 0.75, 0.5))
    load_adapters(masked, em_m, tmp_path / "ad")
    masked.eval()
    tokens = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    masks = strategy.layer_masks
    for sub in (Subnet(tuple(range(30)), 1.0), Subnet.from_mask(masks[8], 0.75), Subnet.from_mask(masks[12], 0.5)):
        em.set_subnet(sub)
        em_m.set_subnet(sub)
        with torch.no_grad():
            torch.testing.assert_close(masked(tokens).logits, src(tokens).logits, rtol=1e-3, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# The router as the paper builds it; single-layer routers of earlier versions
# ----------------------------------------------------------------------------------------------
def _noisy_reference(router, x, seed):
    """Noisy top-k logits by hand: the noise-free logits plus N(0, 1) (seeded) times softplus(noise layer)."""
    eps = torch.randn(router.num_experts, generator=torch.Generator().manual_seed(seed))
    std = torch.nn.functional.softplus(router.lora_noise.weight.detach() @ x + router.lora_noise.bias.detach())
    return _reference_logits(router, x) + eps * std


def test_router_is_two_linear_layers_through_16_hidden_units():
    """Linear(layer mask + one-hot width -> 16) -> Linear(16 -> experts), no activation between; the noise
    scale is one linear layer. Gates of several shapes, at evaluation (also under bf16 autocast: the router runs
    in fp32) and while training (seeded noise), equal a reference computed from the layers' weights."""
    model = tiny_model("gqa", layers=4)
    em = make_elastic(model)
    _moe(em, model, experts=5, topk=2)
    router = get_router(model)
    shapes = {n: tuple(p.shape) for n, p in router.named_parameters()}
    assert shapes == {"lora_route_in.weight": (16, 7), "lora_route_in.bias": (16,),
                      "lora_route_out.weight": (5, 16), "lora_route_out.bias": (5,),
                      "lora_noise.weight": (5, 7), "lora_noise.bias": (5,)}
    assert [type(m) for m in router.children()] == [torch.nn.Linear] * 3  # nothing else (no activation)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # large random weights, so an activation or a missing layer would show
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    subnets = [Subnet((0, 1, 2, 3), 1.0), Subnet((0, 1, 3), 0.75), Subnet((1, 2), 0.5), Subnet((0,), 1.0)]
    router.eval()
    for sub in subnets:
        x = router.features(sub)
        top, idx = torch.topk(_reference_logits(router, x), 2)
        em.set_subnet(sub)
        got_idx, got = router.current()
        assert torch.equal(got_idx, idx), sub
        torch.testing.assert_close(got, torch.softmax(top, -1), rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_idx, auto = router.route(sub)
        assert torch.equal(auto_idx, idx) and auto.dtype == torch.float32
        torch.testing.assert_close(auto, got, rtol=0, atol=0)
    router.train()
    for seed, sub in enumerate(subnets):
        router.noise_seed = seed
        x = router.features(sub)
        top, idx = torch.topk(_noisy_reference(router, x, seed), 2)
        got_idx, got = router.route(sub)
        assert torch.equal(got_idx, idx)
        torch.testing.assert_close(got, torch.softmax(top, -1), rtol=1e-6, atol=1e-6)


def _legacy_file(directory, experts, d, seed=0):
    """Rewrite saved adapters as the earlier single-layer router had them; return its (W, b)."""
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("router.")}
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(experts, d, generator=g), torch.randn(experts, generator=g)
    tensors.update({"router.lora_gate_weight": w, "router.lora_gate_bias": b,
                    "router.lora_noise_weight": torch.randn(experts, d, generator=g) * 0.1,
                    "router.lora_noise_bias": torch.zeros(experts)})
    save_file(tensors, str(path), metadata={"format": "amoeba-moe-lora"})
    return w, b


def test_single_layer_router_of_earlier_versions_loads_exactly_or_is_refused(tmp_path):
    """Adapters saved with the single-layer router (logits W x + b) load for evaluation/export: every shape gets
    the experts and gates it had. Refused with one line naming the folder when resuming training, or when the
    experts outnumber the hidden units (no exact two-layer form)."""
    src = tiny_model("gqa", layers=4)
    em = make_elastic(src)
    _moe(em, src, experts=5, topk=2)
    _randomize_b(src)
    save_adapters(src, tmp_path / "old", em)
    w, b = _legacy_file(tmp_path / "old", 5, 7)
    model = tiny_model("gqa", layers=4)
    em2 = make_elastic(model)
    load_adapters(model, em2, tmp_path / "old")
    router = get_router(model)
    router.eval()
    for sub in (Subnet((0, 1, 2, 3), 1.0), Subnet((0, 2, 3), 0.75), Subnet((3,), 0.5)):
        top, idx = torch.topk(w @ router.features(sub) + b, 2)
        got_idx, got = router.route(sub)
        assert torch.equal(got_idx, idx), sub
        torch.testing.assert_close(got, torch.softmax(top, -1), rtol=1e-6, atol=1e-6)
    a, s = adapter_state_dict(model), adapter_state_dict(src)  # the experts themselves load unchanged
    assert all(torch.equal(a[k], s[k]) for k in a if not k.startswith("router."))
    fresh = tiny_model("gqa", layers=4)
    with pytest.raises(UsageError, match=r"--resume_training.*old.*single-layer"):
        load_adapters(fresh, make_elastic(fresh), tmp_path / "old", resuming=True)
    many = tiny_model("gqa", layers=2)
    em3 = make_elastic(many)
    _moe(em3, many, experts=17, topk=2)
    save_adapters(many, tmp_path / "many", em3)
    _legacy_file(tmp_path / "many", 17, 5)
    other = tiny_model("gqa", layers=2)
    with pytest.raises(UsageError, match=r"many.*17 experts"):
        load_adapters(other, make_elastic(other), tmp_path / "many")


def test_adapters_disabled_runs_the_base_model_and_restores_everything(tokens):
    """Inside ``adapters_disabled`` the model gives the base model's logits and the router computes nothing;
    afterwards the adapters and the router work as before."""
    from amoeba.adapters import adapters_disabled

    model = tiny_model("gqa", layers=4)
    base = copy.deepcopy(model)
    em = make_elastic(model)
    _moe(em, model)
    _randomize_b(model, scale=0.1)
    model.train()
    router = get_router(model)
    router.noise_seed = 3  # the same noisy gates in every forward
    with torch.no_grad():
        adapted = model(tokens).logits
        calls = []
        hooks = [ad.register_forward_hook(lambda *a: calls.append(1)) for _, _, ad in adapted_modules(model)]
        stamp = router._cache_key
        with adapters_disabled(model):
            off = model(tokens).logits
        assert not calls and router._cache_key == stamp  # no adapter ran, no gates were computed
        for h in hooks:
            h.remove()
        torch.testing.assert_close(off, base(tokens).logits, rtol=1e-5, atol=1e-5)
        assert len(adapted_modules(model)) == 28 and not router.suspended
        torch.testing.assert_close(model(tokens).logits, adapted)
