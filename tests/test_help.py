"""`--help` is the first command most people type: it must print and exit 0 everywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p for d in ("scripts", "utils") for p in (ROOT / d).glob("*.py"))


def test_main_parser_formats_its_whole_help():
    """Every help string goes through argparse's %-formatting (a bare % breaks it)."""
    from amoeba.args import build_parser

    text = build_parser().format_help()
    assert "--budget_params" in text and "60%" in text
    assert "--num_calib_sample" in text


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_main_help_exits_zero(flag):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), flag], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model_name_or_path" in proc.stdout and "--export_dir" in proc.stdout


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_help_exits_zero(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout.lower(), proc.stdout[-2000:]
