"""lm-eval's loglikelihood with each context run once (``--lm_eval_prefix_cache``).

A multiple-choice task asks for the likelihood of every answer after the same context: HellaSwag's four endings,
ARC's three to five answers, PIQA's two solutions. lm-eval's ``HFLM`` runs context and answer together for each
of them, so most of its tokens are the same contexts again. :func:`context_sharing_hflm` gives the ``HFLM``
subclass (with :class:`ContextSharing`'s methods) that implements the
tokenized-request hook every lm-eval model backend implements (``_loglikelihood_tokens``) so that a batch of
distinct contexts runs once, keeping their KV cache, and then their answers run on that cache, a batch at a time. The
numbers are the same computation (equal up to rounding; tested against ``HFLM`` in fp32), with the log-softmax in
``HFLM``'s precision.

Requests whose context no other request shares, or that are longer than the model's window (``HFLM`` cuts those
from the left), go through ``HFLM``'s own path unchanged.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)


def context_batches(contexts: list[tuple[int, ...]], longest: dict[tuple[int, ...], int],
                    batch_size: int) -> list[list[tuple[int, ...]]]:
    """Contexts in batches of ``batch_size``, longest context + answer first (so a batch's padding is small)."""
    order = sorted(contexts, key=lambda c: (-(len(c) + longest[c]), c))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@functools.cache
def context_sharing_hflm() -> type:
    """lm-eval's ``HFLM`` with :class:`ContextSharing`'s loglikelihood (built on first use)."""
    from lm_eval.models.huggingface import HFLM  # deferred: lm-eval is slow to import

    return type("ContextSharingHFLM", (ContextSharing, HFLM), {"__doc__": ContextSharing.__doc__})


class ContextSharing:
    """The methods that make an ``HFLM`` run each shared context once (see the module docstring); combined with
    ``HFLM`` by :func:`context_sharing_hflm`."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        if self.backend != "causal" or not isinstance(self.batch_size, int):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        rows: dict[tuple[int, ...], list[int]] = {}
        plain = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) > self.max_length + 1:  # HFLM truncates these from the left
                plain.append(i)
            else:
                rows.setdefault(tuple(ctx), []).append(i)
        for ctx in [c for c, idx in rows.items() if len(idx) == 1]:  # nothing to share
            plain.extend(rows.pop(ctx))
        results: list = [None] * len(requests)
        if plain:
            answers = super()._loglikelihood_tokens([requests[i] for i in plain], disable_tqdm=disable_tqdm,
                                                    override_bs=override_bs)
            for i, answer in zip(plain, answers):
                results[i] = answer
        longest = {c: max(len(requests[i][2]) for i in idx) for c, idx in rows.items()}
        size = max(1, int(override_bs or self.batch_size))
        batches = context_batches(list(rows), longest, size)
        with tqdm(total=sum(len(v) for v in rows.values()), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (contexts once)") as bar:
            for batch in batches:
                members = [(g, i) for g, ctx in enumerate(batch) for i in rows[ctx]]
                for (g, i), answer in zip(members, self._score_batch(batch, [requests[i][2] for _, i in members],
                                                                     [g for g, _ in members], size)):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        return results

    @torch.no_grad()
    def _score_batch(self, contexts: list[tuple[int, ...]], conts: list[list[int]], owner: list[int],
                     rows: int) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each answer ``conts[k]`` after context ``contexts[owner[k]]``: the contexts
        in one forward that keeps their KV cache, then the answers ``rows`` at a time on (a copy of) it."""
        dev = self.device
        width = max(len(c) for c in contexts)
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)
        for g, ctx in enumerate(contexts):
            ids[g, :len(ctx)] = torch.tensor(ctx)
            mask[g, :len(ctx)] = 1
        last = torch.tensor([len(c) - 1 for c in contexts])
        keep = torch.unique(last)  # only the logits that are read: each context's last position
        autocast = dict(device_type=dev.type, dtype=self.mixed_precision_dtype,
                        enabled=self.mixed_precision_dtype is not None)
        with torch.autocast(**autocast):
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=keep.to(dev),
                             use_cache=True)
        col = torch.searchsorted(keep, last).to(out.logits.device)
        first = F.log_softmax(out.logits[torch.arange(len(contexts), device=col.device), col], dim=-1,
                              dtype=self.softmax_dtype)  # [contexts, vocab]: each answer's first token
        answers = []
        chunks = [list(range(k, min(k + rows, len(conts)))) for k in range(0, len(conts), rows)]
        for part in chunks:
            tails = [conts[k][:-1] for k in part]  # the answer's own tokens that predict its next ones
            span = max(len(t) for t in tails)
            rest = None
            if span:
                # the model extends the cache it is given: each chunk gets its own copy, rows picked per answer
                cache = out.past_key_values if len(chunks) == 1 else copy.deepcopy(out.past_key_values)
                owners = torch.tensor([owner[k] for k in part])
                cache.batch_select_indices(owners.to(dev))
                tail_ids = torch.zeros(len(part), span, dtype=torch.long)
                tail_mask = torch.zeros(len(part), span, dtype=torch.long)
                for r, t in enumerate(tails):
                    tail_ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
                    tail_mask[r, :len(t)] = 1
                # the context's padding stays masked; positions continue each context's own length
                full_mask = torch.cat([mask[owners], tail_mask], dim=1)
                positions = (last[owners] + 1).unsqueeze(1) + torch.arange(span).unsqueeze(0)
                with torch.autocast(**autocast):
                    logits = self.model(input_ids=tail_ids.to(dev), attention_mask=full_mask.to(dev),
                                        position_ids=positions.to(dev), past_key_values=cache, use_cache=True).logits
                rest = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # [answers, span, vocab]
            for r, k in enumerate(part):
                cont = conts[k]
                logp = first[owner[k]].unsqueeze(0)
                if len(cont) > 1:
                    logp = torch.cat([logp, rest[r, :len(cont) - 1].to(logp.device)], dim=0)
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                greedy = bool((logp.argmax(dim=-1) == target).all())
                answers.append((float(logp.gather(1, target.unsqueeze(1)).sum()), greedy))
        return answers
