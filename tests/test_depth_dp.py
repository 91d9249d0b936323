"""Layer selection by dynamic programming: the seed's table, the cached fast path, outputs, baselines."""

from __future__ import annotations

import copy
import itertools
import json
import os

import numpy as np
import pytest
import torch

from amoeba.depth_dp import (LayerDropScorer, MMLUMetric, PerplexityMetric, block_influence, first_layers_masks,
                             mmlu_batches, select_layers_dp, shortgpt_masks, text_batches)
from amoeba.errors import UsageError
from amoeba.stages.calibration import run_layer_calibration
from conftest import tiny_model


class CharTokenizer:
    """One id per character (ids < 128), enough for the tiny models' vocabulary."""

    bos_token = None
    pad_token_id = 0
    padding_side = "right"

    class _Enc(dict):
        @property
        def input_ids(self):
            return self["input_ids"]

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, **_):
        if isinstance(text, (list, tuple)):
            return self._Enc(input_ids=[self(t)["input_ids"] for t in text])
        return self._Enc(input_ids=[ord(c) % 128 for c in text])


def windows(n=6, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def seed_reference_dp(num_layers, min_layers, keep_last, score, higher):
    """The seed's loop, written out plainly (object table, scalar 0 where nothing was stored)."""
    n_cand = num_layers - keep_last if keep_last > 0 else num_layers
    m_max = num_layers - min_layers
    d = np.full((n_cand + 1, m_max + 1), -np.inf if higher else np.inf)
    strategy = np.zeros((n_cand + 1, m_max + 1), dtype=object)
    for i in range(n_cand + 1):
        strategy[i][0] = np.ones(n_cand)
    offset = np.ones(num_layers - n_cand)
    for n in range(1, n_cand + 1):
        for m in range(1, m_max + 1):
            if m <= n:
                new = strategy[n - 1][m - 1].copy()
                new[n_cand - n] = 0
                cur = score(np.concatenate([new, offset]))
                if (cur > d[n - 1][m]) if higher else (cur < d[n - 1][m]):
                    d[n][m], strategy[n][m] = cur, new
                else:
                    d[n][m], strategy[n][m] = d[n - 1][m], strategy[n - 1][m].copy()
    return ({m: np.concatenate([strategy[n_cand][m], offset]) for m in range(1, m_max + 1)},
            {m: d[n_cand][m] for m in range(1, m_max + 1)})


# ---------------------------------------------------------------- the DP on synthetic scores
@pytest.mark.parametrize("keep_last", [-1, 1, 2])
def test_dp_finds_the_optimum_of_an_additive_score(keep_last):
    rng = np.random.default_rng(7)
    num_layers, min_layers = 10, 4
    cost = rng.random(num_layers)  # loss added by removing each layer

    def score(mask):
        return float(cost[mask < 0.5].sum())

    res = select_layers_dp(num_layers, min_layers, keep_last, score, higher_is_better=False, progress=False)
    removable = num_layers - max(keep_last, 0)
    for m in range(1, num_layers - min_layers + 1):
        best = min(itertools.combinations(range(removable), m), key=lambda c: cost[list(c)].sum())
        removed = set(np.flatnonzero(res.final["strategy"][m] < 0.5))
        assert removed == set(best)
        assert res.final["metric"][m] == pytest.approx(cost[list(best)].sum())
        assert res.final["strategy"][m].shape == (num_layers,)
        if keep_last > 0:
            assert np.all(res.final["strategy"][m][-keep_last:] == 1)


def test_dp_higher_is_better_and_matches_the_seed_loop():
    rng = np.random.default_rng(3)
    gain = rng.random(9)
    pair = rng.random((9, 9))

    def score(mask):  # not additive: pairwise interactions, so greedy and DP choices matter
        kept = np.flatnonzero(mask > 0.5)
        return float(gain[kept].sum() + pair[np.ix_(kept, kept)].sum() * 0.1)

    for higher in (True, False):
        res = select_layers_dp(9, 3, 1, score, higher_is_better=higher, progress=False)
        masks, metric = seed_reference_dp(9, 3, 1, score, higher)
        assert set(res.final["strategy"]) == set(masks) == set(range(1, 7))
        for m in masks:
            np.testing.assert_array_equal(res.final["strategy"][m], masks[m])
            assert res.final["metric"][m] == metric[m]
    assert res.evaluations == sum(min(n, 6) for n in range(1, 9))
    assert res.strategy.shape == (9, 7, 9) and res.metric.shape == (9, 7)


def test_bad_sizes_are_usage_errors():
    def score(mask):
        return 0.0

    with pytest.raises(UsageError, match="--min_num_layer"):
        select_layers_dp(6, 6, -1, score, False)
    with pytest.raises(UsageError, match="--dp_keep_last_layer"):
        select_layers_dp(6, 2, 6, score, False)
    with pytest.raises(UsageError, match="--min_num_layer"):  # 5 to remove, only 3 removable
        select_layers_dp(6, 1, 3, score, False)


# ---------------------------------------------------------------- cached == naive on real forwards
@pytest.mark.parametrize("kind", ["gqa", "qwen3", "qwen2"])
def test_cached_dp_equals_naive_dp(kind):
    model = tiny_model(kind, layers=6)
    batches = text_batches(windows(6, 16), 4)  # 4 + 2: uneven batches
    results = []
    for naive in (True, False):
        scorer = LayerDropScorer(model, batches, PerplexityMetric(model.get_output_embeddings()), naive=naive,
                                 progress=False)
        results.append((select_layers_dp(6, 2, 1, scorer.score, False, progress=False), scorer.layer_calls))
    (slow, slow_calls), (fast, fast_calls) = results
    np.testing.assert_array_equal(slow.strategy, fast.strategy)
    finite = np.isfinite(slow.metric)
    np.testing.assert_array_equal(finite, np.isfinite(fast.metric))
    np.testing.assert_allclose(slow.metric[finite], fast.metric[finite], rtol=1e-6, atol=0)
    assert fast_calls < 0.75 * slow_calls  # fewer decoder-layer forwards
    for m, mask in fast.final["strategy"].items():
        assert mask[-1] == 1 and mask.sum() == 6 - m


def test_cached_scores_any_mask_like_the_full_model():
    model = tiny_model("gqa", layers=5)
    batches = text_batches(windows(3, 12), 2)
    metric = PerplexityMetric(model.get_output_embeddings())
    fast = LayerDropScorer(model, batches, metric, progress=False)
    slow = LayerDropScorer(model, batches, metric, naive=True, progress=False)
    for mask in ([1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 0, 0, 0, 1]):
        mask = np.array(mask, dtype=float)
        assert fast.score(mask) == pytest.approx(slow.score(mask), rel=1e-6)
    # skipping layers equals deleting them from a plain copy of the model (same seed, same weights)
    from amoeba.text_data import perplexity

    plain = tiny_model("gqa", layers=5)
    plain.model.layers = torch.nn.ModuleList([plain.model.layers[i] for i in (0, 1, 3)])
    plain.config.num_hidden_layers = 3
    for pos, layer in enumerate(plain.model.layers):
        layer.self_attn.layer_idx = pos
    ids = torch.cat([b["input_ids"] for b in batches])
    assert fast.score(np.array([1, 1, 0, 1, 0.0])) == pytest.approx(perplexity(plain, ids, 2), rel=1e-5)


def test_mmlu_metric_cached_equals_naive_and_matches_score_mmlu():
    from amoeba.mmlu import MMLUExample, answer_token_ids, score_mmlu

    model = tiny_model("gqa", layers=4)
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    examples = [MMLUExample(subject=f"s{i % 3}", prompt="Q" + "xyz"[i % 3] * (5 + i) + "\nAnswer:",
                            answer=int(rng.integers(4))) for i in range(7)]
    letters = answer_token_ids(tok)
    for kind in ("acc", "letter_loss"):
        metric = MMLUMetric(model.get_output_embeddings(), letters, examples, kind=kind)
        batches = mmlu_batches(tok, examples, 3, 64)
        fast = LayerDropScorer(model, batches, metric, progress=False)
        slow = LayerDropScorer(model, batches, metric, naive=True, progress=False)
        reference = score_mmlu(model, tok, examples, batch_size=2, max_len=64, progress=False)
        full = fast.score(np.ones(4))
        assert full == pytest.approx(reference["loss" if kind == "letter_loss" else "accuracy"], abs=1e-5)
        for mask in ([1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]):
            mask = np.array(mask, dtype=float)
            assert fast.score(mask) == pytest.approx(slow.score(mask), abs=1e-6)
        assert metric.higher_is_better is (kind == "acc")


class EosCharTokenizer(CharTokenizer):
    """CharTokenizer with an end-of-sequence token (id 3), as the original code's MMLU targets need."""

    eos_token = "\x03"
    eos_token_id = 3


def _drop_layers(model, keep):
    """A plain copy of ``model`` that has only the decoder layers ``keep`` (the reference for a subnet)."""
    plain = copy.deepcopy(model)
    plain.model.layers = torch.nn.ModuleList([plain.model.layers[i] for i in keep])
    plain.config.num_hidden_layers = len(keep)
    for pos, layer in enumerate(plain.model.layers):
        layer.self_attn.layer_idx = pos
    return plain


def _original_mmlu_loss(model, tok, examples, batch_size):
    """The original code's ``mmlu_loss``, computed its way: batches of ``batch_size`` consecutive questions,
    each row = prompt + answer letter + EOS with labels on the last two tokens only (right padding),
    transformers' own loss per batch (mean over the batch's label tokens), averaged over the batches."""
    from amoeba.mmlu import answer_token_ids

    letters = answer_token_ids(tok)
    losses = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = []
            for e in examples[start: start + batch_size]:
                prompt = tok(e.prompt)["input_ids"]
                rows.append((prompt + [letters[e.answer], tok.eos_token_id], len(prompt)))
            width = max(len(ids) for ids, _ in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for r, (seq, n_prompt) in enumerate(rows):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                labels[r, n_prompt: len(seq)] = torch.tensor(seq[n_prompt:])
            losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_mmlu_loss_is_the_original_codes_language_model_loss():
    """``--calib_metric loss``: the full-vocabulary cross entropy on the answer letter and EOS, averaged per
    batch of --per_device_eval_batch_size questions, then over batches: equal to transformers' loss on the
    original code's batches, for the full model and for subnets, whatever batches the scorer runs."""
    from amoeba.mmlu import MMLUExample, answer_target_ids, answer_token_ids

    model = tiny_model("gqa", layers=4)
    tok = EosCharTokenizer()
    rng = np.random.default_rng(3)
    examples = [MMLUExample(subject=f"s{i % 3}", prompt="Q" + "xyz"[i % 3] * (4 + 3 * i % 11) + "\nAnswer:",
                            answer=int(rng.integers(4))) for i in range(7)]  # batches of 3: 3 + 3 + 1
    letters = answer_token_ids(tok)
    targets = [answer_target_ids(tok, e.answer, letters) for e in examples]
    assert all(t == [letters[e.answer], 3] for t, e in zip(targets, examples))
    metric = MMLUMetric(model.get_output_embeddings(), letters, examples, kind="loss", batch_size=3,
                        targets=targets)
    assert not metric.higher_is_better
    batches = mmlu_batches(tok, examples, 2, 64, targets=targets)  # compute batches differ from the 3s
    fast = LayerDropScorer(model, batches, metric, progress=False)
    slow = LayerDropScorer(model, batches, metric, naive=True, progress=False)
    assert fast.score(np.ones(4)) == pytest.approx(_original_mmlu_loss(model, tok, examples, 3), rel=1e-5)
    for keep in ((0, 1, 3), (1, 2), (0, 3)):
        mask = np.array([1.0 if i in keep else 0.0 for i in range(4)])
        want = _original_mmlu_loss(_drop_layers(model, keep), tok, examples, 3)
        assert fast.score(mask) == pytest.approx(want, rel=1e-5)
        assert slow.score(mask) == pytest.approx(want, rel=1e-5)
    # the per-batch mean is not the mean over questions: a last, smaller batch weighs as much as a full one
    per_question = _original_mmlu_loss(model, tok, examples, 1)
    assert fast.score(np.ones(4)) != pytest.approx(per_question, rel=1e-6)
    # and it is not the four-letter loss
    letter = MMLUMetric(model.get_output_embeddings(), letters, examples, kind="letter_loss")
    assert LayerDropScorer(model, mmlu_batches(tok, examples, 2, 64), letter, progress=False).score(np.ones(4)) \
        != pytest.approx(fast.score(np.ones(4)), rel=1e-3)


# ---------------------------------------------------------------- the stage: flags, files, errors
def _args(tmp_path, *extra):
    from amoeba.args import parse_args

    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        rng = np.random.default_rng(1)
        rows = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, 400)) for _ in range(5)]
        corpus.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return parse_args(["--output_dir", str(tmp_path / "out"), "--do_train", "False", "--layer_calib_dp",
                       "--calib_dataset", str(corpus), "--num_calib_sample", "3", "--calib_seqlen", "16",
                       "--calib_batch_size", "2", *extra])


