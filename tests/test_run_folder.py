"""The run folder's one rule for where a run's adapters are, and what the export record says about them."""

from __future__ import annotations

import json

import torch

from amoeba.adapters import AdapterConfig, attach_adapters, save_adapters, structure_of
from amoeba.args import parse_args
from amoeba.elastic import make_elastic
from amoeba.export import EXPORT_RECORD
from amoeba.pipeline import run
from amoeba.run_folder import find_adapters
from tests.conftest import tiny_model
from tests.test_cli import tiny_folder  # noqa: F401  (shared fixture)


def _save_adapters(folder, seed: int) -> None:
    """LoRA adapters of the tiny GQA model (the one ``tiny_folder`` holds), nonzero, saved into ``folder``."""
    model = tiny_model("gqa")
    em = make_elastic(model)
    attach_adapters(model, em, AdapterConfig(r=2, alpha=4, **structure_of(em)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapters(model, folder, em)


def _complete_checkpoint(run_dir, step: int, seed: int):
    """A checkpoint folder whose adapters evaluation can read (the marker written last)."""
    ckpt = run_dir / f"checkpoint-{step}"
    _save_adapters(ckpt / "adapter_model", seed)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_find_adapters_is_one_rule_for_every_kind_of_folder(tmp_path):
    run_dir = tmp_path / "run"
    assert find_adapters(run_dir) is None and find_adapters(tmp_path) is None
    older = _complete_checkpoint(run_dir, 2, seed=0)
    assert find_adapters(run_dir) == older / "adapter_model"  # only checkpoints: the newest complete one
    (run_dir / "checkpoint-4" / "adapter_model").mkdir(parents=True)  # a newer one a kill cut short
    assert find_adapters(run_dir) == older / "adapter_model"
    _save_adapters(run_dir / "adapter_model", seed=1)
    assert find_adapters(run_dir) == run_dir / "adapter_model"  # a finished run: its final adapters
    assert find_adapters(older) == older / "adapter_model"  # a checkpoint given directly
    assert find_adapters(older / "adapter_model") == older / "adapter_model"  # an adapter folder itself


def test_the_export_record_names_the_adapter_folder_that_was_loaded(tiny_folder, tmp_path):  # noqa: F811
    """``--adapter_dir`` loads another run's adapters: the export's record names that folder, not an adapter folder
    of ``--output_dir`` (which holds adapters of its own here, or none)."""
    own, other = tmp_path / "run", tmp_path / "other"
    _save_adapters(own / "adapter_model", seed=0)
    _complete_checkpoint(other, 3, seed=1)  # the other run was stopped after its checkpoint
    for output_dir, export in ((own, tmp_path / "export_a"), (tmp_path / "fresh", tmp_path / "export_b")):
        run(parse_args(["--model_name_or_path", str(tiny_folder), "--output_dir", str(output_dir), "--do_train",
                        "False", "--adapter_dir", str(other), "--export_dir", str(export), "--report_to", "none"]))
        record = json.loads((export / EXPORT_RECORD).read_text())
        assert record["adapters_dir"] == str(other / "checkpoint-3" / "adapter_model"), record["adapters_dir"]
        assert record["adapters_merged"] == 28  # 7 projections x 4 layers: the adapters were merged
    # without --adapter_dir, the run's own adapters are loaded and named
    run(parse_args(["--model_name_or_path", str(tiny_folder), "--output_dir", str(own), "--do_train", "False",
                    "--export_dir", str(tmp_path / "export_c"), "--report_to", "none"]))
    record = json.loads((tmp_path / "export_c" / EXPORT_RECORD).read_text())
    assert record["adapters_dir"] == str(own / "adapter_model")
