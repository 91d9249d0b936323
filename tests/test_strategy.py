"""The strategy file: safe loading, round trips, the original code's layout, validation, applying widths."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amoeba.elastic import make_elastic
from amoeba.errors import UsageError
from amoeba.npy import load_npy, load_npy_dict
from amoeba.strategy import Strategy, apply_strategy, load_strategy, module_name, save_strategy, validate_strategy
from amoeba.subnet import Subnet
from tests.conftest import load_script, ROOT, tiny_model

KINDS = ["mha", "gqa", "qwen2"]


def _dims(model):
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_key_value_heads
    return hd, cfg.num_attention_heads // groups, groups, cfg.intermediate_size, cfg.hidden_size


def random_strategy(model, ratios=(1.0, 0.875, 0.75, 0.625), seed=0, prefix="", ratio_keys=None) -> dict:
    """A strategy dict in the seed's layout with random nested per-layer widths and random biases."""
    rng = np.random.default_rng(seed)
    hd, rep, groups, inter, hidden = _dims(model)
    n = model.config.num_hidden_layers
    masks, bias = {}, {}
    for i in range(n):
        g_rank, c_rank = rng.permutation(groups), rng.permutation(inter)
        g_count, c_count = groups, inter
        for role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"):
            name = prefix + module_name(i, role)
            masks[name] = None if role in ("o_proj", "down_proj") else {}
            bias[name] = {} if role in ("o_proj", "down_proj") else None
        for r in sorted(ratios, reverse=True):
            g_count = max(1, min(g_count, int(rng.integers(1, groups + 1)) if r < 1 else groups))
            c_count = max(1, min(c_count, int(rng.integers(1, inter + 1)) if r < 1 else inter))
            g = np.zeros(groups, bool)
            g[g_rank[:g_count]] = True
            c = np.zeros(inter, bool)
            c[c_rank[:c_count]] = True
            key = (ratio_keys or {}).get(r, r)
            masks[prefix + module_name(i, "q_proj")][key] = np.repeat(g, rep * hd)
            masks[prefix + module_name(i, "k_proj")][key] = np.repeat(g, hd)
            masks[prefix + module_name(i, "v_proj")][key] = np.repeat(g, hd)
            masks[prefix + module_name(i, "gate_proj")][key] = c
            masks[prefix + module_name(i, "up_proj")][key] = c
            zero = r >= 1
            bias[prefix + module_name(i, "o_proj")][key] = np.zeros(hidden) if zero else rng.normal(0, .1, hidden)
            bias[prefix + module_name(i, "down_proj")][key] = np.zeros(hidden) if zero else rng.normal(0, .1, hidden)
    depth = {m: np.concatenate([np.ones(n - m), np.zeros(m)]) for m in range(1, n)}
    return {"strategy": depth, "metric": {m: float(m) for m in depth}, "width_mask": masks, "bias": bias}


def masked_reference_logits(model, strategy: Strategy, ratio: float, tokens) -> torch.Tensor:
    """Logits of an unmodified copy with the removed heads/channels zeroed (o/down input columns) and the
    strategy's biases added to the o/down outputs."""
    ref = copy.deepcopy(model)
    hooks = []
    with torch.no_grad():
        for i, blk in enumerate(ref.model.layers):
            q = torch.tensor(strategy.mask_of(i, "q_proj", ratio), dtype=torch.float32)
            c = torch.tensor(strategy.mask_of(i, "gate_proj", ratio), dtype=torch.float32)
            blk.self_attn.o_proj.weight.mul_(q[None, :])
            blk.mlp.down_proj.weight.mul_(c[None, :])
            for mod, role in ((blk.self_attn.o_proj, "o_proj"), (blk.mlp.down_proj, "down_proj")):
                b = torch.tensor(strategy.bias_of(i, role, ratio), dtype=torch.float32)
                hooks.append(mod.register_forward_hook(lambda m, a, out, b=b: out + b))
        out = ref(tokens).logits
    for h in hooks:
        h.remove()
    return out


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ----------------------------------------------------------------------------------------------
# Loading safely
# ----------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_loader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.npy"
    np.save(path, {"strategy": {1: np.ones(3)}, "x": evil})
    with pytest.raises(UsageError) as err:
        load_strategy(path, "--shrinking_file")
    msg = str(err.value)
    assert "evil.npy" in msg and "system" in msg and "refusing" in msg and msg.startswith("--shrinking_file")
    assert not marker.exists()