def test_run_layer_calibration_writes_the_seed_files(tmp_path):
    from amoeba.strategy import load_strategy

    model = tiny_model("gqa", layers=6)
    args = _args(tmp_path, "--min_num_layer", "3", "--dp_keep_last_layer", "1")
    res = run_layer_calibration(args, model, CharTokenizer(), progress=False)
    out = tmp_path / "out"
    strategy = np.load(out / "full_strategy.npy")  # plain numeric arrays: no pickle needed
    metric = np.load(out / "metric.npy")
    assert strategy.dtype.kind == "f" and strategy.shape == (6, 4, 6)
    assert metric.dtype.kind == "f" and metric.shape == (6, 4)
    np.testing.assert_array_equal(strategy[5, 3], res.final["strategy"][3])
    loaded = load_strategy(out / "final_strategy.npy")  # the project's safe loader reads the seed layout
    assert sorted(loaded.layer_masks) == [0, 1, 2, 3]  # the loader adds 0 (nothing removed)
    for m in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(loaded.layer_masks[m], dtype=float), res.final["strategy"][m])
    table = json.loads((out / "dp_table.json").read_text())
    assert [r["num_layers"] for r in table["depths"]] == [5, 4, 3]
    assert table["metric"] == "ppl" and table["mode"] == "cached"
    assert "| layers |" in (out / "dp_table.md").read_text()
    # same flags, naive path: same answer
    naive = run_layer_calibration(_args(tmp_path, "--min_num_layer", "3", "--dp_keep_last_layer", "1",
                                        "--output_dir", str(tmp_path / "naive")),
                                  model, CharTokenizer(), naive=True, progress=False)
    for m in (1, 2, 3):
        np.testing.assert_array_equal(naive.final["strategy"][m], res.final["strategy"][m])
        assert naive.final["metric"][m] == pytest.approx(res.final["metric"][m], rel=1e-6)


