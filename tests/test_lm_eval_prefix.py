"""--lm_eval_prefix_cache: lm-eval's loglikelihood with each shared context run once equals HFLM's own
(fp32), request by request, on the whole model and on elastic subnets with MoE-LoRA adapters, and through the
evaluation's lm-eval tasks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from amoeba.elastic import make_elastic
from amoeba.subnet import Subnet
from conftest import attach_trained_moe, tiny_model

DATA = Path(os.environ["AMOEBA_DATA_DIR"])


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_model_dir))


def _requests(model, tokenizer):
    """Multiple-choice style requests: contexts of different lengths with 2-5 answers each (one answer a single
    token, one the model's own greedy continuation), one context asked once, one empty context."""
    from lm_eval.api.instance import Instance

    contexts = ["The cat sat on the", "Question: which of these is a fruit?\nAnswer:",
                "A long context about weather, rivers, mountains and the sea, told twice over: weather, rivers,"
                " mountains and the sea.", "Alone here:"]
    answers = [[" mat", " roof of the old house", " floor", " sofa by the window"],
               [" apple", " a stone", " the car", " a very small and round pear", " rice"],
               [" yes", " no"], [" only one answer here"]]
    ids = tokenizer(contexts[0], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    answers[0].append(tokenizer.decode(greedy))
    pairs = [(c, a) for c, group in zip(contexts, answers) for a in group] + [("", " standalone text")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]


@pytest.mark.parametrize("kind, subnet, moe", [("gqa", None, False), ("qwen2", ((0, 2), 0.75), True)])
def test_shared_contexts_give_hflm_loglikelihoods(tokenizer, kind, subnet, moe):
    from lm_eval.models.huggingface import HFLM

    from amoeba.lm_eval_prefix import context_sharing_hflm

    model = tiny_model(kind, layers=3, vocab_size=49152, max_position_embeddings=512)
    em = make_elastic(model)
    if moe:
        attach_trained_moe(model, em)
    shape = Subnet(*subnet) if subnet else em.full_subnet()
    with em.use(shape):
        requests = _requests(model, tokenizer)
        tokens = []
        hook = model.register_forward_pre_hook(  # HFLM passes the ids positionally, we by name
            lambda m, a, kw: tokens.append((kw["input_ids"] if "input_ids" in kw else a[0]).numel()), with_kwargs=True)
        plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).loglikelihood(requests, disable_tqdm=True)
        plain_tokens, tokens[:] = sum(tokens), []
        shared = context_sharing_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=3).loglikelihood(
            requests, disable_tqdm=True)
        hook.remove()
        one_batch = context_sharing_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=64).loglikelihood(
            requests, disable_tqdm=True)
    assert sum(tokens) < 0.9 * plain_tokens  # each shared context ran once (padding included)
    assert len(shared) == len(plain) == len(requests)
    for (lp, greedy), (lp_ref, greedy_ref), (lp_one, greedy_one) in zip(shared, plain, one_batch):
        assert lp == pytest.approx(lp_ref, abs=1e-4) and lp_one == pytest.approx(lp_ref, abs=1e-4)
        assert greedy == greedy_ref == greedy_one
    assert plain[4][1]  # the model's own continuation is its greedy one, and both say so
    assert len({round(lp, 3) for lp, _ in plain}) == len(plain)  # the answers really differ
    if subnet:  # the subnet is really another network here
        with em.use(em.full_subnet()):
            full = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).loglikelihood(requests[:2],
                                                                                             disable_tqdm=True)
        assert full[0][0] != pytest.approx(plain[0][0], abs=1e-3)


def test_the_evaluation_with_the_prefix_cache_gives_the_same_task_metrics(tokenizer, tmp_path):
    """Through the evaluation (main.py's lm-eval path), --lm_eval_prefix_cache changes no metric of ARC-Easy,
    PIQA and HellaSwag."""
    from amoeba.args import parse_args
    from amoeba.stages.evaluation import run_evaluation

    model = tiny_model("gqa", layers=3, vocab_size=49152, max_position_embeddings=512)
    em = make_elastic(model)
    got = []
    for cached in ("False", "True"):
        args = parse_args(["--output_dir", str(tmp_path / cached), "--do_train", "False", "--do_lm_eval", "True",
                           "--do_lm_eval_task", "arc_easy,piqa,hellaswag", "--lm_eval_limit", "6",
                           "--per_device_eval_batch_size", "4", "--lm_eval_prefix_cache", cached])
        got.append(run_evaluation(args, model, tokenizer, em, None))
    keys = [k for k in got[0] if k.split("_l")[0] in ("arc_easy_acc", "arc_easy_acc_norm", "piqa_acc",
                                                       "piqa_acc_norm", "hellaswag_acc", "hellaswag_acc_norm")]
    assert len(keys) == 6
    assert {k: got[1][k] for k in keys} == {k: got[0][k] for k in keys}
