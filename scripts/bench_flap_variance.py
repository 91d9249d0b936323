"""Benchmark: FLAP width selection with the exact variance (ours) against FLAP's running-variance recurrence.

Our FLAP (``amoeba.flap.collect_input_stats``) measures each ``o_proj``/``down_proj`` input feature's variance
exactly: the unbiased variance over every calibration token. FLAP's ``BiasGPT.add_batch`` (which the
original AmoebaLLM code runs, once per calibration sequence, so its ``nsamples`` counts sequences) keeps a
running mean ``mu`` and a running "fluctuation" ``F`` instead. After sequence ``k`` (tokens ``x_t``):

    mu_k = mu_{k-1} (k-1)/k + mean_t(x_t) / k
    F_1  = 0                                   (the first sequence adds nothing)
    F_k  = F_{k-1} (k-2)/(k-1) + sum_t (x_t - mu_k)^2 / k

The product in the last line is of deviations from the *updated* mean ``mu_k`` twice: the code's
``old_baseline_inp`` (by its name, the previous mean) is the same tensor that the in-place update then
overwrites. This script implements that recurrence as the code executes it, in float64, fed one
sequence at a time by forward hooks on every layer's ``o_proj``/``down_proj`` inputs during ordinary
full-model forwards. Its running mean equals the exact mean (all windows have the same length), so only
the variance differs.

Both variances are then scored by ``amoeba.flap.wifv_scores``, the rule ``flap_scores`` uses (WIFV: variance
times the squared norm of the weight column, squared for attention; standardised per layer and module; a KV
group scores the mean of its features; checked against ``flap_scores`` itself), and both rankings go through
``amoeba.flap.select_widths`` (global mode, ``unit_costs``). Reported per width: KV groups and MLP channels
kept by one selection and not the other (count and fraction of all such units).

Also compared, on our scores: our exact unit costs (a KV group weighs head_dim x hidden x (2 x queries + 2)
parameters, a channel 3 x hidden) against the original's compression weights taken literally (an integer
tensor of ones with 512/3 assigned to attention units, i.e. 170, per channel 1). With ``--eval_windows`` > 0,
each selection's subnets (FLAP bias compensation on, our means) are scored by WikiText-2 test perplexity on
the first windows of the split.

    python scripts/bench_flap_variance.py --data_dir ../shared/data --out output/bench_flap_variance.json
    python scripts/bench_flap_variance.py --windows 8 --seqlen 64 --eval_windows 0 --out /tmp/v.json  # quick

Prints a markdown table and writes every number to ``--out`` (json).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoeba.args import parse_ratio_list  # noqa: E402
from amoeba.files import write_json  # noqa: E402
from amoeba.flap import (RunningStats, compensation_biases, flap_scores, select_widths, unit_costs,  # noqa: E402
                         width_dicts, wifv_scores)
from amoeba.subnet import width_key  # noqa: E402
from amoeba.text_data import load_text, perplexity, token_windows  # noqa: E402

logger = logging.getLogger("bench_flap_variance")

ROOT = Path(__file__).resolve().parents[1]
# The original code's compression weights, literally: torch.ones_like(indices) (int64) with 512.0 / 3
# assigned to the attention units, which truncates to 170; an MLP channel weighs 1.
ORIGINAL_UNIT_WEIGHTS = (int(512.0 / 3), 1)


def parse(argv=None) -> argparse.Namespace:
    """Command-line options (defaults: SmolLM2-135M-Instruct, 64 C4 windows of 256 tokens, seed 42)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="model folder")
    p.add_argument("--data_dir", default=None, help="offline data directory (default: $AMOEBA_DATA_DIR)")
    p.add_argument("--out", default="output/bench_flap_variance.json", help="json file for the results")
    p.add_argument("--calib_dataset", default="c4", help="calibration corpus (its calibration split)")
    p.add_argument("--windows", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=42, help="seed of the calibration windows")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (ours, perplexity)")
    p.add_argument("--widths", default="7/8,3/4,5/8", help="width ratios to compare")
    p.add_argument("--eval_windows", type=int, default=8,
                   help="WikiText-2 test windows for perplexity (0: skip perplexity)")
    p.add_argument("--eval_seqlen", type=int, default=512, help="tokens per WikiText-2 window")
    return p.parse_args(argv)


