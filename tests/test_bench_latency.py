"""scripts/bench_latency.py: the hand greedy decoder (static cache, one-token step) decodes like generate."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tests.conftest import ROOT, tiny_model


def _bench():
    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "scripts" / "bench_latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


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
        assert r["prefill_16_ms"] > 0 and r["decode_b1_compiled_ms"] > 0
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
