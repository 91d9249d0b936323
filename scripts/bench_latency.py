"""Latency of exported subnets against the dense model (and the masked elastic model).

A Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000) with random bf16
weights is built directly on the GPU (nothing is downloaded). For each shape of the grid (layers x
width), the subnet is exported in memory with :func:`amoeba.export.slice_subnet` (the same surgery as
the saved export) and timed:

- prefill latency, batch 1, at each ``--prefill_lens`` (512 and 2048 tokens);
- decode latency per token at each ``--decode_batches`` (1 and 16), eager (dynamic KV cache), and with
  a static KV cache + ``torch.compile`` (``generate(cache_implementation="static")``, which compiles the
  forward in transformers 5.17+); per-token time = (time of N2 tokens - time of N1 tokens) / (N2 - N1),
  so the prompt's prefill cancels out; warm-up runs use the exact lengths that are timed;
- with ``--step_decode``, the same per-token latency from a hand greedy loop over a static cache, one
  replayed step per token (no ``generate`` overhead): the step ``torch.compile(mode="reduce-overhead")``, and
  the eager step captured in one CUDA graph; both checked to decode greedily (each token against a plain
  forward of the decoded sequence, up to bf16 rounding);
- the masked subnet: the elastic model with masks instead of slices (``em.state.sliceable = False``),
  the way width was taken by the original code (layers are still skipped for real).

Per-layer widths (``--per_layer_strategy``): every width of the grid gets the per-layer kept fractions of
KV groups and MLP channels of a strategy file (e.g. the shipped SmolLM2 ``dp_selection_strategy.npy``, 30
layers), mapped onto the model's layers by relative depth (layer ``j`` of ``L`` takes source layer
``round(j * (S - 1) / (L - 1))``), each layer keeping ``max(1, round(fraction * units))`` units (channels
rounded to a multiple of ``--align``, as ``--width_align`` would calibrate them), with a bias
vector on o_proj/down_proj of every narrowed layer (as FLAP's compensation). Each such shape is exported in
each of ``--export_formats``: ``exact`` (every layer at its own size, the rows keyed by the shape's label)
and ``padded`` (a stock model padded to its widest layer, rows ``<label>-padded``). Exact per-layer exports
are timed as they load, with each layer's q/k/v and gate/up projections fused into one product each
(``modeling_amoeba.fuse_projections``; ``--no_fuse`` times them unfused); ``--fused_dense`` adds a row
``<dense>-fused``, the stock dense model with the same fusion, to show what fusing alone gives.

Times are medians of CUDA-event measurements (``time.perf_counter`` on a CPU). The parameter ratio
(dense / subnet parameters) is printed next to each speedup: it is the ceiling for weight-bound decode.
Compiled runs are the slowest to prepare (one compilation per shape and batch), so they are done last,
in a priority order (dense, then the smallest shapes), until ``--time_budget_s`` is spent.

    python scripts/bench_latency.py --out output/bench_latency.json            # the H200 grid
    python scripts/bench_latency.py --smoke --out /tmp/bench_latency_smoke.json  # a tiny CPU run
    python scripts/bench_latency.py --out lat.json --layers 20,24 --widths 5/8,3/4 --shapes 20x5/8,24x3/4 \
        --per_layer_strategy dp_selection_strategy.npy --export_formats exact,padded   # per-layer widths
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amoeba.args import parse_int_list, parse_ratio_list, parse_shape_list, width_key  # noqa: E402
from amoeba.elastic import make_elastic  # noqa: E402
from amoeba.export import slice_subnet  # noqa: E402
from amoeba.flap import align_channels  # noqa: E402
from amoeba.files import library_versions, write_json  # noqa: E402
from amoeba.modeling_amoeba import fuse_projections  # noqa: E402
from amoeba.subnet import Subnet  # noqa: E402

logger = logging.getLogger("bench_latency")

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)
STEP_MODES = ("compile", "cudagraph")  # the step decoders of --step_decode
SMOKE = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=352, vocab_size=256, max_position_embeddings=512)


def parse_cli(argv=None) -> argparse.Namespace:
    """Command-line options (defaults: the H200 grid; ``--smoke`` switches to a tiny CPU setting)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results (a .md table is written next to it).")
    p.add_argument("--smoke", action="store_true", help="Tiny config, short lengths: runs on a CPU in a minute.")
    p.add_argument("--layers", default=None, help="Depths of the grid (default 32,28,24,20; smoke 8,5).")
    p.add_argument("--widths", default=None, help="Width ratios of the grid (default 1,7/8,3/4,5/8; smoke 1,5/8).")
    p.add_argument("--prefill_lens", default=None, help="Prompt lengths for prefill (default 512,2048).")
    p.add_argument("--decode_batches", default=None, help="Batch sizes for decode (default 1,16).")
    p.add_argument("--prompt_len", type=int, default=None, help="Prompt length before decoding (default 128).")
    p.add_argument("--decode_tokens", default=None, help="N1,N2 new tokens; per-token = dt/(N2-N1) (default 8,40).")
    p.add_argument("--reps", type=int, default=None, help="Timed repetitions per measurement (default 3).")
    p.add_argument("--time_budget_s", type=float, default=480.0,
                   help="Time budget in seconds: past half of it the masked runs of the remaining shapes are "
                        "skipped, past all of it the remaining compiled runs.")
    p.add_argument("--no_compile", action="store_true", help="Skip the static-cache + torch.compile decode.")
    p.add_argument("--no_masked", action="store_true", help="Skip the masked elastic subnets.")
    p.add_argument("--step_decode", nargs="?", const="compile,cudagraph", default="",
                   help="Also time a hand greedy loop with a static cache, one replayed step per token, without "
                        "generate's per-token Python: 'compile' (the step torch.compile'd with CUDA graphs), "
                        "'cudagraph' (the eager step captured in one CUDA graph), or both (the default when the "
                        "flag is given alone): columns decode_b*_compile_ms, decode_b*_cudagraph_ms.")
    p.add_argument("--shapes", default=None,
                   help="LAYERSxWIDTH pairs to time instead of the --layers x --widths grid, e.g. 20x5/8,24x3/4.")
    p.add_argument("--per_layer_strategy", default=None,
                   help="A strategy file (.npy) whose per-layer width fractions every width < 1 takes, mapped onto "
                        "the model's layers by relative depth (default: uniform widths).")
    p.add_argument("--align", type=int, default=1,
                   help="With --per_layer_strategy: round every layer's mapped MLP channels to a multiple of this "
                        "(as --width_align calibrates; 1: as mapped).")
    p.add_argument("--export_formats", default="exact",
                   help="Export forms to time for per-layer widths: exact, padded, or exact,padded.")
    p.add_argument("--no_fuse", action="store_true",
                   help="Time exact per-layer exports without fusing q/k/v and gate/up (they load fused).")
    p.add_argument("--fused_dense", action="store_true",
                   help="Also time the dense model with q/k/v and gate/up fused (row <dense>-fused).")
    p.add_argument("--no_generate_compile", action="store_true",
                   help="Skip generate() with a static cache and torch.compile (keep the --step_decode loops).")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.export_formats = [f.strip() for f in a.export_formats.split(",") if f.strip()]
    if not a.export_formats or any(f not in ("exact", "padded") for f in a.export_formats):
        p.error("--export_formats takes exact and/or padded")
    if a.per_layer_strategy and not Path(a.per_layer_strategy).is_file():
        p.error(f"--per_layer_strategy: no such file: {a.per_layer_strategy}")
    if a.shapes:
        from amoeba.errors import UsageError

        try:
            a.shapes = parse_shape_list(a.shapes, "--shapes")
        except UsageError as err:
            p.error(str(err))
    a.layers = parse_int_list(a.layers or ("8,5" if a.smoke else "32,28,24,20"), "--layers")
    a.widths = parse_ratio_list(a.widths or ("1,5/8" if a.smoke else "1,7/8,3/4,5/8"), "--widths")
    a.prefill_lens = parse_int_list(a.prefill_lens or ("16,32" if a.smoke else "512,2048"), "--prefill_lens")
    a.decode_batches = parse_int_list(a.decode_batches or ("1,2" if a.smoke else "1,16"), "--decode_batches")
    a.prompt_len = a.prompt_len or (8 if a.smoke else 128)
    a.decode_tokens = parse_int_list(a.decode_tokens or ("2,6" if a.smoke else "8,40"), "--decode_tokens")
    if len(a.decode_tokens) != 2 or a.decode_tokens[0] >= a.decode_tokens[1]:
        p.error("--decode_tokens takes two increasing numbers N1,N2")
    a.reps = a.reps or (2 if a.smoke else 3)
    a.step_decode = [m.strip() for m in a.step_decode.split(",") if m.strip()]
    unknown = [m for m in a.step_decode if m not in STEP_MODES]
    if unknown:
        p.error(f"--step_decode takes {' and/or '.join(STEP_MODES)}, not {','.join(unknown)}")
    return a


