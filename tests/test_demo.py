"""The README's first command: scripts/golden_parity.py."""

from __future__ import annotations

import pathlib
import runpy
import shutil

from conftest import GOLDEN

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "golden_parity.py"


def _main():
    return runpy.run_path(str(SCRIPT))["main"]


def test_golden_parity_script_agrees(tmp_path, capsys):
    shutil.copytree(GOLDEN / "model_token_classification", tmp_path / "model_token_classification")
    assert _main()(["--golden", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model_token_classification" in out and "agrees with HF" in out


def test_golden_parity_script_fails_loudly(tmp_path, capsys):
    shutil.copytree(GOLDEN / "model_token_classification", tmp_path / "model_token_classification")
    assert _main()(["--golden", str(tmp_path), "--tolerance", "0"]) == 1
    assert "DIFFERS" in capsys.readouterr().out
    assert _main()(["--golden", str(tmp_path / "empty")]) == 2
