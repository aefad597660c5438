"""Every Python snippet of README.md runs as written (in order, one namespace, from a directory that sees the
repository's tests/ and configs/ as the root does), and the Quick start's commands exist."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


@pytest.mark.slow
def test_python_snippets_run_as_written(tmp_path):
    for name in ("tests", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = tmp_path / "snippets.py"
    script.write_text("\n".join(_blocks("python")))
    env = {**os.environ, "PYTHONPATH": str(ROOT),  # one CPU device, as a user's shell has; fast compiles
           "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "readme" / "hf" / "model.safetensors").is_file()


def test_quick_start_is_two_make_targets_that_exist():
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    commands = [line.split("#")[0].strip() for line in _blocks_in(quick)[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    targets = re.findall(r"^(\w[\w-]*):", (ROOT / "Makefile").read_text(), re.M)
    assert {"demo", "test"} <= set(targets)


def _blocks_in(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def _commands(block: str) -> list[str]:
    return [c.split("#")[0].strip() for c in block.replace("\\\n", " ").splitlines() if c.split("#")[0].strip()]


@pytest.mark.slow
def test_the_pretraining_commands_work_in_the_order_written(tmp_path):
    """The Pretraining section's CPU commands, then its export command, run as written from a fresh directory (cut
    short: a few steps each, the exported step renamed to match); a missing step's error lists the existing ones."""
    text = (ROOT / "README.md").read_text().split("## Pretraining", 1)[1]
    blocks = _blocks_in(text)
    runs = [c for c in _commands(blocks[0]) if "base-4096" not in c]  # (the real recipe needs an accelerator)
    export = next(c for b in blocks for c in _commands(b) if c.startswith("python scripts/export_to_hf.py"))
    assert len(runs) == 2 and "checkpoints/150" in export
    for name in ("configs", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    short = ("steps=4 checkpoint_every=2 eval_every=4 log_every=2 data.seq_len=32 data.eval_batches=1 "
             "optimizer.warmup_steps=1 progress_bar=false tensorboard=false")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in runs:
        done = subprocess.run(f"{command} {short}", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    missing = subprocess.run(export, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.strip().endswith(
        f"no config.json at out/pretrain-tiny/checkpoints/150; the checkpoints in "
        f"{tmp_path / 'out' / 'pretrain-tiny' / 'checkpoints'}: 2, 4"), missing.stderr[-2000:]
    done = subprocess.run(export.replace("checkpoints/150", "checkpoints/4"), shell=True, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf_model").iterdir()}
    assert sorted(p.name for p in (tmp_path / "out" / "pretrain-mesh" / "checkpoints").iterdir()) == ["2", "4"]
