"""MLM pretraining of an MRA encoder on a mesh.

    python scripts/pretrain.py configs/pretrain/tiny.yaml [key=value ...]     e.g. steps=200 mesh.fsdp=4

Started again on the same output_dir, it resumes from the latest complete checkpoint; only steps, the logging,
eval and checkpoint intervals, the mesh and a few run-time keys may change (README). --overwrite moves the old
run aside (renamed <output_dir>.old-<UTC time>) and starts afresh.
"""

from __future__ import annotations

import argparse
import sys

from mra_jax.training.config import PretrainConfig, load_config
from mra_jax.training.pretrain import NonFiniteError, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML file under configs/pretrain/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing output_dir aside (renamed <output_dir>.old-<UTC time>) and start afresh")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="use a training checkpoint that has no checksums (its content is then not verified)")
    args = parser.parse_intermixed_args(argv)  # --overwrite may come after the overrides
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        result = run(cfg, overwrite=args.overwrite, allow_unverified=args.allow_unverified)
    except (ValueError, OSError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130
    if "eval" in result:
        e = result["eval"]
        print(f"step {e['step']}: eval loss {e['eval_loss']:.4f}, masked-token accuracy {e['eval_accuracy']:.3f}, "
              f"perplexity {e['eval_perplexity']:.2f}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