def test_bad_input_leaves_earlier_results_intact(tmp_path):
    model = tiny_model("gqa", layers=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "final_strategy.npy").write_bytes(b"earlier result")
    with pytest.raises(UsageError, match="--min_num_layer"):
        run_layer_calibration(_args(tmp_path, "--min_num_layer", "4"), model, CharTokenizer(), progress=False)
    args = _args(tmp_path, "--min_num_layer", "2")
    args.calibration.calib_dataset = "redpajama"
    with pytest.raises(UsageError) as err:
        run_layer_calibration(args, model, CharTokenizer(), progress=False)
    assert "--calib_dataset" in str(err.value) and "mmlu" in str(err.value) and "c4" in str(err.value)
    args = _args(tmp_path, "--min_num_layer", "2", "--calib_metric", "acc")
    with pytest.raises(UsageError, match="--calib_metric"):
        run_layer_calibration(args, model, CharTokenizer(), progress=False)
    assert (out / "final_strategy.npy").read_bytes() == b"earlier result"


# ---------------------------------------------------------------- baselines
def test_block_influence_matches_hidden_states_and_detects_identity_layers():
    model = tiny_model("gqa", layers=4)
    with torch.no_grad():  # layer 2 becomes the identity: both residual branches write zero
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = windows(3, 10)
    bi = block_influence(model, ids, batch_size=2)
    assert bi.shape == (4,)
    assert bi[2] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(3):  # hidden_states[i] is layer i's input; the last entry is after the final norm
        cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
        assert bi[i] == pytest.approx(1 - cos.mean().item(), abs=1e-5)