# ------------------------------------------------------------------------------------------- timing
class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def once(self, fn) -> float:
        """Milliseconds of one call (synchronised)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn, reps: int, warmup: int = 1) -> float:
        """Median of ``reps`` timed calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            self.once(fn)
        return statistics.median(self.once(fn) for _ in range(reps))


@torch.no_grad()
def prefill_ms(model, timer: Timer, length: int, reps: int, vocab: int, device) -> float:
    """Batch-1 prefill of ``length`` tokens (the next-token logits only, as generate computes). Three warm-up
    calls: the first calls at a new length pay cuBLAS/allocator set-up that would otherwise show in the median."""
    ids = torch.randint(0, vocab, (1, length), device=device)
    return timer.median(lambda: model(ids, use_cache=False, logits_to_keep=1), reps, warmup=3)


@torch.no_grad()
def decode_ms_per_token(model, timer: Timer, batch: int, prompt_len: int, tokens: tuple[int, int], reps: int,
                        vocab: int, device, static: bool,
                        check_greedy: bool = False) -> tuple[Optional[float], Optional[float]]:
    """Per-token decode latency: (generate N2 - generate N1) / (N2 - N1), greedy, EOS ignored; and with
    ``check_greedy`` the :func:`greedy_gap` of generate's N2 tokens (the reference for the step decoders' gaps:
    bf16 near-ties move generate's tokens too), else None."""
    from transformers import StaticCache

    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    cache = None
    if static:
        # One cache of one size for both lengths: the compiled graphs see the same shapes every time.
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + tokens[1])
    else:
        kwargs["disable_compile"] = True

    def run(n):
        def call():
            if cache is None:
                return model.generate(ids, min_new_tokens=n, max_new_tokens=n, **kwargs)
            cache.reset()
            return model.generate(ids, min_new_tokens=n, max_new_tokens=n, past_key_values=cache, **kwargs)
        return call

    ms = per_token_ms(timer, run, tokens, reps, batch, warmup=2 if static else 1)
    gap = greedy_gap(model, ids, run(tokens[1])()[:, prompt_len:]) if check_greedy else None
    return ms, gap


