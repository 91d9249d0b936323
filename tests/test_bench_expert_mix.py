"""scripts/bench_expert_mix.py on a tiny shape (CPU): every mix timed, their gradients agree with the product's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from amoeba.adapters import MIX_METHODS


def _bench():
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_expert_mix.py"
    spec = importlib.util.spec_from_file_location("bench_expert_mix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mix_is_timed_and_agrees_with_the_product(tmp_path, capsys):
    out = tmp_path / "mix.json"
    assert _bench().main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["rows"]) == list(MIX_METHODS) and all(ms > 0 for ms in res["rows"].values())
    diffs = res["max_relative_gradient_difference"]
    assert diffs["product"] == 0.0
    assert all(0 <= d < 1e-5 for d in diffs.values())  # fp32 rounding, not a different gradient
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in MIX_METHODS)


def test_a_subnet_larger_than_the_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--layers", "2", "--kept", "2,3", "--device", "cpu"])
    assert exc.value.code == 2
    assert "--kept: each subnet keeps 1 to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--kept", "3,x", "--device", "cpu"])
    assert exc.value.code == 2
    assert "--kept: '3,x' is not a comma-separated list" in capsys.readouterr().err