def test_truncated_and_corrupt_files_give_one_clear_error(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, random_strategy(tiny_model("gqa", layers=2)))
    data = good.read_bytes()
    for cut, word in ((len(data) // 2, "truncated"), (140, "truncated"), (20, "truncated")):
        bad = tmp_path / f"cut{cut}.npy"
        bad.write_bytes(data[:cut])
        with pytest.raises(UsageError, match=word) as err:
            load_strategy(bad)
        assert f"cut{cut}.npy" in str(err.value) and "\n" not in str(err.value)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"hello world, not numpy")
    with pytest.raises(UsageError, match="not a .npy file"):
        load_strategy(junk)
    with pytest.raises(UsageError, match="no such file"):
        load_strategy(tmp_path / "missing.npy")


def test_plain_numeric_npy_loads_and_truncation_is_caught(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "a.npy"
    np.save(path, arr)
    np.testing.assert_array_equal(load_npy(path), arr)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UsageError, match="truncated"):
        load_npy(path)
    np.save(path, arr)
    with pytest.raises(UsageError, match="not a dict"):
        load_npy_dict(path)


# ----------------------------------------------------------------------------------------------
# Round trips and the original layout
# ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_readable_view(tmp_path):
    model = tiny_model("gqa", layers=3)
    raw = random_strategy(model)
    s = load_strategy_from(raw, tmp_path / "in.npy")
    out = save_strategy(s, tmp_path / "dp_selection_strategy.npy")
    back = load_strategy(out)
    assert back.depths() == s.depths() == [1, 2, 3]
    assert back.widths() == s.widths() == [0.625, 0.75, 0.875, 1.0]
    for m in s.layer_masks:
        np.testing.assert_array_equal(back.layer_masks[m], s.layer_masks[m])
    assert back.metric == s.metric
    for name, d in s.width_mask.items():
        if d is None:
            assert back.width_mask[name] is None
            continue
        for r, a in d.items():
            np.testing.assert_array_equal(back.width_mask[name][r], a)
    for name, d in s.bias.items():
        for r, a in (d or {}).items():
            np.testing.assert_allclose(back.bias[name][r], a, rtol=1e-6)
    # the seed's layout: keys 1..M only, masks per module name
    raw_back = load_npy_dict(out)
    assert set(raw_back) >= {"strategy", "metric", "width_mask", "bias"} and 0 not in raw_back["strategy"]
    import json

    view = json.loads((tmp_path / "dp_selection_strategy.json").read_text())
    assert view["depths"][1]["kept_layers"] == [0, 1] and view["depths"][1]["score"] == 1.0
    md = (tmp_path / "dp_selection_strategy.md").read_text()
    assert "| 2 | 1 | 1 |" in md and "width 0.875" in md


def test_compressed_strategy_round_trips_and_is_checked_like_a_plain_one(tmp_path):
    """A name ending in .gz is the same file gzip-compressed: saved and loaded as the plain one (same arrays, views
    named as for .npy), the same bytes for the same strategy, code refused through the compression, and a cut or
    non-gzip file is one clear error naming it."""
    import gzip

    model = tiny_model("gqa", layers=3)
    s = load_strategy_from(random_strategy(model), tmp_path / "in.npy")
    plain = save_strategy(s, tmp_path / "plain.npy")
    packed = save_strategy(s, tmp_path / "packed.npy.gz")
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    assert (tmp_path / "packed.json").is_file() and (tmp_path / "packed.md").read_text().startswith("# packed.npy.gz")
    from amoeba.strategy import view_paths

    assert view_paths(packed) == view_paths(plain.with_name("packed.npy")) == (tmp_path / "packed.json",
                                                                                tmp_path / "packed.md")
    first = packed.read_bytes()
    save_strategy(s, packed)
    assert packed.read_bytes() == first  # no timestamp in the gzip header
    back = load_strategy(packed)
    assert back.depths() == s.depths() and back.widths() == s.widths()
    for name, d in s.bias.items():
        for r, a in (d or {}).items():
            np.testing.assert_array_equal(back.bias[name][r], a)
    # code inside a compressed file is refused as in a plain one
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    raw = tmp_path / "evil.npy"
    np.save(raw, {"strategy": {1: np.ones(3)}, "x": evil})
    (tmp_path / "evil.npy.gz").write_bytes(gzip.compress(raw.read_bytes()))
    with pytest.raises(UsageError, match="refusing"):
        load_strategy(tmp_path / "evil.npy.gz", "--shrinking_file")
    assert not marker.exists()
    cut = tmp_path / "cut.npy.gz"
    cut.write_bytes(first[: len(first) // 2])
    with pytest.raises(UsageError) as err:
        load_strategy(cut, "--shrinking_file")
    assert str(err.value).startswith("--shrinking_file") and "cut.npy.gz is not a whole gzip file" in str(err.value)
    notgz = tmp_path / "plain_named.npy.gz"
    notgz.write_bytes(plain.read_bytes())
    with pytest.raises(UsageError, match="not a whole gzip file"):
        load_strategy(notgz)


def load_strategy_from(raw: dict, path: Path) -> Strategy:
    np.save(path, raw)
    return load_strategy(path)


def test_loads_a_file_in_the_original_codes_layout(tmp_path):
    """PEFT-prefixed names, bool masks, float ratio keys 0.8/0.65/0.5, float64 depth masks, numpy scalars."""
    model = tiny_model("mha", layers=3)
    keys = {0.875: 0.8, 0.75: 0.65, 0.625: 0.5}
    raw = random_strategy(model, ratios=(0.875, 0.75, 0.625), prefix="base_model.model.", ratio_keys=keys)
    raw["metric"] = {m: np.float64(0.25 * m) for m in raw["strategy"]}
    path = tmp_path / "original.npy"
    np.save(path, raw)  # allow_pickle is np.save's default, as the original code relied on
    s = load_strategy(path)
    assert s.original_layout
    assert s.widths() == [0.5, 0.65, 0.8]
    assert s.layer_masks[0].tolist() == [1, 1, 1] and s.depths() == [1, 2, 3]
    assert s.metric[2] == 0.5
    assert "model.layers.0.self_attn.q_proj" in s.width_mask and s.width_mask["model.layers.0.self_attn.o_proj"] is None
    em = make_elastic(model)
    with pytest.raises(UsageError) as err:
        validate_strategy(s, em, (1.0, 0.875, 0.75, 0.625))
    msg = str(err.value)
    assert "0.875, 0.75, 0.625" in msg and "0.8, 0.65, 0.5" in msg and "original AmoebaLLM" in msg
    validate_strategy(s, em, (1.0, 0.8, 0.65, 0.5))


def test_depth_only_file_is_a_valid_strategy(tmp_path):
    n = 5
    final = {"strategy": {m: np.concatenate([np.ones(n - m - 1), np.zeros(m), np.ones(1)]) for m in (1, 2)},
             "metric": {1: 0.5, 2: 0.4}}
    s = load_strategy_from(final, tmp_path / "final_strategy.npy")
    assert not s.has_width and s.widths() == [] and s.depths() == [3, 4, 5] and s.num_layers == n


def test_width_only_files_are_pointed_to_the_merge(tmp_path):
    raw = random_strategy(tiny_model("gqa", layers=2))
    path = tmp_path / "width_mask.npy"
    np.save(path, raw["width_mask"])
    with pytest.raises(UsageError, match="merge_depth_width"):
        load_strategy(path)


def test_bad_depth_masks_are_reported(tmp_path):
    raw = {"strategy": {1: np.array([1, 1, 1.0]), 2: np.array([1, 0.5, 0])}, "metric": {}}
    with pytest.raises(UsageError) as err:
        load_strategy_from(raw, tmp_path / "bad.npy")
    assert "removes 0 layers, its key says 1" in str(err.value) and "layer mask 2 is not 0/1" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Validation against a model
# ----------------------------------------------------------------------------------------------
def test_validation_names_every_mismatch(tmp_path):
    other = random_strategy(tiny_model("gqa", layers=3, intermediate_size=80))
    s = load_strategy_from(other, tmp_path / "other.npy")
    em = make_elastic(tiny_model("gqa", layers=4))
    with pytest.raises(UsageError) as err:
        validate_strategy(s, em, (1.0, 0.5))
    msg = str(err.value)
    assert "3-layer model, this model has 4 layers" in msg
    assert "80 entries, the model's gate_proj has 96" in msg
    assert "width(s) 0.5, the file has 0.625, 0.75, 0.875, 1" in msg
    assert "other.npy" in msg


# ----------------------------------------------------------------------------------------------
# Applying widths to the elastic model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_apply_strategy_matches_masked_reference(kind, tokens, tmp_path):
    model = tiny_model(kind, layers=3)
    ref_model = copy.deepcopy(model)
    before = _logits(model, tokens)
    s = load_strategy_from(random_strategy(model, seed=3), tmp_path / "s.npy")
    em = make_elastic(model)
    ratios = (1.0, 0.875, 0.75, 0.625)
    apply_strategy(em, s, ratios)
    torch.testing.assert_close(_logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    for r in ratios[1:]:
        plan = em.width_plans[r]
        for i in range(3):
            assert plan.groups[i] == int(s.mask_of(i, "k_proj", r).sum()) // em.head_dim
            assert plan.channels[i] == int(s.mask_of(i, "gate_proj", r).sum())
            assert np.array_equal(em.group_kept_mask(i, plan.groups[i]).numpy(),
                                  s.mask_of(i, "k_proj", r).reshape(-1, em.head_dim)[:, 0] > 0.5)
            assert np.array_equal(em.channel_kept_mask(i, plan.channels[i]).numpy(), s.mask_of(i, "gate_proj", r) > 0.5)
        with em.use(Subnet(tuple(range(3)), r)):
            got = _logits(model, tokens)
        torch.testing.assert_close(got, masked_reference_logits(ref_model, s, r, tokens), atol=1e-5, rtol=1e-4)


def test_apply_strategy_uniform_reorders_without_plans(tokens, tmp_path):
    model = tiny_model("gqa", layers=2)
    before = _logits(model, tokens)
    s = load_strategy_from(random_strategy(model, seed=1), tmp_path / "s.npy")
    em = make_elastic(model)
    apply_strategy(em, s, (1.0, 0.75), nonuniform=False)
    assert em.width_plans == {}
    torch.testing.assert_close(_logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    # the most important units (kept at 0.75 in the file) come first
    for i in range(2):
        kept = s.mask_of(i, "gate_proj", 0.75) > 0.5
        first = em.state.channel_order[i][: int(kept.sum())].numpy()
        assert kept[first].all()


def test_apply_strategy_twice_keeps_the_file_order(tokens, tmp_path):
    """Orders are over original units, so applying onto an already reordered model still matches."""
    model = tiny_model("gqa", layers=2)
    ref_model = copy.deepcopy(model)
    s = load_strategy_from(random_strategy(model, seed=5), tmp_path / "s.npy")
    em = make_elastic(model)
    g = [torch.randperm(em.num_kv_groups) for _ in range(2)]
    c = [torch.randperm(em.intermediate_size) for _ in range(2)]
    em.reorder(g, c)
    apply_strategy(em, s, (1.0, 0.75))
    with em.use(Subnet((0, 1), 0.75)):
        got = _logits(model, tokens)
    torch.testing.assert_close(got, masked_reference_logits(ref_model, s, 0.75, tokens), atol=1e-5, rtol=1e-4)


def test_unit_order_does_not_depend_on_the_requested_widths(tokens, tmp_path):
    """Every --width_choice (even only 1) gives the same unit order, ranked by all of the file's widths, so a
    shape evaluated in runs that ask for different widths gets bit-identical results; a file whose other widths
    are not nested falls back to ranking by the requested ones."""
    model = tiny_model("gqa", layers=3)
    s = load_strategy_from(random_strategy(model, seed=7), tmp_path / "s.npy")
    runs = []
    for choice in ((1.0,), (1.0, 0.625), (1.0, 0.875, 0.75, 0.625)):
        m = copy.deepcopy(model)
        em = make_elastic(m)
        apply_strategy(em, s, choice)
        runs.append(([o.clone() for o in em.state.group_order], [o.clone() for o in em.state.channel_order],
                     _logits(m, tokens)))
        if 0.625 in choice:
            with em.use(Subnet((0, 1, 2), 0.625)):
                runs[-1] += (_logits(m, tokens),)
    for groups, channels, full, *rest in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(groups, runs[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(channels, runs[0][1]))
        assert torch.equal(full, runs[0][2])
    assert torch.equal(runs[1][3], runs[2][3])
    # the order is not the identity: it ranks the units kept at more widths first
    assert any(not torch.equal(o, torch.arange(len(o))) for o in runs[0][1])

    raw = random_strategy(model, ratios=(1.0, 0.75, 0.5), seed=2)
    name = module_name(0, "gate_proj")
    a = raw["width_mask"][name][0.75]
    b = np.zeros_like(a)
    b[np.flatnonzero(~a)[0]] = True  # 0.5 keeps a channel 0.75 drops: not nested with 0.75
    raw["width_mask"][name][0.5] = b
    raw["width_mask"][module_name(0, "up_proj")][0.5] = b
    s = load_strategy_from(raw, tmp_path / "n.npy")
    em = make_elastic(copy.deepcopy(model))
    apply_strategy(em, s, (1.0, 0.75))  # 0.75 alone is fine
    assert 0.75 in em.width_plans


def test_apply_strategy_refuses_non_nested_and_split_groups(tmp_path):
    model = tiny_model("gqa", layers=2)
    raw = random_strategy(model, ratios=(1.0, 0.75, 0.5))
    name = module_name(0, "gate_proj")
    a, b = raw["width_mask"][name][0.75].copy(), raw["width_mask"][name][0.5].copy()
    b[:] = False
    b[np.flatnonzero(~a)[0]] = True  # the narrower width keeps a channel the wider one drops
    raw["width_mask"][name][0.5] = b
    raw["width_mask"][module_name(0, "up_proj")][0.5] = b
    s = load_strategy_from(raw, tmp_path / "n.npy")
    with pytest.raises(UsageError, match="not nested"):
        apply_strategy(make_elastic(tiny_model("gqa", layers=2)), s, (1.0, 0.75, 0.5))
    raw = random_strategy(model, ratios=(1.0, 0.75))
    k = raw["width_mask"][module_name(1, "k_proj")][0.75]
    k[0] = not k[0]  # half a head
    s = load_strategy_from(raw, tmp_path / "h.npy")
    with pytest.raises(UsageError, match="whole heads"):
        apply_strategy(make_elastic(tiny_model("gqa", layers=2)), s, (1.0, 0.75))


def test_depth_only_strategy_leaves_width_alone(tmp_path):
    model = tiny_model("gqa", layers=3)
    s = load_strategy_from({"strategy": {1: np.array([1.0, 0, 1])}, "metric": {1: 2.0}}, tmp_path / "d.npy")
    em = make_elastic(model)
    apply_strategy(em, s, (1.0, 0.75))
    assert em.width_plans == {}
    with pytest.raises(UsageError, match="3-layer model, this model has 2"):
        apply_strategy(make_elastic(tiny_model("gqa", layers=2)), s, (1.0,))


# ----------------------------------------------------------------------------------------------
# utils/merge_depth_width.py
# ----------------------------------------------------------------------------------------------
def _run_merge(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "utils/merge_depth_width.py", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _merge_module():
    return load_script(ROOT / "utils" / "merge_depth_width.py")


def test_merge_script(tmp_path, capsys):
    merge = _merge_module()
    model = tiny_model("gqa", layers=3)
    raw = random_strategy(model)
    depth, wm, wb, out = (tmp_path / n for n in ("final_strategy.npy", "width_mask.npy", "width_bias.npy",
                                                  "merged.npy"))
    np.save(depth, {"strategy": raw["strategy"], "metric": raw["metric"]})
    np.save(wm, raw["width_mask"])
    out.write_bytes(b"previous result")
    code = merge.main(["--depth", str(depth), "--width_mask", str(tmp_path / "nope.npy"), "--width_bias", str(wb),
                       "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: --width_mask: no such file") and "nope.npy" in err
    assert out.read_bytes() == b"previous result"  # nothing overwritten
    np.save(wb, raw["bias"])
    # as the seed runs it: a script from the repository root
    res = _run_merge("--depth", depth, "--width_mask", wm, "--width_bias", wb, "--out", out)
    assert res.returncode == 0, res.stderr
    s = load_strategy(out)
    assert s.depths() == [1, 2, 3] and s.widths() == [0.625, 0.75, 0.875, 1.0]
    assert (tmp_path / "merged.json").is_file() and (tmp_path / "merged.md").is_file()
    # a width file from another model
    np.save(wm, random_strategy(tiny_model("gqa", layers=4))["width_mask"])
    code = merge.main(["--depth", str(depth), "--width_mask", str(wm), "--width_bias", str(wb), "--out", str(out)])
    assert code == 2 and "different models" in capsys.readouterr().err
    # a malicious width file
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    np.save(wb, {"model.layers.0.self_attn.o_proj": evil})
    np.save(wm, raw["width_mask"])
    code = merge.main(["--depth", str(depth), "--width_mask", str(wm), "--width_bias", str(wb), "--out", str(out)])
    assert code == 2 and "refusing" in capsys.readouterr().err and not evil.marker.exists()
    assert load_strategy(out).widths() == [0.625, 0.75, 0.875, 1.0]  # the earlier result is intact


def test_merge_script_takes_widths_from_a_merged_strategy(tmp_path, capsys):
    merge = _merge_module()
    model = tiny_model("gqa", layers=3)
    raw = random_strategy(model, seed=0)
    other = random_strategy(model, seed=5)  # other layer masks
    widths_src, depth, out = tmp_path / "merged.npy", tmp_path / "depth.npy", tmp_path / "new.npy"
    np.save(widths_src, raw)
    np.save(depth, {"strategy": other["strategy"], "metric": other["metric"]})
    assert merge.main(["--depth", str(depth), "--width_from", str(widths_src), "--out", str(out)]) == 0
    got, src, lay = load_strategy(out), load_strategy(widths_src), load_strategy(depth)
    assert got.widths() == src.widths()
    for m in got.layer_masks:
        np.testing.assert_array_equal(got.layer_masks[m], lay.layer_masks[m])
    for name, d in src.width_mask.items():
        for r, v in (d or {}).items():
            np.testing.assert_array_equal(got.width_mask[name][r], v)
    for name, d in src.bias.items():
        for r, v in (d or {}).items():
            np.testing.assert_array_equal(got.bias[name][r], v)
    capsys.readouterr()
    np.save(depth, {"strategy": random_strategy(tiny_model("gqa", layers=4))["strategy"]})
    assert merge.main(["--depth", str(depth), "--width_from", str(widths_src), "--out", str(out)]) == 2
    assert "--width_from" in capsys.readouterr().err


def test_merge_script_defaults_are_the_seeds_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _merge_module().main([]) == 2
    err = capsys.readouterr().err
    assert "--depth: no such file: output/calib_dp/final_strategy.npy" in err


# ----------------------------------------------------------------------------------------------
# Calibration records and portable views
# ----------------------------------------------------------------------------------------------
LAYER_RECORD = {"method": "dp", "dataset": "mmlu", "split": "validation", "metric": "acc", "higher_is_better": True,
                "num_calib_sample": 40, "batch_size": 8, "questions": 320, "shots": 5}


def test_calibration_record_round_trips_through_the_restricted_loader(tmp_path):
    import json

    model = tiny_model("gqa", layers=3)
    s = load_strategy_from(random_strategy(model), tmp_path / "in.npy")
    assert s.calibration == {}  # a file without a record (older ones, the original code's) still loads
    s.calibration = {"layers": dict(LAYER_RECORD), "widths": {"method": "flap", "calibration": "c4, 4 x 16 tokens"}}
    out = save_strategy(s, tmp_path / "dp_selection_strategy.npy")
    raw = load_npy_dict(out)  # the restricted unpickler admits the record: plain containers only
    assert raw["calibration"]["layers"] == LAYER_RECORD
    back = load_strategy(out)
    assert back.calibration == s.calibration
    view = json.loads((tmp_path / "dp_selection_strategy.json").read_text())
    assert view["calibration"] == s.calibration
    md = (tmp_path / "dp_selection_strategy.md").read_text()
    assert "- layers: method: dp; dataset: mmlu; split: validation; metric: acc;" in md
    # a record that is not plain data is refused with the file named
    bad = dict(raw, calibration={"layers": {"metric": np.arange(3)}})
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(UsageError, match="bad.npy.*'calibration'"):
        load_strategy(tmp_path / "bad.npy")


def test_views_record_no_machine_path(tmp_path, monkeypatch):
    import json

    from amoeba.strategy import portable_path

    model = tiny_model("gqa", layers=3)
    s = load_strategy_from(random_strategy(model), tmp_path / "in.npy")
    inside = tmp_path / "repo"
    (inside / "output" / "stage1").mkdir(parents=True)
    monkeypatch.chdir(inside)
    save_strategy(s, tmp_path / "elsewhere.npy")  # outside the working directory: the file name only
    assert json.loads((tmp_path / "elsewhere.json").read_text())["source"] == "elsewhere.npy"
    save_strategy(s, inside / "output" / "stage1" / "dp.npy")  # inside: relative to it
    assert json.loads((inside / "output" / "stage1" / "dp.json").read_text())["source"] == "output/stage1/dp.npy"
    assert portable_path("output/x.npy") == "output/x.npy" and portable_path(None) is None
    assert portable_path("/root/work/stage1/dp_selection_strategy.npy") == "dp_selection_strategy.npy"


def test_merge_carries_the_layer_and_width_calibration(tmp_path):
    import json

    merge = _merge_module()
    model = tiny_model("gqa", layers=3)
    raw = random_strategy(model)
    depth, wm, wb, out = (tmp_path / n for n in ("final_strategy.npy", "width_mask.npy", "width_bias.npy",
                                                  "merged.npy"))
    np.save(depth, {"strategy": raw["strategy"], "metric": raw["metric"], "calibration": {"layers": LAYER_RECORD}})
    np.save(wm, raw["width_mask"])
    np.save(wb, raw["bias"])
    (tmp_path / "width_summary.json").write_text(json.dumps({
        "method": "flap", "mode": "global", "bias": True, "calibration": "c4, 8 x 32 tokens", "num_tokens": 256,
        "info": {"head_dim": 8}, "widths": {}}))
    merged = merge.merge_depth_width(depth, wm, wb, out)
    want = {"layers": LAYER_RECORD, "widths": {"method": "flap", "mode": "global", "bias": True,
                                               "calibration": "c4, 8 x 32 tokens", "num_tokens": 256}}
    assert merged.calibration == want and load_strategy(out).calibration == want
    view = json.loads(out.with_suffix(".json").read_text())
    assert view["calibration"] == want and view["source"] == "merged.npy"
    # a width file with its own record: that one wins, and it is not taken for a module
    np.save(wm, {**raw["width_mask"], "calibration": {"method": "flap", "dataset": "c4", "sequences": 8}})
    assert merge.merge_depth_width(depth, wm, wb, out).calibration["widths"] == {"method": "flap", "dataset": "c4",
                                                                                 "sequences": 8}
    # other layers, same widths: the layers' record with the widths' record
    shortgpt = {"method": "shortgpt", "dataset": "c4", "metric": "block_influence"}
    np.save(depth, {"strategy": raw["strategy"], "metric": raw["metric"], "calibration": {"layers": shortgpt}})
    again = merge.replace_depth(depth, out, tmp_path / "other.npy")
    assert again.calibration == {"layers": shortgpt, "widths": {"method": "flap", "dataset": "c4", "sequences": 8}}
    # depth files without a record (older ones) merge as before, with no layer record
    np.save(depth, {"strategy": raw["strategy"], "metric": raw["metric"]})
    assert "layers" not in merge.merge_depth_width(depth, wm, wb, out).calibration


def test_shipped_strategy_names_no_machine_path_and_says_how_it_was_calibrated():
    import json

    from amoeba.strategy import describe_strategy

    shipped = load_strategy(ROOT / "dp_selection_strategy.npy")
    view = json.loads((ROOT / "dp_selection_strategy.json").read_text())
    assert not view["source"].startswith("/") and ":" not in view["source"]
    layers = shipped.calibration["layers"]
    assert (layers["dataset"], layers["metric"], layers["sequences"], layers["seqlen"]) == ("c4", "ppl", 32, 512)
    assert shipped.calibration["widths"]["method"] == "flap"
    # the view is the project's own rendering of the file
    summary = json.loads(json.dumps(describe_strategy(shipped)))
    summary["source"] = view["source"]
    assert view == summary
    assert "## Calibration" in (ROOT / "dp_selection_strategy.md").read_text()


def test_shipped_qwen_strategy_fits_qwen2_5_coder_1_5b_and_says_how_it_was_calibrated():
    """strategies/qwen2.5-coder-1.5b-instruct.npy.gz: the seed's Stage 1 on that model (layer DP by five-shot MMLU
    accuracy on 320 validation questions, FLAP widths on C4), for its 28 layers, 12 query / 2 KV heads and 8,960
    MLP channels; it validates against a model of that shape and its views are the project's rendering of it."""
    import json

    from amoeba.strategy import describe_strategy, validate_strategy, view_paths

    path = ROOT / "strategies" / "qwen2.5-coder-1.5b-instruct.npy.gz"
    shipped = load_strategy(path)
    assert shipped.num_layers == 28 and shipped.widths() == [0.625, 0.75, 0.875, 1.0]
    assert sorted(shipped.layer_masks) == list(range(11))  # 28 (none removed) down to 18 layers
    assert all(int(np.asarray(m).sum()) == 28 - k and np.asarray(m)[-1] == 1 for k, m in shipped.layer_masks.items())
    layers = shipped.calibration["layers"]
    assert (layers["dataset"], layers["split"], layers["metric"], layers["questions"], layers["shots"]) == \
        ("mmlu", "validation", "acc", 320, 5)
    assert shipped.calibration["widths"]["method"] == "flap"
    info = shipped.info
    assert (info["model_type"], info["num_heads"], info["num_kv_groups"], info["head_dim"],
            info["intermediate_size"]) == ("qwen2", 12, 2, 128, 8960)
    view = json.loads(view_paths(path)[0].read_text())
    summary = json.loads(json.dumps(describe_strategy(shipped)))
    summary["source"] = view["source"]
    assert view == summary and view["source"] == path.name
    # it fits a model of that shape (built without weights), and refuses SmolLM2's
    import torch
    from transformers import AutoModelForCausalLM

    from amoeba.elastic import make_elastic
    from tests.conftest import tiny_config

    with torch.device("meta"):
        shaped = AutoModelForCausalLM.from_config(tiny_config("qwen2", 28, hidden_size=1536, intermediate_size=8960,
                                                              num_attention_heads=12, num_key_value_heads=2))
        smol = AutoModelForCausalLM.from_config(tiny_config("gqa", 30, hidden_size=576, intermediate_size=1536,
                                                            num_attention_heads=9, num_key_value_heads=3))
    validate_strategy(shipped, make_elastic(shaped), (1.0, 0.875, 0.75, 0.625))
    with pytest.raises(UsageError, match="layers"):
        validate_strategy(shipped, make_elastic(smol), (1.0, 0.75))
