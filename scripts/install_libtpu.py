"""Install the libtpu that the installed jax pins (its ``tpu`` extra) into a directory of its own (default
``.libtpu``), so that tests can compile the TPU kernels for a TPU target on a machine without one.

The directory is not on ``sys.path``: only processes that are given it (``PYTHONPATH``) load libtpu, so the rest of
the environment keeps its CPU/GPU backends.  ``tests/test_tpu_compile.py`` finds it there (or at
``$MRA_JAX_LIBTPU_PATH``).  Usage: ``python scripts/install_libtpu.py [DIR]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def libtpu_requirement() -> str:
    """jax's own pin, e.g. ``libtpu==0.0.42.*`` for jax 0.10.2."""
    for req in importlib.metadata.requires("jax") or []:
        match = re.match(r"\s*(libtpu[^;]*);.*extra\s*==\s*['\"]tpu['\"]", req)
        if match:
            return match.group(1).replace(" ", "")
    raise SystemExit(f"jax {importlib.metadata.version('jax')} names no libtpu for its 'tpu' extra")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default=str(ROOT / ".libtpu"),
                        help="the directory to install into (default: .libtpu in the checkout)")
    target = pathlib.Path(parser.parse_args(argv).dir)
    req = libtpu_requirement()
    have = [d.version for d in importlib.metadata.distributions(path=[str(target)]) if d.metadata["Name"] == "libtpu"]
    if have and re.fullmatch(req.split("==", 1)[1].replace(".", r"\.").replace("*", ".*"), have[0]):
        print(f"libtpu {have[0]} already in {target}")
        return 0
    print(f"+ pip install --target {target} {req}")
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                            str(target), req])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
