"""scripts/bench_latency.py: the hand greedy decoder (static cache, one-token step) decodes like generate."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import load_script, ROOT, tiny_model


def _bench():
    return load_script(ROOT / "scripts" / "bench_latency.py")


def test_step_decoder_tokens_equal_generate_and_survive_reuse():
    bench = _bench()
    model = tiny_model("gqa", layers=3)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 7), generator=g)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=12,
                         max_new_tokens=12, disable_compile=True)[:, 7:]
    other = torch.randint(0, 128, (2, 7), generator=g)
    ref2 = model.generate(other, attention_mask=torch.ones_like(other), do_sample=False, min_new_tokens=6,
                          max_new_tokens=6, disable_compile=True)[:, 7:]
    # "cudagraph" without CUDA runs its in-place step (next token and position written into its own inputs)
    for mode in ("eager", "cudagraph"):
        dec = bench.StepDecoder(model, max_len=7 + 12 + 1, mode=mode)
        got = dec.generate(ids, 12)
        assert torch.equal(got, ref), (mode, got, ref)
        # the cache is reset between runs: a shorter second run gives the prefix of the first
        assert torch.equal(dec.generate(ids, 5), ref[:, :5]), mode
        assert torch.equal(dec.generate(other, 6), ref2), mode


def test_compiled_step_decoder_matches_generate():
    """The step compiled as on the GPU (``torch.compile(mode="reduce-overhead")``; on a CPU inductor without
    CUDA graphs) decodes the same greedy tokens, twice in a row (the compiled graph and the reset cache reused)."""
    bench = _bench()
    model = tiny_model("gqa", layers=2)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=8,
                         max_new_tokens=8, disable_compile=True)[:, 7:]
    dec = bench.StepDecoder(model, max_len=7 + 8 + 1, mode="compile")
    assert torch.equal(dec.generate(ids, 8), ref)
    assert torch.equal(dec.generate(ids, 8), ref)


def test_a_failing_step_decoder_keeps_the_rest_of_the_table(tmp_path, monkeypatch):
    """One measurement that raises (as a CUDA-graph error would) is recorded with its message; every other
    number of the run is still written."""
    import json

    bench = _bench()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA graph output overwritten\nsecond line")

    monkeypatch.setattr(bench, "step_decode_ms_per_token", broken)
    out = tmp_path / "lat.json"
    assert bench.main(["--smoke", "--layers", "8,5", "--widths", "1", "--no_masked", "--reps", "1",
                       "--decode_batches", "1", "--step_decode", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"l8w1", "l5w1"}
    for r in rows.values():
        for mode in ("compile", "cudagraph"):
            assert r[f"decode_b1_{mode}_error"] == "RuntimeError: CUDA graph output overwritten"
            assert r[f"decode_b1_{mode}_ms"] is None
        # (a decode time may be unresolved, None, when a loaded CPU's noise exceeds it: the column must exist)
        assert r["prefill_16_ms"] > 0 and "decode_b1_compiled_ms" in r
    table = out.with_suffix(".md").read_text()
    assert "Step decoder (cudagraph) failed (l8w1, b1): RuntimeError" in table
    assert "decode_b1_compiled ms" in table


def test_step_decode_modes_are_checked():
    bench = _bench()
    assert bench.parse_cli(["--out", "x.json", "--step_decode", "cudagraph"]).step_decode == ["cudagraph"]
    assert bench.parse_cli(["--out", "x.json"]).step_decode == []
    with pytest.raises(SystemExit) as err:
        bench.parse_cli(["--out", "x.json", "--step_decode", "graphs"])
    assert err.value.code == 2


def test_greedy_gap_is_zero_for_greedy_tokens_and_large_for_others():
    bench = _bench()
    model = tiny_model("gqa", layers=2)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    new = bench.StepDecoder(model, max_len=6 + 5 + 1, mode="cudagraph").generate(ids, 5)
    assert bench.greedy_gap(model, ids, new) < 1e-5
    worst = model(torch.cat([ids, new], 1)).logits[:, 5:-1].argmin(-1)  # the least likely token at every step
    assert bench.greedy_gap(model, ids, worst) > 1.0 > bench.GREEDY_GAP_TOLERANCE


def test_per_layer_widths_are_mapped_by_relative_depth():
    """The shipped SmolLM2 strategy (30 layers) onto 8 layers: each layer keeps the kept fraction of its source
    layer, and the exact export of such a shape is smaller than its padded form and decodes the same tokens."""
    import numpy as np

    from amoeba.elastic import make_elastic
    from amoeba.strategy import load_strategy
    from amoeba.subnet import Subnet

    bench = _bench()
    model = tiny_model("mha", layers=8, num_attention_heads=8, intermediate_size=96)
    em = make_elastic(model)
    strategy_file = ROOT / "dp_selection_strategy.npy"
    mapping = bench.mapped_width_plans(str(strategy_file), [1.0, 0.625], em)
    assert list(mapping) == ["0.625"]
    strategy = load_strategy(strategy_file)
    plan = em.width_plans[0.625]
    for j, src in enumerate([0, 4, 8, 12, 17, 21, 25, 29]):  # round(j * 29 / 7)
        kv = strategy.mask_of(src, "k_proj", 0.625).sum() / strategy.mask_of(src, "k_proj", 0.625).size
        ch = strategy.mask_of(src, "gate_proj", 0.625).sum() / 1536
        assert plan.groups[j] == max(1, round(kv * 8)) and plan.channels[j] == max(1, round(ch * 96))
        narrowed = plan.groups[j] < 8 or plan.channels[j] < 96
        assert ((j, "o_proj") in plan.bias) == narrowed
    assert len(set(zip(plan.groups, plan.channels))) > 1  # per-layer widths indeed
    subnet = Subnet(tuple(range(6)), 0.625)
    exact, small = bench.plain_model(model, em, subnet, "exact")
    padded, wide = bench.plain_model(model, em, subnet, "padded")
    assert exact.per_layer_code and not padded.per_layer_code
    assert exact.param_count == em.param_count(subnet) < padded.param_count
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, wide(ids).logits, rtol=0, atol=1e-5)