def test_shortgpt_and_first_layers_masks():
    bi = np.array([0.9, 0.1, 0.5, 0.05, 0.3, 0.01])
    masks = shortgpt_masks(bi, min_layers=3)
    assert sorted(masks) == [1, 2, 3]
    assert list(np.flatnonzero(masks[1] == 0)) == [5]
    assert list(np.flatnonzero(masks[3] == 0)) == [1, 3, 5]
    kept_last = shortgpt_masks(bi, min_layers=3, keep_last=1)
    assert all(m[-1] == 1 for m in kept_last.values())
    assert list(np.flatnonzero(kept_last[2] == 0)) == [1, 3]
    first = first_layers_masks(6, 4)
    np.testing.assert_array_equal(first[2], [1, 1, 1, 1, 0, 0])


def test_shortgpt_selection_writes_a_strategy_of_lowest_influence_layers(tmp_path):
    from amoeba.strategy import load_strategy
    from amoeba.text_data import load_text, token_windows

    model = tiny_model("gqa", layers=6)
    with torch.no_grad():  # layer 3 becomes the identity: the least influential, dropped first
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    args = _args(tmp_path, "--min_num_layer", "3", "--layer_select_method", "shortgpt", "--dp_keep_last_layer", "1")
    final = run_layer_calibration(args, model, CharTokenizer(), progress=False)
    out = tmp_path / "out"
    info = json.loads((out / "block_influence.json").read_text())
    text = load_text(args.calibration.calib_dataset, split="train", data_dir=None)
    ids = token_windows(CharTokenizer(), text, 16, n=3, seed=args.train.seed)
    np.testing.assert_allclose(info["block_influence"], block_influence(model, ids, 2), rtol=1e-6, atol=1e-9)
    bi = np.array(info["block_influence"])
    loaded = load_strategy(out / "final_strategy.npy")
    assert sorted(loaded.layer_masks) == [0, 1, 2, 3]
    assert list(np.flatnonzero(np.asarray(loaded.layer_masks[1]) < 0.5)) == [3]
    for m in (1, 2, 3):  # the m removed layers are the m lowest of the first five (the last is kept)
        removed = set(np.flatnonzero(np.asarray(loaded.layer_masks[m]) < 0.5))
        assert removed == set(np.argsort(bi[:5], kind="stable")[:m])
        assert final["metric"][m] == pytest.approx(bi[sorted(removed)].sum())
    bad = _args(tmp_path, "--min_num_layer", "3", "--layer_select_method", "magic")
    with pytest.raises(UsageError, match="--layer_select_method"):
        run_layer_calibration(bad, model, CharTokenizer(), progress=False)