def load(model_dir: str):
    """The model in float32, eval mode, no KV cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
class OriginalRecurrence:
    """FLAP's ``BiasGPT`` WIFV statistics (mean and fluctuation), one calibration sequence per update."""

    def __init__(self):
        self.nsamples = 0
        self.mean = None
        self.fluc = None

    @torch.no_grad()
    def add_sequence(self, x: torch.Tensor) -> None:
        """Add one sequence's activations ``[1, tokens, features]`` (the recurrence in the module docstring)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        n = self.nsamples
        if self.mean is None:
            self.mean = torch.zeros(x.shape[-1], dtype=torch.float64)
            self.fluc = torch.zeros(x.shape[-1], dtype=torch.float64)
        self.mean = self.mean * (n / (n + 1)) + x.mean(0) / (n + 1)
        if n == 0:
            self.fluc = torch.zeros_like(self.mean)
        else:
            self.fluc = self.fluc * ((n - 1) / n) + (x - self.mean).square().sum(0) / (n + 1)
        self.nsamples = n + 1


@torch.no_grad()
def hooked_statistics(em, calib: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """Per layer {"attn", "mlp"}: the original recurrence and, as a check, the exact statistics of the same
    activations; the hooks see one calibration sequence per full-model forward."""
    original = [{"attn": OriginalRecurrence(), "mlp": OriginalRecurrence()} for _ in range(em.num_layers)]
    exact = [{"attn": RunningStats(), "mlp": RunningStats()} for _ in range(em.num_layers)]
    hooks = []

    def hook(layer: int, kind: str):
        def record(_module, args, _output):
            original[layer][kind].add_sequence(args[0])
            exact[layer][kind].update(args[0])
        return record

    for i in range(em.num_layers):
        proj = em.projections(i)
        hooks.append(proj["o_proj"].register_forward_hook(hook(i, "attn")))
        hooks.append(proj["down_proj"].register_forward_hook(hook(i, "mlp")))
    try:
        with em.use(em.full_subnet()):
            for j in range(calib.shape[0]):
                em.model(input_ids=calib[j:j + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return original, exact


# ----------------------------------------------------------------------------------------------
# Scores and selections
# ----------------------------------------------------------------------------------------------
def selection_difference(a, b, ratios, costs: tuple[int, int]) -> list[dict]:
    """Per ratio: KV groups and MLP channels kept by one selection and not the other, and the fraction of the
    prunable parameters each keeps (counted with the exact unit ``costs``, whatever weights selected them)."""
    def kept_params(sel, r):
        total = sel.groups[r].size * costs[0] + sel.channels[r].size * costs[1]
        return round(float(sel.groups[r].sum() * costs[0] + sel.channels[r].sum() * costs[1]) / total, 5)

    rows = []
    for r in ratios:
        g_diff = int((a.groups[r] != b.groups[r]).sum())
        c_diff = int((a.channels[r] != b.channels[r]).sum())
        rows.append({"width": r, "kv_groups_differ": g_diff, "kv_groups_total": int(a.groups[r].size),
                     "kv_groups_differ_frac": g_diff / a.groups[r].size,
                     "channels_differ": c_diff, "channels_total": int(a.channels[r].size),
                     "channels_differ_frac": c_diff / a.channels[r].size,
                     "kept_groups": [int(a.groups[r].sum()), int(b.groups[r].sum())],
                     "kept_channels": [int(a.channels[r].sum()), int(b.channels[r].sum())],
                     "kept_param_fraction": [kept_params(a, r), kept_params(b, r)]})
    return rows


def forced_keeps(selection, group_score: torch.Tensor, channel_score: torch.Tensor, ratios) -> dict:
    """Per ratio: KV groups and MLP channels kept only by select_widths' rule that every layer keeps at least one
    of each (FLAP's threshold alone would drop them: their score is not above the best pruned unit's)."""
    gs, cs = group_score.numpy(), channel_score.numpy()
    out = {}
    for r in ratios:
        g, c = selection.groups[r], selection.channels[r]
        pruned = np.concatenate([gs[~g], cs[~c]])
        threshold = pruned.max() if pruned.size else -np.inf
        out[f"{r:g}"] = {"kv_groups": int((g & (gs <= threshold)).sum()),
                         "channels": int((c & (cs <= threshold)).sum())}
    return out


def subnet_perplexities(args, selection, stats, ratios, wiki: torch.Tensor) -> dict:
    """WikiText-2 perplexity of every width of ``selection`` (FLAP bias from our means) on a fresh model."""
    from amoeba.elastic import make_elastic
    from amoeba.strategy import Strategy, apply_strategy
    from amoeba.subnet import Subnet

    model = load(args.model)
    em = make_elastic(model)
    masks, bias = width_dicts(em, selection, compensation_biases(em, stats, selection))
    strategy = Strategy({0: np.ones(em.num_layers, dtype=np.float32)}, {}, masks, bias, source="bench (in memory)")
    apply_strategy(em, strategy, ratios, nonuniform=True)
    out = {}
    for r in ratios:
        with em.use(Subnet(tuple(range(em.num_layers)), r)):
            out[f"{r:g}"] = perplexity(model, wiki, args.batch_size)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    """The comparison tables in markdown."""
    lines = []
    for key, title in (("variance", "exact variance (ours) vs FLAP's running recurrence (original)"),
                       ("unit_weights", "exact unit costs (ours) vs the original's weights 170 : 1")):
        lines += [f"Units kept differently, {title}", "",
                  "| width | KV groups | MLP channels | kept params (ours / other) | WikiText-2 ppl (ours / other) |",
                  "| ---: | ---: | ---: | --- | --- |"]
        ppl = result.get("perplexity", {})
        for row in result[key]:
            w = f"{row['width']:g}"
            cell = (f"{ppl['ours'][w]:.3f} / {ppl[key][w]:.3f}" if ppl else "not measured")
            lines.append(f"| {w} | {row['kv_groups_differ']} of {row['kv_groups_total']} "
                         f"({100 * row['kv_groups_differ_frac']:.1f}%) | {row['channels_differ']} of "
                         f"{row['channels_total']} ({100 * row['channels_differ_frac']:.2f}%) | "
                         f"{row['kept_param_fraction'][0]:.4f} / {row['kept_param_fraction'][1]:.4f} | {cell} |")
        lines.append("")
    spread = result["recurrence_over_exact_variance"]
    cv = spread["coefficient_of_variation_per_module"]
    lines.append(f"Recurrence / exact variance per feature: median {spread['median']:.1f}; its coefficient of "
                 f"variation within one module: median {cv['median']:.4f}, max {cv['max']:.4f} (0 for a pure "
                 "per-module scale).")
    lines.append("Kept only by the at-least-one-per-layer rule (ours): " + ", ".join(
        f"{w}: {f['kv_groups']} KV groups, {f['channels']} channels" for w, f in result["forced_keeps_ours"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    """Compute both statistics, score, select, compare; print the table, write the json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    from transformers import AutoTokenizer

    from amoeba.elastic import make_elastic

    t0 = time.perf_counter()
    ratios = tuple(width_key(r) for r in parse_ratio_list(args.widths, "--widths"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = load_text(args.calib_dataset, "train", args.data_dir)  # C4 and Wikipedia samples: their one split
    calib = token_windows(tokenizer, text, args.seqlen, n=args.windows, seed=args.seed)
    model = load(args.model)
    em = make_elastic(model)
    logger.info("original recurrence: %d sequences of %d tokens, one per forward", *calib.shape)
    original, exact = hooked_statistics(em, calib)
    logger.info("ours: amoeba.flap.flap_scores (collect_input_stats)")
    ours = flap_scores(model, calib, args.batch_size, progress=False)

    # checks: the hooks saw our activations, and re-scoring our variances reproduces flap_scores
    hook_vs_ours = max(float(((e[k].variance - getattr(s, f"{k}_var")).abs() / getattr(s, f"{k}_var").abs()
                              .clamp_min(1e-30)).max()) for e, s in zip(exact, ours.stats) for k in ("attn", "mlp"))
    g_ours, c_ours, _, _ = wifv_scores(em, [s.attn_var for s in ours.stats], [s.mlp_var for s in ours.stats])
    rescoring = max(float((g_ours - ours.group_score).abs().max()), float((c_ours - ours.channel_score).abs().max()))
    logger.info("checks: hooked exact variance vs collect_input_stats, max relative difference %.2e; "
                "re-scored vs flap_scores, max abs difference %.2e", hook_vs_ours, rescoring)

    g_orig, c_orig, _, _ = wifv_scores(em, [o["attn"].fluc for o in original], [o["mlp"].fluc for o in original])
    # recurrence / exact variance per feature, per layer and module: a pure scale factor would have no spread
    ratio = [o[k].fluc / getattr(s, f"{k}_var") for o, s in zip(original, ours.stats) for k in ("attn", "mlp")]
    costs = unit_costs(em)
    sel_ours = select_widths(ours.group_score, ours.channel_score, ratios, "global", *costs)
    sel_orig_var = select_widths(g_orig, c_orig, ratios, "global", *costs)
    sel_orig_w = select_widths(ours.group_score, ours.channel_score, ratios, "global", *ORIGINAL_UNIT_WEIGHTS)
    result = {"settings": vars(args), "torch": torch.__version__,
              "calibration": f"{args.calib_dataset}, {calib.shape[0]} x {calib.shape[1]} tokens, seed {args.seed}",
              "unit_costs_ours": list(costs), "unit_weights_original": list(ORIGINAL_UNIT_WEIGHTS),
              "checks": {"hooked_exact_vs_collect_input_stats_max_rel": hook_vs_ours,
                         "rescored_vs_flap_scores_max_abs": rescoring},
              "recurrence_over_exact_variance": {
                  "median": float(torch.cat(ratio).median()),
                  "coefficient_of_variation_per_module": {
                      "median": float(np.median([float(r.std() / r.mean()) for r in ratio])),
                      "max": max(float(r.std() / r.mean()) for r in ratio)}},
              "forced_keeps_ours": forced_keeps(sel_ours, ours.group_score, ours.channel_score, ratios),
              "variance": selection_difference(sel_ours, sel_orig_var, ratios, costs),
              "unit_weights": selection_difference(sel_ours, sel_orig_w, ratios, costs)}
    del model, em
    if args.eval_windows > 0:
        wiki = token_windows(tokenizer, load_text("wikitext2", "test", args.data_dir), args.eval_seqlen,
                             n=args.eval_windows)
        result["eval_tokens"] = f"WikiText-2 test, first {wiki.shape[0]} x {wiki.shape[1]} tokens"
        result["perplexity"] = {name: subnet_perplexities(args, sel, ours.stats, ratios, wiki)
                                for name, sel in (("ours", sel_ours), ("variance", sel_orig_var),
                                                  ("unit_weights", sel_orig_w))}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown(result)
    result["markdown"] = table
    write_json(args.out, result)
    print(table)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
