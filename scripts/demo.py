"""The main job: a long-context effect on a 2-core CPU. A tiny MRA is pretrained, then fine-tuned twice with the same
budget on a task only the whole input answers (which of two symbols fills more of a 1-2k token sequence): once on
the whole inputs, once on their first 512 tokens. Prints both test accuracies beside the baselines.

    python scripts/demo.py                                   # configs/demo/cpu.yaml: a 2-core CPU, ~4 minutes
    python scripts/demo.py configs/demo/gpu.yaml             # larger (4k-8k tokens) on a GPU
    python scripts/demo.py configs/demo/cpu.yaml finetune.steps=300 output_dir=out/demo2

Started again on the same output_dir, a finished stage is reused and an unfinished one resumes from its last
complete checkpoint.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from mra_jax.training.config import load_config
from mra_jax.training.demo import DemoConfig, run
from mra_jax.training.loop import NonFiniteError

DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo" / "cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(DEFAULT), help="a YAML file under configs/demo/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = str(DEFAULT)
    try:
        run(load_config(DemoConfig, args.config, args.overrides))
    except (ValueError, OSError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