@pytest.mark.real_model
def test_cached_equals_naive_on_smollm2(real_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49000, (2, 24), generator=torch.Generator().manual_seed(0))
    metric = PerplexityMetric(model.get_output_embeddings())
    fast = LayerDropScorer(model, text_batches(ids, 2), metric, progress=False)
    slow = LayerDropScorer(model, text_batches(ids, 2), metric, naive=True, progress=False)
    for removed in ([28], [20, 28], [5, 17, 25]):
        mask = np.ones(30)
        mask[removed] = 0
        assert fast.score(mask) == pytest.approx(slow.score(mask), rel=1e-6)


# ---------------------------------------------------------------- MMLU calibration as the original code takes it
def test_mmlu_calibration_takes_num_calib_sample_batches_of_questions_in_order():
    """The seed's Step 1 (--num_calib_sample 40, batches of 8): the first 320 validation questions, in the
    original code's order (subject by subject), not a sample; --max_mmlu_samples takes precedence, as there."""
    from amoeba.depth_dp import mmlu_calibration_examples
    from amoeba.mmlu import load_mmlu

    pool = load_mmlu("eval", 0, os.environ["AMOEBA_DATA_DIR"])  # the order of the seed's zero_shot_mmlu_val.json
    seed = mmlu_calibration_examples(pool, 40, 8)
    assert len(seed) == 320 and seed == pool[:320]
    subjects = list(dict.fromkeys(e.subject for e in seed))
    assert subjects[:3] == ["abstract_algebra", "anatomy", "astronomy"] and subjects == sorted(subjects)
    assert mmlu_calibration_examples(pool, 5, 4) == pool[:20]
    assert mmlu_calibration_examples(pool, 40, 8, max_samples=12) == pool[:12]
    assert mmlu_calibration_examples(pool[:30], 40, 8) == pool[:30]  # a short split: all of it
    with pytest.raises(UsageError, match="--per_device_eval_batch_size"):
        mmlu_calibration_examples(pool, 40, 0)


