"""Fused projections of per-layer exports: q/k/v and gate/up as one product each, same function, stock files.

A per-layer export loads through ``modeling_amoeba.py``, whose ``from_pretrained`` fuses each layer's
q/k/v and gate/up weights (one matrix product instead of three and two: the fixed cost per kernel dominates
the narrow layers of a batch-1 decode). These tests check that fusing changes nothing a user can see but the
speed: logits, generated tokens, ``state_dict`` keys and values, parameter count, ``save_pretrained`` files,
tracing by ``torch.compile`` without graph breaks, and that ``unfuse_projections`` gives plain projections
back for tools that attach adapters by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from amoeba.elastic import make_elastic
from amoeba.export import export_subnet
from amoeba.subnet import Subnet
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _per_layer_export(tmp_path, kind: str):
    """A per-layer (exact) export of a tiny model: layers 0, 1, 3 at their own widths, FLAP-like biases."""
    model = tiny_model(kind, 4, seed=2)
    em = make_elastic(model)
    g = torch.Generator().manual_seed(9)
    em.reorder([torch.randperm(em.num_kv_groups, generator=g) for _ in range(4)],
               [torch.randperm(em.intermediate_size, generator=g) for _ in range(4)])
    groups = [em.num_kv_groups, 1, 2, 1]
    channels = [em.intermediate_size, 9, 40, 17]
    bias = {(i, role): torch.randn(model.config.hidden_size, generator=g) * 0.3 for i in (1, 2, 3)
            for role in ("o_proj", "down_proj")}
    em.add_width_plan(0.5, groups, channels, bias)
    subnet = Subnet((0, 1, 3), 0.5)
    with em.use(subnet), torch.no_grad():
        ref = model(TOKENS).logits
    folder = export_subnet(model, None, em, subnet, tmp_path / f"{kind}_export")
    assert (folder / "modeling_amoeba.py").exists()
    return folder, ref


def _load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True,
                                                **kwargs).eval()


def _of_class(model, name: str) -> list:
    """Modules of the class ``name`` (the folder's own copy of the modeling file defines them, by name)."""
    return [m for m in model.modules() if type(m).__name__ == name]


def _fused_modules(model) -> int:
    return len(_of_class(model, "FusedLinear"))


@pytest.mark.parametrize("kind", ["gqa", "mha", "qwen2"])
def test_loading_fuses_and_changes_nothing_visible(tmp_path, kind):
    folder, ref = _per_layer_export(tmp_path, kind)
    fused = _load(folder)
    plain = _load(folder, fuse_projections=False)
    assert _fused_modules(fused) == 2 * fused.config.num_hidden_layers  # q/k/v and gate/up in every layer
    assert _fused_modules(plain) == 0
    assert all(type(m.self_attn.q_proj) is nn.Linear for m in plain.model.layers)
    with torch.no_grad():
        out_fused, out_plain = fused(TOKENS).logits, plain(TOKENS).logits
    assert (out_fused - ref).abs().max().item() < 1e-5
    assert (out_fused - out_plain).abs().max().item() < 1e-5
    # state_dict: the stock per-projection keys, the same values, nothing fused left in it
    sd_fused, sd_plain = fused.state_dict(), plain.state_dict()
    assert sorted(sd_fused) == sorted(sd_plain)
    assert all(torch.equal(sd_fused[k], sd_plain[k]) for k in sd_plain)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    # greedy generation, dynamic and static cache, is the same
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = fused.generate(TOKENS[:1], **gen)
        b = plain.generate(TOKENS[:1], **gen)
        c = fused.generate(TOKENS[:1], cache_implementation="static", **gen)
    assert a.tolist() == b.tolist() == c.tolist()


def test_long_inputs_take_the_parts_one_by_one_with_the_same_result(tmp_path):
    """Above FUSED_MAX_ROWS tokens the parts run as separate products: the same logits as unfused."""
    folder, _ = _per_layer_export(tmp_path, "qwen2")  # q/k/v biases
    fused, plain = _load(folder), _load(folder, fuse_projections=False)
    long = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(8))  # 300 rows > 256
    shared = []  # calls of the shared (fused) product
    cls = type(_of_class(fused, "FusedLinear")[0])
    original = cls.output_for
    cls.output_for = lambda self, x: shared.append(1) or original(self, x)
    try:
        with torch.no_grad():
            assert (fused(long).logits - plain(long).logits).abs().max().item() < 1e-5
            assert not shared  # no fused product was formed for 300 rows
            fused(TOKENS)
            assert shared  # ... and it is for 18
    finally:
        cls.output_for = original


def test_a_fused_model_saves_stock_files_and_reloads_equal(tmp_path):
    folder, _ = _per_layer_export(tmp_path, "gqa")
    fused = _load(folder)
    fused.save_pretrained(tmp_path / "resaved")
    names = [p.name for p in (tmp_path / "resaved").iterdir()]
    assert "modeling_amoeba.py" in names
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        original = set(f.keys())
    assert keys == original and not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    again = _load(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(again(TOKENS).logits, fused(TOKENS).logits)
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["per_layer_shapes"] == json.loads((folder / "config.json").read_text())["per_layer_shapes"]


def test_unfuse_gives_plain_projections_back_and_load_state_dict_takes_stock_keys(tmp_path):
    folder, _ = _per_layer_export(tmp_path, "qwen2")  # q/k/v biases
    model = _load(folder)
    with torch.no_grad():
        before = model(TOKENS).logits
    stock = _load(folder, fuse_projections=False).state_dict()
    with torch.no_grad():  # scramble, then load the stock keys into the fused model
        for p in model.parameters():
            p.mul_(0.5)
    missing, unexpected = model.load_state_dict(stock, strict=True)
    assert not missing and not unexpected
    assert model.unfuse_projections() == 2 * model.config.num_hidden_layers
    assert _fused_modules(model) == 0 and model.unfuse_projections() == 0
    layer = model.model.layers[1]
    assert type(layer.self_attn.k_proj) is nn.Linear and layer.self_attn.k_proj.bias is not None
    assert type(layer.mlp.up_proj) is nn.Linear and not hasattr(layer.mlp, "gate_up_proj")
    with torch.no_grad():
        assert (model(TOKENS).logits - before).abs().max().item() < 1e-5
    # peft attaches by projection name once the projections are plain again
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    assert sum("lora_A" in n for n, _ in lora.named_parameters()) == 2 * model.config.num_hidden_layers


def test_the_fused_forward_traces_as_one_graph(tmp_path):
    """torch.compile must not break the graph at the shared product (the decode step is one CUDA graph)."""
    folder, _ = _per_layer_export(tmp_path, "gqa")
    model = _load(folder)
    parts = _of_class(model, "FusedPart")
    assert parts and all(p.fused._output is None for p in parts)
    explained = torch._dynamo.explain(lambda ids: model(ids, use_cache=False).logits)(TOKENS)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(lambda ids: model(ids, use_cache=False).logits, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(TOKENS), model(TOKENS).logits, atol=1e-6)
    assert all(p.fused._output is None for p in parts)  # no activation held between calls