def per_token_ms(timer: Timer, run, tokens: tuple[int, int], reps: int, batch: int, warmup: int) -> Optional[float]:
    """(time of ``run(N2)()`` - time of ``run(N1)()``) / (N2 - N1): the prompt's prefill cancels out.
    Warm-up happens at the exact lengths timed (a static cache and compiled graphs specialise on them)."""
    n1, n2 = tokens
    t1 = timer.median(run(n1), reps, warmup=warmup)
    t2 = timer.median(run(n2), reps, warmup=1)
    if t2 <= t1:  # noise larger than the decode time: no number rather than a wrong one
        logger.warning("decode timing unresolved (batch %d): %d tokens took %.2f ms, %d took %.2f ms", batch, n2, t2,
                       n1, t1)
        return None
    return (t2 - t1) / (n2 - n1)


class StepDecoder:
    """Greedy decoding with a static KV cache, one token per step, without ``generate``'s per-token Python.

    ``generate`` (even compiled, with CUDA graphs) spends a few milliseconds of Python per token (logits
    processors, stopping checks, input preparation, a device sync), which hides what a smaller subnet saves at
    batch 1. The prompt runs eagerly (it fills the cache); then each token is one step, by ``mode``:

    - ``"eager"``: the step (forward of one token + argmax) runs as is;
    - ``"compile"``: the step is ``torch.compile(mode="reduce-overhead")``: on CUDA it replays as one CUDA graph
      (``cudagraph_mark_step_begin`` before each call and a copy of its output keep the graph's output buffer
      from being overwritten while still in use); without CUDA, inductor code without graphs;
    - ``"cudagraph"``: the eager step, captured once with ``torch.cuda.graph`` together with the update of its
      own inputs (next token, next position), so a token costs one ``replay()``; no compiler involved. Without
      CUDA the same in-place step runs eagerly (what the tests check).
    """

    def __init__(self, model, max_len: int, mode: str = "eager"):
        from transformers import StaticCache

        if mode not in ("eager",) + STEP_MODES:
            raise ValueError(f"unknown step mode {mode!r}")
        self.model = model
        self.mode = mode
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.step = torch.compile(self._step, mode="reduce-overhead", dynamic=False) if mode == "compile" \
            else self._step
        self.graph = None  # the captured in-place step ("cudagraph" on CUDA), made on first use
        self.tok = self.pos = None  # its static inputs, updated in place by the step itself

    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tok, past_key_values=self.cache, cache_position=pos, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _step_in_place(self) -> None:
        """One token: the static ``tok``/``pos`` become the next token and position."""
        self.tok.copy_(self._step(self.tok, self.pos))
        self.pos.add_(1)

    def _capture(self) -> None:
        # Warm-up on a side stream (as torch.cuda.graph requires): it runs the real step for the current token and
        # position, so the cache entries it writes are the ones the replays write again.
        tok0, pos0 = self.tok.clone(), self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step_in_place()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step_in_place()
        self.tok.copy_(tok0)
        self.pos.copy_(pos0)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` greedy tokens after the prompt ``ids`` ([batch, prompt]); returns [batch, n]."""
        self.cache.reset()
        length = ids.shape[1]
        pos = torch.arange(length, device=ids.device)
        logits = self.model(input_ids=ids, past_key_values=self.cache, cache_position=pos, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out = [tok]
        pos = pos[-1:] + 1
        if self.mode == "cudagraph":
            if self.tok is None or self.tok.shape != tok.shape:
                self.tok, self.pos, self.graph = tok.clone(), pos.clone(), None
            self.tok.copy_(tok)
            self.pos.copy_(pos)
            if self.graph is None and ids.is_cuda:
                self._capture()
            for _ in range(n - 1):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step_in_place()
                out.append(self.tok.clone())
            return torch.cat(out, dim=1)
        for _ in range(n - 1):
            if self.mode == "compile" and ids.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
            tok = self.step(tok, pos).clone()
            out.append(tok)
            pos = pos + 1
        return torch.cat(out, dim=1)


GREEDY_GAP_TOLERANCE = 0.05  # of the logits' spread: what bf16 rounding may move between two kernels


@torch.no_grad()
def greedy_gap(model, ids: torch.Tensor, new: torch.Tensor) -> float:
    """How far the decoded tokens ``new`` are from greedy under a plain forward without cache: the largest
    (best logit - logit of the chosen token) over every step, in units of the logits' mean distance from the
    best logit to the average one. 0 means every token was the argmax; random bf16 weights give near-ties, so
    comparing tokens with ``generate``'s would fail on rounding alone."""
    seq = torch.cat([ids, new], dim=1)
    logits = model(seq, use_cache=False).logits[:, ids.shape[1] - 1:-1].float()
    best = logits.max(-1).values
    gap = best - logits.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    spread = (best - logits.mean(-1)).mean()
    return float(gap.max() / spread)


@torch.no_grad()
def step_decode_ms_per_token(model, timer: Timer, batch: int, prompt_len: int, tokens: tuple[int, int], reps: int,
                             vocab: int, device, mode: str) -> tuple[Optional[float], float]:
    """Per-token latency of :class:`StepDecoder` in ``mode`` ((N2 - N1) tokens, as for generate), and the
    :func:`greedy_gap` of its N2 tokens (a check that the hand loop decodes greedily)."""
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    n1, n2 = tokens
    dec = StepDecoder(model, prompt_len + n2 + 1, mode=mode)
    ms = per_token_ms(timer, lambda n: lambda: dec.generate(ids, n), tokens, reps, batch, warmup=2)
    return ms, greedy_gap(model, ids, dec.generate(ids, n2))


def copy_bandwidth_gbs(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Measured device memory copy rate (read + write), GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timer.median(lambda: dst.copy_(src), reps=5)
    return 2 * nbytes / (ms / 1e3) / 1e9


# ------------------------------------------------------------------------------------------- models
def build_model(smoke: bool, device: torch.device, seed: int):
    """The random-weight bf16 model, built on ``device`` (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**(SMOKE if smoke else LLAMA2_7B), tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def mapped_width_plans(strategy_path: str, widths, em, seed: int = 0, align: int = 1) -> dict[float, str]:
    """Register on ``em`` a width plan for every width < 1 with the strategy's per-layer kept fractions of KV
    groups and MLP channels, mapped by relative depth (see the module docstring), and a bias on o_proj and
    down_proj of each narrowed layer. Returns {width: how each model layer maps} for the record."""
    from amoeba.strategy import load_strategy

    strategy = load_strategy(strategy_path, "--per_layer_strategy")
    src_layers = strategy.num_layers
    hidden = int(em.config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    device = em.projections(0)["o_proj"].weight.device
    out = {}
    for w in widths:
        w = width_key(w)
        if w >= 1.0:
            continue
        if w not in strategy.widths():
            raise SystemExit(f"--per_layer_strategy: {strategy_path} has no width {w:g} (it has "
                             f"{strategy.widths()})")
        groups, channels, bias = [], [], {}
        for j in range(em.num_layers):
            src = round(j * (src_layers - 1) / max(em.num_layers - 1, 1))
            kv = float(np.mean(strategy.mask_of(src, "k_proj", w), dtype=np.float64))
            ch = float(np.mean(strategy.mask_of(src, "gate_proj", w), dtype=np.float64))
            groups.append(max(1, round(kv * em.num_kv_groups)))
            channels.append(align_channels(max(1, round(ch * em.intermediate_size)), align, em.intermediate_size))
            if groups[-1] < em.num_kv_groups or channels[-1] < em.intermediate_size:
                for role in ("o_proj", "down_proj"):
                    bias[(j, role)] = (torch.randn(hidden, generator=g) * 0.01).to(device)
        em.add_width_plan(w, groups, channels, bias)
        out[f"{w:g}"] = {"kv_groups": groups, "channels": channels}
        logger.info("width %g from %s: KV groups %s, channels %s", w, strategy_path, groups, channels)
    return out


def plain_model(model, em, subnet: Subnet, export_format: str = "exact", fuse: str = "per_layer"):
    """(record, plain transformers model) of ``subnet``, exported in memory, ready to generate.

    ``fuse``: ``per_layer`` fuses q/k/v and gate/up of exports with per-layer code (as they load from a
    folder), ``all`` of any export, ``none`` of none."""
    sliced = slice_subnet(model, em, subnet, export_format)
    small = sliced.model
    if fuse == "all" or (fuse == "per_layer" and sliced.per_layer_code):
        fuse_projections(small)
    small.generation_config.pad_token_id, small.generation_config.eos_token_id = 0, None
    return sliced, small


def param_count(model) -> int:
    """Parameters of a plain model (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def free(*objs) -> None:
    """Drop models and compiled graphs, and return their memory."""
    for o in objs:
        del o
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 (dynamo missing or unavailable: nothing to reset)
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- the run
def measure_eager(model, timer, a, vocab, device) -> dict:
    """Prefill and eager decode numbers of one model."""
    out = {}
    for n in a.prefill_lens:
        out[f"prefill_{n}_ms"] = prefill_ms(model, timer, n, a.reps, vocab, device)
    for b in a.decode_batches:
        out[f"decode_b{b}_eager_ms"], _ = decode_ms_per_token(model, timer, b, a.prompt_len, a.decode_tokens,
                                                              a.reps, vocab, device, static=False)
    return out


def measure_compiled(model, timer, a, vocab, device, label: str) -> dict:
    """Static-cache decode numbers of one model: compiled ``generate``, and the step decoders of
    ``--step_decode`` with every decoder's greedy gap."""
    out = {}
    for b in a.decode_batches:
        if not a.no_generate_compile:
            out[f"decode_b{b}_compiled_ms"], gap = decode_ms_per_token(
                model, timer, b, a.prompt_len, a.decode_tokens, a.reps, vocab, device, static=True,
                check_greedy=bool(a.step_decode))
            if gap is not None:
                out[f"decode_b{b}_compiled_greedy_gap"] = gap
        for mode in a.step_decode:
            prefix = f"decode_b{b}_{mode}"
            try:
                ms, gap = step_decode_ms_per_token(model, timer, b, a.prompt_len, a.decode_tokens, a.reps, vocab,
                                                   device, mode)
            except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the table
                first = (str(err).strip().splitlines() or [""])[0][:300]
                logger.warning("%s: step decoder (%s) failed at batch %d: %s: %s", label, mode, b,
                               type(err).__name__, first)
                out[f"{prefix}_error"] = f"{type(err).__name__}: {first}"
                ms, gap = None, None
            out[f"{prefix}_ms"], out[f"{prefix}_greedy_gap"] = ms, gap
            if gap is not None and gap > GREEDY_GAP_TOLERANCE:
                logger.warning("%s: the %s step decoder is not greedy (batch %d): gap %.3f of the logits' spread",
                               label, mode, b, gap)
    return out


def run(a: argparse.Namespace) -> dict:
    """Measure the grid; return the result record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = Timer(device)
    t_start = time.perf_counter()
    model = build_model(a.smoke, device, a.seed)
    vocab = model.config.vocab_size
    em = make_elastic(model)
    full_layers = em.num_layers
    dense_params = em.param_count(em.full_subnet())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_gbs(device, timer, min(weight_bytes, 2 << 30))
    logger.info("dense model: %d parameters (%.2f GB bf16); copy rate %.0f GB/s", dense_params, weight_bytes / 1e9,
                bw)

    grid = a.shapes or [(n, w) for n in a.layers for w in a.widths]
    mapping = mapped_width_plans(a.per_layer_strategy, [w for _, w in grid], em, a.seed, a.align) \
        if a.per_layer_strategy else None
    formats = a.export_formats if mapping else ["exact"]
    # Smallest shapes first (the largest speedups, e.g. 20 layers x 5/8), so a budget cut drops the mildest.
    shapes = sorted(((n, w, f) for n, w in grid if n <= full_layers for f in formats),
                    key=lambda s: (s[0] * s[1], s[2]))
    rows: dict[str, dict] = {}
    dense_key = f"l{full_layers}w1"
    # Dense first: every speedup is relative to it.
    # The dense baseline is a plain transformers model (the full shape exported), not the wrapped one.
    dense_sliced, dense_model = plain_model(model, em, em.full_subnet())
    rows[dense_key] = dict(layers=full_layers, width=1.0, params=dense_params, param_ratio=1.0, kind="dense",
                           fuse="none", **measure_eager(dense_model, timer, a, vocab, device))
    free(dense_model, dense_sliced)
    fuse = "none" if a.no_fuse else "per_layer"
    if a.fused_dense:
        dense_sliced, dense_model = plain_model(model, em, em.full_subnet(), fuse="all")
        rows[f"{dense_key}-fused"] = dict(layers=full_layers, width=1.0, params=dense_params, param_ratio=1.0,
                                          kind="dense-fused", fuse="all",
                                          **measure_eager(dense_model, timer, a, vocab, device))
        free(dense_model, dense_sliced)
    for n, w, fmt in shapes:
        subnet = Subnet(tuple(range(n)), w)
        key = subnet.label if fmt == "exact" else f"{subnet.label}-{fmt}"
        if key == dense_key or key in rows:
            continue
        sliced, small = plain_model(model, em, subnet, fmt, fuse)
        row = dict(layers=n, width=w, params=sliced.param_count, param_ratio=dense_params / sliced.param_count,
                   kind="exported", export_format=fmt, per_layer_code=sliced.per_layer_code,
                   fuse=fuse if sliced.per_layer_code else "none",
                   **measure_eager(small, timer, a, vocab, device))
        free(small, sliced)
        if fmt != "exact":  # the masked elastic model is the same for every export form
            pass
        elif not a.no_masked and time.perf_counter() - t_start > a.time_budget_s / 2:
            row["masked_skipped"] = "time budget"
        elif not a.no_masked:
            em.state.sliceable = False  # masks: the same function at full-size arithmetic
            em.set_subnet(subnet)
            for k, v in measure_eager(model, timer, a, vocab, device).items():
                row[f"masked_{k}"] = v
            em.set_subnet(em.full_subnet())
            em.state.sliceable = True
        rows[key] = row
        logger.info("%s: %s", key,
                    {k: v if v is None else round(v, 3) for k, v in row.items() if k.endswith("_ms")})

    compiled_note = None
    if not a.no_compile:
        if device.type != "cuda":
            compiled_note = "static KV cache without torch.compile (generate compiles only on CUDA)"
        # Priority: dense, then the smallest shapes (the largest speedups), then the rest.
        firsts = [k for k in (dense_key, f"{dense_key}-fused") if k in rows]
        order = firsts + sorted((k for k in rows if k not in firsts), key=lambda k: rows[k]["params"])
        for key in order:
            if time.perf_counter() - t_start > a.time_budget_s:
                rows[key]["compiled_skipped"] = "time budget"
                continue
            r = rows[key]
            extra, target = plain_model(model, em, Subnet(tuple(range(r["layers"])), r["width"]),
                                        r.get("export_format", "exact"), r["fuse"])
            r.update(measure_compiled(target, timer, a, vocab, device, key))
            free(target, extra)
            logger.info("%s compiled: %s", key, {k: v if v is None else round(v, 3) for k, v in r.items()
                                                    if _compiled_key(k) and k.endswith("_ms")})

    dense = rows[dense_key]
    for r in rows.values():
        for k in list(r):
            if k.endswith("_ms") and not k.startswith("masked_"):
                r[k.replace("_ms", "_speedup")] = dense[k] / r[k] if dense.get(k) and r[k] else None
            if k.startswith("masked_") and k.endswith("_ms"):
                base = dense.get(k[len("masked_"):])
                r[k.replace("_ms", "_speedup")] = base / r[k] if base and r[k] else None
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "config": "smoke" if a.smoke else "llama2-7b-shaped",
        "dense_params": dense_params,
        "weight_bytes": weight_bytes,
        "copy_rate_gbs": bw,
        "weight_bandwidth_floor_ms_per_token": floor_ms,
        "compiled_note": compiled_note,
        "per_layer_widths": mapping,
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "wall_s": time.perf_counter() - t_start,
        "versions": library_versions(),
        "rows": rows,
    }


def _compiled_key(key: str) -> bool:
    """Columns of the compiled phase: generate with a static cache, and the step decoders."""
    return "compile" in key or "cudagraph" in key


def markdown(result: dict) -> str:
    """The result as a markdown table (one row per shape)."""
    rows = result["rows"]
    any_row = next(iter(rows.values()))
    timed = [k for k in any_row if k.endswith("_ms") and not k.startswith("masked_")]
    for r in rows.values():
        timed += [k for k in r if _compiled_key(k) and k.endswith("_ms") and k not in timed]
    head = ["shape", "params", "param ratio"]
    for k in timed:
        head += [k.replace("_ms", " ms"), "speedup"]
    masked = [k for k in timed if not _compiled_key(k)]
    head += [f"masked {k.replace('_ms', '')} speedup" for k in masked]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    for label, r in sorted(rows.items(), key=lambda kv: (-kv[1]["layers"], -kv[1]["width"], kv[0])):
        cells = [label, f"{r['params'] / 1e9:.3f}B" if r["params"] > 1e8 else f"{r['params']:,}",
                 f"{r['param_ratio']:.2f}x"]
        for k in timed:
            speedup = r.get(k.replace("_ms", "_speedup"))
            cells += [fmt(r.get(k)), f"{speedup:.2f}x" if speedup else "-"]
        cells += [fmt(r.get("masked_" + k.replace("_ms", "_speedup"))) for k in masked]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Device: {result['device']}; dense weights {result['weight_bytes'] / 1e9:.2f} GB; measured copy "
                 f"rate {result['copy_rate_gbs']:.0f} GB/s; weight-bandwidth floor "
                 f"{result['weight_bandwidth_floor_ms_per_token']:.3f} ms/token.")
    dense = next(r for r in rows.values() if r.get("kind") == "dense")
    floor = result["weight_bandwidth_floor_ms_per_token"]
    for key, what in (("decode_b1_compiled_ms", "generate, compiled"), ("decode_b1_compile_ms", "step loop, compiled"),
                      ("decode_b1_cudagraph_ms", "step loop, one CUDA graph")):
        if dense.get(key):
            lines.append(f"Dense decode at batch 1 ({what}): {dense[key]:.3f} ms/token = {dense[key] / floor:.2f}x "
                         "the weight-bandwidth floor.")
    if result.get("compiled_note"):
        lines.append(f"Compiled columns: {result['compiled_note']}.")
    gaps = {}  # decoder -> the largest greedy gap over shapes and batches
    for r in rows.values():
        for k, v in r.items():
            if k.endswith("_greedy_gap") and v is not None:
                what = k[:-len("_greedy_gap")].split("_", 2)[2]
                gaps[what] = max(v, gaps.get(what, 0.0))
    if gaps:
        lines.append("Largest greedy gap (best logit - chosen token's logit under a plain forward of the decoded "
                     "tokens, in units of the logits' spread; tolerance "
                     f"{GREEDY_GAP_TOLERANCE}): " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(gaps.items())) + ".")
    for label, r in rows.items():
        for k in sorted(k for k in r if k.endswith("_error")):
            _, batch, mode, _ = k.split("_")
            lines.append(f"Step decoder ({mode}) failed ({label}, {batch}): {r[k]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the benchmark, write ``--out`` (json) and a markdown table next to it, print the table."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    a = parse_cli(argv)
    result = run(a)
    out = Path(a.out)
    write_json(out, result)
    table = markdown(result)
    from amoeba.files import write_text

    write_text(out.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
