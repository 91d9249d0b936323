"""scripts/check_attention_grads.py: the padded batches, the per-kernel rows and the refusals (on the CPU only the
math kernel runs; the GPU kernels' behaviour is what the script measures there)."""

from __future__ import annotations

import math

import torch

from tests.conftest import ROOT, load_script, tiny_model


def _module():
    return load_script(ROOT / "scripts" / "check_attention_grads.py")


def test_padded_batch_fills_the_length_once_and_masks_the_padding():
    m = _module()
    b = m.padded_batch(19, 5, 100, seed=0, device="cpu")
    assert b["input_ids"].shape == (5, 19)
    lengths = b["attention_mask"].sum(1).tolist()
    assert lengths[0] == 19 and all(6 <= n <= 19 for n in lengths)
    assert torch.equal(b["labels"] == -100, b["attention_mask"] == 0)
    assert torch.equal(b["attention_mask"][:, :1], torch.ones(5, 1, dtype=torch.long))  # right padding


def test_rows_count_non_finite_gradients_and_compare_with_math(monkeypatch):
    m = _module()
    model = tiny_model("gqa", layers=2).requires_grad_(False)
    rows = m.check(model, [9, 12], 3, ["math"])
    assert [(r["length"], r["kernel"]) for r in rows] == [(9, "math"), (12, "math")]
    assert all(math.isfinite(r["loss"]) and r["nonfinite_grads"] == 0 and r["grads"] > 0 for r in rows)

    real = m.gradients

    def fake(model, batch, kernel):  # "cudnn" gives NaN in one row of gradients, "efficient" a small offset
        loss, grad = real(model, batch, "math")
        if kernel == "cudnn":
            grad[0, -1] = float("nan")
        if kernel == "efficient":
            grad = grad + 1e-3 * grad.abs().max()
        return loss, grad

    monkeypatch.setattr(m, "gradients", fake)
    rows = {r["kernel"]: r for r in m.check(model, [9], 3, ["cudnn", "efficient", "math"])}
    hidden = model.config.hidden_size
    assert rows["cudnn"]["nonfinite_grads"] == hidden and "max_rel_diff_vs_math" not in rows["cudnn"]
    assert abs(rows["efficient"]["max_rel_diff_vs_math"] - 1e-3) < 1e-6
    assert "1 of" not in m.markdown(list(rows.values())) and f"{hidden} of" in m.markdown(list(rows.values()))


def test_a_kernel_that_cannot_run_is_reported_not_raised():
    m = _module()
    model = tiny_model("gqa", layers=2).requires_grad_(False)
    rows = m.check(model, [8], 2, ["efficient", "math"])  # no memory-efficient kernel on a CPU
    assert "error" in rows[0] and rows[1]["nonfinite_grads"] == 0
    assert "not available" in m.markdown(rows)


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    m = _module()
    assert m.main(["--model", str(tmp_path), "--kernels", "math"]) == 2
    assert "--model" in capsys.readouterr().err
    assert m.main(["--model", str(tmp_path), "--kernels", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kernels" in err and "fast" in err
