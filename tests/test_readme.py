"""Every Python snippet of README.md runs as written (in order, one namespace, from a directory that sees the
repository's tests/ and configs/ as the root does), and the Quick start's commands exist."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


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