def test_mmlu_layer_dp_records_its_calibration_in_the_strategy_file(tmp_path):
    """--calib_dataset mmlu --num_calib_sample 2 --per_device_eval_batch_size 4: the DP scores the first 8
    validation questions with the original code's loss, and final_strategy.npy (read by the restricted
    loader) and dp_table.json/.md say so."""
    from amoeba.mmlu import load_mmlu
    from amoeba.npy import load_npy_dict
    from amoeba.strategy import load_strategy

    model = tiny_model("gqa", layers=4, max_position_embeddings=128)
    args = _args(tmp_path, "--calib_dataset", "mmlu", "--mmlu_dataset", "mmlu-zs", "--num_calib_sample", "2",
                 "--per_device_eval_batch_size", "4", "--calib_metric", "loss", "--mmlu_source_max_len", "40",
                 "--min_num_layer", "3")
    tok = EosCharTokenizer()
    res = run_layer_calibration(args, model, tok, progress=False)
    first = load_mmlu("eval", 0, os.environ["AMOEBA_DATA_DIR"])[:8]
    # one layer removed: the best single removal by the original loss of those 8 questions, 2 batches of 4
    short = [type(e)(e.subject, e.prompt[-40:], e.answer) for e in first]  # CharTokenizer: 1 token a char
    losses = [_original_mmlu_loss(_drop_layers(model, [j for j in range(4) if j != i]), tok, short, 4)
              for i in range(4)]
    assert res.final["metric"][1] == pytest.approx(min(losses), rel=1e-5)
    assert res.kept_layers(1) == [j for j in range(4) if j != int(np.argmin(losses))]
    record = {"method": "dp", "dataset": "mmlu", "split": "validation", "metric": "loss", "higher_is_better": False,
              "num_calib_sample": 2, "batch_size": 4, "questions": 8, "shots": 0}
    out = tmp_path / "out"
    assert load_npy_dict(out / "final_strategy.npy")["calibration"] == {"layers": record}
    assert load_strategy(out / "final_strategy.npy").calibration == {"layers": record}
    assert json.loads((out / "dp_table.json").read_text())["calibration"] == record
    assert "Calibration: method: dp; dataset: mmlu; split: validation; metric: loss;" in \
        (out / "dp_table.md").read_text()


def test_text_layer_dp_record_names_no_machine_path(tmp_path):
    from amoeba.strategy import load_strategy

    model = tiny_model("gqa", layers=4)
    run_layer_calibration(_args(tmp_path, "--min_num_layer", "3"), model, CharTokenizer(), progress=False)
    out = tmp_path / "out"
    record = load_strategy(out / "final_strategy.npy").calibration["layers"]
    assert record == {"method": "dp", "dataset": "corpus.jsonl", "split": None, "metric": "ppl",
                      "higher_is_better": False, "num_calib_sample": 3, "sequences": 3, "seqlen": 16, "seed": 42}
    assert str(tmp_path) not in (out / "dp_table.json").read_text()


def test_calibration_flags_are_checked():
    from amoeba.args import parse_args

    for flags, flag in ((["--calib_metric", "bogus"], "--calib_metric"), (["--mmlu_split", "train"], "--mmlu_split"),
                        (["--calib_mmlu_split", "train"], "--calib_mmlu_split")):
        with pytest.raises(UsageError) as err:
            parse_args(["--do_train", "False", *flags])
        assert str(err.value).startswith(flag) and "\n" not in str(err.value)
    from amoeba.depth_dp import calibration_metric_name

    assert calibration_metric_name("mmlu", "letter_loss") == "letter_loss"
    assert calibration_metric_name("mmlu", "loss") == "loss"
    with pytest.raises(UsageError, match="--calib_metric"):
        calibration_metric_name("c4", "letter_loss")
    with pytest.raises(UsageError, match="--calib_metric"):
        calibration_metric_name("mmlu", "ppl")
