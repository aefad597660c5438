"""Fine-tune an MRA head (sequence/token classification, question answering, multiple choice).

    python scripts/finetune.py configs/finetune/CONFIG.yaml [key=value ...]     e.g. model=out/pretrain/checkpoints/150

Started again on the same output_dir, it resumes from the latest complete checkpoint (only steps, the logging and
eval intervals, the mesh and a few run-time keys may change; README); --overwrite moves the old run aside
(renamed <output_dir>.old-<UTC time>) and starts afresh. The best checkpoint by the configured eval metric is
kept and, with export_hf=true, written to output_dir/hf.
"""

from __future__ import annotations

import argparse
import sys

from mra_jax.training.config import load_config
from mra_jax.training.finetune import FinetuneConfig, NonFiniteError, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML file under configs/finetune/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing output_dir aside (renamed <output_dir>.old-<UTC time>) and start afresh")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="use a training checkpoint that has no checksums (its content is then not verified)")
    args = parser.parse_intermixed_args(argv)  # --overwrite may come after the overrides
    try:
        result = run(load_config(FinetuneConfig, args.config, args.overrides), overwrite=args.overwrite,
                     allow_unverified=args.allow_unverified)
    except (ValueError, OSError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130
    if "eval" in result:
        print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items() if k != "step"))
    print(f"best checkpoint ({result['best_metric']}): {result['best_checkpoint']}")
    if "export" in result:
        print(f"HF export: {result['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
