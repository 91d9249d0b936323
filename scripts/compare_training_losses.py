"""Compare Stage 2 runs by their training losses on the same batches, step by step.

Runs with the same ``--data_seed``, batch size and data see the same batches in the same order, and every batch
once within an epoch, so each logged loss is measured on examples the run had not trained on yet. The difference
between two runs' losses at the same step is then a paired, held-out comparison, available as soon as the runs
have trained (no evaluation needed), and also for runs stopped before their end.

For each run against ``--reference``, and each sandwich role (``loss_largest``, ``loss_smallest``, ...): the mean
loss of both over the logged steps they share within ``--steps``, the mean difference (run minus reference) and
its standard error over those steps. A role's loss is marked "not comparable" where the two runs define it differently:
the largest subnet learns from the labels; the other roles from the labels without distillation (``--distill_method
none``) and from the largest subnet's outputs with it; a fixed-shape run (``--train_num_layer``) logs its one
subnet in the largest's place. The random roles are the same subnets only when both runs sample with the same
``--seed``.

A run is a Stage 2 output folder (``run_args.json``, and ``training_log.json`` once it ended). For a run stopped
before it wrote ``training_log.json``, the losses are read from its console log: ``--console_logs`` is the folder
of ``train_<run folder name>.log`` files (the experiment driver's ``logs/``).

    python scripts/compare_training_losses.py --reference out/train/amoeba out/train/abl_lora out/train/abl_nokd \\
        --console_logs out/logs --steps 110:840
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amoeba.errors import UsageError  # noqa: E402
from amoeba.files import write_json  # noqa: E402

logger = logging.getLogger("compare_training_losses")

ROLES = ("loss_largest", "loss_random1", "loss_random2", "loss_smallest")


def run_settings(run: Path) -> dict:
    """The run's parsed arguments, every section merged (``run_args.json``)."""
    path = run / "run_args.json"
    try:
        sections = json.loads(path.read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: not a Stage 2 run's arguments ({type(err).__name__})") from None
    merged = {}
    for values in sections.values():
        merged.update(values if isinstance(values, dict) else {})
    return merged


def console_losses(path: Path, logging_steps: int) -> dict[int, dict]:
    """Step -> the logged record, from a console log's Trainer lines (``{'loss': ...}``, every ``logging_steps``
    steps from the start: the log of one run, not resumed)."""
    records = []
    for line in path.read_text(errors="replace").replace("\r", "\n").splitlines():
        line = line.strip()
        if line.startswith("{'loss'"):
            try:
                records.append({k: float(v) for k, v in ast.literal_eval(line).items()})
            except (ValueError, SyntaxError):
                continue  # a line cut off where the run was stopped
    return {logging_steps * (i + 1): r for i, r in enumerate(records)}


def run_losses(run: Path, console_logs: Optional[Path], logging_steps: int) -> tuple[dict[int, dict], str]:
    """Step -> logged record of ``run``, and where it was read from."""
    log = run / "training_log.json"
    if log.is_file():
        try:
            history = json.loads(log.read_text())
        except ValueError as err:
            raise UsageError(f"{log}: not JSON ({err})") from None
        return {int(r["step"]): r for r in history if "loss" in r and "step" in r}, str(log)
    console = console_logs / f"train_{run.name}.log" if console_logs else None
    if console is None or not console.is_file():
        raise UsageError(f"{run} has no training_log.json (a run stopped early: give --console_logs, the folder of "
                         f"train_{run.name}.log)")
    return console_losses(console, logging_steps), str(console)


def role_meaning(role: str, args: dict) -> tuple[str, str]:
    """(which subnet, which loss) a run's logged ``role`` is: a fixed-shape run (``--train_num_layer``) logs its one
    subnet as ``loss_largest``; a subnet other than the largest learns from the largest one's outputs when the run
    distils (``--distill_method sp`` with a non-zero ``--kd_weight``), else from the labels."""
    distils = args.get("distill_method", "sp") != "none" and float(args.get("kd_weight", 1.0) or 0) != 0
    if args.get("train_num_layer"):
        shape = f"the fixed subnet {args['train_num_layer']} x {args.get('train_num_width') or 1}"
        return shape, "distillation loss (full model)" if distils and args.get("train_distill_full") else "label loss"
    if role == "loss_largest":
        return "the largest subnet", "label loss"
    return role.removeprefix("loss_"), "distillation loss (largest subnet)" if distils else "label loss"


def role_comparable(role: str, ref: dict, other: dict) -> Optional[str]:
    """None when ``role``'s logged loss means the same in both runs (the same subnet, the same loss), else why not."""
    (ref_net, ref_loss), (net, loss) = role_meaning(role, ref), role_meaning(role, other)
    if ref_net != net:
        return f"not comparable: {net} against {ref_net}"
    if ref_loss != loss:
        return f"not comparable: {loss} against {ref_loss}"
    if role.startswith("loss_random") and ref.get("seed") != other.get("seed"):
        return "other random subnets (another --seed)"
    return None


def compare(reference: Path, runs: list[Path], console_logs: Optional[Path], steps: tuple[int, int]) -> dict:
    """The paired comparison of every run in ``runs`` with ``reference`` (see the module's docstring)."""
    ref_args = run_settings(reference)
    batch_keys = ("data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "dataset",
                  "source_max_len", "target_max_len", "logging_steps")
    ref_losses, ref_source = run_losses(reference, console_logs, int(ref_args.get("logging_steps") or 10))
    out = {"reference": str(reference), "reference_log": ref_source, "steps": list(steps), "runs": []}
    for run in runs:
        args = run_settings(run)
        differ = [k for k in batch_keys if args.get(k) != ref_args.get(k)]
        if differ:
            raise UsageError(f"{run}: other batches than {reference} ({', '.join(differ)} differ), so a step's "
                             "losses are not on the same examples")
        losses, source = run_losses(run, console_logs, int(args.get("logging_steps") or 10))
        shared = [s for s in sorted(losses) if s in ref_losses and steps[0] <= s <= steps[1]]
        entry = {"run": str(run), "log": source, "last_step": max(losses, default=0), "roles": {}}
        for role in ROLES:
            pairs = [(ref_losses[s][role], losses[s][role]) for s in shared
                     if role in ref_losses[s] and role in losses[s]]
            if not pairs:
                continue
            diffs = [b - a for a, b in pairs]
            n = len(diffs)
            mean = sum(diffs) / n
            sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
            entry["roles"][role] = {"logged_steps": n, "reference": sum(a for a, _ in pairs) / n,
                                    "run": sum(b for _, b in pairs) / n, "difference": mean,
                                    "standard_error": sd / math.sqrt(n),
                                    "note": role_comparable(role, ref_args, args)}
        out["runs"].append(entry)
    return out


def markdown(result: dict) -> str:
    """The comparison as a table."""
    lo, hi = result["steps"]
    lines = [f"Reference: {result['reference']}; logged steps {lo}-{hi} that both runs have.", "",
             "| run | role | steps | reference | run | run - reference | standard error | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for entry in result["runs"]:
        for role, r in entry["roles"].items():
            lines.append(f"| {Path(entry['run']).name} | {role.removeprefix('loss_')} | {r['logged_steps']} | "
                         f"{r['reference']:.4f} | {r['run']:.4f} | {r['difference']:+.4f} | "
                         f"{r['standard_error']:.4f} | {r['note'] or ''} |")
    return "\n".join(lines)


def parse_steps(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"{text!r} is not FIRST:LAST (e.g. 110:840)", "--steps") from None
    if lo > hi:
        raise UsageError(f"{text!r}: FIRST is after LAST", "--steps")
    return lo, hi


def main(argv=None) -> int:
    """Compare the runs and print the table (and write ``--out``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="Stage 2 output folders to compare with --reference")
    p.add_argument("--reference", required=True, help="the Stage 2 output folder the runs are compared with")
    p.add_argument("--console_logs", default=None,
                   help="folder of train_<run>.log console logs, for runs without training_log.json")
    p.add_argument("--steps", default="0:1000000000", help="FIRST:LAST logged steps to compare (default: all)")
    p.add_argument("--out", default=None, help="also write the comparison here as JSON")
    opts = p.parse_args(argv)
    try:
        result = compare(Path(opts.reference), [Path(r) for r in opts.runs],
                         Path(opts.console_logs) if opts.console_logs else None, parse_steps(opts.steps))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if opts.out:
        write_json(Path(opts.out), result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
